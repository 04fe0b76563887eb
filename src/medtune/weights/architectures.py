"""Network builders: each architecture knows its stem conv key and its head (classifier) prefix."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from medtune.errors import MedTuneError

#: EfficientNet-Lite0 block strings (width/depth 1.0, no squeeze-excitation), MONAI block-string syntax.
LITE0_BLOCKS = [
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
]

#: EfficientNet-Lite1/Lite2 (TF ``efficientnet_lite_builder``: width 1.0/1.1, depth 1.1/1.2, ``fix_head_stem``: the
#: stem (32), the head (1280) and the repeats of the first and last block are not scaled). Channels and repeats are
#: written out already scaled, so MONAI's ``EfficientNet`` is built with width/depth 1.0; checked against the
#: package checkpoints: every tensor shape matches (tests/test_weights_lite.py).
LITE_BLOCKS = {
    "lite0": LITE0_BLOCKS,
    "lite1": [
        "r1_k3_s11_e1_i32_o16",
        "r3_k3_s22_e6_i16_o24",
        "r3_k5_s22_e6_i24_o40",
        "r4_k3_s22_e6_i40_o80",
        "r4_k5_s11_e6_i80_o112",
        "r5_k5_s22_e6_i112_o192",
        "r1_k3_s11_e6_i192_o320",
    ],
    "lite2": [
        "r1_k3_s11_e1_i32_o16",
        "r3_k3_s22_e6_i16_o24",
        "r3_k5_s22_e6_i24_o48",
        "r4_k3_s22_e6_i48_o88",
        "r4_k5_s11_e6_i88_o120",
        "r5_k5_s22_e6_i120_o208",
        "r1_k3_s11_e6_i208_o352",
    ],
}


@dataclass(frozen=True)
class Architecture:
    """How to build a network family, where its stem and head live, and what its ONNX export promises.

    The export rules are data here, not name checks elsewhere: ``medtune export`` reads them
    (:func:`medtune.export.from_run.export_options`) and a test walks the registry to check every entry.
    """

    name: str
    build: Callable[..., nn.Module]  # (spatial_dims, in_channels, num_classes, **kwargs) -> module
    stem_key: str | tuple[str, ...]
    head_prefixes: tuple[str, ...]  # what a linear probe trains / a new task re-initializes
    spatial_dims: tuple[int, ...] = (2,)
    fully_convolutional: bool = False
    task: str = "classification"  # classification | segmentation (num_classes = output channels)
    description: str = ""
    #: backbone stages, first to last, as parameter-name prefixes (a tuple entry: several prefixes form one
    #: stage); the ``last_stages`` strategy trains the last ``n`` of them. Empty: the top-level children.
    stages: tuple[str | tuple[str, ...], ...] = ()
    #: every input side must be a multiple of this (strides, windows)
    size_multiple: int = 1
    #: the smallest spatial input it takes (3D order; a 2D build takes the last two), when more than
    #: ``size_multiple`` per side (e.g. SwinUNETR: its bottleneck needs more than one voxel)
    min_input: tuple[int, ...] = ()
    #: the exported graph fixes its spatial size (SwinUNETR bakes in its window count): exported for the ROI only
    export_fixed_size: bool = False
    #: ONNX parity gate of the export: max |onnx - torch| <= atol + rtol * max |torch|
    export_atol: float = 1e-4
    export_rtol: float = 1e-3
    #: settings of a small build with the same layout and key names (tests, smoke runs)
    small_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)
    #: renames the family's known checkpoint key variants; used for sources that declare no ``filter_fn``
    #: of their own (``zoo:PATH`` bundles)
    key_filter: Callable[..., Any] | None = field(default=None, compare=False)

    @property
    def dynamic_spatial(self) -> bool:
        """Whether the export has dynamic spatial axes (fully convolutional, graph not fixed to a size)."""
        return self.fully_convolutional and not self.export_fixed_size

    def smallest_input(self, spatial_dims: int) -> tuple[int, ...]:
        """The smallest valid spatial input size (at least 16 per side): :attr:`min_input` or the multiple."""
        if self.min_input:
            return tuple(self.min_input[-spatial_dims:])
        return (max(16, self.size_multiple),) * spatial_dims


def _swap_swish_for_relu6(model: nn.Module) -> nn.Module:
    """EfficientNet-Lite uses ReLU6 where MONAI's EfficientNet uses (memory-efficient) swish."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child).__name__ in {"MemoryEfficientSwish", "Swish", "SiLU"}:
                setattr(parent, name, nn.ReLU6(inplace=False))
    return model


def build_efficientnet_lite0(
    spatial_dims: int, in_channels: int, num_classes: int, bn_momentum: float = 0.1, variant: str = "lite0"
) -> nn.Module:
    """MONAI ``EfficientNet`` with the Lite0 (or ``variant`` Lite1/Lite2) blocks and ReLU6 activations (2D or 3D).

    BatchNorm momentum is 0.1 (PyTorch's default) rather than the 0.01 of the TensorFlow original: with a
    few hundred fine-tuning steps, 0.01 leaves the running statistics at ImageNet's, and the model then
    evaluates far worse than it trains (measured on BreastMNIST). The static "same" padding is built for 224
    (Lite1/Lite2 were trained at 240/260): exact TF padding for inputs whose sizes are multiples of 32.
    """
    from monai.networks.nets import EfficientNet

    net = EfficientNet(
        LITE_BLOCKS[variant],
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        dropout_rate=0.2,
        image_size=224,
        drop_connect_rate=0.2,
        norm=("batch", {"eps": 1e-3, "momentum": bn_momentum}),
    )
    _init_head(net._fc)
    return _scriptable_without_se(_swap_swish_for_relu6(net))


def _init_head(fc: nn.Linear) -> None:
    """Classifier init of uniform(+-1/sqrt(fan_in)), zero bias (PyTorch's Linear range), replacing MONAI's TF-style
    uniform(+-1/sqrt(num_classes)): for 2 classes that is +-0.71, whose initial logits (std ~10 on BreastMNIST
    features) gave losses of 3-8 for the first epochs and pushed large gradients into the pretrained backbone."""
    bound = 1.0 / math.sqrt(fc.in_features)
    nn.init.uniform_(fc.weight, -bound, bound)
    nn.init.zeros_(fc.bias)


def _scriptable_without_se(model: nn.Module) -> nn.Module:
    """Give Lite0's blocks (no squeeze-excitation) parameter-free stand-ins for the SE layers MONAI's
    ``MBConvBlock.forward`` names under ``if self.has_se``: TorchScript compiles that branch too, so without them
    ``torch.jit.script`` (and the Model Zoo's bundle check) fails. The state dict is unchanged."""
    for block in model.modules():
        if type(block).__name__ == "MBConvBlock" and not getattr(block, "has_se", True):
            for name in ("_se_adaptpool", "_se_reduce", "_se_reduce_padding", "_se_expand", "_se_expand_padding"):
                if not hasattr(block, name):
                    setattr(block, name, nn.Identity())
    return model


def _torchvision_builder(fn_name: str) -> Callable[[int, int, int], nn.Module]:
    def build(spatial_dims: int, in_channels: int, num_classes: int) -> nn.Module:
        import torchvision.models as tvm

        if spatial_dims != 2:
            raise ValueError(f"torchvision {fn_name} is 2D only")
        net = getattr(tvm, fn_name)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            stem_parent, stem_name = (net, "conv1") if hasattr(net, "conv1") else (net.features, "conv0")
            old = getattr(stem_parent, stem_name)
            setattr(
                stem_parent,
                stem_name,
                nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False),
            )
        return net

    return build


def build_tiny_cnn(spatial_dims: int, in_channels: int, num_classes: int) -> nn.Module:
    """A very small CNN (for tests and smoke runs): conv-bn-relu x2, global pool, linear head."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
    return nn.Sequential(
        conv(in_channels, 8, 3, stride=2, padding=1, bias=False),
        bn(8),
        nn.ReLU(),
        conv(8, 16, 3, stride=2, padding=1, bias=False),
        bn(16),
        nn.ReLU(),
        pool,
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def build_tiny_unet(spatial_dims: int, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """A very small MONAI UNet (for tests and smoke runs of the segmentation presets)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims, in_channels, num_classes, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)


def _lite_builder(variant: str) -> Callable[..., nn.Module]:
    def build(spatial_dims: int, in_channels: int, num_classes: int, bn_momentum: float = 0.1) -> nn.Module:
        return build_efficientnet_lite0(spatial_dims, in_channels, num_classes, bn_momentum, variant=variant)

    build.__name__ = f"build_efficientnet_{variant}"
    return build


#: Lite stages for ``last_stages``: the seven block stages, the last one with the 1x1 head conv
LITE_STAGES: tuple[str | tuple[str, ...], ...] = (
    ("_conv_stem.", "_bn0."),
    *(f"_blocks.{i}." for i in range(6)),
    ("_blocks.6.", "_conv_head.", "_bn1."),
)

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        *(
            Architecture(
                f"efficientnet_{v}", _lite_builder(v), "_conv_stem.weight", ("_fc.",), (2, 3), stages=LITE_STAGES,
                size_multiple=32,  # the static "same" padding is exact for multiples of 32
            )
            for v in LITE_BLOCKS
        ),
        # torchvision's ImageNet nets downsample 32x (DenseNet's last transition pool needs 2 pixels left)
        Architecture("resnet18", _torchvision_builder("resnet18"), "conv1.weight", ("fc.",), size_multiple=32),
        Architecture("resnet50", _torchvision_builder("resnet50"), "conv1.weight", ("fc.",), size_multiple=32),
        Architecture(
            "densenet121", _torchvision_builder("densenet121"), "features.conv0.weight", ("classifier.",),
            size_multiple=32,
        ),
        Architecture("tiny_cnn", build_tiny_cnn, "0.weight", ("8.",), (2, 3)),
        Architecture(
            "tiny_unet",
            build_tiny_unet,
            "model.0.conv.unit0.conv.weight",
            ("model.2.",),
            (2, 3),
            fully_convolutional=True,
            task="segmentation",
            size_multiple=4,
        ),
    ]
}


def register_architecture(arch: Architecture) -> Architecture:
    """Add an architecture to the registry; a name registered twice raises (as torchvision's models)."""
    if arch.name in ARCHITECTURES:
        raise MedTuneError(f"architecture {arch.name!r} is already registered")
    ARCHITECTURES[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    """Look up an architecture by name (clear error listing the known ones)."""
    if name not in ARCHITECTURES:
        raise MedTuneError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]
