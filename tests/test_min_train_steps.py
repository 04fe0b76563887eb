"""``min_train_steps``: a few-label run is not under-trained by its epoch count (ignite's ``epoch_length``, raised
so that the run makes at least that many optimizer steps); real bundle runs on tiny synthetic 3D volumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune.finetune.bundle_glue import epoch_length
from medtune.finetune.progress import read_progress
from medtune.finetune.runner import finetune, raw_config

TINY = {"arch": "tiny_unet", "pretrained": "none", "num_workers": 0, "patch_size": [16, 16, 16], "num_samples": 1,
        "sw_batch_size": 2, "batch_size": 2}  # fmt: skip


@pytest.fixture(scope="module")
def seg4(tmp_path_factory) -> Path:
    from medtune.data.synthetic import make_synthetic_segmentation

    out = tmp_path_factory.mktemp("steps") / "seg"
    make_synthetic_segmentation(out, n_train=4, n_val=1, size=16, seed=5)  # 4 cases, batch 2: 2 steps per pass
    return out


def test_epoch_length_is_a_floor_that_leaves_full_data_alone():
    cfg = raw_config("3d_segmentation")
    floor, epochs, batch = cfg["min_train_steps"], cfg["epochs"], cfg["batch_size"]
    assert floor > 0 and cfg["epochs"] == 40 and raw_config("2d_classification")["min_train_steps"] == 0
    # MSD Hippocampus, all 160 training cases: 80 steps per pass x 40 epochs = 3200 >= the floor: one pass, as before
    assert epoch_length(160 // batch, epochs, floor) is None
    # 8 labeled cases: 4 steps per pass would give 160 steps; the floor lengthens every epoch to ceil(floor / 40)
    assert epoch_length(8 // batch, epochs, floor) == -(-floor // epochs)
    assert 8 // batch * epochs < floor <= epochs * epoch_length(8 // batch, epochs, floor)
    assert epoch_length(3, 4, 0) is None and epoch_length(3, 4, 12) is None and epoch_length(3, 4, 13) == 4
    assert raw_config("3d_segmentation", "pretrain_ssl")["min_train_steps"] == 0  # SSL epochs stay passes
    with pytest.raises(ValueError, match="min_train_steps"):
        epoch_length(3, 4, -1)


@pytest.mark.parametrize(("floor", "per_epoch"), [(10, 5), (0, 2)])
def test_a_run_makes_at_least_min_train_steps_optimizer_steps(seg4, tmp_path, floor, per_epoch):
    """4 cases, batch 2, 2 epochs: 4 steps as one pass per epoch; ``min_train_steps=10``: 5 steps per epoch (the
    loader restarted within each epoch, reshuffled), 10 optimizer steps in all, the cosine schedule per epoch."""
    run = tmp_path / "run"
    rec = finetune(seg4, "3d_segmentation", run, overrides={**TINY, "epochs": 2, "min_train_steps": floor},
                   progress_bar=False)  # fmt: skip
    assert rec["status"] == "completed"
    events = read_progress(run / "progress.jsonl")
    (start,) = [e for e in events if e["event"] == "start"]
    assert start["steps_per_epoch"] == per_epoch and start["max_epochs"] == 2
    steps = [(e["epoch"], e["step"]) for e in events if e["event"] == "step"]
    assert steps == [(ep, s) for ep in (1, 2) for s in range(1, per_epoch + 1)]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert json.loads((run / "run.json").read_text())["overrides"]["min_train_steps"] == floor
