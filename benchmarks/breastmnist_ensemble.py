"""BreastMNIST: does a K-fold ensemble beat one model trained on all the labels? (issue 15, the default_folds decision)

Fair paired protocol. The 624 labelled images (546 train + 78 val) are cut into O outer folds (stratified,
``--outer-seed``). For outer fold o, the other O-1 folds are everything a user would have (``T_o``) and fold o is
scored by both arms and seen by neither:

- ``single``: ONE model trained on all of ``T_o`` (what ``medtune finetune`` gives with ``--folds 0`` and no
  internal test);
- ``ensemble``: ``medtune finetune --folds K`` on ``T_o``: K members, each trained on (K-1)/K of ``T_o``, their
  softmax probabilities averaged (what ``medtune export`` deploys); its out-of-fold estimate over ``T_o`` is the
  figure the product reports (checked against the ensemble's own outer-fold AUC);
- ``member``: each member alone (free: a single model on (K-1)/K of the data).

Both arms use the preset's recipe (fixed schedule, ``model_selection=last``: nothing is chosen on any image; the
run's validation split is a 32-image subset of ``T_o``, a monitor only). Scores of the O outer folds are pooled
into 624 cases; AUC differences are paired bootstrap CIs over those cases (``medtune.evaluate.metrics``).

Usage: python benchmarks/breastmnist_ensemble.py --outer 3 --folds 3 --seed 0 [--outer-only 0,1]
Writes benchmarks/results/breastmnist_ensemble.json (aggregates, after every outer fold) and .md. Per-case
probabilities stay in the work folder (git-ignored). Needs the real data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from breastmnist_cv import DEFAULT_ROOT, _cpu_seconds, data_root_or_skip, make_dataset  # noqa: E402

MONITOR_N = 32  # validation split of the run folders: a monitor drawn from T_o (model_selection=last chooses nothing)


def outer_dataset(dataset: Path, folder: Path, train: list[dict], monitor: list[dict]) -> Path:
    """A dataset folder whose ``training`` split is ``train`` (images hard-linked, else copied)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy2(dataset / "dataset.json", folder / "dataset.json")
    for it in train:
        dst = folder / it["image"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(dataset / it["image"], dst)
        except OSError:
            shutil.copy2(dataset / it["image"], dst)
    mon = []  # copies (a file listed in two splits is refused): a monitor only, nothing is chosen on it
    for it in monitor:
        dst = folder / "monitor" / Path(it["image"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dataset / it["image"], dst)
        mon.append({**it, "image": dst.relative_to(folder).as_posix()})
    (folder / "datalist.json").write_text(json.dumps({"training": train, "validation": mon}))
    return folder


def outer_fold_parser(doc: str | None, work: str) -> argparse.ArgumentParser:
    """The options of the outer-fold benchmarks (this one and ``breastmnist_refit.py``)."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--data-root", default=str(DEFAULT_ROOT))
    ap.add_argument("--outer", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outer-seed", type=int, default=100)
    ap.add_argument("--outer-only", default="", help="comma-separated outer folds to run (default: all)")
    ap.add_argument("--work", default=str(HERE / "results" / work))
    ap.add_argument("--smoke", action="store_true", help="32 px, 1 epoch, results to *_smoke.* (a plumbing check)")
    return ap


def outer_setup(args: argparse.Namespace) -> tuple[Path, Path, list[dict], list[int]] | None:
    """The outer-fold benchmarks' start: one torch thread, ``(work, dataset, items, outer_of)`` over the 624
    labelled images (training + validation, relative paths), or None when the real data is absent (skipped)."""
    root = data_root_or_skip(args.data_root)
    if root is None:
        return None
    import torch

    torch.set_num_threads(1)
    from medtune.data import load_datalist
    from medtune.finetune.crossval import assign_folds

    work = Path(args.work + ("_smoke" if args.smoke else ""))
    work.mkdir(parents=True, exist_ok=True)
    dataset = make_dataset(root, work)
    items = load_datalist(dataset, "training", absolute=False) + load_datalist(dataset, "validation", absolute=False)
    return work, dataset, items, assign_folds(items, args.outer, args.outer_seed, group=None)


def outer_split(items: list[dict], outer_of: list[int], o: int, dataset: Path, outer_seed: int):
    """Outer fold ``o``: ``(train, test, monitor)``: T_o (relative paths), the unseen fold (absolute paths) and the
    ``MONITOR_N``-image monitor drawn from T_o (the run folders' validation split: nothing is chosen on it)."""
    from medtune.finetune.crossval import assign_folds

    train = [it for it, f in zip(items, outer_of, strict=True) if f != o]
    test = [{**it, "image": str(dataset / it["image"])} for it, f in zip(items, outer_of, strict=True) if f == o]
    mon_idx = assign_folds(train, max(2, len(train) // MONITOR_N), outer_seed + 1, group=None)
    return train, test, [it for it, f in zip(train, mon_idx, strict=True) if f == 0]


def payload_head(name: str, doc: str | None, args: argparse.Namespace) -> dict:
    """The first keys of an outer-fold benchmark's results file: which benchmark, its protocol, the folds' seeds."""
    return {"benchmark": name, "protocol": (doc or "").split("\n\n")[1].replace("\n", " "), "outer": args.outer,
            "outer_seed": args.outer_seed, "seed": args.seed}  # fmt: skip


def _p1(probs) -> list[float]:
    return [round(float(v), 6) for v in probs[:, 1]]


def main() -> int:
    ap = outer_fold_parser(__doc__, "work_ensemble")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--summarise-only", action="store_true")
    args = ap.parse_args()
    setup = outer_setup(args)
    if setup is None:
        return 0
    work, dataset, items, outer_of = setup
    from medtune.finetune.crossval import crossvalidate, predict_classification
    from medtune.finetune.runner import finetune

    out_json = HERE / "results" / f"breastmnist_ensemble{'_smoke' if args.smoke else ''}.json"
    payload = json.loads(out_json.read_text()) if out_json.is_file() else {"outer_folds": {}}
    payload.update(
        benchmark="breastmnist_ensemble",
        protocol=__doc__.split("\n\n")[1].replace("\n", " "),
        n=len(items),
        outer=args.outer,
        folds=args.folds,
        seed=args.seed,
        outer_seed=args.outer_seed,
        preset="2d_classification (shipped recipe: 128 px, EfficientNet-Lite0 ImageNet, 12 epochs, last epoch)",
        threads=1,
    )
    todo = [int(o) for o in args.outer_only.split(",") if o] or list(range(args.outer))
    for o in [] if args.summarise_only else todo:
        key = f"o{o}"
        if key in payload["outer_folds"]:
            print(f"== outer fold {o}: done already", flush=True)
            continue
        train, test, monitor = outer_split(items, outer_of, o, dataset, args.outer_seed)
        folder = work / key
        ds = outer_dataset(dataset, folder / "dataset", train, monitor)
        ov: dict = {"seed": args.seed, "num_workers": 0}
        if args.smoke:
            ov.update(image_size=[32, 32], epochs=1)
        rec: dict = {"n_train": len(train), "n_test": len(test), "n_monitor": len(monitor)}
        probs: dict = {"labels": [int(it["label"]) for it in test]}

        print(f"== outer {o}: single model on {len(train)}", flush=True)
        t0, c0 = time.time(), _cpu_seconds()
        single = finetune(ds, "2d_classification", folder / "single", overrides=ov, progress_bar=False)
        probs["single"] = _p1(predict_classification(folder / "single", test, flips=[]))
        probs["single_tta"] = _p1(predict_classification(folder / "single", test, [[1]]))
        rec["single"] = {"wall_seconds": round(time.time() - t0, 1), "cpu_seconds": round(_cpu_seconds() - c0, 1),
            "train_seconds": single.get("seconds")}  # fmt: skip

        print(f"== outer {o}: {args.folds}-fold ensemble on {len(train)}", flush=True)
        t0, c0 = time.time(), _cpu_seconds()
        cv = crossvalidate(ds, "2d_classification", folder / "cv", args.folds, overrides=ov, pool_validation=False,
            progress_bar=False, fold_seed=args.seed)  # fmt: skip
        members = [folder / "cv" / f"fold{k}" for k in range(args.folds)]
        probs["members"] = [_p1(predict_classification(m, test, flips=[])) for m in members]
        probs["members_tta"] = [_p1(predict_classification(m, test, [[1]])) for m in members]
        rec["ensemble"] = {
            "wall_seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(_cpu_seconds() - c0, 1),
            "inner_oof_auc": cv["pooled"]["estimate"],  # the honest figure the product reports for this ensemble
            "member_n_train": [m["n_train"] for m in cv["members"]],
        }
        (work / f"{key}_probs.json").write_text(json.dumps(probs))  # per case: work folder only
        payload["outer_folds"][key] = rec
        out_json.write_text(json.dumps(payload, indent=1))
        for sub in ("single", "cv"):  # model files are big; predictions are kept above
            for f in (folder / sub).rglob("*.pt"):
                f.unlink()
        print(json.dumps({k: rec[k] for k in ("single", "ensemble")}), flush=True)
    summarise(payload, work)
    out_json.write_text(json.dumps(payload, indent=1))
    write_markdown(payload, out_json.with_suffix(".md"))
    return 0


def _auc(y, p) -> dict:
    import numpy as np

    from medtune.evaluate import classification_metrics

    p = np.asarray(p)
    m = classification_metrics(np.asarray(y), np.stack([1 - p, p], 1), ["0", "1"], positive_class=1, n_bootstrap=2000)
    return m["auc"]


def summarise(payload: dict, work: Path) -> None:
    """Pool the outer folds present (per-case files in ``work``) into AUCs and paired differences over the cases."""
    import numpy as np

    from medtune.evaluate.metrics import paired_auc_difference

    keys = sorted(k for k in payload["outer_folds"] if (work / f"{k}_probs.json").is_file())
    if not keys:
        return
    rows = [json.loads((work / f"{k}_probs.json").read_text()) for k in keys]
    y = np.concatenate([r["labels"] for r in rows])
    arms: dict[str, np.ndarray] = {}
    for suffix in ("", "_tta"):
        arms[f"single{suffix}"] = np.concatenate([r["single" + suffix] for r in rows])
        m = [np.array(r["members" + suffix]) for r in rows]  # per outer fold: K x cases
        arms[f"ensemble{suffix}"] = np.concatenate([x.mean(0) for x in m])
        for k in range(m[0].shape[0]):
            arms[f"member{k}{suffix}"] = np.concatenate([x[k] for x in m])

    def d(a: str, b: str) -> dict:
        return paired_auc_difference(y, arms[a], arms[b], n_bootstrap=2000, seed=0)

    k_members = [a for a in arms if a.startswith("member") and not a.endswith("_tta")]
    s: dict = {
        "outer_folds_pooled": keys,
        "n": int(len(y)),
        "auc": {a: _auc(y, p) for a, p in arms.items()},
        "paired": {
            "ensemble - single": d("ensemble", "single"),
            "ensemble+tta - single": d("ensemble_tta", "single"),
            "ensemble+tta - single+tta": d("ensemble_tta", "single_tta"),
            "single+tta - single": d("single_tta", "single"),
            "ensemble+tta - ensemble": d("ensemble_tta", "ensemble"),
            **{f"single - {m}": d("single", m) for m in k_members},
            **{f"ensemble - {m}": d("ensemble", m) for m in k_members},
        },
        "per_outer_fold": {
            k: {
                "single": _auc(r["labels"], r["single"])["value"],
                "ensemble": _auc(r["labels"], np.mean(r["members"], 0))["value"],
                "inner_oof_auc": payload["outer_folds"][k]["ensemble"]["inner_oof_auc"],
            }
            for k, r in zip(keys, rows, strict=True)
        },
        "cpu_seconds": {
            arm: float(np.mean([payload["outer_folds"][k][arm]["cpu_seconds"] for k in keys]))
            for arm in ("single", "ensemble")
        },
    }
    payload["summary"] = s


def _ci(e: dict) -> str:
    return f"{e['value']:.3f} ({e['ci_low']:.3f}–{e['ci_high']:.3f})"


def _signed(e: dict) -> str:
    return f"{e['value']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"


def write_markdown(payload: dict, path: Path) -> None:
    s = payload.get("summary")
    lines = ["# BreastMNIST: K-fold ensemble vs one model on all the labels (paired, outer folds)", "",
        payload["protocol"], "",
        f"O = {payload['outer']} outer folds (seed {payload['outer_seed']}), K = {payload['folds']}, training seed "
        f"{payload['seed']}; preset {payload['preset']}; 1 torch thread, `nice -n 10`, 2 shared cores.",
        ""]  # fmt: skip
    if not s:
        path.write_text("\n".join(lines + ["No outer fold finished yet."]) + "\n")
        return
    a = s["auc"]
    lines += [
        f"Pooled over outer folds {', '.join(s['outer_folds_pooled'])}: {s['n']} cases, each scored by models that "
        "never saw it.",
        "",
        "| arm | trained on | AUC (95% CI) | + flip TTA |",
        "|---|---|---|---|",
        f"| single | all of T_o | {_ci(a['single'])} | {_ci(a['single_tta'])} |",
        f"| {payload['folds']}-fold ensemble | {payload['folds'] - 1}/{payload['folds']} of T_o each | "
        f"{_ci(a['ensemble'])} | {_ci(a['ensemble_tta'])} |",
        *[
            f"| member {k} alone | {payload['folds'] - 1}/{payload['folds']} of T_o | {_ci(a[f'member{k}'])} | "
            f"{_ci(a[f'member{k}_tta'])} |"
            for k in range(payload["folds"])
        ],
        "",
        "## Paired differences (same cases, paired bootstrap 95% CI, 2000 resamples)",
        "",
        "| comparison | AUC difference |",
        "|---|---|",
        *[f"| {name} | {_signed(e)} |" for name, e in s["paired"].items()],
        "",
        "## Per outer fold: the product's honest estimate vs the ensemble on unseen cases",
        "",
        "| outer fold | single AUC | ensemble AUC | ensemble's inner OOF estimate (95% CI), what the report says |",
        "|---|---:|---:|---|",
        *[
            f"| {k} | {r['single']:.3f} | {r['ensemble']:.3f} | {_ci(r['inner_oof_auc'])} |"
            for k, r in s["per_outer_fold"].items()
        ],
        "",
        "## CPU (user+sys seconds per outer fold, 1 thread, 416 training images)",
        "",
        f"- single: {s['cpu_seconds']['single']:.0f} CPU s; {payload['folds']}-fold ensemble: "
        f"{s['cpu_seconds']['ensemble']:.0f} CPU s ({s['cpu_seconds']['ensemble'] / s['cpu_seconds']['single']:.2f}x)",
    ]
    notes = payload.get("notes") or []
    lines += ["", *[f"- {n}" for n in notes]] if notes else []
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
