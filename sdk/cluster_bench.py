"""Measurements of the cluster path (not a test: timings are reported, never asserted).

    python -m kpface.cluster_bench --models DIR [--images 48] [--requests 40] [--out F.json]

1. Ray Data scaling: the same folder enrolled by 1 and by 2 workers (one engine thread each)
   on a local Ray instance with 2 CPUs, in alternating rounds. The processing window is read
   from the workers' own clocks (first image started -> last image done), so actor start-up
   is reported separately from the speed-up.
2. Serve overhead: one photo sent N times over HTTP to ``kpface serve``'s application (one
   thread per replica), as JSON (base64) and as the file itself, and, in alternation, given
   to an in-process FacePipeline (one thread) doing the same work a request asks for (decode
   the file's bytes, pipeline, Face.to_dict). The overhead is the difference of the medians;
   ``health_ms`` (GET /health, no work) is the floor of one HTTP round trip through Serve.
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2

from .enrolment import list_enrolment


def make_folder(root: Path, n: int) -> Path:
    """``n`` real photos (the scikit-image faces at a few scales, flips and exposures)."""
    from . import samples
    faces = [("eileen", samples.astronaut_bgr()), ("cameraman", samples.camera_bgr())]
    for i in range(n):
        label, image = faces[i % 2]
        scale = (0.8, 1.0, 1.2)[(i // 2) % 3]
        im = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if (i // 6) % 2:
            im = im[:, ::-1]
        im = cv2.convertScaleAbs(im, alpha=1.0 + 0.02 * (i % 5), beta=-2 * (i % 3))
        (root / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / label / f"{i:03d}.png"), im)
    return root


def scaling(models_dir: str, n_images: int = 48, rounds: int = 2, batch_size: int = 4,
            progress=print) -> dict:
    from .cluster import embed_ray, ray_session
    with tempfile.TemporaryDirectory(prefix="kpface-bench-") as tmp:
        items = list_enrolment(make_folder(Path(tmp), n_images))
        runs: dict[int, list[dict]] = {1: [], 2: []}
        with ray_session(None, num_cpus=2):
            for r in range(rounds):
                for workers in (1, 2):
                    t0 = time.perf_counter()
                    results = list(embed_ray(items, models_dir, workers=workers, threads=1,
                                             batch_size=batch_size))
                    wall = time.perf_counter() - t0
                    window = (max(x.finished for x in results)
                              - min(x.finished - x.seconds for x in results))
                    busy = sum(x.seconds for x in results)
                    runs[workers].append({"wall_s": round(wall, 2), "window_s": round(window, 2),
                                          "busy_s": round(busy, 2),
                                          "workers_used": len({x.worker for x in results})})
                    progress(f"round {r + 1}, {workers} worker(s): {runs[workers][-1]}")
    med = {w: statistics.median(x["window_s"] for x in runs[w]) for w in runs}
    wall = {w: statistics.median(x["wall_s"] for x in runs[w]) for w in runs}
    return {"images": n_images, "batch_size": batch_size, "runs": runs,
            "images_per_s": {w: round(n_images / med[w], 2) for w in med},
            "speedup_window": round(med[1] / med[2], 3),
            "speedup_wall": round(wall[1] / wall[2], 3)}


def serve_overhead(models_dir: str, n_requests: int = 40, port: int = 8765,
                   progress=print) -> dict:
    from . import samples
    from . import serve as kserve
    from .cluster import ray_session
    from .image import decode_image
    from .pipeline import FacePipeline
    ok, png = cv2.imencode(".png", samples.astronaut_bgr())
    data = png.tobytes()
    body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
    pipe = FacePipeline.from_dir(models_dir, threads=1)

    def direct():
        t = time.perf_counter()
        faces = [f.to_dict(embedding=True) for f in pipe(decode_image(data))]
        return time.perf_counter() - t, faces

    with ray_session(None, num_cpus=2):
        from ray import serve
        try:
            url = kserve.start(kserve.build_app(models_dir, threads=1), port=port)

            def http(raw: bool):
                t = time.perf_counter()
                req = urllib.request.Request(
                    url + "/embed", data=data if raw else body, method="POST",
                    headers={"Content-Type": "image/png" if raw else "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    out = json.loads(r.read())
                return time.perf_counter() - t, out

            def health():
                t = time.perf_counter()
                with urllib.request.urlopen(url + "/health", timeout=60) as r:
                    r.read()
                return time.perf_counter() - t
            for _ in range(3):  # warm up every path
                direct(), http(False), http(True), health()
            d, h, hr, inner, empty, det, emb = [], [], [], [], [], [], []
            for _ in range(n_requests):  # interleaved, so load changes hit all alike
                d.append(direct()[0])
                t, out = http(False)
                h.append(t)
                inner.append(out["ms"]["total"] / 1e3)
                det.append(out["ms"]["detect"] / 1e3)
                emb.append(out["ms"]["embed"] / 1e3)
                hr.append(http(True)[0])
                empty.append(health())
        finally:
            serve.shutdown()
    ms = lambda xs: round(statistics.median(xs) * 1e3, 2)  # noqa: E731
    p90 = lambda xs: round(sorted(xs)[int(0.9 * (len(xs) - 1))] * 1e3, 2)  # noqa: E731
    res = {"requests": n_requests, "image_bytes": len(data), "direct_ms": ms(d),
           "http_json_ms": ms(h), "http_file_ms": ms(hr), "direct_p90_ms": p90(d),
           "http_json_p90_ms": p90(h), "server_ms": ms(inner), "server_detect_ms": ms(det),
           "server_embed_ms": ms(emb), "health_ms": ms(empty),
           "overhead_json_ms": round(ms(h) - ms(d), 2),
           "overhead_file_ms": round(ms(hr) - ms(d), 2)}
    progress(f"serve: {res}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kpface.cluster_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="models directory")
    ap.add_argument("--images", type=int, default=48, help="photos for the scaling run (48)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (2)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per Ray batch (4)")
    ap.add_argument("--requests", type=int, default=40, help="HTTP requests (40)")
    ap.add_argument("--only", choices=("scaling", "serve"), help="run one of the two")
    ap.add_argument("--out", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    report = {}
    if args.only in (None, "scaling"):
        report["scaling"] = scaling(args.models, args.images, args.rounds, args.batch_size, say)
    if args.only in (None, "serve"):
        report["serve"] = serve_overhead(args.models, args.requests, progress=say)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from .manifest import atomic_write_text
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
