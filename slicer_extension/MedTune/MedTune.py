"""MedTune scripted module: thin Slicer wiring around the Qt-free logic in ``MedTuneLib``.

Only this file imports ``slicer``'s application layer, ``qt`` and ``ctk``. Everything testable lives in
``MedTuneLib`` (tested in CI against slicer-core); ``MedTuneTest`` runs the same loop inside the app.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MEDTUNE_MISSING = (
    "The MedTune Python package is not installed in Slicer's Python. Install it from the Python console with "
    "slicer.util.pip_install('medtune')."
)


class MedTune(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedTune"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedTune developers"]
        self.parent.helpText = (
            "Label a dataset folder, fine-tune a MONAI model on it, export to ONNX and run it on volumes."
        )
        self.parent.acknowledgementText = "Built on MONAI, ONNX Runtime and 3D Slicer."


class MedTuneWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panels Dataset / Label / Fine-tune / Export / Run; every action delegates to :class:`MedTuneLogic`."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedTuneLogic | None = None
        self._loaded: tuple[str, Any] | None = None  # (case id, segmentation node) of the case being labeled

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/MedTune.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedTuneLogic()
        self.ui.openDatasetButton.connect("clicked(bool)", self.onOpenDataset)
        self.ui.importButton.connect("clicked(bool)", self.onImport)
        self.ui.loadCaseButton.connect("clicked(bool)", self.onLoadCase)
        self.ui.saveLabelsButton.connect("clicked(bool)", self.onSaveLabels)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    def cleanup(self) -> None:
        self.removeObservers()

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        self._loaded = None

    def onOpenDataset(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to open the dataset.", waitCursor=True):
            self.logic.open_dataset(self.ui.datasetPathLineEdit.currentPath, self.ui.labelsLineEdit.text)
            self._refreshCases()

    def onImport(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to import the volume.", waitCursor=True):
            volume = self.ui.inputVolumeSelector.currentNode()
            self.logic.import_volume(volume, self.ui.inputSegmentationSelector.currentNode())
            self._refreshCases()

    def onLoadCase(self) -> None:
        item = self.ui.caseListWidget.currentItem()
        if item is None:
            return
        with slicer.util.tryWithErrorDisplay("Failed to load the case.", waitCursor=True):
            case_id = item.data(qt.Qt.UserRole)
            volume, segmentation = self.logic.load_case(case_id)
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
            self._loaded = (case_id, segmentation)

    def onSaveLabels(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to save the labels.", waitCursor=True):
            if self._loaded is None:
                raise ValueError("Load a case first.")
            self.logic.save_labels(*self._loaded)
            self._refreshCases()

    def _refreshCases(self) -> None:
        self.ui.caseListWidget.clear()
        for case in self.logic.list_cases():
            item = qt.QListWidgetItem(f"{case['id']}  [{case['status']}]")
            item.setData(qt.Qt.UserRole, case["id"])
            self.ui.caseListWidget.addItem(item)


class MedTuneLogic(ScriptedLoadableModuleLogic):
    """Slicer-side wrapper of ``MedTuneLib.dataset_logic.DatasetLogic`` (no Qt here either)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.dataset: Any = None

    @staticmethod
    def _lib() -> Any:
        try:
            from MedTuneLib import dataset_logic
        except ImportError as exc:  # medtune (the package) missing from Slicer's Python
            raise RuntimeError(MEDTUNE_MISSING) from exc
        return dataset_logic

    def open_dataset(self, path: str, labels_text: str = "") -> Any:
        """Open the dataset at ``path``, or create a 3D segmentation dataset with labels ``"1: liver, 2: tumor"``."""
        lib = self._lib()
        if not path:
            raise ValueError("Choose a dataset folder.")
        self.dataset = lib.DatasetLogic.create_or_open(path, "segmentation", lib.parse_labels(labels_text))
        return self.dataset

    def _require(self) -> Any:
        if self.dataset is None:
            raise ValueError("Open a dataset first.")
        return self.dataset

    def import_volume(self, volume_node: Any, segmentation_node: Any = None) -> str:
        if volume_node is None:
            raise ValueError("Select a volume to import.")
        return self._require().import_volume(volume_node, segmentation_node)

    def list_cases(self) -> list[dict[str, str]]:
        return self._require().list_cases()

    def load_case(self, case_id: str) -> tuple[Any, Any]:
        return self._require().load_case(case_id, slicer.mrmlScene)

    def save_labels(self, case_id: str, segmentation_node: Any) -> None:
        if segmentation_node is None:
            raise ValueError("The case has no segmentation to save.")
        self._require().save_labels(case_id, segmentation_node)


class MedTuneTest(ScriptedLoadableModuleTest):
    """In-app self-test: import -> list -> load -> edit -> save, through the module logic."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_labeling_loop()

    def test_labeling_loop(self) -> None:
        import numpy as np

        self.delayDisplay("Starting the labeling loop test")
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MedTuneTestVolume")
        kji = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
        slicer.util.updateVolumeFromArray(volume, kji)
        volume.SetSpacing(0.8, 0.9, 2.0)
        volume.SetOrigin(10.0, -20.0, 30.0)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedTuneTestSeg")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        mask = np.zeros(kji.shape, np.uint8)
        mask[1:4, 2:5, 2:6] = 1
        seg_id = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, seg_id, volume)

        logic = MedTuneLogic()
        with tempfile.TemporaryDirectory() as tmp:
            logic.open_dataset(os.path.join(tmp, "ds"), "1: liver")
            case_id = logic.import_volume(volume, segmentation)
            self.assertEqual(logic.list_cases(), [{"id": case_id, "status": "labeled", "split": "training"}])
            volume2, segmentation2 = logic.load_case(case_id)
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume2), kji)
            loaded = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation2, "label_1", volume2)
            np.testing.assert_array_equal(loaded > 0, mask > 0)
            logic.save_labels(case_id, segmentation2)
            self.assertTrue(os.listdir(os.path.join(tmp, "ds", ".versions")))
        self.delayDisplay("Test passed")
