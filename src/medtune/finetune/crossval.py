"""Honest estimates: an internal test split or k-fold cross-validation around ordinary bundle runs.

A run chooses its best epoch on the dataset's ``validation`` split, so the validation figure is optimistic
(issue 15: val 0.93 -> test 0.86 on BreastMNIST). This module adds the number users should quote:

- **internal test** (default, :func:`finetune_with_holdout`): a share of the ``training`` split (stratified by
  class, grouped by patient when entries carry a group key) is set aside before training; the model never
  trains on it and nothing is chosen on it; the best model is evaluated on it once. With ``refit_on_all``
  (config key) that run only gives the estimate (``RUN/internal_test_run/``): the deployed model in ``RUN`` is
  then trained with the same recipe on all the training cases (nnU-Net / Kaggle practice: estimate the recipe,
  deploy the recipe on every label).
- **k-fold cross-validation** (:func:`crossvalidate`, ``--folds K``): the ``training`` split is cut into K
  stratified, grouped folds; fold k trains on the other K-1 (epoch still chosen on ``validation``) and
  predicts fold k. The out-of-fold (OOF) predictions cover every training case exactly once and are pooled
  into one AUC (classification) or mean Dice (segmentation) with a percentile-bootstrap CI. The K fold models
  are the members of the exported ensemble (:mod:`medtune.export.ensemble`).

Each fold is an ordinary run (``FOLDS/fold<k>/``) whose ``train_datalist`` is overridden with plain data (a
list of entries; nothing is evaluated). Splits use scikit-learn's ``StratifiedGroupKFold``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtune.atomic import write_json_atomic
from medtune.errors import MedTuneError, one_line
from medtune.runfolder import CROSSVAL_JSON, ESTIMATE_JSON, ESTIMATE_RUN, SEED_MEMBERS  # the names' one owner

GROUP_KEYS = ("group", "patient", "patient_id", "subject")  # datalist entry keys naming a patient/group
DEFAULT_HOLDOUT = 0.2
MIN_HOLDOUT_PER_CLASS = 5  # below this an internal test is not carved (the CI would be meaningless)
SELECTION_LABEL = "validation (chose the epoch)"
MONITOR_LABEL = "validation (last epoch, nothing chosen on it)"  # model_selection=last
HONEST_LABELS = {
    "internal_test": "internal test (never used to train or choose)",
    "internal_test_refit": "internal test, scored by the same recipe trained without it (never used to train or "
    "choose)",
    "crossval": "cross-validated, out-of-fold (never used to train or choose)",
    "crossval_refit": "cross-validated, out-of-fold, scored by the fold models of the same recipe (never used to "
    "train or choose)",
}
METRIC_NAMES = ("AUC", "macro AUC", "mean Dice")
QUOTE = {
    "internal_test": (
        "Quote the internal-test figure: those cases neither trained the model nor chose its epoch; "
        "the validation figure chose the epoch and is optimistic."
    ),
    "internal_test_refit": (
        "Quote the internal-test figure: a model trained with the same recipe on the other training cases neither "
        "trained on those cases nor chose anything on them; the deployed model was then retrained on all the "
        "training cases (refit_on_all), so expect it to do as well or slightly better."
    ),
    "crossval": (
        "Quote the cross-validated (out-of-fold) figure: every training case was predicted once by a model that "
        "neither trained on it nor was chosen on it; a figure on images the models trained on or chose their epoch "
        "on (e.g. the fold ensemble on the validation split) is optimistic."
    ),
    "crossval_refit": (
        "Quote the cross-validated (out-of-fold) figure: every case was predicted once by a fold model of the same "
        "recipe that neither trained on it nor was chosen on it; the deployed model was then retrained on all the "
        "training cases (folds_deploy: refit), so expect it to do as well or slightly better."
    ),
}
FOLDS_DEPLOY = ("ensemble", "refit")  # what a --folds K run deploys: the K fold models averaged, or one refit


# ---------------------------------------------------------------------------------------------- splitting


def group_key(items: Sequence[dict[str, Any]]) -> str | None:
    """The datalist key naming a patient/group (the first of :data:`GROUP_KEYS` every entry carries), or None."""
    for key in GROUP_KEYS:
        if items and all(item.get(key) not in (None, "") for item in items):
            return key
    return None


def _strata(items: Sequence[dict[str, Any]]) -> np.ndarray:
    """Class labels for stratification (0 for segmentation / multi-label entries)."""
    return np.array([item["label"] if isinstance(item.get("label"), int) else 0 for item in items])


def assign_folds(items: Sequence[dict[str, Any]], k: int, seed: int = 0, group: str | None = "auto") -> list[int]:
    """Fold index (0..k-1) of every entry: stratified by class, all entries of one group in the same fold.

    ``group="auto"`` uses :func:`group_key`; ``None`` treats every entry as its own group.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n = len(items)
    if k < 2:
        raise MedTuneError(f"--folds must be at least 2, got {k}")
    key = group_key(items) if group == "auto" else group
    groups = np.array([str(item[key]) for item in items]) if key else np.arange(n).astype(str)
    if len(set(groups.tolist())) < k:
        raise MedTuneError(f"{k} folds need at least {k} cases/groups, the training split has {len(set(groups))}")
    y = _strata(items)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = [-1] * n
    import warnings

    with warnings.catch_warnings():  # "least populated class has only m members": handled, not an error
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, test) in enumerate(splitter.split(np.zeros(n), y, groups)):
            for i in test:
                folds[int(i)] = fold
    return folds


def carve_holdout(
    items: Sequence[dict[str, Any]], fraction: float = DEFAULT_HOLDOUT, seed: int = 0, group: str | None = "auto"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """``(train, internal_test, reason)``: one stratified grouped fold of about ``fraction`` of the entries.

    When the split is too small (fewer than :data:`MIN_HOLDOUT_PER_CLASS` expected internal-test cases in a
    class) nothing is carved and ``reason`` says why.
    """
    if not 0.0 < fraction < 0.5:
        raise MedTuneError(f"internal test fraction must be in (0, 0.5), got {fraction}")
    smallest = int(np.unique(_strata(items), return_counts=True)[1].min()) if items else 0
    if smallest * fraction < MIN_HOLDOUT_PER_CLASS:
        return (
            list(items),
            [],
            (
                f"training split too small for an internal test ({smallest} cases in its smallest class; "
                f"{MIN_HOLDOUT_PER_CLASS / fraction:.0f} needed): use --folds K for an honest estimate"
            ),
        )
    folds = assign_folds(items, max(2, round(1 / fraction)), seed, group)
    train = [item for item, f in zip(items, folds, strict=True) if f != 0]
    test = [item for item, f in zip(items, folds, strict=True) if f == 0]
    return train, test, None


def _case_ids(items: Sequence[dict[str, Any]], root: Path) -> list[str]:
    """Image paths relative to the dataset folder (what the split files record)."""
    out = []
    for item in items:
        p = Path(item["image"])
        out.append(p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name)
    return out


# ---------------------------------------------------------------------------------------------- prediction


def predict_classification(
    run: str | Path,
    items: Sequence[dict[str, Any]],
    flips: Sequence[Sequence[int]] | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Softmax probabilities ``(N, C)`` of a run's best model on ``items`` (the bundle's evaluation transforms).

    ``flips``: test-time augmentation, a list of spatial-axis sets (e.g. ``[[1]]`` = left-right for 2D images);
    the result is the mean of the probabilities over the identity and each flip, the rule the runtime applies
    (:mod:`medtune.runtime.tta`). ``None``: the run's own ``tta_flips`` (what its export will deploy).
    """
    import torch
    from monai.data import Dataset

    from medtune.finetune.runner import build_network_for_run

    net, parser, _ = build_network_for_run(run)
    if flips is None:
        flips = parser.get("tta_flips") or []
    ds = Dataset(data=list(items), transform=parser.get_parsed_content("eval_transforms"))
    images = [torch.as_tensor(np.asarray(ds[i]["image"], dtype=np.float32)) for i in range(len(ds))]
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.stack(images[start : start + batch_size])
            views = [x] + [torch.flip(x, dims=[2 + int(a) for a in axes]) for axes in flips]
            probs = torch.stack([torch.softmax(net(v), dim=1) for v in views]).mean(0)
            out.append(probs.numpy().astype(np.float64))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------- estimates


def _class_names(dataset: Path) -> tuple[list[str], int]:
    from medtune.finetune.bundle_glue import class_names, dataset_info

    info = dataset_info(str(dataset))
    return class_names(info), int(info.get("positive_label", 1))


def _metric_view(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline of a metrics dict: AUC/accuracy (classification) or mean Dice (segmentation), with n."""
    if metrics.get("task") == "segmentation" or "mean_dice" in metrics:
        return {"name": "mean Dice", "n": metrics["n"], "estimate": metrics["mean_dice"]}
    name = "AUC" if metrics.get("task") == "binary" else "macro AUC"
    return {"name": name, "n": metrics["n"], "estimate": metrics["auc"], "accuracy": metrics.get("accuracy")}


def estimate_record(kind: str, selection: dict[str, Any] | None, honest: dict[str, Any], **extra: Any) -> dict:
    """What ``RUN/estimate.json`` holds: the selection metric, the honest one, and the sentence saying which."""
    return {
        "format": "medtune.estimate/1",
        "kind": kind,
        "selection": None
        if selection is None
        else {"label": MONITOR_LABEL if selection.get("rule") == "last" else SELECTION_LABEL, **selection},
        "honest": {"label": HONEST_LABELS[kind], **honest},
        "quote": QUOTE[kind],
        **extra,
    }


def read_estimate(run: str | Path) -> dict[str, Any] | None:
    """``RUN/estimate.json`` checked to be plain data of the expected shape, or None when absent/invalid."""
    path = Path(run) / ESTIMATE_JSON
    if not path.is_file():
        return None
    try:
        est = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(est, dict) or est.get("format") != "medtune.estimate/1" or est.get("kind") not in QUOTE:
        return None
    out: dict[str, Any] = {"format": est["format"], "kind": est["kind"], "quote": QUOTE[est["kind"]]}
    for role, label in (("selection", SELECTION_LABEL), ("honest", HONEST_LABELS[est["kind"]])):
        row = est.get(role)  # the report renders only known words and numbers from this untrusted file
        if not isinstance(row, dict) or row.get("name") not in METRIC_NAMES:
            continue
        if role == "selection" and row.get("rule") == "last":
            label = MONITOR_LABEL
        raw = row.get("estimate")
        e: dict[str, Any] = raw if isinstance(raw, dict) else {}
        nums = {k: float(e[k]) if isinstance(e.get(k), int | float) else None for k in ("value", "ci_low", "ci_high")}
        n = row.get("n") if isinstance(row.get("n"), int) else None
        out[role] = {"label": label, "name": row["name"], "n": n, "estimate": nums}
    return out if "honest" in out else None


def refit_on_all(preset: str, overrides: dict[str, Any]) -> bool:
    """The ``refit_on_all`` config key (preset default, ``--set refit_on_all=True`` wins)."""
    from medtune.finetune.runner import raw_config

    value = {**raw_config(preset), **overrides}.get("refit_on_all", False)
    if not isinstance(value, bool):
        raise MedTuneError(f"refit_on_all must be true or false, got {value!r}")
    return value


def folds_deploy(preset: str, overrides: dict[str, Any]) -> str:
    """The ``folds_deploy`` config key: what ``--folds K`` deploys (``ensemble``: the K fold models averaged;
    ``refit``: the same recipe retrained on all the training cases after the folds gave the estimate)."""
    from medtune.finetune.runner import raw_config

    value = {**raw_config(preset), **overrides}.get("folds_deploy", "ensemble")
    if value not in FOLDS_DEPLOY:
        raise MedTuneError(f"folds_deploy must be one of {', '.join(FOLDS_DEPLOY)}, got {value!r}")
    return str(value)


def seed_ensemble(preset: str, overrides: dict[str, Any]) -> int:
    """The ``seed_ensemble`` config key: how many seeds of the deployed recipe the deployed model averages (1: one)."""
    from medtune.finetune.runner import raw_config

    value = {**raw_config(preset), **overrides}.get("seed_ensemble", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MedTuneError(f"seed_ensemble must be an integer >= 1, got {value!r}")
    return value


def seed_member_runs(run: str | Path, seed: int, n: int) -> list[Path]:
    """The run folders of a seed ensemble's other members (``RUN/seed_members/seed<s>/``, seeds after ``seed``)."""
    return [Path(run) / SEED_MEMBERS / f"seed{seed + k}" for k in range(1, n)]


def ensemble_runs(run: str | Path) -> list[Path]:
    """The member runs of what ``medtune export`` deploys from ``run`` as one ensemble, or [] for a single model:
    a ``--folds K`` folder's fold runs, or a ``seed_ensemble`` run (``RUN`` first, then ``RUN/seed_members/*``)."""
    run = Path(run)
    if (run / CROSSVAL_JSON).is_file():
        if _crossval_deploy(run) == "refit":  # folds_deploy refit: RUN itself is the deployed model
            if _run_status(run) not in ("completed", "early_stopped") or not (run / "model.pt").is_file():
                raise MedTuneError("the cross-validation's refit model is not trained yet (resume the run)", run)
            return []
        return fold_runs(run)
    if not (run / SEED_MEMBERS).is_dir():
        return []
    try:
        split = json.loads((run / "internal_test.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedTuneError("seed ensemble without a readable internal_test.json", run / "internal_test.json") from exc
    n, seed = split.get("seed_ensemble") if isinstance(split, dict) else None, split.get("seed")
    if not isinstance(n, int) or not isinstance(seed, int) or isinstance(n, bool) or n < 1:
        raise MedTuneError("internal_test.json records no seed_ensemble size and seed", run / "internal_test.json")
    runs = [run, *seed_member_runs(run, seed, n)]
    done = ("completed", "early_stopped")
    unfinished = [r for r in runs if _run_status(r) not in done or not (r / "model.pt").is_file()]
    if unfinished:
        raise MedTuneError("seed-ensemble member not finished (resume the run to complete it)", unfinished[0])
    return runs


def _crossval_deploy(run: Path) -> str:
    """``deploy`` of ``RUN/crossval.json`` (read as data): ``refit`` or ``ensemble`` (older files: ensemble)."""
    try:
        rec = json.loads((run / CROSSVAL_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedTuneError("unreadable crossval.json", run / CROSSVAL_JSON) from exc
    return "refit" if isinstance(rec, dict) and rec.get("deploy") == "refit" else "ensemble"


def _run_status(run: Path) -> str:
    """``status`` of ``RUN/run.json`` (read as data) or "" when there is no readable record."""
    try:
        rec = json.loads((run / "run.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return ""
    return str(rec.get("status") or "") if isinstance(rec, dict) else ""


def _train_or_resume(dataset: Path, preset: str, run: Path, ov: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """One stage of a refit run: skipped when finished, continued from its checkpoint, else trained afresh."""
    from medtune.finetune.runner import finetune, read_run
    from medtune.runfolder import CHECKPOINT_LAST

    if _run_status(run) in ("completed", "early_stopped"):
        return {**read_run(run), "skipped": True}
    if (run / CHECKPOINT_LAST).is_file():
        return finetune(dataset, preset, run, resume=True, **kwargs)
    return finetune(dataset, preset, run, overrides=ov, **kwargs)


def finetune_with_holdout(
    dataset: str | Path,
    preset: str,
    out: str | Path,
    *,
    fraction: float = DEFAULT_HOLDOUT,
    overrides: dict[str, Any] | None = None,
    progress_bar: bool = True,
    quiet: bool = True,
    resume: bool = False,
    **run_kwargs: Any,
) -> dict[str, Any]:
    """Fine-tune on the training split minus an internal test, then evaluate the best model on that test once.

    Writes the usual run folder plus ``RUN/internal_test.json`` (the case list), ``RUN/eval_internal_test/`` (full
    report) and ``RUN/estimate.json``; returns the run record with ``estimate`` added. ``fraction=0``: a plain run.

    ``refit_on_all`` (config key): the run without the internal test goes to ``RUN/internal_test_run/`` and gives
    the estimate (its ``eval_internal_test/``); ``RUN`` then trains the deployed model with the same recipe on
    all the training cases. ``resume=True`` continues either stage (a finished stage is not retrained).
    """
    from medtune.data.contract import load_datalist
    from medtune.finetune.bundle_glue import label_subset
    from medtune.finetune.runner import evaluate_run, finetune, raw_config

    dataset, out = Path(dataset).resolve(), Path(out).resolve()
    ov = dict(overrides or {})
    asked = seed_ensemble(preset, ov)  # validated once; a resumed run takes its split file's instead
    if not fraction and asked > 1:
        raise MedTuneError("seed_ensemble > 1 trains its members after the internal test's estimate run: keep "
                           "--internal-test above 0 (or set seed_ensemble 1)")  # fmt: skip
    if not fraction or "train_datalist" in ov:
        return finetune(dataset, preset, out, resume=resume, overrides=ov, progress_bar=progress_bar, quiet=quiet,
            **run_kwargs)  # fmt: skip
    seed = int(ov.get("seed", 0))
    kwargs = dict(progress_bar=progress_bar, quiet=quiet, **run_kwargs)
    split_file = out / "internal_test.json"
    if resume and not split_file.is_file():
        return finetune(dataset, preset, out, resume=True, overrides=ov, **kwargs)
    items = load_datalist(dataset, "training")
    if resume:  # run.json's overrides (with its train_datalist) are reused by finetune()
        split = json.loads(split_file.read_text(encoding="utf-8"))
        if not isinstance(split, dict) or not isinstance(split.get("cases"), list):
            raise MedTuneError("not a MedTune split file (no case list)", split_file)
        test_ids = {str(c) for c in split["cases"]}
        seed = split["seed"] if isinstance(split.get("seed"), int) else seed  # the carve's seed, not a new one
        refit = split.get("refit") is True
        n_seeds = split.get("seed_ensemble", 1)
        if not isinstance(n_seeds, int) or isinstance(n_seeds, bool) or n_seeds < 1 or (n_seeds > 1 and not refit):
            raise MedTuneError("invalid seed_ensemble in the split file", split_file)
        ids = _case_ids(items, dataset)
        test = [i for i, c in zip(items, ids, strict=True) if c in test_ids]
        train = [i for i, c in zip(items, ids, strict=True) if c not in test_ids]
        lf = split.get("label_fraction", 1.0)
        lf = float(lf) if isinstance(lf, int | float) and 0 < lf <= 1 else 1.0
    else:
        train, test, reason = carve_holdout(items, fraction, seed)
        if not test and asked > 1:  # its members retrain the recipe after the estimate's run
            raise MedTuneError(f"seed_ensemble {asked} needs an internal test to refit after, and "
                               f"{reason}", dataset / "datalist.json")  # fmt: skip
        if not test:
            rec = finetune(dataset, preset, out, overrides=ov, **kwargs)
            rec["estimate"] = {"skipped": reason}
            return rec
        refit = refit_on_all(preset, ov)
        n_seeds = asked
        if n_seeds > 1 and not refit:
            raise MedTuneError("seed_ensemble > 1 needs refit_on_all: its members are the deployed recipe retrained on "
                               "all the training cases")  # fmt: skip
        lf = float(ov.pop("label_fraction", 1.0))
        if (out / "checkpoint_last.pt").exists() or (out / "model.pt").exists() or (out / ESTIMATE_RUN).exists():
            raise MedTuneError(
                "run folder already holds a checkpoint; pass --resume to continue it or choose another --out", out
            )
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            split_file,
            {
                "format": "medtune.split/1",
                "fraction": fraction,
                "seed": seed,
                "group_key": group_key(items),
                "cases": _case_ids(test, dataset),
                "refit": refit,
                "seed_ensemble": n_seeds,
                "label_fraction": lf,
            },
        )
    ov.pop("label_fraction", None)
    train_subset = label_subset(train, lf, seed)
    if refit and resume and not (out / "run.json").is_file() and (out / ESTIMATE_RUN / "run.json").is_file():
        from medtune.finetune.runner import read_run  # the second run was not started: the first's settings

        ov = {**read_run(out / ESTIMATE_RUN, replaced=ov)["overrides"], **ov}
    if refit:  # the estimate's run first, then the deployed model on its cases plus the internal test's
        _train_or_resume(dataset, preset, out / ESTIMATE_RUN, {**ov, "train_datalist": train_subset}, **kwargs)
        every = train_subset + label_subset(test, lf, seed)
        for member in seed_member_runs(out, seed, n_seeds):  # before RUN: RUN's end is the job's end
            member_ov = {**ov, "train_datalist": every, "seed": int(member.name[len("seed"):]), "seed_ensemble": 1}
            _train_or_resume(dataset, preset, member, member_ov, **kwargs)
        rec = _train_or_resume(dataset, preset, out, {**ov, "train_datalist": every}, **kwargs)
    elif resume:
        rec = finetune(dataset, preset, out, resume=True, overrides=ov, **kwargs)
    else:
        rec = finetune(dataset, preset, out, overrides={**ov, "train_datalist": train_subset}, **kwargs)
    est_run = out / ESTIMATE_RUN if refit else out
    sel = evaluate_run(out, quiet=quiet)["metrics"]
    hon = evaluate_run(est_run, quiet=quiet, datalist=test, name="internal_test")["metrics"]
    used = {**raw_config(preset), **json.loads((out / "run.json").read_text(encoding="utf-8"))["overrides"]}
    rule = "best" if used.get("early_stop_patience") else str(used.get("model_selection", "best"))
    kind = "internal_test_refit" if refit else "internal_test"
    extra: dict[str, Any] = {}
    if refit:
        extra["refit"] = {"estimate_run": ESTIMATE_RUN, "n_estimate_run": len(train_subset), "n_deployed": len(every)}
        if n_seeds > 1:
            extra["refit"]["seed_ensemble"] = n_seeds
    est = estimate_record(
        kind,
        {**_metric_view(sel), "rule": rule},
        _metric_view(hon),
        fraction=fraction,
        report=f"{ESTIMATE_RUN}/eval_internal_test/report.md" if refit else "eval_internal_test/report.md",
        **extra,
    )
    write_json_atomic(out / ESTIMATE_JSON, est)
    evaluate_run(out, quiet=quiet)  # re-render eval/report.md with the side-by-side table
    rec["estimate"] = est
    return rec


def crossvalidate(
    dataset: str | Path,
    preset: str,
    out: str | Path,
    folds: int = 5,
    *,
    overrides: dict[str, Any] | None = None,
    tta_flips: Sequence[Sequence[int]] = (),
    extra_split: str | None = None,
    pool_validation: bool | None = None,
    progress_bar: bool = True,
    quiet: bool = True,
    n_bootstrap: int = 1000,
    fold_seed: int | None = None,
    resume: bool = False,
    **run_kwargs: Any,
) -> dict[str, Any]:
    """K-fold cross-validation on the training split; pooled out-of-fold estimate with a bootstrap CI.

    ``resume=True`` continues an interrupted cross-validation in ``out`` by fold (:func:`resume_plan`): finished
    folds are not retrained (their held-out cases are predicted again, from their saved models), an interrupted
    fold continues from its last checkpoint (or is retrained when it saved none), and a different ``folds``,
    changed settings or a changed dataset are refused with a one-line error.

    ``pool_validation=True`` (nnU-Net style, needs ``model_selection="last"``: a fixed schedule whose final
    weights are kept): the ``validation`` split joins the folds, so every labelled case trains K-1 fold models
    and is predicted once; each fold model is validated on its own held-out fold at the last epoch only (a
    monitor, nothing is chosen on it), and there is no selection figure. ``None`` (default): pooled exactly when
    the run's ``model_selection`` is ``last`` (the 2D classification preset's default).

    ``OUT/fold<k>/`` are ordinary runs; ``OUT/oof/`` holds the pooled report (classification: report.md,
    predictions.csv; segmentation: per-case table and report); ``OUT/crossval.json`` the folds, per-fold figures
    and the pooled estimate; ``OUT/estimate.json`` the side-by-side record. ``tta_flips`` adds flip-averaged OOF
    figures (classification). ``fold_seed`` seeds the fold assignment (default: the training ``seed``); fixing it
    while the training seed varies keeps every case in the same fold, so per-case OOF probabilities of several
    seeds can be averaged into an out-of-fold seed-ensemble estimate. ``extra_split``: a labelled split (e.g.
    ``testing``) also predicted by every fold model and by their ensemble (mean probability), reported per member
    and for the ensemble.

    ``folds_deploy: refit`` (config key): after the folds, ``OUT`` itself trains the deployed model with the same
    recipe on all the training cases (validated on the ``validation`` split as a single run is), so ``OUT`` is an
    ordinary run that export and evaluate take as one model; ``OUT/estimate.json`` (kind ``crossval_refit``) puts
    its validation figure next to the out-of-fold one. ``ensemble`` (default): the K fold models are the model.
    """
    from medtune.data.contract import load_datalist, read_dataset_json
    from medtune.evaluate import classification_metrics, write_classification_report
    from medtune.finetune.bundle_glue import data_warning, label_subset
    from medtune.finetune.runner import evaluate_run, finetune, raw_config

    dataset, out = Path(dataset).resolve(), Path(out).resolve()
    info = read_dataset_json(dataset)
    task = info["task"]
    ov = dict(overrides or {})
    if resume:  # the interrupted run's settings; a value given now must be the same
        ov = _resumed_overrides(out, preset, ov)
    if seed_ensemble(preset, ov) > 1:
        raise MedTuneError("seed_ensemble applies to single runs; --folds K already deploys its K fold models as one "
                           "ensemble", out)  # fmt: skip
    deploy = folds_deploy(preset, ov)
    seed = int(ov.get("seed", 0))
    fraction = float(ov.pop("label_fraction", 1.0))
    items = load_datalist(dataset, "training")
    training_split = list(items)  # what a refit deploys on (the validation split stays its monitor)
    epochs = int(ov.get("epochs", raw_config(preset)["epochs"]))
    cfg = raw_config(preset)
    selection_rule = ov.get("model_selection", cfg.get("model_selection", "best"))
    if ov.get("early_stop_patience", cfg.get("early_stop_patience", 0)):
        selection_rule = "best"  # early stopping chooses an epoch (medtune.finetune.handlers.RunStateHandler)
    if pool_validation is None:
        pool_validation = selection_rule == "last"
    if pool_validation:
        if selection_rule != "last":
            raise MedTuneError(
                "cross-validation over training + validation needs model_selection=last (a fixed schedule): "
                "with best-epoch selection the held-out fold would choose its own model"
            )
        items = items + load_datalist(dataset, "validation")
    fold_seed = seed if fold_seed is None else int(fold_seed)
    fold_of = assign_folds(items, folds, fold_seed)
    ids = _case_ids(items, dataset)
    settings = {
        "preset": preset,
        "overrides": {**ov, **({"label_fraction": fraction} if fraction != 1.0 else {})},
        "tta_flips": [list(f) for f in tta_flips],
        "extra_split": extra_split,
        "pooled_validation": pool_validation,
    }
    labels = _data_fingerprint(ids, items)
    previous: dict[str, Any] = {}
    if resume:
        previous = _check_resumable(out, folds, settings, labels, dict(zip(ids, fold_of, strict=True)))
    elif (out / CROSSVAL_JSON).exists():
        raise MedTuneError("folder already holds a cross-validation; pass --resume to continue it or choose "
            "another --out", out)  # fmt: skip
    elif deploy == "refit" and any((out / n).exists() for n in ("checkpoint_last.pt", "model.pt")):
        raise MedTuneError("run folder already holds a model (the refit trains in it); choose another --out", out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "format": "medtune.crossval/1",
        "preset": preset,
        "dataset": str(dataset),
        "folds": folds,
        "seed": seed,
        "fold_seed": fold_seed,
        "group_key": group_key(items),
        "pooled_validation": pool_validation,
        "deploy": deploy,
        "settings": settings,
        "data_sha256": labels,
        "assignment": dict(zip(ids, fold_of, strict=True)),
        "started": previous.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        "members": [],
        "status": "running",
    }
    if resume:
        record["resumed"] = [*previous.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S")]
    write_json_atomic(out / CROSSVAL_JSON, record)
    extra = load_datalist(dataset, extra_split) if extra_split else []
    class_names, positive = _class_names(dataset) if task == "classification" else ([], 1)
    oof_probs: dict[str, np.ndarray] = {}
    oof_tta: dict[str, np.ndarray] = {}
    seg_cases: list[dict[str, Any]] = []
    extra_probs: list[np.ndarray] = []
    extra_tta: list[np.ndarray] = []
    t0 = time.time()
    for k in range(folds):
        train = [it for it, f in zip(items, fold_of, strict=True) if f != k]
        test = [it for it, f in zip(items, fold_of, strict=True) if f == k]
        fold_ov = {**ov, "train_datalist": label_subset(train, fraction, seed)}
        if pool_validation:  # validated once, at the end, on the held-out fold: a monitor, not a choice
            fold_ov.update(val_datalist=test, val_interval=epochs)
        run_dir = out / f"fold{k}"
        state = fold_state(run_dir) if resume else "new"
        if state == "done":  # finished before the interruption: its saved model predicts its fold again
            rec = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        else:
            if state == "partial":  # stopped before its first checkpoint: retrained, the old folder kept aside
                _set_aside(run_dir)
            rec = finetune(dataset, preset, run_dir, overrides=fold_ov, progress_bar=progress_bar, quiet=quiet,
                resume=state == "interrupted", **run_kwargs)  # fmt: skip
        member = {
            "fold": k,
            "run": run_dir.name,
            "n_train": len(fold_ov["train_datalist"]),
            "n_test": len(test),
            "best_validation": rec["best_metric"],
            "seconds": rec.get("seconds"),
        }
        if task == "classification":
            probs = predict_classification(run_dir, test, flips=[])  # single model, no test-time flips
            for cid, p in zip(_case_ids(test, dataset), probs, strict=True):
                oof_probs[cid] = p
            y = np.array([int(it["label"]) for it in test])
            member["test_auc"] = _auc(y, probs, positive)
            if tta_flips:
                tprobs = predict_classification(run_dir, test, tta_flips)
                for cid, p in zip(_case_ids(test, dataset), tprobs, strict=True):
                    oof_tta[cid] = p
                member["test_auc_tta"] = _auc(y, tprobs, positive)
            if extra:
                ye = np.array([int(it["label"]) for it in extra])
                extra_probs.append(predict_classification(run_dir, extra, flips=[]))
                member[f"{extra_split}_auc"] = _auc(ye, extra_probs[-1], positive)
                if tta_flips:
                    extra_tta.append(predict_classification(run_dir, extra, tta_flips))
                    member[f"{extra_split}_auc_tta"] = _auc(ye, extra_tta[-1], positive)
        else:
            metrics = evaluate_run(run_dir, quiet=quiet, datalist=test, name="oof")["metrics"]
            member["test_mean_dice"] = metrics["mean_dice"]["value"]
            # the evaluator keeps datalist order (no shuffle): name each case by its image, unique across folds
            for case, cid in zip(metrics["cases"], _case_ids(test, dataset), strict=True):
                seg_cases.append({**case, "case": cid})
        record["members"].append(member)
        write_json_atomic(out / CROSSVAL_JSON, record)

    if len(oof_probs) + len(seg_cases) != len(items):
        raise MedTuneError(f"out-of-fold predictions cover {len(oof_probs) + len(seg_cases)} of {len(items)} cases")
    ctx = {
        "title": f"MedTune {folds}-fold cross-validation (out-of-fold)",
        "data_warning": data_warning(info),
        "dataset": info.get("name"),
        "split": f"training, {folds}-fold out-of-fold",
        "model": ov.get("arch"),
        "pretrained": ov.get("pretrained"),
    }
    if task == "classification":
        y_all = np.array([int(it["label"]) for it in items])
        p_all = np.stack([oof_probs[c] for c in ids])
        pooled = classification_metrics(y_all, p_all, class_names, positive_class=positive, n_bootstrap=n_bootstrap)
        _write_oof_csv(out / "oof" / "predictions.csv", ids, y_all, fold_of, p_all, class_names)
        record["pooled"] = _metric_view(pooled)
        if tta_flips:
            p_tta = np.stack([oof_tta[c] for c in ids])
            _write_oof_csv(out / "oof" / "predictions_tta.csv", ids, y_all, fold_of, p_tta, class_names)
            pooled_tta = classification_metrics(
                y_all, p_tta, class_names, positive_class=positive, n_bootstrap=n_bootstrap
            )
            record["pooled_tta"] = {**_metric_view(pooled_tta), "flips": [list(f) for f in tta_flips]}
        if extra:
            ye = np.array([int(it["label"]) for it in extra])
            ens = np.mean(extra_probs, axis=0)
            record[f"{extra_split}_ensemble"] = _metric_view(
                classification_metrics(ye, ens, class_names, positive_class=positive, n_bootstrap=n_bootstrap)
            )
            record[f"{extra_split}_member_auc_mean"] = float(
                np.mean([m[f"{extra_split}_auc"] for m in record["members"]])
            )
            if tta_flips:
                ens_t = np.mean(extra_tta, axis=0)
                record[f"{extra_split}_ensemble_tta"] = _metric_view(
                    classification_metrics(ye, ens_t, class_names, positive_class=positive, n_bootstrap=n_bootstrap)
                )
    else:
        from medtune.evaluate.segmentation import summarise_case_dice

        pooled_seg = summarise_case_dice(seg_cases, n_bootstrap=n_bootstrap)
        record["pooled"] = {"name": "mean Dice", "n": pooled_seg["n"], "estimate": pooled_seg["mean_dice"]}
    sel = [m["best_validation"]["value"] for m in record["members"]]
    selection: dict[str, Any] | None = {
        "name": record["pooled"]["name"],
        "n": None,
        "estimate": {"value": float(np.mean(sel)), "ci_low": None, "ci_high": None},
        "note": f"mean over the {folds} fold models of the best validation value",
    }
    if pool_validation:  # nothing was selected: the fold models' last-epoch figures are the out-of-fold ones
        selection = None
    if deploy == "refit":  # the deployed model: the same recipe on every training case, in OUT itself
        every = label_subset(training_split, fraction, seed)
        _train_or_resume(dataset, preset, out, {**ov, "train_datalist": every}, progress_bar=progress_bar,
                         quiet=quiet, **run_kwargs)  # fmt: skip
        used = {**cfg, **json.loads((out / "run.json").read_text(encoding="utf-8"))["overrides"]}
        rule = "best" if used.get("early_stop_patience") else str(used.get("model_selection", "best"))
        selection = {**_metric_view(evaluate_run(out, quiet=quiet)["metrics"]), "rule": rule}
        record["refit"] = {"n_deployed": len(every), "seconds": _read_seconds(out)}
        est = estimate_record("crossval_refit", selection, record["pooled"], folds=folds, report="oof/report.md",
                              refit={"n_deployed": len(every)})  # fmt: skip
    else:
        est = estimate_record("crossval", selection, record["pooled"], folds=folds, report="oof/report.md")
    ctx["estimates"] = est
    if task == "classification":
        write_classification_report(out / "oof", pooled, class_names, None, ctx)
    else:
        _write_seg_oof_report(out / "oof", pooled_seg, ctx)
    record.update(status="completed", seconds=round(time.time() - t0, 1), estimate=est)
    write_json_atomic(out / CROSSVAL_JSON, record)
    write_json_atomic(out / ESTIMATE_JSON, est)
    if deploy == "refit":
        evaluate_run(out, quiet=quiet)  # re-render eval/report.md with the side-by-side table
    return record


def _read_seconds(run: Path) -> float | None:
    try:
        rec = json.loads((run / "run.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = rec.get("seconds") if isinstance(rec, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def fold_state(run_dir: Path) -> str:
    """What a resumed cross-validation does with fold run ``run_dir``: ``done`` (completed, has its model: not
    retrained), ``interrupted`` (has ``checkpoint_last.pt``: continued), ``partial`` (files but no checkpoint:
    retrained) or ``new``."""
    from medtune.runfolder import BEST_MODEL, CHECKPOINT_LAST, RUN_JSON

    try:
        status = json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status in ("completed", "early_stopped") and (run_dir / BEST_MODEL).is_file():
        return "done"
    if (run_dir / CHECKPOINT_LAST).is_file():
        return "interrupted"
    return "partial" if run_dir.is_dir() and any(run_dir.iterdir()) else "new"


def _set_aside(run_dir: Path) -> None:
    """Move a fold run that cannot be continued to ``fold<k>.partial`` (replacing an older one), not deleted."""
    import shutil

    aside = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(aside, ignore_errors=True)
    run_dir.rename(aside)


def _data_fingerprint(ids: Sequence[str], items: Sequence[dict[str, Any]]) -> str:
    """sha256 of the cases and their labels, in order (a resumed cross-validation must see the same data)."""
    import hashlib

    labels = [it.get("label") if isinstance(it.get("label"), int) else None for it in items]
    rows = [list(pair) for pair in zip(ids, labels, strict=True)]
    return hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()


def read_crossval(out: str | Path) -> dict[str, Any]:
    """``OUT/crossval.json`` as a dict (one-line error naming the file when absent or invalid)."""
    path = Path(out) / CROSSVAL_JSON
    if not path.is_file():
        raise MedTuneError("not a MedTune cross-validation folder (crossval.json missing)", path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedTuneError(f"invalid JSON ({one_line(exc, 80)})", path) from exc
    if not isinstance(record, dict) or record.get("format") != "medtune.crossval/1":
        raise MedTuneError("not a medtune.crossval/1 record", path)
    return record


def _resumed_overrides(out: Path, preset: str, given: dict[str, Any]) -> dict[str, Any]:
    """The recorded overrides of the interrupted cross-validation in ``out`` (checked as untrusted data), with
    ``given`` refused (one line) where it changes one of them."""
    from medtune.finetune.runner import check_file_overrides

    path = out / CROSSVAL_JSON
    if not path.is_file():
        raise MedTuneError("nothing to resume: no crossval.json (start the cross-validation without --resume)", out)
    settings = read_crossval(out).get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("overrides"), dict):
        raise MedTuneError("records no settings (written before resume by fold existed); choose another --out",
            path)  # fmt: skip
    recorded = settings["overrides"]
    check_file_overrides(recorded, preset, "train", path)
    for key, value in given.items():
        if key not in recorded or recorded[key] != value:
            raise MedTuneError(f"setting {key} = {value!r} differs from the interrupted cross-validation's "
                f"{recorded.get(key, '(preset default)')!r}; resume with its settings or choose another --out",
                path)  # fmt: skip
    return {**recorded, **given}


def _check_resumable(
    out: Path, folds: int, settings: dict[str, Any], labels: str, assignment: dict[str, int]
) -> dict[str, Any]:
    """The interrupted record in ``out``, after refusing (one line) a different K, settings or dataset."""
    path = out / CROSSVAL_JSON
    if not path.is_file():
        raise MedTuneError("nothing to resume: no crossval.json (start the cross-validation without --resume)", out)
    prev = read_crossval(out)
    if prev.get("folds") != folds:
        raise MedTuneError(f"--folds {folds} differs from the interrupted {prev.get('folds')}-fold "
            "cross-validation; resume it with the same K or choose another --out", path)  # fmt: skip
    old = prev.get("settings")
    if isinstance(old, dict):
        for key in ("preset", "tta_flips", "extra_split", "pooled_validation"):
            if old.get(key) != settings[key]:
                raise MedTuneError(f"{key} {settings[key]!r} differs from the interrupted cross-validation's "
                    f"{old.get(key)!r}; choose another --out", path)  # fmt: skip
        before, now = old.get("overrides") or {}, settings["overrides"]
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            k = changed[0]
            raise MedTuneError(f"setting {k} = {now.get(k)!r} differs from the interrupted cross-validation's "
                f"{before.get(k)!r}; resume with its settings or choose another --out", path)  # fmt: skip
    if prev.get("data_sha256", labels) != labels or prev.get("assignment") != assignment:
        raise MedTuneError("the dataset changed since the cross-validation started (other cases or labels); "
            "choose another --out", path)  # fmt: skip
    return prev


def _write_seg_oof_report(folder: Path, pooled: dict[str, Any], ctx: dict[str, Any]) -> None:
    """``metrics.json`` and a short ``report.md`` for pooled out-of-fold Dice (per-fold reports hold the details)."""
    from medtune.atomic import write_bytes_atomic
    from medtune.evaluate.metrics import format_estimate
    from medtune.evaluate.report import estimates_section

    write_json_atomic(folder / "metrics.json", pooled)
    lines = [
        f"# {ctx['title']}",
        "",
        f"**Mean Dice {format_estimate(pooled['mean_dice'], 3, ci=pooled['ci_level'])} over {pooled['n']} cases, "
        "each predicted by the fold model that did not train on it.**",
        "",
        estimates_section(ctx.get("estimates")),
        "",
        "| Class | mean Dice (95% CI) |",
        "|---|---|",
        *[f"| {name} | {format_estimate(e, 3)} |" for name, e in pooled["per_class_dice"].items()],
        "",
        f"Per-case figures: `{ctx.get('fold_reports', 'fold<k>/eval_oof/')}` (the full segmentation report of each "
        "fold on its held-out cases).",
    ]
    write_bytes_atomic(folder / "report.md", ("\n".join(lines) + "\n").encode("utf-8"))


def _auc(y: np.ndarray, probs: np.ndarray, positive: int) -> float | None:
    from medtune.evaluate import classification_metrics

    names = [str(i) for i in range(probs.shape[1])]
    m = classification_metrics(y, probs, names, positive_class=positive, n_bootstrap=0)
    return (m.get("auc") or {}).get("value")


def _write_oof_csv(path: Path, ids: list[str], y: np.ndarray, folds: list[int], p: np.ndarray, names: list[str]):
    from medtune.atomic import write_with

    def _csv(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["case", "fold", "label", *[f"p_{n}" for n in names]])
            for cid, f, lab, row in zip(ids, folds, y, p, strict=True):
                w.writerow([cid, f, int(lab), *[f"{v:.8f}" for v in row]])

    write_with(path, _csv)


def fold_runs(out: str | Path) -> list[Path]:
    """The member run folders of a finished cross-validation (``OUT/fold<k>``), in fold order."""
    out = Path(out)
    path = out / CROSSVAL_JSON
    if not path.is_file():
        raise MedTuneError("not a MedTune cross-validation folder (crossval.json missing)", path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedTuneError(f"invalid JSON ({exc.msg})", path) from exc
    if record.get("status") != "completed":
        raise MedTuneError("cross-validation did not complete", path)
    runs = [out / f"fold{int(m['fold'])}" for m in record.get("members", [])]
    missing = [r for r in runs if not (r / "model.pt").is_file()]
    if not runs or missing:
        raise MedTuneError("fold run without model.pt", missing[0] if missing else path)
    return runs


def default_folds(dataset: str | Path, preset: str, overrides: dict[str, Any] | None = None) -> int:
    """How many folds ``medtune finetune`` runs when ``--folds`` is not given (0: one run + internal test).

    The preset's ``default_folds`` (``--set default_folds=5``; the shipped presets say 0 because the Slicer panel,
    Studio and ``--resume`` follow one run folder) when the labelled images (training + validation) number at most
    ``default_folds_max_images`` and every class has at least ``default_folds`` of them; else 0.
    """
    from medtune.data.contract import load_datalist
    from medtune.finetune.runner import raw_config

    cfg = {**raw_config(preset), **(overrides or {})}
    k = cfg.get("default_folds", 0)
    limit = cfg.get("default_folds_max_images", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 2 or not isinstance(limit, int):
        return 0
    items = list(load_datalist(dataset, "training")) + list(load_datalist(dataset, "validation"))
    if limit and len(items) > limit:
        return 0
    counts = np.unique(_strata(items), return_counts=True)[1] if items else np.array([0])
    return k if int(counts.min()) >= k else 0


def evaluate_ensemble(
    out: str | Path, dataset: str | Path | None = None, split: str = "validation", quiet: bool = True
) -> dict[str, Any]:
    """Evaluate the ensemble of a finished cross-validation or ``seed_ensemble`` run on a split.

    The ensemble is what ``medtune export`` deploys (:func:`ensemble_runs`): the mean softmax probability of the
    members, each with its run's ``tta_flips``. Classification writes ``OUT/eval_<split>/`` (report.md,
    metrics.json, plots, predictions.csv); segmentation runs the members' mean (one module) through the first
    member's own evaluate workflow (sliding window, per-case Dice report) into ``OUT/eval_<split>/``. Returns
    ``{"eval_dir", "metrics"}`` like :func:`medtune.finetune.runner.evaluate_run`.
    """
    from medtune.data.contract import load_datalist, read_dataset_json
    from medtune.evaluate import classification_metrics, write_classification_report
    from medtune.finetune.bundle_glue import data_warning
    from medtune.finetune.runner import _check_dataset_fits, read_run

    out = Path(out).resolve()
    runs = ensemble_runs(out)
    if not runs:
        raise MedTuneError("not an ensemble: no fold runs (crossval.json) and no seed members", out)
    folds = (out / CROSSVAL_JSON).is_file()
    what = "fold" if folds else "seed"
    rec = read_run(runs[0])
    ds = Path(dataset).resolve() if dataset is not None else Path(str(rec["overrides"].get("dataset_dir", "")))
    if dataset is not None:
        _check_dataset_fits(rec["preset"], ds)
    members = ", ".join(r.relative_to(out).as_posix() if r != out else "RUN" for r in runs)
    note = (f"mean softmax probability of the {len(runs)} {what} models ({members}), each with its run's test-time "
            "flips: the model `medtune export` writes for this folder")  # fmt: skip
    cv = json.loads((out / CROSSVAL_JSON).read_text(encoding="utf-8")) if folds else {}
    notes = [note]
    if not folds and dataset is None and split == "training":
        notes.append("OPTIMISTIC: every member trained on the training images; quote the internal-test figure")
    seen = split == "training" or (split == "validation" and bool(cv.get("pooled_validation")))
    if folds and dataset is None and seen:
        notes.append(
            f"OPTIMISTIC: the {split} images trained {len(runs) - 1} of the {len(runs)} members; quote the "
            "cross-validated (out-of-fold) figure in oof/report.md"
        )
    est = read_estimate(out)
    title = f"MedTune {what} ensemble ({len(runs)} models) on split {split!r}"
    if read_dataset_json(ds)["task"] != "classification":  # through the first member's evaluate workflow
        from medtune.export.ensemble import mean_probability_ensemble
        from medtune.finetune.runner import build_network_for_run, evaluate_run

        ensemble = mean_probability_ensemble([build_network_for_run(r)[0] for r in runs])
        context: dict[str, Any] = {"title": title, "notes": notes}
        if est is not None:
            context["estimates"] = est
        return evaluate_run(runs[0], dataset=dataset, split=split, quiet=quiet, network=ensemble,
                            eval_dir=out / f"eval_{split}", context=context)  # fmt: skip
    items = load_datalist(ds, split)
    if not items or any(not isinstance(item.get("label"), int) for item in items):
        raise MedTuneError(f"split {split!r} is empty or has entries without labels; it cannot be evaluated",
            ds / "datalist.json")  # fmt: skip
    probs = np.mean([predict_classification(run, items) for run in runs], axis=0)
    names, positive = _class_names(ds)
    y = np.array([int(item["label"]) for item in items])
    metrics = classification_metrics(y, probs, names, positive_class=positive)
    eval_dir = out / f"eval_{split}"
    ids = _case_ids(items, ds)
    _write_oof_csv(eval_dir / "predictions.csv", ids, y, [-1] * len(ids), probs, names)
    ctx = {
        "title": title,
        "data_warning": data_warning(read_dataset_json(ds)),
        "dataset": read_dataset_json(ds).get("name"),
        "split": split,
        "model": rec["overrides"].get("arch"),
        "pretrained": rec["overrides"].get("pretrained"),
        "notes": notes,
    }
    if est is not None:
        ctx["estimates"] = est
    write_classification_report(eval_dir, metrics, names, None, ctx)
    return {"eval_dir": str(eval_dir), "metrics": metrics}
