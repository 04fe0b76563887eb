"""One reader of package versions for every file MedTune writes (run.json, sidecar, bench, bundle metadata)."""

from __future__ import annotations

import sys
import types
from importlib.metadata import version

from medtune.versions import installed_version, versions


def test_loaded_module_distribution_and_missing(monkeypatch):
    import numpy

    assert installed_version("numpy") == numpy.__version__  # the loaded module: exact for this process
    assert installed_version("pytest") == version("pytest")  # a distribution name works as well
    fake = types.ModuleType("medtune_fake_pkg")
    fake.__version__ = "9.9.9"  # type: ignore[attr-defined]  # a module object built in the test
    monkeypatch.setitem(sys.modules, "medtune_fake_pkg", fake)
    assert versions(("medtune_fake_pkg", "no-such-distribution-xyz", "numpy"), suffix="_version") == {
        "medtune_fake_pkg_version": "9.9.9",
        "numpy_version": numpy.__version__,
    }  # missing packages are left out, order kept


def test_onnxruntime_found_under_its_gpu_or_cpu_wheel():
    import onnxruntime

    assert installed_version("onnxruntime") == onnxruntime.__version__
    sys_loaded = sys.modules.pop("onnxruntime")
    try:  # not loaded: read from whichever onnxruntime distribution is installed
        assert installed_version("onnxruntime") == onnxruntime.__version__
    finally:
        sys.modules["onnxruntime"] = sys_loaded
