"""Reading checkpoints safely, remapping keys, adapting input channels and loading with a report."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from medtune.errors import MedTuneError, one_line, unpickling_refusal
from medtune.weights.report import LoadReport

StateDict = dict[str, torch.Tensor]

#: container keys seen in the wild around a state dict (MONAI bundles, Lightning, MedicalNet, MedTune)
CONTAINER_KEYS = ("state_dict", "model", "network", "model_state_dict", "net", "teacher", "student")


def read_checkpoint(path: str | Path) -> StateDict:
    """Load a checkpoint file with ``weights_only=True`` and return its flat tensor state dict.

    Common containers (``{"state_dict": ...}``, ``{"model": ...}``, ``{"network": ...}``) are unwrapped.
    Raises :class:`MedTuneError` naming the file when it is missing, unreadable or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise MedTuneError("checkpoint file not found", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - turned into a one-line user error
        if "weights_only" in str(exc) or "GLOBAL" in str(exc):
            raise MedTuneError(unpickling_refusal(exc), path) from exc
        raise MedTuneError(f"not a loadable weights-only checkpoint ({one_line(exc, 160)})", path) from exc
    state = unwrap_state_dict(obj)
    if not state:
        raise MedTuneError("holds no tensors (expected a state dict or {'state_dict': ...})", path)
    return state


def unwrap_state_dict(obj: object) -> StateDict:
    """Find the tensor state dict inside a loaded checkpoint object."""
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return dict(tensors)
        for key in CONTAINER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                inner = unwrap_state_dict(obj[key])
                if inner:
                    return inner
    return {}


def strip_prefixes(state: StateDict, prefixes: Sequence[str] = ("module.",)) -> tuple[StateDict, int]:
    """Remove wrapper prefixes (DataParallel ``module.`` ...) when every key carries them."""
    n = 0
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            n += len(state)
    return state, n


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a stem conv weight ``(out, C, *k)`` to ``in_channels`` (the rule of timm's ``adapt_input_conv``, whose
    arguments come the other way round: ``(in_chans, conv_weight)``).

    One channel: the filters are summed over C, so a grey image gives the same response the RGB net gave
    to that image copied into all channels. More channels: the filters are tiled and scaled by
    ``C / in_channels`` so the activation scale is kept.
    """
    c = weight.shape[1]
    if in_channels == c:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // c)
    tiled = weight.repeat(1, reps, *([1] * (weight.dim() - 2)))[:, :in_channels]
    return tiled * (c / float(in_channels))


def load_with_report(
    model: nn.Module,
    state: StateDict,
    source: str,
    head_prefixes: Sequence[str] = (),
    stem_key: str | Sequence[str] | None = None,
    filter_fn: Callable[[StateDict, nn.Module], StateDict | tuple[StateDict, list[str]]] | None = None,
) -> LoadReport:
    """Load ``state`` into ``model`` as far as names and shapes allow, and say what happened.

    - ``filter_fn(state, model)`` may rewrite the state dict first (timm's ``filter_fn`` idea); it may return
      ``(state, notes)`` instead, the notes (e.g. "inflated 49 conv kernels 2D->3D") going to ``report.adapted``;
    - the stem conv (``stem_key``; a sequence when several convs see the input, e.g. MONAI UNet's first conv
      and its residual conv) is adapted to the network's input channels;
    - tensors under ``head_prefixes`` that do not fit are re-initialized and listed as such.
    """
    report = LoadReport(source=source)
    stem_keys = (stem_key,) if isinstance(stem_key, str) else tuple(stem_key or ())
    state, report.remapped = strip_prefixes(dict(state))
    if filter_fn is not None:
        before = set(state)
        filtered = filter_fn(state, model)
        if isinstance(filtered, tuple):
            filtered, notes = filtered
            report.adapted.extend(notes)
        state = filtered
        report.remapped += len(before - set(state))

    target = model.state_dict()
    new_state = dict(target)
    is_head = lambda k: any(k.startswith(p) for p in head_prefixes)  # noqa: E731

    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if value.shape == want:
            new_state[key] = value.to(target[key].dtype)
            report.loaded.append(key)
        elif (
            key in stem_keys and value.dim() == len(want) and value.shape[0] == want[0] and value.shape[2:] == want[2:]
        ):
            new_state[key] = adapt_input_conv(value, want[1]).to(target[key].dtype)
            report.loaded.append(key)
            how = "summed" if want[1] == 1 else "tiled and rescaled"
            report.adapted.append(f"{key}: input channels {value.shape[1]} -> {want[1]} ({how} filters)")
        elif is_head(key):
            pass  # re-initialized below
        else:
            report.shape_mismatch.append((key, tuple(value.shape), tuple(want)))
    for key in target:
        if key not in report.loaded:
            if is_head(key):
                report.reinitialized_head.append(key)
            elif key not in state and not key.endswith("num_batches_tracked"):
                report.missing.append(key)
    model.load_state_dict(new_state, strict=True)
    return report
