"""Thin functions the MONAI bundle configs call (``$medtune.finetune.bundle_glue.xxx(...)``).

They keep the configs declarative: reading the dataset contract, subsetting labels, picking
normalization from the pretrained source, class weights for imbalanced data.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from medtune.data.contract import load_datalist, read_dataset_json
from medtune.weights import get_source


def bundle_root() -> str:
    """Folder of the MONAI bundle shipped with MedTune (``monai_bundle/`` in the source tree)."""
    import medtune.bundle

    return str(Path(medtune.bundle.__file__).resolve().parent)


def dataset_info(dataset_dir: str) -> dict[str, Any]:
    """``dataset.json`` of a dataset folder, with ``num_classes`` added."""
    info = dict(read_dataset_json(dataset_dir))
    info["num_classes"] = len(info["labels"])
    return info


def datalist(dataset_dir: str, split: str = "training", fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """Entries of one split with absolute paths; ``fraction`` < 1 keeps a class-stratified subset."""
    return label_subset(load_datalist(dataset_dir, split), fraction, seed)


def label_subset(items: list[dict], fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """A class-stratified, seeded subset of ``fraction`` of ``items`` (all of them when ``fraction >= 1``)."""
    items = list(items)
    if fraction >= 1.0:
        return items
    rng = random.Random(seed)
    by_class: dict[Any, list[dict]] = {}
    for item in items:
        key = item.get("label") if isinstance(item.get("label"), int) else None  # classes; masks: one group
        by_class.setdefault(key, []).append(item)
    subset: list[dict] = []
    for key in sorted(by_class, key=str):
        group = by_class[key]
        rng.shuffle(group)
        subset.extend(group[: max(1, round(len(group) * fraction))])
    rng.shuffle(subset)
    return subset


def class_weights(
    items: list[dict], num_classes: int, enabled: bool = True, device: str | torch.device = "cpu"
) -> torch.Tensor | None:
    """Inverse-frequency class weights (mean 1) for a cross-entropy loss, on ``device``; ``None`` when disabled.

    (MONAI's trainer does not move the loss function to the device, so the weights must start there.)
    """
    if not enabled:
        return None
    counts = Counter(int(i["label"]) for i in items)
    freq = torch.tensor([max(1, counts.get(c, 0)) for c in range(num_classes)], dtype=torch.float32)
    w = freq.sum() / (num_classes * freq)
    return (w / w.mean()).to(device)


def epoch_length(loader_length: int, epochs: int, min_train_steps: int = 0) -> int | None:
    """Optimizer steps per epoch (the trainer's ``epoch_length``): ``None`` (one pass over the training loader,
    ignite's default) unless ``epochs`` passes make fewer than ``min_train_steps`` steps; then the epoch is
    lengthened to ``ceil(min_train_steps / epochs)`` steps: ignite restarts the loader within the epoch, each pass
    reshuffled with new random patches and augmentations (nnU-Net's fixed iterations per epoch, as a floor).

    The cosine schedule and validation stay per epoch; a full dataset that already makes enough steps is untouched.
    """
    if min_train_steps < 0 or epochs < 1:
        raise ValueError(f"min_train_steps must be >= 0 and epochs >= 1 (got {min_train_steps}, {epochs})")
    if loader_length < 1 or loader_length * epochs >= min_train_steps:
        return None
    return max(loader_length, -(-min_train_steps // epochs))


def norm_stats(pretrained: str | None, in_channels: int) -> dict[str, list[float]]:
    """Input normalization the pretrained source expects, per input channel.

    One-channel scans go through summed RGB stem filters, so they use the mean of the RGB statistics.
    Training from scratch uses mean 0.5 / std 0.5 on [0, 1]-scaled images.
    """
    source = get_source(pretrained)
    if source is None or source.in_channels == 0:
        mean, std = [0.5] * 3, [0.5] * 3
    else:
        mean, std = list(source.mean), list(source.std)
    if in_channels == len(mean):
        return {"mean": mean, "std": std}
    m, s = sum(mean) / len(mean), sum(std) / len(std)
    return {"mean": [m] * in_channels, "std": [s] * in_channels}


def pretrained_metadata(pretrained: str | None) -> dict[str, Any] | None:
    """Metadata of the pretrained source (for run.json and the model sidecar)."""
    source = get_source(pretrained)
    return None if source is None else source.metadata()


def classification_preprocessing_spec(in_channels: int, image_size: list[int], norm: dict) -> list[dict]:
    """The deterministic preprocessing of a 2D classifier, as the sidecar's op list (docs/formats.md §4).

    The bundle's evaluation transforms are built from the same config values; a test checks they agree.
    """
    return [
        {"op": "channels", "n": int(in_channels)},
        {"op": "resize", "spatial_size": [int(s) for s in image_size], "mode": "bilinear"},
        {"op": "scale_intensity", "minv": 0.0, "maxv": 1.0},
        {"op": "normalize", "mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]},
    ]


def class_names(info: dict[str, Any]) -> list[str]:
    """Class names ordered by label value."""
    labels = info["labels"]
    return [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))]


def data_warning(info: dict[str, Any]) -> str | None:
    """The loud banner for reports made on project-generated (synthetic) data."""
    if info.get("synthetic"):
        return (
            "SYNTHETIC DATA: this dataset was generated by MedTune, not acquired from patients. "
            "The numbers show the pipeline works; they say nothing about clinical performance."
        )
    return None


def unlabeled_datalist(
    dataset_dir: str, splits: tuple[str, ...] | list[str] = ("training", "validation", "testing", "unlabeled")
) -> list[dict]:
    """Every image of the dataset's ``splits`` (labels dropped) for self-supervised pretraining."""
    from medtune.data.contract import entry_path, read_datalist

    seen: set[str] = set()
    out: list[dict] = []
    for split in splits:
        entries = read_datalist(dataset_dir).get(split) or []
        for i, entry in enumerate(entries):
            rel = entry.get("image") if isinstance(entry, dict) else entry
            path = str(entry_path(dataset_dir, rel, f"{split}[{i}].image").resolve())
            if path not in seen:
                seen.add(path)
                out.append({"image": path})
    return out


def input_spec(
    pretrained: str | None,
    preset_input: dict[str, Any],
    intensity: Any = "auto",
    ct_window: Any = "auto",
    spacing: Any = "auto",
) -> dict[str, Any]:
    """The 3D presets' input settings: the pretrained source owns them (its ``preprocessing``).

    ``"auto"`` (the preset default) takes the source's intensity / CT window / spacing, else ``preset_input``'s;
    any other value is the user's override, used as given, with a warning on stderr when the source was
    trained with something else. Scratch runs (no source) use ``preset_input`` for ``"auto"``.
    """
    import sys

    from medtune.weights.sources import resolve_input

    source = get_source(pretrained)
    spec, warnings = resolve_input(
        source, {"intensity": intensity, "ct_window": ct_window, "spacing": spacing}, preset_input
    )
    for text in warnings:
        print(f"warning: {text}", file=sys.stderr)
    spec["warnings"] = warnings
    spec["source"] = None if source is None else source.name
    spec["norm"] = volume_norm(source, spec.get("intensity"))
    return spec


#: intensity presets whose output is [0, 1], the range a source's mean / std are stated for
UNIT_RANGE_INTENSITIES = ("ct", "minmax")


def volume_norm(source: Any, intensity: Any) -> dict[str, float]:
    """``{"mean", "std"}`` a 3D preset applies after its intensity preset: the source's own statistics (2D
    ImageNet weights inflated to 3D expect ``(x - 0.5) / 0.5`` on [0, 1], as the 2D presets apply them) when the
    preset scales to [0, 1] (ct, minmax); identity for scratch, local checkpoints (statistics unknown), 3D sources
    that state none (mean 0 / std 1) and z-scored or raw intensities."""
    if source is None or source.in_channels == 0 or source.spatial_dims != 3 or intensity not in UNIT_RANGE_INTENSITIES:
        return {"mean": 0.0, "std": 1.0}
    mean, std = source.grey_mean_std()
    return {"mean": float(mean), "std": float(std)}

# the 3D presets call these by name in their configs
import medtune.finetune.feature_cache  # noqa: E402,F401
import medtune.finetune.roi  # noqa: E402,F401
