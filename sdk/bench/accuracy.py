"""Accuracy of each measured configuration against ONNX Runtime fp32 on the same inputs, where
its ``build.json`` gave no figures."""
from __future__ import annotations

from typing import Any

import numpy as np

from kpface.postprocess import box_iou, row_cosines

from .settings import REFERENCE


def compare_to_reference(kind: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]
                         ) -> dict[str, Any] | None:
    """Accuracy of one configuration's outputs against fp32 ONNX Runtime on the same inputs."""
    if kind == "session":
        out: dict[str, Any] = {"source": "computed: cosine vs onnxruntime fp32, bench inputs"}
        for name, r in ref.items():
            if name not in got or got[name].shape != r.shape:
                return None
            cos = row_cosines(r, got[name])
            out[f"{name}_cosine_mean"] = float(cos.mean())
            out[f"{name}_cosine_min"] = float(cos.min())
            if len(ref) == 1 or name == "embedding":
                out["cosine_mean"], out["cosine_min"] = float(cos.mean()), float(cos.min())
        return out
    if kind == "detector":
        rb, gb = ref["boxes"], got["boxes"]
        res = {"source": "computed: detections vs onnxruntime fp32 on the bench scene",
               "faces_fp32": int(len(rb)), "faces": int(len(gb))}
        if len(rb) and len(gb):
            res["box_iou_mean"] = float(np.mean([box_iou(box, gb).max() for box in rb]))
        return res
    if kind == "keypoints":
        d = np.linalg.norm(ref["landmarks"] - got["landmarks"], axis=1)
        return {"source": "computed: landmarks vs onnxruntime fp32 on the bench scene",
                "landmark_error_px_mean": float(d.mean()), "landmark_error_px_max": float(d.max())}
    return None


def fill_accuracy(rows: list[dict[str, Any]]) -> None:
    """Give every measured row its ``accuracy`` and drop the outputs kept for comparing."""
    refs = {(r["stage"], r["model"], r["batch"]): r for r in rows
            if r["status"] == "ok" and (r["runtime"], r["precision"]) == REFERENCE}
    for r in rows:
        if r["status"] != "ok" or (r["runtime"], r["precision"]) == REFERENCE:
            continue
        if r.get("accuracy") is None and r["runtime"] != "torch":
            ref = refs.get((r["stage"], r["model"], r["batch"]))
            if ref is not None and ref.get("_kind") == r.get("_kind"):
                r["accuracy"] = compare_to_reference(r["_kind"], ref["_outputs"], r["_outputs"])
        if r["runtime"] == "torch" and r.get("accuracy") is None:
            r["accuracy"] = {"source": "not compared: the torch model has fresh random weights"}
    for r in rows:
        if r["status"] == "ok" and (r["runtime"], r["precision"]) == REFERENCE:
            r["accuracy"] = {"source": "reference", "cosine_mean": 1.0, "cosine_min": 1.0} \
                if r["stage"] == "embed" else {"source": "reference"}
        r.pop("_outputs", None)
        r.pop("_kind", None)
