"""The module's state and panel actions without Qt: what the Widget's buttons and timers call.

One :class:`MedTuneSession` holds the open dataset, the case being labeled, the fine-tuning job, the export
job and the model used by the Run and Label panels. Every method either returns quickly or starts work
in a child process / worker thread that the Widget polls (``poll_*``), so the UI never blocks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from medtune.errors import MedTuneError

from .dataset_logic import DatasetLogic, parse_labels
from .finetune_logic import FinetuneJob, FinetuneSettings, ProgressState, can_resume, ensure_validation_split
from .labeling_logic import labeling_queue, load_for_labeling
from .run_logic import ExportJob, ExportResult, RunResult, RunTask, load_model

RUNS_DIR = "runs"
MODELS_DIR = "models"
DEFAULT_PRESET = {("segmentation", 3): "3d_segmentation", ("segmentation", 2): "2d_segmentation",
                  ("classification", 3): "3d_classification", ("classification", 2): "2d_classification"}  # fmt: skip


class MedTuneSession:
    """State shared by the five panels (Dataset, Label, Fine-tune, Export, Run)."""

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable  # in Slicer: PythonSlicer
        self.dataset: DatasetLogic | None = None
        self.case_id: str | None = None
        self.case_nodes: tuple[Any, Any] | None = None  # (volume, segmentation node or predicted class)
        self.job: FinetuneJob | None = None
        self.export_job: ExportJob | None = None
        self.run_task: RunTask | None = None
        self.model_path: Path | None = None
        self._model: Any = None

    # ------------------------------------------------------------------------------------------ dataset

    def open_dataset(self, path: str | Path, task: str = "segmentation", labels_text: str = "",
                     spatial_dims: int = 3) -> DatasetLogic:  # fmt: skip
        """Open a dataset folder, or create it with ``labels_text`` (``"1: liver, 2: tumor"``)."""
        if not str(path).strip():
            raise MedTuneError("choose a dataset folder")
        root = Path(path)
        if (root / "dataset.json").is_file():  # an existing dataset keeps its own task and labels
            task = DatasetLogic(root).meta["task"]
        self.dataset = DatasetLogic.create_or_open(root, task, parse_labels(labels_text), spatial_dims=spatial_dims)
        self.case_id, self.case_nodes = None, None
        return self.dataset

    def require_dataset(self) -> DatasetLogic:
        if self.dataset is None:
            raise MedTuneError("open a dataset first")
        return self.dataset

    def cases(self, use_model: bool = True) -> list[dict[str, Any]]:
        """Labeled cases, then the queue (most uncertain first when a model is set and ``use_model``)."""
        ds = self.require_dataset()
        queue = labeling_queue(ds, self.model() if use_model else None)
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
        """Load a case for labeling (pre-filled by the model when ``use_model`` and a model is set)."""
        ds = self.require_dataset()
        self.case_nodes = load_for_labeling(ds, case_id, scene, self.model() if use_model else None)
        self.case_id = case_id
        return self.case_nodes

    def next_case(self, scene: Any, use_model: bool = True) -> str | None:
        """Load the next case to label; ``None`` when every case is labeled."""
        queue = labeling_queue(self.require_dataset(), self.model() if use_model else None)
        if not queue:
            return None
        self.load_case(queue[0]["id"], scene, use_model)
        return queue[0]["id"]

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
        return f"{self.case_id}: labels saved to {path.name} (previous version kept)"

    # ----------------------------------------------------------------------------------------- finetune

    def new_run_dir(self) -> Path:
        stamp = time.strftime("%Y%m%d_%H%M%S")
        return self.require_dataset().root / RUNS_DIR / f"run_{stamp}"

    def default_preset(self) -> str:
        meta = self.require_dataset().meta
        return DEFAULT_PRESET[(meta["task"], int(meta["spatial_dims"]))]

    def start_finetune(self, settings: FinetuneSettings, resume: bool = False) -> FinetuneJob:
        """Start (or resume) fine-tuning in a child process; poll with :meth:`poll_finetune`."""
        if self.job is not None and not self.job.poll().finished:
            raise MedTuneError("a fine-tuning run is already in progress; cancel it first")
        if not resume:
            ensure_validation_split(settings.dataset)
        self.job = FinetuneJob(settings, self.python)
        self.job.start(resume=resume)
        return self.job

    def poll_finetune(self) -> ProgressState | None:
        return None if self.job is None else self.job.poll()

    def cancel_finetune(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def resumable_run(self) -> Path | None:
        """The last run of this session, or the newest run folder of the dataset, if it can be resumed."""
        candidates = [self.job.run_dir] if self.job is not None else []
        if self.dataset is not None and (self.dataset.root / RUNS_DIR).is_dir():
            candidates += sorted((self.dataset.root / RUNS_DIR).iterdir(), reverse=True)
        return next((c for c in candidates if can_resume(c)), None)

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
        self._model = None

    def model(self, provider: str = "auto") -> Any:
        if self.model_path is None:
            return None
        if self._model is None:
            self._model = load_model(self.model_path, provider)
        return self._model

    def start_run(self, volume: Any, provider: str = "auto") -> RunTask:
        """Run the current model on ``volume`` in a worker thread; finish with :meth:`finish_run`."""
        if self.model_path is None:
            raise MedTuneError("choose an ONNX model (model.onnx) first")
        self.run_task = RunTask(volume, self.model_path, provider).start()
        return self.run_task

    def finish_run(self) -> RunResult | None:
        """``None`` while running; the result node (in the scene) when done."""
        if self.run_task is None or not self.run_task.done():
            return None
        task, self.run_task = self.run_task, None
        return task.finish()
