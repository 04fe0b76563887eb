"""Random init vs self-supervised-pretrained vs inflated-ImageNet on real MSD Hippocampus (3D segmentation).

Usage: python benchmarks/hippocampus_transfer.py [--data-root ../shared/data/hippocampus] [--epochs 20]
Same network (--arch, default FlexibleUNet with an EfficientNet-Lite0 encoder, 3D), recipe and budget for every
init; 100% and 10% of the training cases, fixed validation split (seed 0, 20%). Writes benchmarks/results/
hippocampus_transfer.json/.md: mean Dice per class (anterior, posterior) with CIs, epochs to reach scratch's
best *on the same network and protocol*, wall time and peak RSS of each run (each run is its own process).
Needs the real data; prints "skipped" otherwise.

``--merge`` keeps the rows of other protocols (network, patch, epochs, decoder...) already in the results file
and replaces those of this one, so arms measured in separate sessions end up in one table.
``--threads`` (default 1) sets the torch threads of each run: on a shared CPU, 2 OpenMP threads competing with
other processes were measured 2-10x slower per step than 1 (threads spin at every barrier); ``--jobs 2`` runs
two arms at once instead.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "hippocampus"
INITS = {"scratch": "none", "ssl": None, "imagenet": "imagenet-flexunet-lite0-inflated"}


def medtune(*args: str, threads: int | None = None) -> None:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "medtune.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"medtune {' '.join(args[:1])} failed:\n{proc.stderr[-3000:]}")


def epochs_to_reach(curve: list, target: float) -> int | None:
    return next((i for i, v in enumerate(curve, start=1) if v is not None and v >= target), None)


def protocol_of(row: dict) -> tuple:
    """Rows are comparable (same network, patch, budget) when their protocols are equal."""
    return (row["arch"], json.dumps(row.get("arch_kwargs") or {}, sort_keys=True), tuple(row["patch"]), row["epochs"])


def protocol_label(row: dict) -> str:
    kw = row.get("arch_kwargs") or {}
    extra = "".join(f", {k}={tuple(v) if isinstance(v, list) else v}" for k, v in sorted(kw.items()))
    return f"{row['arch']}{extra}, patch {row['patch']}, {row['epochs']} epochs"


def add_epochs_to_scratch_best(results: list[dict]) -> None:
    """Epochs each run needs to reach the best validation Dice of scratch on the same protocol and label share."""
    for r in results:
        scratch = next(
            (s for s in results if s["init"] == "scratch" and s["label_fraction"] == r["label_fraction"]
             and protocol_of(s) == protocol_of(r)),
            None,
        )  # fmt: skip
        r["epochs_to_scratch_best"] = (
            epochs_to_reach(r["val_dice_curve"], scratch["best_val_mean_dice"]) if scratch else None
        )


def legacy_rows(payload: dict) -> list[dict]:
    """Results of a file written before rows carried their protocol: take it from the file's top level."""
    rows = payload.get("results", [])
    for r in rows:
        r.setdefault("arch", payload.get("arch"))
        r.setdefault("arch_kwargs", {})
        r.setdefault("patch", payload.get("patch"))
        r.setdefault("epochs", payload.get("epochs"))
        if r["init"] == "ssl":
            r.setdefault("ssl_epochs", payload.get("ssl_epochs"))
            r.setdefault("ssl_seconds", payload.get("ssl_seconds"))
        if payload.get("note"):
            r.setdefault("note", payload["note"])
    return rows


def write_tables(results: list[dict], out: Path, notes: list[str]) -> str:
    lines = ["# Hippocampus transfer benchmark (MSD Task04, 3D segmentation)", ""]
    lines += ["Validation: fixed 20% split (40 cases, seed 0). \"epochs to scratch best\": first epoch whose "
              "validation mean Dice reaches the best of scratch on the *same network, patch and budget* "
              "(None: never).", ""]  # fmt: skip
    protocols: list[tuple] = []
    for r in results:
        if protocol_of(r) not in protocols:
            protocols.append(protocol_of(r))
    for proto in protocols:
        rows = [r for r in results if protocol_of(r) == proto]
        head = f"## {protocol_label(rows[0])}"
        ssl = next((r for r in rows if r["init"] == "ssl"), None)
        if ssl and ssl.get("ssl_epochs") is not None:
            head += f"; SSL pretraining {ssl['ssl_epochs']} epochs ({ssl.get('ssl_seconds', 0):.0f} s)"
        lines += [head, "",
                  "| run | labels | mean Dice (95% CI) | anterior | posterior | best val Dice (epoch) "
                  "| epochs to scratch best | wall s | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            md, pc = r["mean_dice"], r["per_class"]
            a, p = pc.get("anterior", {}), pc.get("posterior", {})
            lines.append(
                f"| {r['name']} | {int(r['label_fraction'] * 100)}% | {md['value']:.3f} ({md['ci_low']:.3f}–"
                f"{md['ci_high']:.3f}) | {a.get('value', float('nan')):.3f} | {p.get('value', float('nan')):.3f} | "
                f"{r['best_val_mean_dice']:.3f} ({r['best_epoch']}) | {r['epochs_to_scratch_best']} | "
                f"{r['wall_seconds']:.0f} | {r['peak_rss_mb']} |"
            )
        lines.append("")
    lines += ["Notes:", ""] + [f"- {n}" for n in notes] if notes else []
    text = "\n".join(lines).rstrip() + "\n"
    (out / "hippocampus_transfer.md").write_text(text)
    return text


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
    ap.add_argument("--arch-kwargs", default="{}", help="network options, e.g. \"{'decoder_channels': [128, 64, "
                    "32, 16, 8]}\" (flexunet_lite0's FAST_DECODER_CHANNELS)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each its own process)")
    ap.add_argument("--merge", action="store_true", help="keep other protocols' rows already in the results file")
    ap.add_argument("--note", action="append", default=[], help="a line for the results notes")
    args = ap.parse_args()
    arch_kwargs = ast.literal_eval(args.arch_kwargs)
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
    if arch_kwargs:
        common += ["--set", f"arch_kwargs={arch_kwargs!r}"]
    threads = args.threads or None

    inits = {k: v for k, v in INITS.items() if k in args.inits.split(",")}
    # self-supervised pretraining on the training images only (no validation image is seen)
    t0 = time.time()
    if "ssl" in inits:
        ssl_list = "ssl_datalist=$medtune.finetune.bundle_glue.unlabeled_datalist(@dataset_dir, ['training'])"
        ssl_args = ["--out", str(work / "ssl"), "--epochs", str(args.ssl_epochs), "--set", ssl_list]
        medtune("pretrain", "--dataset", str(dataset), *ssl_args, *common, threads=threads)
        inits["ssl"] = f"local:{work / 'ssl' / 'model.pt'}"
    ssl_seconds = time.time() - t0

    def run(fraction: float, init: str, pretrained: str) -> dict:
        name = f"{init}_{int(fraction * 100)}pct"
        print(f"== {name} started", flush=True)
        out = work / name
        medtune("finetune", "--dataset", str(dataset), "--out", str(out), "--pretrained", pretrained,
                "--epochs", str(args.epochs), "--label-fraction", str(fraction), *common, threads=threads)  # fmt: skip
        medtune("evaluate", "--run", str(out), threads=threads)
        rec = json.loads((out / "run.json").read_text())
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        curve = [e["metric"] for e in read_progress(out / "progress.jsonl") if e["event"] == "epoch"]
        r = {
            "name": name, "init": init, "pretrained": pretrained, "label_fraction": fraction,
            "arch": args.arch, "arch_kwargs": arch_kwargs, "patch": patch, "epochs": args.epochs,
            "threads": args.threads, "jobs": args.jobs,
            "n_train": len(datalist(str(dataset), "training", fraction, 0)),
            "val_dice_curve": curve, "best_val_mean_dice": max(c for c in curve if c is not None),
            "best_epoch": rec["best_metric"]["epoch"],
            "mean_dice": metrics["mean_dice"], "per_class": {k: v["dice"] for k, v in metrics["per_class"].items()},
            "wall_seconds": rec["seconds"], "peak_rss_mb": rec.get("peak_rss_mb"),
        }  # fmt: skip
        if init == "ssl":
            r.update(ssl_epochs=args.ssl_epochs, ssl_seconds=round(ssl_seconds, 1))
        print(json.dumps({k: r[k] for k in ("name", "best_val_mean_dice", "wall_seconds", "peak_rss_mb")}), flush=True)
        return r

    todo = [(f, i, p) for f in (float(x) for x in args.fractions.split(",")) for i, p in inits.items()]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda t: run(*t), todo))

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / "hippocampus_transfer.json"
    old = json.loads(path.read_text()) if args.merge and path.exists() else {}
    mine = {protocol_of(r) for r in results}
    kept = [r for r in legacy_rows(old) if not (protocol_of(r) in mine and r["name"] in {x["name"] for x in results})]
    results = kept + results
    add_epochs_to_scratch_best(results)
    notes = [n for n in old.get("notes", []) if n not in args.note] + args.note
    payload = {"benchmark": "hippocampus_transfer", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "notes": notes, "results": results}  # fmt: skip
    path.write_text(json.dumps(payload, indent=2))
    print(write_tables(results, out, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
