"""kpface.gallery: the SQLite file, the index cache, exact re-ranking, removal, persistence,
concurrent readers, FPIR/FNIR calibration and the refusal of verdicts from random weights.

Every expected answer is computed here by brute force (numpy dot products, Python loops),
independently of the gallery's search code."""
import json
import logging
import shutil
import sqlite3
import threading

import numpy as np
import pytest

import kpface
from kpface.errors import InputError, ModelError, RandomWeightsError
from kpface.gallery import Gallery, index as gindex
from kpface.gallery.model import same_model
from kpface.gallery.synthetic import Synthetic, exact_top1

faiss = pytest.importorskip("faiss", reason="the FAISS tests need faiss-cpu (extra 'gallery')")


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_rows(n, dim=64, seed=0):
    return unit(np.random.default_rng(seed).standard_normal((n, dim)))


def brute_topk(q, emb, k):
    """Best k rows per query by a plain loop over sorted dot products."""
    out = []
    for row in unit(np.atleast_2d(q)):
        s = emb @ row
        out.append(sorted(range(len(emb)), key=lambda i: -s[i])[:k])
    return out


# -- the old in-memory Gallery's assertions, on the new API -----------------------------------

def test_add_identify_remove_reopen(tmp_path):
    assert kpface.Gallery is Gallery  # the lazy top-level name points to the new class
    rng = np.random.default_rng(1)
    alice, bob = rng.normal(size=(2, 512)).astype(np.float32)
    g = Gallery.open(tmp_path / "g.kpg", threshold=0.5)
    g.add(["alice/1", "alice/2", "bob/1"],
          np.stack([alice, alice + 0.1 * rng.normal(size=512), bob]), labels=["alice", "alice", "bob"])
    assert len(g) == 3 and g.labels() == ["alice", "bob"]
    ids, scores = g.search(alice + 0.05 * rng.normal(size=512), k=3)
    assert ids[0, 0].startswith("alice/") and ids[0, 2] == "bob/1"
    assert scores[0, 0] > 0.5 > scores[0, 2]
    m = g.identify(alice + 0.05 * rng.normal(size=512))
    assert (m.label, m.match, m.threshold) == ("alice", True, 0.5)
    assert not g.identify(rng.normal(size=512)).match  # a stranger: below the threshold
    g.close()
    h = Gallery.open(tmp_path / "g.kpg")
    assert h.labels() == ["alice", "bob"] and h.threshold == 0.5
    assert h.identify(bob).label == "bob"
    assert h.remove_label("bob") == 1 and h.labels() == ["alice"]
    with pytest.raises(InputError, match="no identity 'bob'"):
        h.remove_label("bob")
    with pytest.raises(InputError, match="not in the gallery: bob/1"):
        h.remove(["bob/1"])
    (tmp_path / "bad.kpg").write_bytes(b"nonsense" * 100)
    with pytest.raises(InputError, match="not a kpface gallery"):
        Gallery.open(tmp_path / "bad.kpg")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    with pytest.raises(InputError, match="not a kpface gallery"):
        Gallery.open(tmp_path / "other.db")
    with pytest.raises(InputError, match="no such gallery"):
        Gallery.open(tmp_path / "missing.kpg", create=False)


def test_bad_input(tmp_path):
    g = Gallery.open(tmp_path / "g.kpg", threshold=0.3)
    assert g.search(np.ones(8), k=3)[0].shape == (1, 0)  # empty: no candidates
    assert g.identify(np.ones(8)) is None
    g.add(["a", "b"], random_rows(2, 8))
    with pytest.raises(InputError, match=r"\[N, 8\]"):
        g.add(["c"], random_rows(1, 16))
    with pytest.raises(InputError, match="twice"):
        g.add(["c", "c"], random_rows(2, 8))
    with pytest.raises(InputError, match="zero or not finite"):
        g.add(["c"], np.zeros((1, 8)))
    with pytest.raises(InputError, match="k must be"):
        g.search(np.ones(8), k=0)
    g.add(["a"], random_rows(1, 8, seed=5), labels=["x"])  # an existing id is replaced
    assert len(g) == 2 and g.get(["a"])[1] == ["x"]
    np.testing.assert_allclose(g.get(["a"])[0], random_rows(1, 8, seed=5), atol=1e-7)


# -- search ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["exact", "flat", "ivf", "hnsw"])
def test_scores_are_exact_cosine(tmp_path, kind):
    emb = random_rows(3000, dim=64, seed=2)
    q = unit(emb[:40] + 0.5 * random_rows(40, 64, seed=3))
    g = Gallery.open(tmp_path / "g.kpg", threshold=0.5, index=kind)
    g.add([f"r{i}" for i in range(len(emb))], emb)
    ids, scores = g.search(q, k=5)
    assert ids.shape == scores.shape == (40, 5)
    for row_ids, row_scores, query in zip(ids, scores, q):
        got = [int(i[1:]) for i in row_ids]
        np.testing.assert_allclose(row_scores, emb[got] @ query, atol=1e-6)  # re-ranked exactly
        assert list(row_scores) == sorted(row_scores, reverse=True)
    want = brute_topk(q, emb, 5)
    hits = np.mean([int(ids[i, 0][1:]) == want[i][0] for i in range(40)])
    assert hits == 1.0 if kind in ("exact", "flat") else hits >= 0.95, hits


def test_index_choice_by_size_and_upgrade(tmp_path, monkeypatch):
    assert [gindex.choose(n) for n in (1, 10_000, 10_001, 50_000, 50_001)] == \
        ["exact", "exact", "flat", "flat", "ivf"]
    p = gindex.ivf_params(1_000_000, 512)
    assert (p["nlist"], p["nprobe"], p["pca"]) == (2048, 64, 128)
    monkeypatch.setattr(gindex, "EXACT_MAX", 100)
    monkeypatch.setattr(gindex, "FLAT_MAX", 400)
    lines = []
    g = Gallery.open(tmp_path / "g.kpg", threshold=0.5, progress=lines.append)
    emb = random_rows(2000, seed=4)
    kinds = []
    for n in (50, 300, 2000):
        g.add([f"r{i}" for i in range(len(g), n)], emb[len(g):n])
        ids, _ = g.search(emb[n - 1], k=1)
        assert ids[0, 0] == f"r{n - 1}"
        kinds.append(g.build_index())
    assert kinds == ["exact", "flat", "ivf"]
    assert any("outgrew the flat index" in line for line in lines), lines


def test_reopen_gives_identical_results_from_the_cache(tmp_path, caplog):
    emb = random_rows(3000, seed=6)
    q = random_rows(50, seed=7)
    g = Gallery.open(tmp_path / "g.kpg", threshold=0.5, index="ivf")
    g.add([f"r{i}" for i in range(3000)], emb)
    before = g.search(q, k=5)
    g.close()
    caplog.set_level(logging.INFO, logger="kpface.gallery")
    lines = []
    h = Gallery.open(tmp_path / "g.kpg", index="ivf", progress=lines.append)
    after = h.search(q, k=5)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert "index cache loaded" in caplog.text and not lines  # reused, not rebuilt
    h.close()
    # A cache made for another recognizer (or another file) is never used: it is rebuilt.
    meta = tmp_path / "g.kpg.index.json"
    info = json.loads(meta.read_text())
    meta.write_text(json.dumps({**info, "fingerprint": "another model"}))
    h = Gallery.open(tmp_path / "g.kpg", index="ivf", progress=lines.append)
    assert np.array_equal(h.search(q, k=5)[0], before[0])
    assert any("built for another recognizer; rebuilding" in line for line in lines), lines
    h.close()
    shutil.copy(tmp_path / "g.kpg.index", tmp_path / "copy.kpg.index")
    shutil.copy(meta, tmp_path / "copy.kpg.index.json")
    c = Gallery.open(tmp_path / "copy.kpg", threshold=0.5, index="ivf", progress=lines.append)
    c.add(["x"], emb[:1])
    c.search(q, k=1)
    assert any("built for another uuid" in line for line in lines), lines


def test_recall_at_1e5_against_exact():
    """The approximate index picked for 1e5 rows (IVF) finds the exact best row of >= 99.5%
    of held-out mated searches (synthetic, README "Galleries")."""
    rows, n_q = 100_000, 500
    data = Synthetic(seed=11)
    emb = np.concatenate([data.gallery(f, min(65_536, rows - f)) for f in range(0, rows, 65_536)])
    who = np.random.default_rng(12).choice(rows, n_q, replace=False)
    q = data.mated_queries(who)
    exact, _ = exact_top1(q, [emb])
    assert np.mean(exact == who) >= 0.99  # the mate is (nearly always) the best row
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        g = Gallery.open(f"{d}/g.kpg", threshold=0.5)
        for f in range(0, rows, 25_000):
            g.add([str(i) for i in range(f, f + 25_000)], emb[f:f + 25_000])
        assert g.build_index() == "ivf"
        ids, _ = g.search(q, k=1)
        g.close()
    recall = np.mean(ids[:, 0].astype(int) == exact)
    assert recall >= 0.995, recall


# -- removal, compaction, concurrency -----------------------------------------------------------

def gallery_bytes(path):
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*")
                    if not p.name.endswith(".json"))


@pytest.mark.parametrize("kind", ["exact", "flat"])
def test_removed_is_gone_from_index_then_from_file(tmp_path, kind):
    path = tmp_path / "g.kpg"
    emb = random_rows(500, seed=8)
    g = Gallery.open(path, threshold=0.5, index=kind)
    g.add([f"r{i}" for i in range(500)], emb, labels=[f"p{i}" for i in range(500)])
    assert g.search(emb[7], k=1)[0][0, 0] == "r7"
    g.build_index()
    secret = emb[7].astype("<f4").tobytes()
    assert secret in gallery_bytes(path)
    g.remove(["r7"])
    assert "r7" not in g.search(emb[7], k=500)[0][0]  # gone from the search at once
    if kind == "flat":  # the FAISS flat cache holds raw vectors: rewritten without it
        assert secret not in (tmp_path / "g.kpg.index").read_bytes()
    other = Gallery.open(path, index=kind)  # another connection sees it gone too
    assert "r7" not in other.search(emb[7], k=500)[0][0]
    other.close()
    assert secret in gallery_bytes(path)  # SQLite leaves deleted bytes in free pages
    g.compact()
    assert secret not in gallery_bytes(path)
    assert len(g) == 499 and g.search(emb[8], k=1)[0][0, 0] == "r8"
    g.close()


def test_concurrent_readers_see_committed_changes(tmp_path):
    path = tmp_path / "g.kpg"
    emb = random_rows(400, seed=9)
    writer = Gallery.open(path, threshold=0.5)
    writer.add([f"r{i}" for i in range(200)], emb[:200])
    readers = [Gallery.open(path) for _ in range(3)]
    errors, removed = [], threading.Event()
    stop = threading.Event()

    def read(g):
        try:
            while not stop.is_set():
                seen_removed = removed.is_set()
                ids, scores = g.search(emb[:20], k=1)
                assert np.all(scores[1:, 0] > 0.999)  # every query finds its own row
                if seen_removed:  # committed before this search began: never returned
                    assert ids[0, 0] != "r0" and scores[0, 0] < 0.9
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(r,)) for r in readers for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(200, 400, 20):
        writer.add([f"r{j}" for j in range(i, i + 20)], emb[i:i + 20])
    writer.remove(["r0"])
    writer.add(["r0"], emb[0])  # re-added: found again
    writer.remove(["r0"])
    removed.set()
    threading.Event().wait(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    for r in readers:
        ids, _ = r.search(emb[399], k=1)
        assert ids[0, 0] == "r399" and len(r) == 399
        r.close()
    writer.close()


def test_two_writers_interleave(tmp_path):
    """A writer that has not looked since another one committed still ends up with every row:
    it takes the other's changes in under its own write lock before adding its own."""
    emb = random_rows(30, seed=14)
    a = Gallery.open(tmp_path / "g.kpg", threshold=0.5)
    b = Gallery.open(tmp_path / "g.kpg")
    a.add([f"r{i}" for i in range(10)], emb[:10])
    assert b.search(emb[0], k=1)[0][0, 0] == "r0"  # b has loaded the file
    a.add([f"r{i}" for i in range(10, 20)], emb[10:20])
    b.add([f"r{i}" for i in range(20, 30)], emb[20:30])  # b has not searched since
    for g in (a, b):
        ids, _ = g.search(emb, k=1)
        assert list(ids[:, 0]) == [f"r{i}" for i in range(30)]
    a.remove(["r20"])
    b.remove(["r5"])
    for g in (a, b):
        ids, scores = g.search(emb[[5, 20]], k=1)
        assert scores.max() < 0.9 and len(g) == 28
        g.close()


# -- calibration ---------------------------------------------------------------------------------

def test_calibrate_matches_frvt_definitions(tmp_path):
    data = Synthetic(dim=64, seed=13)
    emb = data.gallery(0, 300)
    labels = [f"p{i // 3}" for i in range(300)]
    g = Gallery.open(tmp_path / "g.kpg", threshold=0.9)
    g.add([f"r{i}" for i in range(300)], emb, labels=labels)
    non_mated = data.non_mated_queries(400)
    who = np.arange(0, 300, 2)
    mated = data.mated_queries(who)
    cal = g.calibrate(non_mated, mated=(mated, [labels[i] for i in who]), target_fpir=0.05)
    # FPIR: share of non-mated searches with any candidate >= T (brute force).
    top = [max(float(e @ q) for e in emb) for q in non_mated]
    hits = sum(s >= cal.threshold for s in top)
    assert hits <= 0.05 * 400 and cal.fpir == hits / 400
    below = np.nextafter(np.float32(cal.threshold), np.float32(-1))
    assert sum(s >= below for s in top) > 0.05 * 400  # the lowest such threshold
    # FNIR at rank 1: the best candidate is not the mate, or scores below T.
    misses = 0
    for q, i in zip(mated, who):
        s = emb @ q
        best = int(np.argmax(s))
        misses += labels[best] != labels[i] or s[best] < cal.threshold
    assert cal.fnir == pytest.approx(misses / len(who))
    assert cal.non_mated == 400 and cal.mated == 150 and cal.gallery_size == 300
    g.close()
    h = Gallery.open(tmp_path / "g.kpg")
    assert h.threshold == cal.threshold and h.info()["calibration"]["fnir"] == cal.fnir
    assert h.info()["threshold_source"] == "calibrated"
    with pytest.raises(InputError, match="at least 1000"):
        h.calibrate(non_mated, target_fpir=0.001)
    with pytest.raises(InputError, match="not in the gallery: stranger"):
        h.calibrate(non_mated, mated=(mated[:1], ["stranger"]))


# -- the recognizer behind a gallery -------------------------------------------------------------

def with_weights(src, dst, block):
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["weights"] = block
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_random_or_partial_weights_give_no_verdict(tmp_path, tiny_recognizer):
    emb = random_rows(5, dim=512, seed=10)
    g = Gallery.open(tmp_path / "random.kpg", model=tiny_recognizer)
    assert g.model["weights"]["source"] == "random"
    assert g.threshold == json.loads((tiny_recognizer / "manifest.json").read_text())["threshold"]
    g.add([f"r{i}" for i in range(5)], emb)
    assert g.search(emb[2], k=1)[0][0, 0] == "r2"  # scores are still given
    with pytest.raises(RandomWeightsError, match="RANDOM weights"):
        g.identify(emb[2])
    assert g.identify(emb[2], allow_random=True).id == "r2"
    partial = with_weights(tiny_recognizer, tmp_path / "partial",
                           {"source": "checkpoint", "file": "x.pt", "missing_keys": 3})
    p = Gallery.open(tmp_path / "partial.kpg", model=partial)
    p.add(["a"], emb[:1])
    with pytest.raises(RandomWeightsError, match="non-strictly"):
        p.identify(emb[0])
    real = with_weights(tiny_recognizer, tmp_path / "real",
                        {"source": "checkpoint", "file": "x.pt", "missing_keys": 0})
    r = Gallery.open(tmp_path / "real.kpg", model=real)
    r.add(["a"], emb[:1])
    assert r.identify(emb[0]).match
    # Embeddings of another recognizer are refused.
    with pytest.raises(ModelError, match="another recognizer"):
        Gallery.open(tmp_path / "random.kpg", model=real)
    record = dict(g.model)
    assert same_model(record, record) is None
    assert "not onnxruntime int8" in same_model(record, {**record, "precision": "int8", "fingerprint": "x"})
    Gallery.open(tmp_path / "none.kpg", threshold=0.5).add(["a"], emb[:1])  # no model
    with pytest.raises(ModelError, match="without a recorded recognizer"):
        Gallery.open(tmp_path / "none.kpg", model=real)
