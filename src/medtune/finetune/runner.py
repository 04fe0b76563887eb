"""Presets → MONAI bundle runs: fine-tune, evaluate, and rebuild a run's network for export.

Every run goes through the bundle's own configs with ``monai.bundle.ConfigWorkflow`` (the same code path as
``python -m monai.bundle run``); this module only chooses the config files and overrides and records them
in ``RUN/run.json`` so that evaluate/export/resume rebuild exactly the same pipeline.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medtune import __version__, names
from medtune.atomic import keep_previous_version, write_json_atomic
from medtune.data.contract import load_datalist
from medtune.errors import MedTuneError, one_line, read_json_file
from medtune.finetune.bundle_glue import pretrained_metadata
from medtune.finetune.handlers import STOP
from medtune.runfolder import BEST_MODEL, CHECKPOINT_LAST, PROGRESS, RUN_JSON
from medtune.untrusted import refuse_expressions
from medtune.versions import versions

#: each preset's config file, task and spatial dims, from its name (the names' owner: :data:`medtune.names.PRESETS`)
PRESETS: dict[str, dict[str, Any]] = {
    name: {"file": f"{name}.json", "task": name.split("_", 1)[1], "spatial_dims": int(name[0])}
    for name in names.PRESETS
}


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


def _workflow(files: list[str], overrides: dict[str, Any], quiet: bool, tracking: str | None = None):
    from monai.bundle import ConfigWorkflow

    settings = None
    if tracking is not None:  # MLflow / TensorBoard handlers, as `python -m monai.bundle run --tracking` adds them
        from medtune.finetune.tracking import tracking_settings

        settings = tracking_settings(tracking)
    return ConfigWorkflow(
        config_file=files,
        meta_file=str(configs_dir() / "metadata.json"),
        logging_file=False if quiet else str(configs_dir() / "logging.conf"),
        workflow_type=None,
        tracking=settings,
        **overrides,
    )


def _versions() -> dict[str, str]:
    import monai  # noqa: F401 - loaded, so the record is this process's exact version
    import torch  # noqa: F401

    return {"medtune": __version__, **versions(("monai", "torch")), "python": platform.python_version()}


def read_run(run: str | Path, replaced: Any = ()) -> dict[str, Any]:
    """``RUN/run.json`` (one-line error naming the file when absent or invalid).

    A run folder may come from someone else: ``run.json`` is data. Its ``preset`` must be a known preset and
    its ``overrides`` plain values of the keys and types that preset's configs allow
    (:func:`check_file_overrides`), so nothing in it reaches MONAI's config parser as an expression.
    Overrides named in ``replaced`` (the user's own command-line values for a resumed run) are not checked:
    they are not used.
    """
    path = Path(run) / RUN_JSON
    rec = read_json_file(path, "not a MedTune run folder (run.json missing)")
    if not isinstance(rec, dict):
        raise MedTuneError("must hold a JSON object", path)
    preset = rec.get("preset")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise MedTuneError(f"key 'preset' is {preset!r}, expected one of {', '.join(PRESETS)}", path)
    if "overrides" not in rec:
        raise MedTuneError("no 'overrides' entry (not written by `medtune finetune`, or edited)", path)
    workflow = rec.get("workflow", "train")
    if workflow not in ("train", "pretrain_ssl", "multi_gpu_train"):
        raise MedTuneError(f"key 'workflow' is {workflow!r}, expected train or pretrain_ssl", path)
    used = rec["overrides"]
    if isinstance(used, dict):
        used = {k: v for k, v in used.items() if k not in set(replaced)}
    check_file_overrides(used, preset, workflow, path)
    dataset = rec.get("dataset")
    if dataset is not None:
        refuse_expressions(dataset, path, "dataset")
    return rec


# ------------------------------------------------------------------------------------------ override checks

_MISSING = object()


def raw_config(preset: str, workflow: str = "train") -> dict[str, Any]:
    """The preset's config files merged as plain JSON (top-level keys, later files win), nothing parsed."""
    merged: dict[str, Any] = {}
    for name in config_files(preset, workflow):
        merged.update(json.loads(Path(name).read_text(encoding="utf-8")))
    return merged


def _lookup(config: Any, key: str) -> Any:
    node = config
    for part in key.replace("::", "#").split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(value: Any, default: Any) -> bool:
    """Whether a plain JSON ``value`` may replace a config entry whose default is ``default``."""
    if isinstance(default, str) and default.startswith(("$", "@", "%")) or default is None:
        return value is None or isinstance(value, (str, bool, int, float, list))  # a computed default
    if isinstance(default, str) and default == "auto":  # "auto" or the user's own value (a list, a name)
        return value is None or isinstance(value, (str, int, float, list))
    if value is None:
        return False
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return _is_number(value)
    return isinstance(value, type(default))


def check_file_overrides(overrides: Any, preset: str, workflow: str, path: str | Path) -> None:
    """Refuse overrides read from a file unless each is a plain value of a key the preset's configs hold,
    of the same JSON type as the config's own value (one line naming ``path`` and the key)."""
    if not isinstance(overrides, dict):
        raise MedTuneError(f"'overrides' must be a JSON object, got {type(overrides).__name__}", path)
    refuse_expressions(overrides, path, "overrides")
    config = raw_config(preset, workflow)
    for key, value in overrides.items():
        default = _lookup(config, key)
        if default is _MISSING:
            raise MedTuneError(f"overrides.{key}: not a config key of preset {preset}", path)
        if not _fits(value, default):
            want = "a plain value" if isinstance(default, str) and default[:1] in "$@%" else type(default).__name__
            raise MedTuneError(f"overrides.{key} = {_short(value)} has the wrong type (expected {want})", path)
    check_values(overrides, path, "overrides.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


# (key, rule, description): the numbers a run cannot work with are refused before anything starts
_VALUE_RULES: tuple[tuple[str, Any, str], ...] = (
    ("epochs", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    ("val_batch_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    ("num_workers", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    ("early_stop_patience", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    # learning_rate 0: frozen on purpose (a linear probe of nothing, tests of early stopping)
    ("learning_rate", lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("weight_decay", lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("label_fraction", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("model_selection", lambda v: v in ("best", "last"), "best or last"),
    ("refit_on_all", lambda v: isinstance(v, bool), "true or false"),
    ("seed_ensemble", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
)


def check_values(overrides: dict[str, Any], where: str | Path | None = None, prefix: str = "") -> None:
    """Refuse override values no run can use (``epochs`` 0, ``learning_rate`` NaN, ``label_fraction`` 0...)."""
    for key, ok, want in _VALUE_RULES:
        if key in overrides and not (isinstance(overrides[key], str) and overrides[key].startswith("$")):
            if not ok(overrides[key]):
                raise MedTuneError(f"{prefix}{key} must be {want}, got {_short(overrides[key])}", where)


@contextmanager
def _stop_on_sigint() -> Iterator[None]:
    """While a run goes on, Ctrl-C (SIGINT) sets :data:`STOP` instead of raising inside whatever code it lands
    in (a ``KeyboardInterrupt`` raised inside ``logging`` is swallowed); the engine stops at its next iteration.

    Every press while the run stops only sets the flag again; presses in the few seconds after the run has
    returned are ignored too (the CLI is exiting), later ones go to the previous handler again.
    """
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    stopped_at: list[float] = []

    def _handler(signum: int, frame: Any) -> None:
        if not STOP.is_set():
            stopped_at.append(time.monotonic())
            sys.stderr.write("\nmedtune: stopping after the current step...\n")
        STOP.set()

    def _after(signum: int, frame: Any) -> None:
        if stopped_at and time.monotonic() - stopped_at[0] < _GRACE_SECONDS:
            return
        signal.signal(signal.SIGINT, previous)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, _after if STOP.is_set() else previous)


_GRACE_SECONDS = 10.0


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
    tracking: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Fine-tune on a dataset folder with a preset; returns a summary (best metric, epochs, seconds).

    ``tracking="mlflow"|"tensorboard"`` records parameters, per-epoch loss/metrics and the run's files through
    MONAI's handlers (:mod:`medtune.finetune.tracking`): MLflow into ``tracking_uri`` (default
    ``sqlite:///RUN/mlruns.db``, artifacts in ``RUN/mlruns/``), TensorBoard event files into ``RUN/tensorboard/``.

    ``workflow="pretrain_ssl"`` instead pretrains the preset's network self-supervised (masked/shuffled
    patch reconstruction) on every image of the dataset, labels unused; its ``model.pt`` is then a
    pretrained source for fine-tuning (``--pretrained local:RUN/model.pt``).

    ``overrides`` are bundle config keys (``arch``, ``pretrained``, ``strategy``, ``epochs``, ...). A run folder
    that already holds a checkpoint is only continued with ``resume=True``; it is never overwritten.
    """
    from medtune.data import read_dataset_json, validate_dataset

    dataset, out = Path(dataset).resolve(), Path(out).resolve()
    check_values(dict(overrides or {}))  # before anything is read or written
    info = read_dataset_json(dataset)
    if preset not in PRESETS:
        raise MedTuneError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    _check_dataset_fits(preset, dataset)
    if workflow == "pretrain_ssl":
        from medtune.finetune.bundle_glue import unlabeled_datalist

        if PRESETS[preset]["spatial_dims"] != 3:
            ssl = ", ".join(k for k, v in PRESETS.items() if v["spatial_dims"] == 3)
            raise MedTuneError(f"self-supervised pretraining works with the 3D presets ({ssl}), not {preset}")

        images = unlabeled_datalist(str(dataset))
        if len(images) < 2:
            raise MedTuneError("self-supervised pretraining needs at least 2 images", dataset / "datalist.json")
        summary = {"images": {"n": len(images)}}
    else:
        summary = validate_dataset(dataset)
        _check_trainable(dataset, info, summary)
    has_ckpt = (out / CHECKPOINT_LAST).exists()
    if (has_ckpt or (out / BEST_MODEL).exists()) and not resume:
        raise MedTuneError(
            "run folder already holds a checkpoint; pass --resume to continue it or choose another --out", out
        )
    if resume and not has_ckpt:
        raise MedTuneError("nothing to resume: no checkpoint_last.pt", out)
    out.mkdir(parents=True, exist_ok=True)

    ov = dict(overrides or {})
    if resume and (out / RUN_JSON).is_file():  # same pipeline as the interrupted run, new values win
        ov = {**read_run(out, replaced=ov)["overrides"], **ov}  # the file's overrides are checked as data
    ov.update({"dataset_dir": str(dataset), "output_dir": str(out), "resume": resume, "progress_bar": progress_bar})
    if tracking_uri is not None:
        ov["tracking_uri"] = str(tracking_uri)
    record: dict[str, Any] = {
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
        **({"tracking": tracking} if tracking else {}),
    }
    keep_previous_version(out / RUN_JSON)
    write_json_atomic(out / RUN_JSON, record)

    t0 = time.time()
    wf = _workflow(config_files(preset, workflow), ov, quiet, tracking)
    _record_patch_size(wf, record, out)
    try:
        with _stop_on_sigint():
            run_state = _run_workflow(wf, record, out)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        status = "interrupted" if interrupted else "failed"
        try:
            _mark_failed(out / PROGRESS, exc, status)
            error = "stopped by Ctrl-C (continue with --resume)" if interrupted else f"{type(exc).__name__}: "
            record.update(status=status, error=error if interrupted else error + one_line(exc))
            record["resumable"] = (out / CHECKPOINT_LAST).is_file()
            write_json_atomic(out / RUN_JSON, record)
        except OSError:  # full disk / read-only folder: the first error is the one to report
            pass
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


def _record_patch_size(wf: Any, record: dict[str, Any], out: Path) -> None:
    """A patch size derived from the data (``roi_size: auto``) is recorded as the run's ``patch_size``, so
    evaluate / export / resume use the size the network was trained with, without reading the data again."""
    overrides = record["overrides"]
    if wf.parser.get("roi_size") is None or "patch_size" in overrides:
        return
    overrides["patch_size"] = [int(s) for s in wf.parser.get_parsed_content("patch_size")]
    write_json_atomic(out / RUN_JSON, record)


def _run_workflow(wf: Any, record: dict[str, Any], out: Path) -> Any:
    """Initialize and run the bundle workflow; fill ``record``'s pretrained/strategy fields; the run state.

    Raises ``KeyboardInterrupt`` when Ctrl-C stopped the run and a one-line error when it made no model.
    """
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
    if STOP.is_set():
        raise KeyboardInterrupt
    wf.run()
    run_state = wf.parser.get_parsed_content("train#run_state")
    wf.finalize()
    if STOP.is_set():
        raise KeyboardInterrupt
    if not (out / BEST_MODEL).is_file():
        raise MedTuneError(
            f"training ended without a model: the validation metric was never a finite number (best "
            f"{run_state.best_metric}); check that every declared class is present in the training and "
            "validation splits",
            out,
        )
    return run_state


def _check_dataset_fits(preset: str, dataset: Path) -> None:
    """Refuse a dataset of another task or dimensionality than ``preset`` (one line naming its dataset.json)."""
    from medtune.data import read_dataset_json

    info, spec = read_dataset_json(dataset), PRESETS[preset]
    if info["task"] != spec["task"] or int(info["spatial_dims"]) != spec["spatial_dims"]:
        raise MedTuneError(
            f"preset {preset} needs a {spec['spatial_dims']}D {spec['task']} dataset, this one is "
            f"{info['spatial_dims']}D {info['task']}",
            dataset / "dataset.json",
        )


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
    if info["task"] == "classification":
        for split in ("training", "validation"):
            present = (summary.get(split) or {}).get("class_counts") or {}
            missing = [k for k in sorted(info["labels"]) if not present.get(k)]
            if missing:
                names = ", ".join(f"{k} ({info['labels'][k]})" for k in missing)
                raise MedTuneError(
                    f"dataset.json declares class(es) {names} but the {split} split has no case of them; "
                    "the model cannot learn or be validated on them (add cases or remove the classes)",
                    path,
                )


def _mark_failed(progress: Path, exc: BaseException, status: str = "failed") -> None:
    """Close the progress stream with a ``done`` record (``failed`` | ``interrupted``) unless the trainer wrote
    one with that status."""
    from medtune.finetune.progress import ProgressWriter, read_progress

    events = read_progress(progress)
    if events and events[-1].get("event") == "done" and events[-1].get("status") == status:
        return
    msg = one_line(exc) if str(exc) else ""
    ProgressWriter(progress).emit("done", status=status, error=f"{type(exc).__name__}: {msg}"[:300])


def evaluate_run(
    run: str | Path,
    dataset: str | Path | None = None,
    split: str = "validation",
    quiet: bool = True,
    datalist: list[dict[str, Any]] | None = None,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    network: Any = None,
    eval_dir: str | Path | None = None,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a run's best model on a split with the bundle's ``evaluate.json``; writes ``RUN/eval*/``.

    ``datalist`` (with ``name``): evaluate these entries instead of a split, into ``RUN/eval_<name>/`` (the
    internal test and out-of-fold cases of :mod:`medtune.finetune.crossval`). ``overrides``: the user's own
    command-line values (``--set``), which replace the run's (see :func:`run_overrides`). ``network``: a built
    torch module evaluated instead of ``model.pt`` through the run's own transforms, inferer and report (an
    ensemble of runs of this recipe, :func:`medtune.finetune.crossval.evaluate_ensemble`), with ``eval_dir`` and
    report ``context`` entries of the caller's.
    """
    run = Path(run).resolve()
    rec, ov = run_overrides(run, overrides)
    if not (run / BEST_MODEL).is_file():
        raise MedTuneError("run has no model.pt (did training finish an epoch?)", run)
    ov.update({"output_dir": str(run), "eval_split": split, "num_workers": 0})
    if network is not None:  # already built and loaded: evaluate.json's initialize without its checkpoint read
        steps = [s for s in raw_config(rec["preset"], "evaluate")["initialize"] if "@checkpoint" not in s]
        ov.update({"network_built": network, "network": "$@network_built.eval().to(@device)", "initialize": steps})
    if dataset is not None:
        ov["dataset_dir"] = str(Path(dataset).resolve())
        _check_dataset_fits(rec["preset"], Path(ov["dataset_dir"]))
    if not isinstance(ov.get("dataset_dir"), str):
        raise MedTuneError("overrides.dataset_dir is missing; pass --dataset", run / RUN_JSON)
    items = load_datalist(ov["dataset_dir"], split) if datalist is None else list(datalist)
    if datalist is not None:
        ov["val_datalist"], split = items, name or "subset"
    if any("label" not in item for item in items):
        raise MedTuneError(
            f"split {split!r} has entries without labels; it cannot be evaluated",
            Path(ov["dataset_dir"]) / "datalist.json",
        )
    main_eval = split == "validation" and dataset is None and datalist is None
    eval_dir = Path(eval_dir) if eval_dir is not None else run / ("eval" if main_eval else f"eval_{split}")
    ov["eval_dir"] = str(eval_dir)
    wf = _workflow(config_files(rec["preset"], "evaluate"), ov, quiet)
    wf.initialize()
    handler = wf.parser.get_parsed_content("validate#handlers")[-1]
    handler.context.update(context or {})
    if main_eval and network is None:  # the selection figure next to the honest one (medtune.finetune.crossval)
        from medtune.finetune.crossval import read_estimate

        handler.context["estimates"] = read_estimate(run)
    wf.run()
    wf.finalize()
    if (run / "tracking.json").is_file():  # a tracked run: the report and plots join its MLflow run
        from medtune.finetune.tracking import log_evaluation

        log_evaluation(run, eval_dir)
    return {"eval_dir": str(eval_dir), "metrics": handler.metrics}


#: the 3D segmentation preset's fixed patch before ``roi_size: auto`` (runs that recorded no ``patch_size``)
LEGACY_3D_PATCH = [64, 64, 64]


def run_overrides(run: Path, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(run.json, the overrides to rebuild the run with)``: the file's overrides (checked as data by
    :func:`read_run`) with the user's own ``overrides`` (``--set`` on evaluate / export) on top. A key the user
    sets is not read from the file, so a recorded ``$`` expression can be replaced by the user's own value;
    the user's values get the CLI's number checks."""
    mine = dict(overrides or {})
    check_values(mine)
    rec = read_run(run, replaced=mine)
    merged = {**{k: v for k, v in rec["overrides"].items() if k not in mine}, **mine}
    if rec.get("preset") == "3d_segmentation" and not {"patch_size", "roi_size"} & set(merged):
        merged["patch_size"] = LEGACY_3D_PATCH  # recorded before roi_size auto: the size it was trained with
    return rec, merged


def build_network_for_run(run: str | Path, overrides: dict[str, Any] | None = None):
    """Rebuild a run's network with its best weights (``model.pt``), plus the parser for its config
    (``overrides``: the user's own ``--set`` values, see :func:`run_overrides`)."""
    import torch

    from medtune.weights import read_checkpoint

    run = Path(run).resolve()
    rec, ov = run_overrides(run, overrides)
    if not (run / BEST_MODEL).is_file():
        raise MedTuneError("run has no model.pt (did training finish an epoch?)", run)
    ov.update({"output_dir": str(run), "network_pretrained": "none", "num_workers": 0, "device": torch.device("cpu")})
    wf = _workflow(config_files(rec["preset"], "train"), ov, quiet=True)
    parser = wf.parser
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(read_checkpoint(run / BEST_MODEL))
    net.eval()
    return net, parser, rec
