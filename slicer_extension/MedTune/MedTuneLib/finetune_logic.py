"""Fine-tuning from Slicer: the bundle run as a child process, its progress stream, cancel and resume.

The child is ``python -m medtune finetune ...`` (the same CLI users run), started in its own process group
(POSIX session / Windows process group) so that :meth:`FinetuneJob.cancel` can kill the whole tree
(DataLoader workers included). The Slicer side never imports torch: progress comes from the run's
``progress.jsonl`` (docs/formats.md §2), read incrementally, and the child's console output goes to
``RUN/slicer_job.log``. Nothing here imports Qt; the Widget polls :meth:`FinetuneJob.poll` from a timer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune import names
from medtune.errors import MedTuneError
from medtune.finetune.progress import ProgressTail  # the progress stream's one reader (re-exported here)
from medtune.runfolder import BEST_MODEL, CHECKPOINT_LAST, PROGRESS

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
    for key, value in settings.overrides.items():
        cmd += ["--set", f"{key}={value!r}" if not isinstance(value, str) else f"{key}={value}"]
    return cmd


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
        if self.finished:
            parts.append(self.status + (f": {self.error}" if self.error else ""))
        elif self.eta_seconds is not None:
            eta = int(round(self.eta_seconds))
            parts.append(f"ETA {eta // 60}:{eta % 60:02d}")
        return " · ".join(parts)


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


class FinetuneJob:
    """One fine-tuning child process. ``start`` -> ``poll`` (from a UI timer) -> finished, or ``cancel``."""

    def __init__(self, settings: FinetuneSettings, python: str | None = None) -> None:
        self.settings = settings
        self.python = python or sys.executable
        self.process: subprocess.Popen | None = None
        self.state = ProgressState()
        self._tail = ProgressTail(Path(settings.out) / PROGRESS)
        self._log_fh: Any = None
        self.command: list[str] = []

    @property
    def run_dir(self) -> Path:
        return Path(self.settings.out)

    @property
    def log_path(self) -> Path:
        return self.run_dir / JOB_LOG

    def start(self, resume: bool = False, epochs: int | None = None) -> None:
        """Launch the child (``resume=True`` continues the run in ``settings.out`` from its last checkpoint,
        with its own settings; ``epochs`` may set a new length)."""
        if self.process is not None and self.process.poll() is None:
            raise MedTuneError("a fine-tuning run is already in progress", self.run_dir)
        self.settings.check()
        out = self.run_dir
        if resume and not can_resume(out):
            raise MedTuneError("nothing to resume: no checkpoint of an unfinished run", out)
        if not resume and ((out / CHECKPOINT_LAST).exists() or (out / BEST_MODEL).exists()):
            raise MedTuneError("run folder already holds a training run; resume it or choose a new folder", out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - closed in _close_log
        except OSError as exc:
            raise MedTuneError(f"run folder is not writable ({exc.strerror})", out) from exc
        self.command = finetune_command(self.settings, self.python, resume=resume, epochs=epochs)
        self._tail = ProgressTail(out / PROGRESS)
        self._tail.read_new()  # a resumed run appends: skip the earlier records...
        self.state = read_state(out) if resume else ProgressState()  # ...but start from their state
        self.state.status = "starting"
        from .support import child_env

        env = dict(child_env(), PYTHONUNBUFFERED="1")  # the extension's own medtune first on PYTHONPATH
        kwargs: dict[str, Any] = {"stdout": self._log_fh, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True  # own process group: cancel kills workers too
        self.process = subprocess.Popen(self.command, env=env, **kwargs)  # noqa: S603 - our own CLI

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
                self.state.error = self.last_log_line() or f"fine-tuning exited with code {code}"
            self._close_log()
        return self.state

    def wait(self, timeout: float | None = None, interval: float = 0.5) -> ProgressState:
        """Poll until the run finishes (for scripts and tests; the Widget polls from a timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll().finished:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"fine-tuning did not finish within {timeout} s")
            time.sleep(interval)
        return self.state

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the run and every process it started (terminate, then kill after ``grace`` seconds)."""
        if self.process is None or self.process.poll() is not None:
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

    def last_log_line(self) -> str:
        """The last non-empty line of the child's console output (a one-line error for the UI)."""
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return next((ln.strip() for ln in reversed(lines) if ln.strip()), "")[:300]

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None


def _end_partial_line(path: Path) -> None:
    """Terminate a line the killed child left half-written, so the next record starts on its own line."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


def descendant_pids(pid: int) -> list[int]:
    """Pids of all processes below ``pid`` (psutil when available, else ``/proc`` on Linux)."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - process already gone
        return []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = entry.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            text = stat.read_text()
        except OSError:
            return False
        return text[text.rfind(")") + 2 :].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    except OSError:
        return False
    return True


def kill_process_tree(process: subprocess.Popen, grace: float = 5.0) -> None:
    """Terminate ``process`` and all its descendants; kill what is left after ``grace`` seconds."""
    if os.name == "nt":  # taskkill walks the tree on Windows
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        process.wait(timeout=grace + 5)
        return
    tree = descendant_pids(process.pid)
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        pgid = None
    own_group = pgid is not None and pgid != os.getpgid(0)
    _signal_all(process.pid, tree, pgid if own_group else None, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
        time.sleep(0.1)
    _signal_all(process.pid, tree + descendant_pids(process.pid), pgid if own_group else None, signal.SIGKILL)
    process.wait(timeout=grace + 5)


def _signal_all(pid: int, tree: list[int], pgid: int | None, sig: int) -> None:
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in [pid, *tree]:  # members that left the group (setsid) still belong to the tree
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


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
