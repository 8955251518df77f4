"""The one input normaliser: BGR uint8 images -> the float tensor a model's manifest asks for.

Every model directory's manifest has a ``preprocess`` block::

    {"color": "RGB" | "BGR", "mean": [m0, m1, m2], "std": [s0, s1, s2], ...}

with ``mean`` and ``std`` given in the model's colour order. Detectors, keypoint models,
recognizers, calibration and the benchmark all build their network inputs through
:class:`Normalizer`; none repeats the arithmetic.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ModelError


class Normalizer:
    """BGR uint8 -> float32 NCHW in the manifest's colour order, ``(x - mean) / std``."""

    def __init__(self, pre: dict[str, Any], label: str = "model"):
        if not isinstance(pre, dict):
            raise ModelError(f"{label}: the manifest has no 'preprocess' block; re-export it")
        color = str(pre.get("color", "")).upper()
        if color not in ("RGB", "BGR"):
            raise ModelError(f"{label}: manifest colour order {color!r} is not RGB or BGR; "
                             "re-export the model")
        try:
            mean = np.asarray(pre["mean"], dtype=np.float32).reshape(3)
            std = np.asarray(pre["std"], dtype=np.float32).reshape(3)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{label}: the manifest's 'preprocess' has no usable mean/std "
                             f"({type(e).__name__}: {e}); re-export the model") from None
        if not np.all(std != 0) or not np.all(np.isfinite(std)) or not np.all(np.isfinite(mean)):
            raise ModelError(f"{label}: the manifest's preprocess std {std.tolist()} / mean "
                             f"{mean.tolist()} is not usable; re-export the model")
        self.color = color
        # Model channel c reads image (BGR) channel source[c].
        self.source = (2, 1, 0) if color == "RGB" else (0, 1, 2)
        self.mean, self.std = mean, std
        self.scale = (1.0 / std).astype(np.float32)
        self.offset = (-mean / std).astype(np.float32)
        size = pre.get("size")
        self.size = (int(size[0]), int(size[1])) if size is not None else None  # (width, height)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "Normalizer":
        return cls(manifest.get("preprocess"), label=str(manifest.get("name", "model")))

    def __call__(self, images_bgr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[H, W, 3] or [B, H, W, 3] uint8 -> [B, 3, H, W] float32.

        With ``out`` ([B, 3, >=H, >=W] float32) the result is written into its top-left corner
        and ``out`` is returned; the rest of ``out`` is left as it was.
        """
        x = images_bgr[None] if images_bgr.ndim == 3 else images_bgr
        n, h, w = x.shape[:3]
        if out is None:
            out = np.empty((n, 3, h, w), dtype=np.float32)
        for c, src in enumerate(self.source):
            dst = out[:, c, :h, :w]
            np.multiply(x[..., src], self.scale[c], out=dst, casting="unsafe")
            dst += self.offset[c]
        return out
