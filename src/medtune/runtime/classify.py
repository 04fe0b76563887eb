"""Classify one image or a folder of images with an exported model; write a CSV or JSON table (torch-free)."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medtune.atomic import write_json_atomic, write_with
from medtune.errors import MedTuneError
from medtune.runtime.model import OnnxModel
from medtune.runtime.readers import image_kind
from medtune.untrusted import csv_cell

RESULTS_FORMAT = "medtune.classification/1"


def find_images(input_path: str | Path) -> tuple[list[Path], list[Path]]:
    """``(images, skipped)``: one file as given, or a folder's image files (recursive, sorted, no hidden files)."""
    root = Path(input_path)
    if root.is_file():
        return [root], []
    if not root.is_dir():
        raise MedTuneError("input not found (expected an image file or a folder)", root)
    images: list[Path] = []
    skipped: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        (images if image_kind(path) != "unknown" else skipped).append(path)
    return images, skipped


def classify_folder(
    model_path: str | Path,
    input_path: str | Path,
    out_path: str | Path,
    provider: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Classify an image file or folder and write the table to ``out_path`` (CSV, or JSON for ``.json``).

    A failing image gets its error in its row (and a line on stderr); the others go on.
    Returns ``{n_ok, n_failed, n_skipped, provider, provider_message, out}``.
    """
    from tqdm import tqdm

    model = OnnxModel.load(model_path, provider=provider)
    out_path = Path(out_path)
    images, skipped = find_images(input_path)
    skipped = [p for p in skipped if p.resolve() != out_path.resolve()]
    if skipped:
        _note(f"note: skipped {len(skipped)} non-image file(s), e.g. {skipped[0]}")
    if not images:
        raise MedTuneError("no image files found (PNG/JPEG, NIfTI .nii/.nii.gz or DICOM)", input_path)
    rows: list[dict[str, Any]] = []
    step = max(1, int(batch_size))
    with tqdm(total=len(images), unit="img", file=sys.stderr, disable=not progress, desc="classify") as bar:
        for start in range(0, len(images), step):
            chunk = model.classify(images[start : start + step], batch_size=step, errors="record")
            for row in chunk:
                if row["error"]:
                    bar.write(f"error: {row['error']}", file=sys.stderr)
            rows.extend(chunk)
            bar.update(len(chunk))
    for row, path in zip(rows, images, strict=True):
        row["file"] = _display_name(path, Path(input_path))
    if out_path.suffix.lower() == ".json":
        write_json_atomic(out_path, _json_table(model, rows))
    else:
        write_with(out_path, lambda tmp: _write_csv(tmp, model.labels, rows))
    n_failed = sum(1 for r in rows if r["error"])
    return {
        "n_ok": len(rows) - n_failed,
        "n_failed": n_failed,
        "n_skipped": len(skipped),
        "provider": model.provider,
        "provider_message": model.provider_message,
        "out": str(out_path),
    }


def _display_name(path: Path, root: Path) -> str:
    """Path relative to the input folder (POSIX separators), or the file as given."""
    return path.relative_to(root).as_posix() if root.is_dir() else str(path)


def csv_columns(labels: Iterable[str]) -> list[str]:
    """``file, predicted_label, predicted_name, p_<name>..., error``."""
    return ["file", "predicted_label", "predicted_name", *[f"p_{name}" for name in labels], "error"]


def _write_csv(path: Path, labels: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([csv_cell(c) for c in csv_columns(labels)])
        for r in rows:
            probs = [repr(r["probabilities"][n]) if n in r["probabilities"] else "" for n in labels]
            label = "" if r["predicted_label"] is None else r["predicted_label"]
            # file names and messages come from the user's files: never a spreadsheet formula
            writer.writerow(
                [csv_cell(r["file"]), label, csv_cell(r["predicted_name"] or ""), *probs, csv_cell(r["error"] or "")]
            )


def _json_table(model: OnnxModel, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": RESULTS_FORMAT,
        "model": str(model.path),
        "onnx_sha256": model.sidecar.get("onnx_sha256"),
        "labels": model.labels,
        "provider": model.provider,
        "results": rows,
    }


def _note(message: str) -> None:
    print(message, file=sys.stderr)
