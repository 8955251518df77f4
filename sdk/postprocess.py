"""Detector post-processing in numpy: anchor priors, box / landmark decoding, NMS.

Torch-free; every constant (min sizes, steps, variances, thresholds) is passed in by the
caller, which reads it from the model manifest.

Conventions:
- priors are (cx, cy, w, h) normalised to the network input (x by its width, y by its height),
  ordered level, row, column, min size (the RetinaFace PriorBox order);
- boxes are (x1, y1, x2, y2); landmarks are (x, y) pairs;
- NMS keeps the highest-scoring box of every overlapping group, in descending score order.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np


def _priors(width: int, height: int, min_sizes: tuple, steps: tuple) -> np.ndarray:
    rows = []
    for sizes, step in zip(min_sizes, steps):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        # Centres of the feature-map cells in input pixels, normalised by the input size.
        cx = (np.arange(fw, dtype=np.float64) + 0.5) * step / width
        cy = (np.arange(fh, dtype=np.float64) + 0.5) * step / height
        gy, gx = np.meshgrid(cy, cx, indexing="ij")  # row-major: row i, then column j
        k = len(sizes)
        level = np.empty((fh, fw, k, 4), dtype=np.float64)
        level[..., 0] = gx[..., None]
        level[..., 1] = gy[..., None]
        level[..., 2] = np.asarray(sizes, dtype=np.float64) / width
        level[..., 3] = np.asarray(sizes, dtype=np.float64) / height
        rows.append(level.reshape(-1, 4))
    return np.concatenate(rows).astype(np.float32)


@lru_cache(maxsize=16)
def _priors_cached(width: int, height: int, min_sizes: tuple, steps: tuple) -> np.ndarray:
    out = _priors(width, height, min_sizes, steps)
    out.flags.writeable = False
    return out


def prior_boxes(width: int, height: int, min_sizes: Sequence[Sequence[int]],
                steps: Sequence[int]) -> np.ndarray:
    """Anchors [N, 4] (cx, cy, w, h) for a ``width`` x ``height`` network input (cached, read-only)."""
    key = tuple(tuple(int(s) for s in level) for level in min_sizes)
    return _priors_cached(int(width), int(height), key, tuple(int(s) for s in steps))


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variances: Sequence[float]) -> np.ndarray:
    """Regression [N, 4] -> boxes [N, 4] (x1, y1, x2, y2) in the priors' normalised units."""
    loc = np.asarray(loc, dtype=np.float32)
    centre = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[:, 2:] * variances[1])
    x1y1 = centre - size / 2
    return np.concatenate([x1y1, x1y1 + size], axis=1)


def decode_landmarks(pre: np.ndarray, priors: np.ndarray, variances: Sequence[float]) -> np.ndarray:
    """Regression [N, 2K] -> points [N, K, 2] (x, y) in the priors' normalised units."""
    pre = np.asarray(pre, dtype=np.float32).reshape(len(priors), -1, 2)
    return priors[:, None, :2] + pre * variances[0] * priors[:, None, 2:]


def box_area(boxes: np.ndarray, offset: float = 0.0) -> np.ndarray:
    return (np.maximum(boxes[:, 2] - boxes[:, 0] + offset, 0)
            * np.maximum(boxes[:, 3] - boxes[:, 1] + offset, 0))


def box_iou(box: np.ndarray, boxes: np.ndarray, mode: str = "union",
            offset: float = 0.0) -> np.ndarray:
    """Overlap of one box [4] with boxes [N, 4]: intersection over union, or over the smaller area
    (``mode="min"``). ``offset=1`` uses the inclusive-pixel convention (width = x2 - x1 + 1)."""
    w = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]) + offset, 0)
    h = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]) + offset, 0)
    inter = w * h
    a = box_area(box[None], offset)[0]
    b = box_area(boxes, offset)
    if mode == "min":
        denom = np.minimum(a, b)
    elif mode == "union":
        denom = a + b - inter
    else:
        raise ValueError(f"unknown NMS mode {mode!r}; use 'union' or 'min'")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, inter / np.where(denom > 0, denom, 1), 0.0)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64).

    A row whose norm is zero on either side scores 1 if the two rows are equal, else 0.
    """
    a = np.asarray(a).reshape(len(a), -1).astype(np.float64)
    b = np.asarray(b).reshape(len(b), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    same = np.all(a == b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), same.astype(float))
    return np.nan_to_num(cos, nan=-1.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, mode: str = "union",
        offset: float = 0.0, max_keep: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression. Returns the kept indices, highest score first.

    A box is suppressed when its overlap with a kept box is strictly greater than
    ``iou_threshold``. Equal scores keep the lower index first (stable sort).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if mode not in ("union", "min"):
        raise ValueError(f"unknown NMS mode {mode!r}; use 'union' or 'min'")
    x1, y1, x2, y2 = boxes.T
    areas = box_area(boxes, offset)
    order = np.argsort(-scores, kind="stable")
    if 1 < order.size <= NMS_MATRIX_MAX:
        return _nms_matrix(x1, y1, x2, y2, areas, order, iou_threshold, mode, offset, max_keep)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = order[1:]
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + offset, 0)
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + offset, 0)
        inter = w * h
        denom = (np.minimum(areas[i], areas[rest]) if mode == "min"
                 else areas[i] + areas[rest] - inter)
        overlap = np.divide(inter, denom, out=np.zeros_like(inter), where=denom > 0)
        order = rest[overlap <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


NMS_MATRIX_MAX = 512  # up to this many boxes, :func:`nms` computes all overlaps at once


def _nms_matrix(x1, y1, x2, y2, areas, order, iou_threshold: float, mode: str, offset: float,
                max_keep: int | None) -> np.ndarray:
    """:func:`nms` for a few hundred boxes: every pairwise overlap in one array expression
    (the same float64 operations, element by element, as the loop in :func:`nms`), then the
    greedy pass over rows; when nothing overlaps above the threshold, all are kept at once."""
    a, b = order[:, None], order[None, :]
    w = np.maximum(np.minimum(x2[a], x2[b]) - np.maximum(x1[a], x1[b]) + offset, 0)
    h = np.maximum(np.minimum(y2[a], y2[b]) - np.maximum(y1[a], y1[b]) + offset, 0)
    inter = w * h
    denom = (np.minimum(areas[a], areas[b]) if mode == "min" else areas[a] + areas[b] - inter)
    overlap = np.divide(inter, denom, out=np.zeros_like(inter), where=denom > 0)
    over = overlap > iou_threshold
    np.fill_diagonal(over, False)
    over = np.triu(over)  # a box is only suppressed by one ranked before it
    n = len(order)
    if not over.any():
        return order[:n if max_keep is None else min(n, max_keep)].astype(np.int64)
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(int(order[i]))
        if max_keep is not None and len(keep) >= max_keep:
            break
        suppressed |= over[i]
    return np.asarray(keep, dtype=np.int64)
