"""Presets → MONAI bundle runs: fine-tune, evaluate, and rebuild a run's network for export.

Every run goes through the bundle's own configs with ``monai.bundle.ConfigWorkflow`` (the same code path as
``python -m monai.bundle run``); this module only chooses the config files and overrides and records them
in ``RUN/run.json`` so that evaluate/export/resume rebuild exactly the same pipeline.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from medtune import __version__
from medtune.atomic import keep_previous_version, write_json_atomic
from medtune.data.contract import load_datalist
from medtune.errors import MedTuneError
from medtune.finetune.bundle_glue import pretrained_metadata

PRESETS: dict[str, dict[str, Any]] = {
    "2d_classification": {"file": "2d_classification.json", "task": "classification", "spatial_dims": 2},
    "2d_segmentation": {"file": "2d_segmentation.json", "task": "segmentation", "spatial_dims": 2},
    "3d_segmentation": {"file": "3d_segmentation.json", "task": "segmentation", "spatial_dims": 3},
    "3d_classification": {"file": "3d_classification.json", "task": "classification", "spatial_dims": 3},
}
RUN_JSON = "run.json"


def configs_dir() -> Path:
    """The bundle's ``configs/`` folder."""
    from medtune.bundle import CONFIGS

    return CONFIGS


def config_files(preset: str, workflow: str = "train") -> list[str]:
    """Config files (absolute paths) for a preset and a workflow (train | evaluate | inference)."""
    if preset not in PRESETS:
        raise MedTuneError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    cfg = configs_dir()
    preset_file = str(cfg / PRESETS[preset]["file"])
    if workflow == "train":
        return [str(cfg / "train.json"), preset_file]
    if workflow == "evaluate":
        return [str(cfg / "train.json"), preset_file, str(cfg / "evaluate.json")]
    if workflow == "inference":
        return [str(cfg / "inference.json"), preset_file]
    if workflow == "pretrain_ssl":
        return [str(cfg / "train.json"), preset_file, str(cfg / "pretrain_ssl.json")]
    if workflow == "multi_gpu_train":
        return [str(cfg / "train.json"), preset_file, str(cfg / "multi_gpu_train.json")]
    raise ValueError(f"unknown workflow {workflow!r}")


def _workflow(files: list[str], overrides: dict[str, Any], quiet: bool):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=files,
        meta_file=str(configs_dir() / "metadata.json"),
        logging_file=False if quiet else str(configs_dir() / "logging.conf"),
        workflow_type=None,
        **overrides,
    )


def _versions() -> dict[str, str]:
    import monai
    import torch

    return {
        "medtune": __version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def read_run(run: str | Path) -> dict[str, Any]:
    """``RUN/run.json`` (one-line error naming the file when absent or invalid)."""
    path = Path(run) / RUN_JSON
    if not path.is_file():
        raise MedTuneError("not a MedTune run folder (run.json missing)", path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MedTuneError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path) from exc


def finetune(
    dataset: str | Path,
    preset: str,
    out: str | Path,
    *,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    progress_bar: bool = True,
    quiet: bool = True,
    workflow: str = "train",
) -> dict[str, Any]:
    """Fine-tune on a dataset folder with a preset; returns a summary (best metric, epochs, seconds).

    ``workflow="pretrain_ssl"`` instead pretrains the preset's network self-supervised (masked/shuffled
    patch reconstruction) on every image of the dataset, labels unused; its ``model.pt`` is then a
    pretrained source for fine-tuning (``--pretrained local:RUN/model.pt``).

    ``overrides`` are bundle config keys (``arch``, ``pretrained``, ``strategy``, ``epochs``, ...). A run folder
    that already holds a checkpoint is only continued with ``resume=True``; it is never overwritten.
    """
    from medtune.data import read_dataset_json, validate_dataset

    dataset, out = Path(dataset).resolve(), Path(out).resolve()
    info = read_dataset_json(dataset)
    spec = PRESETS.get(preset)
    if spec is None:
        raise MedTuneError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    if info["task"] != spec["task"] or int(info["spatial_dims"]) != spec["spatial_dims"]:
        raise MedTuneError(
            f"preset {preset} needs a {spec['spatial_dims']}D {spec['task']} dataset, this one is "
            f"{info['spatial_dims']}D {info['task']}",
            dataset / "dataset.json",
        )
    if workflow == "pretrain_ssl":
        from medtune.finetune.bundle_glue import unlabeled_datalist

        images = unlabeled_datalist(str(dataset))
        if len(images) < 2:
            raise MedTuneError("self-supervised pretraining needs at least 2 images", dataset / "datalist.json")
        summary = {"images": {"n": len(images)}}
    else:
        summary = validate_dataset(dataset)
        _check_trainable(dataset, info, summary)
    has_ckpt = (out / "checkpoint_last.pt").exists()
    if (has_ckpt or (out / "model.pt").exists()) and not resume:
        raise MedTuneError(
            "run folder already holds a checkpoint; pass --resume to continue it or choose another --out", out
        )
    if resume and not has_ckpt:
        raise MedTuneError("nothing to resume: no checkpoint_last.pt", out)
    out.mkdir(parents=True, exist_ok=True)

    ov = dict(overrides or {})
    if resume and (out / RUN_JSON).is_file():  # same pipeline as the interrupted run, new values win
        ov = {**read_run(out).get("overrides", {}), **ov}
    ov.update({"dataset_dir": str(dataset), "output_dir": str(out), "resume": resume, "progress_bar": progress_bar})
    record = {
        "format": "medtune.run/1",
        "preset": preset,
        "workflow": workflow,
        "config_files": [Path(f).name for f in config_files(preset, workflow)],
        "overrides": {k: v for k, v in ov.items() if k not in ("resume", "progress_bar")},
        "dataset": {
            "path": str(dataset),
            "name": info.get("name"),
            "synthetic": bool(info.get("synthetic")),
            "summary": summary,
        },
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "status": "running",
    }
    keep_previous_version(out / RUN_JSON)
    write_json_atomic(out / RUN_JSON, record)

    t0 = time.time()
    wf = _workflow(config_files(preset, workflow), ov, quiet)
    try:
        wf.initialize()
        network = wf.parser.get_parsed_content("network_raw")
        wf.parser.get_parsed_content("param_groups")  # applies the strategy (recorded below)
        load_report = getattr(network, "medtune_load_report", None)
        record["pretrained"] = {
            "source": wf.parser.get_parsed_content("pretrained"),
            "metadata": pretrained_metadata(wf.parser.get_parsed_content("pretrained")),
            "load_report": load_report.to_dict() if load_report is not None else None,
        }
        record["strategy"] = getattr(network, "medtune_strategy", None)
        wf.run()
        run_state = wf.parser.get_parsed_content("train#run_state")
        wf.finalize()
    except BaseException as exc:
        _mark_failed(out / "progress.jsonl", exc)
        record.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        write_json_atomic(out / RUN_JSON, record)
        raise
    record.update(
        peak_rss_mb=round(_peak_rss_mb(), 1),
        status="early_stopped" if run_state.early_stopped else "completed",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        seconds=round(time.time() - t0, 1),
        best_metric={
            "name": wf.parser.get_parsed_content("key_metric_name"),
            "value": run_state.best_metric,
            "epoch": run_state.best_epoch,
        },
    )
    write_json_atomic(out / RUN_JSON, record)
    return record


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _check_trainable(dataset: Path, info: dict[str, Any], summary: dict[str, Any]) -> None:
    """Refuse, before training, what the classification preset cannot learn or validate."""
    path = dataset / "datalist.json"
    if info["task"] == "classification":
        for item in load_datalist(dataset, "training")[:1]:
            if not isinstance(item.get("label"), int):
                raise MedTuneError("multi-label classification is not supported by the 2D preset yet", path)
    val = summary.get("validation")
    if not val or not val.get("n"):
        raise MedTuneError("a 'validation' split is needed to select the best model", path)
    counts = {k: v for k, v in (val.get("class_counts") or {}).items() if v}
    if info["task"] == "classification" and len(counts) < 2:
        raise MedTuneError(f"the validation split holds only class(es) {sorted(counts)}; AUC needs two", path)


def _mark_failed(progress: Path, exc: BaseException) -> None:
    """Close the progress stream with a ``done``/``failed`` record if the trainer did not write one."""
    from medtune.finetune.progress import ProgressWriter, read_progress

    events = read_progress(progress)
    if events and events[-1].get("event") == "done":
        return
    msg = str(exc).splitlines()[0] if str(exc) else ""
    ProgressWriter(progress).emit("done", status="failed", error=f"{type(exc).__name__}: {msg}"[:300])


def evaluate_run(
    run: str | Path,
    dataset: str | Path | None = None,
    split: str = "validation",
    quiet: bool = True,
    datalist: list[dict[str, Any]] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run's best model on a split with the bundle's ``evaluate.json``; writes ``RUN/eval*/``.

    ``datalist`` (with ``name``): evaluate these entries instead of a split, into ``RUN/eval_<name>/`` (the
    internal test and out-of-fold cases of :mod:`medtune.finetune.crossval`).
    """
    run = Path(run).resolve()
    rec = read_run(run)
    if not (run / "model.pt").is_file():
        raise MedTuneError("run has no model.pt (did training finish an epoch?)", run)
    ov = dict(rec["overrides"])
    ov.update({"output_dir": str(run), "eval_split": split, "num_workers": 0})
    if dataset is not None:
        ov["dataset_dir"] = str(Path(dataset).resolve())
    items = load_datalist(ov["dataset_dir"], split) if datalist is None else list(datalist)
    if datalist is not None:
        ov["val_datalist"], split = items, name or "subset"
    if any("label" not in item for item in items):
        raise MedTuneError(
            f"split {split!r} has entries without labels; it cannot be evaluated",
            Path(ov["dataset_dir"]) / "datalist.json",
        )
    main_eval = split == "validation" and dataset is None and datalist is None
    eval_dir = run / ("eval" if main_eval else f"eval_{split}")
    ov["eval_dir"] = str(eval_dir)
    wf = _workflow(config_files(rec["preset"], "evaluate"), ov, quiet)
    wf.initialize()
    handler = wf.parser.get_parsed_content("validate#handlers")[-1]
    if main_eval:  # the selection figure next to the honest one (medtune.finetune.crossval)
        from medtune.finetune.crossval import read_estimate

        handler.context["estimates"] = read_estimate(run)
    wf.run()
    wf.finalize()
    return {"eval_dir": str(eval_dir), "metrics": handler.metrics}


def build_network_for_run(run: str | Path):
    """Rebuild a run's network with its best weights (``model.pt``), plus the parser for its config."""
    import torch

    from medtune.weights import read_checkpoint

    run = Path(run).resolve()
    rec = read_run(run)
    if not (run / "model.pt").is_file():
        raise MedTuneError("run has no model.pt (did training finish an epoch?)", run)
    ov = dict(rec["overrides"])
    ov.update({"output_dir": str(run), "network_pretrained": "none", "num_workers": 0, "device": torch.device("cpu")})
    wf = _workflow(config_files(rec["preset"], "train"), ov, quiet=True)
    parser = wf.parser
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(read_checkpoint(run / "model.pt"))
    net.eval()
    return net, parser, rec
