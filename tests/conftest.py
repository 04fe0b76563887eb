"""Shared fixtures: tiny real datasets (PNG files in the MedTune folder contract) and the shared data path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
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
