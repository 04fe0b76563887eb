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

from .dataset_logic import volume_to_array


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


def volume_for_runtime(volume_node: Any) -> Any:
    """The runtime's ``Volume`` (channel-first float32, the node's IJKToRAS as affine) for a scalar volume node."""
    from medtune.runtime.volume import Volume

    array, affine = volume_to_array(volume_node)
    if not np.all(np.isfinite(array)):
        raise MedTuneError(f"volume {volume_node.GetName()!r} holds NaN or Inf values")
    return Volume(np.ascontiguousarray(array[None], dtype=np.float32), affine, None, volume_node.GetName())


def segment_volume_node(model: Any, volume_node: Any) -> tuple[np.ndarray, float]:
    """``(label map (i, j, k), mean entropy)`` of a volume node with a 3D segmentation model."""
    from medtune.runtime.segment import segment_volume

    if model.task != "segmentation":
        raise MedTuneError(f"model task is {model.task!r}; use classify_volume_node", model.path)
    return segment_volume(model, volume_for_runtime(volume_node), f"volume {volume_node.GetName()!r}")


def classify_volume_node(model: Any, volume_node: Any) -> dict[str, float]:
    """Class probabilities of a volume node: a 2D classifier needs a single-slice volume, a 3D one a volume."""
    from medtune.runtime.readers import ImageData

    array, affine = volume_to_array(volume_node)  # (i, j, k)
    where = f"volume {volume_node.GetName()!r}"
    if model.spatial_dims == 2:
        singleton = [axis for axis, n in enumerate(array.shape) if n == 1]
        if not singleton:
            raise MedTuneError(f"the model is 2D but the volume has {array.shape[2]} slices; select a 2D image", where)
        # (i, j, k) with one singleton axis -> (rows, cols): rows run along j, columns along i (PNG/DICOM order)
        image = np.squeeze(array, axis=singleton[-1]).T if singleton[-1] == 2 else np.squeeze(array, singleton[-1])
        data = ImageData(np.asarray(image, np.float32)[None])
    else:
        data = ImageData(np.asarray(array, np.float32)[None], affine=affine)
    x = model.preprocess(data, where)
    probs = model.probabilities(model.predict_batch(x[None]))[0]
    return {name: float(p) for name, p in zip(model.labels, probs, strict=True)}


def run_on_volume(volume_node: Any, model_path: str | Path, provider: str = "auto", threads: int | None = None,
                  name: str | None = None) -> RunResult:  # fmt: skip
    """Run the model on the volume and add the result to the volume's scene (segmentation or table node)."""
    if volume_node is None:
        raise MedTuneError("select a volume to run the model on")
    if volume_node.GetImageData() is None:
        raise MedTuneError(f"volume {volume_node.GetName()!r} has no image data; load or select another volume")
    model = load_model(model_path, provider, threads)
    scene = volume_node.GetScene()
    name = name or f"{volume_node.GetName()} {Path(model.path).parent.name or 'model'}"
    if model.task == "segmentation":
        labels, entropy = segment_volume_node(model, volume_node)
        names = dict(zip(model.label_values, model.labels, strict=True))
        node = labelmap_to_segmentation(scene, labels, volume_node, names, name)
        return RunResult("segmentation", node, model.provider, model.provider_message, entropy, labels=labels)
    probs = classify_volume_node(model, volume_node)
    node = probabilities_table(scene, probs, name)
    p = np.clip(np.array(list(probs.values())), 1e-12, 1.0)
    entropy = float(-(p * np.log(p)).sum() / np.log(len(p))) if len(p) > 1 else 0.0
    return RunResult("classification", node, model.provider, model.provider_message, entropy, probabilities=probs)


def labelmap_to_segmentation(scene: Any, labels: np.ndarray, volume_node: Any, names: dict[int, str], name: str) -> Any:
    """A segmentation node on the volume's geometry with one segment per non-zero label value in ``names``."""
    import slicer.util

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = node.GetSegmentation()
    kji = np.asarray(labels).transpose(2, 1, 0)
    for value in sorted(v for v in names if v != 0):
        seg_id = segmentation.AddEmptySegment(f"label_{value}", names[value])
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
        return (
            f"exported {exp.get('precision', 'fp32')} ONNX to {self.model_dir}: parity on {p.get('n_samples', '?')} "
            f"real inputs, max abs error {p.get('max_abs_error', float('nan')):.2e} (allowed "
            f"{p.get('allowed_abs_error', float('nan')):.2e}), argmax agreement {p.get('argmax_agreement', '?')}"
        )


def export_command(run: str | Path, out: str | Path, precision: str = "fp32", python: str | None = None) -> list[str]:
    """The argv of ``python -m medtune export`` for a run folder."""
    return [python or sys.executable, "-m", "medtune", "export", "--run", str(run), "--out", str(out),
            "--precision", precision]  # fmt: skip


def export_run_folder(run: str | Path, out: str | Path, precision: str = "fp32", python: str | None = None,
                      timeout: float = 1800.0) -> ExportResult:  # fmt: skip
    """Export a run (child process; blocking). A failed parity gate or bad run is raised as a one-line error."""
    run, out = Path(run), Path(out)
    if not (run / "model.pt").is_file():
        raise MedTuneError("run folder has no model.pt (fine-tune first)", run)
    proc = subprocess.run(export_command(run, out, precision, python), capture_output=True, text=True,  # noqa: S603
                          timeout=timeout, check=False)  # fmt: skip
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise MedTuneError(lines[-1] if lines else f"export exited with code {proc.returncode}", run)
    sidecar = json.loads((out / "model.json").read_text(encoding="utf-8"))
    return ExportResult(out, sidecar)
