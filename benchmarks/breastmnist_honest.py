"""Honest BreastMNIST estimates: cross-validated AUC of the 2D preset and its options (issue 15).

Protocol (every arm, same folds): the 546 training images are split once (seed 0, stratified) into an
**outer test** of 20% (never trained on, never selected on) and 437 **CV** images; the official 78-image
validation split chooses each fold model's best epoch (as ``medtune finetune`` does). ``medtune.finetune.
crossval.crossvalidate`` then runs K folds over the CV images and reports per arm:

- ``oof_auc``: pooled out-of-fold AUC over the 437 CV images (single models; bootstrap 95% CI), and with
  left-right flip TTA (``oof_auc_tta``);
- on the outer test: mean single-member AUC, the fold **ensemble** (mean probability) AUC, ensemble + TTA.

Superseded by benchmarks/breastmnist_cv.py (all 624 labelled images in the folds, fixed schedule); kept to
reproduce yesterday's figures.
Usage: python benchmarks/breastmnist_honest.py --arms default,ema,strong_aug --image-size 64 --folds 5
Writes benchmarks/results/breastmnist_honest.json (after every arm) and .md. Needs the real data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = Path("/work/shared/data/medmnist")
if not (DEFAULT_ROOT / "breastmnist.npz").is_file():
    DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "medmnist"

ARMS = {  # bundle overrides on top of the preset defaults
    "default": {},
    "ema": {"ema_decay": 0.95},
    "strong_aug": {"augment_extra_prob": 0.3},
    "ema_strong_aug": {"ema_decay": 0.95, "augment_extra_prob": 0.3},
}


def make_dataset(root: Path, work: Path) -> Path:
    """BreastMNIST imported, with 20% of its training split moved to a labelled ``testing`` split (outer test)."""
    from medtune.data import import_medmnist
    from medtune.data.contract import read_datalist, write_datalist
    from medtune.finetune.crossval import carve_holdout

    dataset = work / "dataset"
    if (dataset / "datalist.json").is_file():
        return dataset
    shutil.rmtree(dataset, ignore_errors=True)
    import_medmnist("breastmnist", root, dataset)
    dl = read_datalist(dataset)
    items = [dict(e) for e in dl["training"]]
    cv, outer, _ = carve_holdout(items, 0.2, seed=0)
    dl["training"], dl["testing"] = cv, outer
    write_datalist(dataset, dl)
    return dataset


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(DEFAULT_ROOT))
    ap.add_argument("--arms", default="default,ema,strong_aug")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="suffix of the results files")
    ap.add_argument("--work", default=str(HERE / "results" / "work_honest"))
    args = ap.parse_args()
    root = Path(args.data_root)
    if not (root / "breastmnist.npz").is_file():
        print(f"skipped: {root / 'breastmnist.npz'} not found (real data needed for this benchmark)")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    from medtune.finetune.crossval import crossvalidate

    work = Path(args.work)
    dataset = make_dataset(root, work)
    out_json = HERE / "results" / f"breastmnist_honest{args.tag}.json"
    payload = json.loads(out_json.read_text()) if out_json.is_file() else {"arms": {}}
    payload.update(
        benchmark="breastmnist_honest",
        data=str(root / "breastmnist.npz"),
        protocol=(
            f"{args.folds}-fold CV x 1 seed ({args.seed}) over 437 of the 546 training images; 109 (20%, stratified, "
            "seed 0) kept as an outer test; best epoch chosen on the official 78-image validation split; "
            f"EfficientNet-Lite0 ImageNet, full fine-tune, AdamW 1e-3 cosine, batch 32, {args.epochs} epochs"
        ),
        python=sys.version.split()[0],
        threads=args.threads,
    )
    for arm in args.arms.split(","):
        name = f"{arm}_{args.image_size}px"
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        ov = {
            "arch": "efficientnet_lite0",
            "pretrained": "imagenet-efficientnet-lite0",
            "epochs": args.epochs,
            "image_size": [args.image_size, args.image_size],
            "seed": args.seed,
            "num_workers": 0,
            "early_stop_patience": 0,
            "model_selection": "best",  # this (superseded) protocol chose epochs on validation
            "learning_rate": 1e-3,
            **ARMS[arm],
        }
        print(f"== {name} {ARMS[arm]}", flush=True)
        t0 = time.time()
        rec = crossvalidate(
            dataset,
            "2d_classification",
            out,
            args.folds,
            overrides=ov,
            tta_flips=[[1]],
            extra_split="testing",
            pool_validation=False,
            progress_bar=False,
        )
        wall = time.time() - t0
        result = {
            "overrides": ARMS[arm],
            "image_size": args.image_size,
            "epochs": args.epochs,
            "folds": args.folds,
            "oof_auc": rec["pooled"]["estimate"],
            "oof_auc_tta": rec["pooled_tta"]["estimate"],
            "outer_member_auc_mean": rec["testing_member_auc_mean"],
            "outer_ensemble_auc": rec["testing_ensemble"]["estimate"],
            "outer_ensemble_tta_auc": rec["testing_ensemble_tta"]["estimate"],
            "mean_best_val_auc": rec["estimate"]["selection"]["estimate"]["value"],
            "members": rec["members"],
            "wall_seconds": round(wall, 1),
            "seconds_per_fold": round(wall / args.folds, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        payload["arms"][name] = result
        out_json.write_text(json.dumps(payload, indent=2))
        print(
            json.dumps({k: result[k] for k in ("oof_auc", "oof_auc_tta", "outer_ensemble_auc", "wall_seconds")}),
            flush=True,
        )
    write_markdown(payload, out_json.with_suffix(".md"))
    return 0


def _ci(e: dict) -> str:
    return f"{e['value']:.3f} ({e['ci_low']:.3f}–{e['ci_high']:.3f})"


def write_markdown(payload: dict, path: Path) -> None:
    lines = [
        "# BreastMNIST honest estimates (cross-validated AUC)",
        "",
        payload["protocol"] + ".",
        "",
        "| arm | mean best val AUC (selection, optimistic) | OOF AUC (437, 95% CI) | OOF AUC + flip TTA | "
        "outer test: mean member AUC | outer: fold ensemble | outer: ensemble + TTA | wall s (2 cores shared) |",
        "|---|---:|---|---|---:|---|---|---:|",
    ]
    notes = payload.get("notes") or []
    for name, r in payload["arms"].items():
        lines.append(
            f"| {name} | {r['mean_best_val_auc']:.3f} | {_ci(r['oof_auc'])} | {_ci(r['oof_auc_tta'])} | "
            f"{r['outer_member_auc_mean']:.3f} | {_ci(r['outer_ensemble_auc'])} | {_ci(r['outer_ensemble_tta_auc'])} | "
            f"{r['wall_seconds']:.0f} |"
        )
    lines += ["", *[f"- {n}" for n in notes]] if notes else []
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
