"""Fine-tuning from Slicer: the bundle run as a child process, its progress stream, cancel and resume.

The child is ``python -m medtune finetune ...`` (the same CLI users run), started in its own process group
(:mod:`.child_job`, the base shared with the other jobs) so that :meth:`FinetuneJob.cancel` can kill the whole
tree (DataLoader workers included). The Slicer side never imports torch: progress comes from the run's
``progress.jsonl`` (docs/formats.md §2), read incrementally, and the child's console output goes to
``RUN/slicer_job.log``. Nothing here imports Qt; the Widget polls :meth:`FinetuneJob.poll` from a timer.

A K-fold run (``--folds K``, chosen in the panel or the preset's ``default_folds``) is one job too: its run folder
holds ``crossval.json`` and the fold runs ``fold<k>/``, whose progress streams are followed in turn (the state says
``fold k/K`` and its fraction covers all folds); with ``folds_deploy: refit`` the deployed model's run
(``RUN/progress.jsonl``) follows the folds (``refit on all cases, after K folds``). A ``refit_on_all`` run is two
runs: the estimate's (``RUN/internal_test_run/progress.jsonl``, ``run 1/2``), then the deployed model's
(``RUN/progress.jsonl``, ``run 2/2``); the first one's end is not the job's. With ``seed_ensemble: N`` the N-1
other seeds of the deployed recipe train in between (``RUN/seed_members/seed<s>/``): ``run 1/(N+1)`` ... ``run
(N+1)/(N+1)``. A finished run's result line is the honest figure next to the selection figure
(``RUN/estimate.json``, :func:`estimate_text`).
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
from medtune.runfolder import (
    BEST_MODEL,
    CHECKPOINT_LAST,
    CROSSVAL_JSON,
    ESTIMATE_JSON,
    ESTIMATE_RUN,
    PROGRESS,
    SEED_MEMBERS,
)

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
    folds: int | None = None  # None: the preset's default (default_folds); 0: one run; K >= 2: K-fold ensemble

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
        if self.folds is not None and (int(self.folds) < 0 or int(self.folds) == 1):
            raise MedTuneError(f"folds must be 0 (one run) or at least 2, got {self.folds}")
        if not (Path(self.dataset) / "dataset.json").is_file():
            raise MedTuneError("not a MedTune dataset folder (no dataset.json)", self.dataset)


def finetune_command(
    settings: FinetuneSettings, python: str | None = None, resume: bool = False, epochs: int | None = None
) -> list[str]:
    """The argv of the child process (``python -m medtune finetune ...``).

    A resumed run keeps its own dataset, preset and settings (from its ``run.json``, or a K-fold run's
    ``crossval.json``: resumed by fold); only ``epochs`` may change a single run's length.
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
    if settings.folds is not None:
        cmd += ["--folds", str(int(settings.folds))]
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
    fold: int = 0  # K-fold run: the fold being trained (1-based) of ``folds``; 0 for a single run
    folds: int = 0
    folds_done: int = 0
    refit: bool = False  # K-fold run with folds_deploy refit: one more run (fold K+1 here) after the K folds
    stage: int = 0  # refit_on_all: 1 while the estimate's run trains, ..., `stages` for the deployed model's; 0 else
    stages: int = 0  # refit_on_all: how many runs (2, or 1 + seed_ensemble)
    estimate: str = ""  # once finished: the honest figure next to the selection figure (estimate_text)

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "early_stopped", "failed", "cancelled")

    @property
    def fraction(self) -> float:
        """Progress over the whole run (epochs done plus the current epoch's steps)."""
        if self.status in ("completed", "early_stopped"):
            return 1.0
        if self.folds:  # folds finished (and the refit run after them) plus the current run's share
            return max(0.0, min(1.0, (self.folds_done + self.fold_fraction) / (self.folds + self.refit)))
        if self.stage:  # refit_on_all: runs of the same length, one after the other
            return max(0.0, min(1.0, (self.stage - 1 + self.fold_fraction) / (self.stages or 2)))
        return self.fold_fraction

    @property
    def fold_fraction(self) -> float:
        """Progress of the current run (a single run, or the current fold of a K-fold run)."""
        if not self.max_epochs:
            return 0.0
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
        if self.folds:
            if self.finished:
                label = f"{self.folds} folds" + (" + refit on all cases" if self.refit else "")
            elif self.refit and self.fold > self.folds:
                label = f"refit on all cases (after {self.folds} folds)"
            else:
                label = f"fold {self.fold}/{self.folds}"
            parts.insert(0, label)
        elif self.stage and not self.finished:
            parts.insert(0, stage_label(self.stage, self.stages or 2))
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.metric is not None:
            best = f" (best {self.best_metric:.4f} @{self.best_epoch})" if self.best_metric is not None else ""
            parts.append(f"{self.metric_name or 'metric'} {self.metric:.4f}{best}")
        return " · ".join(parts + outcome_or_eta(self) + ([self.estimate] if self.estimate and self.finished else []))


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


def stage_label(stage: int, stages: int) -> str:
    """``run 1/2 (for the internal-test estimate)``, ``run 2/3 (seed-ensemble member, on all cases)``..."""
    what = ("for the internal-test estimate" if stage == 1 else "the deployed model, on all cases" if stage == stages
            else "seed-ensemble member, on all cases")  # fmt: skip
    return f"run {stage}/{stages} ({what})"


def refit_streams(run: str | Path) -> list[Path]:
    """The progress streams of a ``refit_on_all`` run (``RUN/internal_test_run/``) in training order: the estimate's
    run, the other seed-ensemble members (``seed_ensemble`` in ``RUN/internal_test.json``, read as data), the deployed
    model's run; [] for any other run."""
    import json

    run = Path(run)
    if not (run / ESTIMATE_RUN).is_dir():
        return []
    try:
        split = json.loads((run / "internal_test.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        split = {}
    n, seed = (split.get("seed_ensemble"), split.get("seed")) if isinstance(split, dict) else (None, None)
    members: list[Path] = []
    if isinstance(n, int) and isinstance(seed, int) and not isinstance(n, bool) and 1 <= n <= 100:
        members = [run / SEED_MEMBERS / f"seed{seed + k}" / PROGRESS for k in range(1, n)]
    return [run / ESTIMATE_RUN / PROGRESS, *members, run / PROGRESS]


def refit_stage(run: str | Path) -> int:
    """A ``refit_on_all`` run: the 1-based index of the run training now (the last of :func:`refit_streams` that
    has begun; 1 before any), ``len(refit_streams(run))`` once the deployed model's run has begun; 0 for any other."""
    streams = refit_streams(run)
    return max((i + 1 for i, s in enumerate(streams) if s.is_file()), default=1) if streams else 0


def _first_stage_update(state: ProgressState, rec: dict[str, Any], stage: int, stages: int) -> None:
    """Fold a record of one of a refit run's earlier runs into ``state``: its success is not the end of the job."""
    state.update(rec)
    state.stage, state.stages = stage, stages
    if state.status in ("completed", "early_stopped"):
        state.status = "running"


def read_state(run: str | Path) -> ProgressState:
    """The state of a run folder from its whole progress stream(s) (e.g. to show a past or interrupted run)."""
    run = Path(run)
    streams = [] if crossval_folds(run) else refit_streams(run)
    stage = refit_stage(run) if streams else 0
    if crossval_folds(run):
        folds = FoldsProgress(run)
        folds.read_new()
        state = folds.combined(process_exit=None)
    elif 0 < stage < len(streams):  # stopped in (or right after) an earlier run: resumable, never "completed"
        state = ProgressState()
        for rec in ProgressTail(streams[stage - 1]).read_new():
            _first_stage_update(state, rec, stage, len(streams))
        if state.status == "running":
            state.status = "interrupted"
    else:
        state = ProgressState()
        for rec in ProgressTail(run / PROGRESS).read_new():
            state.update(rec)
    if streams and stage == len(streams):
        state.stage, state.stages = stage, stage
    if state.finished and state.status in ("completed", "early_stopped"):
        state.estimate = estimate_text(run)
    return state


def can_resume(run: str | Path) -> bool:
    """True if ``run`` holds a checkpoint from an unfinished run, or is an unfinished K-fold run (the CLI's
    ``--resume`` continues it, by fold)."""
    run = Path(run)
    if crossval_folds(run):
        return _crossval_status(run) != "completed"
    if 0 < refit_stage(run) < len(refit_streams(run)):  # before a refit run's last run: the CLI continues the rest
        return True
    if not (run / CHECKPOINT_LAST).is_file():
        return False
    return read_state(run).status not in ("completed", "early_stopped")


def holds_run(run: str | Path) -> bool:
    """True if ``run`` already holds a training run (single or K-fold): a new run must not start there."""
    return any((Path(run) / name).exists() for name in (CHECKPOINT_LAST, BEST_MODEL, CROSSVAL_JSON, ESTIMATE_RUN))


# ------------------------------------------------------------------------------------- K-fold runs


def _crossval_record(run: Path) -> dict[str, Any]:
    import json

    try:
        rec = json.loads((run / CROSSVAL_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def crossval_folds(run: str | Path) -> int:
    """K of the K-fold run in ``run`` (its ``crossval.json``), 0 for a single run or an unreadable file."""
    k = _crossval_record(Path(run)).get("folds")
    return k if isinstance(k, int) and not isinstance(k, bool) and 2 <= k <= 100 else 0


def _crossval_status(run: Path) -> str:
    return str(_crossval_record(run).get("status") or "")


class FoldsProgress:
    """The progress streams of a K-fold run's fold runs (``RUN/fold<k>/progress.jsonl``), each read incrementally
    into its own :class:`ProgressState`, combined into one state for the panel."""

    def __init__(self, run: Path) -> None:
        self.run = Path(run)
        self.k = crossval_folds(run)
        self.refit = _crossval_record(self.run).get("deploy") == "refit"  # then RUN's own stream comes last
        streams = [self.run / f"fold{i}" / PROGRESS for i in range(self.k)] + ([self.run / PROGRESS] * self.refit)
        self.tails = [ProgressTail(p) for p in streams]
        self.states = [ProgressState() for _ in streams]

    def read_new(self) -> None:
        for tail, state in zip(self.tails, self.states, strict=True):
            for rec in tail.read_new():
                state.update(rec)

    def combined(self, process_exit: int | None, alive: bool = False) -> ProgressState:
        """One state over all folds: the current fold's epoch/loss/metric, ``fold k/K``, a fraction and an ETA
        over all folds. ``alive``: the child still runs (a fold's ``done`` does not end the run); ``process_exit``
        its exit code once it ended (None: unknown, as for a past run: then the folds' own records decide)."""
        done = sum(s.status in ("completed", "early_stopped") for s in self.states)
        started = [i for i, s in enumerate(self.states) if s.status != "starting"]
        current = next((i for i in started if not self.states[i].finished), started[-1] if started else 0)
        cur = self.states[current]
        state = ProgressState(**{f: getattr(cur, f) for f in ("status", "epoch", "max_epochs", "step",
            "steps_per_epoch", "start_epoch", "loss", "metric", "metric_name", "best_metric", "best_epoch",
            "error")})  # fmt: skip
        n = len(self.states)  # the K folds, then the refit run (folds_deploy refit)
        state.folds, state.folds_done, state.refit = self.k, done, self.refit
        if cur.status in ("completed", "early_stopped"):  # counted in folds_done; the next fold has not started
            state.epoch = state.step = 0
        state.fold = min(current + 1 if current >= done else done + 1, n)
        if alive:
            state.status = "running" if started else "starting"
        elif process_exit is not None:
            state.status = "completed" if process_exit == 0 else "failed"
        elif done == n and _crossval_status(self.run) == "completed":
            state.status = "completed"
        elif any(s.status in ("failed", "cancelled", "interrupted") for s in self.states):
            state.status = next(s.status for s in self.states if s.status in ("failed", "cancelled", "interrupted"))
        else:
            state.status = "interrupted" if started else "starting"
        f = cur.fold_fraction
        if cur.eta_seconds is not None and 0.05 < f < 1.0 and not cur.finished:  # the folds left take as long
            state.eta_seconds = cur.eta_seconds + (n - done - 1) * cur.eta_seconds / (1.0 - f)
        return state


def estimate_text(run: str | Path) -> str:
    """The honest figure next to the selection figure of a finished run (``RUN/estimate.json``, read as untrusted
    data), e.g. ``honest (cross-validated, out-of-fold ...): AUC 0.81 (0.70–0.90), 36 cases · selection ...``;
    empty when the run wrote none."""
    from medtune.finetune.crossval import read_estimate  # torch-free: json and numbers only

    if not (Path(run) / ESTIMATE_JSON).is_file():
        return ""
    est = read_estimate(run)
    if est is None:
        return ""

    def fig(row: dict[str, Any]) -> str:
        e = row["estimate"]
        value = "?" if e["value"] is None else f"{e['value']:.3f}"
        ci = f" ({e['ci_low']:.3f}–{e['ci_high']:.3f})" if e["ci_low"] is not None and e["ci_high"] is not None else ""
        n = f", {row['n']} cases" if row.get("n") else ""
        return f"{row['label']}: {row['name']} {value}{ci}{n}"

    sel = est.get("selection")
    selection = fig(sel) if sel else "selection: none (fixed schedule, nothing was chosen on any case)"
    return f"honest {fig(est['honest'])} · {selection} · quote the honest figure"


# ----------------------------------------------------------------------------------------------- job


class FinetuneJob(CliJob):
    """One fine-tuning child process. ``start`` -> ``poll`` (from a UI timer) -> finished, or ``cancel``."""

    what, log_name = "fine-tuning", JOB_LOG

    def __init__(self, settings: FinetuneSettings, python: str | None = None) -> None:
        super().__init__(settings, python)
        self.state = ProgressState()
        self._tail = ProgressTail(Path(settings.out) / PROGRESS)
        self._folds: FoldsProgress | None = None  # a K-fold run, once its crossval.json exists
        self._earlier: dict[Path, ProgressTail] = {}  # refit_on_all: the streams of the runs before the deployed one

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
        if not resume and holds_run(out):
            raise MedTuneError("run folder already holds a training run; resume it or choose a new folder", out)
        self._open_log(self.log_path, folder="run folder")
        self._tail = ProgressTail(out / PROGRESS)
        self._tail.read_new()  # a resumed run appends: skip the earlier records...
        self._earlier = {p: ProgressTail(p) for p in refit_streams(out)[:-1]}
        for tail in self._earlier.values():
            tail.read_new()
        self.state = read_state(out) if resume else ProgressState()  # ...but start from their state
        self.state.status, self.state.estimate = "starting", ""
        self._folds = None
        self._spawn_cli(finetune_command(self.settings, self.python, resume=resume, epochs=epochs))

    def poll(self) -> ProgressState:
        """Read new progress records; detect a child that exited without a ``done`` record."""
        if self.state.status == "cancelled":
            return self.state
        code = None if self.process is None else self.process.poll()
        if self._folds is None and crossval_folds(self.run_dir):
            self._folds = FoldsProgress(self.run_dir)
        if self._folds is not None:  # a K-fold run: the fold runs' streams
            self._folds.read_new()
            alive = self.process is not None and code is None
            self.state = self._folds.combined(code, alive=alive)
        elif 0 < (stage := refit_stage(self.run_dir)) < len(streams := refit_streams(self.run_dir)):
            tail = self._earlier.setdefault(streams[stage - 1], ProgressTail(streams[stage - 1]))
            for rec in tail.read_new():  # refit_on_all: an earlier run (its end is not the job's)
                _first_stage_update(self.state, rec, stage, len(streams))
        else:
            for rec in self._tail.read_new():
                self.state.update(rec)
            if stage and stage == len(streams := refit_streams(self.run_dir)):
                self.state.stage, self.state.stages = stage, stage
        if self.process is None:
            return self.state
        if code is not None:
            if self._folds is None:
                for rec in self._tail.read_new():  # the last lines written before exit
                    self.state.update(rec)
                if not self.state.finished:
                    self.state.status = "completed" if code == 0 else "failed"
            if code != 0 and not self.state.error:
                self.state.error = self._exit_error(code)
            if code == 0 and self.state.status in ("completed", "early_stopped"):
                self.state.estimate = estimate_text(self.run_dir)
            self._close_log()
        return self.state

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the run and every process it started (terminate, then kill after ``grace`` seconds)."""
        if self.process is None or not self.running:
            return
        finished = self.poll().finished
        kill_process_tree(self.process, grace)
        stream = self.run_dir / PROGRESS
        if self._folds is not None:  # a K-fold run: the fold being trained says it was cancelled
            if not (self._folds.refit and self.state.fold > self.state.folds):  # else: the refit run's own stream
                stream = self.run_dir / f"fold{max(self.state.fold - 1, 0)}" / PROGRESS
        elif 0 < (stage := refit_stage(self.run_dir)) < len(streams := refit_streams(self.run_dir)):
            stream = streams[stage - 1]  # the earlier run of refit_on_all training now says it
        else:
            for rec in self._tail.read_new():
                self.state.update(rec)
        if not (finished or self.state.finished) and (self._folds is None or stream.is_file()):
            from medtune.finetune.progress import ProgressWriter  # mark the stream: the folder says what happened

            _end_partial_line(stream)
            ProgressWriter(stream).emit("done", status="cancelled", epoch=self.state.epoch)
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
