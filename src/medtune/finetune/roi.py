"""The 3D segmentation patch (training crop and sliding-window ROI) derived from the dataset, as nnU-Net does.

``roi_size: "auto"`` (the 3D segmentation preset's default): per axis, the median image shape of the dataset's
training split, in the orientation (RAS) and voxel spacing the preset's transforms give the network, rounded
down to the network's size multiple and capped at ``roi_size_max`` (at least the smallest input the network
takes). So MSD Hippocampus (median 35x50x35 voxels at 1 mm) trains on 32x48x32 patches with ``unet_zoo``, and a
spleen CT resampled to 1.5 mm on up to 96^3. A list is used as given. The run records the result as
``patch_size`` (``run.json``), so evaluate / export / resume use the same size without reading the data again.

Only the image headers are read (nibabel; other formats through MONAI's reader). Written here because neither
MONAI nor nibabel has a "median shape after resampling" helper; nnU-Net's planner does more (memory budget,
anisotropy), which this does not try to copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtune.errors import MedTuneError

AUTO = "auto"
#: rounding multiple when the architecture is unknown (every 3D network MedTune ships takes multiples of 32)
DEFAULT_MULTIPLE = 32


def image_shape_ras(path: str | Path, spacing: Sequence[float] | None = None) -> tuple[float, float, float]:
    """Spatial shape of a 3D image in RAS axis order, resampled to ``spacing`` mm when given (from the header)."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img: Any = nib.load(str(path))
            shape = [float(s) for s in img.shape[:3]]
            zooms = [float(z) for z in img.header.get_zooms()[:3]]
            ras_shape, ras_zooms = [0.0] * 3, [0.0] * 3
            for i, (axis, _flip) in enumerate(nib.io_orientation(img.affine)):  # per voxel axis: (RAS axis, flip)
                ras_shape[int(axis)], ras_zooms[int(axis)] = shape[i], zooms[i]
        else:
            from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

            vol: Any = Orientation(axcodes="RAS")(EnsureChannelFirst()(LoadImage(image_only=True)(str(path))))
            ras_shape = [float(s) for s in vol.shape[1:4]]
            ras_zooms = [float(z) for z in vol.pixdim[:3]]
    except Exception as exc:  # noqa: BLE001 - any unreadable header: one line naming the file
        raise MedTuneError(f"cannot read the image shape ({type(exc).__name__}: {str(exc)[:120]})", path) from exc
    if len(ras_shape) != 3:
        raise MedTuneError("not a 3D image", path)
    if spacing is None:
        return (float(ras_shape[0]), float(ras_shape[1]), float(ras_shape[2]))
    # MONAI's Spacing keeps the extent between the first and last voxel centres: (n - 1) * zoom / pixdim + 1
    triples = zip(ras_shape, ras_zooms, spacing, strict=True)
    x, y, z = ((float(n) - 1.0) * float(d) / float(t) + 1.0 for n, d, t in triples)
    return (x, y, z)


def median_shape(images: Sequence[str | Path], spacing: Sequence[float] | None = None) -> list[float]:
    """Per-axis median of :func:`image_shape_ras` over ``images``."""
    import statistics

    if not images:
        raise MedTuneError("roi_size auto needs at least one training image")
    shapes = [image_shape_ras(p, spacing) for p in images]
    return [float(statistics.median(s[i] for s in shapes)) for i in range(3)]


def round_roi(shape: Sequence[float], multiple: int, cap: int, smallest: Sequence[int] = ()) -> list[int]:
    """Each side rounded down to ``multiple``, at most ``cap`` (itself rounded down) and at least ``smallest``."""
    multiple = max(1, int(multiple))
    top = max(multiple, (int(cap) // multiple) * multiple)
    low = list(smallest) or [multiple] * len(shape)
    out = []
    for side, lo in zip(shape, low, strict=True):
        side_m = (math.floor(float(side)) // multiple) * multiple
        out.append(int(min(top, max(lo, multiple, side_m))))
    return out


def auto_patch_size(
    roi_size: Any,
    dataset_dir: str,
    arch: str | None = None,
    spacing: Sequence[float] | None = None,
    roi_size_max: int = 96,
) -> list[int]:
    """The preset's ``patch_size``: ``roi_size`` as given (a list of 3 ints) or derived from the data (``"auto"``)."""
    if isinstance(roi_size, str) and roi_size == AUTO:
        from medtune.finetune.bundle_glue import datalist
        from medtune.weights import get_architecture

        # a multi-channel entry lists one file per channel, all of one shape: the first stands for the case
        images = [im[0] if isinstance(im, list) else im for im in (it["image"] for it in datalist(dataset_dir))]
        smallest: tuple[int, ...] = ()
        multiple = DEFAULT_MULTIPLE
        try:
            spec = get_architecture(arch) if arch else None
        except MedTuneError:
            spec = None  # an arch the registry does not know (e.g. a zoo bundle's): the safe multiple
        if spec is not None:
            multiple = max(int(spec.size_multiple), 1)
            smallest = spec.smallest_input(3) if spec.min_input else ()
        return round_roi(median_shape(images, spacing), multiple, int(roi_size_max), smallest)
    if (
        isinstance(roi_size, (list, tuple))
        and len(roi_size) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in roi_size)
    ):
        return [int(s) for s in roi_size]
    raise MedTuneError(f"roi_size must be 'auto' or 3 positive integers, got {roi_size!r}")
