"""Shared fixtures: tiny real datasets (PNG files in the MedTune folder contract) and the shared data path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
# the public data sets beside the checkout (../shared/data), or where $MEDTUNE_SHARED_DATA points; tests skip without
SHARED_DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
CONFIGS = REPO / "monai_bundle" / "configs"
SLICER_MODULE = REPO / "slicer_extension" / "MedTune"  # MedTuneLib, the Slicer module's Qt-free logic
if str(SLICER_MODULE) not in sys.path:
    sys.path.insert(0, str(SLICER_MODULE))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic 2-class PNG dataset (24 train / 12 val, 32x32)."""
    from medtune.data import make_synthetic_classification

    out = tmp_path_factory.mktemp("data") / "tiny"
    make_synthetic_classification(out, n_train=24, n_val=12, size=32, seed=1)
    return out


@pytest.fixture(scope="session")
def breastmnist_root() -> Path:
    root = SHARED_DATA / "medmnist"
    if not (root / "breastmnist.npz").is_file():
        pytest.skip(f"real BreastMNIST not present at {root} (shared data is optional)")
    return root


TINY_OVERRIDES = {
    "arch": "tiny_cnn",
    "pretrained": "none",
    "epochs": 2,
    "batch_size": 8,
    "num_workers": 0,
    "image_size": [32, 32],
}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dataset):
    """A real 1-epoch ``tiny_cnn`` run on ``tiny_dataset`` and its exported model, made with the real CLI.

    Returns ``(dataset, run, model_dir)``. Shared: tests that change files work on copies.
    """
    from medtune.cli import main

    root = tmp_path_factory.mktemp("trained")
    run, model = root / "run", root / "model"
    args = ["--arch", "tiny_cnn", "--pretrained", "none", "--epochs", "1", "--batch-size", "8", "--num-workers", "0"]
    code = main(["finetune", "--dataset", str(tiny_dataset), *args, "--set", "image_size=[32, 32]", "--device", "cpu",
                 "--quiet", "--out", str(run)])  # fmt: skip
    assert code == 0
    assert main(["export", "--run", str(run), "--out", str(model), "--samples", "4"]) == 0
    return tiny_dataset, run, model


@pytest.fixture()
def cli(capsys):
    """Run ``medtune`` in this process: ``cli(*args) -> (exit code, stdout, stderr)`` (argparse exits included)."""
    from medtune.cli import main

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
