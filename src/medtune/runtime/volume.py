"""3D volumes for segmentation (torch-free): NIfTI reading, model-space preprocessing and its inverse.

The ops mirror the MONAI evaluation transforms used in training (``medtune.finetune.transforms``):

- ``{"op": "orientation", "axcodes": "RAS"}``: MONAI ``Orientationd`` (same nibabel ``io_orientation`` /
  ``ornt_transform``; flips and axis permutations only, exact);
- ``{"op": "spacing", "pixdim": [...], "mode": "bilinear"}``: MONAI ``Spacingd`` (``diagonal=False``,
  ``scale_extent=False``, ``padding_mode="border"``): same output affine and shape (``zoom_affine`` and
  ``compute_shape_offset`` re-implemented), trilinear resampling with ``scipy.ndimage.affine_transform``
  (``order=1``, edge values extended). Differences: scipy interpolates in float64, MONAI's ``grid_sample`` in
  float32 (~1e-6 relative); ``mode="nearest"`` uses ``order=0`` whose rounding at exact .5 ties may differ;
- ``{"op": "ct_window", "a_min", "a_max", "b_min", "b_max"}``: ``ScaleIntensityRange(..., clip=True)``;
- ``{"op": "zscore", "nonzero": true, "channel_wise": true}``: ``NormalizeIntensity`` (population std,
  zero voxels stay 0 with ``nonzero``, a zero std divides by 1);
- ``{"op": "scale_intensity", "minv", "maxv"}``: ``ScaleIntensity`` (min-max over the whole volume);
- ``{"op": "normalize", "mean": [m], "std": [s]}``: ``(x - m) / s`` (MONAI ``NormalizeIntensity`` with a
  subtrahend and divisor: a pretrained source's statistics; one value for every channel, or one per channel).

:func:`from_model_space` undoes spacing (nearest neighbour) and orientation so a label map lands in the
input's exact voxel grid (same shape and affine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

import numpy as np

from medtune.errors import MedTuneError, one_line
from medtune.runtime.preprocess import normalize, scale_intensity  # the one copy (2D and 3D)

VOLUME_OPS = ("orientation", "spacing", "ct_window", "zscore", "scale_intensity", "normalize")


@dataclass
class Volume:
    """A channel-first float32 volume ``(C, X, Y, Z)`` in the file's voxel order, its affine and header."""

    array: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: str | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])


@dataclass
class TransformInfo:
    """What :func:`to_model_space` did, for :func:`from_model_space`."""

    input_shape: tuple[int, ...]
    input_affine: np.ndarray
    ornt: np.ndarray | None = None  # nibabel orientation transform applied (None: no orientation op)
    oriented_shape: tuple[int, ...] = ()
    oriented_affine: np.ndarray | None = None
    resample: np.ndarray | None = None  # 4x4 voxel map model -> oriented (None: no spacing op)
    model_shape: tuple[int, ...] = ()
    model_affine: np.ndarray | None = None
    ops: list[dict[str, Any]] = field(default_factory=list)


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI volume: 3D ``(X, Y, Z)`` or 4D channel-last ``(X, Y, Z, C)`` -> ``(C, X, Y, Z)`` float32."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise MedTuneError("volume file not found", path)
    try:
        img = cast("SpatialImage", nib.load(str(path)))  # a NIfTI image: nibabel types load() as FileBasedImage
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one line
        raise MedTuneError(f"unreadable NIfTI volume ({one_line(exc, 160)})", path) from exc
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector images: (X, Y, Z, 1, C)
        arr = arr[:, :, :, 0]
    if arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim == 4:
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise MedTuneError(f"expected a 3D or 4D (channel-last) volume, got shape {arr.shape}", path)
    if not np.all(np.isfinite(arr)):
        raise MedTuneError("volume holds NaN or Inf values", path)
    return Volume(np.ascontiguousarray(arr), np.asarray(img.affine, dtype=np.float64), img.header, str(path))


def check_ops(ops: Any) -> list[dict[str, Any]]:
    """Validate a volume preprocessing list; raises ``ValueError`` naming the first bad op."""
    if not isinstance(ops, list) or not all(isinstance(o, dict) and "op" in o for o in ops):
        raise ValueError("preprocessing must be a list of {'op': ...} objects")
    unknown = [o["op"] for o in ops if o["op"] not in VOLUME_OPS]
    if unknown:
        raise ValueError(f"unknown volume preprocessing op {unknown[0]!r} (known: {', '.join(VOLUME_OPS)})")
    return ops


# -- geometry ---------------------------------------------------------------------------------------


def _orient(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation transform to the spatial axes of a channel-first array."""
    from nibabel.orientations import apply_orientation

    moved = np.moveaxis(arr, 0, -1)
    return np.ascontiguousarray(np.moveaxis(apply_orientation(moved, ornt), -1, 0))


def orientation_transform(affine: np.ndarray, axcodes: str = "RAS") -> np.ndarray:
    """The nibabel ``ornt`` taking a volume with ``affine`` to ``axcodes`` (as MONAI ``Orientation``)."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    src = io_orientation(affine)
    dst = axcodes2ornt(tuple(axcodes))
    return ornt_transform(src, dst)


def spacing_geometry(
    affine: np.ndarray, shape: Sequence[int], pixdim: Sequence[float]
) -> tuple[np.ndarray, tuple[int, ...]]:
    """MONAI ``Spacing`` output affine and shape (``zoom_affine(diagonal=False)`` + ``compute_shape_offset``)."""
    d = len(shape)
    affine = np.asarray(affine, dtype=float)
    rzs = affine[:d, :d]
    norm = np.sqrt((rzs**2).sum(axis=0))
    scale = np.array([float(p) for p in pixdim][:d], dtype=float)
    if len(scale) < d:
        scale = np.append(scale, norm[len(scale) :])
    scale = np.where(scale <= 0, norm, scale)  # fall_back_tuple: non-positive -> keep the input spacing
    scale[scale == 0] = 1.0
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    new = np.eye(d + 1)
    new[:d, :d] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(scale))
    # compute_shape_offset(scale_extent=False)
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in shape], indexing="ij")).reshape(d, -1)
    corners = np.concatenate([corners, np.ones_like(corners[:1])])
    corners_out = np.linalg.solve(new, affine) @ corners
    world = affine @ corners
    dist = corners_out[:-1].copy()
    out_shape = np.round(np.ptp(corners_out[:-1] / corners_out[-1], axis=1) + 1.0).astype(int)
    offset = None
    for i in range(corners.shape[1]):
        if np.allclose(np.min(dist - dist[:, i : i + 1], 1), 0.0, rtol=1e-5):
            offset = world[:-1, i]
            break
    if offset is None:
        shp = np.asarray(shape, dtype=float)
        offset = affine[:-1, :-1] @ (shp / 2.0) + affine[:-1, -1] - new[:-1, :-1] @ (out_shape / 2.0)
    new[:d, -1] = offset
    return new, tuple(int(n) for n in out_shape)


def _resample(arr: np.ndarray, voxel_map: np.ndarray, out_shape: Sequence[int], order: int) -> np.ndarray:
    """Resample each channel: output voxel ``v`` takes input at ``voxel_map @ v`` (edge values extended)."""
    from scipy.ndimage import affine_transform

    matrix, offset = voxel_map[:3, :3], voxel_map[:3, 3]
    out = np.empty((arr.shape[0], *out_shape), dtype=arr.dtype if order == 0 else np.float32)
    for c in range(arr.shape[0]):
        src = arr[c] if order == 0 else arr[c].astype(np.float64)
        out[c] = affine_transform(src, matrix, offset, output_shape=tuple(out_shape), order=order, mode="nearest")
    return out


# -- intensity --------------------------------------------------------------------------------------


def ct_window(arr: np.ndarray, a_min: float, a_max: float, b_min: float, b_max: float, clip: bool = True) -> np.ndarray:
    """MONAI ``ScaleIntensityRange``: map ``[a_min, a_max]`` to ``[b_min, b_max]``, clipped."""
    if a_max - a_min == 0.0:
        return (arr - a_min + b_min).astype(np.float32)
    out = (arr - a_min) / (a_max - a_min)
    out = out * (b_max - b_min) + b_min
    if clip:
        out = np.clip(out, min(b_min, b_max), max(b_min, b_max))
    return out.astype(np.float32)


def zscore(arr: np.ndarray, nonzero: bool = True, channel_wise: bool = True) -> np.ndarray:
    """MONAI ``NormalizeIntensity``: subtract the mean, divide by the (population) std; with ``nonzero`` only
    non-zero voxels are used and changed."""
    out = np.array(arr, dtype=np.float32, copy=True)
    groups = [out[c] for c in range(out.shape[0])] if channel_wise else [out]
    for g in groups:
        mask = g != 0 if nonzero else np.ones(g.shape, dtype=bool)
        if not mask.any():
            continue
        vals = g[mask].astype(np.float64)
        mean, std = vals.mean(), vals.std()
        g[mask] = ((vals - mean) / (std if std != 0.0 else 1.0)).astype(np.float32)
    return out


# -- pipeline ---------------------------------------------------------------------------------------


def to_model_space(volume: Volume, ops: Sequence[dict[str, Any]]) -> tuple[np.ndarray, TransformInfo]:
    """Apply the sidecar ops -> ``((C, X, Y, Z) float32 array, TransformInfo)``. Geometry ops first, in order."""
    ops = check_ops(list(ops))
    arr = volume.array.astype(np.float32, copy=False)
    affine = np.asarray(volume.affine, dtype=float)
    info = TransformInfo(input_shape=volume.spatial_shape, input_affine=affine.copy(), ops=list(ops))
    for op in ops:
        name = op["op"]
        if name == "orientation":
            from nibabel.orientations import inv_ornt_aff

            ornt = orientation_transform(affine, str(op.get("axcodes", "RAS")))
            shape_before = arr.shape[1:]
            arr = _orient(arr, ornt)
            affine = affine @ inv_ornt_aff(ornt, shape_before)
            info.ornt = ornt if info.ornt is None else _compose(info.ornt, ornt)
            info.oriented_shape, info.oriented_affine = tuple(arr.shape[1:]), affine.copy()
        elif name == "spacing":
            if info.resample is not None:
                raise ValueError("only one spacing op is supported")
            if not info.oriented_shape:
                info.oriented_shape, info.oriented_affine = tuple(arr.shape[1:]), affine.copy()
            new_affine, out_shape = spacing_geometry(affine, arr.shape[1:], op["pixdim"])
            voxel_map = np.linalg.solve(affine, new_affine)
            order = 0 if str(op.get("mode", "bilinear")) == "nearest" else 1
            arr = _resample(arr, voxel_map, out_shape, order)
            info.resample, affine = voxel_map, new_affine
        elif name == "ct_window":
            arr = ct_window(
                arr,
                float(op["a_min"]),
                float(op["a_max"]),
                float(op.get("b_min", 0.0)),
                float(op.get("b_max", 1.0)),
                bool(op.get("clip", True)),
            )
        elif name == "zscore":
            arr = zscore(arr, bool(op.get("nonzero", True)), bool(op.get("channel_wise", True)))
        elif name == "scale_intensity":
            arr = scale_intensity(arr, float(op.get("minv", 0.0)), float(op.get("maxv", 1.0)))
        elif name == "normalize":
            arr = normalize(arr, op["mean"], op["std"])
    if not info.oriented_shape:
        info.oriented_shape, info.oriented_affine = tuple(arr.shape[1:]), affine.copy()
    info.model_shape, info.model_affine = tuple(arr.shape[1:]), affine
    return np.ascontiguousarray(arr, dtype=np.float32), info


def _compose(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """One orientation transform doing ``first`` then ``second``."""
    out = np.empty_like(first)
    for i in range(len(first)):
        j = int(first[i, 0])
        out[i] = [second[j, 0], first[i, 1] * second[j, 1]]
    return out


def from_model_space(labels: np.ndarray, info: TransformInfo) -> np.ndarray:
    """Bring a label map ``(X', Y', Z')`` (or ``(C, X', Y', Z')``) from model space to the input voxel grid."""
    from nibabel.orientations import apply_orientation

    arr = np.asarray(labels)
    squeeze = arr.ndim == len(info.input_shape)
    if squeeze:
        arr = arr[None]
    if tuple(arr.shape[1:]) != tuple(info.model_shape):
        raise ValueError(f"labels have spatial shape {arr.shape[1:]}, model space is {info.model_shape}")
    if info.resample is not None:
        back = np.linalg.inv(info.resample)
        arr = _resample(arr, back, info.oriented_shape, order=0)
    if info.ornt is not None:
        inverse = _invert(info.ornt)
        arr = np.stack([apply_orientation(a, inverse) for a in arr])
    if tuple(arr.shape[1:]) != tuple(info.input_shape):
        raise ValueError(f"internal error: inverse gave shape {arr.shape[1:]}, expected {info.input_shape}")
    arr = np.ascontiguousarray(arr)
    return arr[0] if squeeze else arr


def _invert(ornt: np.ndarray) -> np.ndarray:
    """The inverse of a nibabel orientation transform."""
    inv = np.empty_like(ornt)
    for i, (axis, flip) in enumerate(ornt):
        inv[int(axis)] = [i, flip]
    return inv
