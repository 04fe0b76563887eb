"""Dataset folder <-> MRML scene: import volumes and segmentations as cases, load them back, save labels.

Geometry: a Slicer volume node's IJKToRAS matrix maps voxel indices (i, j, k) to RAS millimetres, and a NIfTI
affine maps (i, j, k) to the same RAS+ "scanner" space, so the node's IJKToRAS *is* the NIfTI affine (no
LPS flip; the flip only applies to DICOM/ITK/NRRD LPS conventions). VTK image arrays are stored k-fastest-last
``(k, j, i)``; NIfTI data here is ``(i, j, k)``, hence the transposes. The NIfTI sform/qform hold float32, so
a written affine equals the node's IJKToRAS to float32 precision.

Statuses: ``labeled`` (the datalist entry names a label file), ``predicted`` (no label, but
``predictions/<case_id>.nii.gz`` exists, e.g. written by the Run panel to pre-fill labeling), ``unlabeled``.
Unlabeled cases live in the ``testing`` split; saving labels moves them to ``training`` (a labeled case keeps
its split). Classification datasets hold one class value per case (the class picker): 3D datasets store
NIfTI volumes, 2D datasets PNG slices; a prediction is ``predictions/<case_id>.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

import numpy as np

from medtune.atomic import keep_previous_version, write_with
from medtune.data.contract import (
    DATASET_JSON,
    VERSIONS_DIR,
    add_case,
    create_dataset,
    read_datalist,
    read_dataset_json,
    write_datalist,
)
from medtune.errors import MedTuneError

PREDICTIONS_DIR = "predictions"


class DatasetLogic:
    """One MedTune dataset folder seen from a Slicer scene (segmentation task, 3D volumes)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.meta = read_dataset_json(self.root)

    # ------------------------------------------------------------------------------------------ dataset

    @classmethod
    def create_or_open(
        cls,
        root: str | Path,
        task: str = "segmentation",
        labels: dict[int, str] | None = None,
        *,
        name: str | None = None,
        modality: str = "CT",
        spatial_dims: int = 3,
        **kwargs: Any,
    ) -> DatasetLogic:
        """Open ``root`` if it holds a ``dataset.json`` (its task must match), else create it."""
        root = Path(root)
        if (root / DATASET_JSON).is_file():
            logic = cls(root)
            if logic.meta["task"] != task:
                raise MedTuneError(f"dataset task is {logic.meta['task']!r}, not {task!r}", root / DATASET_JSON)
            check_writable(root)
            return logic
        if not labels:
            raise MedTuneError("a new dataset needs its labels (value -> name)", root)
        check_writable(root)
        create_dataset(
            root,
            name=name or root.name,
            task=task,
            spatial_dims=spatial_dims,
            labels=labels,
            modality=modality,
            **kwargs,
        )
        return cls(root)

    @property
    def labels(self) -> dict[int, str]:
        """Declared label values -> names (``0`` is background)."""
        return self.meta["labels"]

    # -------------------------------------------------------------------------------------------- cases

    def list_cases(self) -> list[dict[str, str]]:
        """``[{"id", "status", "split"}]`` for every datalist entry, in datalist order."""
        cases = []
        for split, entry in self._entries():
            case_id = _case_id(entry["image"])
            if self.is_classification and "label" in entry or isinstance(entry.get("label"), str):
                status = "labeled"
            elif self._prediction_path(case_id).is_file():
                status = "predicted"
            else:
                status = "unlabeled"
            cases.append({"id": case_id, "status": status, "split": split})
        return cases

    def import_volume(self, volume_node: Any, segmentation_node: Any | None = None) -> str:
        """Write a scalar volume (and optionally its segmentation) as a new case; return its opaque id.

        The image goes to ``images/<id>.nii.gz`` with the node's IJKToRAS as affine; the segmentation is
        exported voxel for voxel on the volume's grid to ``labels/<id>.nii.gz`` (a segmentation drawn on another
        grid is refused). The datalist is updated atomically (``training`` with a label, ``testing`` without);
        on failure no file is left behind.
        """
        self._require_segmentation_task()
        image, affine = volume_to_array(volume_node)
        if segmentation_node is not None:
            check_segmentation_geometry(segmentation_node, volume_node)
        mask = self._segmentation_to_mask(segmentation_node, volume_node) if segmentation_node else None
        check_writable(self.root)
        split = "training" if mask is not None else "testing"
        entry = add_case(self.root, image, label=mask, split=split, affine=affine)  # the dataset contract's writer
        return _case_id(entry["image"])

    def import_dicom_series(self, folder: str | Path, series_instance_uid: str | None = None) -> str:
        """Write a DICOM image series (read by the runtime's reader, RAS+ geometry) as a new unlabeled case.

        Values are the rescaled ones (slope/intercept applied), stored as int16 when they are integers that fit.
        No DICOM header field (names, ids, dates) is copied into the dataset.
        """
        from medtune.runtime.dicom import read_dicom_series

        self._require_segmentation_task()
        series = read_dicom_series(folder, series_instance_uid)
        array = series.array
        if np.array_equal(array, np.round(array)) and array.min() >= -32768 and array.max() <= 32767:
            array = array.astype(np.int16)
        check_writable(self.root)
        return _case_id(add_case(self.root, array, split="testing", affine=series.affine)["image"])

    def load_case(self, case_id: str, scene: Any | None = None) -> tuple[Any, Any | None]:
        """Load a case into ``scene`` (default ``slicer.mrmlScene``): ``(volume_node, segmentation_node | None)``.

        The segmentation comes from the label file, else from the prediction, with one segment per declared
        non-background label (named after it, empty when absent) so the Segment Editor can paint any class.
        """
        import slicer

        scene = scene or slicer.mrmlScene
        _, entry = self._find(case_id)
        if str(entry["image"]).lower().endswith(".png"):
            image, affine = read_png_slice(self.root / entry["image"])
        else:
            image, affine = read_nifti(self.root / entry["image"])
        volume = array_to_volume(scene, image, affine, case_id)
        if self.is_classification:
            return volume, None
        label = entry.get("label")
        path = self.root / label if isinstance(label, str) else self._prediction_path(case_id)
        if not path.is_file():
            return volume, None
        mask, mask_affine = read_nifti(path)
        if mask.shape != image.shape or not np.allclose(mask_affine, affine, atol=1e-4):
            raise MedTuneError(f"label grid {mask.shape} does not match its image {image.shape}", path)
        return volume, self._mask_to_segmentation(scene, mask, volume, f"{case_id} labels")

    def save_labels(self, case_id: str, segmentation_node: Any) -> Path:
        """Write the segmentation as ``labels/<id>.nii.gz`` atomically, keeping the previous file in ``.versions/``.

        An unlabeled (``testing``) case gets its label and moves to ``training``. Returns the label path.
        """
        self._require_segmentation_task()
        split, entry = self._find(case_id)
        image, affine = read_nifti(self.root / entry["image"])
        mask = self._segmentation_to_mask(segmentation_node, None, shape=image.shape, affine=affine, check=True)
        rel = f"labels/{case_id}.nii.gz"
        path = self.root / rel
        check_writable(path.parent)
        keep_previous_version(path, self.root / VERSIONS_DIR)
        write_with(path, lambda tmp: write_nifti(mask, affine, tmp))
        if entry.get("label") != rel:
            self._set_entry(split, case_id, {**entry, "label": rel})
        return path

    # ------------------------------------------------------------------------------------ classification

    @property
    def is_classification(self) -> bool:
        return self.meta["task"] == "classification"

    def class_choices(self) -> list[tuple[int, str]]:
        """``[(value, name)]`` for the class picker, in value order."""
        return sorted(self.labels.items())

    def get_class(self, case_id: str) -> int | None:
        """The case's class value, or ``None`` when unlabeled."""
        _, entry = self._find(case_id)
        label = entry.get("label")
        return int(label) if isinstance(label, int) else None

    def set_class(self, case_id: str, value: int) -> None:
        """Class picker: set the case's class (datalist written atomically, previous version kept)."""
        if not self.is_classification:
            raise MedTuneError("the class picker needs a classification dataset", self.root / DATASET_JSON)
        if int(value) not in self.labels:
            raise MedTuneError(f"class {value} is not one of {self.labels}", self.root / DATASET_JSON)
        split, entry = self._find(case_id)
        if entry.get("label") != int(value):
            check_writable(self.root)
            self._set_entry(split, case_id, {**entry, "label": int(value)})

    def import_image(self, volume_node: Any, class_value: int | None = None) -> str:
        """Classification: write the volume as a new case (NIfTI for 3D, PNG for a 2D dataset's single slice)."""
        if not self.is_classification:
            raise MedTuneError("import_image needs a classification dataset", self.root / DATASET_JSON)
        if class_value is not None and int(class_value) not in self.labels:
            raise MedTuneError(f"class {class_value} is not one of {self.labels}", self.root / DATASET_JSON)
        image, affine = volume_to_array(volume_node)
        check_writable(self.root)
        split, label = ("testing", None) if class_value is None else ("training", int(class_value))
        if self.meta["spatial_dims"] == 2:  # a PNG of the single slice (uint8 / uint16, values kept)
            entry = add_case(self.root, slice_pixels(image, volume_node.GetName()), label=label, split=split)
        else:
            entry = add_case(self.root, image, label=label, split=split, affine=affine)
        return _case_id(entry["image"])

    def new_label_segmentation(self, scene: Any, volume_node: Any, name: str) -> Any:
        """An empty segmentation node on the volume's grid with one segment per declared label (for labeling)."""
        self._require_segmentation_task()
        shape = volume_to_array(volume_node)[0].shape
        return self._mask_to_segmentation(scene, np.zeros(shape, np.uint8), volume_node, name)

    def _set_entry(self, split: str, case_id: str, entry: dict[str, Any]) -> None:
        """Replace the case's entry; a newly labeled ``testing`` case moves to ``training``."""
        data = read_datalist(self.root)
        target = "training" if split == "testing" and "label" in entry else split
        if target == split:
            data[split] = [entry if _same_case(e, case_id) else e for e in data[split]]
        else:
            data[split] = [e for e in data[split] if not _same_case(e, case_id)]
            data.setdefault(target, []).append(entry)
        write_datalist(self.root, {k: v for k, v in data.items() if v or k == "training"})

    # ----------------------------------------------------------------------------------------- internals

    def _require_segmentation_task(self) -> None:
        if self.meta["task"] != "segmentation" or self.meta["spatial_dims"] != 3:
            raise MedTuneError("volumes and segmentations need a 3D segmentation dataset", self.root / DATASET_JSON)

    def _entries(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for split, entries in read_datalist(self.root).items():
            for entry in entries:
                out.append((split, {"image": entry} if isinstance(entry, str) else entry))
        return out

    def find(self, case_id: str) -> tuple[str, dict[str, Any]]:
        """``(split, datalist entry)`` of a case; one-line error when it is not in the datalist."""
        return self._find(case_id)

    def segmentation_mask(self, segmentation_node: Any, volume_node: Any) -> np.ndarray:
        """The segmentation as dataset label values ``(i, j, k)`` on the volume's grid."""
        return self._segmentation_to_mask(segmentation_node, volume_node)

    def _find(self, case_id: str) -> tuple[str, dict[str, Any]]:
        for split, entry in self._entries():
            if _same_case(entry, case_id):
                return split, entry
        raise MedTuneError(f"case {case_id!r} is not in the datalist", self.root / "datalist.json")

    def _prediction_path(self, case_id: str) -> Path:
        suffix = ".json" if self.is_classification else ".nii.gz"
        return self.root / PREDICTIONS_DIR / f"{case_id}{suffix}"

    def _segment_values(self, segmentation_node: Any) -> tuple[list[str], list[int]]:
        """Segment ids and their label values.

        A segment maps to a label by its name (case-insensitive), else by the number ending its name or id
        (``label_2``, ``Segment_2``, ``2``) when that is a declared label, else, only if no segment used a
        number, by position. Two segments on one label, or a segment matching nothing, is an error.
        """
        import re

        segmentation = segmentation_node.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        by_name = {name.strip().lower(): value for value, name in self.labels.items()}
        foreground = sorted(v for v in self.labels if v != 0)
        names = [segmentation.GetSegment(seg_id).GetName().strip() for seg_id in ids]
        values: list[int | None] = []
        for seg_id, name in zip(ids, names, strict=True):
            value = by_name.get(name.lower())
            for text in (name, seg_id):
                match = re.search(r"(\d+)$", text)
                if value is None and match and int(match.group(1)) in foreground:
                    value = int(match.group(1))
            values.append(value)
        unmatched = [i for i, v in enumerate(values) if v is None]
        if unmatched and len(ids) <= len(foreground) and all(v is None for v in values):
            resolved = foreground[: len(ids)]  # unnamed segments: by position
        elif unmatched:
            raise MedTuneError(
                f"segment {names[unmatched[0]]!r} matches no label of {self.labels} (name it after one)",
                self.root / DATASET_JSON,
            )
        else:
            resolved = [int(v) for v in values if v is not None]  # every segment matched a label
        seen: dict[int, str] = {}
        for name, value in zip(names, resolved, strict=True):
            if value in seen:
                raise MedTuneError(f"segments {seen[value]!r} and {name!r} both map to label {value}")
            seen[value] = name
        return ids, resolved

    def _segmentation_to_mask(
        self,
        segmentation_node: Any,
        reference_volume: Any | None,
        shape: tuple[int, ...] | None = None,
        affine: np.ndarray | None = None,
        check: bool = False,
    ) -> np.ndarray:
        """Label map ``(i, j, k)`` uint8/int16 on the reference grid (a volume node, or ``shape`` + ``affine``)."""
        import slicer

        scene = segmentation_node.GetScene()
        temp_ref = None
        if reference_volume is None:
            if shape is None or affine is None:
                raise ValueError("give a reference volume, or the grid's shape and affine")
            temp_ref = array_to_volume(scene, np.zeros(shape, np.uint8), affine, "MedTune reference")
            reference_volume = temp_ref
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MedTune export")
        try:
            if check:
                check_segmentation_geometry(segmentation_node, reference_volume)
            ids, values = self._segment_values(segmentation_node)
            mask_shape = volume_to_array(reference_volume)[0].shape
            out_dtype = np.uint8 if max(self.labels) < 256 and min(self.labels) >= 0 else np.int16
            if not ids:
                return np.zeros(mask_shape, out_dtype)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
            )
            if not ok:
                raise MedTuneError(f"could not export segmentation {segmentation_node.GetName()!r} to a label map")
            exported, _ = volume_to_array(labelmap)
            if exported.shape != mask_shape:
                raise MedTuneError(f"exported label map {exported.shape} is not on the volume grid {mask_shape}")
            lut = np.zeros(len(ids) + 1, np.int64)
            lut[1:] = values  # export writes segment n (0-based) as value n + 1
            return lut[exported.astype(np.int64)].astype(out_dtype)
        finally:
            scene.RemoveNode(labelmap)
            if temp_ref is not None:
                scene.RemoveNode(temp_ref)

    def _mask_to_segmentation(self, scene: Any, mask: np.ndarray, volume: Any, name: str) -> Any:
        import slicer.util

        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentation = node.GetSegmentation()
        for value in sorted(v for v in self.labels if v != 0):
            seg_id = segmentation.AddEmptySegment(f"label_{value}", self.labels[value], label_color(scene, value))
            binary = np.ascontiguousarray((mask == value).transpose(2, 1, 0).astype(np.uint8))
            if binary.any():
                slicer.util.updateSegmentBinaryLabelmapFromArray(binary, node, seg_id, volume)
        return node


# ---------------------------------------------------------------------------------------- node <-> array


def parse_labels(text: str, background: bool = True) -> dict[int, str]:
    """``"1: liver, 2: tumor"`` -> ``{0: "background", 1: "liver", 2: "tumor"}`` (empty text -> ``{}``).

    ``background=False`` (classification: every value is a class) adds no ``0``.
    """
    labels: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        value, sep, name = part.partition(":")
        if not sep or not value.strip().lstrip("-").isdigit() or not name.strip():
            raise MedTuneError(f"label {part!r} is not 'value: name'")
        if int(value) in labels:
            raise MedTuneError(f"label value {int(value)} is given twice")
        labels[int(value)] = name.strip()
    if background and labels and 0 not in labels:
        labels[0] = "background"
    return dict(sorted(labels.items()))


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and prove it accepts a new file; a one-line error otherwise."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".medtune-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MedTuneError(f"dataset folder is not writable ({reason}); nothing was changed", folder) from exc


def check_segmentation_geometry(segmentation_node: Any, volume_node: Any, atol: float = 1e-3) -> None:
    """Refuse a segmentation whose labelmaps are not on the volume's voxel grid (spacing, axes, voxel offset)."""
    import vtk

    volume_matrix = ijk_to_ras(volume_node)
    dims = np.array(volume_node.GetImageData().GetDimensions())
    segmentation = segmentation_node.GetSegmentation()
    name = segmentation_node.GetName()
    if segmentation_node.GetParentTransformNode() is not None:
        raise MedTuneError(f"segmentation {name!r} is under a transform; harden the transform first")
    for n in range(segmentation.GetNumberOfSegments()):
        rep = segmentation.GetNthSegment(n).GetRepresentation("Binary labelmap")
        if rep is None:
            continue
        extent = rep.GetExtent()
        if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
            continue  # empty segment
        matrix = vtk.vtkMatrix4x4()
        rep.GetImageToWorldMatrix(matrix)
        seg_matrix = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        seg_to_volume = np.linalg.solve(volume_matrix, seg_matrix)  # segmentation ijk -> volume ijk
        if not np.allclose(seg_to_volume[:3, :3], np.eye(3), atol=atol):
            spacing = np.linalg.norm(seg_matrix[:3, :3], axis=0).round(4).tolist()
            vspacing = np.linalg.norm(volume_matrix[:3, :3], axis=0).round(4).tolist()
            raise MedTuneError(
                f"segmentation {name!r} is on another grid (spacing {spacing} or axes differ from the volume's "
                f"{vspacing}); resample it to the volume first"
            )
        shift = seg_to_volume[:3, 3]
        if not np.allclose(shift, np.round(shift), atol=atol):
            raise MedTuneError(f"segmentation {name!r} is shifted by a fraction of a voxel from the volume")
        lo = np.array(extent[0::2]) + np.round(shift)
        hi = np.array(extent[1::2]) + np.round(shift)
        if (lo < 0).any() or (hi > dims - 1).any():
            raise MedTuneError(f"segmentation {name!r} extends outside the volume {tuple(dims)}")


def slice_pixels(image: np.ndarray, name: str) -> np.ndarray:
    """A single-slice volume ``(i, j, 1)`` as PNG pixels ``(rows, cols)`` (uint8 or uint16, values kept)."""
    if image.ndim != 3 or image.shape[2] != 1:
        raise MedTuneError(f"volume {name!r} has {image.shape[2]} slices; a 2D dataset takes single-slice images")
    pixels = image[:, :, 0].T
    if np.issubdtype(pixels.dtype, np.floating) and not np.array_equal(pixels, np.round(pixels)):
        raise MedTuneError(f"volume {name!r} holds non-integer values; PNG stores integers only")
    if pixels.min() < 0 or pixels.max() > 65535:
        raise MedTuneError(f"volume {name!r} values {pixels.min()}..{pixels.max()} do not fit a PNG (0..65535)")
    return pixels.astype(np.uint8 if pixels.max() < 256 else np.uint16)


def read_png_slice(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A grayscale PNG as a single-slice volume ``(i=cols, j=rows, 1)`` with an identity affine."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("L") if im.mode not in ("L", "I;16", "I") else im)
    except Exception as exc:  # noqa: BLE001 - Pillow raises several types
        raise MedTuneError(f"cannot read PNG ({exc})", path) from exc
    return np.ascontiguousarray(pixels.T[:, :, None]), np.eye(4)


def _case_id(image_rel: str) -> str:
    return Path(image_rel).name.split(".")[0]


def _same_case(entry: Any, case_id: str) -> bool:
    image = entry if isinstance(entry, str) else entry.get("image", "")
    return _case_id(image) == case_id


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    """The node's IJKToRAS matrix as a 4x4 float64 array (= its NIfTI affine)."""
    import slicer.util
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volume_to_array(volume_node: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(array (i, j, k), IJKToRAS affine)`` of a single-component volume node (a copy)."""
    import slicer.util

    image_data = volume_node.GetImageData()
    if image_data is None:
        raise MedTuneError(f"volume {volume_node.GetName()!r} has no image data")
    if volume_node.GetParentTransformNode() is not None:
        raise MedTuneError(f"volume {volume_node.GetName()!r} is under a transform; harden the transform first")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise MedTuneError(f"volume {volume_node.GetName()!r} has several components (expected a scalar volume)")
    kji = slicer.util.arrayFromVolume(volume_node)  # a view of VTK's memory, (k, j, i)
    return np.ascontiguousarray(kji.transpose(2, 1, 0)), ijk_to_ras(volume_node)


def array_to_volume(scene: Any, array: np.ndarray, affine: np.ndarray, name: str) -> Any:
    """A new scalar volume node in ``scene`` holding ``array`` (i, j, k) with IJKToRAS ``affine``.

    Not ``slicer.util.addVolumeFromArray``: it adds to the global ``slicer.mrmlScene`` (this takes the scene: the
    Studio's and the tests' own), and its ``updateVolumeFromArray`` refuses int64 arrays, which NIfTI files hold."""
    import slicer.util
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    if array.ndim != 3:
        raise MedTuneError(f"expected a 3D array, got shape {array.shape}")
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*array.shape)
    scalars = numpy_to_vtk(np.ascontiguousarray(array.transpose(2, 1, 0)).ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(affine, dtype=np.float64)))
    node.SetAndObserveImageData(image_data)
    node.CreateDefaultDisplayNodes()  # grey colour table, auto window/level: shows like a loaded volume
    return node


# Slicer's GenericAnatomyColors when the scene has it (the app), else these (its first entries' hues)
_PALETTE = (
    (0.50, 0.68, 0.50), (0.95, 0.84, 0.57), (0.69, 0.48, 0.39), (0.44, 0.66, 0.82), (0.85, 0.40, 0.34),
    (0.78, 0.60, 0.85), (0.90, 0.72, 0.25), (0.30, 0.55, 0.45), (0.87, 0.55, 0.62), (0.55, 0.55, 0.80),
)  # fmt: skip


def label_color(scene: Any, value: int) -> tuple[float, float, float]:
    """The display colour of label ``value``: the same value always gets the same colour in every panel."""
    table = scene.GetFirstNodeByName("GenericAnatomyColors") if scene is not None else None
    if table is not None and 0 < value < table.GetNumberOfColors():
        rgba = [0.0, 0.0, 0.0, 0.0]
        if table.GetColor(int(value), rgba):
            return (rgba[0], rgba[1], rgba[2])
    return _PALETTE[(int(value) - 1) % len(_PALETTE)]


# ------------------------------------------------------------------------------------------------ NIfTI


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write ``array`` (i, j, k) as gzipped NIfTI-1 with RAS ``affine`` as sform and qform (scanner, mm)."""
    from medtune.nifti import save_nifti

    save_nifti(array, path, affine, scanner=True)


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array (i, j, k) in its stored dtype, RAS affine)`` of a 3D NIfTI file."""
    import nibabel as nib

    try:
        img = cast("SpatialImage", nib.load(str(path)))  # a NIfTI image: nibabel types load() as FileBasedImage
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise MedTuneError(f"cannot read NIfTI ({exc})", path) from exc
    array = np.asarray(img.dataobj)
    if array.ndim != 3:
        raise MedTuneError(f"expected a 3D image, got shape {array.shape}", path)
    return array, np.asarray(img.affine, dtype=np.float64)
