"""Run panel and Export panel logic: an exported ONNX model on a Slicer volume, results back into the scene.

Inference uses MedTune's torch-free runtime (onnxruntime + numpy): provider ``auto | cpu | cuda | tensorrt``,
falling back to CPU with a one-line message when no GPU is usable. Segmentation results become a segmentation
node whose reference geometry is the volume's (one segment per model label, named from the sidecar);
classification results become a table node of class probabilities. Export runs ``python -m medtune export``
as a child process (it needs torch; Slicer's process does not).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtune.errors import MedTuneError
from medtune.runfolder import BEST_MODEL

from .dataset_logic import label_color, volume_to_array


@dataclass
class RunResult:
    """What one model run produced: the new node, label map or probabilities, entropy and the provider used."""

    task: str
    node: Any
    provider: str
    provider_message: str
    mean_entropy: float
    labels: np.ndarray | None = None  # (i, j, k) uint8 label values, segmentation only
    probabilities: dict[str, float] = field(default_factory=dict)  # classification only
    volume: Any = None  # the volume node the model ran on


def load_model(model_path: str | Path, provider: str = "auto", threads: int | None = None) -> Any:
    """Open ``model.onnx`` (or its folder) with its sidecar checked (sha256, task) on the chosen provider."""
    from medtune.runtime.model import OnnxModel, read_model_sidecar
    from medtune.runtime.segment import load_volume_model

    path = Path(model_path)
    onnx_path = path / "model.onnx" if path.is_dir() else path
    if not onnx_path.is_file():
        raise MedTuneError("ONNX model file not found", onnx_path)
    task = read_model_sidecar(onnx_path).get("task")
    if task == "segmentation":
        return load_volume_model(onnx_path, provider, threads)
    return OnnxModel.load(onnx_path, provider, threads)


def probability_entropy(probs: Any) -> float:
    """Normalized entropy (0 certain .. 1 uniform) of one class-probability vector."""
    p = np.clip(np.asarray(list(probs), np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum() / np.log(len(p))) if len(p) > 1 else 0.0


def segment_array(model: Any, array: np.ndarray, affine: np.ndarray, where: str) -> tuple[np.ndarray, float]:
    """``(label map (i, j, k), mean entropy)`` of a scalar volume array with a 3D segmentation model."""
    from medtune.runtime.segment import segment_volume
    from medtune.runtime.volume import Volume

    if not np.all(np.isfinite(array)):
        raise MedTuneError(f"{where} holds NaN or Inf values")
    volume = Volume(np.ascontiguousarray(array[None], dtype=np.float32), affine, None, where)
    return segment_volume(model, volume, where)


def classify_array(model: Any, array: np.ndarray, affine: np.ndarray, where: str) -> dict[str, float]:
    """Class probabilities of a volume array ``(i, j, k)``: a 2D classifier needs a single slice."""
    from medtune.runtime.readers import ImageData

    if model.spatial_dims == 2:
        singleton = [axis for axis, n in enumerate(array.shape) if n == 1]
        if not singleton:
            raise MedTuneError(f"the model is 2D but the volume has {array.shape[2]} slices; select a 2D image", where)
        # (i, j, 1) -> (rows, cols): rows run along j, columns along i (the PNG/DICOM order of the 2D presets)
        image = np.squeeze(array, axis=singleton[-1]).T if singleton[-1] == 2 else np.squeeze(array, singleton[-1])
        data = ImageData(np.asarray(image, np.float32)[None])
    else:
        data = ImageData(np.asarray(array, np.float32)[None], affine=affine)
    x = model.preprocess(data, where)
    from medtune.runtime.tta import classification_probabilities  # the sidecar's test-time flips, if any

    probs = classification_probabilities(model, x[None])[0]
    return {name: float(p) for name, p in zip(model.labels, probs, strict=True)}


class RunTask:
    """A model run on a volume node that does not block the UI.

    The constructor (main thread) checks the volume and copies its voxels; :meth:`start` opens the model
    (a TensorRT engine build can take minutes) and runs onnxruntime in a worker thread (it releases the GIL);
    :meth:`done` is polled from a UI timer; :meth:`finish` (main thread) re-raises the worker's error or adds
    the result node to the volume's scene.
    """

    def __init__(self, volume_node: Any, model_path: str | Path, provider: str = "auto", threads: int | None = None,
                 name: str | None = None) -> None:  # fmt: skip
        if volume_node is None:
            raise MedTuneError("select a volume to run the model on")
        if volume_node.GetImageData() is None:
            raise MedTuneError(f"volume {volume_node.GetName()!r} has no image data; load or select another volume")
        self.volume_node = volume_node
        self.model_path, self.provider, self.threads = Path(model_path), provider, threads
        self.model: Any = None
        self.array, self.affine = volume_to_array(volume_node)
        self.where = f"volume {volume_node.GetName()!r}"
        self.name = name or f"{volume_node.GetName()} {self.model_path.parent.name or 'model'}"
        self._future: Any = None

    def _compute(self) -> Any:
        self.model = load_model(self.model_path, self.provider, self.threads)
        compute = segment_array if self.model.task == "segmentation" else classify_array
        return compute(self.model, self.array, self.affine, self.where)

    def start(self) -> RunTask:
        from concurrent.futures import ThreadPoolExecutor

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medtune-run")
        self._future = executor.submit(self._compute)
        executor.shutdown(wait=False)
        return self

    def done(self) -> bool:
        return self._future is not None and self._future.done()

    def finish(self) -> RunResult:
        """The result node in the scene (re-raises the worker's error as is)."""
        if self._future is None:
            self.start()
        output = self._future.result()
        scene = self.volume_node.GetScene()
        if scene is None:
            raise MedTuneError(f"{self.where} was removed from the scene while the model ran")
        model = self.model
        if model.task == "segmentation":
            labels, entropy = output
            names = dict(zip(model.label_values, model.labels, strict=True))
            node = labelmap_to_segmentation(scene, labels, self.volume_node, names, self.name)
            return RunResult("segmentation", node, model.provider, model.provider_message, entropy, labels=labels,
                             volume=self.volume_node)  # fmt: skip
        node = probabilities_table(scene, output, self.name)
        entropy = probability_entropy(output.values())
        return RunResult("classification", node, model.provider, model.provider_message, entropy,
                         probabilities=output, volume=self.volume_node)  # fmt: skip


def run_on_volume(volume_node: Any, model_path: str | Path, provider: str = "auto", threads: int | None = None,
                  name: str | None = None) -> RunResult:  # fmt: skip
    """Run the model on the volume (blocking) and add the result to the volume's scene."""
    return RunTask(volume_node, model_path, provider, threads, name).start().finish()


def labelmap_to_segmentation(scene: Any, labels: np.ndarray, volume_node: Any, names: dict[int, str], name: str) -> Any:
    """A segmentation node on the volume's geometry with one segment per non-zero label value in ``names``."""
    import slicer.util

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = node.GetSegmentation()
    kji = np.asarray(labels).transpose(2, 1, 0)
    for value in sorted(v for v in names if v != 0):
        seg_id = segmentation.AddEmptySegment(f"label_{value}", names[value], label_color(scene, value))
        binary = np.ascontiguousarray(kji == value, dtype=np.uint8)
        if binary.any():
            slicer.util.updateSegmentBinaryLabelmapFromArray(binary, node, seg_id, volume_node)
    return node


def probabilities_table(scene: Any, probabilities: dict[str, float], name: str) -> Any:
    """A table node with columns ``class`` and ``probability`` (one row per class, in model label order)."""
    import vtk

    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    classes = vtk.vtkStringArray()
    classes.SetName("class")
    values = vtk.vtkDoubleArray()
    values.SetName("probability")
    for cls, p in probabilities.items():
        classes.InsertNextValue(cls)
        values.InsertNextValue(p)
    table = table_node.GetTable()
    table.AddColumn(classes)
    table.AddColumn(values)
    table_node.Modified()
    return table_node


def table_to_dict(table_node: Any) -> dict[str, float]:
    """Read back a :func:`probabilities_table` node."""
    table = table_node.GetTable()
    classes, values = table.GetColumnByName("class"), table.GetColumnByName("probability")
    return {classes.GetValue(r): float(values.GetValue(r)) for r in range(table.GetNumberOfRows())}


# ------------------------------------------------------------------------------------------------ export


@dataclass
class ExportResult:
    """The exported model folder and the parity numbers from its sidecar."""

    model_dir: Path
    sidecar: dict[str, Any]

    @property
    def parity(self) -> dict[str, Any]:
        return (self.sidecar.get("export") or {}).get("parity") or {}

    def text(self) -> str:
        """One line for the Export panel."""
        p = self.parity
        exp = self.sidecar.get("export") or {}
        ens = self.sidecar.get("ensemble") or {}
        members, kind = ens.get("members"), "seed" if ens.get("kind") == "seeds" else "fold"
        what = f"ONNX ({members}-model {kind} ensemble)" if isinstance(members, int) else "ONNX"
        return (
            f"exported {exp.get('precision', 'fp32')} {what} to {self.model_dir}: parity on {p.get('n_samples', '?')} "
            f"real inputs, max abs error {p.get('max_abs_error', float('nan')):.2e} (allowed "
            f"{p.get('allowed_abs_error', float('nan')):.2e}), argmax agreement {p.get('argmax_agreement', '?')}"
        )


def export_command(run: str | Path, out: str | Path, precision: str = "fp32", python: str | None = None) -> list[str]:
    """The argv of ``python -m medtune export`` for a run folder."""
    return [python or sys.executable, "-m", "medtune", "export", "--run", str(run), "--out", str(out),
            "--precision", precision]  # fmt: skip


class ExportJob:
    """``medtune export`` in a child process; :meth:`poll` from a UI timer, :meth:`cancel` kills its tree."""

    def __init__(self, run: str | Path, out: str | Path, precision: str = "fp32", python: str | None = None) -> None:
        from .finetune_logic import crossval_folds, read_state

        self.run, self.out = Path(run), Path(out)
        if crossval_folds(self.run):  # a K-fold run: `medtune export` writes one ONNX averaging its K fold models
            if read_state(self.run).status != "completed":
                raise MedTuneError("the K-fold run has not completed (resume it first)", self.run)
        elif not (self.run / BEST_MODEL).is_file():
            raise MedTuneError(f"run folder has no {BEST_MODEL} (fine-tune first)", self.run)
        self.command = export_command(self.run, self.out, precision, python)
        self.process: subprocess.Popen | None = None
        self._log: Any = None

    def start(self) -> ExportJob:
        import tempfile

        from .child_job import spawn
        from .support import child_env

        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in poll()
        self.process = spawn(self.command, self._log, child_env())  # own process group: cancel kills the tree
        return self

    def poll(self) -> ExportResult | None:
        """``None`` while running; the result when done; a one-line :class:`MedTuneError` if export failed."""
        if self.process is None or self.process.poll() is None:
            return None
        self._log.seek(0)
        output = self._log.read().decode("utf-8", errors="replace")
        self._log.close()
        if self.process.returncode != 0:
            lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
            raise MedTuneError(lines[-1] if lines else f"export exited with code {self.process.returncode}", self.run)
        return ExportResult(self.out, json.loads((self.out / "model.json").read_text(encoding="utf-8")))

    def wait(self, timeout: float = 1800.0) -> ExportResult:
        if self.process is None:
            raise MedTuneError("export was not started", self.run)
        self.process.wait(timeout=timeout)
        result = self.poll()
        assert result is not None  # the process has ended: poll() returns its result or raises
        return result

    def cancel(self) -> None:
        from .child_job import kill_process_tree

        if self.process is not None and self.process.poll() is None:
            kill_process_tree(self.process)
