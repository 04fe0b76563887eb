"""3D networks and their pretrained sources: MONAI Model Zoo bundles, SwinUNETR self-supervised, MedicalNet.

Registered on import (``medtune.weights`` imports this module):

- architectures ``unet_zoo`` (the Model Zoo ``spleen_ct_segmentation`` UNet), ``swinunetr``, ``segresnet``,
  ``resnet10_3d`` / ``resnet18_3d`` / ``resnet50_3d`` (MONAI ``ResNet`` laid out as MedicalNet's);
- sources ``monai-zoo-spleen-ct``, ``swinunetr-ssl``, ``medicalnet-resnet10`` / ``-resnet18`` / ``-resnet50``;
- spec prefixes ``zoo:PATH``, ``swinunetr-ssl:PATH``, ``medicalnet:PATH`` (:data:`PREFIX_RESOLVERS`).

MONAI's own code does the work where it fits: the network classes, ``monai.bundle.download``,
``monai.apps.download_url``, ``get_pretrained_resnet_medicalnet`` / ``get_medicalnet_pretrained_resnet_args``
and ``filter_swinunetr``. Written by hand, because MONAI has no helper for it: the SwinUNETR key
normalization for the variants MONAI's ``filter_swinunetr`` does not cover (``swin_vit.``, bare encoder keys,
``fc1``/``fc2``, ``layers.N.``), the download-cache checks (so a cached file is used offline) and the one-line
errors naming the file to provide when a download fails. Every download lands in (or is read from) the torch
hub directory (``$TORCH_HOME``), the same place MONAI and torchvision use by default.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtune.errors import MedTuneError, one_line
from medtune.weights.architectures import Architecture, register_architecture
from medtune.weights.loading import StateDict, read_checkpoint, unwrap_state_dict
from medtune.weights.sources import PretrainedSource, ct_preprocessing, register_source

# --- architectures ------------------------------------------------------------------------------------

#: the Model Zoo spleen bundle's network_def (configs/inference.json)
ZOO_UNET_CHANNELS = (16, 32, 64, 128, 256)
ZOO_UNET_STRIDES = (2, 2, 2, 2)
#: MONAI's UNet is ``model.0`` (first down block), ``model.1`` (the nested skip levels), ``model.2`` (last up
#: block: transposed conv to num_classes + a conv). ``model.0`` sees the input twice: its first conv and its
#: residual conv, so both are adapted when the input channels change.
UNET_STEM_KEYS = ("model.0.conv.unit0.conv.weight", "model.0.residual.weight")
UNET_HEAD = ("model.2.",)
#: SwinUNETR sees the input in its patch embedding and in the CNN block ``encoder1`` (conv1 and 1x1 residual conv3)
SWINUNETR_STEM_KEYS = (
    "swinViT.patch_embed.proj.weight",
    "encoder1.layer.conv1.conv.weight",
    "encoder1.layer.conv3.conv.weight",
)
#: SwinUNETR's CNN decoder: the residual blocks on the skip paths (``encoder1``-``4``, ``encoder10``) and the up
#: blocks (``decoder5``-``1``). None of it is in a self-supervised (``swinViT``-only) checkpoint.
SWINUNETR_DECODER_BLOCKS = (
    "encoder1",
    "encoder2",
    "encoder3",
    "encoder4",
    "encoder10",
    "decoder5",
    "decoder4",
    "decoder3",
    "decoder2",
    "decoder1",
)
#: the part of SwinUNETR a linear probe trains and a new task may re-initialize: the whole CNN decoder and the
#: 1x1x1 output conv ``out``, so the probe measures the (frozen) Swin encoder's features. Training ``out``
#: alone would map 48 features of a randomly initialized, frozen decoder to classes: not what users mean.
SWINUNETR_HEAD = tuple(f"{b}." for b in SWINUNETR_DECODER_BLOCKS) + ("out.",)


def build_unet_zoo(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    channels: tuple[int, ...] = ZOO_UNET_CHANNELS,
    strides: tuple[int, ...] = ZOO_UNET_STRIDES,
    num_res_units: int = 2,
    norm: str | tuple = "batch",
    **kwargs: Any,
) -> nn.Module:
    """MONAI ``UNet`` exactly as in the Model Zoo ``spleen_ct_segmentation`` bundle (2D or 3D)."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=norm,
        **kwargs,
    )


def build_swinunetr(
    spatial_dims: int, in_channels: int, num_classes: int, feature_size: int = 48, **kwargs: Any
) -> nn.Module:
    """MONAI ``SwinUNETR`` (feature_size 48 matches the self-supervised weights). Needs ``einops``."""
    from monai.networks.nets import SwinUNETR
    from monai.utils import optional_import

    if not optional_import("einops")[1]:
        raise MedTuneError("SwinUNETR needs the einops package: pip install einops")
    kwargs.pop("img_size", None)  # removed from MONAI's signature; old bundle configs still pass it
    kwargs.setdefault("use_checkpoint", False)
    return SwinUNETR(
        in_channels=in_channels,
        out_channels=num_classes,
        feature_size=feature_size,
        spatial_dims=spatial_dims,
        **kwargs,
    )


def build_segresnet(
    spatial_dims: int, in_channels: int, num_classes: int, init_filters: int = 16, **kwargs: Any
) -> nn.Module:
    """MONAI ``SegResNet`` (2D or 3D)."""
    from monai.networks.nets import SegResNet

    return SegResNet(
        spatial_dims=spatial_dims,
        init_filters=init_filters,
        in_channels=in_channels,
        out_channels=num_classes,
        **kwargs,
    )


def medicalnet_resnet_builder(depth: int) -> Callable[..., nn.Module]:
    """A builder of MONAI's ``ResNet`` of ``depth`` laid out as MedicalNet's, so its checkpoints fit.

    Block type and layer counts come from MONAI's ``resnet_params``, shortcut type and downsample bias from
    ``get_medicalnet_pretrained_resnet_args``; the stem is MedicalNet's 7^3 conv with stride 2. (MedicalNet's
    own networks dilate layers 3-4 instead of striding them; the tensors are the same.) ``kwargs`` override
    any of these, e.g. ``widen_factor``.
    """

    def build(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
        from monai.networks.nets import ResNet
        from monai.networks.nets.resnet import get_inplanes, get_medicalnet_pretrained_resnet_args, resnet_params

        block, layers = resnet_params[f"resnet{depth}"][:2]
        bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
        options: dict[str, Any] = {
            "conv1_t_size": 7,
            "conv1_t_stride": 2,
            "shortcut_type": shortcut_type,
            "bias_downsample": bias_downsample,
        }
        options.update(kwargs)
        net = ResNet(
            block,
            list(layers),
            get_inplanes(),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=num_classes,
            **options,
        )
        return exportable_shortcuts(net)

    build.__name__ = f"build_resnet{depth}_3d"
    return build


class PadShortcut(nn.Module):
    """MONAI ResNet's shortcut ``A`` (``ResNet._downsample_basic_block``: strided identity, zero channels appended,
    no gradient through it, as MONAI's ``.data`` does) as a module. MONAI stores it as a ``functools.partial``, which
    TorchScript cannot compile (bundle ``models/model.ts``), whose ``.data`` read a trace freezes into a constant, and
    whose zeros are built with the traced batch size (an ONNX export then failed at any other batch; found by the
    registry walk). Same outputs and gradients; no parameters, so the state dict is unchanged."""

    def __init__(self, planes: int, stride: int, spatial_dims: int) -> None:
        super().__init__()
        from monai.networks.layers.factories import Pool

        self.planes, self.stride, self.spatial_dims = planes, stride, spatial_dims
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=1, stride=stride)  # = MONAI's strided identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(x).detach()
        pad = [0] * (2 * self.spatial_dims) + [0, self.planes - out.shape[1]]  # channels last in F.pad's order
        return torch.nn.functional.pad(out, pad)


def exportable_shortcuts(net: nn.Module) -> nn.Module:
    """Replace every shortcut-``A`` downsample of a MONAI ``ResNet`` by :class:`PadShortcut`."""
    for block in net.modules():
        fn = getattr(block, "downsample", None)
        if isinstance(fn, functools.partial) and getattr(fn.func, "__name__", "") == "_downsample_basic_block":
            kw = fn.keywords
            block.downsample = PadShortcut(int(kw["planes"]), int(kw["stride"]), int(kw.get("spatial_dims", 3)))
    return net


register_architecture(
    Architecture(
        "unet_zoo",
        build_unet_zoo,
        UNET_STEM_KEYS,  # two convs see the input (see UNET_STEM_KEYS)
        UNET_HEAD,
        spatial_dims=(2, 3),
        fully_convolutional=True,
        task="segmentation",
        description="MONAI UNet (16-32-64-128-256, 2 residual units, batch norm) of the Model Zoo spleen bundle",
        size_multiple=16,  # four stride-2 levels
        small_kwargs={"channels": (4, 8, 16, 32, 64)},
    )
)
register_architecture(
    Architecture(
        "swinunetr",
        build_swinunetr,
        SWINUNETR_STEM_KEYS,
        SWINUNETR_HEAD,
        spatial_dims=(3,),
        fully_convolutional=True,
        task="segmentation",
        description="MONAI SwinUNETR (Swin transformer encoder, CNN decoder); input sides divisible by 32",
        size_multiple=32,
        min_input=(64, 32, 32),  # at 32^3 the bottleneck is one voxel, which instance norm refuses
        export_fixed_size=True,  # the graph bakes in its window count: exported for its ROI only
        small_kwargs={"feature_size": 12},
        key_filter=lambda state, model: swinunetr_keys(state, model),  # defined below
    )
)
register_architecture(
    Architecture(
        "segresnet",
        build_segresnet,
        "convInit.conv.weight",
        ("conv_final.",),
        spatial_dims=(2, 3),
        fully_convolutional=True,
        task="segmentation",
        description="MONAI SegResNet (init_filters 16); input sides divisible by 8",
        size_multiple=8,
        small_kwargs={"init_filters": 8},
    )
)
for _depth in (10, 18, 50):
    register_architecture(
        Architecture(
            f"resnet{_depth}_3d",
            medicalnet_resnet_builder(_depth),
            "conv1.weight",
            ("fc.",),
            spatial_dims=(3,),
            task="classification",
            description=f"MONAI 3D ResNet-{_depth} in MedicalNet's layout (fits MedicalNet checkpoints)",
            small_kwargs={"widen_factor": 0.125},
        )
    )


# --- where downloads go -------------------------------------------------------------------------------


def hub_dir() -> Path:
    """The torch hub directory (``$TORCH_HOME/hub``): MONAI's default bundle dir and torchvision's cache."""
    import torch.hub

    return Path(torch.hub.get_dir())


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc, 160)}" if str(exc).strip() else type(exc).__name__


def _require_file(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise MedTuneError(f"{what} not found; {hint}", path)
    return path


# --- MONAI Model Zoo bundles ----------------------------------------------------------------------------

SPLEEN_BUNDLE = "spleen_ct_segmentation"


def bundle_weights_file(path: str | Path) -> Path:
    """``models/model.pt`` of a bundle folder (or the file itself); one-line error if absent."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in ("models/model.pt", "model.pt"):
            if (path / candidate).is_file():
                return path / candidate
        extra = " (it has models/model.ts: TorchScript is not read; use the bundle's model.pt)"
        hint = extra if (path / "models" / "model.ts").is_file() else ""
        raise MedTuneError(f"bundle folder has no models/model.pt{hint}", path)
    return _require_file(path, "bundle weights file", "give a bundle folder or its models/model.pt")


def _bundle_metadata(weights_file: Path) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` next to ``models/model.pt`` (empty when absent or unreadable)."""
    from medtune.untrusted import refuse_expressions

    meta = weights_file.parent.parent / "configs" / "metadata.json"
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    refuse_expressions(data, meta)  # a bundle handed to MedTune is data; its configs are never parsed
    return data if isinstance(data, dict) else {}


def download_bundle_weights(name: str, bundle_dir: str | Path | None = None) -> Path:
    """``<bundle_dir>/<name>/models/model.pt``, downloaded with ``monai.bundle.download`` when not there yet.

    ``bundle_dir`` defaults to MONAI's own default (``<torch hub dir>/bundle``), so a bundle fetched earlier
    with ``python -m monai.bundle download --name NAME`` is found. Offline: one-line :class:`MedTuneError`.
    """
    import monai.bundle

    root = Path(bundle_dir).expanduser() if bundle_dir else hub_dir() / "bundle"
    weights = root / name / "models" / "model.pt"
    if not weights.is_file():
        try:
            monai.bundle.download(name=name, bundle_dir=str(root), progress=False)
        except Exception as exc:  # noqa: BLE001 - network errors of every kind become one user-facing line
            raise MedTuneError(
                f"cannot download MONAI Model Zoo bundle {name} ({_first_line(exc)}); offline, copy the bundle "
                f"folder to {root / name} or use pretrained='zoo:PATH' (bundle folder or its models/model.pt)"
            ) from exc
    return _require_file(weights, f"bundle {name} weights", "the downloaded bundle has no models/model.pt")


def _spleen_loader() -> StateDict:
    return read_checkpoint(download_bundle_weights(SPLEEN_BUNDLE))


_SPLEEN_INPUT = (
    "1-channel CT, orientation RAS, spacing 1.5x1.5x2.0 mm, HU clipped to [-57, 164] and scaled to [0, 1] "
    "(ScaleIntensityRanged); trained on 96^3 patches, sliding-window 96^3 inference; outputs background, spleen"
)
_ZOO_KEY_FORMAT = "flat MONAI state dict (models/model.pt of CheckpointSaver), 'module.' / {'model': ...} accepted"

register_source(
    PretrainedSource(
        name="monai-zoo-spleen-ct",
        arch="unet_zoo",
        origin=f"MONAI Model Zoo bundle {SPLEEN_BUNDLE} (monai.bundle.download -> models/model.pt)",
        license="Apache-2.0 (bundle); trained on MSD Task09_Spleen (CC-BY-SA 4.0)",
        description=f"3D UNet for spleen segmentation in CT. Input: {_SPLEEN_INPUT}",
        in_channels=1,
        input_size=(96, 96, 96),
        mean=(0.0,),
        std=(1.0,),
        num_classes=2,
        key_format="MONAI UNet keys (model.0.conv.unit0.conv.weight ...); " + _ZOO_KEY_FORMAT,
        spatial_dims=3,
        loader=_spleen_loader,
        preprocessing=ct_preprocessing((1.5, 1.5, 2.0), (-57, 164), (96, 96, 96)),
        training_data="MSD Task09_Spleen (CC-BY-SA 4.0)",
    )
)


def _input_note(image: dict[str, Any]) -> str:
    if not image:
        return ""
    parts = [str(image.get(k, "")) for k in ("modality", "format", "value_range", "spatial_shape")]
    return "; input: " + " ".join(p for p in parts if p)


def zoo_source(path: str | Path, arch: str | None = None) -> PretrainedSource:
    """A Model Zoo bundle on disk (``zoo:PATH``): the bundle folder or its ``models/model.pt``.

    The bundle's ``configs/metadata.json`` (when present) fills name, version, license and input spec.
    """
    weights = bundle_weights_file(path)
    meta = _bundle_metadata(weights)
    inputs = meta.get("network_data_format", {}).get("inputs", {})
    image: dict[str, Any] = next(iter(inputs.values()), {}) if isinstance(inputs, dict) else {}
    outputs = meta.get("network_data_format", {}).get("outputs", {})
    pred: dict[str, Any] = next(iter(outputs.values()), {}) if isinstance(outputs, dict) else {}
    bundle = weights.parent.parent.name if weights.parent.name == "models" else weights.parent.name
    version = meta.get("version", "unknown version")
    shape = image.get("spatial_shape", [])  # entries may be formulas such as "16*n"
    spatial = tuple(shape) if shape and all(isinstance(s, int) for s in shape) else ()
    return PretrainedSource(
        name=f"zoo:{weights}",
        arch=arch,
        origin=f"MONAI Model Zoo bundle {meta.get('name', bundle)} {version} at {weights}",
        license=str(meta.get("license", meta.get("copyright", "as stated by the bundle (see its LICENSE)"))),
        description=str(meta.get("description", "MONAI bundle checkpoint")) + _input_note(image),
        in_channels=int(image.get("num_channels", 0) or 0),
        input_size=spatial or (0,),
        mean=(0.0,),
        std=(1.0,),
        num_classes=int(pred.get("num_channels", 0) or 0),
        key_format=_ZOO_KEY_FORMAT,
        spatial_dims=len(shape) if len(shape) in (2, 3) else 3,
        loader=lambda: read_checkpoint(weights),
        filter_fn=_key_filter(arch),
    )


def _key_filter(arch: str | None) -> Callable[..., Any] | None:
    """The architecture's own checkpoint key normalization (``Architecture.key_filter``), if it declares one."""
    from medtune.weights.architectures import ARCHITECTURES

    spec = ARCHITECTURES.get(arch or "")
    return spec.key_filter if spec is not None else None


# --- SwinUNETR self-supervised encoder ------------------------------------------------------------------

SWINUNETR_SSL_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt"
SWINUNETR_SSL_FILE = "model_swinvit.pt"
#: SHA-256 of the released file: none is published with it (MONAI's test-data list has no entry for it) and the
#: file cannot be fetched here to compute one; once set, MONAI's ``download_url`` checks the download and the cache
SWINUNETR_SSL_SHA256 = ""

_MODULE = re.compile(r"^module\.")
_SWIN_VIT = re.compile(r"^swin_vit\.")
_SWIN_LAYERS = re.compile(r"^(?:swinViT\.)?layers\.(\d)\.")
_BARE_ENCODER = re.compile(r"^(patch_embed|layers[1-4])\.")
_MLP_FC = re.compile(r"\.mlp\.fc([12])\.")


def swinunetr_key(key: str) -> str:
    """One checkpoint key in SwinUNETR naming (``swinViT.layersN.0.blocks.M.mlp.linear1.weight``).

    Handles the variants met in the wild: ``module.`` (DDP), ``swin_vit.`` (SSL pretraining's ``SSLHead``),
    bare encoder keys without ``swinViT.`` (the released ``model_swinvit.pt``), ``mlp.fc1``/``fc2`` (the released
    file; MONAI's MLP names them ``linear1``/``linear2``) and the original Swin ``layers.N.`` (= ``layersN+1.0.``).
    """
    key = _MODULE.sub("", key)
    key = _SWIN_VIT.sub("swinViT.", key)
    key = _SWIN_LAYERS.sub(lambda m: f"swinViT.layers{int(m.group(1)) + 1}.0.", key)
    key = _BARE_ENCODER.sub(r"swinViT.\1.", key)
    return _MLP_FC.sub(r".mlp.linear\1.", key)


def swinunetr_keys(state: StateDict, model: nn.Module) -> tuple[StateDict, list[str]]:
    """``filter_fn`` for SwinUNETR checkpoints: rename every known key variant to MONAI's SwinUNETR naming.

    Checkpoints in the Disruptive-Autoencoders format (``encoder.*`` keys) go through MONAI's own
    ``filter_swinunetr``, which also drops their pretext-task tensors (mask token, reconstruction head). Other
    keys are renamed by :func:`swinunetr_key`; tensors of pretext heads (``rotation_head``, ``contrastive_head``,
    ``conv``) keep their names and are reported as unexpected. A ``feature_size`` mismatch gives a one-line error.
    Returns a note naming the network's blocks the checkpoint has nothing for (an encoder-only checkpoint: the
    CNN decoder), which start fresh; the report lists their tensors as re-initialized head (``SWINUNETR_HEAD``).
    """
    from monai.networks.nets.swin_unetr import filter_swinunetr

    stripped = {_MODULE.sub("", k): v for k, v in state.items()}
    out: StateDict = {}
    if any(k.startswith("encoder.") for k in stripped):
        for key, value in stripped.items():
            kept = filter_swinunetr(key, value)
            if kept is not None:
                out[swinunetr_key(kept[0])] = kept[1]
    else:
        out = {swinunetr_key(k): v for k, v in stripped.items()}
    stem = "swinViT.patch_embed.proj.weight"
    target = model.state_dict().get(stem)
    if stem in out and target is not None and out[stem].shape[0] != target.shape[0]:
        raise MedTuneError(
            f"the checkpoint's SwinUNETR has feature_size {out[stem].shape[0]}, the network {target.shape[0]}: "
            f"build swinunetr with feature_size={out[stem].shape[0]}"
        )
    return out, fresh_blocks_note(out, model, head=("out",))


def fresh_blocks_note(state: StateDict, model: nn.Module, head: tuple[str, ...] = ()) -> list[str]:
    """``["initialized fresh (not in the checkpoint): encoder1, decoder1 (N tensors)"]`` for the network's
    top-level blocks (other than ``head``) of which the checkpoint holds no tensor; ``[]`` when there are none."""
    blocks: dict[str, int] = {}
    for key in model.state_dict():
        block = key.split(".", 1)[0]
        if block not in head and not key.endswith("num_batches_tracked"):
            blocks[block] = blocks.get(block, 0) + 1
    provided = {k.split(".", 1)[0] for k in state}
    fresh = [b for b in blocks if b not in provided]
    if not fresh:
        return []
    n = sum(blocks[b] for b in fresh)
    return [f"initialized fresh (not in the checkpoint): {', '.join(fresh)} ({n} tensors)"]


def _swinunetr_ssl_loader() -> StateDict:
    from monai import apps

    path = hub_dir() / "checkpoints" / SWINUNETR_SSL_FILE
    try:
        # MONAI's download: a cached file is used as it is, and both are checked against the hash when one is known
        apps.download_url(
            SWINUNETR_SSL_URL, filepath=path, hash_val=SWINUNETR_SSL_SHA256 or None, hash_type="sha256", progress=False
        )
    except Exception as exc:  # noqa: BLE001
        raise MedTuneError(
            f"cannot download {SWINUNETR_SSL_FILE} ({_first_line(exc)}); offline, copy it to {path} or use "
            f"pretrained='swinunetr-ssl:PATH' (from {SWINUNETR_SSL_URL})"
        ) from exc
    return read_checkpoint(path)


_SSL_DESCRIPTION = (
    "Swin transformer encoder of SwinUNETR, self-supervised (inpainting, rotation, contrastive) on 5,050 CT "
    "volumes; feature_size 48. Only the encoder (swinViT.*) is loaded: the CNN decoder (encoder1-4/10, "
    "decoder1-5) and the output conv (out.*) are the head, reported re-initialized: they start fresh. "
    "Input: 1-channel CT, spacing 1.5x1.5x2.0 mm, HU [-1000, 1000] scaled to [0, 1], 96^3 crops"
)
_SSL_KEY_FORMAT = (
    "{'state_dict': {'module.layers1.0.blocks.0.mlp.fc1.weight': ...}} (no swinViT. prefix, fc1/fc2); also "
    "module.swin_vit.* (SSLHead), encoder.* (MONAI filter_swinunetr), layers.N.*"
)


def _ssl_source(name: str, origin: str, loader: Callable[[], StateDict]) -> PretrainedSource:
    return PretrainedSource(
        name=name,
        arch="swinunetr",
        origin=origin,
        license="Apache-2.0 (Project-MONAI research-contributions)",
        description=_SSL_DESCRIPTION,
        in_channels=1,
        input_size=(96, 96, 96),
        mean=(0.0,),
        std=(1.0,),
        num_classes=0,
        key_format=_SSL_KEY_FORMAT,
        spatial_dims=3,
        loader=loader,
        filter_fn=swinunetr_keys,
        preprocessing=ct_preprocessing((1.5, 1.5, 2.0), (-1000, 1000), (96, 96, 96)),
    )


register_source(
    _ssl_source(
        "swinunetr-ssl",
        f"{SWINUNETR_SSL_URL} (Project-MONAI/research-contributions SwinUNETR/Pretrain; cached in torch hub dir)",
        _swinunetr_ssl_loader,
    )
)


def swinunetr_ssl_source(path: str | Path) -> PretrainedSource:
    """SwinUNETR self-supervised encoder weights from a local file (``swinunetr-ssl:PATH``)."""
    path = Path(path).expanduser()
    return _ssl_source(f"swinunetr-ssl:{path}", str(path), lambda: read_checkpoint(path))


# --- MedicalNet 3D ResNets --------------------------------------------------------------------------------

MEDICALNET_DEPTHS = (10, 18, 50)


def medicalnet_file(depth: int) -> str:
    """The file name of MedicalNet's 23-dataset weights, e.g. ``resnet_10_23dataset.pth``."""
    return f"resnet_{depth}_23dataset.pth"


def _medicalnet_loader(depth: int) -> Callable[[], StateDict]:
    def load() -> StateDict:
        from monai.networks.nets import resnet

        cached = hub_dir() / "checkpoints" / medicalnet_file(depth)
        if cached.is_file():
            return read_checkpoint(cached)
        try:
            # MONAI's own download (Hugging Face Hub, TencentMedicalNet/MedicalNet-ResnetN)
            state = resnet.get_pretrained_resnet_medicalnet(depth, device="cpu", datasets23=True)
        except Exception as exc:  # noqa: BLE001
            raise MedTuneError(
                f"cannot download MedicalNet {medicalnet_file(depth)} ({_first_line(exc)}); offline, copy it to "
                f"{cached} or use pretrained='medicalnet:PATH' (from huggingface.co/TencentMedicalNet/"
                f"MedicalNet-Resnet{depth})"
            ) from exc
        tensors = unwrap_state_dict(state or {})
        if not tensors:
            raise MedTuneError(f"MedicalNet {medicalnet_file(depth)} holds no state dict")
        return tensors

    return load


def _medicalnet_source(name: str, depth: int | None, origin: str, loader: Callable[[], StateDict]) -> PretrainedSource:
    return PretrainedSource(
        name=name,
        arch=f"resnet{depth}_3d" if depth is not None else None,
        origin=origin,
        license="MIT (Tencent MedicalNet); trained on 23 public 3D segmentation datasets (their own terms)",
        description=(
            "MedicalNet (Med3D) 3D ResNet encoder, pretrained by multi-dataset CT/MR segmentation; no classifier "
            "(fc re-initialized). Input: 1-channel CT or MR, each volume z-scored over its non-zero voxels, e.g. "
            "56x448x448 (DxHxW)"
        ),
        in_channels=1,
        input_size=(56, 448, 448),
        mean=(0.0,),
        std=(1.0,),
        num_classes=0,
        key_format="{'state_dict': {'module.conv1.weight': ...}} (DataParallel prefix, no fc)",
        spatial_dims=3,
        loader=loader,
        preprocessing={"intensity": "mr", "channels": 1},  # z-score over non-zero voxels, as MedicalNet's
    )


for _depth in MEDICALNET_DEPTHS:
    register_source(
        _medicalnet_source(
            f"medicalnet-resnet{_depth}",
            _depth,
            f"https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{_depth} ({medicalnet_file(_depth)}), "
            "github.com/Tencent/MedicalNet; via MONAI get_pretrained_resnet_medicalnet or the torch hub cache",
            _medicalnet_loader(_depth),
        )
    )


def medicalnet_source(path: str | Path, depth: int | None = None) -> PretrainedSource:
    """MedicalNet weights from a local ``.pth`` (``medicalnet:PATH``); ``depth`` ties it to ``resnet{depth}_3d``."""
    path = Path(path).expanduser()
    return _medicalnet_source(f"medicalnet:{path}", depth, str(path), lambda: read_checkpoint(path))


def _depth_of(arch: str | None) -> int | None:
    m = re.fullmatch(r"resnet(\d+)_3d", arch or "")
    return int(m.group(1)) if m else None


#: spec prefixes resolved here; ``sources.get_source`` consults this (``zoo:PATH`` ...)
PREFIX_RESOLVERS: dict[str, Callable[[str, str | None], PretrainedSource]] = {
    "zoo:": lambda path, arch: zoo_source(path, arch),
    "swinunetr-ssl:": lambda path, arch: swinunetr_ssl_source(path),
    "medicalnet:": lambda path, arch: medicalnet_source(path, _depth_of(arch)),
}
