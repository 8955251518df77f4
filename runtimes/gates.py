"""Accuracy gates: how a build is measured against the fp32 ONNX model, and the decision.

* recognizers: cosine of the embeddings on held-out aligned face crops (see
  :mod:`kpface.runtimes.calibration`), gated on the mean and the minimum (:data:`GATES`);
  a recognizer with a dense landmark output (Part fViT's 196 points, which choose the patches
  it embeds) is also gated on the distance of its points from fp32's, in pixels of the
  network input (:data:`LANDMARK_GATES`);
* detectors and keypoint models (fp32 / fp16 only so far): cosine of every raw output on real
  images resized to each graph's input, gated on the worst output (:data:`OUTPUT_GATES`);
* detectors also: the same faces found by the fp32 and the candidate detector on real photos,
  boxes matched by IoU, landmark error relative to the face size (:data:`DETECTION_GATES`);
* recognizers, when asked (``kpface build --eval PAIRS``): verification accuracy on face pairs,
  the candidate's against the fp32 model's; the drop may be at most ``max_drop`` points
  (:data:`EVAL_MAX_DROP`), see :func:`verification_agreement`.

This module knows no detector class and no pair set: the caller passes a factory that makes a
detector running on given sessions (:func:`detection_agreement`) and a ``verify`` callable
(:data:`Verifier`, :func:`kpface.evaluation.make_verifier`), so :mod:`kpface.runtimes` never
imports the SDK's models.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from kpface.postprocess import box_iou, row_cosines

from .engines import Session

# Minimum embedding cosine vs the fp32 ONNX model on held-out crops: (mean, min).
GATES: dict[str, dict[str, float]] = {
    "fp32": {"mean": 0.9999, "min": 0.999},
    "fp16": {"mean": 0.999, "min": 0.99},
    "int8": {"mean": 0.99, "min": 0.97},
}
# Dense landmarks of a recognizer (Part fViT) vs fp32, pixels of the network input: mean and
# 99th percentile of the per-point distance over held-out crops (the max is reported, not
# gated: one point of 12,544 is noise). A point that moves moves its whole patch; the
# embedding gate says what that costs, these catch the landmark CNN going wrong (an int8 CNN
# moved points by 3.7 px on average and 35 px at p99).
LANDMARK_GATES: dict[str, dict[str, float]] = {
    "fp32": {"mean": 0.01, "p99": 0.05},
    "fp16": {"mean": 0.25, "p99": 1.5},
    "int8": {"mean": 1.0, "p99": 4.0},
}
# Detector / keypoint graphs: minimum cosine of each raw output (worst output, worst image).
OUTPUT_GATES: dict[str, float] = {"fp32": 0.9999, "fp16": 0.999}
# Detector builds must find the same faces as fp32: matched boxes with IoU >= 0.9, landmarks
# within 5% of the face size (sqrt of the fp32 box area; the eye distance is unstable on profile
# faces), no face missed or added.
DETECTION_GATES = {"iou_min": 0.9, "landmark_nme_max": 0.05}

# make_detector(sessions) -> an object with .detect(image_bgr) -> [objects with .box,
# .landmarks]; ``sessions`` (graph name -> Session) replace the fp32 ONNX graphs, {} keeps them.
DetectorFactory = Callable[[Mapping[str, Session]], Any]
# verify({"fp32": Session, "build": Session}) -> {"fp32": {"accuracy": 0..1, ...}, "build": {...},
# "pairs": description, ...}: verification figures of each session on the same face pairs.
Verifier = Callable[[Mapping[str, Session]], dict]
EVAL_MAX_DROP = 0.5  # accuracy points (of 100) a build may lose against fp32


def gate_for(task: str | None, precision: str) -> dict[str, float]:
    """The cosine gate of a ``task`` model built at ``precision``."""
    return dict(GATES[precision]) if task == "recognizer" else {"min": OUTPUT_GATES[precision]}


def embedding_agreement(ref: Session, cand: Session, faces, batch: int = 8,
                        output: str = "embedding", landmarks: str | None = None
                        ) -> dict[str, Any]:
    """Cosine of ``cand``'s embeddings against ``ref``'s on ``faces`` (a FaceSet); with
    ``landmarks`` (the name of a dense landmark output, [B, K, 2] pixels), also the distance
    of ``cand``'s points from ``ref``'s (:func:`landmark_error`) under ``"landmarks"``."""
    names = [n for n in ref.input_names]
    a, b, pa, pb = [], [], [], []
    for feeds in faces.feeds(names, batch):
        r, c = ref.run(feeds), cand.run(feeds)
        a.append(r[output])
        b.append(c[output])
        if landmarks:
            pa.append(r[landmarks])
            pb.append(c[landmarks])
    cos = row_cosines(np.concatenate(a), np.concatenate(b))
    out = {"n": int(len(cos)), "mean": float(cos.mean()), "min": float(cos.min()),
           "p01": float(np.percentile(cos, 1))}
    if landmarks:
        out["landmarks"] = landmark_error(np.concatenate(pa), np.concatenate(pb))
    return out


def landmark_error(ref: np.ndarray, cand: np.ndarray) -> dict[str, Any]:
    """Euclidean distance of each of ``cand``'s points [N, K, 2] from ``ref``'s, in the
    points' own units (pixels of the network input): mean, 99th percentile and max over all
    points of all inputs, and the worst input's mean."""
    d = np.linalg.norm(np.asarray(cand, np.float64) - np.asarray(ref, np.float64), axis=-1)
    return {"unit": "px", "points": int(d.shape[-1]), "mean": float(d.mean()),
            "p99": float(np.percentile(d, 99)), "max": float(d.max()),
            "worst_input_mean": float(d.mean(axis=-1).max())}


def output_agreement(ref: Session, cand: Session, feeds_list: list[dict]) -> dict[str, Any]:
    """Cosine of every output of ``cand`` against ``ref``, per output; mean/min of the worst."""
    per: dict[str, list[np.ndarray]] = {}
    for feeds in feeds_list:
        r, c = ref.run(feeds), cand.run(feeds)
        for name in ref.output_names:
            per.setdefault(name, []).append(row_cosines(r[name], c[name]))
    outs = {k: {"mean": float(np.concatenate(v).mean()), "min": float(np.concatenate(v).min())}
            for k, v in per.items()}
    return {"n": int(sum(len(f[next(iter(f))]) for f in feeds_list)), "outputs": outs,
            "mean": min(o["mean"] for o in outs.values()),
            "min": min(o["min"] for o in outs.values())}


def detection_scenes() -> list[tuple[str, np.ndarray]]:
    """Real photographs for detector gates: faces at several sizes and a face-free scene."""
    import cv2

    from kpface import samples
    astro = samples.astronaut_bgr()
    return [("astronaut", astro),
            ("astronaut 0.5x", cv2.resize(astro, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)),
            ("camera", samples.camera_bgr()),
            ("coffee (no face)", samples.coffee_bgr())]


def detection_agreement(make_detector: DetectorFactory,
                        candidates: Mapping[str, Session]) -> dict[str, Any]:
    """Run the fp32 detector (``make_detector({})``) and the candidate one
    (``make_detector(candidates)``) on real photographs; match faces by IoU and compare boxes
    and landmarks."""
    ref, cand = make_detector({}), make_detector(dict(candidates))
    ious, nmes, missed, extra, images = [], [], 0, 0, []
    for name, image in detection_scenes():
        r, c = ref.detect(image), cand.detect(image)
        images.append(f"{name}: {len(r)} face(s)")
        used: set[int] = set()
        for face in r:
            free = [k for k in range(len(c)) if k not in used]
            overlap = box_iou(face.box, np.array([c[k].box for k in free]).reshape(-1, 4))
            best, k = (float(overlap.max()), free[int(overlap.argmax())]) if free else (0.0, -1)
            if best < 0.5:
                missed += 1
                continue
            used.add(k)
            ious.append(best)
            x1, y1, x2, y2 = face.box
            size = np.sqrt(max((x2 - x1) * (y2 - y1), 1e-6))
            err = np.linalg.norm(face.landmarks - c[k].landmarks, axis=1).max()
            nmes.append(float(err / size))
        extra += len(c) - len(used)
    return {"images": images, "faces": len(ious) + missed, "missed": missed, "extra": extra,
            "iou_min": min(ious, default=1.0), "iou_mean": float(np.mean(ious)) if ious else 1.0,
            "landmark_nme_max": max(nmes, default=0.0),
            "gate": DETECTION_GATES}


def verification_agreement(verify: Verifier, ref: Session, cand: Session,
                           max_drop: float = EVAL_MAX_DROP) -> dict[str, Any]:
    """Verification accuracy of ``cand`` and of the fp32 ``ref`` on the same pairs, and
    whether ``cand`` lost at most ``max_drop`` points."""
    got = verify({"fp32": ref, "build": cand})
    fp32, build = got["fp32"]["accuracy"], got["build"]["accuracy"]
    drop = 100.0 * (fp32 - build)
    return {**{k: v for k, v in got.items() if k not in ("fp32", "build")},
            "fp32": got["fp32"], "build": got["build"], "drop_points": drop,
            "max_drop_points": float(max_drop), "passed": bool(drop <= max_drop + 1e-9)}


def decide(task: str | None, precision: str, accuracy: dict[str, dict[str, Any]],
           detections: dict[str, Any] | None = None,
           verification: dict[str, Any] | None = None) -> dict[str, Any]:
    """The build's accuracy summary (``build.json``'s ``accuracy``), with ``passed``.

    ``accuracy``: per graph, what :func:`embedding_agreement` / :func:`output_agreement`
    returned; ``detections``: what :func:`detection_agreement` returned, for detectors;
    ``verification``: what :func:`verification_agreement` returned (``kpface build --eval``).
    """
    gate = gate_for(task, precision)
    worst = min(accuracy.values(), key=lambda a: a["min"])
    passed = all(a["min"] >= gate["min"] and a["mean"] >= gate.get("mean", -1)
                 for a in accuracy.values())
    lm_gate = LANDMARK_GATES[precision]
    for a in accuracy.values():
        lm = a.get("landmarks")
        if lm is not None:
            lm["gate"] = dict(lm_gate)
            passed = passed and lm["mean"] <= lm_gate["mean"] and lm["p99"] <= lm_gate["p99"]
    if detections is not None:
        passed = passed and detections["missed"] == 0 and detections["extra"] == 0 \
            and detections["iou_min"] >= DETECTION_GATES["iou_min"] \
            and detections["landmark_nme_max"] <= DETECTION_GATES["landmark_nme_max"]
    summary = {"metric": "embedding cosine" if task == "recognizer" else "output cosine",
               "reference": "fp32 ONNX on onnxruntime CPU", "gate": gate, "passed": passed,
               "mean": min(a["mean"] for a in accuracy.values()), "min": worst["min"],
               "n": worst["n"]}
    if len(accuracy) == 1:
        summary.update({k: v for k, v in worst.items() if k not in summary})
    else:
        summary["graphs"] = accuracy
    if detections is not None:
        summary["detections"] = detections
    if verification is not None:
        summary["verification"] = verification
        summary["passed"] = passed and verification["passed"]
    return summary


def figures(summary: dict[str, Any]) -> str:
    """The figures of a summary against its gates, in one line (for a refusal)."""
    gate = summary["gate"]
    text = (f"cosine vs fp32 mean {summary['mean']:.5f} (gate >= {gate.get('mean', 0):g}), "
            f"min {summary['min']:.5f} (gate >= {gate['min']:g}) on {summary['n']} held-out "
            "inputs")
    lm = summary.get("landmarks")
    if lm is not None:
        g = lm["gate"]
        text += (f"; landmarks vs fp32 mean {lm['mean']:.3f} px (gate <= {g['mean']:g}), p99 "
                 f"{lm['p99']:.3f} px (gate <= {g['p99']:g}), max {lm['max']:.3f} px")
    det = summary.get("detections")
    if det is not None:
        text += (f"; detections: {det['missed']} missed, {det['extra']} extra, box IoU min "
                 f"{det['iou_min']:.3f} (gate >= {DETECTION_GATES['iou_min']}), landmark error "
                 f"max {det['landmark_nme_max']:.3f} of the face size (gate <= "
                 f"{DETECTION_GATES['landmark_nme_max']})")
    ver = summary.get("verification")
    if ver is not None:
        text += (f"; verification accuracy {100 * ver['build']['accuracy']:.2f}% vs fp32 "
                 f"{100 * ver['fp32']['accuracy']:.2f}%: drop {ver['drop_points']:.2f} points "
                 f"(gate <= {ver['max_drop_points']:g})")
    return text
