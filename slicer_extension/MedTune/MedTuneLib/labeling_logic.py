"""Label panel logic: pre-fill cases from the current ONNX model and order the queue most-uncertain-first.

Predictions are machine output kept next to the user's labels, never in place of them:
``predictions/<case_id>.nii.gz`` (segmentation, the image's exact geometry) or ``predictions/<case_id>.json``
(classification probabilities), and ``predictions/uncertainty.json`` =
``{"model_sha256": ..., "cases": {case_id: {"entropy": float}}}``. The entropy is the mean normalized
predictive entropy (0 certain .. 1 uniform), recomputed when the model's sha256 changes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medtune.atomic import write_json_atomic
from medtune.errors import MedTuneError

from .dataset_logic import PREDICTIONS_DIR, DatasetLogic
from .run_logic import probability_entropy

UNCERTAINTY_JSON = "uncertainty.json"
_UNCERTAINTY_LOCK = threading.Lock()  # read-merge-write of uncertainty.json (the session also has one writer)


def model_sha_of(model: Any) -> str:
    """The sha256 the model's sidecar records for its ONNX file (the cache key of its predictions)."""
    return str(model.sidecar.get("onnx_sha256", ""))


def check_model_fits(dataset: DatasetLogic, model: Any) -> None:
    """The model's task, dimensionality and channels must match the dataset's (one-line error otherwise)."""
    meta = dataset.meta
    where = model.sidecar_path
    if model.task != meta["task"]:
        raise MedTuneError(f"model task is {model.task!r} but the dataset is {meta['task']!r}", where)
    if model.spatial_dims != meta["spatial_dims"]:
        raise MedTuneError(f"model is {model.spatial_dims}D but the dataset is {meta['spatial_dims']}D", where)
    if model.channels != int(meta.get("channels", 1)):
        have = meta.get("channels", 1)
        raise MedTuneError(f"model expects {model.channels} channel(s); the dataset has {have}", where)


def predict_case(dataset: DatasetLogic, case_id: str, model: Any) -> dict[str, Any]:
    """Run the model on one case's image and write its prediction; returns ``{"entropy", ...}``."""
    _, entry = dataset.find(case_id)
    image_path = dataset.root / entry["image"]
    out_dir = dataset.root / PREDICTIONS_DIR
    if model.task == "segmentation":
        from medtune.runtime.segment import segment_volume, write_labels
        from medtune.runtime.volume import read_volume

        volume = read_volume(image_path)
        labels, entropy = segment_volume(model, volume, image_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_labels(labels, volume, out_dir / f"{case_id}.nii.gz")
        return {"entropy": entropy, "labels_present": [int(v) for v in np.unique(labels)]}
    x = model.preprocess(model.read(image_path), image_path)
    from medtune.runtime.tta import classification_probabilities  # the sidecar's test-time flips, if any

    probs = classification_probabilities(model, x[None])[0]
    entropy = probability_entropy(probs)
    result = {
        "entropy": entropy,
        "predicted_label": int(model.label_values[int(np.argmax(probs))]),
        "probabilities": {name: float(v) for name, v in zip(model.labels, probs, strict=True)},
    }
    write_json_atomic(out_dir / f"{case_id}.json", result)
    return result


def read_uncertainty(dataset: DatasetLogic) -> dict[str, Any]:
    """The cached ``uncertainty.json`` (empty when absent or unreadable)."""
    import json

    path = dataset.root / PREDICTIONS_DIR / UNCERTAINTY_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"model_sha256": "", "cases": {}}
    return data if isinstance(data, dict) and isinstance(data.get("cases"), dict) else {"model_sha256": "", "cases": {}}


def prefill(dataset: DatasetLogic, case_ids: list[str], model: Any,
            progress: Callable[[int, int, str], None] | None = None) -> dict[str, float]:  # fmt: skip
    """Predict ``case_ids`` (pre-fill for labeling) and cache their entropy; returns ``{case_id: entropy}``."""
    check_model_fits(dataset, model)
    out: dict[str, float] = {}
    for n, case_id in enumerate(case_ids):
        if progress is not None:
            progress(n, len(case_ids), case_id)
        result = predict_case(dataset, case_id, model)
        out[case_id] = result["entropy"]
        record_uncertainty(dataset, model_sha_of(model), {case_id: result["entropy"]})  # kept if interrupted
    return out


def record_uncertainty(dataset: DatasetLogic, model_sha: str, entropies: dict[str, float]) -> None:
    """Merge ``entropies`` into ``uncertainty.json`` (reset when the model changed); atomic, under a lock."""
    with _UNCERTAINTY_LOCK:
        cache = read_uncertainty(dataset)
        if cache.get("model_sha256") != model_sha:
            cache = {"model_sha256": model_sha, "cases": {}}
        cache["cases"].update({k: {"entropy": float(v)} for k, v in entropies.items()})
        write_json_atomic(dataset.root / PREDICTIONS_DIR / UNCERTAINTY_JSON, cache)


def labeling_queue(dataset: DatasetLogic, model: Any | None = None,
                   progress: Callable[[int, int, str], None] | None = None,
                   model_sha: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Cases still to label: ``[{"id", "status", "split", "entropy"}]``, most uncertain first with a model.

    Without a model the queue keeps datalist order (``entropy`` is ``None``). With ``model``, cases whose
    entropy is not cached for it are predicted first (which also pre-fills them). With only ``model_sha``
    (no inference, e.g. to refresh a list on the UI thread), cached entropies rank the cases and the others
    follow with ``entropy`` ``None``.
    """
    if model is not None:
        check_model_fits(dataset, model)
        model_sha = model_sha_of(model)
    todo = [c for c in dataset.list_cases() if c["status"] != "labeled"]
    if not model_sha:
        return [{**c, "entropy": None} for c in todo]
    cache = read_uncertainty(dataset)
    known = cache["cases"] if cache.get("model_sha256") == model_sha else {}
    entropies = {k: float(v["entropy"]) for k, v in known.items()}
    missing = [c["id"] for c in todo if c["id"] not in entropies]
    if missing and model is not None:
        entropies.update(prefill(dataset, missing, model, progress))
    ranked = [{**c, "entropy": entropies.get(c["id"])} for c in todo]
    return sorted(ranked, key=lambda c: (c["entropy"] is None, -(c["entropy"] or 0.0)))


def missing_predictions(dataset: DatasetLogic, model_sha: str) -> list[str]:
    """Unlabeled cases without a cached prediction for the model with this sha256."""
    cache = read_uncertainty(dataset)
    known = cache["cases"] if cache.get("model_sha256") == model_sha else {}
    return [c["id"] for c in dataset.list_cases() if c["status"] != "labeled" and c["id"] not in known]


def next_case(dataset: DatasetLogic, model: Any | None = None) -> str | None:
    """The case to label next (most uncertain when a model is given), or ``None`` when all are labeled."""
    queue = labeling_queue(dataset, model)
    return queue[0]["id"] if queue else None


def load_for_labeling(dataset: DatasetLogic, case_id: str, scene: Any, model: Any | None = None) -> tuple[Any, Any]:
    """Load a case for labeling: ``(volume, segmentation)`` with one segment per label, pre-filled by ``model``.

    Existing labels win over predictions; a case with neither gets an empty segmentation (or, with a model, is
    predicted first). For classification datasets the second item is the predicted class value (or ``None``).
    """
    _, entry = dataset.find(case_id)
    has_label = "label" in entry
    if model is not None and not has_label and case_id in missing_predictions(dataset, model_sha_of(model)):
        prefill(dataset, [case_id], model)
    volume, segmentation = dataset.load_case(case_id, scene)
    if dataset.is_classification:
        return volume, _predicted_class(dataset, case_id)
    if segmentation is None:
        segmentation = dataset.new_label_segmentation(scene, volume, f"{case_id} labels")
    return volume, segmentation


def _predicted_class(dataset: DatasetLogic, case_id: str) -> int | None:
    import json

    path = Path(dataset.root) / PREDICTIONS_DIR / f"{case_id}.json"
    if not path.is_file():
        return None
    return int(json.loads(path.read_text(encoding="utf-8"))["predicted_label"])
