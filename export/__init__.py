"""kpface.export: torch model definitions, checkpoint loading and ONNX export.

Importing the package imports every architecture file, and each file adds its configurations
to :mod:`kpface.export.registry` (a leaf: it imports none of them). A new architecture is one
file that calls ``registry.register`` plus one line here.
"""
from . import dfa, dlib_resnet, mtcnn, part_fvit, retinaface, vit  # noqa: F401  (they register)
