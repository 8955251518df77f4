"""The cluster path on two Ray nodes simulated on this machine (ray.cluster_utils.Cluster,
one CPU each, both on 127.0.0.1): enrolment spreads over both nodes and gives the local
path's embeddings; a served request crosses nodes (detector on one, recognizer on the other)."""
import base64
import json
import time

import numpy as np
import pytest
import ray  # extra 'cluster'
from ray.cluster_utils import Cluster

from kpface.cluster import LOOPBACK_ENV, enroll_with_ray
from kpface.errors import InputError, KpfaceError
from test_cluster import (StandInGallery, assert_stopped, descendants, free_port,
                          local_embeddings, make_photos, post)

# Ray's own deprecation notices (pydantic fields, Ray Data settings) are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 << 20}


@pytest.fixture(scope="module")
def loopback():
    """Every Ray process, and the driver's address handling, on 127.0.0.1 only (see
    kpface.cluster._loopback_only): Ray otherwise rewrites 127.0.0.1 to the host's address."""
    mp = pytest.MonkeyPatch()
    mp.setenv(LOOPBACK_ENV, "0")
    mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def cluster(loopback):
    before = set(descendants())
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    started = set()
    try:
        c.add_node(**NODE)
        c.wait_for_nodes()
        started = set(descendants()) - before
        assert started, "the cluster started no process"
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
    assert_stopped(started)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("photos") / "people", copies=2)


def test_enrolment_on_two_nodes(cluster, models_dir, photos):
    g = StandInGallery()
    s = enroll_with_ray(photos, g, models_dir=models_dir, address=cluster.address,
                        workers=2, threads=1, batch_size=1)
    assert not ray.is_initialized()  # the driver disconnected; the cluster stays up
    expected = local_embeddings(models_dir, photos)
    assert sorted(g.ids) == sorted(expected) and len(expected) == 4
    for id_, emb in zip(g.ids, g.emb):
        assert np.abs(emb - expected[id_]).max() <= 1e-5, id_
    nodes = {w.split("/")[0] for w in s.workers}
    assert len(nodes) == 2, s.workers  # one worker per node: each node has one CPU
    assert len(s.failed) == 2


def test_request_crosses_nodes(cluster, models_dir, photos):
    from ray import serve

    from kpface import serve as kserve
    from kpface.cluster import ray_session
    from kpface.pipeline import FacePipeline
    image = photos / "eileen" / "0.png"
    with ray_session(cluster.address):
        # one CPU per replica: the detector and the recognizer cannot share a node
        app = kserve.build_app(str(models_dir), threads=1)
        try:
            url = kserve.start(app, port=free_port())
            status, out = post(url + "/embed", {"image": base64.b64encode(image.read_bytes())
                                                .decode()})
            # Each replica holds one CPU and each node has one: they run on different nodes.
            cpus = (ray.cluster_resources()["CPU"], ray.available_resources().get("CPU", 0))
        finally:
            serve.shutdown()
    assert status == 200, out
    assert cpus == (2, 0)
    direct = FacePipeline.from_dir(models_dir, threads=1)
    from kpface.image import load_image
    want = direct(load_image(image))[0].embedding
    assert np.abs(np.array(out["faces"][0]["embedding"]) - want).max() <= 1e-5
    assert json.dumps(out["models"])  # the weights blocks travel too


def test_unreachable_ray_address_fails_fast(photos, models_dir):
    assert not ray.is_initialized()  # else the open session would be used
    port = free_port()  # nothing listens there
    t = time.perf_counter()
    with pytest.raises(KpfaceError, match=f"nothing answers at 127.0.0.1:{port}"):
        enroll_with_ray(photos, StandInGallery(), models_dir=models_dir,
                        address=f"127.0.0.1:{port}")
    with pytest.raises(InputError, match="is not HOST:PORT"):
        enroll_with_ray(photos, StandInGallery(), models_dir=models_dir, address="nowhere")
    assert time.perf_counter() - t < 60  # not Ray's minutes of retries
