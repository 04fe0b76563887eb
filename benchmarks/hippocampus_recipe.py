"""The 3D segmentation preset's recipe on real MSD Hippocampus: the current default vs candidate recipes.

    nice -n 10 python benchmarks/hippocampus_recipe.py --work /tmp/hippo_recipe --recipes default,p32_e20

Every recipe trains the preset's network on the 160 training-pool cases of the fixed split (20 %, seed 0) with
``--internal-test 0`` and is validated once, at its last epoch (``val_interval = epochs``): the model scored on the
40 validation cases was not chosen on them. Results (mean Dice + CI, per class, optimizer steps, wall time on one
thread) are merged by recipe name into ``benchmarks/results/hippocampus_recipe.json/.md``. A user's default
``medtune finetune`` keeps 20 % of the training split as its internal test, so it trains on 4/5 of these steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", "/work/shared/data")) / "hippocampus"
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},  # the preset as shipped (patch, batch, epochs, loss, sliding window from the configs)
    "default_e20": {"epochs": 20},  # the shipped patch (roi_size auto) and batch, twice the epochs
    "p32_e15": {"patch_size": [32, 48, 32], "batch_size": 4, "num_samples": 2, "epochs": 15},
    "p32_e20": {"patch_size": [32, 48, 32], "batch_size": 4, "num_samples": 2, "epochs": 20},
    "p32_e30": {"patch_size": [32, 48, 32], "batch_size": 4, "num_samples": 2, "epochs": 30},
    "p48_e20": {"patch_size": [48, 64, 48], "batch_size": 2, "num_samples": 2, "epochs": 20},
}


def preset_value(key: str) -> Any:
    from medtune.finetune.runner import config_files

    value = None
    for path in config_files("3d_segmentation"):
        value = json.loads(Path(path).read_text(encoding="utf-8")).get(key, value)
    return value


def run_recipe(name: str, dataset: Path, work: Path) -> dict[str, Any]:
    over = dict(RECIPES[name])
    epochs = int(over.pop("epochs", preset_value("epochs")))
    batch = int(over.get("batch_size", preset_value("batch_size")))
    out = work / name
    sets = [x for k, v in over.items() for x in ("--set", f"{k}={v!r}")]
    cmd = [sys.executable, "-m", "medtune", "finetune", "--dataset", str(dataset), "--preset", "3d_segmentation",
           "--internal-test", "0", "--epochs", str(epochs), "--set", f"val_interval={epochs}", "--num-workers", "0",
           "--quiet", *sets, "--out", str(out)]  # fmt: skip
    t0 = time.time()
    load = run_sampling_load(cmd)
    subprocess.run([sys.executable, "-m", "medtune", "evaluate", "--run", str(out)], check=True, capture_output=True)
    rec = json.loads((out / "run.json").read_text())
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    from medtune.finetune.bundle_glue import datalist

    n_train = len(datalist(str(dataset), "training", 1.0, 0))
    for f in ("model.pt", "checkpoint_last.pt"):
        (out / f).unlink(missing_ok=True)
    cases = {c["case"]: c["mean_dice"] for c in metrics["cases"]}  # kept for paired comparisons between recipes
    return {
        "recipe": name,
        "overrides": {**RECIPES[name], "epochs": epochs},
        # the patch the run trained with (``default``: what ``roi_size: auto`` derived, recorded in run.json)
        "patch_size": rec["overrides"].get("patch_size"),
        "n_train": n_train,
        "optimizer_steps": epochs * (n_train // batch),
        "mean_dice": metrics["mean_dice"],
        "per_class": {k: v["dice"]["value"] for k, v in metrics["per_class"].items()},
        "train_seconds": rec.get("seconds"),
        "wall_seconds": round(time.time() - t0, 1),
        "peak_rss_mb": rec.get("peak_rss_mb"),
        "load_1m": load,
        "case_mean_dice": cases,
    }


def run_sampling_load(cmd: list[str], every: float = 30.0) -> dict[str, Any]:
    """Run ``cmd`` (check=True) while sampling the machine's 1-minute load average: the run's wall time on a
    shared machine means little without it."""
    samples = [os.getloadavg()[0]]
    with subprocess.Popen(cmd) as proc:
        while True:
            try:
                proc.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                samples.append(os.getloadavg()[0])
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return {"mean": round(sum(samples) / len(samples), 2), "max": round(max(samples), 2), "n": len(samples),
            "every_s": every}  # fmt: skip


def steps_note(results: list[dict[str, Any]]) -> list[str]:
    """One sentence per pair of recipes that differ only in epochs: does mean Dice still climb with steps? Paired
    by validation case (percentile bootstrap over cases, as in ``medtune evaluate``)."""
    from medtune.evaluate.segmentation import summarise_case_dice

    def rest(r: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in r["overrides"].items() if k != "epochs"}, sort_keys=True)

    lines = []
    runs = sorted((r for r in results if r.get("case_mean_dice")), key=lambda r: r["optimizer_steps"])
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if rest(a) != rest(b) or a["optimizer_steps"] == b["optimizer_steps"]:
                continue
            ids = sorted(set(a["case_mean_dice"]) & set(b["case_mean_dice"]))
            diff = summarise_case_dice([{"case": c, "mean_dice": b["case_mean_dice"][c] - a["case_mean_dice"][c],
                                         "dice": {}} for c in ids])["mean_dice"]  # fmt: skip
            lo, hi = diff["ci_low"], diff["ci_high"]
            verdict = ("Dice still climbs with steps" if lo > 0 else "Dice drops with more steps" if hi < 0 else
                       "the change is within noise (the paired CI includes 0)")  # fmt: skip
            lines.append(
                f"{a['recipe']} → {b['recipe']} ({a['optimizer_steps']} → {b['optimizer_steps']} steps, same "
                f"patches and batch): mean Dice {a['mean_dice']['value']:.3f} → {b['mean_dice']['value']:.3f}, "
                f"paired difference {diff['value']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}, {len(ids)} cases): "
                f"{verdict}."
            )
    return lines


def derived(r: dict[str, Any]) -> str:
    """The patch a recipe without its own ``patch_size`` trained with (``roi_size: auto``), for the table."""
    patch = r.get("patch_size")
    return f" (patch from roi_size auto: {patch})" if patch and "patch_size" not in r["overrides"] else ""


def write(results: list[dict[str, Any]], dest: Path) -> None:
    payload = {"benchmark": "hippocampus_recipe", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "threads": 1, "results": results}  # fmt: skip
    (dest / "hippocampus_recipe.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# 3D segmentation preset recipe on MSD Hippocampus (fixed split: 160 train / 40 validation)", "",
             "Each recipe trains on the 160 training-pool cases and is validated once, at its final epoch (no "
             "model selection on the 40 validation cases). 1 torch thread, nice 10, on a 2-core machine shared "
             "with other benchmarks and tests, so train seconds depend on the load: the load column is the "
             "machine's 1-minute load average sampled every 30 s during the run.", "",
             "| recipe | overrides | optimizer steps | mean Dice (95% CI) | anterior | posterior | train s | "
             "load (1-min avg, mean / max) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        md, load = r["mean_dice"], r.get("load_1m")
        load_txt = f"{load['mean']:.1f} / {load['max']:.1f}" if load else "not recorded"
        lines.append(
            f"| {r['recipe']} | {json.dumps(r['overrides'])}{derived(r)} | {r['optimizer_steps']} | {md['value']:.3f} "
            f"({md['ci_low']:.3f}–{md['ci_high']:.3f}) | {r['per_class'].get('anterior', float('nan')):.3f} | "
            f"{r['per_class'].get('posterior', float('nan')):.3f} | {r['train_seconds']:.0f} | "
            f"{load_txt} |"
        )
    notes = steps_note(results)
    if notes:
        lines += ["", *notes]
    ran = {r["recipe"] for r in results}
    missing = [n for n in RECIPES if n not in ran]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (`--recipes {','.join(missing)}`)."]
    lines += ["", "`default` is the preset as shipped when it ran: since `roi_size: auto` (session 3) the patch is "
              "derived from the data's median shape (32x48x32 on this dataset with unet_zoo), batch 2 x 2, 10 "
              "epochs; before it, a fixed 64^3 patch (never measured here)."]  # fmt: skip
    (dest / "hippocampus_recipe.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/hippo_recipe")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--dataset", help="an imported dataset folder to reuse (default: import into WORK/dataset)")
    ap.add_argument("--recipes", default="default,p32_e20", help=f"comma list of {', '.join(RECIPES)}")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json; run nothing")
    args = ap.parse_args()
    if args.report_only:
        write(json.loads((HERE / "results" / "hippocampus_recipe.json").read_text())["results"], HERE / "results")
        return 0
    work, data = Path(args.work), Path(args.data)
    if not (data / "imagesTr").is_dir() and not args.dataset:
        print(f"skipped: {data / 'imagesTr'} not found (real data needed for this benchmark)")
        return 0
    dataset = Path(args.dataset) if args.dataset else work / "dataset"
    if not (dataset / "dataset.json").is_file():
        from medtune.data import import_msd

        import_msd(data / "imagesTr", data / "labelsTr", dataset, label_names={0: "background", 1: "anterior",
                   2: "posterior"}, val_fraction=0.2, seed=0, link=True)  # fmt: skip
    dest = HERE / "results"
    path = dest / "hippocampus_recipe.json"
    results = json.loads(path.read_text())["results"] if path.is_file() else []
    for name in [n.strip() for n in args.recipes.split(",") if n.strip()]:
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        r = run_recipe(name, dataset, work)
        print(json.dumps({k: r[k] for k in ("recipe", "optimizer_steps", "mean_dice", "train_seconds")}), flush=True)
        results = [x for x in results if x["recipe"] != name] + [r]
        write(results, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
