"""The panels' state kept in the scene's MedTune parameter node (saved with the scene, restored when it loads).

The parameter node is the ``vtkMRMLScriptedModuleNode`` that ``ScriptedLoadableModuleLogic.getParameterNode()``
returns in the app (a singleton tagged with the module name); here it is any such node, so the round trip
through a saved scene is tested against slicer-core. Text and numbers are node parameters, the selected volume
and segmentation nodes are node references. No Qt: the Widget copies between the widgets and :class:`PanelState`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

MODULE_NAME = "MedTune"
NODE_REFERENCES = ("inputVolume", "inputSegmentation", "runVolume")
TASKS = {"segmentation (3D)": ("segmentation", 3), "classification (3D)": ("classification", 3),
         "classification (2D)": ("classification", 2)}  # fmt: skip


def choices() -> dict[str, tuple[str, ...]]:
    """The items of each choice box, from their owners; works before any first-use install."""
    from medtune import names  # the names' one owner: torch-free, imports nothing

    from .finetune_logic import DEVICES

    return {"task": tuple(TASKS), "preset": names.PRESETS, "strategy": names.STRATEGIES, "device": DEVICES,
            "precision": names.PRECISIONS, "provider": names.PROVIDERS}  # fmt: skip

@dataclass
class PanelState:
    """Every choice on the five panels (defaults: what a new scene shows)."""

    datasetPath: str = ""
    task: str = "segmentation (3D)"
    labels: str = ""
    dicomPath: str = ""
    useModel: bool = True
    preset: str = ""
    arch: str = ""
    pretrained: str = ""
    strategy: str = "full"
    epochs: int = 10
    folds: int = -1  # -1: the preset's default_folds; 0: one run; K >= 2: a K-fold ensemble run
    foldsRefit: bool = False  # a K-fold run deploys one model refit on all cases (folds_deploy refit)
    device: str = "auto"
    runPath: str = ""
    precision: str = "fp32"
    modelPath: str = ""
    provider: str = "auto"
    studySources: str = "scratch"
    studyLabels: str = "25%,100%"
    studySeeds: int = 3
    studyFolds: int = 0  # 0: the dataset's validation split; K >= 2: K-fold cross-validation
    studyPath: str = ""

    def write(self, node: Any) -> None:
        """Store into the parameter node (one Modified event)."""
        was = node.StartModify()
        try:
            for f in fields(self):
                value = getattr(self, f.name)
                node.SetParameter(f.name, str(int(value)) if isinstance(value, bool) else str(value))
        finally:
            node.EndModify(was)

    @classmethod
    def read(cls, node: Any) -> PanelState:
        """Restore from the parameter node; missing or malformed values keep their defaults."""
        state = cls()
        for f in fields(cls):
            text = node.GetParameter(f.name)
            if not text:
                continue
            default = getattr(state, f.name)
            try:
                value: Any = bool(int(text)) if isinstance(default, bool) else type(default)(text)
            except ValueError:
                continue
            setattr(state, f.name, value)
        return state


def set_node(parameter_node: Any, role: str, node: Any) -> None:
    """Reference ``node`` (or none) from the parameter node under ``role`` (one of :data:`NODE_REFERENCES`)."""
    if role not in NODE_REFERENCES:
        raise ValueError(f"unknown node role {role!r}")
    parameter_node.SetNodeReferenceID(role, node.GetID() if node is not None else None)


def get_node(parameter_node: Any, role: str) -> Any:
    """The node referenced under ``role`` (``None`` when none or removed)."""
    return parameter_node.GetNodeReference(role)


def parameter_node(scene: Any) -> Any:
    """The scene's MedTune parameter node, created if missing (headless stand-in for the logic's singleton)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
        if node.GetModuleName() == MODULE_NAME:
            return node
    import slicer

    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetModuleName(MODULE_NAME)
    node.SetName(MODULE_NAME)
    return scene.AddNode(node)
