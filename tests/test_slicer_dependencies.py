"""The Slicer module's first-use dependency plan: what gets installed, how, and that nothing installed
(Slicer's own numpy, vtk, ...) can be replaced. The installers themselves (``slicer.util.pip_install``, the
PyTorch extension) exist only inside the app, so ``run_plan`` is exercised with recording callables."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_extension" / "MedTune"))

from MedTuneLib.dependencies import dependency_plan, installed_distributions, run_plan  # noqa: E402

SLICER_LIKE = {"numpy": "1.26.4", "vtk": "9.3.0", "SimpleITK": "2.3.1", "pydicom": "2.4.4", "Pillow": "10.2.0",
               "scipy": "1.12.0", "requests": "2.31.0"}  # fmt: skip


def _kinds(plan):
    return [(s.kind, s.packages) for s in plan.steps]


def test_fresh_slicer_cpu_with_pytorch_extension():
    plan = dependency_plan(SLICER_LIKE, gpu=False, pytorch_extension=True)
    kinds = _kinds(plan)
    assert kinds[0] == ("pip", ["onnxruntime"])
    assert ("pip", ["nibabel", "highdicom"]) in kinds  # numpy, pydicom, pillow: Slicer's, kept
    torch_at = kinds.index(("pytorch_extension", ["torch", "torchvision"]))
    monai_at = next(i for i, (_, pkgs) in enumerate(kinds) if "monai" in pkgs)
    assert torch_at < monai_at  # monai after torch, so it cannot pull another torch in
    assert plan.steps[-1].packages == ["medtune"] and "--no-deps" in plan.steps[-1].extra_args
    text = plan.constraints_text()
    assert "numpy==1.26.4\n" in text and "simpleitk==2.3.1\n" in text and "vtk==9.3.0\n" in text
    assert "with Slicer's PyTorch extension" in plan.text() and "kept at their versions" in plan.text()


def test_gpu_and_no_extension_and_existing_ort():
    plan = dependency_plan(SLICER_LIKE, gpu=True, pytorch_extension=False)
    assert _kinds(plan)[0] == ("pip", ["onnxruntime-gpu"])
    assert ("pip", ["torch", "torchvision"]) in _kinds(plan) and any("PyTorch extension" in n for n in plan.notes)
    with_cpu_ort = dependency_plan({**SLICER_LIKE, "onnxruntime": "1.20.0"}, gpu=True, training=False)
    assert all("onnxruntime" not in " ".join(s.packages) for s in with_cpu_ort.steps)  # never both variants
    assert any("CPU onnxruntime is installed" in n for n in with_cpu_ort.notes)
    runtime_only = dependency_plan(SLICER_LIKE, gpu=False, training=False)
    assert all("torch" not in s.packages and "monai" not in s.packages for s in runtime_only.steps)


def test_this_environment_needs_nothing():
    """The test environment has every dependency (it runs them), so the plan is empty."""
    plan = dependency_plan(gpu=False)
    assert not plan.needed, plan.text()
    assert installed_distributions()["numpy"] == plan.constraints["numpy"]


def test_run_plan_pins_what_is_installed_at_each_step(tmp_path):
    installed = dict(SLICER_LIKE)
    calls: list[list[str]] = []

    def pip_install(args):
        calls.append(args)
        for pkg in args[: args.index("-c")]:
            if not pkg.startswith("-"):
                installed[pkg] = "1.0"

    def install_torch():
        installed.update(torch="2.5.1", torchvision="0.20.1")

    plan = dependency_plan(installed, gpu=False, pytorch_extension=True)
    used = run_plan(plan, pip_install, install_torch, tmp_path, installed=lambda: dict(installed))
    assert used == calls and len(calls) == len(plan.steps) - 1  # every step but the extension's
    monai_args = next(a for a in calls if "monai" in a)
    constraints = Path(monai_args[monai_args.index("-c") + 1]).read_text()
    assert "torch==2.5.1\n" in constraints and "numpy==1.26.4\n" in constraints  # torch installed by the extension
    assert "monai==" not in constraints  # a package being installed is not pinned
