"""Random init vs self-supervised-pretrained vs inflated-ImageNet on real MSD Hippocampus (3D segmentation).

Usage: python benchmarks/hippocampus_transfer.py [--data-root ../shared/data/hippocampus] [--epochs 20]
Same network (FlexibleUNet with an EfficientNet-Lite0 encoder, 3D), recipe and budget for every init; 100% and
10% of the training cases, fixed validation split (seed 0, 20%). Writes benchmarks/results/hippocampus_transfer
.json/.md: mean Dice per class (anterior, posterior) with CIs, epochs to reach scratch's best, wall time and
peak RSS of each run (each run is its own process). Needs the real data; prints "skipped" otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "hippocampus"
INITS = {"scratch": "none", "ssl": None, "imagenet": "imagenet-flexunet-lite0-inflated"}


def medtune(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "medtune.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"medtune {' '.join(args[:1])} failed:\n{proc.stderr[-3000:]}")


def epochs_to_reach(curve: list, target: float) -> int | None:
    return next((i for i, v in enumerate(curve, start=1) if v is not None and v >= target), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(DEFAULT_ROOT))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--ssl-epochs", type=int, default=10)
    ap.add_argument("--fractions", default="1.0,0.1")
    ap.add_argument("--arch", default="flexunet_lite0")
    ap.add_argument("--patch", default="32,32,32")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--work", default=str(HERE / "results" / "work_hippocampus"))
    ap.add_argument("--inits", default="scratch,ssl,imagenet", help="subset of scratch,ssl,imagenet")
    args = ap.parse_args()
    root = Path(args.data_root)
    if not (root / "imagesTr").is_dir():
        print(f"skipped: {root / 'imagesTr'} not found (real data needed for this benchmark)")
        return 0
    from medtune.data import import_msd
    from medtune.finetune.bundle_glue import datalist
    from medtune.finetune.progress import read_progress

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    dataset = work / "dataset"
    import_msd(root / "imagesTr", root / "labelsTr", dataset, label_names={0: "background", 1: "anterior",
               2: "posterior"}, val_fraction=0.2, seed=0, link=True)  # fmt: skip
    patch = [int(p) for p in args.patch.split(",")]
    common = ["--preset", "3d_segmentation", "--arch", args.arch, "--batch-size", str(args.batch_size),
              "--num-workers", "0", "--quiet", "--set", f"patch_size={patch}", "--set", "num_samples=2",
              "--set", "sw_batch_size=8"]  # fmt: skip

    inits = {k: v for k, v in INITS.items() if k in args.inits.split(",")}
    # self-supervised pretraining on the training images only (no validation image is seen)
    t0 = time.time()
    if "ssl" in inits:
        ssl_list = "ssl_datalist=$medtune.finetune.bundle_glue.unlabeled_datalist(@dataset_dir, ['training'])"
        ssl_args = ["--out", str(work / "ssl"), "--epochs", str(args.ssl_epochs), "--set", ssl_list]
        medtune("pretrain", "--dataset", str(dataset), *ssl_args, *common)
        inits["ssl"] = f"local:{work / 'ssl' / 'model.pt'}"
    ssl_seconds = time.time() - t0

    results = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for init, pretrained in inits.items():
            name = f"{init}_{int(fraction * 100)}pct"
            print(f"== {name}", flush=True)
            out = work / name
            medtune("finetune", "--dataset", str(dataset), "--out", str(out), "--pretrained", pretrained,
                    "--epochs", str(args.epochs), "--label-fraction", str(fraction), *common)  # fmt: skip
            medtune("evaluate", "--run", str(out))
            rec = json.loads((out / "run.json").read_text())
            metrics = json.loads((out / "eval" / "metrics.json").read_text())
            curve = [e["metric"] for e in read_progress(out / "progress.jsonl") if e["event"] == "epoch"]
            results.append({
                "name": name, "init": init, "pretrained": pretrained, "label_fraction": fraction,
                "n_train": len(datalist(str(dataset), "training", fraction, 0)),
                "val_dice_curve": curve, "best_val_mean_dice": max(c for c in curve if c is not None),
                "best_epoch": rec["best_metric"]["epoch"],
                "mean_dice": metrics["mean_dice"], "per_class": {k: v["dice"] for k, v in metrics["per_class"].items()},
                "wall_seconds": rec["seconds"], "peak_rss_mb": rec.get("peak_rss_mb"),
            })  # fmt: skip
            r = results[-1]
            print(json.dumps({k: r[k] for k in ("name", "best_val_mean_dice", "wall_seconds", "peak_rss_mb")}))
    for fraction in {r["label_fraction"] for r in results}:
        scratch = next(r for r in results if r["label_fraction"] == fraction and r["init"] == "scratch")
        for r in results:
            if r["label_fraction"] == fraction:
                r["epochs_to_scratch_best"] = epochs_to_reach(r["val_dice_curve"], scratch["best_val_mean_dice"])
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    payload = {"benchmark": "hippocampus_transfer", "epochs": args.epochs, "ssl_epochs": args.ssl_epochs,
               "ssl_seconds": round(ssl_seconds, 1), "arch": args.arch, "patch": patch,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}  # fmt: skip
    (out / "hippocampus_transfer.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "# Hippocampus transfer benchmark (MSD Task04, 3D segmentation)",
        "",
        f"{args.arch}, patch {patch}, {args.epochs} epochs per run; SSL pretraining {args.ssl_epochs} epochs "
        f"({ssl_seconds:.0f} s) on the training images. Validation: fixed 20% split.",
        "",
        "| run | labels | mean Dice (95% CI) | anterior | posterior | epochs to scratch best | wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        md, pc = r["mean_dice"], r["per_class"]
        a, p = pc.get("anterior", {}), pc.get("posterior", {})
        lines.append(
            f"| {r['name']} | {int(r['label_fraction'] * 100)}% | {md['value']:.3f} ({md['ci_low']:.3f}–"
            f"{md['ci_high']:.3f}) | {a.get('value', float('nan')):.3f} | {p.get('value', float('nan')):.3f} | "
            f"{r['epochs_to_scratch_best']} | {r['wall_seconds']:.0f} | {r['peak_rss_mb']} |"
        )
    (out / "hippocampus_transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
