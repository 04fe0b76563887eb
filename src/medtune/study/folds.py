"""``medtune study --folds K``: patient-grouped K-fold cross-validation inside a study.

The dataset's ``training`` and ``validation`` entries are pooled and cut into K folds (stratified by class for
classification) with every group (the datalist's patient key, :func:`medtune.finetune.crossval.group_key`; the
table importer stores it as ``group``) in one fold (:func:`medtune.finetune.crossval.assign_folds`, fixed seed: the
same folds for every arm, budget and seed). Fold k's run trains on a label budget drawn with the run's seed from
the other folds (the same cases for every arm) and is evaluated once, with its final model, on fold k. The K
out-of-fold evaluations of one arm x budget x seed are joined into ``STUDY/oof/<arm>/<budget>/seed<N>/`` (every
case exactly once, named by its image path inside the dataset): ``predictions.csv`` (classification) or
``per_case.csv`` + ``metrics.json`` + ``report.md`` (segmentation: per-case Dice pooled by
:func:`medtune.evaluate.segmentation.summarise_case_dice`, the report of ``medtune finetune --folds``). The study's
statistics (:mod:`medtune.study.report`) run on these pooled files like on a single validation split.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from medtune.atomic import write_with
from medtune.errors import MedTuneError

FOLD_SEED = 0  # fold assignment: the same for every seed, so a seed's pooled cases are every arm's
OOF_NAME = "oof"  # a fold run's evaluation folder: RUN/eval_oof/


def fold_items(dataset: Path, k: int) -> tuple[list[dict[str, Any]], list[int], str | None]:
    """``(entries, fold of each entry, group key)``: training + validation, K grouped (stratified) folds."""
    from medtune.data.contract import load_datalist, read_dataset_json
    from medtune.finetune.crossval import assign_folds, group_key

    items = load_datalist(dataset, "training")
    try:
        items += load_datalist(dataset, "validation")
    except MedTuneError:  # a dataset labelled in Slicer may hold a training split only
        pass
    if read_dataset_json(dataset)["task"] == "classification":  # masks are checked by validate_dataset
        for item in items:
            if not isinstance(item.get("label"), int):
                raise MedTuneError("--folds needs a class label (an integer) on every entry", dataset / "datalist.json")
    return items, assign_folds(items, k, FOLD_SEED), group_key(items)


def smallest_pool(fold_of: list[int], k: int) -> int:
    """Cases in the smallest training pool of the K folds (what a case-count label budget must fit)."""
    return min(sum(f != j for f in fold_of) for j in range(k))


def case_id(item: dict[str, Any], dataset: Path) -> str:
    """The image path relative to the dataset folder (opaque for imported tables: ``images/case_0001.nii.gz``)."""
    from medtune.finetune.crossval import _case_ids

    return _case_ids([item], dataset)[0]


def fold_fraction(budget_text: str, budget_fraction: float, n_pool: int) -> float:
    """The ``label_subset`` fraction of a budget in a fold whose pool holds ``n_pool`` cases (a case count stays
    exact whatever the pool size)."""
    if budget_text.endswith("%"):
        return budget_fraction
    return min(1.0, int(budget_text) / n_pool)


def pool_oof(
    study: Path, dataset: Path, fold_records: list[dict[str, Any]], items: list[dict[str, Any]], fold_of: list[int]
) -> dict[str, Any]:
    """Join one arm x budget x seed's K fold evaluations into one pooled record (``eval_dir`` = the pooled folder).

    Each fold's ``eval_oof/`` lists its held-out cases in datalist order (the evaluator does not shuffle); a row
    must match its case (its class label; a segmentation case its image name), and the pooled folder holds every
    case exactly once.
    """
    recs = sorted(fold_records, key=lambda r: r["fold"])
    first = recs[0]
    out = study / "oof" / first["arm"] / _tag(first) / f"seed{first['seed']}"
    held = {r["fold"]: [it for it, f in zip(items, fold_of, strict=True) if f == r["fold"]] for r in recs}
    if isinstance(items[0].get("label"), int):
        name, metrics = "val_auc", _pool_classification(recs, held, dataset, out)
    else:
        name, metrics = "val_mean_dice", _pool_segmentation(recs, held, dataset, out)
    if metrics["n"] != len(items):
        raise MedTuneError(f"out-of-fold predictions cover {metrics['n']} of {len(items)} cases", study)
    return {
        "key": f"{first['arm']}/{_tag(first)}/seed{first['seed']}",
        "arm": first["arm"],
        "budget": first["budget"],
        "seed": first["seed"],
        "folds": len(recs),
        "n_labels": int(round(sum(r["n_labels"] for r in recs) / len(recs))),
        "n_labels_per_fold": [r["n_labels"] for r in recs],
        "metric_name": name,
        "best_epoch": "last",
        "metrics": metrics,
        "eval_dir": str(out),
        "run_dirs": [str(Path(r["eval_dir"]).parent) for r in recs],
        "train_seconds": round(sum(float(r.get("train_seconds") or 0) for r in recs), 1),
        "wall_seconds": round(sum(float(r.get("wall_seconds") or 0) for r in recs), 1),
        "peak_rss_mb": max(float(r.get("peak_rss_mb") or 0) for r in recs),
    }


def _pool_classification(
    recs: list[dict[str, Any]], held: dict[int, list[dict[str, Any]]], dataset: Path, out: Path
) -> dict[str, Any]:
    """``OUT/predictions.csv`` from the folds' ``predictions.csv``; ``{"n", "auc"}`` of the pooled scores."""
    import numpy as np

    from medtune.study.report import auc_score

    header: list[str] | None = None
    rows: list[list[str]] = []
    seen: set[str] = set()
    for rec in recs:
        path = Path(rec["eval_dir"]) / "predictions.csv"
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            head = next(reader)
            body = list(reader)
        if header is None:
            header = head
        cases = held[rec["fold"]]
        if head != header or len(body) != len(cases):
            raise MedTuneError(f"{len(body)} predictions for {len(cases)} held-out cases (or another header)", path)
        for item, row in zip(cases, body, strict=True):
            cid = case_id(item, dataset)
            if int(row[1]) != int(item["label"]) or cid in seen:
                raise MedTuneError(f"row of {cid} does not match its held-out case", path)
            seen.add(cid)
            rows.append([cid, *row[1:]])

    def _write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", *(header or [])[1:]])
            w.writerows(rows)

    write_with(out / "predictions.csv", _write)
    y = np.array([int(r[1]) for r in rows])
    auc = auc_score(y, np.array([float(r[3]) for r in rows]))  # p of class 1 (binary), as report.py reads
    return {"n": len(rows), "auc": {"value": auc}}


def _pool_segmentation(
    recs: list[dict[str, Any]], held: dict[int, list[dict[str, Any]]], dataset: Path, out: Path
) -> dict[str, Any]:
    """``OUT/per_case.csv``, ``metrics.json`` and ``report.md`` from the folds' segmentation evaluations (cases
    renamed to their dataset-relative image paths); ``{"n", "mean_dice"}`` with the case-bootstrap CI."""
    from medtune.evaluate.segmentation import read_case_csv, summarise_case_dice, write_case_csv
    from medtune.finetune.crossval import _write_seg_oof_report

    cases: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for rec in recs:
        folder = Path(rec["eval_dir"])
        fold_cases = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("cases")
        items = held[rec["fold"]]
        if not isinstance(fold_cases, list) or len(fold_cases) != len(items):
            raise MedTuneError(f"{len(fold_cases or [])} evaluated cases for {len(items)} held-out cases",
                               folder / "metrics.json")  # fmt: skip
        rename: dict[str, str] = {}
        for item, case in zip(items, fold_cases, strict=True):
            stem = Path(str(item["image"])).name.split(".")[0]  # the evaluator names a case by its image file
            if not isinstance(case, dict) or case.get("case") != stem or stem in rename:
                raise MedTuneError(f"case {stem} is not the held-out case in its place", folder / "metrics.json")
            rename[stem] = case_id(item, dataset)
            cases.append({**case, "case": rename[stem]})
        for row in read_case_csv(folder / "per_case.csv"):
            if row.get("case") not in rename:
                raise MedTuneError(f"row of case {row.get('case')} is not a held-out case", folder / "per_case.csv")
            rows.append({**row, "case": rename[row["case"]]})
    pooled = summarise_case_dice(cases)  # refuses a case twice
    write_case_csv(rows, out / "per_case.csv")
    arm_budget_seed = str(recs[0]["key"]).rsplit("/", 1)[0]
    ctx = {"title": f"MedTune study: {len(recs)}-fold cross-validation (out-of-fold), {arm_budget_seed}",
           "fold_reports": f"runs/{arm_budget_seed}/fold<k>/eval_oof/"}  # fmt: skip
    _write_seg_oof_report(out, pooled, ctx)
    return {"n": pooled["n"], "mean_dice": pooled["mean_dice"]}


def _tag(rec: dict[str, Any]) -> str:
    return str(rec["key"]).split("/")[1]
