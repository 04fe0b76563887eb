"""An exported model (``model.onnx`` + ``model.json`` sidecar) opened with onnxruntime (torch-free).

Sidecar fields read here (format ``medtune.model/1``):

- ``format``: ``"medtune.model/1"``; ``onnx_sha256``: hex sha256 of the ONNX file (checked on load);
- ``task``: ``"classification"`` | ``"segmentation"`` | ...;
- ``labels``: ``{"0": name, ...}`` as in ``dataset.json``;
- ``channels`` and ``spatial_dims`` (top level, or inside ``input``); optional ``input.name`` / ``output.name``;
- ``preprocessing``: list of ops for :func:`medtune.runtime.preprocess.apply_preprocessing`;
- ``postprocessing``: ``{"activation": "softmax" | "sigmoid" | "none"}``;
- ``tta`` (optional): ``{"flips": [[axis, ...], ...]}`` test-time flips, probabilities averaged (runtime/tta.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtune.errors import MedTuneError, one_line
from medtune.runtime.preprocess import apply_preprocessing
from medtune.runtime.providers import create_session
from medtune.runtime.readers import ImageData, read_image
from medtune.runtime.sidecar import (  # the sidecar's one owner; names re-exported for existing callers
    SIDECAR_FORMAT,
    SIDECAR_NAME,
    embedded_text,
    file_sha256,
    read_sidecar,
    sidecar_path,
    verify_embedded,
)
from medtune.runtime.tta import classification_probabilities, tta_flips

__all__ = ["SIDECAR_FORMAT", "SIDECAR_NAME", "OnnxModel", "file_sha256", "read_model_sidecar", "sidecar_path"]

PREPROCESSING_OPS = ("channels", "resize", "scale_intensity", "normalize")
ACTIVATIONS = ("softmax", "sigmoid", "none")
_NOTED: set[str] = set()


def read_model_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """Read and check the sidecar of ``onnx_path`` (:func:`medtune.runtime.sidecar.read_sidecar`: format, plain
    data, sha256) and its 2D preprocessing ops. One-line :class:`MedTuneError` on failure."""
    sidecar = read_sidecar(onnx_path)
    _check_preprocessing(sidecar.get("preprocessing", []), sidecar_path(onnx_path))
    return sidecar


def _check_preprocessing(spec: Any, path: Path) -> None:
    if not isinstance(spec, list) or not all(isinstance(s, dict) and "op" in s for s in spec):
        raise MedTuneError("sidecar preprocessing must be a list of {'op': ...} objects", path)
    from medtune.runtime.volume import VOLUME_OPS  # 3D models: orientation, spacing, intensity presets

    unknown = [s["op"] for s in spec if s["op"] not in (*PREPROCESSING_OPS, *VOLUME_OPS)]
    if unknown:
        raise MedTuneError(f"unknown preprocessing op {unknown[0]!r} in sidecar", path)


def parse_labels(labels: Any) -> list[tuple[str, int]]:
    """``[(name, value)]`` ordered by value from the sidecar's ``{"value": name}`` labels (dataset.json's form)."""
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ValueError(f'labels must map values to names ({{"0": "name", ...}}), got {type(labels).__name__}')
    return sorted(((name, int(value)) for value, name in labels.items()), key=lambda p: p[1])


def _activation(sidecar: dict[str, Any]) -> str:
    post = sidecar.get("postprocessing")  # a dict, the only form the export writes
    act = str(post.get("activation", "softmax") if isinstance(post, dict) else "softmax").lower()
    return act if act in ACTIVATIONS else "softmax"


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """Numerically stable softmax."""
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


class OnnxModel:
    """A MedTune ONNX model and its sidecar; create with :meth:`load`."""

    def __init__(self, onnx_path: Path, sidecar: dict[str, Any], session: Any, provider: str, message: str):
        self.path = onnx_path
        self.sidecar = sidecar
        # before any prediction: model.json must equal the copy the export embedded in the ONNX file
        self.sidecar_verified = verify_embedded(sidecar, embedded_text(onnx_path, session), onnx_path)
        if not self.sidecar_verified and str(onnx_path) not in _NOTED:
            _NOTED.add(str(onnx_path))
            print(
                f"note: {onnx_path} embeds no MedTune sidecar (not exported by `medtune export`): "
                f"{sidecar_path(onnx_path).name} is tied to it by its sha256 only",
                file=sys.stderr,
            )
        self.session = session
        self.provider = provider
        self.provider_message = message
        try:
            self._labels = parse_labels(sidecar.get("labels", {}))
            self.channels = int(self._field("channels"))
            self.spatial_dims = int(self._field("spatial_dims"))
        except (KeyError, TypeError, ValueError) as exc:
            raise MedTuneError(f"bad sidecar field ({exc})", self.sidecar_path) from exc
        self.tta_flips = tta_flips(sidecar, self.spatial_dims, self.sidecar_path)  # test-time flips (runtime/tta.py)
        self.input_name = self._io_name("input", [i.name for i in session.get_inputs()])
        self.output_name = self._io_name("output", [o.name for o in session.get_outputs()])
        self._input_shape = list(next(i.shape for i in session.get_inputs() if i.name == self.input_name))

    @property
    def input_shape(self) -> list[int | str | None]:
        """The ONNX input shape (ints for fixed axes, names/None for dynamic ones)."""
        return list(self._input_shape)

    @classmethod
    def load(
        cls, onnx_path: str | Path, provider: str = "auto", threads: int | None = None, **session_kw: Any
    ) -> OnnxModel:
        """Open ``onnx_path`` (or a folder holding ``model.onnx``): sidecar, sha256 check, session."""
        onnx_path = Path(onnx_path)
        if onnx_path.is_dir():
            onnx_path = onnx_path / "model.onnx"
        sidecar = read_model_sidecar(onnx_path)
        session, used, message = create_session(onnx_path, provider, threads, **session_kw)
        return cls(onnx_path, sidecar, session, used, message)

    # -- sidecar views -------------------------------------------------------------------------
    @property
    def sidecar_path(self) -> Path:
        return sidecar_path(self.path)

    @property
    def task(self) -> str:
        return str(self.sidecar.get("task", ""))

    @property
    def labels(self) -> list[str]:
        """Class names ordered by label value."""
        return [name for name, _ in self._labels]

    @property
    def label_values(self) -> list[int]:
        return [value for _, value in self._labels]

    @property
    def activation(self) -> str:
        return _activation(self.sidecar)

    def _field(self, key: str) -> Any:
        if key in self.sidecar:
            return self.sidecar[key]
        return (self.sidecar.get("input") or {})[key]

    def _io_name(self, kind: str, names: list[str]) -> str:
        section = self.sidecar.get(kind)
        wanted = section.get("name") if isinstance(section, dict) else None
        if wanted and wanted not in names:
            raise MedTuneError(f"sidecar {kind} name {wanted!r} is not in the ONNX graph ({names})", self.sidecar_path)
        return wanted or names[0]

    # -- inference -----------------------------------------------------------------------------
    def read(self, path: str | Path) -> ImageData:
        """Read an image for this model (squeezing singleton axes down to ``spatial_dims``)."""
        return read_image(path, spatial_dims=self.spatial_dims)

    def preprocess(self, image: ImageData, path: str | Path | None = None) -> np.ndarray:
        """Check dimensionality and channels, then apply the sidecar preprocessing -> ``(C, *spatial)``."""
        arr = image.array
        if arr.ndim - 1 != self.spatial_dims:
            raise MedTuneError(
                f"model expects a {self.spatial_dims}D image, got a {arr.ndim - 1}D one (spatial shape "
                f"{tuple(arr.shape[1:])})",
                path,
            )
        spec = list(self.sidecar.get("preprocessing", []))
        c = arr.shape[0]
        if c != self.channels and not (self.channels == 1 or c == 1):
            raise MedTuneError(f"image has {c} channels; model expects {self.channels}", path)
        if c != self.channels and not any(s["op"] == "channels" for s in spec):
            spec.insert(0, {"op": "channels", "n": self.channels})
        try:
            out = apply_preprocessing(arr, spec)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise MedTuneError(f"preprocessing failed ({exc})", path) from exc
        self._check_input_shape(out, path)
        return out

    def _check_input_shape(self, arr: np.ndarray, path: str | Path | None) -> None:
        expected = self._input_shape[1:]
        got = list(arr.shape)
        if len(expected) != len(got) or any(isinstance(e, int) and e != g for e, g in zip(expected, got, strict=True)):
            want = "(" + ", ".join(str(e) for e in expected) + ")"
            raise MedTuneError(f"preprocessed image has shape {tuple(got)}; the model expects {want}", path)

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """Raw model output for a batch ``(N, C, *spatial)``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        try:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as exc:  # noqa: BLE001 - onnxruntime errors become one line
            raise MedTuneError(f"inference failed on input {x.shape} ({one_line(exc)})", self.path) from exc

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, n_labels)`` from raw classification outputs."""
        logits = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
        n = len(self._labels)
        if self.activation == "sigmoid" and logits.shape[1] == 1 and n == 2:
            p = sigmoid(logits)
            return np.concatenate([1 - p, p], axis=1)
        if logits.shape[1] != n:
            raise MedTuneError(f"model outputs {logits.shape[1]} values but the sidecar has {n} labels", self.path)
        if self.activation == "sigmoid":
            return sigmoid(logits)
        return softmax(logits) if self.activation == "softmax" else logits

    def classify(self, paths: Sequence[str | Path], batch_size: int = 16, errors: str = "raise") -> list[dict]:
        """Classify image files; results in input order.

        Each result: ``{"file", "predicted_label", "predicted_name", "probabilities": {name: p}}``.
        ``errors="record"`` puts a failing image's one-line message in its result's ``"error"`` (others get
        ``None``) instead of raising.
        """
        if errors not in ("raise", "record"):
            raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
        if self.task and self.task != "classification":
            raise MedTuneError(f"model task is {self.task!r}, not classification", self.sidecar_path)
        results: list[dict] = [{"file": str(p)} for p in paths]
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for i, p in enumerate(paths):
            try:
                arr = self.preprocess(self.read(p), p)
            except MedTuneError as exc:
                if errors != "record":
                    raise
                results[i].update(self._empty(str(exc)))
                continue
            groups.setdefault(arr.shape, []).append((i, arr))
        step = max(1, int(batch_size))
        for items in groups.values():
            for start in range(0, len(items), step):
                self._classify_chunk(items[start : start + step], results, errors == "record")
        return results

    def _classify_chunk(self, chunk: list[tuple[int, np.ndarray]], results: list[dict], record: bool) -> None:
        try:
            probs = classification_probabilities(self, np.stack([a for _, a in chunk]))
        except MedTuneError as exc:
            if not record:
                raise
            for i, _ in chunk:
                results[i].update(self._empty(f"{results[i]['file']}: {exc}"))
            return
        for (i, _), row in zip(chunk, probs, strict=True):
            results[i].update(self._result(row, record))

    def _result(self, probs: np.ndarray, with_error: bool) -> dict[str, Any]:
        k = int(np.argmax(probs))
        out: dict[str, Any] = {
            "predicted_label": self.label_values[k],
            "predicted_name": self.labels[k],
            "probabilities": {name: float(p) for name, p in zip(self.labels, probs, strict=True)},
        }
        if with_error:
            out["error"] = None
        return out

    def _empty(self, error: str) -> dict[str, Any]:
        return {"predicted_label": None, "predicted_name": None, "probabilities": {}, "error": error}
