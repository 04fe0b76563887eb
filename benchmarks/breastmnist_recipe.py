"""BreastMNIST: recipes of the deployed 2D model, paired on unseen images (issue 15).

The outer folds of ``breastmnist_ensemble.py`` / ``breastmnist_refit.py``: the 624 labelled images cut into O outer
folds (stratified, ``--outer-seed``); for outer fold o the other folds are everything a user has (``T_o``, 416
images at O = 3) and fold o is unseen. Each recipe trains what the product deploys from ``T_o`` by default: one
run of the recipe on all of ``T_o`` (``refit_on_all``'s model; a 32-image monitor copied from ``T_o`` is its
validation split, nothing is chosen on it). Scores on the unseen folds are pooled; every recipe is paired with
``default`` (the shipped recipe) over the same cases.

- ``default``: the shipped 2D classification recipe (128 px Lite0, AdamW 1e-3, 12 epochs, last epoch);
- ``e24``: the same with 24 epochs (the schedule's length was never measured: 12 epochs are ~160 steps);
- ``ema95``: the shipped recipe with an exponential moving average of the weights (decay 0.95 per step);
- ``cv5_refit``: the product's ``--folds 5 --set folds_deploy=refit`` on ``T_o`` (folds over the training split,
  the monitor is not pooled): the deployed model is the recipe on all of ``T_o`` again, and the run's honest figure
  is the out-of-fold AUC over all 416 images instead of an 83-image internal test: is it inside its CI of the
  unseen result?

Usage: python benchmarks/breastmnist_recipe.py --recipes default,e24 [--outer-only 0] [--work W]
Writes benchmarks/results/breastmnist_recipe.json/.md (aggregates); per-case scores stay in the work folder.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import breastmnist_ensemble as outer  # noqa: E402  (the outer folds' protocol and helpers)
from breastmnist_cv import _cpu_seconds  # noqa: E402

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "e24": {"epochs": 24},
    "ema95": {"ema_decay": 0.95},  # weight averaging alone at 128 px (the 32 px arm confounded it with augmentation)
    "cv5_refit": {"folds": 5, "folds_deploy": "refit"},
}


def run_recipe(name: str, ds: Path, folder: Path, test: list[dict], seed: int, smoke: bool) -> dict[str, Any]:
    """Train recipe ``name`` on ``ds`` (all of T_o) into ``folder``; its probabilities on the unseen ``test``."""
    from medtune.finetune.crossval import crossvalidate, predict_classification
    from medtune.finetune.runner import finetune

    over = dict(RECIPES[name])
    folds = over.pop("folds", 0)
    ov = {"seed": seed, "num_workers": 0, **over, **({"image_size": [32, 32], "epochs": 1} if smoke else {})}
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted recipe is trained again
    t0, c0 = time.time(), _cpu_seconds()
    out: dict[str, Any] = {}
    if folds:
        rec = crossvalidate(ds, "2d_classification", folder, folds, overrides=ov, pool_validation=False,
                            progress_bar=False)  # fmt: skip
        honest = rec["estimate"]["honest"]
        out["honest"] = {"n": honest["n"], **honest["estimate"]}
    else:
        finetune(ds, "2d_classification", folder, overrides=ov, progress_bar=False)
    out["probs"] = outer._p1(predict_classification(folder, test, flips=[]))
    out["seconds"] = {"wall": round(time.time() - t0, 1), "cpu": round(_cpu_seconds() - c0, 1)}
    for f in folder.rglob("*.pt"):  # model files are big; the scores are kept
        f.unlink()
    return out


def main() -> int:
    ap = outer.outer_fold_parser(__doc__, "work_recipe")
    ap.add_argument("--recipes", default="default,e24", help=f"comma list of {', '.join(RECIPES)}")
    args = ap.parse_args()
    setup = outer.outer_setup(args)
    if setup is None:
        return 0
    work, dataset, items, outer_of = setup
    todo = [int(o) for o in args.outer_only.split(",") if o] or list(range(args.outer))
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    for o in todo:
        train, test, monitor = outer.outer_split(items, outer_of, o, dataset, args.outer_seed)
        ds = work / f"o{o}" / "dataset"
        if not (ds / "datalist.json").is_file():
            outer.outer_dataset(dataset, ds, train, monitor)
        for name in names:
            probs_file = work / f"o{o}_{name}_probs.json"
            if probs_file.is_file():
                continue
            print(f"== outer {o}: {name} on {len(train)} (unseen {len(test)})", flush=True)
            out = run_recipe(name, ds, work / f"o{o}" / name, test, args.seed, args.smoke)
            out["labels"] = [int(it["label"]) for it in test]
            probs_file.write_text(json.dumps(out))  # per case: work folder only
            print(json.dumps({"outer": o, "recipe": name, "seconds": out["seconds"], **({"honest": out["honest"]}
                  if "honest" in out else {})}), flush=True)  # fmt: skip
            summarise(work, args)
    summarise(work, args)
    return 0


def summarise(work: Path, args: Any) -> None:
    """Pool each recipe's finished outer folds; pair it with ``default`` on the folds both finished."""
    import numpy as np

    from medtune.evaluate.metrics import paired_auc_difference

    runs: dict[str, dict[str, dict]] = {}
    for p in sorted(work.glob("o*_*_probs.json")):
        key, name = p.name.split("_", 1)[0], p.name.split("_", 1)[1].removesuffix("_probs.json")
        if name in RECIPES:
            runs.setdefault(name, {})[key] = json.loads(p.read_text())
    if not runs:
        return
    rows = {}
    for name, folds in runs.items():
        keys = sorted(folds)
        y = np.concatenate([folds[k]["labels"] for k in keys])
        p = np.concatenate([folds[k]["probs"] for k in keys])
        row: dict[str, Any] = {"overrides": RECIPES[name], "outer_folds": keys, "n_pooled": int(len(y)),
                               "pooled": outer._auc(y, p), "per_outer_fold": {}}  # fmt: skip
        for k in keys:
            f = folds[k]
            entry = {"auc": outer._auc(f["labels"], f["probs"])["value"], "cpu_s": f["seconds"]["cpu"],
                     "wall_s": f["seconds"]["wall"]}  # fmt: skip
            if "honest" in f:
                h = f["honest"]
                entry["honest"] = h
                entry["honest_covers_unseen"] = bool(h["ci_low"] <= entry["auc"] <= h["ci_high"])
            row["per_outer_fold"][k] = entry
        base = runs.get("default", {})
        common = [k for k in keys if k in base]
        if name != "default" and common:
            yc = np.concatenate([folds[k]["labels"] for k in common])
            a = np.concatenate([base[k]["probs"] for k in common])
            b = np.concatenate([folds[k]["probs"] for k in common])
            row["minus_default"] = {"outer_folds": common, "n": int(len(yc)), "default": outer._auc(yc, a)["value"],
                                    "this": outer._auc(yc, b)["value"],
                                    **paired_auc_difference(yc, b, a, n_bootstrap=2000, seed=0)}  # fmt: skip
            row["identical_to_default"] = bool(np.allclose(a, b, atol=1e-6))
        rows[name] = row
    payload = {
        **outer.payload_head("breastmnist_recipe", __doc__, args),
        "threads": 1,
        "recipes": rows,
    }
    dest = HERE / "results" / f"breastmnist_recipe{'_smoke' if args.smoke else ''}.json"
    dest.write_text(json.dumps(payload, indent=1))
    dest.with_suffix(".md").write_text(markdown(payload))


def _ci(e: dict) -> str:
    return f"{e['value']:.3f} ({e['ci_low']:.3f}–{e['ci_high']:.3f})"


def markdown(p: dict) -> str:
    lines = ["# BreastMNIST: recipes of the deployed 2D model, paired on unseen images", "", p["protocol"], "",
             f"O = {p['outer']} outer folds (seed {p['outer_seed']}), training seed {p['seed']}, 1 torch thread.", "",
             "| recipe | overrides | outer folds | AUC on unseen cases (95% CI) | minus default (paired, 95% CI) | "
             "CPU s per outer fold |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in p["recipes"].items():
        d = r.get("minus_default")
        diff = f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] ({d['n']} cases)" if d else ""
        cpu = " / ".join(f"{f['cpu_s']:.0f}" for f in r["per_outer_fold"].values())
        lines.append(f"| {name} | `{json.dumps(r['overrides'])}` | {', '.join(r['outer_folds'])} ({r['n_pooled']}) | "
                     f"{_ci(r['pooled'])} | {diff} | {cpu} |")  # fmt: skip
    for name, r in p["recipes"].items():
        honest = {k: f for k, f in r["per_outer_fold"].items() if "honest" in f}
        if honest:
            lines += ["", f"`{name}`: the run's own honest figure (out-of-fold over T_o) against the deployed model "
                      "on the unseen fold:", "", "| outer fold | honest estimate (95% CI), n | unseen AUC | inside |",
                      "|---|---|---:|---|"]  # fmt: skip
            for k, f in honest.items():
                lines.append(f"| {k} | {_ci(f['honest'])}, n={f['honest']['n']} | {f['auc']:.3f} | "
                             f"{'yes' if f['honest_covers_unseen'] else 'no'} |")  # fmt: skip
            if "identical_to_default" in r:
                same = "identical to" if r["identical_to_default"] else "not identical to"
                lines += ["", f"Its deployed model's unseen probabilities are {same} `default`'s (same recipe, data "
                          "and seed on one thread)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
