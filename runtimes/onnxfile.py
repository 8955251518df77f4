"""ONNX files whose weights lie beside the graph, page-aligned, so that engines map them.

A graph whose initializers hold at least :data:`EXTERNAL_MIN_BYTES` is written as two files:
``model.onnx`` (the graph, small) and ``model.onnx.data`` (every initializer of at least
:data:`INLINE_MAX_BYTES`, each at a :data:`ALIGN`-byte boundary). ONNX Runtime memory-maps
such external data on the CPU instead of copying it out of a protobuf it has read whole, and
OpenVINO's ``convert_model`` reads it the same way; an inline 388 MB graph cost ONNX Runtime
twice its size in resident memory while it loaded (protobuf + tensors). Smaller graphs stay
one file. :func:`files` names the files a graph needs, so that manifests hash them and copies
take them along.

Only ``onnx`` is needed (imported lazily); nothing here imports an engine.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

EXTERNAL_MIN_BYTES = 64 * 2 ** 20   # graphs with this many initializer bytes get a .data file
INLINE_MAX_BYTES = 1024             # tensors smaller than this stay in the graph
ALIGN = 4096                        # offset of every tensor in the .data file (a page)


def data_name(path: str | os.PathLike) -> str:
    """The external data file name of graph ``path``: ``<file name>.data``."""
    return Path(path).name + ".data"


def _tensors(model):
    """Every initializer of the model, subgraphs included."""
    from onnx.external_data_helper import _get_all_tensors
    return [t for t in _get_all_tensors(model) if t.name]


def _nbytes(t) -> int:
    from onnx import numpy_helper
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return numpy_helper.to_array(t).nbytes


def save(model, path: str | os.PathLike, external: bool | None = None) -> list[str]:
    """Write ``model`` (weights loaded) to ``path``; return the file names written.

    ``external``: True / False forces one layout; None chooses by size
    (:data:`EXTERNAL_MIN_BYTES`). With external data the proto is emptied of its tensor bytes
    in place (no second copy of the weights is made).
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    big = [t for t in model.graph.initializer if _nbytes(t) >= INLINE_MAX_BYTES]
    if external is None:
        external = sum(_nbytes(t) for t in big) >= EXTERNAL_MIN_BYTES
    data = path.with_name(data_name(path))
    if not external:
        onnx.save(model, str(path))
        data.unlink(missing_ok=True)
        return [path.name]
    offset = 0
    with open(data, "wb") as f:
        for t in big:
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                          "uint64_data", "string_data"):
                t.ClearField(field)
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)),
                               ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
    onnx.save(model, str(path))
    return [path.name, data.name]


def data_files(path: str | os.PathLike) -> list[str]:
    """The external data files graph ``path`` refers to (relative names), in order."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    out: list[str] = []
    for t in _tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in out:
                out.append(loc)
    return out


def files(path: str | os.PathLike) -> list[str]:
    """Graph ``path``'s own name and its external data files'."""
    return [Path(path).name] + data_files(path)


def nbytes(path: str | os.PathLike) -> int:
    """Bytes on disk of graph ``path`` with its external data."""
    d = Path(path).parent
    return sum((d / n).stat().st_size for n in files(path))


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy graph ``src`` and its external data to ``dst``; return the names written.

    A graph with one external file named after it (what :func:`save` writes) is copied file
    by file; the data file takes ``dst``'s name, so the location inside is rewritten when
    the names differ. Anything else is re-saved through :func:`save`.
    """
    import onnx
    src, dst = Path(src), Path(dst)
    extra = data_files(src)
    if not extra:
        shutil.copyfile(src, dst)
        dst.with_name(data_name(dst)).unlink(missing_ok=True)
        return [dst.name]
    if extra == [data_name(src)] and src.name == dst.name:
        shutil.copyfile(src, dst)
        shutil.copyfile(src.with_name(extra[0]), dst.with_name(extra[0]))
        return [dst.name, extra[0]]
    return save(onnx.load(str(src)), dst, external=True)


def order_as_needed(model) -> None:
    """Reorder the graph's nodes, in place, so that each runs just before the first node that
    needs it (depth-first from the outputs, inputs in order).

    Engines that follow the file's order (ONNX Runtime does) then hold a KP-RPE block's
    [B, H, N, N] bias only while its block runs; ``onnxruntime.quantization`` writes nodes in
    breadth-first order, which computes all twelve biases first (235 MB at batch 8).
    """
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    done: set[int] = set()
    order: list[int] = []
    for out in [o.name for o in g.output]:
        if out not in producer:
            continue
        stack = [(producer[out], 0)]
        while stack:
            i, k = stack.pop()
            if i in done:
                continue
            ins = [t for t in g.node[i].input if t in producer]
            while k < len(ins) and producer[ins[k]] in done:
                k += 1
            if k < len(ins):
                stack.append((i, k + 1))
                stack.append((producer[ins[k]], 0))
            else:
                done.add(i)
                order.append(i)
    order += [i for i in range(len(g.node)) if i not in done]  # nodes no output needs
    nodes = [g.node[i] for i in order]
    del g.node[:]
    g.node.extend(nodes)
