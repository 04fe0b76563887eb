"""Run a study: every arm through the same MONAI bundle fine-tune + evaluation, resumable, one progress bar.

Each run is a normal MedTune run folder (``STUDY/runs/<arm>/<budget>/seed<N>``), trained by
:func:`medtune.finetune.runner.finetune` and evaluated by :func:`~medtune.finetune.runner.evaluate_run` in a
child process of its own (``spawn``: its peak memory is its own, and ``jobs`` runs can share the CPU). A run whose
evaluation is on disk is skipped; an interrupted one (``checkpoint_last.pt``) is resumed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from medtune.atomic import write_json_atomic
from medtune.errors import MedTuneError
from medtune.study.plan import SCRATCH, Run, parse_arm_sets, parse_budgets, parse_sources, plan_runs

STUDY_FORMAT = "medtune.study/1"
PLAN_JSON = "plan.json"
RESULTS_JSONL = "results.jsonl"


def run_dir(study: Path, run: Run) -> Path:
    out = study / "runs" / run.arm.alias / run.budget.tag / f"seed{run.seed}"
    return out if run.fold is None else out / f"fold{run.fold}"


def _run_overrides(run: Run, preset_arch: str | None, common: dict[str, Any], cache_dir: Path | None) -> dict[str, Any]:
    """A run's bundle overrides; ``cache_dir`` (the study's shared feature cache) only for presets that have one."""
    from medtune.weights import get_source

    ov: dict[str, Any] = dict(common)
    if run.arm.source == SCRATCH:
        ov["pretrained"] = "none"
    else:
        source = get_source(run.arm.source)
        ov["pretrained"] = run.arm.source
        if source is not None and source.arch and "arch" not in run.arm.overrides:
            ov["arch"] = source.arch
    ov.update(strategy=run.arm.strategy, label_fraction=run.budget.fraction, seed=run.seed)
    if cache_dir is not None:
        ov["feature_cache_dir"] = str(cache_dir)
    ov.update(run.arm.overrides)
    if preset_arch and "arch" not in ov:
        ov["arch"] = preset_arch
    return ov


def step_budget(n_labels: int, batch_size: int, steps: int, validations: int | None) -> tuple[int, int]:
    """``(epochs, val_interval)`` for ``steps`` optimizer steps on ``n_labels`` cases (at least ``steps``).

    The training loader drops its last partial batch when there is more than one batch (train.json), so an epoch
    is ``n_labels // batch_size`` steps (1 when ``n_labels <= batch_size``). ``validations``: validation passes
    spread evenly over the run, the last one at the final epoch (epochs are rounded up to a multiple of the
    interval); ``None`` validates every epoch.
    """
    if steps < 1 or batch_size < 1 or n_labels < 1:
        raise MedTuneError(f"--steps needs steps, batch size and labeled cases >= 1 (got {steps}, {batch_size}, "
                           f"{n_labels})")  # fmt: skip
    per_epoch = n_labels // batch_size if n_labels > batch_size else 1
    epochs = max(1, math.ceil(steps / per_epoch))
    if not validations:
        return epochs, 1
    if validations < 1:
        raise MedTuneError(f"--validations must be >= 1, got {validations}")
    interval = max(1, epochs // validations)
    return math.ceil(epochs / interval) * interval, interval


def _preset_keys(preset: str) -> set[str]:
    """The config keys of a preset's training workflow (train.json + the preset file)."""
    from medtune.finetune.runner import config_files

    keys: set[str] = set()
    for path in config_files(preset):
        keys |= set(json.loads(Path(path).read_text(encoding="utf-8")))
    return keys


def _preset_int(preset: str, overrides: dict[str, Any], key: str) -> int:
    """An integer key (``batch_size``, ``epochs``) a run uses: its override or the preset's (else train.json's)."""
    from medtune.finetune.runner import config_files

    if isinstance(overrides.get(key), int):
        return int(overrides[key])
    found = 0
    for path in config_files(preset):  # train.json first, the preset overrides it
        value = json.loads(Path(path).read_text(encoding="utf-8")).get(key)
        found = value if isinstance(value, int) else found
    return found


def execute_run(task: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) and evaluate one run; in a child process. Returns its result record."""
    import torch

    torch.set_num_threads(int(task["threads"]))
    from medtune.finetune.bundle_glue import datalist
    from medtune.finetune.runner import evaluate_run, finetune, read_run

    out = Path(task["out"])
    eval_name = task.get("eval_name")  # --folds: the held-out fold, evaluated into RUN/eval_<name>/
    eval_dir = out / (f"eval_{eval_name}" if eval_name else "eval")
    rec = read_run(out) if (out / "run.json").is_file() else {}
    evaluated = (eval_dir / "predictions.csv").is_file() or (eval_dir / "per_case.csv").is_file()  # class. | seg.
    done = rec.get("status") in ("completed", "early_stopped") and evaluated
    t0 = time.time()
    if not done:
        resume = (out / "checkpoint_last.pt").is_file()
        if not resume and out.exists() and any(out.iterdir()):
            failed = out.with_name(out.name + f".failed-{int(time.time())}")  # kept, not overwritten
            out.rename(failed)
        rec = finetune(
            task["dataset"],
            task["preset"],
            out,
            resume=resume,
            overrides=task["overrides"],
            progress_bar=False,
            quiet=True,
        )
    if not (out / "model.pt").is_file():
        result = _evaluated(eval_dir)
    elif eval_name:
        result = evaluate_run(out, datalist=task["eval_datalist"], name=eval_name)
    else:
        result = evaluate_run(out)
    # a finished, evaluated run needs no resume state; a 117 M-parameter backbone is ~470 MB per file
    (out / "checkpoint_last.pt").unlink(missing_ok=True)
    if task.get("prune_models"):
        (out / "model.pt").unlink(missing_ok=True)
    full = result["metrics"] or {}
    metrics = {k: v for k, v in full.items() if k in ("n", "class_counts") or (isinstance(v, dict) and "value" in v)}
    seconds, segments = train_seconds(out, rec.get("seconds"))
    ov = task["overrides"]
    n_labels = len(ov["train_datalist"]) if isinstance(ov.get("train_datalist"), list) else len(
        datalist(task["dataset"], "training", ov["label_fraction"], ov["seed"])
    )  # fmt: skip
    return {
        "key": task["key"],
        "arm": task["arm"],
        "budget": task["budget"],
        "seed": task["seed"],
        "fold": task.get("fold"),
        "n_labels": n_labels,
        "metric_name": rec.get("best_metric", {}).get("name"),
        "best_epoch": rec.get("best_metric", {}).get("epoch"),
        "best_val_during_training": rec.get("best_metric", {}).get("value"),
        "metrics": metrics,
        "eval_dir": result["eval_dir"],
        "train_seconds": seconds,
        "train_segments": segments,
        "peak_rss_mb": rec.get("peak_rss_mb"),
        "load_report": (rec.get("pretrained") or {}).get("load_report")
        and {k: rec["pretrained"]["load_report"].get(k) for k in ("n_loaded", "adapted", "reinitialized_head")},
        "wall_seconds": round(time.time() - t0, 1),
        "epochs": task["overrides"].get("epochs"),
        "steps": task.get("steps"),
    }


def train_seconds(out: Path, last_seconds: float | None) -> tuple[float | None, int]:
    """``(seconds, segments)``: a run's training time summed over its segments (an interrupted run resumed, or a
    finished one continued, trains in several ``finetune`` calls; ``run.json`` holds the last call's ``seconds``).

    The run's own progress stream marks each segment with a ``start`` event; a segment before the last one counts
    with its last ``elapsed_seconds`` (its training loop; a killed segment's time up to its last epoch), the last
    one with ``last_seconds`` (``run.json``: the whole call, data loading included) when given.
    """
    from medtune.finetune.progress import read_progress

    segments: list[float] = []
    for event in read_progress(out / "progress.jsonl"):
        if event.get("event") == "start":
            segments.append(0.0)
        elif segments and isinstance(event.get("elapsed_seconds"), (int, float)):
            segments[-1] = max(segments[-1], float(event["elapsed_seconds"]))
    if not segments:
        return last_seconds, 1
    if last_seconds is not None:
        segments[-1] = float(last_seconds)
    return round(sum(segments), 1), len(segments)


def _evaluated(eval_dir: Path) -> dict[str, Any]:
    """The evaluation already on disk of a pruned run (its ``model.pt`` was removed after evaluation)."""
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    return {"eval_dir": str(eval_dir), "metrics": metrics}


def _read_results(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "key" in rec:
                out[rec["key"]] = rec
    return out


def _append(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def run_study(
    dataset: str | Path,
    preset: str,
    sources: str,
    labels: str,
    seeds: int,
    out: str | Path,
    *,
    default_strategy: str = "full",
    common: dict[str, Any] | None = None,
    arm_sets: list[str] | None = None,
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
    report_only: bool = False,
    prune_models: bool = False,
    steps: int | None = None,
    validations: int | None = None,
    folds: int | None = None,
) -> dict[str, Any]:
    """Plan, run (resuming / skipping what is done) and report a study; returns ``study.json``'s content.

    ``report_only``: write the report from the runs finished so far (an interrupted study), run nothing.
    ``prune_models``: delete each run's ``model.pt`` once it is evaluated (the study keeps its predictions).
    ``steps``: the same number of optimizer steps for every run, whatever its label budget (epochs per run from
    :func:`step_budget`; replaces ``epochs``). ``validations``: validation passes per run (1: only the final model is
    validated and evaluated, so nothing is selected on the split the study reports). ``folds``: patient-grouped
    K-fold cross-validation over training + validation (:mod:`medtune.study.folds`): each run is one fold, its
    final model (``model_selection=last``) predicts the held-out fold, and every arm's metric is the pooled
    out-of-fold AUC, or mean per-case Dice, over all cases (a study folder keeps its fold count).
    """
    from medtune.data import read_dataset_json, validate_dataset
    from medtune.finetune.runner import PRESETS

    dataset, study = Path(dataset).resolve(), Path(out).resolve()
    if preset not in PRESETS:
        raise MedTuneError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    info = read_dataset_json(dataset)
    summary = validate_dataset(dataset, check_images=False)
    n_train = summary["training"]["n"]
    arms = parse_arm_sets(arm_sets, parse_sources(sources, default_strategy))
    for ov in [common or {}, *(a.overrides for a in arms)]:  # a key of `medtune finetune`'s flow, not of one run
        if ov.get("seed_ensemble", 1) != 1:
            raise MedTuneError("seed_ensemble is not a study setting: a study trains and scores each arm's runs one "
                               "by one (compare seeds with --seeds)")  # fmt: skip
        if ov.get("folds_deploy", "ensemble") != "ensemble":
            raise MedTuneError("folds_deploy is not a study setting: a study scores its fold runs (--folds) and "
                               "deploys nothing")  # fmt: skip
    fold_info: dict[str, Any] = {}
    if folds:
        from medtune.study.folds import fold_items, smallest_pool

        items, fold_of, gkey = fold_items(dataset, folds)
        n_train = smallest_pool(fold_of, folds)
        fold_info = {
            "folds": folds,
            "group_key": gkey,
            "n_groups": len({str(it[gkey]) for it in items}) if gkey else len(items),
            "n_cases": len(items),
            "fold_sizes": [fold_of.count(k) for k in range(folds)],
        }
    budgets = parse_budgets(labels, n_train)
    runs = plan_runs(arms, budgets, seeds, folds or 0)
    common = dict(common or {})
    plan = {
        "format": STUDY_FORMAT,
        "dataset": str(dataset),
        "dataset_name": info.get("name"),
        "task": info["task"],
        "preset": preset,
        "arms": [
            {"alias": a.alias, "source": a.source, "strategy": a.strategy, "overrides": a.overrides} for a in arms
        ],
        "budgets": [{"text": b.text, "fraction": b.fraction, "tag": b.tag} for b in budgets],
        "seeds": seeds,
        "common_overrides": common,
        "n_train": n_train,
        "n_validation": summary.get("validation", {}).get("n"),
        "steps": steps,
        "validations": validations,
        **fold_info,
    }
    study.mkdir(parents=True, exist_ok=True)
    plan_path = study / PLAN_JSON
    if plan_path.is_file():
        previous = json.loads(plan_path.read_text(encoding="utf-8"))
        keep = ("dataset", "preset", "common_overrides", "steps", "validations", "folds")
        if previous.get("folds") != plan.get("folds"):  # other folds: no fold run could be reused or pooled
            was = f"--folds {previous['folds']}" if previous.get("folds") else "no --folds"
            raise MedTuneError(f"this study folder was planned with another fold count ({was}); resume it with "
                               "the same fold count or use a new --out", plan_path)  # fmt: skip
        if any(previous.get(k) != plan.get(k) for k in keep):
            raise MedTuneError(
                "this study folder was planned with another dataset/preset/overrides; use a new --out", plan_path
            )
    write_json_atomic(plan_path, plan)

    results_path = study / RESULTS_JSONL
    results = _read_results(results_path)
    if report_only:
        return _report(study, dataset, plan, runs, results, folds)
    # the feature cache key exists in the classification presets only (a run refuses unknown keys when read back)
    cache_dir = study / "feature_cache" if "feature_cache_dir" in _preset_keys(preset) else None
    tasks: list[dict[str, Any]] = []
    for run in runs:
        if run.key in results:
            continue
        overrides = _run_overrides(run, None, common, cache_dir)
        fold_task: dict[str, Any] = {}
        if run.fold is not None:
            from medtune.finetune.bundle_glue import label_subset
            from medtune.study.folds import OOF_NAME, fold_fraction

            train_pool = [it for it, f in zip(items, fold_of, strict=True) if f != run.fold]
            held = [it for it, f in zip(items, fold_of, strict=True) if f == run.fold]
            fraction = fold_fraction(run.budget.text, run.budget.fraction, len(train_pool))
            # the same labeled cases for every arm of this fold x budget x seed; the final model is evaluated
            overrides.update(train_datalist=label_subset(train_pool, fraction, run.seed), val_datalist=held,
                             model_selection="last", early_stop_patience=0)  # fmt: skip
            fold_task = {"fold": run.fold, "eval_name": OOF_NAME, "eval_datalist": held}
        if steps:
            from medtune.finetune.bundle_glue import datalist

            n_labels = (len(overrides["train_datalist"]) if run.fold is not None
                        else len(datalist(str(dataset), "training", run.budget.fraction, run.seed)))  # fmt: skip
            bs = _preset_int(preset, overrides, "batch_size")
            overrides["epochs"], overrides["val_interval"] = step_budget(n_labels, bs, steps, validations)
            overrides["min_train_steps"] = 0  # exactly `steps`: the preset's floor would lengthen small budgets
        elif validations:
            epochs = _preset_int(preset, overrides, "epochs")
            overrides["epochs"], overrides["val_interval"] = step_budget(1, 1, epochs, validations)
        tasks.append(
            {
                "key": run.key,
                "arm": run.arm.alias,
                "budget": run.budget.text,
                "seed": run.seed,
                "dataset": str(dataset),
                "preset": preset,
                "out": str(run_dir(study, run)),
                "threads": threads,
                "prune_models": prune_models,
                "overrides": overrides,
                "steps": steps,
                **fold_task,
            }
        )
    n_total, n_done0 = len(runs), len(runs) - len(tasks)
    weights = {t["key"]: max(0.05, t["overrides"]["label_fraction"]) for t in tasks}
    t0 = time.time()
    done_w = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_total, initial=n_done0, desc="study", unit="run", file=sys.stderr, dynamic_ncols=True)
        if n_done0:
            bar.write(f"study: {n_done0} of {n_total} runs already done (skipped)")
    total_w = sum(weights.values())
    ctx = get_context("spawn")
    # a fresh worker per run frees each run's memory (Python >= 3.11; on 3.10 workers are reused)
    fresh: dict[str, Any] = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx, **fresh) as pool:
        pending = {pool.submit(execute_run, t): t for t in tasks}
        while pending:
            completed, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in completed:
                task = pending.pop(fut)
                try:
                    rec = fut.result()  # a failed run stops the study with its error; finished runs stay recorded
                except BaseException:
                    for other in pending:  # runs not started yet are not run (the pool would run them all first)
                        other.cancel()
                    raise
                _append(results_path, rec)
                results[rec["key"]] = rec
                done_w += weights[task["key"]]
                elapsed = time.time() - t0
                eta = elapsed / done_w * (total_w - done_w) if done_w else None
                auc = rec["metrics"].get("auc") or rec["metrics"].get("mean_dice") or {}
                value = auc.get("value") if isinstance(auc, dict) else auc
                line = (
                    f"{rec['key']}: {rec['metric_name'] or 'metric'} "
                    f"{value if value is None else round(float(value), 4)} ({rec['wall_seconds']:.0f}s)"
                )
                if bar is not None:
                    bar.set_postfix_str(f"ETA {_fmt_seconds(eta) if eta is not None else '?'}")
                    bar.update(1)
                    bar.write(line)
    if bar is not None:
        bar.close()
    return _report(study, dataset, plan, runs, results, folds)


def _report(
    study: Path, dataset: Path, plan: dict[str, Any], runs: list[Run], results: dict[str, dict[str, Any]],
    folds: int | None,
) -> dict[str, Any]:  # fmt: skip
    """The report from the finished runs; with ``folds``, from the pooled out-of-fold record of every arm x budget x
    seed whose K folds all finished (the fold runs stay listed in ``study.json`` under ``fold_runs``)."""
    from medtune.study.report import write_report

    ordered = [results[r.key] for r in runs if r.key in results]
    plan["runs_planned"], plan["runs_finished"] = len(runs), len(ordered)
    if not folds:
        return write_report(study, plan, ordered)
    from medtune.study.folds import fold_items, pool_oof

    items, fold_of, _ = fold_items(dataset, folds)
    by: dict[str, list[dict[str, Any]]] = {}
    for rec in ordered:
        by.setdefault(rec["key"].rsplit("/", 1)[0], []).append(rec)
    pooled = [pool_oof(study, dataset, recs, items, fold_of) for recs in by.values() if len(recs) == folds]
    plan["pooled_planned"], plan["pooled_finished"] = len(runs) // folds, len(pooled)
    return write_report(study, plan, pooled, fold_runs=ordered)
