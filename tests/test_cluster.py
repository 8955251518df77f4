"""The cluster path on a local Ray instance (2 CPUs): Ray Data enrolment and the Serve app.

One Ray session serves the whole module; its fixture stops it and checks that every process it
started has exited. Enrolment and serving write and read real ``kpface.gallery.Gallery``
files; a stand-in gallery that records its ``add`` calls checks how the stream is chunked.
"""
import base64
import http.client
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from argparse import Namespace

import cv2
import numpy as np
import pytest
import ray  # extra 'cluster'

from kpface import samples
from kpface.cluster_cli import LOCAL, enroll_ray
from kpface.enrolment import EnrolResult, enroll, list_enrolment
from kpface.errors import InputError, KpfaceError, ModelError
from kpface.image import load_image

# Ray's own deprecation notices (pydantic fields, Ray Data settings) are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")



# -- helpers shared with test_cluster_nodes.py -------------------------------------------------

def make_photos(root, copies=3):
    """root/eileen/*.png and root/cameraman/*.png (real photos, a few variants each), a photo
    without a face and a truncated JPEG."""
    variants = [lambda im: im, lambda im: im[:, ::-1],
                lambda im: cv2.convertScaleAbs(im, alpha=1.15, beta=-10),
                lambda im: cv2.resize(im, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)]
    for person, image in (("eileen", samples.astronaut_bgr()), ("cameraman", samples.camera_bgr())):
        (root / person).mkdir(parents=True)
        for i in range(copies):
            cv2.imwrite(str(root / person / f"{i}.png"), variants[i % len(variants)](image))
    cv2.imwrite(str(root / "coffee.jpg"), samples.coffee_bgr())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a jpeg")
    return root


def local_embeddings(models_dir, folder):
    """The slow, obvious computation: one pipeline, every image, the largest face."""
    from kpface.pipeline import FacePipeline
    pipe = FacePipeline.from_dir(models_dir, threads=1)
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        try:
            faces = pipe(load_image(path))
        except InputError:
            continue
        if faces:
            areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
            out[path.relative_to(folder).as_posix()] = faces[int(np.argmax(areas))].embedding
    return out


class StandInGallery:
    """A recorder of ``add`` calls with kpface.gallery.Gallery's API (exact cosine search):
    checks how the enrolment stream is chunked, and stands in where no file is needed."""

    def __init__(self, ids=(), embeddings=None, labels=(), threshold=0.5):
        self.ids, self.labels = list(ids), list(labels)
        self.emb = np.zeros((0, 512), np.float32) if embeddings is None else embeddings
        self.threshold = threshold
        self.add_calls = []

    def add(self, ids, embeddings, labels=None):
        self.add_calls.append(len(ids))
        self.ids += list(ids)
        self.labels += list(labels or ids)
        self.emb = np.concatenate([self.emb, np.asarray(embeddings, np.float32)])

    def search(self, queries, k=5):
        sims = np.atleast_2d(queries) @ self.emb.T
        order = np.argsort(-sims, axis=1)[:, :k]
        return (np.array(self.ids, dtype=object)[order], np.take_along_axis(sims, order, 1))

    def identify(self, embedding):
        ids, scores = self.search(embedding, 1)
        i = self.ids.index(ids[0, 0])
        return {"id": ids[0, 0], "label": self.labels[i], "score": float(scores[0, 0]),
                "match": bool(scores[0, 0] >= self.threshold)}

    def __len__(self):
        return len(self.ids)


def descendants():
    """pid -> state of every live descendant process of this one (from /proc)."""
    parent, state = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            state[int(d)], parent[int(d)] = fields[0], int(fields[1])
    found, todo = {}, [os.getpid()]
    while todo:
        p = todo.pop()
        for child, pp in parent.items():
            if pp == p and child not in found:
                found[child] = state[child]
                todo.append(child)
    return {p: s for p, s in found.items() if s != "Z"}


def assert_stopped(pids, timeout=30):
    """Every process in ``pids`` has exited (zombies count as exited)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = set(pids) & set(descendants())
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"processes still running after shutdown: {sorted(alive)}")


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    from kpface.cluster import ray_session
    before = set(descendants())
    with ray_session(None, num_cpus=2, object_store_mb=100):
        started = set(descendants()) - before
        assert started, "ray.init started no process"
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]  # loopback only
        # The stand-in gallery lives in this test module, which Ray workers cannot import.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        try:
            yield ray
        finally:
            from ray import serve
            serve.shutdown()
    assert not ray.is_initialized()
    assert_stopped(started)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("photos") / "people")


@pytest.fixture(scope="module")
def expected(models_dir, photos):
    return local_embeddings(models_dir, photos)


# -- enrolment, no Ray needed -------------------------------------------------------------------

def test_folder_convention(tmp_path):
    (tmp_path / "alice" / "trip").mkdir(parents=True)
    for name in ("alice/1.jpg", "alice/trip/2.PNG", "bob.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    items = list_enrolment(tmp_path)
    assert [(i.id, i.label) for i in items] == [("alice/1.jpg", "alice"),
                                                ("alice/trip/2.PNG", "alice"),
                                                ("bob.png", "bob")]
    assert items[0].path == str(tmp_path / "alice" / "1.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        list_enrolment(tmp_path / "empty")


def test_enroll_adds_in_chunks_and_reports_failures():
    e = np.eye(4, dtype=np.float32)
    stream = [EnrolResult("a/1", "a", "p1", e[0], faces=1),
              EnrolResult("x", "x", "p2", error="p2: no face found"),
              EnrolResult("a/2", "a", "p3", e[1], faces=2),
              EnrolResult("b/1", "b", "p4", e[2], faces=1)]
    g = StandInGallery(embeddings=np.zeros((0, 4), np.float32))
    s = enroll(iter(stream), g, chunk=2)
    assert g.add_calls == [2, 1] and g.ids == ["a/1", "a/2", "b/1"]
    assert g.labels == ["a", "a", "b"] and np.array_equal(g.emb, e[:3])
    assert (s.images, s.added, s.several_faces) == (4, 3, 1)
    assert [r.path for r in s.failed] == ["p2"]
    with pytest.raises(InputError, match="none of the 1 image"):
        enroll(iter(stream[1:2]), g)


# -- Ray Data enrolment ---------------------------------------------------------------------------

def rows_of(path):
    """Every row of a gallery file: id -> (label, embedding)."""
    from kpface.gallery import Gallery
    with Gallery.open(path, create=False) as g:
        ids = sorted(r[0] for r in g.store.db.execute("SELECT id FROM faces"))
        emb, labels = g.get(ids)
    return {i: (l_, e) for i, l_, e in zip(ids, labels, emb)}


def test_ray_enrolment_equals_local(local_ray, models_dir, photos, expected, tmp_path):
    from kpface.cluster import enroll_with_ray
    from kpface.gallery import Gallery
    with Gallery.open(tmp_path / "g.kpg", model=models_dir) as g:
        s = enroll_with_ray(photos, g, models_dir=models_dir, workers=2, threads=1, batch_size=1)
    rows = rows_of(tmp_path / "g.kpg")
    assert sorted(rows) == sorted(expected) and len(expected) == 6
    for id_, (label, emb) in rows.items():
        assert label == id_.split("/")[0]
        assert np.abs(emb - expected[id_]).max() <= 1e-5, id_
        assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5
    assert sorted(r.id for r in s.failed) == ["broken.jpg", "coffee.jpg"]
    assert "truncated" in next(r.error for r in s.failed if r.id == "broken.jpg")
    assert "no face" in next(r.error for r in s.failed if r.id == "coffee.jpg")
    assert (s.images, s.added) == (8, 6)
    assert len(s.workers) == 2  # both actors got work: each opened its own pipeline


def test_gallery_enroll_cli_ray_and_local_give_the_same_rows(local_ray, models_dir, photos,
                                                              expected, tmp_path, capsys):
    from kpface.cli import main
    common = ["--models", str(models_dir), "--threads", "1"]
    assert main(["gallery", "enroll", str(photos), "--gallery", str(tmp_path / "ray.kpg"),
                 "--ray", "--workers", "1", "--batch-size", "8", *common]) == 0
    out, err = capsys.readouterr()
    assert "enrolled 6 of 8 image(s)" in out and "on 1 Ray worker(s)" in out
    assert err.count("skipped: ") == 2 and "6 row(s), 2 identities" in out
    assert main(["gallery", "enroll", str(photos), "--gallery", str(tmp_path / "local.kpg"),
                 *common]) == 0
    ray_rows, local_rows = rows_of(tmp_path / "ray.kpg"), rows_of(tmp_path / "local.kpg")
    assert sorted(ray_rows) == sorted(local_rows) == sorted(expected)
    for id_, (label, emb) in ray_rows.items():
        assert label == local_rows[id_][0]
        assert np.abs(emb - local_rows[id_][1]).max() <= 1e-5
        assert np.abs(emb - expected[id_]).max() <= 1e-5


def test_enroll_ray_streams_one_chunk(local_ray, models_dir, photos, expected):
    g = StandInGallery()
    args = Namespace(dir=str(photos), ray=LOCAL, models=str(models_dir), workers=1,
                     threads=1, batch_size=8, debug=False)
    assert enroll_ray(args, g) == 0
    assert g.add_calls == [6]  # streamed results, one chunk
    assert max(np.abs(e - expected[i]).max() for i, e in zip(g.ids, g.emb)) <= 1e-5


def test_ray_enrolment_refuses_bad_requests(local_ray, models_dir, photos, tmp_path):
    from kpface.cluster import enroll_with_ray
    with pytest.raises(InputError, match="need 6 CPUs"):
        enroll_with_ray(photos, StandInGallery(), models_dir=models_dir, workers=3, threads=2)
    with pytest.raises(ModelError, match="no detector/"):
        enroll_with_ray(photos, StandInGallery(), models_dir=tmp_path)
    with pytest.raises(KpfaceError, match="has no add"):
        enroll_with_ray(photos, object(), models_dir=models_dir)
    # a model that fails its hash check is refused on the driver, before any worker starts
    broken = tmp_path / "models"
    shutil.copytree(models_dir, broken)
    with open(broken / "recognizer" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="does not match its manifest"):
        enroll_with_ray(photos, StandInGallery(), models_dir=broken)


# -- Ray Serve ------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=60):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def b64(path):
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def served(local_ray, models_dir, expected, photos, tmp_path_factory):
    from kpface import serve as kserve
    from kpface.gallery import Gallery
    gallery_file = tmp_path_factory.mktemp("gallery") / "g.kpg"
    with Gallery.open(gallery_file, model=models_dir) as g:  # the served recognizer's gallery
        g.add(["eileen/0.png", "cameraman/0.png"],
              np.stack([expected["eileen/0.png"], expected["cameraman/0.png"]]),
              labels=["eileen", "cameraman"])
    app = kserve.build_app(str(models_dir), threads=1, gallery=str(gallery_file),
                           cpus_per_replica=0.5, max_batch_size=8, batch_wait_ms=50)
    url = kserve.start(app, port=free_port())
    assert url.startswith("http://127.0.0.1:")
    yield url
    kserve.stop()


def test_serve_embed_equals_direct_call(served, models_dir, photos):
    from kpface.pipeline import FacePipeline
    direct = FacePipeline.from_dir(models_dir, threads=1)(load_image(photos / "eileen" / "1.png"))
    status, out = post(served + "/embed", {"image": b64(photos / "eileen" / "1.png")})
    assert status == 200 and len(out["faces"]) == len(direct) == 1
    face = out["faces"][0]
    assert np.abs(np.array(face["embedding"]) - direct[0].embedding).max() <= 1e-5
    assert np.abs(np.array(face["box"]) - direct[0].box).max() <= 0.01
    assert np.abs(np.array(face["landmarks"]) - direct[0].landmarks).max() <= 0.01
    models = out["models"]
    assert models["detector"] == {"arch": "mtcnn", "weights": models["detector"]["weights"]}
    assert models["detector"]["weights"]["source"] == "package"  # facenet-pytorch's files
    assert models["detector"]["weights"]["package"].startswith("facenet-pytorch ")
    assert models["recognizer"]["arch"] == "vit_kprpe_tiny"
    assert models["recognizer"]["weights"]["source"] == "random"
    assert models["recognizer"]["weights"]["seed"] == 0
    assert models["keypoints"] is None  # no keypoint model: MTCNN's own landmarks
    status, out = post(served + "/embed", {"image": b64(photos / "coffee.jpg")})
    assert status == 200 and out["faces"] == []


def test_serve_takes_the_file_as_the_body(served, photos):
    path = photos / "eileen" / "1.png"
    _, as_json = post(served + "/embed", {"image": b64(path)})
    req = urllib.request.Request(served + "/identify?k=1", data=path.read_bytes(), method="POST",
                                 headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    assert len(out["faces"][0]["candidates"]) == 1
    assert out["faces"][0]["box"] == as_json["faces"][0]["box"]
    req = urllib.request.Request(served + "/embed", data=path.read_bytes(), method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["faces"][0]["embedding"] == as_json["faces"][0]["embedding"]
    req.full_url = served + "/identify?k=two"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and "k must be" in json.loads(e.value.read())["error"]


def test_serve_identify(served, photos):
    status, out = post(served + "/identify", {"image": b64(photos / "eileen" / "0.png"), "k": 2})
    assert status == 200 and len(out["faces"]) == 1
    face = out["faces"][0]
    assert [c["id"] for c in face["candidates"]] == ["eileen/0.png", "cameraman/0.png"]
    assert face["candidates"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    # The tiny test recognizer has random weights: scores, but no identity verdict.
    assert face["match"] is None and "RANDOM weights" in face["no_verdict"]
    assert "embedding" not in face
    with urllib.request.urlopen(served + "/health", timeout=30) as r:
        assert json.loads(r.read())["gallery"] == 2


def test_serve_identify_verdict_and_refusals(local_ray, models_dir, expected, photos, tmp_path):
    """With --allow-random the verdict comes from the real gallery's identify; a gallery made
    by another recognizer is refused when the server starts."""
    import shutil

    from kpface import serve as kserve
    from kpface.gallery import Gallery
    path = tmp_path / "g.kpg"
    with Gallery.open(path, model=models_dir) as g:
        g.add(["eileen/0.png"], expected["eileen/0.png"][None], labels=["eileen"])
        threshold = g.threshold
    det = kserve.Detector.func_or_class(None, str(models_dir), {}, gallery_path=str(path),
                                        allow_random=True)
    assert det.gallery.identify(expected["eileen/0.png"], allow_random=True).label == "eileen"
    other = tmp_path / "other"
    shutil.copytree(models_dir, other)
    m = json.loads((other / "recognizer" / "manifest.json").read_text())
    (other / "recognizer" / "manifest.json").write_text(json.dumps({**m, "threshold": 0.99}))
    with pytest.raises(ModelError, match="another recognizer"):
        kserve.Detector.func_or_class(None, str(other), {}, gallery_path=str(path))
    assert threshold == m["threshold"]  # a new gallery takes its recognizer's threshold


def test_recognizer_batches_concurrent_requests(served, models_dir, photos):
    from ray import serve

    from kpface.serving import DetectStage, EmbedStage
    det = DetectStage(models_dir)(photos.joinpath("eileen", "0.png").read_bytes())
    crops, points = det["crops"], det["points"]
    alone = EmbedStage(models_dir)(crops, points)
    handle = serve.get_deployment_handle("recognizer", app_name="kpface")
    handle.remote(crops, points).result(timeout_s=60)  # the handle finds its replica first
    pending = [handle.remote(crops, points) for _ in range(6)]
    results = [p.result(timeout_s=60) for p in pending]
    for r in results:
        assert np.abs(r - alone).max() <= 1e-5
    stats = handle.stats.remote().result(timeout_s=30)
    assert stats["largest"] >= 2, stats  # requests sent together were embedded together
    assert stats["requests"] >= 7


def test_serve_bad_requests(served):
    cases = [(b"not json", 400, "not JSON"), ({"img": "x"}, 400, "\"image\" is missing"),
             ({"image": "***"}, 400, "not valid base64"),
             ({"image": base64.b64encode(b"GIF89a...").decode()}, 400, "not a readable image")]
    for body, code, text in cases:
        status, out = post(served + "/embed", body)
        assert status == code and text in out["error"], (body, out)
        assert list(out) == ["error"] and "\n" not in out["error"]
    status, out = post(served + "/identify", {"image": b64_png(), "k": 0})
    assert status == 400 and "k must be an integer" in out["error"]
    status, out = post(served + "/nothing", {})
    assert status == 404 and "no endpoint /nothing" in out["error"]
    try:
        urllib.request.urlopen(served + "/embed", timeout=30)
        raise AssertionError("GET /embed was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 405 and e.headers["Allow"] == "POST"
        assert "takes POST" in json.loads(e.read())["error"]
    # A body announced as too large is refused from its headers, before it is read.
    host, port = served.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest("POST", "/embed")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(64 << 20))
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 413 and "the limit is" in json.loads(r.read())["error"]
    finally:
        conn.close()


def b64_png():
    ok, data = cv2.imencode(".png", samples.astronaut_bgr())
    return base64.b64encode(data.tobytes()).decode()


def test_serve_cli_fails_fast_on_bad_arguments(tmp_path, capsys):
    from kpface.cli import main
    assert main(["serve", "--models", str(tmp_path / "none"), "--port", "8123"]) == 2
    assert main(["serve", "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("kpface: error: ") for line in err)
    assert "does not exist" in err[0] and "port" in err[1]
