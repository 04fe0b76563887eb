"""Initialize slicer-core without the Slicer application (for tests and scripts; never used by the app).

Order (see ``shared/notes/slicer-core-headless.md``): scene; application logic; Colors logic with default
color nodes registered as module "Colors"; empty slice/view logic collections; then the Volumes,
Segmentations and SubjectHierarchy logics. ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` are set
so that ``slicer.util`` helpers work.
"""

from __future__ import annotations

import types
from typing import Any

_STATE: dict[str, Any] = {}


def init_headless_slicer() -> Any:
    """Return the headless ``vtkMRMLScene`` (created once; later calls return the same scene)."""
    if "scene" in _STATE:
        return _STATE["scene"]
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)

    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLApplicationLogic(app_logic)  # before AddDefaultColorNodes (it looks up color files)
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", color_logic)
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())

    logics: dict[str, Any] = {"colors": color_logic}
    for key, name, cls in (
        ("volumes", "Volumes", slicer.vtkSlicerVolumesLogic),
        ("segmentations", "Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("subjecthierarchy", "SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[key] = logic

    expose_to_slicer_util(scene, logics)
    _STATE.update(scene=scene, app_logic=app_logic, logics=logics)
    return scene


def expose_to_slicer_util(scene: Any, logics: dict[str, Any]) -> None:
    """Set ``slicer.mrmlScene`` and ``slicer.modules.<key>.logic()`` (what ``slicer.util`` helpers use) to
    ``scene`` and ``logics`` (``{"volumes": ..., "segmentations": ...}``); the studio calls it for trame-slicer's."""
    import slicer

    slicer.mrmlScene = scene
    modules = getattr(slicer, "modules", None) or types.SimpleNamespace()
    for key, logic in logics.items():
        setattr(modules, key, types.SimpleNamespace(logic=lambda logic=logic: logic))
    slicer.modules = modules
