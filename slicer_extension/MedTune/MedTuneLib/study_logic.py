"""A label-efficiency study (``medtune study``, issue 11) from Slicer: a child process, progress, cancel, resume.

The child is ``python -m medtune study ... --quiet`` (the same CLI users run), started in its own process group
like the fine-tuning job (their shared base: :mod:`.child_job`), so :meth:`StudyJob.cancel` kills the whole tree
(the study's spawned run workers and their DataLoader workers included). The Slicer side never imports torch:
progress comes from the study's own files (docs: ``medtune study``):

- ``STUDY/plan.json``: the arms, label budgets, seeds and folds (so the number of runs);
- ``STUDY/results.jsonl``: one line per finished (trained + evaluated) run;
- ``STUDY/runs/<arm>/<budget>/seed<N>[/fold<K>]/progress.jsonl``: the run in progress (epochs / steps, as
  fine-tuning);
- ``STUDY/study.json`` + ``report.md``: the end, each arm's metric (with ``--folds K``: pooled out-of-fold over
  every labeled case) and a plain-language verdict per label budget.

The child's console output goes to ``STUDY/slicer_study.log`` (its last line is the one-line error of a failed
study). A cancelled or failed study resumes by starting it again with the same settings: finished runs are
skipped, the interrupted one continues from its checkpoint. Nothing here imports Qt; the Widget polls
:meth:`StudyJob.poll` from its timer.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.errors import MedTuneError
from medtune.runfolder import PROGRESS

from .child_job import CliJob, kill_process_tree
from .finetune_logic import PRESETS, ProgressState, outcome_or_eta, read_state, set_options

STUDY_LOG = "slicer_study.log"
PLAN_JSON = "plan.json"  # the study's own file names (medtune.study.runner), read as data here
RESULTS_JSONL = "results.jsonl"
STUDY_JSON = "study.json"
REPORT_MD = "report.md"


@dataclass
class StudySettings:
    """What the Study panel chooses (the ``medtune study`` options); ``overrides`` go to every arm (``--set``)."""

    dataset: Path
    out: Path
    preset: str = "3d_classification"
    sources: str = "scratch"  # comma list of [NAME=]SOURCE[:STRATEGY]
    labels: str = "100%"  # label budgets: 10%,25%,100% or case counts 8,16
    seeds: int = 3
    epochs: int | None = None
    strategy: str = "full"  # strategy of pretrained arms without :STRATEGY
    folds: int = 0  # 0: the dataset's validation split; K >= 2: patient-grouped K-fold cross-validation (--folds)
    overrides: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """One-line errors for what the CLI would refuse later (after a slow torch import): preset, numbers, the
        folds (at least 2, no more than the dataset's patients), the budgets' syntax (against the dataset's labeled
        training cases; with folds, the smallest fold's training pool) and the sources' (where the strategy names,
        which live with torch, can be read; else the child checks them and says so in one line)."""
        from medtune.study.plan import parse_budgets, parse_sources  # the CLI's own parsers

        if self.preset not in PRESETS:
            raise MedTuneError(f"unknown preset {self.preset!r} (choose {', '.join(PRESETS)})")
        if not self.strategy or not self.strategy.replace("_", "").isalpha():
            raise MedTuneError(f"unknown strategy {self.strategy!r}")
        if int(self.seeds) < 1:
            raise MedTuneError(f"seeds must be at least 1, got {self.seeds}")
        if self.epochs is not None and int(self.epochs) < 1:
            raise MedTuneError(f"epochs must be at least 1, got {self.epochs}")
        if int(self.folds) < 0 or int(self.folds) == 1:
            raise MedTuneError(f"folds must be 0 (the dataset's validation split) or at least 2, got {self.folds}")
        if not (Path(self.dataset) / "dataset.json").is_file():
            raise MedTuneError("not a MedTune dataset folder (no dataset.json)", self.dataset)
        try:
            parse_sources(self.sources, self.strategy)
        except ImportError:  # no torch in this Python (Slicer before the first-use install)
            if not [t for t in self.sources.split(",") if t.strip()]:
                raise MedTuneError("--sources is empty") from None
        n_pool = fold_pool_cases(self.dataset, int(self.folds)) if self.folds else labeled_training_cases(self.dataset)
        parse_budgets(self.labels, n_pool)


def fold_pool_cases(dataset: str | Path, folds: int) -> int:
    """The smallest training pool of a ``folds``-fold study of ``dataset`` (a case-count budget must fit it), as
    the CLI cuts the folds. Where the fold splitter (scikit-learn, a training package) is not installed yet, an
    upper bound that holds for any K-fold cut: some fold holds at least ceil(n / K) of the n cases, so its
    training pool has at most n - ceil(n / K) (a budget above it can never fit; the child checks the exact pool).
    Fewer patients (or ungrouped cases) than folds: a one-line error."""
    from medtune.data.contract import read_datalist
    from medtune.finetune.crossval import group_key

    data = read_datalist(dataset)
    items = [e for split in ("training", "validation") for e in data.get(split, []) if isinstance(e, dict)
             and "label" in e]  # fmt: skip
    key = group_key(items)
    groups = len({str(e[key]) for e in items}) if key else len(items)
    if groups < folds:
        what = f"patients ('{key}')" if key else "labeled cases"
        raise MedTuneError(f"{folds} folds need at least {folds} {what}; this dataset has {groups}",
                           Path(dataset) / "datalist.json")  # fmt: skip
    try:
        from medtune.study.folds import fold_items, smallest_pool

        _, fold_of, _ = fold_items(Path(dataset), folds)
    except ImportError:  # scikit-learn not installed yet (Slicer before the first-use install)
        return len(items) - -(-len(items) // folds)
    return smallest_pool(fold_of, folds)


def labeled_training_cases(dataset: str | Path) -> int:
    """Labeled cases in the dataset's training split (what a study's label budgets are taken from)."""
    from medtune.data.contract import read_datalist

    return sum(1 for e in read_datalist(dataset).get("training", []) if isinstance(e, dict) and "label" in e)


def study_command(settings: StudySettings, python: str | None = None) -> list[str]:
    """The argv of the child process (``python -m medtune study ... --quiet``). Starting it again with the same
    settings resumes the study (the CLI skips finished runs and resumes an interrupted one)."""
    cmd = [python or sys.executable, "-m", "medtune", "study", "--quiet", "--out", str(settings.out)]
    cmd += ["--dataset", str(settings.dataset), "--preset", settings.preset, "--sources", settings.sources]
    cmd += ["--labels", settings.labels, "--seeds", str(int(settings.seeds)), "--strategy", settings.strategy]
    if settings.epochs is not None:
        cmd += ["--epochs", str(int(settings.epochs))]
    if settings.folds:
        cmd += ["--folds", str(int(settings.folds))]
    return cmd + set_options(settings.overrides)


# ------------------------------------------------------------------------------------------ progress


@dataclass
class StudyState:
    """The Study panel's view: runs done of planned, the run in progress, ETA, and the verdicts at the end."""

    status: str = "starting"  # starting | running | completed | failed | cancelled
    runs_total: int = 0
    runs_done: int = 0
    current: str = ""  # the run in progress, e.g. "scratch/100pct/seed1"
    current_run: ProgressState | None = None
    eta_seconds: float | None = None
    verdicts: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)  # at the end: each arm's metric and CI per label budget
    folds: int = 0  # the study's K (plan.json), 0 without cross-validation
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def fraction(self) -> float:
        """Progress over the whole study: finished runs plus the fraction of the run in progress."""
        if self.status == "completed":
            return 1.0
        if not self.runs_total:
            return 0.0
        within = self.current_run.fraction if self.current_run is not None else 0.0
        return max(0.0, min(1.0, (self.runs_done + within) / self.runs_total))

    def text(self) -> str:
        """One status line, e.g. ``run 3/8 · scratch/100pct/seed1: epoch 1/2 · loss 0.69 · ETA 1:20``."""
        if self.status == "starting":
            return "starting the study (loading PyTorch and MONAI)..."
        if self.status == "completed":
            done = f"{self.runs_done} run(s)" if not self.folds else "; ".join(
                [f"{self.runs_done} fold run(s), {self.folds}-fold cross-validation", *self.results])
            return f"completed: {done}; " + (" ".join(self.verdicts) or "see report.md")  # fmt: skip
        parts = [f"run {min(self.runs_done + 1, self.runs_total)}/{self.runs_total}" if self.runs_total else "planning"]
        if self.current and self.current_run is not None:  # the run's own ETA left out: the study's is below
            run = " · ".join(p for p in self.current_run.text().split(" · ") if not p.startswith("ETA "))
            parts.append(f"{self.current}: {run}")
        return " · ".join(parts + outcome_or_eta(self, hours=True))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _planned_folds(plan: Any) -> int:
    folds = plan.get("folds") if isinstance(plan, dict) else None
    return folds if isinstance(folds, int) and not isinstance(folds, bool) and folds >= 2 else 0


def _planned_runs(plan: Any) -> int:
    if not isinstance(plan, dict):
        return 0
    arms, budgets, seeds = plan.get("arms"), plan.get("budgets"), plan.get("seeds")
    if not (isinstance(arms, list) and isinstance(budgets, list) and isinstance(seeds, int)):
        return 0
    return len(arms) * len(budgets) * max(seeds, 0) * max(_planned_folds(plan), 1)


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def result_lines(summary: dict[str, Any], folds: int = 0) -> list[str]:
    """``scratch at 8 labels: Dice 0.830 (0.817–0.842)`` per arm and budget from ``study.json``'s cells (numbers
    and the study's own names only); with folds the value is the pooled out-of-fold one over all cases."""
    lines = []
    for cell in summary.get("cells") or []:
        if not isinstance(cell, dict):
            continue
        metric = "AUC" if cell.get("metric_name") == "val_auc" else "Dice"
        pooled = f"pooled out-of-fold {metric}" if folds else metric
        n = cell.get("n_validation")
        over = f" over {n} cases" if isinstance(n, int) and not isinstance(n, bool) else ""
        lines.append(f"{cell.get('arm')} at {cell.get('budget')} labels: {pooled} {_number(cell.get('mean'))} "
                     f"({_number(cell.get('ci_low'))}–{_number(cell.get('ci_high'))}){over}")  # fmt: skip
    return lines


def _finished_runs(path: Path) -> dict[str, Path]:
    """``key -> run folder`` of the runs in ``results.jsonl`` (a half-written last line is skipped)."""
    out: dict[str, Path] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("eval_dir"), str):
            out[rec["key"]] = Path(rec["eval_dir"]).parent
    return out


def read_study_state(study: str | Path) -> StudyState:
    """The state of a study folder from its files (planned, finished, in progress, verdicts)."""
    study = Path(study)
    state = StudyState(status="running")
    plan = _read_json(study / PLAN_JSON)
    state.runs_total, state.folds = _planned_runs(plan), _planned_folds(plan)
    finished = _finished_runs(study / RESULTS_JSONL)
    state.runs_done = len(finished)
    done_dirs = {p.resolve() for p in finished.values()}
    pattern = f"*/*/seed*/fold*/{PROGRESS}" if state.folds else f"*/*/seed*/{PROGRESS}"
    progress = [p for p in (study / "runs").glob(pattern) if p.parent.resolve() not in done_dirs]
    if progress:
        newest = max(progress, key=lambda p: p.stat().st_mtime)
        state.current = newest.parent.relative_to(study / "runs").as_posix()
        state.current_run = read_state(newest.parent)
    summary = _read_json(study / STUDY_JSON)
    if isinstance(summary, dict) and state.runs_total and state.runs_done >= state.runs_total:
        comparisons = summary.get("comparisons")
        if isinstance(comparisons, list):
            state.verdicts = [str(c["verdict"]) for c in comparisons if isinstance(c, dict) and "verdict" in c]
        state.results = result_lines(summary, state.folds)
    return state


# ----------------------------------------------------------------------------------------------- job


class StudyJob(CliJob):
    """One study child process. ``start`` -> ``poll`` (from a UI timer) -> finished, or ``cancel``."""

    what, log_name = "the study", STUDY_LOG

    def __init__(self, settings: StudySettings, python: str | None = None) -> None:
        super().__init__(settings, python)
        self.state = StudyState()
        self._t0 = 0.0
        self._f0 = 0.0

    @property
    def study_dir(self) -> Path:
        return self.folder

    @property
    def report_path(self) -> Path:
        return self.study_dir / REPORT_MD

    def start(self) -> None:
        """Launch the child (a study folder that holds finished runs of the same plan is resumed)."""
        if self.running:
            raise MedTuneError("a study is already in progress", self.study_dir)
        self.settings.check()
        self._open_log(self.log_path, folder="study folder")
        before = read_study_state(self.study_dir)
        self._f0, self._t0 = before.fraction, time.monotonic()
        self.state = StudyState()
        self._spawn_cli(study_command(self.settings, self.python))  # own process group: cancel kills run workers

    def _refresh(self) -> None:
        status, error = self.state.status, self.state.error
        new = read_study_state(self.study_dir)
        if status == "starting" and not new.runs_total:
            new.status = "starting"
        fraction = new.fraction
        elapsed = time.monotonic() - self._t0
        if fraction > self._f0 and elapsed > 0:
            new.eta_seconds = elapsed / (fraction - self._f0) * (1.0 - fraction)
        if status in ("completed", "failed", "cancelled"):
            new.status, new.error = status, error
        self.state = new

    def poll(self) -> StudyState:
        """Read the study's files; detect the child's exit (0: completed with the report, else failed)."""
        if self.process is None or self.state.status == "cancelled":
            return self.state
        self._refresh()
        code = self.process.poll()
        if code is not None and not self.state.finished:
            self._refresh()
            if code == 0:
                self.state.status, self.state.eta_seconds = "completed", 0.0
            else:
                self.state.status, self.state.error = "failed", self._exit_error(code)
            self._close_log()
        return self.state

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the study and every process it started (terminate, then kill after ``grace`` seconds). The
        study folder stays resumable: start the same settings again."""
        if self.process is None or not self.running:
            return
        kill_process_tree(self.process, grace)
        self._refresh()
        self.state.status, self.state.error, self.state.eta_seconds = "cancelled", "", None
        self._close_log()
