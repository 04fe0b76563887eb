"""Shared fixtures: tiny real datasets (PNG files in the MedTune folder contract), a trained run, the headless
Slicer scene. Shared constants and helpers live in ``helpers.py`` (tests import that, never another test module)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

# Two copies of LLVM meet in this one process: triton's (imported by torch._dynamo, which torchvision imports) and
# Mesa's libLLVM, loaded by the EGL render windows of the in-process studios (tests/test_studio.py). Importing triton
# after Mesa's LLVM is loaded segfaults at once (measured here), so torchvision comes first, as in every product
# process: the studio server never imports torch; fine-tuning and export run in child processes.
try:
    import torchvision  # noqa: F401
except ImportError:  # the torch-free jobs (.ci/py312, .ci/edge)
    pass

from helpers import SLICER_MODULE

if str(SLICER_MODULE) not in sys.path:
    sys.path.insert(0, str(SLICER_MODULE))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic 2-class PNG dataset (24 train / 12 val, 32x32)."""
    from medtune.data import make_synthetic_classification

    out = tmp_path_factory.mktemp("data") / "tiny"
    make_synthetic_classification(out, n_train=24, n_val=12, size=32, seed=1)
    return out


@pytest.fixture(scope="session")
def scene():
    """slicer-core's real MRML scene with the Volumes / Segmentations / SubjectHierarchy logics, no app (skips
    without slicer-core). One scene for the session, as in the Slicer app; tests add their own nodes."""
    pytest.importorskip("slicer", reason="slicer-core not installed (pip install slicer-core) - Slicer logic untested")
    from MedTuneLib.headless import init_headless_slicer

    scene = init_headless_slicer()
    yield scene
    scene.Clear(True)  # the session's nodes go while the libraries they need are still loaded, not at exit


_SESSION: list[pytest.Session] = []


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """End the test process once pytest is done, without the interpreter's teardown of native libraries.

    With both LLVM copies loaded (see the triton import above) and VTK's render windows, that teardown crashed 3 of
    ~8 full runs (exit 139) after every test had passed and the summary was printed. Everything the tests own is
    released before this point (studios closed, the MRML scene cleared); faulthandler stays armed until the end, and
    the exit status is pytest's own. xdist workers exit normally (their controller reads their last messages)."""
    import faulthandler

    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    if hasattr(config, "workerinput") or not _SESSION:
        return
    sys.stdout.flush()  # no gc.collect() first: collecting VTK/EGL objects is the teardown this skips
    sys.stderr.flush()
    os._exit(int(_SESSION[-1].exitstatus))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dataset):
    """A real 1-epoch ``tiny_cnn`` run on ``tiny_dataset`` and its exported model, made with the real CLI.

    Returns ``(dataset, run, model_dir)``. Shared: tests that change files work on copies.
    """
    from medtune.cli import main

    root = tmp_path_factory.mktemp("trained")
    run, model = root / "run", root / "model"
    args = ["--arch", "tiny_cnn", "--pretrained", "none", "--epochs", "1", "--batch-size", "8", "--num-workers", "0"]
    code = main(["finetune", "--dataset", str(tiny_dataset), *args, "--set", "image_size=[32, 32]", "--device", "cpu",
                 "--quiet", "--out", str(run)])  # fmt: skip
    assert code == 0
    assert main(["export", "--run", str(run), "--out", str(model), "--samples", "4"]) == 0
    return tiny_dataset, run, model


@pytest.fixture()
def cli(capsys):
    """Run ``medtune`` in this process: ``cli(*args) -> (exit code, stdout, stderr)`` (argparse exits included)."""
    from medtune.cli import main

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
