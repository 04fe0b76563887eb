"""The 3D segmentation preset's recipe on real MSD Hippocampus: the current default vs candidate recipes.

    nice -n 10 python benchmarks/hippocampus_recipe.py --work /tmp/hippo_recipe --recipes default,p32_e20

Every recipe trains the preset's network on the 160 training-pool cases of the fixed split (20 %, seed 0) with
``--internal-test 0`` and is validated once, at its last epoch (``val_interval = epochs``): the model scored on the
40 validation cases was not chosen on them. Results (mean Dice + CI, per class, optimizer steps, wall time on one
thread) are merged by recipe name into ``benchmarks/results/hippocampus_recipe.json/.md``; the per-case Dice the
paired comparisons need stays in ``WORK/case_dice.json`` (no per-case lists in the repository). A user's default
``medtune finetune`` keeps 20 % of the training split as its internal test, so it trains on 4/5 of these steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    "default_e40": {"epochs": 40},  # the same, 3200 optimizer steps
    "default_e80": {"epochs": 80},  # 6400 steps: does Dice still climb past the shipped 40 epochs?
    "b4_e80": {"batch_size": 4, "epochs": 80},  # the same patches seen as 3200 steps of twice the batch
    # the shipped default without refit_on_all: 20 % of the training pool kept as the internal test, so the model
    # trains on 128 of the 160 cases (default_e40 is then what refit_on_all deploys: the same recipe on all 160)
    "default_e40_it20": {"epochs": 40, "internal_test": 0.2},
    # the product flow with a 2-seed ensemble: the estimate's run on 128 cases (internal test 32), then seeds 1 and 0
    # of the recipe on all 160; rows: the ensemble (what export deploys) and RECIPE/seed0 (RUN alone, one model)
    "default_seeds2": {"epochs": 40, "internal_test": 0.2, "seed_ensemble": 2},
    # session 12: the shipped recipe (40 epochs, all 160) with instance norm instead of batch norm (nnU-Net's choice
    # for batches of 2-4 small patches), and with MONAI SegResNet in place of the zoo UNet
    "inorm_e40": {"epochs": 40, "arch_kwargs": {"norm": "instance"}},
    "segresnet_e40": {"epochs": 40, "arch": "segresnet"},
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


def run_recipe(
    name: str, dataset: Path, work: Path, keep_model: bool = False, reuse: bool = False
) -> list[dict[str, Any]]:
    """Train (or, with ``reuse``, take the finished ``WORK/NAME`` with its model) and evaluate recipe ``name``: one
    row, or for a ``seed_ensemble`` recipe the ensemble's row and its first member's (``NAME/seed0``)."""
    over = dict(RECIPES[name])
    epochs = int(over.pop("epochs", preset_value("epochs")))
    internal_test = float(over.pop("internal_test", 0))
    batch = int(over.get("batch_size", preset_value("batch_size")))
    out = work / name
    sets = [x for k, v in over.items() for x in ("--set", f"{k}={v!r}")]
    cmd = [sys.executable, "-m", "medtune", "finetune", "--dataset", str(dataset), "--preset", "3d_segmentation",
           "--internal-test", str(internal_test), "--epochs", str(epochs), "--set", f"val_interval={epochs}",
           "--num-workers", "0", "--quiet", *sets, "--out", str(out)]  # fmt: skip
    t0 = time.time()
    finished = reuse and (out / "model.pt").is_file() and json.loads((out / "run.json").read_text()).get("status") in (
        "completed", "early_stopped")  # fmt: skip
    load = None if finished else run_sampling_load(cmd)
    subprocess.run([sys.executable, "-m", "medtune", "evaluate", "--run", str(out)], check=True, capture_output=True)
    rec = json.loads((out / "run.json").read_text())
    seeds = int(over.get("seed_ensemble", 1))
    metrics = json.loads((out / ("eval_validation" if seeds > 1 else "eval") / "metrics.json").read_text())
    from medtune.finetune.bundle_glue import datalist

    n_train = len(datalist(str(dataset), "training", 1.0, 0))
    split = json.loads((out / "internal_test.json").read_text()) if (out / "internal_test.json").is_file() else {}
    if split and not split.get("refit"):  # the internal test's cases were not trained on
        n_train -= len(split["cases"])
    rows = [(name, metrics, rec.get("seconds"))]
    estimate = json.loads((out / "estimate.json").read_text())["honest"] if (out / "estimate.json").is_file() else None
    if seeds > 1:  # RUN alone (seed 0, one model), and the ensemble's cost: every member's training
        from medtune.finetune.crossval import ensemble_runs
        from medtune.finetune.runner import evaluate_run

        single = evaluate_run(out)["metrics"]
        members = [json.loads((r / "run.json").read_text()).get("seconds") or 0 for r in ensemble_runs(out)]
        rows = [(name, metrics, round(sum(members), 1)), (f"{name}/seed0", single, rec.get("seconds"))]
    for f in () if keep_model else ("model.pt", "checkpoint_last.pt"):
        (out / f).unlink(missing_ok=True)
    return [_row(n, m, seconds, name, rec, n_train, epochs, batch, t0, load, estimate) for n, m, seconds in rows]


def _row(recipe: str, metrics: dict[str, Any], seconds: float | None, name: str, rec: dict[str, Any], n_train: int,
         epochs: int, batch: int, t0: float, load: dict[str, Any] | None, estimate: dict[str, Any] | None
         ) -> dict[str, Any]:  # fmt: skip
    cases = {c["case"]: c["mean_dice"] for c in metrics["cases"]}  # kept for paired comparisons between recipes
    row = {
        "recipe": recipe,
        "overrides": {**RECIPES[name], "epochs": epochs},
        # the patch the run trained with (``default``: what ``roi_size: auto`` derived, recorded in run.json)
        "patch_size": rec["overrides"].get("patch_size"),
        "n_train": n_train,
        "optimizer_steps": epochs * (n_train // batch),
        "mean_dice": metrics["mean_dice"],
        "per_class": {k: v["dice"]["value"] for k, v in metrics["per_class"].items()},
        "train_seconds": seconds,
        "wall_seconds": round(time.time() - t0, 1),
        "peak_rss_mb": rec.get("peak_rss_mb"),
        "load_1m": load,
        "case_mean_dice": cases,
    }
    if estimate is not None:  # the run's honest figure (internal test of the estimate's run), to compare
        row["internal_test_estimate"] = {k: estimate.get(k) for k in ("name", "n")} | {
            k: estimate.get("estimate", {}).get(k) for k in ("value", "ci_low", "ci_high")}  # fmt: skip
    return row


def evaluate_tta(name: str, work: Path, flips: list[list[int]], base: dict[str, Any]) -> dict[str, Any]:
    """Recipe ``name``'s kept model (``--keep-models``) evaluated again with test-time flips (bundle key
    ``tta_flips``, what the exported sidecar's runtime applies): same weights, so the difference to ``base`` is the
    flips' alone. Its eval folder is kept as ``eval_tta_<flips>``."""
    out = work / name
    if not (out / "model.pt").is_file():
        raise SystemExit(f"{out / 'model.pt'} not found: run --recipes {name} --keep-models first")
    tag = "tta" + "_".join("".join(str(a) for a in f) for f in flips)
    cmd = [sys.executable, "-m", "medtune", "evaluate", "--run", str(out), "--set", f"tta_flips={flips!r}"]
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True)
    seconds = round(time.time() - t0, 1)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    shutil.rmtree(out / f"eval_{tag}", ignore_errors=True)
    shutil.copytree(out / "eval", out / f"eval_{tag}")
    return {
        **{k: base[k] for k in ("patch_size", "n_train", "optimizer_steps", "train_seconds", "peak_rss_mb", "load_1m")},
        "recipe": f"{name}+{tag}",
        "overrides": {**base["overrides"], "tta_flips": flips},
        "mean_dice": metrics["mean_dice"],
        "per_class": {k: v["dice"]["value"] for k, v in metrics["per_class"].items()},
        "evaluate_seconds": seconds,  # 40 validation volumes, 1 + len(flips) sliding-window passes each
        "wall_seconds": seconds,
        "case_mean_dice": {c["case"]: c["mean_dice"] for c in metrics["cases"]},
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


#: pairs reported with a paired CI when both ran (beyond the epochs-only pairs of ``steps_note``)
PAIRS = [
    ("default_e40", "default_e40+tta0"),
    ("default_e20", "default_e40+tta0"),
    ("default_e40", "default_e80"),
    ("default_e80", "b4_e80"),
    ("default_e40", "b4_e80"),
    ("default_e40_it20", "default_e40"),
    ("default_seeds2/seed0", "default_seeds2"),
    ("default_e40", "default_seeds2"),
    ("default_seeds2/seed0", "inorm_e40"),
    ("default_seeds2/seed0", "segresnet_e40"),
]


def paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, float, int]:
    """Mean of ``b - a`` per validation case and its percentile-bootstrap CI (as ``medtune evaluate``)."""
    from medtune.evaluate.segmentation import summarise_case_dice

    ids = sorted(set(a["case_mean_dice"]) & set(b["case_mean_dice"]))
    diff = summarise_case_dice([{"case": c, "mean_dice": b["case_mean_dice"][c] - a["case_mean_dice"][c],
                                 "dice": {}} for c in ids])["mean_dice"]  # fmt: skip
    return diff["value"], diff["ci_low"], diff["ci_high"], len(ids)


def pairs_note(results: list[dict[str, Any]]) -> list[str]:
    by = {r["recipe"]: r for r in results if r.get("case_mean_dice")}
    lines = []
    for na, nb in PAIRS:
        if na in by and nb in by:
            d, lo, hi, n = paired(by[na], by[nb])
            lines.append(f"{na} → {nb}: mean Dice {by[na]['mean_dice']['value']:.3f} → "
                         f"{by[nb]['mean_dice']['value']:.3f}, paired difference {d:+.3f} (95% CI {lo:+.3f} to "
                         f"{hi:+.3f}, {n} cases).")  # fmt: skip
    return lines


def pair_of(note: str) -> str:
    """``"A → B"`` of a paired note (``"A → B (...): ..."`` or ``"A → B: ..."``): one note per pair of recipes."""
    return note.split(":", 1)[0].split(" (", 1)[0]


def derived(r: dict[str, Any]) -> str:
    """The patch a recipe without its own ``patch_size`` trained with (``roi_size: auto``), for the table."""
    patch = r.get("patch_size")
    return f" (patch from roi_size auto: {patch})" if patch and "patch_size" not in r["overrides"] else ""


CASES_FILE = "case_dice.json"  # per-case Dice by recipe, in the work folder only (never in benchmarks/results/)


def load(path: Path, work: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The recorded results with their per-case Dice (``case_mean_dice``) from ``WORK/case_dice.json``, and the
    recorded paired notes. Per-case lists still inline in an older results file move to the work folder."""
    if not path.is_file():
        return [], []
    payload = json.loads(path.read_text())
    cases_path = work / CASES_FILE
    cases = json.loads(cases_path.read_text()) if cases_path.is_file() else {}
    results = payload["results"]
    for r in results:
        inline = r.pop("case_mean_dice", None)
        if inline:
            cases.setdefault(r["recipe"], inline)
        if r["recipe"] in cases:
            r["case_mean_dice"] = cases[r["recipe"]]
    return results, payload.get("paired_notes", [])


def write(results: list[dict[str, Any]], dest: Path, work: Path, notes: list[str] | None = None) -> None:
    """``dest/hippocampus_recipe.json/.md`` (aggregates only) and ``WORK/case_dice.json`` (per-case Dice, for the
    paired comparisons). ``notes``: the recorded paired notes, used when the per-case Dice is not at hand."""
    cases = {r["recipe"]: r["case_mean_dice"] for r in results if r.get("case_mean_dice")}
    if cases:
        work.mkdir(parents=True, exist_ok=True)
        old = json.loads((work / CASES_FILE).read_text()) if (work / CASES_FILE).is_file() else {}
        (work / CASES_FILE).write_text(json.dumps({**old, **cases}) + "\n")
    fresh = steps_note(results) + pairs_note(results)
    kept = [n for n in notes or [] if pair_of(n) not in {pair_of(f) for f in fresh}]  # recorded, per-case Dice gone
    notes = []
    for line in kept + fresh:  # one note per pair (both notes cover a pair that differs in epochs: the first)
        notes += [] if pair_of(line) in {pair_of(n) for n in notes} else [line]
    payload = {"benchmark": "hippocampus_recipe", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": 1,
               "results": [{k: v for k, v in r.items() if k != "case_mean_dice"} for r in results],
               "paired_notes": notes}  # fmt: skip
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
    if notes:
        lines += ["", *notes]
    for r in results:  # the run's own honest figure next to what the 40 validation cases give
        est = r.get("internal_test_estimate")
        if est and est.get("value") is not None and "/" not in r["recipe"]:
            md = r["mean_dice"]["value"]
            inside = "inside" if est["ci_low"] <= md <= est["ci_high"] else "outside"
            lines += ["", f"{r['recipe']}: the run's honest estimate (internal test, {est['n']} training-pool cases "
                      f"scored by the estimate's run) is {est['value']:.3f} ({est['ci_low']:.3f}–{est['ci_high']:.3f});"
                      f" the deployed model scores {md:.3f} on the 40 validation cases: {inside} the estimate's CI."]
    if any("+tta" in r["recipe"] for r in results):
        lines += ["", "RECIPE+ttaF rows: RECIPE's final model evaluated again with test-time flips F (`tta_flips`: "
                  "spatial axes in the RAS model space, 0 = left-right; probabilities of the plain and flipped "
                  "volumes averaged, as the exported sidecar's runtime does): same weights, so the paired "
                  "difference is the flips' alone; train s is RECIPE's, the flips cost inference time only "
                  "(1 + number of flips sliding-window passes)."]  # fmt: skip
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
    ap.add_argument("--tta", help="evaluate the kept model of each recipe again with test-time flips: '0' (left-"
                    "right in RAS), '0;1;2' (three flips; sets separated by ';', axes of one set by ','); recorded "
                    "as RECIPE+tta<flips>")  # fmt: skip
    ap.add_argument("--keep-models", action="store_true", help="keep WORK/RECIPE/model.pt (to evaluate it again)")
    ap.add_argument("--reuse-finished", action="store_true", help="a finished WORK/RECIPE run with its model.pt is "
                    "evaluated again, not retrained (train s from its run.json)")  # fmt: skip
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json; run nothing")
    args = ap.parse_args()
    work, data = Path(args.work), Path(args.data)
    dest = HERE / "results"
    path = dest / "hippocampus_recipe.json"
    results, notes = load(path, work)
    if args.report_only:
        write(results, dest, work, notes)
        return 0
    if not (data / "imagesTr").is_dir() and not args.dataset:
        print(f"skipped: {data / 'imagesTr'} not found (real data needed for this benchmark)")
        return 0
    dataset = Path(args.dataset) if args.dataset else work / "dataset"
    if not (dataset / "dataset.json").is_file():
        from medtune.data import import_msd

        import_msd(data / "imagesTr", data / "labelsTr", dataset, label_names={0: "background", 1: "anterior",
                   2: "posterior"}, val_fraction=0.2, seed=0, link=True)  # fmt: skip
    for name in [n.strip() for n in args.recipes.split(",") if n.strip()]:
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        if args.tta:
            flips = [[int(a) for a in part.split(",")] for part in args.tta.split(";")]
            base = next((x for x in results if x["recipe"] == name), None)
            if base is None:
                raise SystemExit(f"recipe {name} has no result yet: run it with --keep-models first")
            rows = [evaluate_tta(name, work, flips, base)]
        else:
            rows = run_recipe(name, dataset, work, args.keep_models, args.reuse_finished)
        for r in rows:
            print(json.dumps({k: r[k] for k in ("recipe", "optimizer_steps", "mean_dice", "train_seconds")}),
                  flush=True)  # fmt: skip
            results, notes = load(path, work)  # again: another recipe run beside this one may have written since
            results = [x for x in results if x["recipe"] != r["recipe"]] + [r]
            write(results, dest, work, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
