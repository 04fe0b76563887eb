"""2D -> 3D weight inflation: start a 3D network from ImageNet (2D) knowledge.

A 2D conv kernel ``(O, I, kH, kW)`` becomes a 3D kernel ``(O, I, kH, kW, kD)`` (depth axis configurable):

- ``"cell"`` (what the registered ``-inflated`` sources use): a stride-1 kernel sits at the central depth tap,
  zeros elsewhere; a kernel with depth stride ``s`` is spread evenly (``/ s``) over the ``s`` taps that cover
  its output voxel's own stride cell (input slices ``s*i .. s*i+s-1``, found from the conv's padding and its
  static "same" padder), so no tap ever reads the zero padding. On a volume that is constant along depth every
  depth slice of every feature map equals the 2D network's (exactly, as ``"center"``), and on a real volume every
  input slice reaches the output at init (each stride-2 layer averages the two slices it merges).
- ``"center"``: the 2D kernel at the central depth tap of *every* conv, strided ones too. Exact on depth-constant
  input, but on a real volume a strided conv with a one-tap depth kernel only subsamples depth: after Lite0's
  five stride-2 convs the network at init reads one input slice in 32, and with the TF "same" padding (0 before,
  1 after) that slice is the *last* one (index ``32j+31``): at 32^3 the whole net looked only at the crop's
  edge slice (measured: input gradient zero on 31 of 32 slices; frozen features = the 2D net on slice 31,
  LIDC nodule malignancy linear-probe AUC 0.53 vs 0.69 with ``"cell"``; fine-tuned on 57 crops, 0.61 vs 0.79).
- ``"mean"``: the 2D kernel is repeated along depth and divided by ``kD`` (I3D, Carreira & Zisserman 2017).
  Exact on depth-constant input away from the depth borders; at the borders MONAI's zero padding enters the
  average, and that error spreads inwards layer by layer. Measured on Lite0 with a photo repeated over 32
  slices: exact in the interior of the 1/2 and 1/4 maps, every slice wrong from 1/8 on, logits off by ~30
  and a different top-1 class.

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

INFLATION_MODES = ("cell", "center", "mean")

__all__ = [
    "INFLATION_MODES",
    "inflate_conv_weight",
    "inflate_state_dict",
    "inflated_filter",
    "lite0_inflated_filter",
]


def inflate_conv_weight(
    weight: Tensor, depth: int, mode: str = "cell", depth_axis: int = -1, stride: int = 1, pad_before: int = 0
) -> Tensor:
    """Inflate one conv kernel ``(O, I, *k)`` to ``(O, I, *k')`` with ``depth`` taps inserted at ``depth_axis``.

    ``depth_axis`` indexes the *spatial* axes of the result (``-1``: last, ``0``: ``(O, I, kD, kH, kW)``).
    ``stride`` and ``pad_before`` (the conv's depth stride and the zeros padded before the input along depth)
    only matter to ``"cell"``: a strided kernel is spread over taps ``pad_before .. pad_before + stride - 1``.
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
    if mode == "center" or stride == 1:
        out.narrow(axis, depth // 2, 1).copy_(w)
        return out
    if not 0 <= pad_before <= depth - stride:
        raise ValueError(f"cell inflation: stride {stride} with {pad_before} padded before does not fit {depth} taps")
    out.narrow(axis, pad_before, stride).copy_(w.expand_as(out.narrow(axis, pad_before, stride)) / stride)
    return out


def _depth_stride_and_pad(model: nn.Module, key: str, axis: int, n_spatial: int) -> tuple[int, int]:
    """The depth stride of the conv owning ``key`` and the zeros padded before its input along depth: the conv's own
    ``padding`` plus a static "same" padder next to it (MONAI EfficientNet's ``<conv>_padding`` ``ConstantPadNd``)."""
    name = key.rsplit(".", 1)[0]
    conv = model.get_submodule(name)
    stride = conv.stride if isinstance(conv, nn.modules.conv._ConvNd) else (1,) * n_spatial
    pad = conv.padding if isinstance(conv, nn.modules.conv._ConvNd) and not isinstance(conv.padding, str) else 0
    before = int(pad[axis]) if isinstance(pad, tuple) else int(pad)
    parent_name, _, leaf = name.rpartition(".")
    padder = getattr(model.get_submodule(parent_name) if parent_name else model, leaf + "_padding", None)
    if isinstance(padder, nn.modules.padding._ConstantPadNd):
        before += int(padder.padding[2 * (n_spatial - 1 - axis)])  # (last_before, last_after, ...) order
    return int(stride[axis]), before


def _inflatable(value: Tensor, want: tuple[int, ...], depth_axis: int) -> bool:
    """A conv kernel with one spatial axis less than the target (input channels may differ: stem adaptation)."""
    if value.dim() < 3 or len(want) != value.dim() + 1 or value.shape[0] != want[0]:
        return False
    spatial = list(want[2:])
    del spatial[depth_axis % len(spatial)]
    return tuple(value.shape[2:]) == tuple(spatial)


def inflate_state_dict(
    state2d: StateDict, model3d: nn.Module, mode: str = "cell", depth_axis: int = -1
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
            n_spatial = target[key].dim() - 2
            depth = target[key].shape[2 + depth_axis % n_spatial]
            stride, before = _depth_stride_and_pad(model3d, key, depth_axis % n_spatial, n_spatial)
            out[key] = inflate_conv_weight(value, depth, mode, depth_axis, stride, before)
            n += 1
        else:
            out[key] = value
    how = {
        "cell": "2D kernel at the central depth tap, a strided one over its stride cell",
        "center": "2D kernel at the central depth slice, zeros elsewhere",
        "mean": "2D kernel repeated along depth / kD, I3D",
    }[mode]
    notes = [f"inflated {n} conv kernels 2D->3D ({mode}: {how})"] if n else []
    return out, notes


def inflated_filter(
    key_map: Callable[[StateDict, nn.Module], StateDict] | None = None, mode: str = "cell", depth_axis: int = -1
) -> Callable[[StateDict, nn.Module], tuple[StateDict, list[str]]]:
    """A ``filter_fn`` for :func:`load_with_report`: optional key map ``(state, model) -> state``, then inflation."""

    def _filter(state: StateDict, model: nn.Module) -> tuple[StateDict, list[str]]:
        if key_map is not None:
            state = key_map(state, model)
        return inflate_state_dict(state, model, mode=mode, depth_axis=depth_axis)

    return _filter


#: efficientnet_pytorch keys -> MONAI nesting -> 3D kernels (cell inflation)
lite0_inflated_filter = inflated_filter(efficientnet_pytorch_to_monai, mode="cell")


def _register() -> None:
    for variant in ("lite0", "lite1", "lite2"):
        src2d = SOURCES[f"imagenet-efficientnet-{variant}"]
        register_source(
            PretrainedSource(
                name=f"imagenet-efficientnet-{variant}-inflated",
                arch=src2d.arch,
                origin=src2d.origin + ", 2D kernels inflated to 3D",
                license=src2d.license,
                description=f"ImageNet-1k EfficientNet-{variant.capitalize()} inflated to 3D (cell: starts as the 2D "
                "net slice by slice, strided convs averaging the slices they merge); depth last, sizes multiples of 32",
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
