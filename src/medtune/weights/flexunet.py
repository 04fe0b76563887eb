"""U-Net with the ImageNet EfficientNet-Lite0 encoder (2D, or 3D through inflation), on MONAI's FlexibleUNet.

MONAI provides the whole network: ``FlexibleUNet`` (decoder, segmentation head), its encoder registry
``FLEXUNET_BACKBONE`` and the ``EfficientNet`` the encoder is built from. Written here by hand:

- :class:`EfficientNetLite0Encoder`, registered as backbone ``"efficientnet-lite0"``. MONAI's
  ``EfficientNetEncoder`` hard-codes the B0..B7/L2 block strings with squeeze-excitation and swish; Lite0
  needs other block strings (no SE), ReLU6 and no classification head, so the encoder subclasses MONAI's
  ``EfficientNet`` with the Lite0 blocks and reuses ``EfficientNetBNFeatures.forward`` (the 5 feature maps
  at 1/2 .. 1/32 that FlexibleUNet expects, channels 16, 24, 40, 112, 320).
- the key mapping of the package's ``efficientnet_pytorch`` state dict into ``encoder.`` + MONAI nesting
  (the package is the only offline ImageNet checkpoint; MONAI's own loader downloads B0..B7 only).

The Lite0 classification head (``_conv_head``, ``_bn1``, ``_fc``) is not part of the encoder: its 8
tensors are reported as unexpected (unused) and named in the report's notes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from monai.networks.blocks import BaseEncoder
from monai.networks.nets import EfficientNet, EfficientNetBNFeatures, FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import Tensor, nn

from medtune.weights.architectures import (
    LITE0_BLOCKS,
    Architecture,
    _scriptable_without_se,
    _swap_swish_for_relu6,
    register_architecture,
)
from medtune.weights.inflation import inflate_state_dict
from medtune.weights.loading import StateDict, load_with_report
from medtune.weights.sources import (
    SOURCES,
    PretrainedSource,
    _lite0_package_state,
    efficientnet_pytorch_to_monai,
    register_source,
)

BACKBONE = "efficientnet-lite0"
ENCODER_PREFIX = "encoder."
LITE0_HEAD_KEYS = ("_conv_head.", "_bn1.", "_fc.")
# narrow decoder for 3D on CPU (the default (256, 128, 64, 32, 16) is MONAI's 2D-sized one): see build_flexunet_lite0
FAST_DECODER_CHANNELS = (128, 64, 32, 16, 8)


def _triple(values: tuple[int, ...]) -> tuple[int, int, int]:
    """A Conv3d geometry field (stored as ``tuple[int, ...]``) as the 3-tuple its constructor takes."""
    a, b, c = values
    return a, b, c


class DepthwiseConv3dByTaps(nn.Conv3d):
    """Depthwise ``nn.Conv3d`` (``groups == in == out channels``) computed as a sum of 2D depthwise convs.

    Why by hand: on CPU, PyTorch's depthwise ``Conv3d`` *backward* has no fast kernel: it is ~10x the forward
    (8x32x18x26x18 input, 3x3x3 kernel, 1 thread: forward 12 ms, backward ~190 ms) and costs the same with
    oneDNN disabled. Configuration does not fix it (``torch.backends.mkldnn`` off: forward 14x slower, backward
    the same; ``channels_last_3d``: faster on large maps, 2-10x slower on the deep ones). Writing the 3D kernel
    as ``kD`` depthwise 2D convs over depth slices (``y[d] = sum_t conv2d(x[d*s + t], w[:, :, t])``) keeps
    autograd on PyTorch's 2D depthwise kernels. Forward + backward, 8 patches of 32x48x32, 1 thread, CPU ms:
    C=32 at 18x26x18 185 -> 69, C=144 at 10x14x10 88 -> 46, C=240 at 8x10x8 97 -> 83; at the deepest maps the
    3D kernel wins (C=1152 at 5x5x5: 32 vs 58), so inputs under ``min_voxels`` voxels per channel keep it.
    Seven representative Lite0 layers: 707 -> 516 ms. (One grouped conv2d over depth-unfolded taps was
    tried too: 1259 ms.) The gain on a whole training step is modest (~10%): the decoder dominates.

    Same parameters and state-dict keys as ``nn.Conv3d`` (inflated ImageNet weights load unchanged) and the
    same function: tests compare forward and gradients with ``nn.Conv3d`` to 1e-5. Only the layout MONAI's
    EfficientNet uses (``padding=0`` - it pads with a separate layer -, ``dilation=1``, zeros padding mode) is
    computed by taps, and only when a gradient will be needed; anything else (inference, ONNX export, other
    layouts, small maps) is ``nn.Conv3d.forward``, whose forward is the fast one. The depth axis is the first
    spatial axis of the tensor here (the decomposition is exact whichever axis is chosen).
    """

    min_voxels = 512

    @classmethod
    def from_conv(cls, conv: nn.Conv3d) -> DepthwiseConv3dByTaps:
        new = cls(
            conv.in_channels,
            conv.out_channels,
            _triple(conv.kernel_size),
            stride=_triple(conv.stride),
            padding=conv.padding if isinstance(conv.padding, str) else _triple(conv.padding),
            dilation=_triple(conv.dilation),
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        new.load_state_dict(conv.state_dict())
        return new.to(conv.weight.device, conv.weight.dtype)

    def _by_taps(self) -> bool:
        return (
            self.groups == self.in_channels == self.out_channels
            and self.padding == (0, 0, 0)
            and self.dilation == (1, 1, 1)
            and self.padding_mode == "zeros"
        )

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript (bundle models/model.ts): the plain Conv3d forward
            return self._conv_forward(x, self.weight, self.bias)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        small = x.dim() != 5 or x.shape[2] * x.shape[3] * x.shape[4] < self.min_voxels
        if not needs_grad or exporting or small or not self._by_taps():
            return super().forward(x)  # inference and export: the oneDNN forward is the faster one
        b, c, d, h, w = x.shape
        kd, sd = self.kernel_size[0], self.stride[0]
        d_out = (d - kd) // sd + 1
        out: Tensor | None = None
        for t in range(kd):
            xs = x[:, :, t : t + sd * (d_out - 1) + 1 : sd].transpose(1, 2).reshape(b * d_out, c, h, w)
            y = F.conv2d(xs, self.weight[:, :, t], None, self.stride[1:], 0, 1, c)
            out = y if out is None else out + y
        assert out is not None
        out = out.reshape(b, d_out, c, *out.shape[-2:]).transpose(1, 2)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1, 1)
        return out.contiguous()


def use_depthwise_by_taps(model: nn.Module) -> int:
    """Replace every depthwise ``nn.Conv3d`` in ``model`` by :class:`DepthwiseConv3dByTaps`; returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Conv3d:
                continue
            if child.groups > 1 and child.groups == child.in_channels == child.out_channels:
                setattr(parent, name, DepthwiseConv3dByTaps.from_conv(child))
                n += 1
    return n


__all__ = [
    "BACKBONE",
    "DepthwiseConv3dByTaps",
    "EfficientNetLite0Encoder",
    "FAST_DECODER_CHANNELS",
    "build_flexunet_lite0",
    "lite0_to_flexunet",
    "lite0_to_flexunet_inflated",
    "use_depthwise_by_taps",
]


class EfficientNetLite0Encoder(EfficientNet, BaseEncoder):
    """EfficientNet-Lite0 feature extractor for MONAI's ``FlexibleUNet`` (Lite0 blocks, ReLU6, no SE, no head).

    ``pretrained=True`` loads the offline ImageNet Lite0 package weights (inflated, center mode, in 3D), the
    way MONAI's own encoders load theirs; :func:`medtune.weights.create_model` loads them with a report instead.
    Static "same" padding from ``image_size=224``: exact TF padding for inputs whose sizes are multiples of 32.
    """

    backbone_names = [BACKBONE]

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        pretrained: bool = False,
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
        drop_connect_rate: float = 0.2,
        image_size: int = 224,
    ) -> None:
        super().__init__(
            LITE0_BLOCKS,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=1,
            width_coefficient=1.0,
            depth_coefficient=1.0,
            image_size=image_size,
            norm=norm,
            drop_connect_rate=drop_connect_rate,
        )
        for name in ("_conv_head", "_conv_head_padding", "_bn1", "_avg_pooling", "_dropout", "_fc"):
            delattr(self, name)
        _scriptable_without_se(_swap_swish_for_relu6(self))  # torch.jit.script-able (bundle models/model.ts)
        if pretrained:
            def flt(s: StateDict, m: nn.Module) -> StateDict | tuple[StateDict, list[str]]:
                mapped = efficientnet_pytorch_to_monai(s, m)
                return inflate_state_dict(mapped, m, mode="center") if spatial_dims == 3 else mapped

            self.load_report = load_with_report(
                self, _lite0_package_state(), BACKBONE, stem_key="_conv_stem.weight", filter_fn=flt
            )

    # the 5 multi-scale feature maps, exactly as MONAI's EfficientNet encoders return them
    forward = EfficientNetBNFeatures.forward

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"spatial_dims": 2, "in_channels": 3, "pretrained": False}]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [(16, 24, 40, 112, 320)]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return cls.backbone_names


FLEXUNET_BACKBONE.register_class(EfficientNetLite0Encoder)


def build_flexunet_lite0(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    depthwise_by_taps: bool = True,
    **kwargs,
) -> nn.Module:
    """MONAI ``FlexibleUNet`` on the Lite0 encoder; ``num_classes`` output channels, same spatial size as input.

    Further keyword arguments go to ``FlexibleUNet`` (``norm``, ``act``, ``dropout``, ``upsample``, ``is_pad``...).
    In 3D, ``depthwise_by_taps`` swaps the encoder's depthwise convs for :class:`DepthwiseConv3dByTaps` (same
    weights and function; their forward + backward up to ~2.5x faster on CPU, a training step ~10% less). For 3D on
    CPU, ``decoder_channels=FAST_DECODER_CHANNELS`` is the cheaper decoder: with the default one, the dense 3x3x3
    convs at full and half resolution (decoder's last stages and head) cost more than the whole encoder.
    Measured at 8 patches of 32x48x32, 1 thread, CPU s per training step: no taps + default decoder ~3.0,
    taps ~2.4, taps + fast decoder ~2.2 (MONAI UNet of the Model Zoo, ``unet_zoo``: ~0.5). On a shared CPU, use
    1 torch thread: 2 OpenMP threads competing with other processes were 2-10x slower per step.
    """
    model = FlexibleUNet(
        in_channels=in_channels,
        out_channels=num_classes,
        backbone=BACKBONE,
        pretrained=False,
        decoder_channels=tuple(decoder_channels),
        spatial_dims=spatial_dims,
        **kwargs,
    )
    if spatial_dims == 3 and depthwise_by_taps:
        use_depthwise_by_taps(model)
    return model


def lite0_to_flexunet(state: StateDict, model: nn.Module) -> tuple[StateDict, list[str]]:
    """Map the package's Lite0 keys into the FlexibleUNet encoder (``encoder.`` + MONAI block nesting).

    Keys without a place in the encoder (the classification head) keep their names: reported as unexpected.
    """
    encoder = cast(nn.Module, model.encoder)  # FlexibleUNet's encoder module
    mapped = efficientnet_pytorch_to_monai(state, encoder)
    enc_keys = set(encoder.state_dict())
    out = {(ENCODER_PREFIX + k if k in enc_keys else k): v for k, v in mapped.items()}
    head = [k for k in out if k.startswith(LITE0_HEAD_KEYS)]
    notes = [f"Lite0 classification head not used by the encoder ({len(head)} tensors: _conv_head, _bn1, _fc)"]
    return out, notes if head else []


def lite0_to_flexunet_inflated(state: StateDict, model: nn.Module) -> tuple[StateDict, list[str]]:
    """:func:`lite0_to_flexunet`, then the encoder's 2D kernels inflated to 3D (center mode)."""
    mapped, notes = lite0_to_flexunet(state, model)
    inflated, more = inflate_state_dict(mapped, model, mode="center")
    return inflated, more + notes


def _register() -> None:
    register_architecture(
        Architecture(
            name="flexunet_lite0",
            build=build_flexunet_lite0,
            stem_key=ENCODER_PREFIX + "_conv_stem.weight",
            head_prefixes=("decoder.", "segmentation_head."),
            spatial_dims=(2, 3),
            fully_convolutional=True,
            task="segmentation",
            description="MONAI FlexibleUNet with an EfficientNet-Lite0 encoder (ReLU6, no SE); sizes multiples of 32",
            size_multiple=32,
            small_kwargs={"decoder_channels": FAST_DECODER_CHANNELS},
        )
    )
    lite0 = SOURCES["imagenet-efficientnet-lite0"]
    common: dict[str, Any] = dict(
        arch="flexunet_lite0",
        license=lite0.license,
        mean=lite0.mean,
        std=lite0.std,
        key_format=lite0.key_format,
        loader=_lite0_package_state,
        package_module=lite0.package_module,
        num_params=lite0.num_params,
    )
    register_source(
        PretrainedSource(
            name="imagenet-flexunet-lite0",
            origin=lite0.origin + ", encoder only",
            description="ImageNet-1k EfficientNet-Lite0 as the FlexibleUNet encoder; decoder and head start fresh",
            spatial_dims=2,
            filter_fn=lite0_to_flexunet,
            **common,
        )
    )
    register_source(
        PretrainedSource(
            name="imagenet-flexunet-lite0-inflated",
            origin=lite0.origin + ", encoder only, 2D kernels inflated to 3D",
            description="ImageNet-1k EfficientNet-Lite0 inflated to 3D (center) as the 3D FlexibleUNet encoder; "
            "decoder and head start fresh; depth last, sizes multiples of 32",
            input_size=(224, 224, 32),
            spatial_dims=3,
            filter_fn=lite0_to_flexunet_inflated,
            **common,
        )
    )


_register()
