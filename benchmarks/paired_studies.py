"""Paired difference between one arm of two ``medtune study`` folders (e.g. the same arm at two step budgets).

    python benchmarks/paired_studies.py --a /tmp/hippo/s120 --b /tmp/hippo/study --arm scratch --budget 8 \
        [--arm-b ARM] --out benchmarks/results/hippocampus_study/steps_120_vs_480.json

Both studies must hold the arm's runs for the same seeds and label budget (so seed ``s`` trained on the same labeled
cases in both). The difference ``b - a`` is the mean over seeds of the per-case mean Dice, paired by seed and case; its
CI is the study report's percentile bootstrap over validation cases (cases resampled once per replicate for both).
Writes aggregates only (means, CI, per-seed means; no case ids).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from medtune.study.report import _boot_indices, _ci, _dice_matrix


def _records(study: Path, arm: str, budget: str) -> tuple[list[dict], dict]:
    rec = json.loads((study / "study.json").read_text(encoding="utf-8"))
    runs = [r for r in rec["runs"] if r["arm"] == arm and r["budget"] == budget]
    if not runs:
        raise SystemExit(f"{study}/study.json: no runs of arm {arm!r} at budget {budget!r}")
    return sorted(runs, key=lambda r: r["seed"]), rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="study folder A (the reference)")
    ap.add_argument("--b", required=True, help="study folder B")
    ap.add_argument("--arm", default="scratch")
    ap.add_argument("--arm-b", default=None, help="arm of study B (default: --arm)")
    ap.add_argument("--budget", default="8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ra, plan_a = _records(Path(args.a), args.arm, args.budget)
    rb, plan_b = _records(Path(args.b), args.arm_b or args.arm, args.budget)
    seeds = sorted({r["seed"] for r in ra} & {r["seed"] for r in rb})
    ma = _dice_matrix([r for r in ra if r["seed"] in seeds])
    mb = _dice_matrix([r for r in rb if r["seed"] in seeds])
    if ma is None or mb is None or list(ma[0]) != list(mb[0]):
        raise SystemExit("per-case Dice missing or the two studies validated different cases")
    a, b = ma[1], mb[1]
    idx = _boot_indices(a.shape[1])
    boot = np.array([np.nanmean(b[:, i]) - np.nanmean(a[:, i]) for i in idx])
    lo, hi = _ci(boot)

    def arm(runs: list[dict], m: np.ndarray, plan: dict) -> dict:
        ci = _ci(np.array([np.nanmean(m[:, i]) for i in idx]))
        return {"steps": plan.get("steps"), "mean": float(np.nanmean(m)), "ci": list(ci),
                "per_seed": [float(np.nanmean(s)) for s in m],
                "train_seconds_mean": float(np.mean([r.get("train_seconds") or 0 for r in runs if r["seed"] in seeds])),
                "common_overrides": plan.get("common_overrides")}  # fmt: skip

    out = {
        "arm_a": args.arm, "arm_b": args.arm_b or args.arm, "budget": args.budget, "seeds": seeds,
        "n_validation": int(a.shape[1]), "a": arm(ra, a, plan_a), "b": arm(rb, b, plan_b),
        "difference_b_minus_a": float(np.nanmean(b) - np.nanmean(a)), "ci": [lo, hi],
        "per_seed_difference": [float(np.nanmean(y) - np.nanmean(x)) for x, y in zip(a, b, strict=True)],
        "how": "paired by seed and validation case; percentile bootstrap over cases (2000 replicates) of the mean "
        "over seeds of the per-case mean Dice (foreground classes)",
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    d = out["difference_b_minus_a"]
    print(f"{out['arm_b']}@{out['b']['steps']} - {out['arm_a']}@{out['a']['steps']} at {args.budget} labels: {d:+.3f} "
          f"CI [{lo:+.3f}, {hi:+.3f}] (seeds {seeds})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
