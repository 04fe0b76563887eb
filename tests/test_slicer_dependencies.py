"""The Slicer module's first-use dependencies: the plan (complete, MedTune's ranges, nothing of Slicer's replaced,
no ``medtune`` by name, torch through the PyTorch extension's installer) and the installer, run for real as
child processes in a throw-away venv (pip from this machine's index; a failed step is undone)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from MedTuneLib import dependencies as deps  # noqa: E402
from MedTuneLib.dependencies import (  # noqa: E402
    InstallJob,
    Plan,
    Step,
    dependency_plan,
    failure_line,
    installed_distributions,
    installed_distributions_of,
)

# what a fresh Slicer 5.10 holds (Slicer's SuperBuild: numpy 2.3.4, pydicom 2.4.4, pillow, packaging, ...)
SLICER_510 = {"numpy": "2.3.4", "vtk": "9.4.2", "SimpleITK": "2.5.0", "pydicom": "2.4.4", "Pillow": "11.3.0",
              "scipy": "1.16.2", "requests": "2.32.5", "packaging": "25.0"}  # fmt: skip
# installed by the plan or shipped by Slicer, but (on some branches) not declared in pyproject.toml
UNDECLARED = {
    "packaging": "MedTuneLib's own import; Slicer ships it",
    "scipy": "Slicer ships it; declared by the runtime (volume resampling) once the base is torch-free",
}
# base (runtime) dependencies the Slicer plan leaves out on purpose
NOT_FOR_SLICER = {"highdicom": "DICOM SEG output of `medtune infer`; the extension never writes DICOM SEG, and "
                  "highdicom>=0.23 needs pydicom 3 (Slicer 5.10 ships 2.4.4)"}  # fmt: skip


@pytest.fixture(autouse=True)
def install_tmp(tmp_path, monkeypatch) -> Path:
    """The system temporary folder seen by the installer (where it makes its work folder); after each test it
    must be empty: an :class:`InstallJob` leaves nothing behind."""
    import tempfile

    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    assert not list(folder.iterdir()), "an InstallJob left its work folder behind"


def _kinds(plan: Plan) -> list[tuple[str, list[str]]]:
    return [(s.kind, s.packages) for s in plan.steps]


def test_fresh_slicer_cpu_with_pytorch_extension():
    plan = dependency_plan(SLICER_510, gpu=False, pytorch_extension=True)
    kinds = _kinds(plan)
    assert not plan.errors
    assert kinds[0] == ("pip", ["onnxruntime>=1.18"])
    assert kinds[1] == ("pip", ["nibabel>=5", "tqdm>=4.60", "pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1",
                                "pylibjpeg-openjpeg>=2.0"])  # fmt: skip
    assert kinds[2] == ("pip", ["light-the-torch>=0.5"])
    assert kinds[3] == ("torch", ["torch>=2.4,<=2.14.1", "torchvision>=0.19,<=0.29.1"])  # the project's range
    assert kinds[4][0] == "pip" and "monai>=1.4,<1.7" in kinds[4][1]  # after torch: it cannot pull another one
    every = [p for _, packages in kinds for p in packages]
    assert not any(re.match(r"(numpy|pydicom|pillow|vtk|simpleitk|medtune)\b", p, re.I) for p in every)
    torch_step = plan.steps[3]
    argv = torch_step.command("PythonSlicer", "c.txt")
    assert argv[:4] == ["PythonSlicer", "-m", "light_the_torch", "install"] and "torch>=2.4,<=2.14.1" in argv
    assert argv[-2:] == ["-c", "c.txt"]
    text = plan.text()
    assert text.splitlines()[0] == "MedTune needs to install about 1.3 GB of Python packages:"  # measured sizes
    assert "kept at their versions" in text and "Slicer stays usable" in text


def test_gpu_without_pytorch_extension_uses_pip_with_the_torch_range():
    plan = dependency_plan(SLICER_510, gpu=True, pytorch_extension=False)
    assert ("pip", ["onnxruntime-gpu>=1.18"]) in _kinds(plan)
    assert ("pip", ["torch>=2.4,<=2.14.1", "torchvision>=0.19,<=0.29.1"]) in _kinds(plan)
    assert any("PyTorch extension" in n for n in plan.notes)
    assert "about 5.0 GB" in plan.text().splitlines()[0]  # a CUDA torch is GB-sized: said in the prompt


def test_runtime_only_never_installs_training_packages():
    plan = dependency_plan(SLICER_510, gpu=False, training=False)
    assert all(s.kind == "pip" for s in plan.steps)
    names = {n for s in plan.steps for n in s.names()}
    assert names == {"onnxruntime", "nibabel", "tqdm", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"}
    assert plan.text().splitlines()[0] == "MedTune needs to install about 111 MB of Python packages:"


def test_installed_out_of_range_is_reported_not_replaced():
    old = {**SLICER_510, "monai": "1.2.0", "torch": "2.15.0", "numpy": "1.19.5"}
    plan = dependency_plan(old, gpu=False, pytorch_extension=True)
    text = "\n".join(plan.errors)
    assert "numpy 1.19.5 is installed but MedTune needs numpy>=1.24; install a supported Slicer" in text
    assert "monai 1.2.0 is installed but MedTune needs monai>=1.4,<1.7" in text
    assert "torch 2.15.0 is installed but MedTune needs torch>=2.4,<=2.14.1" in text
    assert not any("monai" in p or p.startswith("torch") for s in plan.steps for p in s.packages)
    job = InstallJob(plan).start()  # nothing is started: the first problem is the one line shown
    state = job.state
    assert state.finished and not state.ok and state.error == plan.errors[0] and "\n" not in state.error
    assert job.workdir is None and not job.commands  # no work folder made (the fixture checks the temp folder)
    nothing = InstallJob(Plan([], {})).start()
    assert nothing.state.finished and nothing.state.ok and nothing.workdir is None


def test_this_environment_has_the_runtime():
    """The test environment runs the runtime, so the runtime part of the plan is empty (training differs by job)."""
    plan = dependency_plan(gpu=False, training=False)
    assert not plan.steps and not plan.errors, plan.text()


def _declared() -> tuple[dict, dict[str, set[str]]]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [*project["dependencies"], *(r for extra in project.get("optional-dependencies", {}).values()
                                           for r in extra)]  # fmt: skip
    ranges: dict[str, set[str]] = {}
    for line in declared:
        req = Requirement(line)
        ranges.setdefault(canonicalize_name(req.name), set()).add(str(req.specifier))
    return project, ranges


def test_ranges_are_the_projects_own():
    """Every range the plan installs is the one pyproject.toml declares for that package (one owner: pyproject)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    _, ranges = _declared()
    ours = [*deps.RUNTIME, *deps.TRAINING, deps.TORCH, deps.TORCHVISION, *deps.SLICER_OWN]
    ours += [v + deps.ORT_RANGE for v in deps.ORT_VARIANTS]
    for spec in ours:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name not in ranges and name in UNDECLARED:
            continue
        assert name in ranges, f"{req.name} is installed by the Slicer plan but not declared in pyproject.toml"
        assert str(req.specifier) in ranges[name], f"{req.name}: plan {req.specifier}, pyproject {ranges[name]}"


def test_every_runtime_dependency_is_in_the_plan():
    """Once the base dependencies are the torch-free runtime (a ``train`` extra exists), each is either shipped
    by Slicer or installed by the plan's runtime step (or left out on purpose, with the reason above)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project, _ = _declared()
    if "train" not in project.get("optional-dependencies", {}):
        pytest.skip("pyproject.toml has no torch-free base yet (no `train` extra)")
    covered = {canonicalize_name(Requirement(s).name) for s in (*deps.SLICER_OWN, *deps.RUNTIME)}
    covered |= set(deps.ORT_VARIANTS) | set(NOT_FOR_SLICER)
    base = {canonicalize_name(Requirement(line).name) for line in project["dependencies"]}
    assert base <= covered, f"runtime dependencies the Slicer plan misses: {sorted(base - covered)}"


def test_failure_line_names_the_package():
    step = Step("pip", ["nibabel>=5", "pylibjpeg-openjpeg>=2.0"], "x")
    out = ("Collecting nibabel>=5\nERROR: Could not find a version that satisfies the requirement "
           "pylibjpeg-openjpeg>=2.0 (from versions: none)\nERROR: No matching distribution found for "
           "pylibjpeg-openjpeg>=2.0\n")  # fmt: skip
    line = failure_line(step, out, 1)
    assert line.startswith("could not install pylibjpeg-openjpeg>=2.0: No matching distribution found")
    assert "\n" not in line and line.endswith("nothing was changed")


# ------------------------------------------------------------------------------ the installer, for real


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> str:
    """A fresh venv (its own pip): the installer's child processes change it, never the test environment."""
    folder = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    python = folder / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    return str(python)


@pytest.mark.slow  # a fresh venv and pip child processes
def test_installer_runs_steps_in_child_processes_and_pins_what_is_installed(venv_python, tmp_path, install_tmp):
    before = installed_distributions_of(venv_python)
    assert "six" not in before and "iniconfig" not in before
    plan = Plan([Step("pip", ["six>=1.16"], "a"), Step("pip", ["iniconfig>=1"], "b")], before)
    work = tmp_path / "work"  # the caller's folder: kept, so the constraints files can be read afterwards
    job = InstallJob(plan, venv_python, workdir=work, installed=lambda: installed_distributions_of(venv_python))
    assert job.start().state.index == 0 and not job.state.finished  # returns at once: the child runs on
    state = job.wait(timeout=300)
    assert state.ok and state.finished and state.fraction == 1.0, state.error
    after = installed_distributions_of(venv_python)
    assert {"six", "iniconfig"} <= set(after)
    assert len(job.commands) == 2 and all(c[:4] == [venv_python, "-m", "pip", "install"] for c in job.commands)
    second = (work / "constraints_1.txt").read_text()
    assert f"six=={after['six']}\n" in second and "pip==" in second  # step 1's result pinned for step 2
    assert installed_distributions() == installed_distributions()  # this environment untouched (no crash)
    # without a workdir the job makes its own in the temp folder and removes it when it succeeds
    again = InstallJob(Plan([Step("pip", ["six>=1.16"], "a")], after), venv_python,
                       installed=lambda: installed_distributions_of(venv_python)).start()  # fmt: skip
    assert again.workdir is not None and again.workdir.parent == install_tmp and again.workdir.is_dir()
    assert again.wait(timeout=300).ok, again.state.error
    assert not again.workdir.exists()


@pytest.mark.slow  # a fresh venv and pip child processes
def test_a_failed_step_is_one_line_and_undoes_the_plan(venv_python):
    before = installed_distributions_of(venv_python)
    assert "medtune-no-such-package" not in before
    plan = Plan([Step("pip", ["tomli>=1"], "first"), Step("pip", ["medtune-no-such-package>=1"], "second")], before)
    job = InstallJob(plan, venv_python, installed=lambda: installed_distributions_of(venv_python)).start()
    state = job.wait(timeout=300)
    assert state.finished and not state.ok
    assert state.error.startswith("could not install medtune-no-such-package>=1") and "\n" not in state.error
    assert job.commands[-1][:5] == [venv_python, "-m", "pip", "uninstall", "-y"] and "tomli" in job.commands[-1]
    assert installed_distributions_of(venv_python) == before  # nothing half-installed
    log = Path(re.fullmatch(r".*\(log: (.+)\)", state.error).group(1))  # the error points to the step's log...
    assert log == job.workdir / "step_1.log" and "medtune-no-such-package" in log.read_text()
    shutil.rmtree(job.workdir)  # ...which is kept for the user (the fixture checks nothing else is left)


def _harmless_failing_plan() -> Plan:
    """One step that fails without changing anything: this Python has no light-the-torch (or, if it had, the
    package does not exist)."""
    return Plan([Step("torch", ["medtune-no-such-package>=1"], "x")], installed_distributions())


def test_a_failed_step_keeps_its_log_and_says_where(install_tmp):
    job = InstallJob(_harmless_failing_plan()).start()  # a real child process of this Python
    state = job.wait(timeout=120)
    assert state.finished and not state.ok and "\n" not in state.error
    assert state.error.startswith("could not install medtune-no-such-package>=1")
    log = Path(re.fullmatch(r".*\(log: (.+)\)", state.error).group(1))
    assert job.workdir is not None and job.workdir.parent == install_tmp and log == job.workdir / "step_0.log"
    assert log.read_text().strip()  # the child's own output, kept for the user
    shutil.rmtree(job.workdir)  # (the fixture checks that nothing else is left)


def test_a_cancelled_install_removes_its_work_folder():
    job = InstallJob(_harmless_failing_plan()).start()
    assert job.workdir is not None and job.workdir.is_dir() and job.process is not None
    job.cancel()  # kills the step (if still running); nothing was installed, so no roll-back step
    state = job.wait(timeout=60)
    assert state.finished and not state.ok and state.error == "installation cancelled; nothing was changed"
    assert not job.workdir.exists() and len(job.commands) == 1
