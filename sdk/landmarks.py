"""The one five-point landmark convention used everywhere in kpface.

Order is the ArcFace template's: image-left eye, image-right eye, nose tip, image-left mouth
corner, image-right mouth corner ("left" = smaller x in the image, not the subject's left).
"""
import numpy as np

LANDMARK_ORDER = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")

# ArcFace / InsightFace 112x112 five-point template, (x, y) in pixels, in LANDMARK_ORDER.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
