"""Sliding-window inference in numpy (torch-free), matching MONAI's ``sliding_window_inference``.

Same as MONAI (1.x): inputs smaller than the ROI are zero-padded (``diff // 2`` before, the rest after), window
starts from ``dense_patch_slices`` with interval ``int(roi * (1 - overlap))`` (the ROI when it equals the image
size; at least 1), the last window shifted back inside the image, Gaussian importance map with
``sigma = 0.125 * roi`` clamped below at ``max(min, 1e-3)`` (or constant weights), and the weighted sum divided
by the summed weights, then cropped back. Memory: one float32 accumulator ``(n_classes, *padded)`` and one
weight map ``(*padded)``, plus ``sw_batch_size`` windows at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import product

import numpy as np

Predictor = Callable[[np.ndarray], np.ndarray]


def importance_map(roi_size: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI ``compute_importance_map`` (float32)."""
    roi = [int(r) for r in roi_size]
    if mode == "constant":
        weights = np.ones(roi, dtype=np.float32)
    elif mode == "gaussian":
        weights = np.ones((), dtype=np.float32)
        for i, n in enumerate(roi):
            x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)[:n]
            g = np.exp(x**2 / np.float32(-2 * (n * sigma_scale) ** 2)).astype(np.float32)
            weights = weights[..., None] * g.reshape((1,) * i + (n,))
    else:
        raise ValueError(f"unknown blend mode {mode!r} (use 'gaussian' or 'constant')")
    return np.clip(weights, max(float(weights.min()), 1e-3), None).astype(np.float32)


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI ``_get_scan_interval``."""
    out = []
    for img, roi in zip(image_size, roi_size, strict=True):
        out.append(int(roi) if roi == img else max(int(roi * (1 - overlap)), 1))
    return tuple(out)


def window_starts(image_size: Sequence[int], roi_size: Sequence[int], interval: Sequence[int]) -> list[tuple[int, ...]]:
    """MONAI ``dense_patch_slices`` start positions (last axis fastest)."""
    per_dim = []
    for img, roi, step in zip(image_size, roi_size, interval, strict=True):
        n = 1
        if step != 0:
            num = int(math.ceil(float(img) / step))
            n = next((d + 1 for d in range(num) if d * step + roi >= img), 1)
        per_dim.append([i * step - max(i * step + roi - img, 0) for i in range(n)])
    return [tuple(int(s) for s in starts) for starts in product(*per_dim)]


def sliding_window(
    predict: Predictor,
    volume: np.ndarray,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    n_classes: int | None = None,
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """Blend ``predict`` over ROI windows of ``volume (C, *spatial)`` -> ``(n_classes, *spatial)`` float32.

    ``predict`` takes ``(N, C, *roi)`` float32 and returns ``(N, K, *roi)``. ``n_classes`` (``K``) is taken from
    the first prediction when not given.
    """
    volume = np.asarray(volume, dtype=np.float32)
    spatial = tuple(volume.shape[1:])
    roi = tuple(int(r) if r and int(r) > 0 else s for r, s in zip(roi_size, spatial, strict=True))
    pad = [(0, 0)] + [
        ((r - s) // 2 if r > s else 0, (r - s) - (r - s) // 2 if r > s else 0)
        for s, r in zip(spatial, roi, strict=True)
    ]
    if any(p != (0, 0) for p in pad):
        volume = np.pad(volume, pad, mode="constant", constant_values=0.0)
    size = tuple(volume.shape[1:])
    starts = window_starts(size, roi, scan_interval(size, roi, overlap))
    weights = importance_map(roi, mode, sigma_scale)
    acc: np.ndarray | None = None
    count = np.zeros(size, dtype=np.float32)
    step = max(1, int(sw_batch_size))
    for b in range(0, len(starts), step):
        group = starts[b : b + step]
        slices = [tuple(slice(s, s + r) for s, r in zip(start, roi, strict=True)) for start in group]
        batch = np.stack([volume[(slice(None), *sl)] for sl in slices])
        out = np.asarray(predict(batch), dtype=np.float32)
        if out.shape[0] != len(group) or tuple(out.shape[2:]) != roi:
            raise ValueError(f"predictor returned shape {out.shape} for windows {batch.shape}")
        if acc is None:
            k = int(n_classes) if n_classes is not None else int(out.shape[1])
            acc = np.zeros((k, *size), dtype=np.float32)
        if out.shape[1] != acc.shape[0]:
            raise ValueError(f"predictor returned {out.shape[1]} channels, expected {acc.shape[0]}")
        for sl, pred in zip(slices, out, strict=True):
            acc[(slice(None), *sl)] += pred * weights
            count[sl] += weights
    assert acc is not None  # at least one window always exists
    acc /= count
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pad[1:], spatial, strict=True))
    return np.ascontiguousarray(acc[(slice(None), *crop)])
