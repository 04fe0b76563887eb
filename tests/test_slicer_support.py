"""Supported Slicer releases, the medtune package the extension brings (staged, version-checked, never installed
by name), Reload of MedTuneLib, and the panels' parameter node saved with the scene."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "slicer_extension" / "MedTune"

from MedTuneLib import support  # noqa: E402


@pytest.mark.parametrize(
    ("slicer_version", "python", "ok"),
    [((5, 6), (3, 9), False), ((5, 8), (3, 9), False), ((5, 10), (3, 12), True), ((5, 12), (3, 12), True),
     ((5, 13), (3, 12), True), ((5, 10), (3, 9), False)],
)  # fmt: skip
def test_version_gate_is_one_line(slicer_version, python, ok):
    reason = support.unsupported_reason(slicer_version, python)
    if ok:
        assert reason is None
    else:
        assert reason.startswith("MedTune needs 3D Slicer 5.10 or newer (Python 3.12)") and "\n" not in reason
        assert f"Slicer {slicer_version[0]}.{slicer_version[1]} with Python {python[0]}.{python[1]}" in reason


def test_version_gate_runs_on_python_39_syntax():
    """support.py is imported before anything else: it must parse on the Python 3.9 of Slicer 5.8 (vermin)."""
    import shutil

    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin not installed (the py312 CI job has it)")
    out = subprocess.run([vermin, "-q", "--no-tips", "--violations", "-t=3.9-",
                          str(MODULE / "MedTuneLib" / "support.py")], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_module_version_is_the_packages():
    import medtune

    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert support.MEDTUNE_VERSION == medtune.__version__ == declared
    cmake = (REPO / "slicer_extension" / "CMakeLists.txt").read_text(encoding="utf-8")
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', cmake).group(1)
    assert homepage == support.HOMEPAGE and homepage.startswith("https://github.com/")
    assert 'EXTENSION_ICONURL "${EXTENSION_HOMEPAGE}/raw/main/slicer_extension/MedTune/Resources/Icons' in cmake
    assert "example.org" not in cmake and (MODULE / "Resources" / "Icons" / "MedTune.png").is_file()


def test_staged_package_is_complete_and_used_by_child_processes(tmp_path):
    """The packaged layout (what CMake installs next to MedTune.py): medtune + medtune.export + medtune.bundle
    from the three source trees, sources only; a child process given ``child_env`` imports exactly it."""
    module_dir = tmp_path / "qt-scripted-modules"
    support.stage_medtune(str(REPO), str(module_dir))
    pkg = module_dir / "medtune"
    assert (pkg / "__init__.py").is_file() and (pkg / "runtime" / "dicom.py").is_file()
    assert (pkg / "export" / "__init__.py").is_file() and list((pkg / "bundle" / "configs").glob("*.json"))
    assert not list(pkg.rglob("__pycache__")) and not list(pkg.rglob("*.pt"))
    assert support.package_version(str(module_dir)) == support.MEDTUNE_VERSION
    support.stage_medtune(str(REPO), str(module_dir))  # again: replaces, never nests
    assert not (pkg / "medtune").exists()

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from MedTuneLib import support\n"
        "root = support.use_medtune(sys.argv[2])\n"
        "import importlib.util, medtune.runtime.dicom, os\n"
        "for name in ('medtune', 'medtune.runtime.dicom', 'medtune.export', 'medtune.bundle'):\n"
        "    origin = importlib.util.find_spec(name).origin\n"
        "    assert origin.startswith(os.path.join(root, 'medtune')), (name, origin)\n"
        "print(support.child_env({'PYTHONPATH': 'elsewhere'})['PYTHONPATH'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(MODULE), str(module_dir)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.pathsep.join([str(module_dir), "elsewhere"])


def test_checkout_load_stages_the_checkout(tmp_path):
    """Loaded from a source checkout (Additional module paths): the checkout's own sources, staged in build/."""
    root = support.find_medtune_root(str(MODULE))
    assert Path(root) == REPO / "build" / "slicer-medtune" and (Path(root) / "medtune" / "export").is_dir()
    assert support.checkout_root(str(tmp_path)) is None


def test_wrong_or_missing_package_is_a_one_line_refusal(tmp_path):
    with pytest.raises(RuntimeError, match="medtune package is missing from this extension"):
        support.find_medtune_root(str(tmp_path))
    (tmp_path / "medtune").mkdir()
    (tmp_path / "medtune" / "__init__.py").write_text('__version__ = "9.9.9"\n')
    with pytest.raises(RuntimeError, match=r"module 0\.1\.0 found medtune 9\.9\.9 .* must be the same version"):
        support.use_medtune(str(tmp_path))
    other = tmp_path / "other"
    support.stage_medtune(str(REPO), str(other))
    with pytest.raises(RuntimeError, match="another medtune package is already loaded"):
        support.use_medtune(str(other))  # this test process imported the checkout's medtune already


def test_reload_purges_medtunelib():
    import MedTuneLib.dataset_logic as before

    names = support.lib_modules(sys.modules)
    assert "MedTuneLib" in names and "MedTuneLib.dataset_logic" in names and "MedTuneLib.support" in names
    assert not any(n.startswith(("medtune", "slicer", "vtk")) for n in names)
    saved = {n: sys.modules[n] for n in names}
    try:
        support.purge_lib_modules()
        import MedTuneLib.dataset_logic as after

        assert after is not before  # re-executed from disk, as the Reload button needs
    finally:
        sys.modules.update(saved)


def test_panel_state_is_saved_with_the_scene(scene, tmp_path):
    import slicer
    from MedTuneLib.panel_state import PanelState, get_node, parameter_node, set_node

    node = parameter_node(scene)
    assert parameter_node(scene) is node  # one per scene
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    state = PanelState(datasetPath=str(tmp_path / "ds"), task="classification (2D)", labels="1: a, 2: b",
                       useModel=False, epochs=3, folds=3, foldsRefit=True, provider="cpu", precision="int8",
                       studyFolds=5)  # fmt: skip
    state.write(node)
    set_node(node, "runVolume", volume)
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "scene.mrml"))
    assert loaded.Connect()
    restored = parameter_node(loaded)
    assert PanelState.read(restored) == state
    assert get_node(restored, "runVolume").GetName() == "ct" and get_node(restored, "inputVolume") is None
    restored.SetParameter("epochs", "many")  # malformed: the default, never an exception
    assert PanelState.read(restored).epochs == PanelState().epochs
    assert PanelState.read(restored).studyFolds == 5 and PanelState().studyFolds == 0  # 0: no cross-validation
    assert PanelState.read(restored).folds == 3 and PanelState().folds == -1  # -1: the preset's default_folds
    restored.SetParameter("folds", "0")
    assert PanelState.read(restored).folds == 0  # one run, chosen
    with pytest.raises(ValueError, match="unknown node role"):
        set_node(restored, "nonsense", None)


def test_panel_setup_needs_only_slicers_own_packages(tmp_path):
    """What the Widget imports before the first-use install (version gate, bundled medtune, choice boxes, the
    dependency plan) works in a Python without onnxruntime, nibabel, the decoders or torch (a fresh Slicer)."""
    module_dir = tmp_path / "module"
    support.stage_medtune(str(REPO), str(module_dir))
    code = (
        "import sys, importlib.abc\n"
        "BLOCKED = {'onnxruntime', 'nibabel', 'pylibjpeg', 'libjpeg', 'openjpeg', 'torch', 'monai', 'highdicom'}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is not installed (blocked by the test)')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from MedTuneLib import support\n"
        "support.use_medtune(sys.argv[2])\n"
        "from MedTuneLib.panel_state import choices\n"
        "from MedTuneLib.dependencies import dependency_plan\n"
        "items = choices()\n"
        "assert items['provider'][:2] == ('auto', 'cpu') and items['preset'] and items['task'], items\n"
        "assert 'onnxruntime' not in sys.modules\n"
        "print(','.join(items['provider']))\n"
        "slicer_own = {'numpy': '2.3.4', 'pydicom': '2.4.4', 'pillow': '11.3.0', 'scipy': '1.16', 'packaging': '25'}\n"
        "plan = dependency_plan(slicer_own, gpu=False, training=False)\n"
        "assert plan.needed and not plan.errors, plan.text()\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(MODULE), str(module_dir)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    if importlib.util.find_spec("onnxruntime") is not None:
        from medtune.runtime.providers import CHOICES

        assert out.stdout.strip() == ",".join(CHOICES)  # the owner's list (medtune.names), without onnxruntime


def test_choice_lists_have_one_owner():
    """The Slicer combos show the owners' lists (medtune.names): the runtime's providers, the exporter's
    precisions, the runner's presets and the strategies the CLI accepts."""
    from MedTuneLib.panel_state import choices

    from medtune import names

    items = choices()
    assert (items["preset"], items["strategy"]) == (names.PRESETS, names.STRATEGIES)
    assert (items["precision"], items["provider"]) == (names.PRECISIONS, names.PROVIDERS)
    if importlib.util.find_spec("onnxruntime") is not None:
        from medtune.runtime.providers import CHOICES

        assert CHOICES is names.PROVIDERS
    pytest.importorskip("torch", reason="torch not installed: the exporter's precision list cannot be imported")
    from medtune.export.from_run import PRECISIONS as EXPORT_PRECISIONS
    from medtune.finetune.strategies import STRATEGIES

    assert EXPORT_PRECISIONS is names.PRECISIONS and STRATEGIES is names.STRATEGIES
