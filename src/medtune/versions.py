"""Versions of the packages a file MedTune writes was made with (run.json, the sidecar, bench results, bundle
metadata): one reader, torch-free, so each writer only names the packages its format lists."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

#: distributions a module may be installed as (onnxruntime's GPU / OpenVINO / DirectML builds are separate wheels)
DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")}


def installed_version(name: str) -> str | None:
    """``name``'s version: the loaded module's ``__version__`` (exact for this process), else the installed
    distribution's (``name`` may be a distribution name such as ``pytorch-ignite``), else None."""
    loaded = getattr(sys.modules.get(name), "__version__", None)
    if loaded:
        return str(loaded)
    for dist in DISTRIBUTIONS.get(name, (name,)):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def versions(names: Iterable[str], suffix: str = "") -> dict[str, str]:
    """``{name + suffix: version}`` for the names that are installed, in the order given."""
    found = ((name, installed_version(name)) for name in names)
    return {f"{name}{suffix}": v for name, v in found if v is not None}
