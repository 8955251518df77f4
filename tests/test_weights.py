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


def test_from_source_hub_package_and_non_strict_loads():
    hub = weights.from_source({"random_weights": False, "path": "/cache/snap/model.safetensors",
                               "sha256": "c" * 64, "missing": [], "unexpected": [],
                               "strict": True, "hub": {"repo": "minchul/x", "revision": "abc",
                                                       "file": "model.safetensors"}})
    assert hub == {"source": "hub", "repo": "minchul/x", "revision": "abc",
                   "file": "model.safetensors", "sha256": "c" * 64, "missing_keys": 0,
                   "unexpected_keys": 0, "strict": True}
    loose = weights.from_source({"random_weights": False, "path": "/w/model.pt", "sha256": "d" * 64,
                                 "missing": ["a", "b"], "unexpected": ["c"], "strict": False})
    assert (loose["strict"], loose["missing_keys"], loose["unexpected_keys"]) == (False, 2, 1)
    assert weights.is_partial({"weights": loose})
    rnd = weights.from_source({"random_weights": True, "seed": 3, "init": {"modules": "x"}})
    assert rnd == {"source": "random", "seed": 3, "init": {"modules": "x"}}
    assert weights.describe({"weights": rnd}) == "RANDOM weights (seed 3)"


def test_stage_warning_says_what_is_meaningless():
    rnd = {"arch": "vit_kprpe_small", "weights": {"source": "random", "seed": 0}}
    line = weights.stage_warning(rnd, "recognizer")
    assert line == ("recognizer vit_kprpe_small: RANDOM weights (seed 0): its similarities are "
                    "meaningless for real faces")
    partial = {"arch": "dfa_mnet025", "weights": {"source": "checkpoint", "file": "/a.pt",
                                                  "missing_keys": 4}}
    assert "PARTIAL: 4 tensor(s)" in weights.stage_warning(partial, "keypoints")
    real = {"arch": "mtcnn", "weights": {"source": "package", "package": "facenet-pytorch 2.6.0"}}
    assert weights.stage_warning(real, "detector") is None


def test_pipeline_warns_for_random_stages(models_dir, tmp_path, caplog):
    import logging
    import shutil

    from kpface.export.onnx_export import export_model
    from kpface.pipeline import FacePipeline
    root = tmp_path / "models"
    shutil.copytree(models_dir, root)
    logging.getLogger("kpface.export.onnx_export").setLevel(logging.ERROR)
    export_model("dfa_mnet025", root / "keypoints", check=False)  # random weights
    with caplog.at_level(logging.WARNING, logger="kpface.pipeline"):
        pipe = FacePipeline.from_dir(root, threads=1)
    assert pipe.weights["detector"]["source"] == "package"
    assert pipe.weights["recognizer"] == weights.weights_of(pipe.recognizer.manifest)
    assert "keypoints" not in pipe.weights  # left out: its weights are random
    assert len(pipe.warnings) == 2
    assert pipe.warnings[0].startswith("recognizer vit_kprpe_tiny: RANDOM weights (seed 0)")
    assert pipe.warnings[1].startswith("keypoints dfa_mnet025: RANDOM weights, left out")
    assert all(w in caplog.text for w in pipe.warnings)
    assert "RANDOM" in pipe.verdict_problem
    allowed = FacePipeline.from_dir(root, threads=1, allow_random_keypoints=True)
    assert allowed.weights["keypoints"]["source"] == "random"
    assert [w.split(":")[0] for w in allowed.warnings] == ["keypoints dfa_mnet025",
                                                           "recognizer vit_kprpe_tiny"]
