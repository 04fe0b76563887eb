"""Paired AUC difference between two classification arms' pooled out-of-fold predictions (two study folders).

    python benchmarks/paired_oof_auc.py --a STUDY_A/oof/scratch/10pct/seed0/predictions.csv \
        --b STUDY_B/oof/ct32_full/10pct/seed0/predictions.csv --out benchmarks/results/.../paired.json

Both files are ``medtune study --folds K`` outputs (``file,label,p_<class>...``) over the same cases, made with the same
folds and label subsets (same dataset, fold count and seed), so case ``c`` was predicted in both by a model that did
not train on it. Prints and writes AUC(b) - AUC(a) with the paired percentile-bootstrap CI of
:func:`medtune.evaluate.metrics.paired_auc_difference`; aggregates only (no case ids).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from medtune.evaluate.metrics import classification_metrics, paired_auc_difference


def _read(path: Path) -> dict[str, tuple[int, float]]:
    """``{file: (label, p of the last class)}`` (binary tasks: the positive class is the last column)."""
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "file" not in rows[0] or "label" not in rows[0]:
        raise SystemExit(f"{path}: not a study predictions file (needs file, label, p_<class> columns)")
    prob_cols = [c for c in rows[0] if c.startswith("p_")]
    if len(prob_cols) != 2:
        raise SystemExit(f"{path}: {len(prob_cols)} probability columns; this script is for binary tasks")
    return {r["file"]: (int(r["label"]), float(r[prob_cols[1]])) for r in rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, type=Path, help="reference arm's predictions.csv")
    ap.add_argument("--b", required=True, type=Path, help="compared arm's predictions.csv")
    ap.add_argument("--out", type=Path, help="JSON file for the aggregates")
    ap.add_argument("--bootstrap", type=int, default=2000)
    args = ap.parse_args()
    a, b = _read(args.a), _read(args.b)
    if set(a) != set(b):
        print(f"the two files hold different cases ({len(set(a) ^ set(b))} differ)", file=sys.stderr)
        return 1
    files = sorted(a)
    if any(a[f][0] != b[f][0] for f in files):
        print("the two files disagree on labels", file=sys.stderr)
        return 1
    y = np.array([a[f][0] for f in files])
    pa, pb = np.array([a[f][1] for f in files]), np.array([b[f][1] for f in files])
    diff = paired_auc_difference(y, pb, pa, n_bootstrap=args.bootstrap)
    aucs = {k: classification_metrics(y, np.stack([1 - p, p], axis=1), ["0", "1"], n_bootstrap=args.bootstrap)["auc"]
            for k, p in (("a", pa), ("b", pb))}  # fmt: skip
    arm = {k: str(f.parent.relative_to(f.parents[3])) for k, f in (("a", args.a), ("b", args.b))}  # arm/budget/seed
    record = {"a": arm["a"], "b": arm["b"],
              "n_cases": len(files), "auc_a": aucs["a"], "auc_b": aucs["b"], "b_minus_a": diff,
              "bootstrap": args.bootstrap}  # fmt: skip
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
