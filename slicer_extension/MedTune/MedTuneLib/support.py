"""Which Slicer runs MedTune, and which ``medtune`` package the module uses (no Qt, no third-party imports).

This file is imported before anything else of MedTune, so it keeps to syntax every Slicer Python can parse
(checked by ``vermin -t=3.9-`` in ``.ci/py312``): on an unsupported Slicer the module shows the one line of
:func:`unsupported_reason` instead of a traceback, and installs nothing.

Supported releases (read from Slicer's own source; see ``slicer_extension/README.md``): Slicer 5.10 and 5.12,
both on Python 3.12. Slicer 5.8 and older ship Python 3.9, which MedTune (``requires-python >= 3.10``) does
not run on.

The extension brings its own ``medtune``: a built / packaged extension has the package next to ``MedTune.py``
(staged by :func:`stage_medtune`, which the extension's CMake runs); a checkout loaded through *Additional
module paths* stages the checkout's sources into ``<checkout>/build/slicer-medtune``. ``medtune`` is never
installed by name from a package index, and :func:`use_medtune` refuses a ``medtune`` whose version is not
the one this module was made with.
"""

import os
import shutil
import sys

MEDTUNE_VERSION = "0.1.0"  # the medtune version this module was made with (a test keeps it equal to pyproject)
MIN_SLICER = (5, 10)
MIN_PYTHON = (3, 10)
SUPPORTED_TEXT = "3D Slicer 5.10 or newer (Python 3.12)"
HOMEPAGE = "https://github.com/medtune/medtune"  # also EXTENSION_HOMEPAGE in slicer_extension/CMakeLists.txt
# the medtune package is assembled from three source trees (pyproject's package-dir mapping)
PACKAGE_TREES = (("src/medtune", "medtune"), ("export", "medtune/export"), ("monai_bundle", "medtune/bundle"))
STAGE_IGNORE = ("__pycache__", "*.pyc", "*.pt", "*.onnx", "models")
_STATE: dict[str, str] = {}  # "root": the folder whose "medtune" package is in use


def unsupported_reason(slicer_version, python_version=None):
    """One line saying what is needed, or ``None`` when this Slicer and Python are supported.

    ``slicer_version``: ``(major, minor)`` of the running Slicer; ``python_version``: ``sys.version_info``.
    """
    python_version = tuple(python_version or sys.version_info)[:2]
    slicer_version = tuple(int(v) for v in tuple(slicer_version)[:2])
    if slicer_version < MIN_SLICER or python_version < MIN_PYTHON:
        return "MedTune needs {} - this is Slicer {} with Python {}; please install a newer Slicer.".format(
            SUPPORTED_TEXT, ".".join(str(v) for v in slicer_version), ".".join(str(v) for v in python_version)
        )
    return None


def checkout_root(module_dir):
    """The repository root when ``module_dir`` (the folder of ``MedTune.py``) sits in a source checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(module_dir)))
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isfile(
        os.path.join(root, "src", "medtune", "__init__.py")
    ):
        return root
    return None


def stage_medtune(repo_root, dest):
    """Assemble the ``medtune`` package from a checkout into ``dest/medtune`` (replacing an older copy).

    Sources only (no caches, checkpoints or models). Returns ``dest``. Used by the extension's CMake build
    (``python support.py stage REPO DEST``) and when a checkout is loaded without building.
    """
    target = os.path.join(dest, "medtune")
    tmp = target + ".staging"
    shutil.rmtree(tmp, ignore_errors=True)
    for source, rel in PACKAGE_TREES:
        into = os.path.join(tmp, os.path.relpath(rel, "medtune"))
        shutil.copytree(os.path.join(repo_root, source), into, ignore=shutil.ignore_patterns(*STAGE_IGNORE),
                        dirs_exist_ok=True)  # fmt: skip
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return dest


def find_medtune_root(module_dir):
    """The folder holding the ``medtune`` package this module must use (staging a checkout's sources)."""
    bundled = os.path.abspath(module_dir)
    if os.path.isfile(os.path.join(bundled, "medtune", "__init__.py")):
        return bundled  # built / packaged extension: medtune installed next to MedTune.py
    repo = checkout_root(module_dir)
    if repo is not None:
        return stage_medtune(repo, os.path.join(repo, "build", "slicer-medtune"))
    raise RuntimeError(
        f"MedTune's own medtune package is missing from this extension ({bundled}); reinstall the MedTune extension"
    )


def package_version(root):
    """``__version__`` of ``root/medtune/__init__.py``, read as text (nothing is imported)."""
    with open(os.path.join(root, "medtune", "__init__.py"), encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return ""


def use_medtune(module_dir):
    """Put this extension's ``medtune`` first on ``sys.path``; one-line ``RuntimeError`` on a mismatch.

    Returns the folder holding the package. A ``medtune`` already imported from elsewhere, or one whose
    version differs from :data:`MEDTUNE_VERSION`, is refused.
    """
    root = find_medtune_root(module_dir)
    found = package_version(root)
    if found != MEDTUNE_VERSION:
        raise RuntimeError(
            "MedTune module {} found medtune {} in {}; they must be the same version (reinstall the extension)".format(
                MEDTUNE_VERSION, found or "(no version)", root
            )
        )
    loaded = sys.modules.get("medtune")
    if loaded is not None:
        where = os.path.dirname(os.path.abspath(getattr(loaded, "__file__", "") or ""))
        if os.path.normcase(where) != os.path.normcase(os.path.join(root, "medtune")):
            raise RuntimeError(
                f"another medtune package is already loaded from {where}; restart Slicer (MedTune uses its own, "
                f"in {root})"
            )
    if root not in sys.path:
        sys.path.insert(0, root)
    _STATE["root"] = root
    return root


def child_env(base=None):
    """Environment for MedTune's child processes: the same ``medtune`` first on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    root = _STATE.get("root")
    if root:
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
        env["PYTHONPATH"] = os.pathsep.join([root] + parts)
    return env


def lib_modules(modules):
    """Names of the loaded ``MedTuneLib`` modules (what *Reload* must re-execute), deepest first."""
    return sorted((n for n in modules if n == "MedTuneLib" or n.startswith("MedTuneLib.")), reverse=True)


def purge_lib_modules():
    """Forget the loaded ``MedTuneLib`` modules so the next import re-executes them from disk (module *Reload*)."""
    for name in lib_modules(list(sys.modules)):
        del sys.modules[name]


if __name__ == "__main__":  # CMake: python support.py stage REPO DEST
    if len(sys.argv) != 4 or sys.argv[1] != "stage":
        sys.exit("usage: support.py stage REPO_ROOT DEST")
    stage_medtune(sys.argv[2], sys.argv[3])
