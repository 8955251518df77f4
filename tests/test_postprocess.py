"""Priors, box / landmark decoding and NMS against hand-worked cases (numpy only)."""
import math

import numpy as np
import pytest

from kpface.postprocess import box_iou, decode_boxes, decode_landmarks, nms, prior_boxes


def test_prior_order_and_values():
    # 32 x 16 input, one level of step 8 -> 2 rows x 4 columns x 2 sizes.
    p = prior_boxes(32, 16, [[8, 16]], [8])
    assert p.shape == (16, 4) and p.dtype == np.float32
    np.testing.assert_allclose(p[0], [0.125, 0.25, 0.25, 0.5])    # row 0, col 0, size 8
    np.testing.assert_allclose(p[1], [0.125, 0.25, 0.5, 1.0])     # same cell, size 16
    np.testing.assert_allclose(p[2], [0.375, 0.25, 0.25, 0.5])    # row 0, col 1
    np.testing.assert_allclose(p[8], [0.125, 0.75, 0.25, 0.5])    # row 1, col 0


def test_prior_counts_and_cache():
    sizes, steps = [[16, 32], [64, 128], [256, 512]], [8, 16, 32]
    a = prior_boxes(640, 480, sizes, steps)
    assert len(a) == 2 * (80 * 60 + 40 * 30 + 20 * 15)
    assert prior_boxes(640, 480, sizes, steps) is a      # computed once per size
    assert not a.flags.writeable
    # DFA: 160 x 160 -> 1050 anchors; ceil for sizes that are not multiples of the step.
    assert len(prior_boxes(160, 160, [[64, 80], [96, 112], [128, 144]], steps)) == 1050
    assert len(prior_boxes(100, 100, [[16, 32]], [32])) == 2 * 4 * 4


def test_decode_box_and_landmarks_by_hand():
    prior = np.array([[0.5, 0.5, 0.2, 0.4]], np.float32)
    loc = np.array([[1.0, -1.0, 0.0, math.log(2) / 0.2]], np.float32)
    # centre (0.5 + 1*0.1*0.2, 0.5 - 1*0.1*0.4) = (0.52, 0.46); size (0.2, 0.4 * 2)
    np.testing.assert_allclose(decode_boxes(loc, prior, [0.1, 0.2]),
                               [[0.42, 0.06, 0.62, 0.86]], atol=1e-6)
    pre = np.array([[1, 2, 0, 0, -1, 0, 0, -2, 5, 5]], np.float32)
    lm = decode_landmarks(pre, prior, [0.1, 0.2])
    assert lm.shape == (1, 5, 2)
    np.testing.assert_allclose(lm[0], [[0.52, 0.58], [0.5, 0.5], [0.48, 0.5], [0.5, 0.42],
                                       [0.6, 0.7]], atol=1e-6)


BOXES = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]], float)
SCORES = np.array([0.9, 0.8, 0.7, 0.95])


def test_iou_by_hand():
    np.testing.assert_allclose(box_iou(BOXES[0], BOXES[1:]), [81 / 119, 0, 0.5])
    np.testing.assert_allclose(box_iou(BOXES[0], BOXES[3:], mode="min"), [1.0])
    # Inclusive-pixel convention: (0,0,9,9) is 10 x 10.
    np.testing.assert_allclose(box_iou(np.array([0, 0, 9, 9.]), np.array([[0, 0, 4, 9.]]),
                                       offset=1), [0.5])


@pytest.mark.parametrize("thr,expected", [
    (0.4, [3, 1, 2]),   # D suppresses A (IoU 0.5); B vs D is 36/114 = 0.32 -> kept
    (0.6, [3, 0, 2]),   # A survives D; B is suppressed by A (0.68)
    (0.7, [3, 0, 1, 2]),
])
def test_nms_by_hand(thr, expected):
    assert nms(BOXES, SCORES, thr).tolist() == expected


def test_nms_min_mode_and_edge_cases():
    assert nms(BOXES, SCORES, 0.9, mode="min").tolist() == [3, 1, 2]  # D lies inside A: IoM 1
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    assert nms(BOXES, SCORES, 0.7, max_keep=2).tolist() == [3, 0]
    # A suppression needs overlap strictly above the threshold.
    assert nms(BOXES[[0, 3]], SCORES[[0, 3]], 0.5).tolist() == [1, 0]


def test_row_cosines_against_hand_values():
    from kpface.postprocess import row_cosines
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0], [0.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])
    np.testing.assert_allclose(row_cosines(a, b), [0.0, 1.0, 1.0, 0.0, -1.0], atol=1e-12)
