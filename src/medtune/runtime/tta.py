"""Test-time augmentation (flips) applied by the torch-free runtime, configured in the sidecar (docs/formats.md).

Sidecar: ``"tta": {"flips": [[1], [0], [0, 1]]}``: each entry is a set of *spatial* axes (0-based: for 2D
images 0 = rows (up-down), 1 = columns (left-right); for volumes the model-space axes). The model is run on the
input and on each flipped copy (outputs of spatial models are flipped back), and the **probabilities** (after
the sidecar's activation) are averaged. ``[]`` or no ``tta`` key: the model runs once.

For segmentation the averaged probabilities are returned as log-probabilities so the usual post-processing
(softmax + argmax, entropy) reads them unchanged: ``softmax(log p) = p`` when ``p`` sums to 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from medtune.errors import MedTuneError

TTA_MODES = ("flips",)


def tta_flips(sidecar: dict[str, Any], spatial_dims: int, where: Any = None) -> list[tuple[int, ...]]:
    """The flip sets of ``sidecar["tta"]`` checked against ``spatial_dims``; ``[]`` when TTA is off."""
    tta = sidecar.get("tta")
    if tta in (None, {}, []):
        return []
    if not isinstance(tta, dict) or set(tta) - set(TTA_MODES):
        raise MedTuneError(f"sidecar tta must be an object with {', '.join(TTA_MODES)}, got {tta!r}"[:200], where)
    flips = tta.get("flips") or []
    out: list[tuple[int, ...]] = []
    if not isinstance(flips, list):
        raise MedTuneError("sidecar tta.flips must be a list of axis lists, e.g. [[1]]", where)
    for axes in flips:
        if (
            not isinstance(axes, list)
            or not axes
            or not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < spatial_dims for a in axes)
            or len(set(axes)) != len(axes)
        ):
            raise MedTuneError(
                f"sidecar tta.flips entry {axes!r} is not a list of distinct spatial axes in 0..{spatial_dims - 1}",
                where,
            )
        key = tuple(sorted(axes))
        if key in out:
            raise MedTuneError(f"sidecar tta.flips repeats {list(key)}", where)
        out.append(key)
    return out


def flip(x: np.ndarray, axes: tuple[int, ...], lead: int) -> np.ndarray:
    """``x`` flipped along spatial ``axes`` (array axes ``lead + a``), contiguous."""
    return np.ascontiguousarray(np.flip(x, axis=tuple(lead + a for a in axes)))


def averaged_probabilities(
    predict: Callable[[np.ndarray], np.ndarray],
    to_probs: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    flips: list[tuple[int, ...]],
    lead: int,
    spatial_output: bool,
) -> np.ndarray:
    """Mean of ``to_probs(predict(view))`` over the identity and each flipped view of ``x``.

    ``lead``: axes before the spatial ones (2 for a batch ``(N, C, ...)``, 1 for a volume ``(C, ...)``).
    ``spatial_output``: outputs are maps (segmentation) and are flipped back before averaging.
    """
    total = np.asarray(to_probs(predict(x)), dtype=np.float64)
    for axes in flips:
        out = np.asarray(to_probs(predict(flip(x, axes, lead))), dtype=np.float64)
        total += flip(out, axes, lead) if spatial_output else out
    return total / (1 + len(flips))


def classification_probabilities(model: Any, batch: np.ndarray) -> np.ndarray:
    """Class probabilities ``(N, n_labels)`` of an :class:`~medtune.runtime.model.OnnxModel` for a preprocessed
    batch, averaged over the sidecar's flips."""
    return averaged_probabilities(model.predict_batch, model.probabilities, batch, model.tta_flips, 2, False)


def volume_logits(model: Any, arr: np.ndarray, predict_volume: Callable[[Any, np.ndarray], np.ndarray]) -> np.ndarray:
    """Blended logits ``(K, *spatial)`` of a model-space volume; with flips, log of the flip-averaged probabilities."""
    flips = model.tta_flips
    if not flips:
        return predict_volume(model, arr)
    from medtune.runtime.model import sigmoid, softmax

    act = model.activation
    if act == "softmax":
        to_probs = lambda z: softmax(np.asarray(z, dtype=np.float64), axis=0)  # noqa: E731
    elif act == "sigmoid":
        to_probs = lambda z: sigmoid(np.asarray(z, dtype=np.float64))  # noqa: E731
    else:
        to_probs = lambda z: np.asarray(z, dtype=np.float64)  # noqa: E731
    p = averaged_probabilities(lambda v: predict_volume(model, v), to_probs, arr, flips, 1, True)
    if act == "softmax":
        return np.log(np.clip(p, 1e-12, None)).astype(np.float32)
    if act == "sigmoid":
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p)).astype(np.float32)
    return p.astype(np.float32)
