"""``hf:OWNER/REPO[@REVISION]`` weights (issue 14, part 3), resolved by the real huggingface_hub
from a Hugging Face cache that the test lays out in a temporary directory exactly as the
library writes it (``models--owner--name/{refs/main, snapshots/<commit>/..., blobs/<sha256>}``),
with ``HF_HUB_OFFLINE=1``: nothing is fetched. The files' contents are random-weight stand-ins
of the right architecture, with the Hugging Face key layout (``model.net.*``)."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from kpface import hub
from kpface.errors import InputError

from test_cli import assert_one_line_error

pytest.importorskip("huggingface_hub", reason="hf: weights need huggingface_hub "
                    "(pip install 'kpface[hub]')")

DFA_REPO = "minchul/cvlface_DFA_mobilenet"
TINY_REPO = "kpface-test/vit_kprpe_tiny"  # not a published repo: needs --arch
COMMIT = {DFA_REPO: "0123456789abcdef0123456789abcdef01234567",
          TINY_REPO: "89abcdef0123456789abcdef0123456789abcdef"}


def _stand_in(arch: str, seed: int) -> dict:
    from kpface.export import registry
    torch.manual_seed(seed)
    model = registry.get(arch).factory()
    with torch.no_grad():  # non-trivial values everywhere, so a load that did nothing shows
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return {f"model.net.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}


def _add_repo(hub_cache, repo: str, commit: str, files: dict[str, bytes]) -> dict[str, str]:
    """One repo in the cache as huggingface_hub writes it; returns {file: blob sha256}."""
    root = hub_cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)  # no newline, like the library
    (root / "blobs").mkdir()
    shas = {}
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()  # LFS files are stored under their sha256
        (root / "blobs" / sha).write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "blobs" / sha, link.parent))
        shas[name] = sha
    return shas


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    from safetensors.torch import save
    home = tmp_path_factory.mktemp("hf_home")
    shas = {}
    for repo, arch in ((DFA_REPO, "dfa_mnet025"), (TINY_REPO, "vit_kprpe_tiny")):
        files = {"model.safetensors": save(_stand_in(arch, seed=11)),
                 "config.json": json.dumps({"stand_in_for": arch}).encode()}
        shas[repo] = _add_repo(home / "hub", repo, COMMIT[repo], files)["model.safetensors"]
    return home, shas


def kpface_offline(hf_home, *args):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    p = subprocess.run([sys.executable, "-m", "kpface", *map(str, args)], capture_output=True,
                       text=True, timeout=300, env=env)
    return p.returncode, p.stdout, p.stderr


def test_names_and_the_arch_table():
    assert hub.parse("hf:minchul/x") == hub.HubName("minchul/x", None)
    assert hub.parse("hf:minchul/x@v1.0") == hub.HubName("minchul/x", "v1.0")
    assert str(hub.parse("hf:a/b@c")) == "hf:a/b@c"
    for bad in ("hf:", "hf:nouser", "hf:a/b@", "hf:a/b/c"):
        with pytest.raises(InputError, match="not a Hugging Face weights name"):
            hub.parse(bad)
    for repo in ("minchul/cvlface_adaface_vit_base_kprpe_webface4m",
                 "minchul/cvlface_adaface_vit_base_kprpe_webface12m"):
        assert hub.arch_for(f"hf:{repo}", "recognizer") == "vit_kprpe_base"
    assert hub.arch_for(f"hf:{DFA_REPO}", "keypoints") == "dfa_mnet025"
    assert hub.arch_for(f"hf:{TINY_REPO}", "recognizer", "vit_kprpe_tiny") == "vit_kprpe_tiny"
    with pytest.raises(InputError, match="name it with --arch"):
        hub.arch_for(f"hf:{TINY_REPO}", "recognizer")
    with pytest.raises(InputError, match="holds a keypoints"):
        hub.arch_for(f"hf:{DFA_REPO}", "recognizer")
    with pytest.raises(InputError, match="holds vit_kprpe_base weights, not vit_kprpe_small"):
        hub.arch_for("hf:minchul/cvlface_adaface_vit_base_kprpe_webface4m", None,
                     "vit_kprpe_small")


@pytest.fixture(scope="module")
def dfa_export(hf_home, tmp_path_factory):
    home, _ = hf_home
    out = tmp_path_factory.mktemp("hub_export") / "keypoints"
    code, stdout, err = kpface_offline(home, "export", "keypoints", "--weights",
                                       f"hf:{DFA_REPO}", "--out", out)
    assert code == 0, err
    return out, stdout, err


def test_export_keypoints_by_name_offline(hf_home, dfa_export):
    _, shas = hf_home
    out, stdout, err = dfa_export
    m = json.loads((out / "manifest.json").read_text())
    assert m["arch"] == "dfa_mnet025"  # from the repo: no --arch given
    assert m["weights"] == {"source": "hub", "repo": DFA_REPO, "revision": COMMIT[DFA_REPO],
                            "file": "model.safetensors", "sha256": shas[DFA_REPO],
                            "missing_keys": 0, "unexpected_keys": 0, "strict": True}
    assert all(p["passed"] for p in m["parity"].values())
    assert f"weights: hub {DFA_REPO}@{COMMIT[DFA_REPO]}" in stdout and "RANDOM" not in err


def test_library_export_at_a_revision(hf_home, tmp_path):
    """export_model(weights="hf:...@REV") (the demo's path; the CLI resolves first)."""
    home, shas = hf_home
    name = f"hf:{TINY_REPO}@{COMMIT[TINY_REPO]}"
    code = ("import json, logging; logging.disable(logging.WARNING)\n"
            "from kpface.export.onnx_export import export_model\n"
            f"m = export_model('vit_kprpe_tiny', {str(tmp_path / 'rec')!r}, weights={name!r})\n"
            "print(json.dumps(m['weights']))\n")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    block = json.loads(p.stdout.strip().splitlines()[-1])
    assert (block["source"], block["repo"], block["revision"]) == ("hub", TINY_REPO,
                                                                   COMMIT[TINY_REPO])
    assert block["sha256"] == shas[TINY_REPO]
    # the stand-in's values, not a random init, are in the export
    import numpy as np
    import onnxruntime as ort
    from kpface.export.checkpoint import read_state_dict
    from kpface.export.onnx_export import build_model
    path = hub_file(home, TINY_REPO)
    _, model, _ = build_model("vit_kprpe_tiny", weights=path)
    want, _ = read_state_dict(path)
    assert torch.equal(model.keypoint_linear.weight, want["model.net.keypoint_linear.weight"])
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    kp = np.full((2, 5, 2), 0.45, np.float32)
    got = ort.InferenceSession(str(tmp_path / "rec" / "model.onnx"),
                               providers=["CPUExecutionProvider"]).run(
        None, {"image": x, "keypoints": kp})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(kp)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def hub_file(home, repo):
    return (home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT[repo]
            / "model.safetensors")


def test_not_in_the_cache_offline_is_one_line(hf_home, tmp_path):
    home, _ = hf_home
    repo = "minchul/cvlface_adaface_vit_base_kprpe_webface4m"
    code, _, err = kpface_offline(home, "export", "recognizer", "--weights", f"hf:{repo}",
                                  "--out", tmp_path / "r")
    assert_one_line_error(code, err, f"{repo}: model.safetensors is not available "
                                     "(HF_HUB_OFFLINE is set and the cache does not hold it)")
    assert f"huggingface.co/{repo}/resolve/main/model.safetensors" in err
    assert "pass its path with --weights PATH" in err and not (tmp_path / "r").exists()


def test_unknown_repo_without_arch_and_wrong_task(hf_home, tmp_path):
    home, _ = hf_home
    code, _, err = kpface_offline(home, "export", "recognizer", "--weights", f"hf:{TINY_REPO}")
    assert_one_line_error(code, err, "name it with --arch")
    code, _, err = kpface_offline(home, "export", "recognizer", "--weights", f"hf:{DFA_REPO}")
    assert_one_line_error(code, err, "holds a keypoints (dfa_mnet025), not a recognizer")


def test_demo_reuses_an_export_of_the_same_hub_weights(dfa_export):
    from kpface.demo import _existing
    out = dfa_export[0]
    assert _existing(out, "dfa_mnet025", f"hf:{DFA_REPO}")
    assert _existing(out, "dfa_mnet025", f"hf:{DFA_REPO}@{COMMIT[DFA_REPO]}")
    assert not _existing(out, "dfa_mnet025", f"hf:{DFA_REPO}@{'f' * 40}")  # other revision
    assert not _existing(out, "dfa_mnet025", None)  # the demo's default would be random
    assert not _existing(out, "dfa_mnet025", "/somewhere/aligner.pt")
