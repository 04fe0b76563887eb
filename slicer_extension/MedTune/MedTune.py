"""MedTune scripted module: thin Slicer wiring around the Qt-free logic in ``MedTuneLib``.

Only this file imports ``qt``, ``ctk`` and Slicer's application layer. Every action goes to
``MedTuneLib.module_logic.MedTuneSession`` (tested in CI against slicer-core); long work runs in a child
process (fine-tune, export) or a worker thread (ONNX inference) and is polled by a ``QTimer``, so the UI
never blocks. ``MedTuneTest`` runs the whole loop inside the app.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
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

TASKS = {"segmentation (3D)": ("segmentation", 3), "classification (3D)": ("classification", 3),
         "classification (2D)": ("classification", 2)}  # fmt: skip
PRECISIONS = ("fp32", "fp16", "int8")
POLL_MS = 500


class MedTune(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedTune"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedTune developers"]
        self.parent.helpText = (
            "Label a dataset folder, fine-tune a pretrained MONAI model on it, export it to a validated ONNX model "
            "and run it on volumes (CPU, CUDA or TensorRT)."
        )
        self.parent.acknowledgementText = "Built on MONAI, ONNX Runtime and 3D Slicer."


class MedTuneWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panels Dataset / Label / Fine-tune / Export / Run; every action delegates to :class:`MedTuneLogic`."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedTuneLogic | None = None
        self.timer: Any = None

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/MedTune.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedTuneLogic()
        self._populateCombos()
        for button, slot in (
            (self.ui.openDatasetButton, self.onOpenDataset),
            (self.ui.importButton, self.onImport),
            (self.ui.importDicomButton, self.onImportDicom),
            (self.ui.nextCaseButton, self.onNextCase),
            (self.ui.loadCaseButton, self.onLoadCase),
            (self.ui.segmentEditorButton, self.onSegmentEditor),
            (self.ui.saveLabelsButton, self.onSaveLabels),
            (self.ui.startFinetuneButton, self.onStartFinetune),
            (self.ui.resumeFinetuneButton, self.onResumeFinetune),
            (self.ui.cancelFinetuneButton, self.onCancelFinetune),
            (self.ui.exportButton, self.onExport),
            (self.ui.cancelExportButton, self.onCancelExport),
            (self.ui.runButton, self.onRun),
        ):
            button.connect("clicked(bool)", slot)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._updateButtons()

    def _populateCombos(self) -> None:
        """Fill the choice boxes (needs the medtune package; retried after the dependency prompt)."""
        if self.ui.presetComboBox.count:
            return
        try:
            from MedTuneLib.finetune_logic import DEVICES, PRESETS, STRATEGIES

            from medtune.runtime.providers import CHOICES as PROVIDERS  # the one owner of provider names
        except ImportError:  # medtune not installed yet: ensure_dependencies() installs it on first use
            return
        for combo, items in (
            (self.ui.taskComboBox, TASKS),
            (self.ui.presetComboBox, PRESETS),
            (self.ui.strategyComboBox, STRATEGIES),
            (self.ui.deviceComboBox, DEVICES),
            (self.ui.precisionComboBox, PRECISIONS),
            (self.ui.providerComboBox, PROVIDERS),
        ):
            combo.clear()
            combo.addItems(list(items))

    def cleanup(self) -> None:
        """Module closed or reloaded: stop the timer and every child process (runs stay resumable)."""
        self.removeObservers()
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None and self.logic.session is not None:
            self.logic.session.cancel_all()

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        session = self.logic.session
        if session is not None:
            session.case_id, session.case_nodes, session.run_task = None, None, None

    # -------------------------------------------------------------------------------------------- dataset
    def onOpenDataset(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to open the dataset.", waitCursor=True):
            if not self.logic.ensure_dependencies():
                return
            self._populateCombos()
            task, spatial_dims = TASKS.get(self.ui.taskComboBox.currentText, ("segmentation", 3))
            ds = self.logic.session.open_dataset(
                self.ui.datasetPathLineEdit.currentPath, task, self.ui.labelsLineEdit.text, spatial_dims
            )
            self.ui.presetComboBox.setCurrentText(self.logic.session.default_preset())
            self.ui.classComboBox.clear()
            if ds.is_classification:
                self.ui.classComboBox.addItem("(unlabeled)")  # no data: import without a class
                for value, name in ds.class_choices():
                    self.ui.classComboBox.addItem(f"{value}: {name}", value)
            self.ui.datasetStatusLabel.text = f"{ds.root}: {ds.meta['task']}, labels {ds.labels}"
            self._refreshCases()

    def onImport(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to import the volume.", waitCursor=True):
            session = self.logic.require_session()
            class_value = self._pickedClass() if session.dataset and session.dataset.is_classification else None
            case_id = session.import_volume(
                self.ui.inputVolumeSelector.currentNode(), self.ui.inputSegmentationSelector.currentNode(), class_value
            )
            self.ui.datasetStatusLabel.text = f"Imported as {case_id}."
            self._refreshCases()

    def onImportDicom(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to import the DICOM series.", waitCursor=True):
            case_id = self.logic.require_session().import_dicom(self.ui.dicomPathLineEdit.currentPath)
            self.ui.datasetStatusLabel.text = f"Imported the series as {case_id}."
            self._refreshCases()

    # ---------------------------------------------------------------------------------------------- label
    def _keepUnsavedLabels(self) -> bool:
        """Before another case replaces the loaded one, offer to save its edits (True: go on)."""
        session = self.logic.session
        if session is None or not session.has_unsaved_labels():
            return True
        if slicer.util.confirmYesNoDisplay(f"Save the labels of {session.case_id} before leaving it?"):
            self.ui.labelStatusLabel.text = session.save_labels()
        return True

    def onNextCase(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to load the next case.", waitCursor=True):
            if not self._keepUnsavedLabels():
                return
            case_id = self.logic.require_session().next_case(slicer.mrmlScene, self.ui.useModelCheckBox.checked)
            if case_id is None:
                self.ui.labelStatusLabel.text = "Every case is labeled."
                return
            self._showCase(case_id)

    def onLoadCase(self) -> None:
        item = self.ui.caseListWidget.currentItem()
        if item is None:
            return
        with slicer.util.tryWithErrorDisplay("Failed to load the case.", waitCursor=True):
            if not self._keepUnsavedLabels():
                return
            case_id = item.data(qt.Qt.UserRole)
            self.logic.require_session().load_case(case_id, slicer.mrmlScene, self.ui.useModelCheckBox.checked)
            self._showCase(case_id)

    def _showCase(self, case_id: str) -> None:
        volume, second = self.logic.session.case_nodes
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        if self.logic.session.dataset.is_classification:
            if second is not None:
                self.ui.classComboBox.setCurrentIndex(self.ui.classComboBox.findData(second))
            current = self.logic.session.dataset.get_class(case_id)
            if current is not None:
                self.ui.classComboBox.setCurrentIndex(self.ui.classComboBox.findData(current))
        elif second is not None:
            second.CreateDefaultDisplayNodes()
        self.ui.labelStatusLabel.text = f"Labeling {case_id}."
        self._refreshCases()

    def onSegmentEditor(self) -> None:
        session = self.logic.session
        if session is None or not session.case_nodes or session.dataset.is_classification:
            return
        volume, segmentation = session.case_nodes
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(segmentation)
        if hasattr(editor, "setSourceVolumeNode"):  # Slicer >= 5.4
            editor.setSourceVolumeNode(volume)
        else:
            editor.setMasterVolumeNode(volume)

    def onSaveLabels(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to save the labels (nothing was lost).", waitCursor=True):
            session = self.logic.require_session()
            class_value = self._pickedClass() if session.dataset and session.dataset.is_classification else None
            self.ui.labelStatusLabel.text = session.save_labels(class_value)
            self._refreshCases()

    def _pickedClass(self) -> int | None:
        data = self.ui.classComboBox.currentData
        return None if data is None else int(data)

    # ------------------------------------------------------------------------------------------- finetune
    def onStartFinetune(self, resume: bool = False) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to start fine-tuning.", waitCursor=True):
            if not self.logic.ensure_dependencies(training=True):
                return
            self.logic.start_finetune(
                run=self.ui.runPathLineEdit.currentPath.strip(),
                preset=self.ui.presetComboBox.currentText,
                arch=self.ui.archLineEdit.text.strip(),
                pretrained=self.ui.pretrainedLineEdit.text.strip(),
                strategy=self.ui.strategyComboBox.currentText,
                epochs=self.ui.epochsSpinBox.value,
                device=self.ui.deviceComboBox.currentText,
                resume=resume,
            )
            self.ui.runPathLineEdit.currentPath = str(self.logic.session.job.run_dir)
            self.ui.finetuneProgressBar.setValue(0)
            self.timer.start()
            self._updateButtons()

    def onResumeFinetune(self) -> None:
        self.onStartFinetune(resume=True)

    def onCancelExport(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to cancel the export.", waitCursor=True):
            self.logic.require_session().cancel_export()
            self.ui.exportStatusLabel.text = "Export cancelled."
            self._updateButtons()

    def onCancelFinetune(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to cancel.", waitCursor=True):
            self.logic.require_session().cancel_finetune()
            self.ui.finetuneStatusLabel.text = "Cancelled; Resume continues from the last saved epoch."
            self._updateButtons()

    # ------------------------------------------------------------------------------------ export and run
    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to start the export.", waitCursor=True):
            run = self.ui.runPathLineEdit.currentPath or None
            self.logic.require_session().start_export(run, self.ui.precisionComboBox.currentText)
            self.ui.exportStatusLabel.text = "Exporting and checking against PyTorch..."
            self.timer.start()
            self._updateButtons()

    def onModelPathChanged(self, path: str) -> None:
        if self.logic.session is not None:
            self.logic.session.set_model(path or None)
            self._startPrefill()

    def _startPrefill(self) -> None:
        """Pre-fill the unlabeled cases with the current model in the background (for the uncertainty order)."""
        session = self.logic.session
        if session is None or session.dataset is None or not self.ui.useModelCheckBox.checked:
            return
        with slicer.util.tryWithErrorDisplay("Failed to pre-fill the cases.", waitCursor=False):
            if session.start_prefill(self.ui.providerComboBox.currentText):
                self.ui.labelStatusLabel.text = "Pre-filling the unlabeled cases with the model..."
                self.timer.start()

    def onRun(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to run the model.", waitCursor=True):
            session = self.logic.require_session()
            session.set_model(self.ui.modelPathLineEdit.currentPath or session.model_path)
            session.start_run(self.ui.runVolumeSelector.currentNode(), self.ui.providerComboBox.currentText)
            self.ui.runStatusLabel.text = "Running (the first TensorRT run builds its engine)..."
            self.timer.start()
            self._updateButtons()

    # ---------------------------------------------------------------------------------------------- timer
    def onTimer(self) -> None:
        """Render one :meth:`MedTuneSession.poll`; errors are shown once, with the timer stopped meanwhile."""
        session = self.logic.session
        if session is None:
            self.timer.stop()
            return
        report = session.poll()
        if report.finetune is not None:
            self.ui.finetuneProgressBar.setValue(int(round(100 * report.finetune.fraction)))
            self.ui.finetuneStatusLabel.text = report.finetune.text()
        if report.export_result is not None:
            self.ui.exportStatusLabel.text = report.export_result.text()
            self.ui.modelPathLineEdit.currentPath = str(session.model_path)  # also starts the pre-fill
        if report.run_result is not None:
            self._showRunResult(report.run_result)
        if report.prefilled is not None:
            self.ui.labelStatusLabel.text = f"Pre-filled {report.prefilled} case(s); most uncertain first."
            self._refreshCases()
        if not report.busy and not session.busy():
            self.timer.stop()
        self._updateButtons()
        if report.errors:
            self.timer.stop()
            slicer.util.errorDisplay("\n".join(report.errors))
            if session.busy():
                self.timer.start()

    def _showRunResult(self, result: Any) -> None:
        if result.task == "segmentation":
            slicer.util.setSliceViewerLayers(background=result.volume)
        else:
            layout = slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView
            slicer.app.layoutManager().setLayout(layout)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(result.node.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
        message = f" ({result.provider_message})" if result.provider_message else ""
        self.ui.runStatusLabel.text = (
            f"{result.node.GetName()}: done on {result.provider}{message}; mean entropy {result.mean_entropy:.3f}"
        )

    def _updateButtons(self) -> None:
        session = self.logic.session if self.logic else None
        running = session is not None and session.job is not None and not session.job.state.finished
        self.ui.startFinetuneButton.enabled = not running
        self.ui.resumeFinetuneButton.enabled = not running
        self.ui.cancelFinetuneButton.enabled = running
        exporting = session is not None and session.export_job is not None
        self.ui.exportButton.enabled = not running and not exporting
        self.ui.cancelExportButton.enabled = exporting
        self.ui.runButton.enabled = session is None or session.run_task is None

    def _refreshCases(self) -> None:
        self.ui.caseListWidget.clear()
        session = self.logic.session
        for case in session.cases(self.ui.useModelCheckBox.checked):
            entropy = f", uncertainty {case['entropy']:.3f}" if case.get("entropy") is not None else ""
            item = qt.QListWidgetItem(f"{case['id']}  [{case['status']}, {case['split']}{entropy}]")
            item.setData(qt.Qt.UserRole, case["id"])
            self.ui.caseListWidget.addItem(item)


class MedTuneLogic(ScriptedLoadableModuleLogic):
    """Slicer-side entry to ``MedTuneLib``: dependency installation, then a ``MedTuneSession`` (no Qt here)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session: Any = None

    @staticmethod
    def python_executable() -> str:
        """Slicer's Python launcher for child processes (``PythonSlicer``), else this interpreter."""
        return shutil.which("PythonSlicer") or sys.executable

    def ensure_dependencies(self, training: bool = False, ask: bool = True) -> bool:
        """Install what MedTune needs on first use, after the user agrees; never replaces installed packages."""
        from MedTuneLib.dependencies import dependency_plan, run_plan

        has_torch_extension = hasattr(slicer.modules, "pytorchutils")
        repo = Path(__file__).resolve().parents[2]  # a source checkout: install medtune from it
        source = str(repo) if (repo / "pyproject.toml").is_file() else "medtune"
        plan = dependency_plan(pytorch_extension=has_torch_extension, training=training, medtune_source=source)
        if plan.needed:
            if ask and not slicer.util.confirmOkCancelDisplay(plan.text(), "MedTune needs Python packages"):
                return False

            def install_torch() -> None:
                import PyTorchUtils

                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)

            run_plan(plan, slicer.util.pip_install, install_torch, tempfile.mkdtemp(prefix="medtune-deps-"))
        if self.session is None:
            from MedTuneLib.module_logic import MedTuneSession

            self.session = MedTuneSession(python=self.python_executable())
        return True

    def require_session(self) -> Any:
        if self.session is None:
            raise ValueError("Open a dataset first.")
        return self.session

    def start_finetune(self, *, run: str, preset: str, arch: str, pretrained: str, strategy: str, epochs: int,
                       device: str, resume: bool = False) -> Any:  # fmt: skip
        """Start a run with the Fine-tune panel's choices, or resume one with its own settings."""
        from MedTuneLib.finetune_logic import FinetuneSettings

        session = self.require_session()
        ds = session.require_dataset()
        if resume:
            folder = run or str(session.resumable_run() or "")
            if not folder:
                raise ValueError("No interrupted run to resume in this dataset.")
            return session.start_finetune(FinetuneSettings(ds.root, folder), resume=True)
        settings = FinetuneSettings(ds.root, session.run_dir_for_start(run), preset=preset,
                                    pretrained=pretrained or None, strategy=strategy, epochs=epochs, device=device,
                                    arch=arch or None)  # fmt: skip
        return session.start_finetune(settings)


class MedTuneTest(ScriptedLoadableModuleTest):
    """In-app self-test: the loop of ``tests/test_slicer_loop.py`` through the module logic.

    import (with segmentation) -> label a case -> fine-tune (child process, 1 epoch, tiny net) -> export
    (parity gate) -> run on a volume -> the segmentation node equals the torch-free runtime's NIfTI output.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_full_loop()

    def _poll(self, fn: Any, timeout: float = 900.0) -> Any:
        import time

        deadline = time.monotonic() + timeout
        while (result := fn()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn} did not finish in {timeout} s")
            slicer.app.processEvents()
            time.sleep(0.2)
        return result

    def test_full_loop(self) -> None:
        import json

        import nibabel as nib
        import numpy as np
        from MedTuneLib.finetune_logic import FinetuneSettings

        from medtune.data.synthetic import make_synthetic_segmentation
        from medtune.runtime.segment import load_volume_model, segment_file

        self.delayDisplay("MedTune loop: import -> label -> fine-tune -> export -> run")
        logic = MedTuneLogic()
        self.assertTrue(logic.ensure_dependencies(training=True, ask=False))
        session = logic.session
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "source")
            make_synthetic_segmentation(source, n_train=7, n_val=1, size=16, seed=5)
            with open(os.path.join(source, "datalist.json"), encoding="utf-8") as fh:
                entries = json.load(fh)
            cases = entries["training"] + entries["validation"]
            session.open_dataset(os.path.join(tmp, "ds"), "segmentation", "1: inner, 2: outer")
            ids = []
            for n, entry in enumerate(cases):
                volume = slicer.util.loadVolume(os.path.join(source, entry["image"]))
                segmentation = None
                if n < 6:
                    segmentation = slicer.util.loadSegmentation(os.path.join(source, entry["label"]))
                ids.append(session.import_volume(volume, segmentation))
            self.assertEqual(session.next_case(slicer.mrmlScene, use_model=False), ids[6])
            volume, segmentation = session.case_nodes
            truth = np.asarray(nib.load(os.path.join(source, cases[6]["label"])).dataobj)
            for value in (1, 2):
                kji = np.ascontiguousarray((truth == value).transpose(2, 1, 0).astype(np.uint8))
                slicer.util.updateSegmentBinaryLabelmapFromArray(kji, segmentation, f"label_{value}", volume)
            session.save_labels()
            self.delayDisplay("Fine-tuning (child process)")
            run = session.new_run_dir()
            settings = FinetuneSettings(session.dataset.root, run, preset="3d_segmentation", pretrained="none",
                                        epochs=1, device="cpu", arch="tiny_unet",
                                        overrides={"patch_size": [16, 16, 16], "num_workers": 0})  # fmt: skip
            session.start_finetune(settings)
            state = self._poll(lambda: s if (s := session.poll_finetune()).finished else None)
            self.assertEqual(state.status, "completed", session.job.last_log_line())
            self.delayDisplay("Exporting")
            session.start_export(precision="fp32")
            exported = self._poll(session.poll_export)
            self.assertTrue(exported.parity["passed"])
            current = slicer.util.loadVolume(str(session.dataset.root / "images" / f"{ids[7]}.nii.gz"))
            session.start_run(current)
            result = self._poll(session.finish_run)
            out = os.path.join(tmp, "runtime.nii.gz")
            segment_file(load_volume_model(session.model_path), current.GetStorageNode().GetFileName(), out)
            runtime = np.asarray(nib.load(out).dataobj)
            scene_labels = np.zeros(runtime.shape[::-1], np.uint8)
            for value in (1, 2):
                got = slicer.util.arrayFromSegmentBinaryLabelmap(result.node, f"label_{value}", current)
                scene_labels[got > 0] = value
            np.testing.assert_array_equal(scene_labels.transpose(2, 1, 0), runtime)
        self.delayDisplay("Test passed")
