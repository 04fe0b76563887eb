"""``model_selection=last`` writes ``model.pt`` on validated epochs and the final one only (not every epoch), and a
run interrupted by Ctrl-C between validations still resumes to the right epochs with the final ``model.pt``.

Real tiny 2D bundle runs in this process. The user's Ctrl-C is delivered at a chosen step of the progress stream (so
the moment is deterministic) by calling the SIGINT handler the run installed, as Python calls it for a real signal.
No real SIGINT is sent to the pytest process: after the suite has loaded VTK/Mesa, triton and onnxruntime, one of them
leaves the main thread a broken alternate signal stack, and the kernel turned the delivery into SIGSEGV (si_code
SI_KERNEL, core of a full run, 2026-12-03). A real SIGINT to a real ``medtune finetune`` child process is tested in
``test_reliability_commands.py``. ``save_atomic`` is wrapped only to count the writes."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, TINY_OVERRIDES

from medtune.finetune import handlers
from medtune.finetune.progress import ProgressWriter, read_progress
from medtune.finetune.runner import finetune


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)


def _model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow  # three short in-process bundle runs (~10 s at load 6)
def test_last_selection_saves_validated_and_final_epochs_and_an_interrupted_run_resumes(
    tiny_dataset, tmp_path, monkeypatch
):
    writes: list[int] = []  # the trainer epoch of every model.pt write
    state = {"epoch": 0}
    real_save = handlers.save_atomic

    def counting_save(obj, path):
        if Path(path).name == "model.pt":
            writes.append(state["epoch"])
        real_save(obj, path)

    real_emit = ProgressWriter.emit

    def emit(self, event, **fields):  # the user presses Ctrl-C during the first step of epoch 5
        if event in ("step", "epoch"):
            state["epoch"] = int(fields["epoch"])
        rec = real_emit(self, event, **fields)
        if event == "step" and fields["epoch"] == 5 and fields["step"] == 1 and state.get("press", True):
            state["press"] = False
            handler = signal.getsignal(signal.SIGINT)
            assert callable(handler), "the run installs its own Ctrl-C handler"
            handler(signal.SIGINT, None)
        return rec

    monkeypatch.setattr(handlers, "save_atomic", counting_save)
    monkeypatch.setattr(ProgressWriter, "emit", emit)
    run = tmp_path / "run"
    ov = {**TINY_OVERRIDES, "epochs": 40, "val_interval": 3, "batch_size": 4}  # 6 steps per epoch
    assert json.loads((CONFIGS / "2d_classification.json").read_text())["model_selection"] == "last"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_dataset, "2d_classification", run, overrides=ov, progress_bar=False)
    rec = json.loads((run / "run.json").read_text())
    assert rec["status"] == "interrupted" and rec["resumable"] is True
    ckpt = _ckpt(run)
    assert ckpt["trainer"]["epoch"] == 4 and ckpt["run_state"]["model_epoch"] == 3  # epoch 5 never completed
    assert writes == [3]  # epoch 3 was validated; 1, 2 and 4 were not (before: a write every epoch)
    assert not _same(_model(run), ckpt["network"])  # model.pt is epoch 3's, the checkpoint epoch 4's
    shortened = tmp_path / "shortened"
    shutil.copytree(run, shortened)

    # resumed to 7 epochs: 5 and 7 run, 6 is validated, 7 is the final (unvalidated) epoch
    writes.clear()
    rec = finetune(tiny_dataset, "2d_classification", run, resume=True, overrides={"epochs": 7}, progress_bar=False)
    assert rec["status"] == "completed"
    events = read_progress(run / "progress.jsonl")
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3, 4, 5, 6, 7]
    assert [e["start_epoch"] for e in events if e["event"] == "start"] == [0, 4]
    assert writes == [6, 7]
    ckpt = _ckpt(run)
    assert ckpt["trainer"]["epoch"] == 7 and ckpt["run_state"]["model_epoch"] == 7
    assert _same(_model(run), ckpt["network"])  # model.pt holds the final epoch's weights

    # the interrupted copy resumed with epochs=4 (its checkpoint's epoch): nothing left to train, but model.pt
    # (epoch 3's) is replaced by the final epoch's weights from the checkpoint
    writes.clear()
    rec = finetune(tiny_dataset, "2d_classification", shortened, resume=True, overrides={"epochs": 4},
                   progress_bar=False)  # fmt: skip
    assert rec["status"] == "completed" and len(writes) == 1
    assert [e["epoch"] for e in read_progress(shortened / "progress.jsonl") if e["event"] == "epoch"] == [1, 2, 3, 4]
    assert _same(_model(shortened), _ckpt(shortened)["network"])
