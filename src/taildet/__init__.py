"""taildet: long-tailed object detection on torchvision detectors."""

__version__ = "0.1.0"
