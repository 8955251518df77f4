"""Verification pair sets: LFW's ``pairs.txt`` with its images folder, and InsightFace's
validation ``.bin`` files. Both become a :class:`PairSet`: images (read lazily), pairs of
image indices with a same/different flag, and the fold of each pair.

``pairs.txt`` (LFW, and the many sets written in its format)::

    10  300                      sets, pairs of each kind per set (or one number: one set)
    Abel_Pacheco  1  4           same person: name, two image numbers
    Abdel_Madi_Shabneh  1  Dean_Barker  1     different people: name, number, name, number

Images are ``IMAGES/<name>/<name>_<number:04d>.jpg`` (the layout of LFW's archives); each set
is one fold of the 10-fold protocol.

``.bin`` (InsightFace ``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``...): a pickle of
``(list of encoded images, list of same flags)``, pair ``i`` being images ``2i`` and ``2i+1``;
folds are 10 contiguous blocks of pairs, as InsightFace's evaluation cuts them. A pickle can run
code while it loads, so it is read by :class:`SafeUnpickler`: its ``find_class`` resolves no
global at all, so nothing can be called or constructed while loading. Some ``.bin`` files hold
the flags as a numpy bool array, which pickles through numpy globals (``_reconstruct``,
``ndarray``, ``dtype``; ``_frombuffer`` at protocol 5), and Python 3 writes ``bytes`` at
protocol 2 through ``_codecs.encode``; for exactly those names the unpickler hands back inert
stand-ins of its own that only collect a one-dimensional ``bool`` array's bytes or latin-1
text (numpy and codecs are never called: the flags become a list of ``bool``). Everything
else (any other global, a ``dict``, a ``str``, a number) is refused and the loaded structure
is checked: bytes, lists, tuples and booleans only.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError

BIN_LIMIT = 4 << 30  # refuse a .bin file larger than this (bytes)


@dataclass
class PairSet:
    """Images (``load(i)`` -> BGR uint8) and pairs ``(i, j, same)`` with a fold each."""

    name: str
    kind: str                       # "lfw pairs.txt" or "insightface .bin"
    image_names: list[str]
    load: Callable[[int], np.ndarray]
    pairs: np.ndarray               # [P, 2] int image indices
    same: np.ndarray                # [P] bool
    folds: np.ndarray | None        # [P] fold id of each pair, None: contiguous blocks
    fold_note: str

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self) -> str:
        n_same = int(self.same.sum())
        return (f"{self.name}: {len(self)} pairs ({n_same} same, {len(self) - n_same} "
                f"different) of {len(self.image_names)} images; {self.fold_note}")


def read_pairs(path: str | os.PathLike, images: str | os.PathLike | None = None) -> PairSet:
    """A pairs file by its suffix: ``.bin`` (InsightFace) or a text file in LFW's format
    (needs ``images``, the folder with one sub-folder per person)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pairs file {path} does not exist")
    if path.suffix.lower() == ".bin":
        if images is not None:
            raise InputError(f"{path} is an InsightFace .bin: its images are inside it, "
                             "so --images does not apply")
        return read_bin(path)
    if images is None:
        raise InputError(f"{path} is an LFW-style pairs file: pass --images DIR, the folder "
                         "with one sub-folder per person (DIR/name/name_0001.jpg)")
    return read_lfw_pairs(path, images)


# --- LFW pairs.txt -----------------------------------------------------------------------------

def _int(text: str, path: Path, line: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise InputError(f"{path}:{line}: {text!r} is not an image number or a count")
    return value


def read_lfw_pairs(path: str | os.PathLike, images: str | os.PathLike) -> PairSet:
    """LFW's ``pairs.txt`` format; every image it names must exist under ``images``."""
    path, root = Path(path), Path(images)
    if not root.is_dir():
        raise InputError(f"images folder {root} does not exist")
    try:
        lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read as a text pairs file ({e})") from None
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln]
    if not numbered:
        raise InputError(f"{path} is empty")
    first_no, head = numbered[0]
    body = numbered[1:]
    if not all(t.isdigit() for t in head) or len(head) > 2:
        raise InputError(f"{path}:{first_no}: expected the header 'SETS PAIRS_PER_KIND' (e.g. "
                         f"'10 300') or a pair count, got {' '.join(head)!r}")
    sets, per_kind = (int(head[0]), int(head[1])) if len(head) == 2 else (1, int(head[0]))
    if sets * per_kind * 2 != len(body):
        raise InputError(f"{path}: the header says {sets} set(s) of {per_kind} same and "
                         f"{per_kind} different pairs ({sets * per_kind * 2} lines), but "
                         f"{len(body)} pair lines follow")
    index: dict[str, int] = {}
    pairs, same = [], []
    for no, f in body:
        if len(f) == 3:
            keys = [(f[0], _int(f[1], path, no)), (f[0], _int(f[2], path, no))]
        elif len(f) == 4:
            keys = [(f[0], _int(f[1], path, no)), (f[2], _int(f[3], path, no))]
        else:
            raise InputError(f"{path}:{no}: expected 'name n1 n2' or 'name1 n1 name2 n2', got "
                             f"{' '.join(f)!r}")
        ids = []
        for name, number in keys:
            rel = f"{name}/{name}_{number:04d}.jpg"
            if rel not in index:
                if not (root / rel).is_file():
                    raise InputError(f"{path}:{no}: image {root / rel} does not exist (LFW "
                                     "layout: IMAGES/name/name_0001.jpg)")
                index[rel] = len(index)
            ids.append(index[rel])
        pairs.append(ids)
        same.append(len(f) == 3)
    names = list(index)
    folds = np.repeat(np.arange(sets), 2 * per_kind)

    def load(i: int) -> np.ndarray:
        from .image import load_image
        return load_image(root / names[i])
    note = (f"{sets} folds (the file's own sets)" if sets > 1
            else "10 folds of contiguous pairs (the file has one set)")
    return PairSet(path.name, "lfw pairs.txt", names, load, np.array(pairs, int).reshape(-1, 2),
                   np.array(same, bool), folds if sets > 1 else None, note)


# --- InsightFace .bin --------------------------------------------------------------------------

class _Refused(pickle.UnpicklingError):
    pass


class _NumpyDType:
    """Stand-in for ``numpy.dtype(name, align, copy)``: remembers the type name only."""

    def __init__(self, name=None, *args):
        self.name = name.decode("latin-1") if isinstance(name, bytes) else name

    def __setstate__(self, state):
        pass


class _NumpyArray:
    """Stand-in for an ndarray being unpickled: collects (shape, dtype, raw bytes)."""

    def __init__(self):
        self.shape = self.dtype = self.raw = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused("an array state of an unknown form")
        _, self.shape, self.dtype, _, self.raw = state

    def to_bools(self) -> list[bool]:
        name = getattr(self.dtype, "name", None)
        raw = self.raw.encode("latin-1") if isinstance(self.raw, str) else self.raw
        if name not in ("b1", "bool", "?") or not isinstance(raw, (bytes, bytearray)) or \
                not isinstance(self.shape, tuple) or len(self.shape) != 1 or \
                self.shape[0] != len(raw) or not set(raw) <= {0, 1}:
            raise _Refused(f"a numpy array of dtype {name!r} and shape {self.shape!r} (only a "
                           "1-D bool array of flags is read)")
        return [b == 1 for b in raw]


def _reconstruct(cls, shape, typecode):
    if cls is not _NumpyArray:
        raise _Refused("numpy _reconstruct of something that is not an ndarray")
    return _NumpyArray()


def _frombuffer(buf, dtype, shape, order):
    """Protocol 5's form of an array: ``_frombuffer(bytes, dtype, shape, order)``."""
    arr = _NumpyArray()
    arr.__setstate__((1, shape, dtype, False, bytes(buf) if isinstance(buf, bytearray) else buf))
    return arr


def _latin1(text, encoding="latin1"):
    """Python 3's protocol-2 form of ``bytes``: ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode of something that is not bytes")
    return text.encode("latin-1")


# The only globals pickled bytes and numpy bool arrays need, mapped to inert stand-ins.
_STANDINS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NumpyArray,
    ("numpy", "dtype"): _NumpyDType,
    ("_codecs", "encode"): _latin1,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global (see the module docstring)."""

    def find_class(self, module, name):
        standin = _STANDINS.get((module, name))
        if standin is None:
            raise _Refused(f"it names the global {module}.{name}")
        return standin


def _as_flags(obj: Any) -> list[bool]:
    if isinstance(obj, _NumpyArray):
        return obj.to_bools()
    if isinstance(obj, (list, tuple)) and all(type(v) is bool for v in obj):
        return list(obj)
    raise _Refused("its same/different flags are not a list of booleans")


def load_bin(data: bytes) -> tuple[list[bytes], list[bool]]:
    """``(images, flags)`` from a ``.bin``'s bytes, or :class:`pickle.UnpicklingError` (and
    the other errors a broken pickle raises) saying why not."""
    obj = SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise _Refused("it does not hold (images, flags)")
    bins, flags = obj
    if not isinstance(bins, (list, tuple)) or not all(isinstance(b, (bytes, bytearray))
                                                      for b in bins):
        raise _Refused("its images are not a list of encoded image bytes")
    flags = _as_flags(flags)
    if len(bins) != 2 * len(flags):
        raise _Refused(f"it has {len(bins)} images for {len(flags)} pairs (two per pair)")
    return [bytes(b) for b in bins], flags


def read_bin(path: str | os.PathLike) -> PairSet:
    """An InsightFace validation ``.bin`` (see the module docstring)."""
    path = Path(path)
    size = path.stat().st_size
    if size > BIN_LIMIT:
        raise InputError(f"{path} is {size / 2**30:.1f} GiB, more than a validation .bin holds")
    try:
        bins, flags = load_bin(path.read_bytes())
    except _Refused as e:
        raise InputError(f"{path}: refused: {e}; a validation .bin holds only (list of image "
                         "bytes, list of booleans)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable .bin pickle ({type(e).__name__}: "
                         f"{str(e)[:120]})") from None
    if not flags:
        raise InputError(f"{path} holds no pairs")

    def load(i: int) -> np.ndarray:
        import cv2
        img = cv2.imdecode(np.frombuffer(bins[i], np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise InputError(f"{path}: image {i} (pair {i // 2}) cannot be decoded")
        return img
    names = [f"{path.name}[{i}]" for i in range(len(bins))]
    return PairSet(path.name, "insightface .bin", names, load,
                   np.arange(len(bins)).reshape(-1, 2), np.array(flags, bool), None,
                   "10 folds of contiguous pairs (InsightFace's split)")


def write_bin(path: str | os.PathLike, images: Sequence[bytes], flags: Sequence[bool]) -> None:
    """Write a ``.bin`` in InsightFace's layout (for tests and small sets of one's own)."""
    if len(images) != 2 * len(flags):
        raise InputError(f"{len(images)} images for {len(flags)} pairs: two per pair")
    from .manifest import atomic_write_bytes
    atomic_write_bytes(path, pickle.dumps((list(images), [bool(f) for f in flags]), protocol=4))
