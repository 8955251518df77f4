"""kpface export-triton: every config.pbtxt parses with Triton's own model-config protobuf and
matches its ONNX graph (read here with the onnx library, not with the exporter's ONNX Runtime)."""
import hashlib
import json

import onnx  # extra 'export'
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2  # extra 'triton'

from kpface.cli import main
from kpface.errors import InputError, ModelError
from kpface.triton import export_triton

# ONNX TensorProto element types -> the Triton DataType names, from the two specifications.
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                  onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64",
                  onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.UINT8: "TYPE_UINT8",
                  onnx.TensorProto.BOOL: "TYPE_BOOL"}


def onnx_io(path):
    """[(name, elem_type, [dim or -1])] of a graph's real inputs and its outputs."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def rows(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_value if d.HasField("dim_value") else -1
                  for d in v.type.tensor_type.shape.dim])
                for v in values if v.name not in inits]
    return rows(model.graph.input), rows(model.graph.output)


def parse_config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    export_triton(models_dir, out)
    return out


def test_repository_layout(repo, models_dir):
    names = sorted(p.name for p in repo.iterdir())
    # MTCNN is three networks: all three are served, each as its own Triton model.
    assert names == ["detector_onet", "detector_pnet", "detector_rnet", "recognizer"]
    for name in names:
        assert sorted(p.name for p in (repo / name).iterdir()) == ["1", "config.pbtxt",
                                                                   "kpface.json"]
        assert [p.name for p in (repo / name / "1").iterdir()] == ["model.onnx"]
    # no staging folder is left beside the repository
    assert sorted(p.name for p in repo.parent.iterdir()) == ["repo"]
    # the ONNX files are byte-for-byte the model directory's, as its manifest hashes them
    manifest = json.loads((models_dir / "recognizer" / "manifest.json").read_text())
    data = (repo / "recognizer" / "1" / "model.onnx").read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["files"]["model.onnx"]


def test_configs_match_the_onnx_graphs(repo, models_dir):
    checked = 0
    for model_dir in sorted(repo.iterdir()):
        cfg = parse_config(model_dir / "config.pbtxt")
        assert cfg.name == model_dir.name
        assert cfg.platform == "onnxruntime_onnx"
        assert cfg.max_batch_size > 0
        inputs, outputs = onnx_io(model_dir / "1" / "model.onnx")
        for declared, actual in ((cfg.input, inputs), (cfg.output, outputs)):
            assert [t.name for t in declared] == [name for name, _, _ in actual]
            for t, (name, elem, dims) in zip(declared, actual):
                assert model_config_pb2.DataType.Name(t.data_type) == ONNX_TO_TRITON[elem], name
                # the batch dimension is dynamic in the graph and left out of Triton's dims
                assert dims[0] == -1, name
                assert list(t.dims) == dims[1:], (model_dir.name, name)
                checked += 1
        db = cfg.dynamic_batching
        assert cfg.HasField("dynamic_batching") and db.max_queue_delay_microseconds == 500
        preferred = list(db.preferred_batch_size)
        assert preferred == sorted(preferred)
        assert all(1 <= p <= cfg.max_batch_size for p in preferred)
    assert checked == 13  # pnet 1+2, rnet 1+2, onet 1+3, recognizer 2+1 tensors


def test_batching_choices(repo):
    cfg = {p.name: parse_config(p / "config.pbtxt") for p in repo.iterdir()}
    # P-Net takes any H x W: only equal shapes can batch, so no preferred sizes
    assert list(cfg["detector_pnet"].input[0].dims) == [3, -1, -1]
    assert list(cfg["detector_pnet"].dynamic_batching.preferred_batch_size) == []
    # R-Net gets every proposal of an image in one request: its max batch is large
    assert cfg["detector_rnet"].max_batch_size >= 1024
    assert list(cfg["recognizer"].dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert cfg["recognizer"].max_batch_size == 64
    assert not cfg["recognizer"].instance_group  # Triton picks CPU or GPU


def test_sidecar_carries_what_clients_need(repo, models_dir):
    det = json.loads((models_dir / "detector" / "manifest.json").read_text())
    side = json.loads((repo / "detector_rnet" / "kpface.json").read_text())
    assert side["preprocess"] == det["preprocess"]
    assert side["mtcnn"] == det["mtcnn"]
    assert side["graph"] == "rnet" and side["sha256"] == det["files"]["rnet.onnx"]
    assert side["weights"]["source"] == "package"
    assert all("file" not in p for p in side["weights"]["parts"].values())  # no local paths
    rec = json.loads((repo / "recognizer" / "kpface.json").read_text())
    assert (rec["weights"]["source"], rec["weights"]["seed"]) == ("random", 0)
    assert rec["keypoints"]["order"][0] == "left_eye"


def test_options_and_reexport(models_dir, tmp_path):
    out = tmp_path / "repo"
    export_triton(models_dir, out, max_batch=16, delay_us=100, instance_kind="gpu")
    cfg = parse_config(out / "recognizer" / "config.pbtxt")
    assert cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    # a second export replaces the first one whole
    export_triton(models_dir, out)
    assert parse_config(out / "recognizer" / "config.pbtxt").max_batch_size == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_refuses_foreign_folder_and_bad_models(models_dir, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="did not write"):
        export_triton(models_dir, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ModelError, match="does not exist"):
        export_triton(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(InputError, match="max-batch"):
        export_triton(models_dir, tmp_path / "out", max_batch=0)
    assert not (tmp_path / "out").exists()


def test_cli(models_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["export-triton", str(models_dir), "--out", str(out), "--max-batch", "32"]) == 0
    assert "wrote 4 Triton model(s)" in capsys.readouterr().out
    assert parse_config(out / "recognizer" / "config.pbtxt").max_batch_size == 32
    assert main(["export-triton", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kpface: error:") and "does not exist" in err[-1]
    assert not any("Traceback" in line for line in err)
