"""ImageNet-pretrained vs random init on real BreastMNIST, same recipe and budget, 100% and 10% of labels.

Usage: python benchmarks/breastmnist_transfer.py [--data-root ../shared/data/medmnist] [--epochs 15]
Writes benchmarks/results/breastmnist_transfer.json and .md: best val AUC/ACC, epochs to reach the
scratch model's best val AUC, wall time per run. Needs the real data (skips with a message otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "medmnist"


def epochs_to_reach(curve: list[float | None], target: float) -> int | None:
    for i, v in enumerate(curve, start=1):
        if v is not None and v >= target:
            return i
    return None


def run_one(dataset: Path, out: Path, pretrained: str, fraction: float, epochs: int, seed: int) -> dict:
    from medtune.finetune.progress import read_progress
    from medtune.finetune.runner import evaluate_run, finetune

    t0 = time.time()
    rec = finetune(
        dataset,
        "2d_classification",
        out,
        overrides={
            "arch": "efficientnet_lite0",
            "pretrained": pretrained,
            "epochs": epochs,
            "label_fraction": fraction,
            "seed": seed,
            "num_workers": 0,
            "early_stop_patience": 0,
        },
        progress_bar=False,
    )
    seconds = time.time() - t0
    curve = [e["metric"] for e in read_progress(out / "progress.jsonl") if e["event"] == "epoch"]
    ev = evaluate_run(out)["metrics"]
    return {
        "pretrained": pretrained,
        "label_fraction": fraction,
        "n_train": rec["dataset"]["summary"]["training"]["n"] if fraction >= 1 else None,
        "best_val_auc": max(v for v in curve if v is not None),
        "best_epoch": rec["best_metric"]["epoch"],
        "val_auc_curve": curve,
        "val_auc_best_model": ev["auc"],
        "val_acc_best_model": ev["accuracy"],
        "wall_seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / max(1, len(curve)), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(DEFAULT_ROOT))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--fractions", default="1.0,0.1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(HERE / "results" / "work_breastmnist"))
    args = ap.parse_args()
    root = Path(args.data_root)
    if not (root / "breastmnist.npz").is_file():
        print(f"skipped: {root / 'breastmnist.npz'} not found (real data needed for this benchmark)")
        return 0
    import shutil

    from medtune.data import import_medmnist

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    dataset = work / "dataset"
    import_medmnist("breastmnist", root, dataset)
    results = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for pretrained in ("imagenet-efficientnet-lite0", "none"):
            name = f"{'imagenet' if pretrained != 'none' else 'scratch'}_{int(fraction * 100)}pct"
            print(f"== {name}", flush=True)
            r = run_one(dataset, work / name, pretrained, fraction, args.epochs, args.seed)
            r["name"] = name
            results.append(r)
            print(json.dumps({k: r[k] for k in ("name", "best_val_auc", "best_epoch", "wall_seconds")}), flush=True)
    for fraction in {r["label_fraction"] for r in results}:
        scratch = next(r for r in results if r["label_fraction"] == fraction and r["pretrained"] == "none")
        for r in results:
            if r["label_fraction"] == fraction:
                r["epochs_to_scratch_best"] = epochs_to_reach(r["val_auc_curve"], scratch["best_val_auc"])
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    payload = {
        "benchmark": "breastmnist_transfer",
        "data": str(root / "breastmnist.npz"),
        "epochs": args.epochs,
        "recipe": "2d_classification preset: EfficientNet-Lite0, 128x128, AdamW lr 1e-3 cosine, batch 32, full",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": sys.version.split()[0],
        "results": results,
    }
    (out / "breastmnist_transfer.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "# BreastMNIST transfer benchmark",
        "",
        f"{args.epochs} epochs, same recipe for both inits; validation split (78 images).",
        "",
        "| run | labels | best val AUC | val AUC (95% CI) best model | val ACC | epochs to scratch best | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        auc, acc = r["val_auc_best_model"], r["val_acc_best_model"]
        lines.append(
            f"| {r['name']} | {int(r['label_fraction'] * 100)}% | {r['best_val_auc']:.3f} | {auc['value']:.3f} "
            f"({auc['ci_low']:.3f}–{auc['ci_high']:.3f}) | {acc['value']:.3f} | {r['epochs_to_scratch_best']} "
            f"| {r['wall_seconds']:.0f} |"
        )
    (out / "breastmnist_transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
