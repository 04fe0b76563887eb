"""BreastMNIST: does ``refit_on_all`` (deploy the recipe retrained on every label) beat the default? (issue 15)

Fair paired protocol, the outer folds of ``breastmnist_ensemble.py``. The 624 labelled images are cut into O outer
folds (stratified, ``--outer-seed``); for outer fold o the other folds are everything a user has (``T_o``) and fold o
is seen by neither arm. One product run per outer fold gives both arms, since ``refit_on_all`` trains the default's
model first, unchanged:

- ``default``: ``medtune finetune`` with the shipped defaults (internal test 20 %): the deployed model trained on the
  other 80 % of ``T_o`` (``RUN/internal_test_run/`` of the refit run: same carve, seed and recipe);
- ``refit``: ``--set refit_on_all=True``: the same recipe retrained on all of ``T_o`` (``RUN``).

Both report the same honest estimate (the 80 % model on the internal test); it is checked against each arm's AUC on
the unseen outer fold. Scores of the outer folds are pooled; the AUC difference is a paired bootstrap CI over cases.

- ``refit+seeds``: the refit model and ``--extra-seeds`` more models trained the same way on all of ``T_o`` with
  seeds 1, 2, ... (a plain run on ``T_o`` is what ``refit_on_all`` deploys), their probabilities averaged: does a
  seed ensemble of the deployed recipe pay off on unseen images (issue 15's next lever), and at what cost?

Usage: python benchmarks/breastmnist_refit.py --outer 3 [--outer-only 0] [--extra-seeds 2] [--smoke]
Writes benchmarks/results/breastmnist_refit.json (aggregates, after every outer fold) and .md; per-case scores stay
in the work folder (git-ignored). Needs the real data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from breastmnist_cv import _cpu_seconds  # noqa: E402
from breastmnist_ensemble import (  # noqa: E402
    _auc,
    _p1,
    outer_dataset,
    outer_fold_parser,
    outer_setup,
    outer_split,
    payload_head,
)


def main() -> int:
    ap = outer_fold_parser(__doc__, "work_refit")
    ap.add_argument("--extra-seeds", type=int, default=2, help="seed-ensemble members beyond the refit model")
    args = ap.parse_args()
    setup = outer_setup(args)
    if setup is None:
        return 0
    work, dataset, items, outer_of = setup
    from medtune.finetune.crossval import finetune_with_holdout, predict_classification
    from medtune.runfolder import ESTIMATE_RUN

    suffix = "_smoke" if args.smoke else ""
    todo = [int(o) for o in args.outer_only.split(",") if o] or list(range(args.outer))
    for o in todo:
        key = f"o{o}"
        probs_file = work / f"{key}_probs.json"
        train, test, monitor = outer_split(items, outer_of, o, dataset, args.outer_seed)
        ov: dict = {"seed": args.seed, "num_workers": 0, "refit_on_all": True}
        if args.smoke:
            ov.update(image_size=[32, 32], epochs=1)
        if probs_file.is_file():
            print(f"== outer fold {o}: default + refit done already", flush=True)
            extra_seeds(work / key, train, test, ov, args)
            continue
        ds = outer_dataset(dataset, work / key / "dataset", train, monitor)
        run = work / key / "run"
        print(f"== outer {o}: default + refit on {len(train)} (unseen {len(test)})", flush=True)
        t0, c0 = time.time(), _cpu_seconds()
        rec = finetune_with_holdout(ds, "2d_classification", run, overrides=ov, progress_bar=False)
        honest = rec["estimate"]["honest"]
        seconds = {"wall": round(time.time() - t0, 1), "cpu": round(_cpu_seconds() - c0, 1),
                   "train_default": json.loads((run / ESTIMATE_RUN / "run.json").read_text()).get("seconds"),
                   "train_refit": rec.get("seconds")}  # fmt: skip
        out = {
            "labels": [int(it["label"]) for it in test],
            "default": _p1(predict_classification(run / ESTIMATE_RUN, test, flips=[])),
            "refit": _p1(predict_classification(run, test, flips=[])),
            "honest": {"n": honest["n"], **honest["estimate"]},
            "n_train": len(train),
            "seconds": seconds,
        }
        probs_file.write_text(json.dumps(out))  # per case: work folder only
        for f in run.rglob("*.pt"):  # model files are big; the scores are kept above
            f.unlink()
        print(json.dumps({"outer": o, "honest": out["honest"], "seconds": seconds}), flush=True)
        extra_seeds(work / key, train, test, ov, args)
    summarise(work, args, HERE / "results" / f"breastmnist_refit{suffix}.json")
    return 0


def extra_seeds(folder: Path, train: list, test: list, ov: dict, args: argparse.Namespace) -> None:
    """Seed-ensemble members: plain runs on the outer fold's dataset (all of ``T_o``), seeds 1..N after ``--seed``."""
    import torch

    from medtune.finetune.crossval import predict_classification
    from medtune.finetune.runner import finetune

    torch.set_num_threads(1)
    for k in range(1, args.extra_seeds + 1):
        seed = args.seed + k
        probs_file = folder.parent / f"{folder.name}_seed{seed}_probs.json"
        if probs_file.is_file():
            continue
        run = folder / f"seed{seed}"
        shutil.rmtree(run, ignore_errors=True)  # an interrupted member is retrained (a few minutes)
        print(f"== {folder.name}: seed-ensemble member, seed {seed}, on {len(train)}", flush=True)
        t0, c0 = time.time(), _cpu_seconds()
        rec = finetune(folder / "dataset", "2d_classification", run, overrides={**ov, "seed": seed,
                       "refit_on_all": False}, progress_bar=False)  # fmt: skip
        out = {"probs": _p1(predict_classification(run, test, flips=[])), "seconds": {"wall": round(time.time() - t0,
               1), "cpu": round(_cpu_seconds() - c0, 1), "train": rec.get("seconds")}}  # fmt: skip
        probs_file.write_text(json.dumps(out))
        for f in run.rglob("*.pt"):
            f.unlink()


def summarise(work: Path, args: argparse.Namespace, out_json: Path) -> None:
    """Pool the finished outer folds into AUCs, the paired difference and the estimate-vs-unseen check."""
    import numpy as np

    from medtune.evaluate.metrics import paired_auc_difference

    done = sorted(p for p in work.glob("o*_probs.json") if "_seed" not in p.name)  # not the seed members
    if not done:
        return
    folds = {p.name.split("_")[0]: json.loads(p.read_text()) for p in done}
    y = np.concatenate([np.asarray(f["labels"]) for f in folds.values()])
    arm = {a: np.concatenate([np.asarray(f[a]) for f in folds.values()]) for a in ("default", "refit")}
    per_fold = {}
    for key, f in folds.items():
        lab = np.asarray(f["labels"])
        per_fold[key] = {
            "n_unseen": len(lab),
            "default": _auc(lab, f["default"]),
            "refit": _auc(lab, f["refit"]),
            "honest": f["honest"],
            "n_train": f["n_train"],
            "seconds": f["seconds"],
        }
    payload = {
        **payload_head("breastmnist_refit", __doc__, args),
        "preset": "2d_classification (shipped recipe: 128 px, EfficientNet-Lite0 ImageNet, 12 epochs, last epoch)",
        "threads": 1,
        "outer_folds_done": sorted(folds),
        "n_pooled": int(len(y)),
        "pooled": {a: _auc(y, arm[a]) for a in arm},
        "refit_minus_default": paired_auc_difference(y, arm["refit"], arm["default"], n_bootstrap=2000, seed=0),
        "per_outer_fold": per_fold,
    }
    members = {}  # outer fold -> the extra seeds' probabilities, where all of them finished
    for key in folds:
        files = [work / f"{key}_seed{args.seed + k}_probs.json" for k in range(1, args.extra_seeds + 1)]
        if args.extra_seeds and all(f.is_file() for f in files):
            members[key] = [json.loads(f.read_text()) for f in files]
    if members:  # the seed ensemble on the outer folds whose members all finished, paired with refit there
        ys = np.concatenate([np.asarray(folds[k]["labels"]) for k in members])
        ref = np.concatenate([np.asarray(folds[k]["refit"]) for k in members])
        ens = np.concatenate([np.mean([folds[k]["refit"]] + [m["probs"] for m in members[k]], axis=0)
                              for k in members])  # fmt: skip
        payload["seed_ensemble"] = {
            "members": 1 + args.extra_seeds,
            "outer_folds": sorted(members),
            "n_pooled": int(len(ys)),
            "refit": _auc(ys, ref),
            "ensemble": _auc(ys, ens),
            "ensemble_minus_refit": paired_auc_difference(ys, ens, ref, n_bootstrap=2000, seed=0),
            "per_outer_fold": {k: {"refit": _auc(np.asarray(folds[k]["labels"]), folds[k]["refit"]),
                                   "ensemble": _auc(np.asarray(folds[k]["labels"]), np.mean(
                                       [folds[k]["refit"]] + [m["probs"] for m in members[k]], axis=0)),
                                   "member_cpu_s": [m["seconds"]["cpu"] for m in members[k]]} for k in members},
        }  # fmt: skip
    out_json.write_text(json.dumps(payload, indent=1))
    out_json.with_suffix(".md").write_text(markdown(payload))


def _ci(e: dict) -> str:
    return f"{e['value']:.3f} ({e['ci_low']:.3f}–{e['ci_high']:.3f})"


def markdown(p: dict) -> str:
    d = p["refit_minus_default"]
    lines = [
        "# BreastMNIST: `refit_on_all` vs the default (paired, outer folds)",
        "",
        p["protocol"],
        "",
        f"O = {p['outer']} outer folds (seed {p['outer_seed']}), training seed {p['seed']}; preset {p['preset']}; "
        f"1 torch thread. Outer folds done: {', '.join(p['outer_folds_done'])} ({p['n_pooled']} unseen cases).",
        "",
        "| arm | trained on | AUC on unseen cases (95% CI) |",
        "|---|---|---|",
        f"| default | 80 % of T_o | {_ci(p['pooled']['default'])} |",
        f"| refit_on_all | all of T_o | {_ci(p['pooled']['refit'])} |",
        "",
        f"Paired difference refit − default: **{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]** "
        "(paired bootstrap over cases, 2000 resamples).",
        "",
        "| outer fold | default AUC | refit AUC | honest estimate the report gives (internal test) | CPU s | train s "
        "default / refit |",
        "|---|---:|---:|---|---:|---|",
    ]
    for key, f in p["per_outer_fold"].items():
        s = f["seconds"]
        honest = f"{_ci(f['honest'])}, n={f['honest']['n']}"
        lines.append(f"| {key} | {f['default']['value']:.3f} | {f['refit']['value']:.3f} | {honest} | {s['cpu']:.0f} | "
                     f"{s['train_default']} / {s['train_refit']} |")  # fmt: skip
    e = p.get("seed_ensemble")
    if e:
        d = e["ensemble_minus_refit"]
        lines += [
            "",
            f"## Seed ensemble of the deployed recipe ({e['members']} members: the refit model + seeds "
            f"{p['seed'] + 1}..{p['seed'] + e['members'] - 1}, mean probability)",
            "",
            f"Outer folds {', '.join(e['outer_folds'])} ({e['n_pooled']} unseen cases): refit {_ci(e['refit'])}, "
            f"seed ensemble {_ci(e['ensemble'])}; paired difference ensemble − refit: **{d['value']:+.3f} "
            f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]**.",
            "",
            "| outer fold | refit AUC | ensemble AUC | CPU s of each extra member |",
            "|---|---:|---:|---|",
        ]
        for key, f in e["per_outer_fold"].items():
            cpu = " / ".join(f"{c:.0f}" for c in f["member_cpu_s"])
            lines.append(f"| {key} | {f['refit']['value']:.3f} | {f['ensemble']['value']:.3f} | {cpu} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
