"""kpface.export.registry: a leaf table that architecture files fill with ``@register``."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from kpface.errors import InputError
from kpface.export import registry

EXPORT = Path(__file__).resolve().parents[1] / "export"
ARCH_FILES = {"vit", "mtcnn", "retinaface", "dfa", "dlib_resnet", "part_fvit"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.add(("." * node.level) + (node.module or ""))
            out.update(("." * node.level) + a.name for a in node.names if not node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_registry_is_a_leaf():
    imported = _imports(EXPORT / "registry.py")
    assert not {i for i in imported if i.startswith(".") or i.startswith("kpface.export")}, imported


def test_every_architecture_file_registers_itself():
    modules = {registry.module_of(name).rpartition(".")[2] for name in registry.archs()}
    assert modules == ARCH_FILES
    assert {"vit_kprpe_base", "vit_kprpe_tiny", "mtcnn", "retinaface_mnet025", "dfa_mnet025",
            "dlib_resnet_v1", "part_fvit", "part_fvit_tiny"} <= set(registry.archs())
    assert set(registry.archs("keypoints")) == {"dfa_mnet025"}
    assert registry.get("mtcnn", "detector").packaged_weights is not None
    assert registry.get("part_fvit_tiny").options == {"sampling": ("gridsample", "gather")}


def test_a_fresh_process_sees_the_full_table_from_the_registry_alone():
    code = ("from kpface.export.registry import archs; import sys; "
            "print(len(archs()), 'kpface.export.vit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert int(out[0]) == len(registry.archs()) and out[1] == "True"


def _spec(name, task="recognizer"):
    return registry.ArchSpec(name=name, task=task, description="test", factory=object, graphs=[])


def test_decorator_checks_the_name_and_refuses_duplicates():
    try:
        @registry.register
        def kpface_test_arch():
            return _spec("kpface_test_arch")
        assert callable(kpface_test_arch) and registry.get("kpface_test_arch").task == "recognizer"
        with pytest.raises(ValueError, match="registered twice"):
            registry.register(_spec("kpface_test_arch"))
        with pytest.raises(ValueError, match="name the function after"):
            @registry.register
            def kpface_other():
                return _spec("kpface_test_arch2")
        with pytest.raises(ValueError, match="task"):
            registry.register(_spec("kpface_test_arch3", task="segmenter"))
    finally:
        for name in ("kpface_test_arch", "kpface_test_arch2", "kpface_test_arch3"):
            registry._ARCHS.pop(name, None)
    assert "kpface_test_arch" not in registry.archs()


def test_unknown_architecture_is_an_input_error_listing_the_choices():
    with pytest.raises(InputError, match="choose one of: .*retinaface_mnet025"):
        registry.get("retinaface_r50", "detector")
    with pytest.raises(InputError, match="unknown recognizer architecture 'mtcnn'"):
        registry.get("mtcnn", "recognizer")
