"""Gallery benchmark: ``python -m kpface.gallery.bench --rows 1000000``.

Builds a gallery file of synthetic embeddings (:mod:`.synthetic`: seeded, 512-d, one row per
identity, mated cosine 0.5-0.7) through the public API, then measures on held-out queries:

- recall@1 against exact search (the best row by a plain matrix product over every row,
  computed here, independently of the gallery), for mated searches (people enrolled; their
  best row is their own in >99.9% of cases) and, separately, non-mated ones;
- latency of single-query ``search(q, k=1)`` on one thread (p50, p90), and batched throughput
  on two threads (queries/s);
- index build time, the time to add the rows and to reopen the file, and memory (resident set
  after the build, and the peak).

With ``--sweep`` it also profiles nprobe (IVF) or efSearch (HNSW): recall and p50 at each.
Progress lines go to stderr; the report is printed as JSON (and written with ``--json``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .gallery import Gallery
from .synthetic import CHUNK, Synthetic, exact_top1

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mem() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 2**20, 3)  # GiB
    return {"rss_gib": out.get("VmRSS"), "peak_gib": out.get("VmHWM")}


def _threads(n: int) -> None:
    import faiss
    faiss.omp_set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def _latency(g: Gallery, queries: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Top-1 positions of single-query searches and their latency percentiles (ms)."""
    times, top = [], []
    g.search(queries[:5], k=1)  # warm
    cpu = time.process_time()
    for q in queries:
        t = time.perf_counter()
        ids, _ = g.search(q, k=1)
        times.append(time.perf_counter() - t)
        top.append(ids[0, 0])
    cpu_ms = (time.process_time() - cpu) * 1e3 / len(queries)
    ms = np.array(times) * 1e3
    return np.array(top, dtype=object), {"p50_ms": round(float(np.median(ms)), 3),
                                         "p90_ms": round(float(np.percentile(ms, 90)), 3),
                                         "cpu_ms_per_query": round(cpu_ms, 3)}


def _throughput(g: Gallery, queries: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Batched search (256 queries a call, k=5): the best wall-clock rate of ``repeats``, and
    the process CPU time per query (what the rate would be on two idle cores: 2 / that)."""
    best, cpu_best = 0.0, np.inf
    for _ in range(repeats):
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(queries), 256):
            g.search(queries[i:i + 256], k=5)
        best = max(best, len(queries) / (time.perf_counter() - t))
        cpu_best = min(cpu_best, (time.process_time() - cpu) / len(queries))
    return {"queries_per_s": round(best, 1), "cpu_ms_per_query": round(cpu_best * 1e3, 3),
            "queries_per_s_on_2_idle_cores": round(2 / cpu_best, 1)}


def _set_search(g: Gallery, value: int) -> None:
    import faiss
    index = g._index
    if index.kind == "ivf":
        index.params["nprobe"] = value
        faiss.extract_index_ivf(index.index).nprobe = value
    elif index.kind == "hnsw":
        index.params["efSearch"] = value
        faiss.downcast_index(index.index.index).hnsw.efSearch = value


def run(rows: int, queries: int = 2000, index: str = "auto", alpha: float = 1.0,
        seed: int = 0, workdir: str | None = None, sweep: bool = False,
        keep: bool = False, reuse: str | bool = False) -> dict:
    load0 = os.getloadavg()
    work = Path(workdir or tempfile.mkdtemp(prefix="kpface-gallery-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"bench-{rows}.kpg"
    if reuse and path.exists():
        with Gallery.open(path, create=False) as old:
            reuse = reuse if len(old) == rows else False
    else:
        reuse = False
    keep_index = reuse == "index"
    for suffix in (() if keep_index else (".index", ".index.json")) + \
            (() if reuse else ("", "-wal", "-shm")):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    data = Synthetic(alpha=alpha, seed=seed)
    rng = np.random.default_rng([seed, 9])
    who = rng.choice(rows, size=queries, replace=False)
    mated = data.mated_queries(who)
    non_mated = data.non_mated_queries(queries)
    both = np.concatenate([mated, non_mated])
    _threads(2)

    _say(f"bench: {'reusing the' if reuse else 'adding'} {rows:,} synthetic rows of {path}")
    g = Gallery.open(path, threshold=0.5, index=index, progress=_say)
    t0 = time.perf_counter()
    best_i = np.full(len(both), -1, np.int64)
    best_s = np.full(len(both), -np.inf, np.float32)
    for first in range(0, rows, CHUNK):
        count = min(CHUNK, rows - first)
        emb = data.gallery(first, count)
        if not reuse:
            g.add([str(first + i) for i in range(count)], emb)
        i, s = exact_top1(both, [emb])
        better = s > best_s
        best_i[better], best_s[better] = i[better] + first, s[better]
        done = first + count
        spent = time.perf_counter() - t0
        left = spent / done * (rows - done)
        _say(f"bench: {done:,}/{rows:,} rows {'read' if reuse else 'added'} ({spent:.0f} s, "
             f"~{left:.0f} s left)")
    add_s = time.perf_counter() - t0
    g.close()

    t = time.perf_counter()
    g = Gallery.open(path, index=index, progress=_say)
    with g.store.lock:
        g._sync()  # reads every row into memory
    reopen_s = time.perf_counter() - t
    t = time.perf_counter()
    kind = g.build_index()
    build_s = time.perf_counter() - t
    mem_built = _mem()
    params = {} if g._index is None else dict(g._index.params)

    _threads(1)
    top, lat = _latency(g, both)
    exact_ids = best_i.astype(str)
    report = {
        "rows": rows, "dim": data.dim, "alpha": alpha, "seed": seed, "index": kind,
        "params": params, "queries": {"mated": len(mated), "non_mated": len(non_mated)},
        "mate_is_exact_top1": float(np.mean(best_i[:queries] == who)),
        "recall_at_1": {"mated": float(np.mean(top[:queries] == exact_ids[:queries])),
                        "non_mated": float(np.mean(top[queries:] == exact_ids[queries:]))},
        "latency_1_thread": lat,
        "seconds": {"add": None if reuse else round(add_s, 1), "reopen": round(reopen_s, 1),
                    "build_index": round(build_s, 1)},
        "memory_after_build": mem_built,
    }
    _threads(2)
    report["throughput_2_threads"] = _throughput(g, both)
    if sweep and g._index is not None and g._index.kind in ("ivf", "hnsw"):
        _threads(1)
        name = "nprobe" if g._index.kind == "ivf" else "efSearch"
        base = int(params.get(name, 16))
        profile = []
        for value in sorted({max(1, base // 4), max(1, base // 2), base, base * 2, base * 4}):
            _set_search(g, value)
            top_v, lat_v = _latency(g, both[:queries])
            recall = float(np.mean(top_v == exact_ids[:queries]))
            profile.append({name: value, "recall_at_1_mated": recall,
                            **lat_v})
            _say(f"bench: {name} {value}: {profile[-1]}")
        report["sweep"] = profile
        _set_search(g, base)
    report["memory_peak_gib"] = _mem()["peak_gib"]
    report["file_bytes"] = sum(Path(f"{path}{s}").stat().st_size for s in ("", "-wal", ".index")
                               if Path(f"{path}{s}").exists())
    report["machine"] = {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load0],
                         "load_after": [round(x, 2) for x in os.getloadavg()]}
    g.close()
    if not keep and workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kpface.gallery.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2000, help="mated and as many non-mated")
    ap.add_argument("--index", default="auto", help="auto, exact, flat, ivf or hnsw")
    ap.add_argument("--alpha", type=float, default=1.0, help="spectrum of the identity centres "
                    "(0: isotropic, the worst case)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="where the gallery file goes (default: a temporary folder)")
    ap.add_argument("--sweep", action="store_true", help="profile nprobe / efSearch")
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--reuse", nargs="?", const="file", choices=("file", "index"),
                    help="keep a gallery file of --rows rows left in --dir by an earlier run "
                    "(skips the adds); 'index': its index cache too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(args.rows, args.queries, args.index, args.alpha, args.seed, args.dir, args.sweep,
                 reuse=args.reuse)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
