"""2D -> 3D weight inflation: start a 3D network from ImageNet (2D) knowledge.

A 2D conv kernel ``(O, I, kH, kW)`` becomes a 3D kernel ``(O, I, kH, kW, kD)`` (depth axis configurable):

- ``"center"``: the 2D kernel sits at the central depth slice, zeros elsewhere. On a volume that is constant
  along depth, every depth slice of every feature map equals the 2D network's feature map (exactly, not
  only in the interior), so the 3D network starts as "the 2D network applied slice by slice".
- ``"mean"``: the 2D kernel is repeated along depth and divided by ``kD`` (I3D, Carreira & Zisserman 2017).
  Exact on depth-constant input away from the depth borders; at the borders MONAI's zero padding enters the
  average, and that error spreads inwards layer by layer. Measured on Lite0 with a photo repeated over 32
  slices: exact in the interior of the 1/2 and 1/4 maps, every slice wrong from 1/8 on, logits off by ~30
  and a different top-1 class. Hence "center" is what the registered ``-inflated`` sources use.

MONAI has no inflation utility (``monai.networks.utils`` copies/convert models but never changes a kernel's
rank), so ``inflate_conv_weight`` and ``inflate_state_dict`` are written here by hand. Depth is the *last*
spatial axis by default, MONAI's ``(C, H, W, D)`` convention (axial slices along D), so the ImageNet filters
act in the axial plane.

Depth and the static "same" padding: MONAI's ``EfficientNet`` builds its padders from ``image_size`` (224
in :func:`medtune.weights.architectures.build_efficientnet_lite0`). For a stride-2 conv the padding only
depends on the parity of the input size, and 224 is even down to 1/32 (224, 112, 56, 28, 14), so the
padders are TensorFlow's "same" padding for every input whose sizes (depth too) are multiples of 32.
Keep volumes at multiples of 32 (e.g. 64x64x32); otherwise a stride-2 conv reads a padded (zero) slice
where TF would not, and the 2D/3D equivalence breaks at that border.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from medtune.weights.loading import StateDict
from medtune.weights.sources import (
    SOURCES,
    PretrainedSource,
    _lite0_package_state,
    efficientnet_pytorch_to_monai,
    register_source,
)

INFLATION_MODES = ("center", "mean")

__all__ = [
    "INFLATION_MODES",
    "inflate_conv_weight",
    "inflate_state_dict",
    "inflated_filter",
    "lite0_inflated_filter",
]


def inflate_conv_weight(weight: Tensor, depth: int, mode: str = "center", depth_axis: int = -1) -> Tensor:
    """Inflate one conv kernel ``(O, I, *k)`` to ``(O, I, *k')`` with ``depth`` taps inserted at ``depth_axis``.

    ``depth_axis`` indexes the *spatial* axes of the result (``-1``: last, ``0``: ``(O, I, kD, kH, kW)``).
    """
    if mode not in INFLATION_MODES:
        raise ValueError(f"inflation mode must be one of {INFLATION_MODES}, not {mode!r}")
    n_spatial = weight.dim() - 2 + 1
    axis = 2 + (depth_axis % n_spatial)
    w = weight.unsqueeze(axis)
    if mode == "mean":
        reps = [1] * w.dim()
        reps[axis] = depth
        return w.repeat(*reps) / depth
    shape = list(w.shape)
    shape[axis] = depth
    out = weight.new_zeros(shape)
    out.narrow(axis, depth // 2, 1).copy_(w)
    return out


def _inflatable(value: Tensor, want: tuple[int, ...], depth_axis: int) -> bool:
    """A conv kernel with one spatial axis less than the target (input channels may differ: stem adaptation)."""
    if value.dim() < 3 or len(want) != value.dim() + 1 or value.shape[0] != want[0]:
        return False
    spatial = list(want[2:])
    del spatial[depth_axis % len(spatial)]
    return tuple(value.shape[2:]) == tuple(spatial)


def inflate_state_dict(
    state2d: StateDict, model3d: nn.Module, mode: str = "center", depth_axis: int = -1
) -> tuple[StateDict, list[str]]:
    """Inflate the 2D conv kernels of ``state2d`` to the shapes of ``model3d``; copy everything else as is.

    Keys are expected in the 3D model's naming already (apply the key map first). A kernel is inflated when
    the model's tensor under the same key has one spatial axis more and the other axes agree (the input
    channels may differ: :func:`~medtune.weights.loading.load_with_report` adapts the stem afterwards).
    Returns the new state dict and notes for ``LoadReport.adapted``.
    """
    if mode not in INFLATION_MODES:
        raise ValueError(f"inflation mode must be one of {INFLATION_MODES}, not {mode!r}")
    target = model3d.state_dict()
    out: StateDict = {}
    n = 0
    for key, value in state2d.items():
        if key in target and _inflatable(value, tuple(target[key].shape), depth_axis):
            depth = target[key].shape[2 + depth_axis % (target[key].dim() - 2)]
            out[key] = inflate_conv_weight(value, depth, mode, depth_axis)
            n += 1
        else:
            out[key] = value
    how = (
        "2D kernel at the central depth slice, zeros elsewhere"
        if mode == "center"
        else "2D kernel repeated along depth / kD, I3D"
    )
    notes = [f"inflated {n} conv kernels 2D->3D ({mode}: {how})"] if n else []
    return out, notes


def inflated_filter(
    key_map: Callable[[StateDict, nn.Module], StateDict] | None = None, mode: str = "center", depth_axis: int = -1
) -> Callable[[StateDict, nn.Module], tuple[StateDict, list[str]]]:
    """A ``filter_fn`` for :func:`load_with_report`: optional key map ``(state, model) -> state``, then inflation."""

    def _filter(state: StateDict, model: nn.Module) -> tuple[StateDict, list[str]]:
        if key_map is not None:
            state = key_map(state, model)
        return inflate_state_dict(state, model, mode=mode, depth_axis=depth_axis)

    return _filter


#: efficientnet_pytorch keys -> MONAI nesting -> 3D kernels (center inflation)
lite0_inflated_filter = inflated_filter(efficientnet_pytorch_to_monai, mode="center")


def _register() -> None:
    for variant in ("lite0", "lite1", "lite2"):
        src2d = SOURCES[f"imagenet-efficientnet-{variant}"]
        register_source(
            PretrainedSource(
                name=f"imagenet-efficientnet-{variant}-inflated",
                arch=src2d.arch,
                origin=src2d.origin + ", 2D kernels inflated to 3D",
                license=src2d.license,
                description=f"ImageNet-1k EfficientNet-{variant.capitalize()} inflated to 3D (center: starts as the 2D "
                "net slice by slice); depth last, sizes multiples of 32",
                input_size=(224, 224, 32),
                mean=src2d.mean,
                std=src2d.std,
                key_format=src2d.key_format,
                training_data=src2d.training_data,
                spatial_dims=3,
                loader=_lite0_package_state if variant == "lite0" else src2d.loader,
                filter_fn=lite0_inflated_filter,
                package_module=src2d.package_module,
                num_params=src2d.num_params,
            )
        )


_register()
