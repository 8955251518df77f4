"""The manifest's weights block: one reader for new and older manifests, random and partial
loads told apart from real weights."""
from kpface import weights


def test_new_block_is_read_as_written():
    m = {"arch": "vit_kprpe_base",
         "weights": {"source": "hub", "repo": "minchul/x", "revision": "abc123",
                     "file": "/cache/model.safetensors", "sha256": "f" * 64,
                     "strict": True, "missing_keys": 0, "unexpected_keys": 0}}
    assert weights.weights_of(m)["repo"] == "minchul/x"
    assert not weights.is_random(m) and not weights.is_partial(m)
    assert weights.describe(m) == "hub minchul/x@abc123 (sha256 ffffffffffff)"
    assert weights.verdict_problem(m) is None
    assert "file" not in weights.for_client(m)


def test_legacy_source_random_and_checkpoint():
    rnd = {"arch": "vit_kprpe_small", "source": {"random_weights": True}}
    assert weights.weights_of(rnd) == {"source": "random"}
    assert weights.is_random(rnd)
    assert "RANDOM" in weights.verdict_problem(rnd)
    ckpt = {"source": {"random_weights": False, "path": "/w/model.pt", "sha256": "ab" * 32,
                       "missing": [], "unexpected": ["loss.weight"]}}
    block = weights.weights_of(ckpt)
    assert block == {"source": "checkpoint", "file": "/w/model.pt", "sha256": "ab" * 32,
                     "missing_keys": 0, "unexpected_keys": 1}
    assert weights.verdict_problem(ckpt) is None


def test_partial_load_is_not_a_real_model():
    m = {"arch": "vit_kprpe_base", "source": {"random_weights": False, "path": "/w/model.pt",
                                              "missing": ["blocks.0.attn.qkv.weight"],
                                              "unexpected": []}}
    assert weights.is_partial(m) and not weights.is_random(m)
    assert "PARTIAL: 1 tensor(s)" in weights.describe(m)
    assert "non-strictly" in weights.verdict_problem(m)


def test_parts_sum_their_missing_keys_and_lose_paths_for_clients():
    m = {"weights": {"source": "package", "package": "facenet-pytorch 2.6.0", "parts": {
        "pnet": {"file": "/site/pnet.pt", "sha256": "1" * 64, "missing_keys": 0},
        "onet": {"file": "/site/onet.pt", "sha256": "2" * 64, "missing_keys": 2}}}}
    assert weights.missing_keys(m) == 2 and weights.is_partial(m)
    client = weights.for_client(m)
    assert all("file" not in p for p in client["parts"].values())
    assert client["parts"]["onet"]["sha256"] == "2" * 64
