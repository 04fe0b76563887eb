"""BreastMNIST: choose the 2D preset's defaults by cross-validated AUC over all 624 labelled images (issue 15).

Protocol ``pooled`` (the honest estimate, nnU-Net style): the 546 training + 78 validation images are cut into
K stratified folds (seeded); every fold model trains on K-1 folds for a FIXED schedule (``model_selection=last``:
the final weights are kept, no epoch is chosen on anything) and predicts its held-out fold. Per arm and seed:

- ``oof_auc``: pooled out-of-fold AUC of single fold models over the 624 images (bootstrap 95% CI);
- ``oof_auc_tta``: the same with left-right flip TTA (the runtime's rule);
- over seeds: the mean and spread of the per-seed OOF AUCs, and ``oof_seed_ensemble``: each image's probability
  averaged over the S seeds' models that did not train on it (an out-of-fold estimate of an S-model ensemble).

Protocol ``outer_val`` (ensemble vs single on unseen images): CV over the 546 training images only, the official
78 validation images predicted by every fold model and by the fold ensemble (mean probability), +- TTA.

Usage: python benchmarks/breastmnist_cv.py --arms lite0_64 --folds 5 --seeds 0,1,2 [--protocol pooled]
Writes benchmarks/results/breastmnist_cv{tag}.json (after every run) and .md. Needs the real data. Model files of
the fold runs are deleted after their predictions are read (small outputs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = Path("/work/shared/data/medmnist")
if not (DEFAULT_ROOT / "breastmnist.npz").is_file():
    DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "medmnist"

LITE0 = {"arch": "efficientnet_lite0", "pretrained": "imagenet-efficientnet-lite0"}
FIXED = {"model_selection": "last", "early_stop_patience": 0}
ARMS: dict[str, dict] = {  # bundle overrides on top of the preset's defaults (+ FIXED, num_workers 0)
    # yesterday's default recipe (lr 1e-3, 10 epochs, 64 px), on the new protocol
    "old_default_64": {**LITE0, "image_size": [64, 64], "learning_rate": 1e-3, "epochs": 10},
    "lite0_32": {**LITE0, "image_size": [32, 32], "learning_rate": 3e-4, "epochs": 12},
    "lite0_32_lr1e-3": {**LITE0, "image_size": [32, 32], "learning_rate": 1e-3, "epochs": 12},
    "lite0_32_lr1e-4": {**LITE0, "image_size": [32, 32], "learning_rate": 1e-4, "epochs": 12},
    "lite0_32_aug_ema": {
        **LITE0,
        "image_size": [32, 32],
        "learning_rate": 3e-4,
        "epochs": 12,
        "augment_extra_prob": 0.3,
        "ema_decay": 0.99,
    },  # fmt: skip
    "lite0_32_ls": {**LITE0, "image_size": [32, 32], "learning_rate": 3e-4, "epochs": 12, "loss#label_smoothing": 0.1},
    "lite0_64": {**LITE0, "image_size": [64, 64], "learning_rate": 3e-4, "epochs": 12},
    "lite0_128_lr1e-3": {**LITE0, "image_size": [128, 128], "learning_rate": 1e-3, "epochs": 12},
    "lite0_64_lr1e-3": {**LITE0, "image_size": [64, 64], "learning_rate": 1e-3, "epochs": 12},
    "lite1_128_lr1e-3": {
        "arch": "efficientnet_lite1",
        "pretrained": "imagenet-efficientnet-lite1",
        "image_size": [128, 128],
        "learning_rate": 1e-3,
        "epochs": 12,
    },
    "lite1_64_lr1e-3": {
        "arch": "efficientnet_lite1",
        "pretrained": "imagenet-efficientnet-lite1",
        "image_size": [64, 64],
        "learning_rate": 1e-3,
        "epochs": 12,
    },
    # the 128 px default + label smoothing 0.1 (same cost as the default; final weights of a fixed schedule on
    # ~400 images are over-confident, smoothing is the cheapest regulariser of that)
    "lite0_128_ls": {
        **LITE0,
        "image_size": [128, 128],
        "learning_rate": 1e-3,
        "epochs": 12,
        "loss#label_smoothing": 0.1,
    },  # fmt: skip
    "lite1_32": {
        "arch": "efficientnet_lite1",
        "pretrained": "imagenet-efficientnet-lite1",
        "image_size": [32, 32],
        "learning_rate": 3e-4,
        "epochs": 12,
    },  # fmt: skip
    "resnet18_32": {
        "arch": "resnet18",
        "pretrained": "torchvision-resnet18-imagenet",
        "image_size": [32, 32],
        "learning_rate": 3e-4,
        "epochs": 12,
    },  # fmt: skip
    "smoke": {**LITE0, "image_size": [32, 32], "epochs": 1},
    "preset": {},  # whatever monai_bundle/configs/2d_classification.json + train.json say now
}


def data_root_or_skip(data_root: str) -> Path | None:
    """The BreastMNIST folder, or None after printing why the benchmark is skipped (the real data is absent)."""
    root = Path(data_root)
    if not (root / "breastmnist.npz").is_file():
        print(f"skipped: {root / 'breastmnist.npz'} not found (real data needed for this benchmark)")
        return None
    return root


def make_dataset(root: Path, work: Path) -> Path:
    from medtune.data import import_medmnist

    dataset = work / "dataset"
    if not (dataset / "datalist.json").is_file():
        shutil.rmtree(dataset, ignore_errors=True)
        import_medmnist("breastmnist", root, dataset)
    return dataset


def _read_probs(path: Path) -> dict[str, tuple[int, float]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    pcols = [k for k in rows[0] if k.startswith("p_")]
    return {r["case"]: (int(r["label"]), float(r[pcols[1]])) for r in rows}  # positive = class 1


def _read_folds(path: Path) -> dict[str, int]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["case"]: int(r["fold"]) for r in csv.DictReader(fh)}


def oof_record(oof_dir: Path) -> dict:
    """Per-case OOF probabilities, folds AND the dataset's labels (work folder only, never results/)."""
    plain = _read_probs(oof_dir / "predictions.csv")
    return {
        "plain": {c: round(v[1], 5) for c, v in plain.items()},
        "tta": {c: round(v[1], 5) for c, v in _read_probs(oof_dir / "predictions_tta.csv").items()},
        "labels": {c: v[0] for c, v in plain.items()},
        "folds": _read_folds(oof_dir / "predictions.csv"),
    }


def outer_predictions(dataset: Path, out: Path) -> dict:
    """Each fold model's P(class 1) on the official validation images, plain and with the flip (work folder only:
    per-case probabilities with labels). The same calls crossvalidate() made, repeated to keep them per case."""
    from medtune.data import load_datalist
    from medtune.finetune.crossval import fold_runs, predict_classification

    val = load_datalist(dataset, "validation")
    runs = fold_runs(out)
    return {
        "labels": [int(it["label"]) for it in val],
        "plain": [[round(float(v), 6) for v in predict_classification(r, val, flips=[])[:, 1]] for r in runs],
        "tta": [[round(float(v), 6) for v in predict_classification(r, val, [[1]])[:, 1]] for r in runs],
    }


def outer_paired(outer: dict) -> dict:
    """Ensemble (mean probability of the K members) minus each member, on the validation images: paired CIs."""
    import numpy as np

    from medtune.evaluate.metrics import paired_auc_difference

    y = np.array(outer["labels"])
    rec: dict = {"n": len(y), "n_bootstrap": 2000}
    for view in ("plain", "tta"):
        members = np.array(outer[view])
        ens = members.mean(axis=0)
        rec[view] = [paired_auc_difference(y, ens, m, n_bootstrap=2000, seed=0) for m in members]
    # the shipped model (ensemble + TTA) against one plain member (what a single `medtune finetune` run gives)
    ens_t = np.array(outer["tta"]).mean(axis=0)
    rec["ensemble_tta_vs_plain_member"] = [
        paired_auc_difference(y, ens_t, m, n_bootstrap=2000, seed=0) for m in np.array(outer["plain"])
    ]
    return rec


def paired(payload: dict, work: Path, pairs: list[str]) -> None:
    """``A:B`` run keys -> AUC(A) - AUC(B) over the same OOF cases, paired bootstrap CI (medtune's metric code)."""
    import numpy as np

    from medtune.evaluate.metrics import paired_auc_difference

    out = payload.setdefault("paired", {})
    for pair in pairs:
        a, b = pair.split(":")
        fa, fb = (work / f"{k.replace('/', '_')}_oof.json" for k in (a, b))
        if not (fa.is_file() and fb.is_file()):
            print(f"paired {pair}: per-case OOF file missing in {work}; skipped", flush=True)
            continue
        oa, ob = json.loads(fa.read_text()), json.loads(fb.read_text())
        cases = sorted(oa["labels"])
        if sorted(ob["labels"]) != cases or any(oa["labels"][c] != ob["labels"][c] for c in cases):
            raise SystemExit(f"paired {pair}: the two runs do not hold the same cases and labels")
        same_folds = oa.get("folds") == ob.get("folds") if "folds" in oa and "folds" in ob else None
        y = np.array([oa["labels"][c] for c in cases])
        rec: dict = {"n": len(cases), "same_fold_assignment": same_folds, "n_bootstrap": 2000}
        for view in ("plain", "tta"):
            pa = np.array([oa[view][c] for c in cases])
            pb = np.array([ob[view][c] for c in cases])
            rec[view] = paired_auc_difference(y, pa, pb, n_bootstrap=2000, seed=0)
        out[pair] = rec


def _auc_ci(y: list[int], p: list[float]) -> dict:
    import numpy as np

    from medtune.evaluate import classification_metrics

    probs = np.stack([1 - np.asarray(p), np.asarray(p)], axis=1)
    m = classification_metrics(np.asarray(y), probs, ["0", "1"], positive_class=1, n_bootstrap=1000)
    return m["auc"]


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _clean(out: Path) -> None:
    for f in list(out.glob("fold*/*.pt")) + list(out.glob("fold*/mlruns*")):
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    for d in out.glob("fold*/tensorboard"):
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(DEFAULT_ROOT))
    ap.add_argument("--arms", default="lite0_64")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0")
    ap.add_argument(
        "--fold-seed", type=int, default=0,
        help="seed of the fold assignment, the same for every training seed (so the seed-ensemble OOF is valid)",
    )  # fmt: skip
    ap.add_argument("--protocol", choices=["pooled", "outer_val"], default="pooled")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--work", default=str(HERE / "results" / "work_cv"))
    ap.add_argument(
        "--import-oof", action="append", default=[], metavar="KEY=DIR",
        help="copy a finished run's OOF predictions (DIR/predictions*.csv) into the work folder as run KEY's",
    )  # fmt: skip
    ap.add_argument(
        "--redo", default="", help="comma-separated arms to run again (the old record is kept under replaced)"
    )
    ap.add_argument("--paired", default="", help="comma-separated A:B run keys: paired AUC(A) - AUC(B) with a CI")
    args = ap.parse_args()
    root = data_root_or_skip(args.data_root)
    if root is None:
        return 0
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from medtune.finetune.crossval import crossvalidate

    work = Path(args.work)
    dataset = make_dataset(root, work)
    out_json = HERE / "results" / f"breastmnist_cv{args.tag}.json"
    payload = json.loads(out_json.read_text()) if out_json.is_file() else {"runs": {}}
    payload.update(
        benchmark="breastmnist_cv",
        data=str(root / "breastmnist.npz"),
        python=sys.version.split()[0],
        threads=args.threads,
    )
    work.mkdir(parents=True, exist_ok=True)
    for spec in args.import_oof:
        key, oof_dir = spec.split("=", 1)
        (work / f"{key.replace('/', '_')}_oof.json").write_text(json.dumps(oof_record(Path(oof_dir))))
    seeds = [int(s) for s in args.seeds.split(",")]
    for arm in [a for a in args.arms.split(",") if a]:
        for seed in seeds:
            key = f"{args.protocol}/{arm}/k{args.folds}/s{seed}"
            if key in payload["runs"] and arm in args.redo.split(","):
                payload.setdefault("replaced", {}).setdefault(key, []).append(payload["runs"].pop(key))
            if key in payload["runs"]:
                print(f"== {key}: done already", flush=True)
                continue
            out = work / key.replace("/", "_")
            shutil.rmtree(out, ignore_errors=True)
            ov = {**FIXED, **ARMS[arm], "seed": seed, "num_workers": 0}
            if arm == "preset":
                ov = {"seed": seed, "num_workers": 0}
            print(f"== {key} {ov}", flush=True)
            load0 = os.getloadavg()[0]
            t0, cpu0 = time.time(), _cpu_seconds()
            rec = crossvalidate(
                dataset,
                "2d_classification",
                out,
                args.folds,
                overrides=ov,
                tta_flips=[[1]],
                extra_split="validation" if args.protocol == "outer_val" else None,
                pool_validation=args.protocol == "pooled",
                progress_bar=False,
                fold_seed=args.fold_seed,
            )
            wall, cpu = time.time() - t0, _cpu_seconds() - cpu0
            result = {
                "arm": arm,
                "protocol": args.protocol,
                "seed": seed,
                "fold_seed": args.fold_seed,
                "folds": args.folds,
                "overrides": ARMS[arm],
                "n": rec["pooled"]["n"],
                "oof_auc": rec["pooled"]["estimate"],
                "oof_auc_tta": rec["pooled_tta"]["estimate"],
                "members": [
                    {k: m.get(k) for k in ("fold", "n_train", "n_test", "test_auc", "test_auc_tta", "seconds")}
                    for m in rec["members"]
                ],
                "wall_seconds": round(wall, 1),
                "cpu_seconds": round(cpu, 1),  # user+sys of this process and its children: the idle-machine cost
                "nice": os.nice(0),
                "load_start": round(load0, 2),
                "load_end": round(os.getloadavg()[0], 2),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if args.protocol == "outer_val":
                result.update(
                    outer_member_auc_mean=rec["validation_member_auc_mean"],
                    outer_member_auc_tta_mean=float(np.mean([m["validation_auc_tta"] for m in rec["members"]])),
                    outer_ensemble_auc=rec["validation_ensemble"]["estimate"],
                    outer_ensemble_tta_auc=rec["validation_ensemble_tta"]["estimate"],
                )
            oof = oof_record(out / "oof")
            if args.protocol == "outer_val":
                oof["outer"] = outer_predictions(dataset, out)
                result["outer_paired"] = outer_paired(oof["outer"])
            (work / f"{key.replace('/', '_')}_oof.json").write_text(json.dumps(oof))
            payload["runs"][key] = result
            out_json.write_text(json.dumps(payload, indent=1))
            _clean(out)
            print(
                json.dumps(
                    {"oof_auc": result["oof_auc"]["value"], "tta": result["oof_auc_tta"]["value"], "wall": wall}
                ),
                flush=True,
            )
    summarise(payload, work)
    paired(payload, work, [p for p in args.paired.split(",") if p])
    out_json.write_text(json.dumps(payload, indent=1))
    write_markdown(payload, out_json.with_suffix(".md"))
    return 0


def summarise(payload: dict, work: Path) -> None:
    """Per (protocol, arm, folds): mean/min/max of the per-seed figures and the OOF seed-ensemble AUC."""
    import numpy as np

    groups: dict[str, list[dict]] = {}
    oofs: dict[int, dict] = {}  # id(run) -> its per-case OOF file from the work folder (not in results/)
    for key, r in payload["runs"].items():
        groups.setdefault(key.rsplit("/", 1)[0], []).append(r)
        f = work / f"{key.replace('/', '_')}_oof.json"
        if f.is_file():
            oofs[id(r)] = json.loads(f.read_text())
    summary = {}
    for g, runs in groups.items():
        s: dict = {"seeds": [r["seed"] for r in runs]}
        s["wall_seconds_mean"] = float(np.mean([r["wall_seconds"] for r in runs]))
        for fig in ("oof_auc", "oof_auc_tta"):
            vals = [r[fig]["value"] for r in runs]
            s[fig] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}
        if runs[0]["protocol"] == "outer_val":
            for fig in ("outer_member_auc_mean", "outer_member_auc_tta_mean"):
                s[fig] = float(np.mean([r[fig] for r in runs]))
            for fig in ("outer_ensemble_auc", "outer_ensemble_tta_auc"):
                s[fig] = float(np.mean([r[fig]["value"] for r in runs]))
        if all(id(r) in oofs for r in runs):  # flip TTA minus plain, per seed, over the same OOF cases
            s["tta_minus_plain_per_seed"] = [tta_minus_plain(oofs[id(r)]) for r in runs]
        if len(runs) > 1 and all(id(r) in oofs for r in runs):
            first = oofs[id(runs[0])]
            s["same_fold_assignment"] = all(oofs[id(r)].get("folds") == first.get("folds") for r in runs)
            if s["same_fold_assignment"]:  # else a case's "OOF" average would mix models that trained on it
                cases = sorted(first["labels"])
                y = [first["labels"][c] for c in cases]
                probs = {v: np.array([[oofs[id(r)][v][c] for c in cases] for r in runs]) for v in ("plain", "tta")}
                for view in ("plain", "tta"):
                    s[f"oof_seed_ensemble_{view}"] = _auc_ci(y, probs[view].mean(axis=0).tolist())
                s["seed_ensemble_paired"] = seed_ensemble_paired(np.array(y), probs)
        summary[g] = s
    payload["summary"] = summary


def tta_minus_plain(oof: dict) -> dict:
    """AUC(flip TTA) - AUC(plain) of one run's OOF predictions, paired bootstrap CI over its cases."""
    import numpy as np

    from medtune.evaluate.metrics import paired_auc_difference

    cases = sorted(oof["labels"])
    y = np.array([oof["labels"][c] for c in cases])
    t, p = (np.array([oof[v][c] for c in cases]) for v in ("tta", "plain"))
    return paired_auc_difference(y, t, p, n_bootstrap=2000, seed=0)


def seed_ensemble_paired(y, probs: dict) -> dict:
    """Paired CIs over the OOF cases of S seeds run on the SAME folds (``probs[view]``: S x cases): the seed
    ensemble (mean probability of the S models that did not train on a case) against the mean single-model AUC
    and against each seed; flip TTA against plain for single models and for the ensemble."""
    from medtune.evaluate.metrics import paired_auc_difference

    def d(a, b) -> dict:
        return paired_auc_difference(y, a, b, n_bootstrap=2000, seed=0)

    plain, tta = probs["plain"], probs["tta"]
    ens_p, ens_t = plain.mean(axis=0), tta.mean(axis=0)
    return {
        "n": int(len(y)),
        "n_bootstrap": 2000,
        "ensemble_minus_mean_single": {"plain": d(ens_p, plain), "tta": d(ens_t, tta)},
        "ensemble_minus_single_per_seed": {"plain": [d(ens_p, p) for p in plain], "tta": [d(ens_t, t) for t in tta]},
        "tta_minus_plain": {"mean_single": d(tta, plain), "ensemble": d(ens_t, ens_p)},
        "tta_minus_plain_per_seed": [d(t, p) for t, p in zip(tta, plain, strict=True)],
        "ensemble_tta_minus_mean_single_plain": d(ens_t, plain),  # the whole package against one plain model
    }


def _ci(e: dict) -> str:
    return f"{e['value']:.3f} ({e['ci_low']:.3f}–{e['ci_high']:.3f})"


def _signed(e: dict) -> str:
    return f"{e['value']:+.3f} ({e['ci_low']:+.3f} to {e['ci_high']:+.3f})"


def write_markdown(payload: dict, path: Path) -> None:
    lines = [
        "# BreastMNIST: cross-validated AUC of 2D-preset recipes",
        "",
        "Protocol `pooled`: K-fold CV over all 624 labelled images (546 train + 78 val), fixed schedule, final "
        "weights (`model_selection=last`), nothing chosen on any held-out image; OOF AUC = pooled out-of-fold AUC "
        "of single fold models (bootstrap 95% CI). Protocol `outer_val`: CV over the 546 training images, the 78 "
        "official validation images predicted by each member and by the fold ensemble. TTA = mean with the "
        "left-right flip. 1 torch thread, `nice` as given per run (10 unless noted); wall times on 2 shared cores "
        "(load average at start/end); CPU s = user+sys seconds of the run (recorded from session 4 on).",
        "",
        "## Per run",
        "",
        "| protocol / arm / folds / seed | OOF AUC (95% CI) | OOF AUC + TTA | outer: member mean | outer: ensemble "
        "| outer: ensemble + TTA | wall s | CPU s | nice | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in payload["runs"].items():
        outer = (
            f"{r['outer_member_auc_mean']:.3f} | {r['outer_ensemble_auc']['value']:.3f} | "
            f"{r['outer_ensemble_tta_auc']['value']:.3f}"
            if r["protocol"] == "outer_val"
            else "– | – | –"
        )
        cpu = f"{r['cpu_seconds']:.0f}" if "cpu_seconds" in r else "–"
        lines.append(
            f"| {key} | {_ci(r['oof_auc'])} | {_ci(r['oof_auc_tta'])} | {outer} | {r['wall_seconds']:.0f} | {cpu} | "
            f"{r.get('nice', 10)} | {r['load_start']:.1f}/{r['load_end']:.1f} |"
        )
    lines += [
        "",
        "## Per arm (over seeds)",
        "",
        "| protocol / arm / folds | seeds | OOF AUC mean [min–max] | + TTA mean [min–max] | OOF seed-ensemble "
        "(95% CI) | + TTA | mean wall s |",
        "|---|---|---|---|---|---|---:|",
    ]
    for g, s in payload.get("summary", {}).items():
        a, t = s["oof_auc"], s["oof_auc_tta"]
        se = s.get("oof_seed_ensemble_plain")
        st = s.get("oof_seed_ensemble_tta")
        lines.append(
            f"| {g} | {','.join(map(str, s['seeds']))} | {a['mean']:.3f} [{a['min']:.3f}–{a['max']:.3f}] | "
            f"{t['mean']:.3f} [{t['min']:.3f}–{t['max']:.3f}] | {_ci(se) if se else '–'} | {_ci(st) if st else '–'} | "
            f"{s['wall_seconds_mean']:.0f} |"
        )
    summ = payload.get("summary", {})
    tta_rows = {g: s["tta_minus_plain_per_seed"] for g, s in summ.items() if "tta_minus_plain_per_seed" in s}
    if tta_rows:
        lines += [
            "",
            "## Flip TTA minus plain, per seed (paired bootstrap 95% CI over the run's OOF cases; runs whose per-case "
            "file is in the work folder)",
            "",
            "| protocol / arm / folds | seeds | TTA - plain per seed |",
            "|---|---|---|",
        ]
        for g, rows in tta_rows.items():
            seeds = summ[g]["seeds"]
            cells = "; ".join(f"s{sd}: {_signed(e)}" for sd, e in zip(seeds, rows, strict=True))
            lines.append(f"| {g} | {','.join(map(str, seeds))} | {cells} |")
    seeded = {
        g: s["seed_ensemble_paired"] for g, s in payload.get("summary", {}).items() if "seed_ensemble_paired" in s
    }
    if seeded:
        lines += [
            "",
            "## Seed ensemble vs single model, TTA vs plain (same folds for every seed; paired bootstrap 95% CI over "
            "the OOF cases)",
            "",
            "| protocol / arm / folds | n | comparison | plain | + TTA |",
            "|---|---:|---|---|---|",
        ]
        for g, e in seeded.items():
            ems, per = e["ensemble_minus_mean_single"], e["ensemble_minus_single_per_seed"]
            tp = e["tta_minus_plain"]
            rows = [
                ("ensemble - mean single", _signed(ems["plain"]), _signed(ems["tta"])),
                *(
                    (f"ensemble - seed {i}", _signed(a), _signed(b))
                    for i, (a, b) in enumerate(zip(per["plain"], per["tta"], strict=True))
                ),
                (
                    "TTA - plain, mean single (+TTA column: ensemble)",
                    _signed(tp["mean_single"]),
                    _signed(tp["ensemble"]),
                ),
                ("ensemble + TTA - mean single plain", _signed(e["ensemble_tta_minus_mean_single_plain"]), "–"),
            ]
            lines += [f"| {g} | {e['n']} | {name} | {a} | {b} |" for name, a, b in rows]
    outer_runs = {k: r for k, r in payload["runs"].items() if r.get("outer_paired")}
    if outer_runs:
        lines += [
            "",
            "## Fold ensemble vs single fold model on the 78 validation images (paired bootstrap 95% CI per member)",
            "",
            "| run | ensemble - member k (plain) | ensemble+TTA - member k (+TTA) | ensemble+TTA - member k (plain) |",
            "|---|---|---|---|",
        ]
        for key, r in outer_runs.items():
            op = r["outer_paired"]
            cells = [
                "; ".join(f"k{i}: {_signed(e)}" for i, e in enumerate(op[v]))
                for v in ("plain", "tta", "ensemble_tta_vs_plain_member")
            ]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if payload.get("paired"):
        lines += [
            "",
            "## Paired comparisons (same cases; AUC(A) - AUC(B), paired bootstrap 95% CI)",
            "",
            "| A : B | n | same folds | plain | + TTA |",
            "|---|---:|---|---|---|",
        ]
        for pair, r in payload["paired"].items():
            lines.append(
                f"| {pair.replace(':', ' : ')} | {r['n']} | {r['same_fold_assignment']} | "
                f"{_signed(r['plain'])} | {_signed(r['tta'])} |"
            )
    notes = payload.get("notes") or []
    lines += ["", *[f"- {n}" for n in notes]] if notes else []
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
