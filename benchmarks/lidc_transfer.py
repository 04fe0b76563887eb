"""LIDC-IDRI nodule malignancy (real CT crops): scratch vs the CT backbone (frozen features), through ``medtune study``.

    nice -n 10 python benchmarks/lidc_transfer.py --work /tmp/lidc_bench [--jobs 2]
    nice -n 10 python benchmarks/lidc_transfer.py --work /tmp/lidc_bench --arms scratch,ct32_last --labels 10% \
        --seeds 1 --folds 5 --validations 1   # patient-grouped 5-fold CV, pooled out-of-fold AUC over all crops

1. imports ``../shared/data/lidc_nodules`` with the table importer (patient-grouped folds, opaque ids) into
   ``WORK/lidc`` (never into the repository);
2. runs ``medtune study`` at 10 / 25 / 100 % of the training labels x 3 seeds; the validation split holds whole
   patients only;
3. copies ``report.md``, ``study.json`` and the PNG curves to ``benchmarks/results/lidc_study/``.

Arms (same epochs, optimizer, learning rate, batch, intensity and label subsets):
- ``scratch``: the 3D preset's ResNet-10 (MedicalNet layout, widen_factor 0.5) trained fully from random init at
  32^3 (64^3 costs 5x the CPU: 0.17 s vs 0.036 s per sample forward+backward for the full-width net, 1 thread);
- ``ct``: the Merlin/Astra CT ResNet-152, frozen, features computed once at 64^3 and cached, linear head;
- ``ct32``: the same at 32^3 (the scratch arm's input size; ~1 mm voxels, closer to the 1.5 mm it was trained at);
- ``ct32_last`` / ``ct32_full``: the CT ResNet-152 at 32^3 with its last stage / every layer fine-tuned;
- ``lite0``: ImageNet EfficientNet-Lite0 inflated to 3D (cell inflation since session 6), fully fine-tuned.
``--prune-models`` deletes each run's model.pt after evaluation: a ResNet-152 checkpoint is ~470 MB per file.
Intensity: HU -1000..200 scaled to [0, 1] (the CT source's own window) for both; no resampling to the source's
1.5x1.5x3 mm (a 31 mm crop would be ~21x21x6 voxels: too small for a stride-32 encoder): the warning the source
prints for that override is expected.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path("/work/shared/data/lidc_nodules")
#: arm -> (source[:strategy], per-arm overrides); every arm also gets the common --set overrides of main()
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "scratch": ("scratch", ("arch_kwargs={'widen_factor': 0.5}",)),
    "ct32": ("astra-ct-resnet152:linear_probe", ()),
    "lite0": ("imagenet-efficientnet-lite0-inflated:full", ()),
    "ct32_last": ("astra-ct-resnet152:last_stages", ("train_stages=1",)),
    "ct32_full": ("astra-ct-resnet152:full", ()),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/lidc", help="work folder (dataset + study), outside the repo")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--labels", default="10%,25%,100%")
    ap.add_argument("--folds", type=int, help="patient-grouped K-fold cross-validation (study folder WORK/cv, "
                    "results in benchmarks/results/lidc_study/cv/)")  # fmt: skip
    ap.add_argument("--validations", type=int, help="validation passes per run (1: the final model is evaluated)")
    ap.add_argument("--report-only", action="store_true", help="report the runs finished so far, run nothing")
    ap.add_argument("--study-name", help="study folder WORK/NAME and results sub-folder benchmarks/results/lidc_study/"
                    "NAME (default: cv with --folds, else the top folder)")  # fmt: skip
    args = ap.parse_args()
    work, data = Path(args.work), Path(args.data)
    if not (data / "labels.csv").is_file():
        print(f"LIDC crops not found at {data}; nothing to benchmark", file=sys.stderr)
        return 1
    medtune = [sys.executable, "-m", "medtune"]
    ds = work / "lidc"
    if not (ds / "dataset.json").is_file():
        subprocess.run([*medtune, "dataset", "import", "--from", "table", "--images", str(data / "images"),
                        "--masks", str(data / "masks"), "--table", str(data / "labels.csv"), "--file-column", "file",
                        "--label-column", "malignant", "--group-column", "patient_id",
                        "--class-names", "benign,malignant", "--out", str(ds)], check=True)  # fmt: skip
    study = work / (args.study_name or ("cv" if args.folds else "study"))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}", file=sys.stderr)
        return 2
    cmd = [*medtune, "study", "--dataset", str(ds), "--preset", "3d_classification",
           "--sources", ",".join(f"{a}={ARMS[a][0]}" if a != "scratch" else a for a in arms),
           "--labels", args.labels, "--prune-models",
           "--seeds", str(args.seeds), "--epochs", str(args.epochs), "--jobs", str(args.jobs), "--threads", "1",
           "--set", "image_size=[32, 32, 32]", "--set", "intensity=ct", "--set", "ct_window=[-1000, 200]",
           "--set", "spacing=None", "--set", "batch_size=16", "--set", "learning_rate=0.001",
           *[x for a in arms for kv in ARMS[a][1] for x in ("--arm-set", f"{a}:{kv}")],
           *(["--folds", str(args.folds)] if args.folds else []),
           *(["--validations", str(args.validations)] if args.validations else []),
           "--out", str(study), *(["--report-only"] if args.report_only else [])]  # fmt: skip
    subprocess.run(cmd, check=True)
    dest = HERE / "results" / "lidc_study" / (args.study_name or ("cv" if args.folds else ""))
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "study.json", "label_efficiency.png", "learning_curves.png"):
        if (study / name).is_file():
            shutil.copy2(study / name, dest / name)
    print(f"results -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
