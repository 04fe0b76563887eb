"""Torch-free runtime: image readers, sidecar preprocessing, onnxruntime sessions, inference.

Nothing in this package may import torch (edge boxes and 3D Slicer load it without PyTorch).
"""
