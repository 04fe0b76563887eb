"""The module's state and panel actions without Qt: what the Widget's buttons and timers call.

One :class:`MedTuneSession` holds the open dataset, the case being labeled, the fine-tuning job, the export
job and the model used by the Run and Label panels. Every method either returns quickly or starts work
in a child process / worker thread that the Widget polls (:meth:`MedTuneSession.poll`), so the UI never blocks:

- fine-tuning, a label-efficiency study (``medtune study``) and export: child processes; a model run on a
  volume: its own worker thread;
- choosing the next case (queue ranking), pre-filling cases and loading the model for them: the session's one
  labeling worker thread (``medtune-label``), which is therefore the only writer of ``predictions/`` and
  ``uncertainty.json``; the main thread only reads them. ``load_case`` does scene work only (no inference).
The provider chosen in the panel (``set_provider``) is used for every model the session opens.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.errors import MedTuneError
from medtune.runfolder import BEST_MODEL, CHECKPOINT_LAST, CROSSVAL_JSON, PROGRESS

from .dataset_logic import DatasetLogic, parse_labels
from .finetune_logic import (
    FinetuneJob,
    FinetuneSettings,
    ProgressState,
    can_resume,
    crossval_folds,
    ensure_validation_split,
    read_state,
    refit_streams,
)
from .labeling_logic import labeling_queue, load_for_labeling, missing_predictions, model_sha_of, prefill
from .run_logic import ExportJob, ExportResult, RunResult, RunTask, load_model
from .study_logic import StudyJob, StudySettings, StudyState

LABEL_WORKER = "medtune-label"

RUNS_DIR = "runs"
STUDIES_DIR = "studies"
MODELS_DIR = "models"
DEFAULT_PRESET = {("segmentation", 3): "3d_segmentation", ("segmentation", 2): "2d_segmentation",
                  ("classification", 3): "3d_classification", ("classification", 2): "2d_classification"}  # fmt: skip


@dataclass
class PollReport:
    """What the UI timer shows after one :meth:`MedTuneSession.poll` (errors are reported once)."""

    finetune: ProgressState | None = None
    export_result: ExportResult | None = None
    run_result: RunResult | None = None
    prefilled: int | None = None  # number of cases just pre-filled (the case list needs a refresh)
    case_ready: str | None = None  # the case chosen by start_next_case / prepared by start_load_case: load it
    all_labeled: bool = False  # start_next_case found nothing left to label
    errors: list[str] | None = None
    busy: bool = False
    study: StudyState | None = None


class MedTuneSession:
    """State shared by the five panels (Dataset, Label, Fine-tune, Export, Run)."""

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None) -> None:
        self.python = python or sys.executable  # in Slicer: PythonSlicer
        self.env = env  # child processes' environment (in Slicer: the extension's medtune first on PYTHONPATH)
        self.provider = "auto"
        self.dataset: DatasetLogic | None = None
        self.case_id: str | None = None
        self.case_nodes: tuple[Any, Any] | None = None  # (volume, segmentation node or predicted class)
        self.job: FinetuneJob | None = None
        self.export_job: ExportJob | None = None
        self.run_task: RunTask | None = None
        self.model_path: Path | None = None
        self._model_sha: tuple[Path, float, str] | None = None
        self.prefill_future: Future | None = None
        self.case_future: Future | None = None
        self._label_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=LABEL_WORKER)
        self._worker_model_cache: tuple[Path, str, Any] | None = None  # touched by the labeling worker only
        self._finetune_reported = False
        self._saved_mask: Any = None
        self.study_job: StudyJob | None = None
        self._study_reported = False

    # ------------------------------------------------------------------------------------------ dataset

    def open_dataset(self, path: str | Path, task: str = "segmentation", labels_text: str = "",
                     spatial_dims: int = 3) -> DatasetLogic:  # fmt: skip
        """Open a dataset folder, or create it with ``labels_text`` (``"1: liver, 2: tumor"``)."""
        if not str(path).strip():
            raise MedTuneError("choose a dataset folder")
        root = Path(path)
        if (root / "dataset.json").is_file():  # an existing dataset keeps its own task and labels
            task = DatasetLogic(root).meta["task"]
        labels = parse_labels(labels_text, background=task == "segmentation")
        self.dataset = DatasetLogic.create_or_open(root, task, labels, spatial_dims=spatial_dims)
        self.case_id, self.case_nodes = None, None
        return self.dataset

    def require_dataset(self) -> DatasetLogic:
        if self.dataset is None:
            raise MedTuneError("open a dataset first")
        return self.dataset

    def cases(self, use_model: bool = True) -> list[dict[str, Any]]:
        """The queue (most uncertain first by the cached predictions of the current model), then labeled cases.

        Runs no inference (safe on the UI thread); :meth:`start_prefill` predicts the cases still missing.
        """
        ds = self.require_dataset()
        queue = labeling_queue(ds, None, model_sha=self.model_sha() if use_model else None)
        queued = {c["id"] for c in queue}
        return queue + [{**c, "entropy": None} for c in ds.list_cases() if c["id"] not in queued]

    def import_volume(self, volume: Any, segmentation: Any = None, class_value: int | None = None) -> str:
        ds = self.require_dataset()
        if volume is None:
            raise MedTuneError("select a volume to import")
        if ds.is_classification:
            return ds.import_image(volume, class_value)
        return ds.import_volume(volume, segmentation)

    def import_dicom(self, folder: str | Path) -> str:
        if not str(folder).strip():
            raise MedTuneError("choose a DICOM series folder")
        return self.require_dataset().import_dicom_series(folder)

    # -------------------------------------------------------------------------------------------- label

    def load_case(self, case_id: str, scene: Any, use_model: bool = True) -> tuple[Any, Any]:
        """Load a case into the scene (main thread; no inference): its labels, else the model's cached prediction.

        Call :meth:`start_load_case` / :meth:`start_next_case` first to have the prediction made in the worker.
        ``use_model`` is kept for callers; pre-filling happens in the worker, never here.
        """
        ds = self.require_dataset()
        nodes = load_for_labeling(ds, case_id, scene, None)
        self.close_case()
        self.case_nodes, self.case_id = nodes, case_id
        self._saved_mask = self._current_mask()
        return self.case_nodes

    def _current_mask(self) -> Any:
        ds = self.dataset
        if ds is None or self.case_nodes is None or ds.is_classification or self.case_nodes[1] is None:
            return None
        volume, segmentation = self.case_nodes
        return ds.segmentation_mask(segmentation, volume)

    def has_unsaved_labels(self) -> bool:
        """True when the loaded case's segmentation differs from what was loaded or last saved."""
        import numpy as np

        current = self._current_mask()
        return current is not None and not np.array_equal(current, self._saved_mask)

    def close_case(self) -> None:
        """Remove the loaded case's nodes from the scene (check :meth:`has_unsaved_labels` first)."""
        if self.case_nodes is not None:
            for node in self.case_nodes:
                if hasattr(node, "GetScene") and node.GetScene() is not None:
                    node.GetScene().RemoveNode(node)
        self.case_id, self.case_nodes, self._saved_mask = None, None, None

    def start_next_case(self, use_model: bool = True) -> Future:
        """Choose the next case in the labeling worker (with a model: predict what is missing, most uncertain
        first); :meth:`poll` reports ``case_ready`` (then call :meth:`load_case`) or ``all_labeled``."""
        return self._start_case(None, use_model)

    def start_load_case(self, case_id: str, use_model: bool = True) -> Future:
        """Prepare ``case_id`` in the labeling worker (its prediction, if a model is on); see :meth:`poll`."""
        self.require_dataset().find(case_id)
        return self._start_case(case_id, use_model)

    def _start_case(self, case_id: str | None, use_model: bool) -> Future:
        ds = self.require_dataset()
        if self.case_future is not None and not self.case_future.done():
            raise MedTuneError("still preparing the previous case; wait for it")
        path, provider = (self.model_path, self.provider) if use_model else (None, self.provider)
        self.case_future = self._label_worker.submit(self._prepare_case, ds, case_id, path, provider)
        return self.case_future

    def _prepare_case(self, ds: DatasetLogic, case_id: str | None, path: Path | None, provider: str) -> str | None:
        """Labeling worker: the case to load (``None``: all labeled), with its prediction written when missing."""
        model = self._worker_model(path, provider) if path is not None else None
        if case_id is None:
            queue = labeling_queue(ds, model)  # predicts the cases the model has not seen (pre-fill)
            return queue[0]["id"] if queue else None
        _, entry = ds.find(case_id)
        if model is not None and "label" not in entry and case_id in missing_predictions(ds, model_sha_of(model)):
            prefill(ds, [case_id], model)
        return case_id

    def _worker_model(self, path: Path, provider: str) -> Any:
        """The model for the labeling worker (opened there, on the chosen provider; cached by path + provider)."""
        cached = self._worker_model_cache
        if cached is None or cached[:2] != (path, provider):
            cached = (path, provider, load_model(path, provider))
            self._worker_model_cache = cached
        return cached[2]

    def next_case(self, scene: Any, use_model: bool = True, timeout: float = 3600.0) -> str | None:
        """Blocking :meth:`start_next_case` + :meth:`load_case` (scripts and tests; the Widget polls instead)."""
        case_id = self.start_next_case(use_model).result(timeout)
        self.case_future = None
        if case_id is not None:
            self.load_case(case_id, scene)
        return case_id

    def save_labels(self, class_value: int | None = None) -> str:
        """Save the loaded case's segmentation (or the picked class); returns a status line."""
        ds = self.require_dataset()
        if self.case_id is None or self.case_nodes is None:
            raise MedTuneError("load a case first")
        if ds.is_classification:
            if class_value is None:
                raise MedTuneError("pick a class first")
            ds.set_class(self.case_id, class_value)
            return f"{self.case_id}: class {ds.labels[int(class_value)]}"
        path = ds.save_labels(self.case_id, self.case_nodes[1])
        self._saved_mask = self._current_mask()
        return f"{self.case_id}: labels saved to {path.name} (previous version kept)"

    # ----------------------------------------------------------------------------------------- finetune

    def new_run_dir(self) -> Path:
        stamp = time.strftime("%Y%m%d_%H%M%S")
        return self.require_dataset().root / RUNS_DIR / f"run_{stamp}"

    def default_preset(self) -> str:
        meta = self.require_dataset().meta
        return DEFAULT_PRESET[(meta["task"], int(meta["spatial_dims"]))]

    def run_dir_for_start(self, chosen: str | Path | None) -> Path:
        """The folder for a new run: ``chosen`` if it holds no run yet, else a new ``runs/run_<time>``."""
        if chosen and str(chosen).strip():
            folder = Path(chosen)
            if not any((folder / name).exists() for name in (CHECKPOINT_LAST, BEST_MODEL, PROGRESS, CROSSVAL_JSON)):
                return folder
        return self.new_run_dir()

    def start_finetune(
        self, settings: FinetuneSettings, resume: bool = False, epochs: int | None = None
    ) -> FinetuneJob:
        """Start (or resume, with the run's own settings) fine-tuning in a child process; see :meth:`poll`."""
        if self.job is not None and not self.job.poll().finished:
            raise MedTuneError("a fine-tuning run is already in progress; cancel it first")
        if not resume:
            ensure_validation_split(settings.dataset)
        self.job = FinetuneJob(settings, self.python)
        self.job.start(resume=resume, epochs=epochs)
        self._finetune_reported = False
        return self.job

    def start_panel_finetune(
        self, *, run: str | Path | None = None, preset: str | None = None, arch: str | None = None,
        pretrained: str | None = None, strategy: str = "full", epochs: int = 10, device: str = "auto",
        overrides: dict[str, Any] | None = None, resume: bool = False, folds: int | None = None,
        folds_refit: bool = False,
    ) -> FinetuneJob:  # fmt: skip
        """The Fine-tune panel's Start / Resume (Slicer's and the studio's): a new run with these choices in
        ``run`` (or a new ``runs/run_<time>``), or resume ``run`` (default: the dataset's interrupted run).
        ``folds``: None = the preset's default (``default_folds``), 0 = one run, K = a K-fold ensemble run;
        ``folds_refit`` (with K >= 2): the K folds give the estimate, then one model refit on all the cases is the
        deployed one (``folds_deploy: refit``)."""
        ds = self.require_dataset()
        if resume:
            folder = run or self.resumable_run()
            if not folder:
                raise MedTuneError("no interrupted run to resume in this dataset", ds.root / RUNS_DIR)
            return self.start_finetune(FinetuneSettings(ds.root, Path(folder)), resume=True)
        settings = FinetuneSettings(
            ds.root, self.run_dir_for_start(run), preset=preset or self.default_preset(), pretrained=pretrained or None,
            strategy=strategy, epochs=epochs, device=device, arch=arch or None, overrides=dict(overrides or {}),
            folds=folds,
        )  # fmt: skip
        if folds_refit and folds and folds >= 2:  # one run (folds 0, or the preset's default of 0): nothing to refit
            settings.overrides["folds_deploy"] = "refit"
        return self.start_finetune(settings)

    def list_runs(self) -> list[dict[str, Any]]:
        """The dataset's run folders (``runs/*``), newest first: name, path, kind (``run``, ``K-fold ensemble``,
        ``K-fold estimate + refit`` or ``N-seed ensemble``), status and the honest figure next to the selection
        figure once finished (the panels' run list; a refit run stopped before its deployed model's run is listed
        too, to resume it)."""
        root = self.require_dataset().root / RUNS_DIR
        out = []
        for folder in sorted(root.iterdir(), reverse=True) if root.is_dir() else []:
            k = crossval_folds(folder)
            seeds = len(refit_streams(folder)) - 1  # refit_on_all: the deployed model's seeds (0: not a refit run)
            if not folder.is_dir() or not (k or seeds or (folder / PROGRESS).is_file()):
                continue
            state = read_state(folder)
            kind = f"{k}-fold ensemble" if k else f"{seeds}-seed ensemble" if seeds > 1 else "run"
            if k and state.refit:  # folds_deploy refit: the folds gave the estimate, one model is deployed
                kind = f"{k}-fold estimate + refit"
            out.append({"name": folder.name, "path": str(folder), "kind": kind, "status": state.status,
                        "estimate": state.estimate})  # fmt: skip
        return out

    def poll_finetune(self) -> ProgressState | None:
        return None if self.job is None else self.job.poll()

    def cancel_finetune(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def cancel_export(self) -> None:
        if self.export_job is not None:
            self.export_job.cancel()
            self.export_job = None

    def cancel_all(self) -> None:
        """Stop every child process (the module is closing); queued labeling work is dropped, the running
        worker item finishes on its own."""
        self.cancel_finetune()
        self.cancel_study()
        self.cancel_export()
        self._label_worker.shutdown(wait=False, cancel_futures=True)

    def resumable_run(self) -> Path | None:
        """The last run of this session, or the newest run folder of the dataset, if it can be resumed."""
        candidates = [self.job.run_dir] if self.job is not None else []
        if self.dataset is not None and (self.dataset.root / RUNS_DIR).is_dir():
            candidates += sorted((self.dataset.root / RUNS_DIR).iterdir(), reverse=True)
        return next((c for c in candidates if can_resume(c)), None)

    # -------------------------------------------------------------------------------------------- study

    def start_study(
        self, *, study: str | Path | None = None, preset: str | None = None, sources: str = "scratch",
        labels: str = "100%", seeds: int = 3, epochs: int | None = None, strategy: str = "full",
        overrides: dict[str, Any] | None = None, folds: int = 0,
    ) -> StudyJob:  # fmt: skip
        """Start (or, in a ``study`` folder planned with the same settings, resume) a label-efficiency study of
        this dataset in a child process: every source at every label budget and seed (see :mod:`.study_logic`);
        ``folds`` K >= 2: patient-grouped K-fold cross-validation over every labeled case (``--folds``). A dataset
        labeled in Slicer gets a validation split first, as for fine-tuning."""
        ds = self.require_dataset()
        if self.study_job is not None and not self.study_job.poll().finished:
            raise MedTuneError("a study is already in progress; cancel it first")
        folder = Path(study) if study and str(study).strip() else (
            ds.root / STUDIES_DIR / f"study_{time.strftime('%Y%m%d_%H%M%S')}")  # fmt: skip
        settings = StudySettings(
            ds.root, folder, preset=preset or self.default_preset(), sources=sources, labels=labels,
            seeds=int(seeds), epochs=epochs, strategy=strategy, overrides=dict(overrides or {}), folds=int(folds),
        )  # fmt: skip
        settings.check()  # one line before anything is written
        ensure_validation_split(ds.root)
        self.study_job = StudyJob(settings, self.python)
        self.study_job.start()
        self._study_reported = False
        return self.study_job

    def cancel_study(self) -> None:
        if self.study_job is not None:
            self.study_job.cancel()

    # ------------------------------------------------------------------------------------------- export

    def start_export(self, run: str | Path | None = None, precision: str = "fp32") -> ExportJob:
        """Export a run (default: this session's last run) into ``<dataset>/models/<run>_<precision>/``."""
        run = Path(run) if run else (self.job.run_dir if self.job is not None else None)
        if run is None:
            raise MedTuneError("fine-tune first (or choose a run folder)")
        out = self.require_dataset().root / MODELS_DIR / f"{run.name}_{precision}"
        self.export_job = ExportJob(run, out, precision, self.python).start()
        return self.export_job

    def poll_export(self) -> ExportResult | None:
        """``None`` while exporting; the result (also made the current model) when done."""
        if self.export_job is None:
            return None
        result = self.export_job.poll()
        if result is not None:
            self.set_model(result.model_dir / "model.onnx")
            self.export_job = None
        return result

    # ---------------------------------------------------------------------------------------------- run

    def set_model(self, path: str | Path | None) -> None:
        """Choose the ONNX model used by Run, pre-fill and the uncertainty queue (``None``: no model)."""
        self.model_path = Path(path) if path else None

    def model_sha(self) -> str | None:
        """sha256 of the current model file (cached by modification time; no onnxruntime session)."""
        from medtune.runtime.model import file_sha256

        if self.model_path is None or not self.model_path.is_file():
            return None
        mtime = self.model_path.stat().st_mtime
        if self._model_sha is None or self._model_sha[:2] != (self.model_path, mtime):
            self._model_sha = (self.model_path, mtime, file_sha256(self.model_path))
        return self._model_sha[2]

    def set_provider(self, provider: str) -> None:
        """The inference provider (``auto | cpu | cuda | tensorrt``) for every model this session opens."""
        from medtune.runtime.providers import CHOICES

        if provider not in CHOICES:
            raise MedTuneError(f"unknown provider {provider!r} (choose one of: {', '.join(CHOICES)})")
        self.provider = provider

    def start_run(self, volume: Any, provider: str | None = None) -> RunTask:
        """Run the current model on ``volume`` in a worker thread; finish with :meth:`finish_run`."""
        if self.model_path is None:
            raise MedTuneError("choose an ONNX model (model.onnx) first")
        if provider is not None:
            self.set_provider(provider)
        self.run_task = RunTask(volume, self.model_path, self.provider).start()
        return self.run_task

    def finish_run(self) -> RunResult | None:
        """``None`` while running; the result node (in the scene) when done."""
        if self.run_task is None or not self.run_task.done():
            return None
        task, self.run_task = self.run_task, None
        return task.finish()

    # ---------------------------------------------------------------------------------- background work

    def start_prefill(self, provider: str | None = None) -> list[str]:
        """Predict the unlabeled cases the current model has not seen, in the labeling worker; returns their ids."""
        ds = self.require_dataset()
        if provider is not None:
            self.set_provider(provider)
        sha = self.model_sha()
        if sha is None or (self.prefill_future is not None and not self.prefill_future.done()):
            return []
        missing = missing_predictions(ds, sha)
        if missing:
            path, provider = self.model_path, self.provider
            assert path is not None  # model_sha() is None without a model file
            self.prefill_future = self._label_worker.submit(
                lambda: len(prefill(ds, missing, self._worker_model(path, provider)))
            )
        return missing

    def busy(self) -> bool:
        """True while any background work (child process or worker thread) is running."""
        return bool(
            (self.job is not None and self.job.process is not None and self.job.process.poll() is None)
            or (self.study_job is not None and self.study_job.process is not None
                and self.study_job.process.poll() is None)
            or self.export_job is not None
            or self.run_task is not None
            or self.prefill_future is not None
            or self.case_future is not None
        )

    def poll(self) -> PollReport:
        """One UI-timer tick: progress of every running job, finished results, and errors (each once)."""
        report, errors = PollReport(), []
        if self.job is not None:
            report.finetune = self.job.poll()
            if report.finetune.status == "failed" and not self._finetune_reported:
                errors.append(f"Fine-tuning failed: {report.finetune.error or 'see ' + str(self.job.log_path)}")
            self._finetune_reported = self._finetune_reported or report.finetune.finished
        if self.study_job is not None:
            report.study = self.study_job.poll()
            if report.study.status == "failed" and not self._study_reported:
                errors.append(f"Study failed: {report.study.error or 'see ' + str(self.study_job.log_path)}")
            self._study_reported = self._study_reported or report.study.finished
        try:
            report.export_result = self.poll_export()
        except MedTuneError as exc:
            self.export_job = None
            errors.append(f"Export failed: {exc}")
        try:
            report.run_result = self.finish_run()
        except Exception as exc:  # noqa: BLE001 - the worker's error, shown once
            self.run_task = None
            errors.append(f"Run failed: {exc}")
        if self.prefill_future is not None and self.prefill_future.done():
            future, self.prefill_future = self.prefill_future, None
            try:
                report.prefilled = future.result()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"Pre-fill failed: {exc}")
        if self.case_future is not None and self.case_future.done():
            future, self.case_future = self.case_future, None
            try:
                report.case_ready = future.result()
                report.all_labeled = report.case_ready is None
            except Exception as exc:  # noqa: BLE001
                errors.append(f"Preparing the case failed: {exc}")
        report.errors = errors
        report.busy = self.busy()
        return report
