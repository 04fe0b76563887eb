"""Fine-tuning from Slicer: the bundle run as a child process, its progress stream, cancel and resume.

The child is ``python -m medtune finetune ...`` (the same CLI users run), started in its own process group
(:mod:`.child_job`, the base shared with the other jobs) so that :meth:`FinetuneJob.cancel` can kill the whole
tree (DataLoader workers included). The Slicer side never imports torch: progress comes from the run's
``progress.jsonl`` (docs/formats.md §2), read incrementally, and the child's console output goes to
``RUN/slicer_job.log``. Nothing here imports Qt; the Widget polls :meth:`FinetuneJob.poll` from a timer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune import names
from medtune.errors import MedTuneError
from medtune.finetune.progress import ProgressTail  # the progress stream's one reader (re-exported here)
from medtune.runfolder import BEST_MODEL, CHECKPOINT_LAST, PROGRESS

from .child_job import CliJob, kill_process_tree

JOB_LOG = "slicer_job.log"
PRESETS, STRATEGIES = names.PRESETS, names.STRATEGIES  # their one owner (torch-free)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class FinetuneSettings:
    """What the Fine-tune panel chooses; ``overrides`` are extra bundle keys (``--set KEY=VALUE``)."""

    dataset: Path
    out: Path
    preset: str = "3d_segmentation"
    pretrained: str | None = None
    strategy: str = "full"
    epochs: int = 10
    device: str = "auto"
    arch: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """One-line errors for choices the CLI would reject later (after a slow torch import)."""
        if self.preset not in PRESETS:
            raise MedTuneError(f"unknown preset {self.preset!r} (choose {', '.join(PRESETS)})")
        if self.strategy not in STRATEGIES:
            raise MedTuneError(f"unknown strategy {self.strategy!r} (choose {', '.join(STRATEGIES)})")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise MedTuneError(f"unknown device {self.device!r} (choose auto, cpu, cuda or cuda:N)")
        if int(self.epochs) < 1:
            raise MedTuneError(f"epochs must be at least 1, got {self.epochs}")
        if not (Path(self.dataset) / "dataset.json").is_file():
            raise MedTuneError("not a MedTune dataset folder (no dataset.json)", self.dataset)


def finetune_command(
    settings: FinetuneSettings, python: str | None = None, resume: bool = False, epochs: int | None = None
) -> list[str]:
    """The argv of the child process (``python -m medtune finetune ...``).

    A resumed run keeps its own dataset, preset and settings (from its ``run.json``); only ``epochs`` may
    change its length.
    """
    cmd = [python or sys.executable, "-m", "medtune", "finetune", "--quiet", "--out", str(settings.out)]
    if resume:
        return cmd + (["--epochs", str(int(epochs))] if epochs else []) + ["--resume"]
    cmd += ["--dataset", str(settings.dataset), "--preset", settings.preset]
    cmd += ["--strategy", settings.strategy, "--epochs", str(int(settings.epochs)), "--device", settings.device]
    if settings.pretrained:
        cmd += ["--pretrained", settings.pretrained]
    if settings.arch:
        cmd += ["--arch", settings.arch]
    return cmd + set_options(settings.overrides)


def set_options(overrides: dict[str, Any]) -> list[str]:
    """``--set KEY=VALUE`` options of the medtune CLI (strings as they are, other values as Python literals)."""
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}" if isinstance(v, str) else f"{k}={v!r}")]


# ------------------------------------------------------------------------------------------ progress


@dataclass
class ProgressState:
    """The fine-tune panel's view of a run: status, epoch, loss, metric, ETA and a 0..1 fraction."""

    status: str = "starting"  # starting | running | completed | early_stopped | failed | cancelled
    epoch: int = 0
    max_epochs: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    start_epoch: int = 0
    loss: float | None = None
    metric: float | None = None
    metric_name: str = ""
    best_metric: float | None = None
    best_epoch: int | None = None
    eta_seconds: float | None = None
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "early_stopped", "failed", "cancelled")

    @property
    def fraction(self) -> float:
        """Progress over the whole run (epochs done plus the current epoch's steps)."""
        if not self.max_epochs:
            return 1.0 if self.status in ("completed", "early_stopped") else 0.0
        if self.status in ("completed", "early_stopped"):
            return 1.0
        within = self.step / self.steps_per_epoch if self.steps_per_epoch else 0.0
        done = max(self.epoch - 1, 0) + min(within, 1.0)
        return max(0.0, min(1.0, done / self.max_epochs))

    def update(self, rec: dict[str, Any]) -> None:
        """Fold one progress record into the state (unknown events and fields are ignored)."""
        ev = rec.get("event")
        if ev == "start":
            self.status = "running"
            self.max_epochs = int(rec.get("max_epochs") or 0)
            self.steps_per_epoch = int(rec.get("steps_per_epoch") or 0)
            self.start_epoch = int(rec.get("start_epoch") or 0)
            self.epoch = self.start_epoch
            self.metric_name = str(rec.get("metric_name") or "")
            self.step = 0
        elif ev == "step":
            self.status = "running"
            self.epoch = int(rec.get("epoch", self.epoch))
            self.step = int(rec.get("step", 0))
            self.steps_per_epoch = int(rec.get("steps_per_epoch") or self.steps_per_epoch)
            self.loss = _num(rec.get("loss"), self.loss)
            self.eta_seconds = _num(rec.get("eta_seconds"), self.eta_seconds)
        elif ev == "epoch":
            self.epoch = int(rec.get("epoch", self.epoch))
            self.step = self.steps_per_epoch
            self.loss = _num(rec.get("loss"), self.loss)
            self.metric = _num(rec.get("metric"), self.metric)
            self.metric_name = str(rec.get("metric_name") or self.metric_name)
            self.best_metric = _num(rec.get("best_metric"), self.best_metric)
            self.best_epoch = rec.get("best_epoch", self.best_epoch)
            self.eta_seconds = _num(rec.get("eta_seconds"), self.eta_seconds)
        elif ev == "done":
            self.status = str(rec.get("status") or "completed")
            self.best_metric = _num(rec.get("best_metric"), self.best_metric)
            self.best_epoch = rec.get("best_epoch", self.best_epoch)
            self.error = str(rec.get("error") or "")
            self.eta_seconds = 0.0

    def text(self) -> str:
        """One status line, e.g. ``epoch 3/10 · loss 0.4120 · val_dice 0.8100 (best 0.8300 @2) · ETA 4:10``."""
        if self.status == "starting":
            return "starting (loading PyTorch and MONAI)..."
        parts = [f"epoch {self.epoch}/{self.max_epochs}" if self.max_epochs else self.status]
        if self.status == "running" and self.steps_per_epoch and 0 < self.step < self.steps_per_epoch:
            parts[0] += f" step {self.step}/{self.steps_per_epoch}"
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.metric is not None:
            best = f" (best {self.best_metric:.4f} @{self.best_epoch})" if self.best_metric is not None else ""
            parts.append(f"{self.metric_name or 'metric'} {self.metric:.4f}{best}")
        return " · ".join(parts + outcome_or_eta(self))


def outcome_or_eta(state: Any, hours: bool = False) -> list[str]:
    """The end of a status line: the outcome (with its error) once ``state`` is finished, else the ETA as M:SS
    (``hours``: H:MM:SS), else nothing."""
    if state.finished:
        return [state.status + (f": {state.error}" if state.error else "")]
    if state.eta_seconds is None:
        return []
    eta = int(round(state.eta_seconds))
    return [f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}" if hours else f"ETA {eta // 60}:{eta % 60:02d}"]


def _num(value: Any, default: float | None) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def read_state(run: str | Path) -> ProgressState:
    """The state of a run folder from its whole progress stream (e.g. to show a past or interrupted run)."""
    state = ProgressState()
    for rec in ProgressTail(Path(run) / PROGRESS).read_new():
        state.update(rec)
    return state


def can_resume(run: str | Path) -> bool:
    """True if ``run`` holds a checkpoint from an unfinished run (the CLI's ``--resume`` continues it)."""
    run = Path(run)
    if not (run / CHECKPOINT_LAST).is_file():
        return False
    return read_state(run).status not in ("completed", "early_stopped")


# ----------------------------------------------------------------------------------------------- job


class FinetuneJob(CliJob):
    """One fine-tuning child process. ``start`` -> ``poll`` (from a UI timer) -> finished, or ``cancel``."""

    what, log_name = "fine-tuning", JOB_LOG

    def __init__(self, settings: FinetuneSettings, python: str | None = None) -> None:
        super().__init__(settings, python)
        self.state = ProgressState()
        self._tail = ProgressTail(Path(settings.out) / PROGRESS)

    @property
    def run_dir(self) -> Path:
        return self.folder

    def start(self, resume: bool = False, epochs: int | None = None) -> None:
        """Launch the child (``resume=True`` continues the run in ``settings.out`` from its last checkpoint,
        with its own settings; ``epochs`` may set a new length)."""
        if self.running:
            raise MedTuneError("a fine-tuning run is already in progress", self.run_dir)
        self.settings.check()
        out = self.run_dir
        if resume and not can_resume(out):
            raise MedTuneError("nothing to resume: no checkpoint of an unfinished run", out)
        if not resume and ((out / CHECKPOINT_LAST).exists() or (out / BEST_MODEL).exists()):
            raise MedTuneError("run folder already holds a training run; resume it or choose a new folder", out)
        self._open_log(self.log_path, folder="run folder")
        self._tail = ProgressTail(out / PROGRESS)
        self._tail.read_new()  # a resumed run appends: skip the earlier records...
        self.state = read_state(out) if resume else ProgressState()  # ...but start from their state
        self.state.status = "starting"
        self._spawn_cli(finetune_command(self.settings, self.python, resume=resume, epochs=epochs))

    def poll(self) -> ProgressState:
        """Read new progress records; detect a child that exited without a ``done`` record."""
        for rec in self._tail.read_new():
            self.state.update(rec)
        if self.process is None or self.state.status == "cancelled":
            return self.state
        code = self.process.poll()
        if code is not None:
            for rec in self._tail.read_new():  # the last lines written before exit
                self.state.update(rec)
            if not self.state.finished:
                self.state.status = "completed" if code == 0 else "failed"
            if code != 0 and not self.state.error:
                self.state.error = self._exit_error(code)
            self._close_log()
        return self.state

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the run and every process it started (terminate, then kill after ``grace`` seconds)."""
        if self.process is None or not self.running:
            return
        finished = self.poll().finished
        kill_process_tree(self.process, grace)
        for rec in self._tail.read_new():
            self.state.update(rec)
        if not (finished or self.state.finished):  # mark the stream so the run folder says what happened
            from medtune.finetune.progress import ProgressWriter

            _end_partial_line(self.run_dir / PROGRESS)
            ProgressWriter(self.run_dir / PROGRESS).emit("done", status="cancelled", epoch=self.state.epoch)
            self._tail.read_new()
        self.state.status = "cancelled"
        self.state.error = ""
        self._close_log()


def _end_partial_line(path: Path) -> None:
    """Terminate a line the killed child left half-written, so the next record starts on its own line."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


def ensure_validation_split(dataset: str | Path, fraction: float = 0.2, minimum: int = 1) -> list[str]:
    """Give a dataset without a ``validation`` split one: every k-th labeled training case (deterministic).

    Slicer-labeled datasets only hold ``training`` (labeled) and ``testing`` (unlabeled) cases, but the best
    model is chosen on validation data. The datalist is rewritten atomically with its previous version kept.
    Returns the images moved (empty when a validation split already exists).
    """
    from medtune.data.contract import read_datalist, write_datalist

    data = read_datalist(dataset)
    if data.get("validation"):
        return []
    training = [e for e in data.get("training", []) if isinstance(e, dict) and "label" in e]
    n_val = max(minimum, int(round(len(training) * fraction)))
    if len(training) < n_val + 1:
        raise MedTuneError(
            f"label at least {n_val + 1} cases before fine-tuning ({len(training)} labeled): "
            f"{n_val} for validation, the rest for training",
            Path(dataset) / "datalist.json",
        )
    step = len(training) / n_val
    picked = {int(i * step + step / 2) for i in range(n_val)}
    val = [e for i, e in enumerate(training) if i in picked]
    data["training"] = [e for e in data["training"] if e not in val]
    data["validation"] = val
    write_datalist(dataset, data)
    return [e["image"] for e in val]
