"""The sidecar's preprocessing spec, applied with numpy (torch-free).

The same spec (a list of ops) is turned into MONAI transforms for training
(:func:`medtune.finetune.transforms.preprocessing_transforms`); a test checks both give the same
arrays on real images. Ops:

- ``{"op": "channels", "n": 1}``: RGB -> grey by the channel mean, or grey -> n copies;
- ``{"op": "resize", "spatial_size": [H, W], "mode": "bilinear"}``: as ``torch.nn.functional.interpolate``
  with ``align_corners=False`` and no anti-aliasing (MONAI ``Resize``'s default);
- ``{"op": "scale_intensity", "minv": 0.0, "maxv": 1.0}``: per-image min-max (MONAI ``ScaleIntensity``);
- ``{"op": "normalize", "mean": [...], "std": [...]}``: per channel (MONAI ``NormalizeIntensity``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Spec = Sequence[dict[str, Any]]


def to_channels(arr: np.ndarray, n: int) -> np.ndarray:
    """Make a channel-first array have ``n`` channels (mean of RGB for grey; repeat grey)."""
    c = arr.shape[0]
    if c == n:
        return arr
    if n == 1:
        return arr.mean(axis=0, keepdims=True, dtype=np.float32)
    if c == 1:
        return np.repeat(arr, n, axis=0)
    raise ValueError(f"cannot convert {c} channels to {n}")


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0).astype(np.float32)
    return i0, i1, w


def resize_linear(arr: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(Bi/tri)linear resize of a channel-first array, matching torch ``align_corners=False``."""
    out = arr.astype(np.float32, copy=False)
    for axis, n_out in enumerate(size, start=1):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        i0, i1, w = _linear_weights(n_in, int(n_out))
        shape = [1] * out.ndim
        shape[axis] = -1
        w = w.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i1, axis=axis) * w
    return out.astype(np.float32, copy=False)


def scale_intensity(arr: np.ndarray, minv: float = 0.0, maxv: float = 1.0) -> np.ndarray:
    """MONAI ``ScaleIntensity`` (``rescale_array``): min-max rescale of the whole array to ``[minv, maxv]``,
    float32; a constant array becomes ``arr * minv``, as MONAI does. The one copy: 2D and 3D pipelines use it."""
    arr = np.asarray(arr, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi == lo:
        return (arr * np.float32(minv)).astype(np.float32)
    return (((arr - lo) / (hi - lo)) * (maxv - minv) + minv).astype(np.float32)


def normalize(arr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Per-channel ``(x - mean) / std``."""
    m = np.asarray(mean, dtype=np.float32).reshape(-1, *([1] * (arr.ndim - 1)))
    s = np.asarray(std, dtype=np.float32).reshape(-1, *([1] * (arr.ndim - 1)))
    return ((arr - m) / s).astype(np.float32)


def apply_preprocessing(arr: np.ndarray, spec: Spec) -> np.ndarray:
    """Apply a sidecar preprocessing spec to one channel-first image."""
    out = np.asarray(arr, dtype=np.float32)
    for step in spec:
        op = step["op"]
        if op == "channels":
            out = to_channels(out, int(step["n"]))
        elif op == "resize":
            out = resize_linear(out, step["spatial_size"])
        elif op == "scale_intensity":
            out = scale_intensity(out, float(step.get("minv", 0.0)), float(step.get("maxv", 1.0)))
        elif op == "normalize":
            out = normalize(out, step["mean"], step["std"])
        else:
            raise ValueError(f"unknown preprocessing op {op!r}")
    return out
