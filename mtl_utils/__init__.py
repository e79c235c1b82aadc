"""Utilities for the executable book *Multi-Task Learning for Computer Vision*.

Submodules are imported on demand so that ``import mtl_utils`` stays cheap and does
not pull in TensorFlow: ``from mtl_utils.data.scenes import render_scenes`` needs
only NumPy.
"""

__version__ = "0.1.0"
