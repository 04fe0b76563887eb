"""The ``medtune study`` subcommand (kept here so ``cli.py`` only registers it)."""

from __future__ import annotations

import argparse
import ast
from typing import Any

from medtune.errors import MedTuneError


def _pairs(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise MedTuneError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)  # literals only: never evaluated as code
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def cmd_study(args: argparse.Namespace) -> int:
    from medtune.study import run_study

    common = _pairs(args.set)
    if args.epochs is not None:
        common["epochs"] = args.epochs
    common.setdefault("num_workers", 0)
    rec = run_study(
        args.dataset,
        args.preset,
        args.sources,
        args.labels,
        args.seeds,
        args.out,
        default_strategy=args.strategy,
        common=common,
        arm_sets=args.arm_set,
        jobs=args.jobs,
        threads=args.threads,
        progress=not args.quiet,
        report_only=args.report_only,
        prune_models=args.prune_models,
        steps=args.steps,
        validations=args.validations,
        folds=args.folds,
    )
    for comp in rec["comparisons"]:
        print(comp["verdict"])
    print(f"report: {args.out}/report.md")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("study", help="label-efficiency study: sources x label budgets x seeds, paired CIs, report")
    s.add_argument("--dataset", required=True, help="dataset folder")
    s.add_argument("--preset", required=True, help="bundle preset, e.g. 3d_classification")
    s.add_argument(
        "--sources",
        required=True,
        help="comma list of [NAME=]SOURCE[:STRATEGY]; 'scratch' = the preset's network from random init",
    )
    s.add_argument("--labels", required=True, help="label budgets: 10%%,25%%,100%% or case counts 8,16,32")
    s.add_argument("--seeds", type=int, default=3, help="seeds per arm and budget (default 3)")
    s.add_argument("--strategy", default="full", help="strategy of pretrained arms without :STRATEGY (default full)")
    s.add_argument("--epochs", type=int, help="epochs of every run (the same budget for every arm)")
    s.add_argument(
        "--steps",
        type=int,
        help="optimizer steps of every run whatever its label budget (epochs per budget follow; replaces --epochs)",
    )
    s.add_argument(
        "--validations",
        type=int,
        help="validation passes per run, the last at the final epoch (1: the final model is the one evaluated, "
        "nothing is selected on the validation split; default: every epoch)",
    )
    s.add_argument(
        "--folds",
        type=int,
        help="K-fold cross-validation grouped by patient over training + validation: every case is predicted once "
        "per arm, budget and seed by the final model of the fold that did not train on it; the arms' metric is the "
        "pooled out-of-fold AUC or mean per-case Dice (default: the dataset's validation split)",
    )
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="bundle override for every arm")
    s.add_argument("--arm-set", action="append", metavar="NAME:KEY=VALUE", help="bundle override for one arm")
    s.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    s.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--prune-models", action="store_true", help="delete each run's model.pt once evaluated (disk)")
    s.add_argument("--report-only", action="store_true", help="write the report from the runs finished so far")
    s.add_argument("--out", required=True, help="study folder (re-run the same command to resume)")
    s.set_defaults(func=cmd_study)
    return s
