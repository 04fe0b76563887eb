"""MedTune scripted module: thin Slicer wiring around the Qt-free logic in ``MedTuneLib``.

Only this file imports ``qt`` and Slicer's application layer. Every action goes to
``MedTuneLib.module_logic.MedTuneSession`` (tested in CI against slicer-core, on Slicer's Python 3.12); long
work runs in child processes (dependency installs, fine-tune, export) or worker threads (choosing and
pre-filling cases, running a model) and is polled by a ``QTimer``, so the UI never blocks. Questions are asked
before any wait cursor is set. The panels' state lives in the module's parameter node (saved with the scene).

On an unsupported Slicer (before 5.10: Python 3.9) the panel shows one line saying what is needed; nothing
is imported or installed. ``MedTuneTest`` checks the module inside the app; its full loop is opt-in.
"""

from __future__ import annotations

import os
import sys
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

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)
from MedTuneLib import support  # noqa: E402 - parses on every Slicer Python (the version gate)

POLL_MS = 500


def unsupported_reason() -> str | None:
    """One line when this Slicer / Python cannot run MedTune, else ``None``."""
    return support.unsupported_reason((slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info)


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
            f"and run it on volumes (CPU, CUDA or TensorRT). Needs {support.SUPPORTED_TEXT}. "
            f'<a href="{support.HOMEPAGE}">Documentation</a>.'
        )
        self.parent.acknowledgementText = "Built on MONAI, ONNX Runtime and 3D Slicer."


class MedTuneWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panels Dataset / Label / Fine-tune / Export / Run; every action delegates to :class:`MedTuneLogic`."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MedTuneLogic | None = None
        self.timer: Any = None
        self.ui: Any = None
        self._parameterNode: Any = None
        self._updatingGUI = False
        self._afterInstall: Any = None

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = unsupported_reason()
        if problem is None:
            try:
                support.use_medtune(_MODULE_DIR)
            except RuntimeError as exc:
                problem = str(exc)
        if problem is not None:  # one line, nothing imported or installed
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
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
            (self.ui.startStudyButton, self.onStartStudy),
            (self.ui.cancelStudyButton, self.onCancelStudy),
            (self.ui.exportButton, self.onExport),
            (self.ui.cancelExportButton, self.onCancelExport),
            (self.ui.runButton, self.onRun),
        ):
            button.connect("clicked(bool)", slot)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.providerComboBox.connect("currentTextChanged(QString)", self.onProviderChanged)
        # every panel choice goes to the parameter node (saved with the scene)
        for widget, signal in (
            (self.ui.datasetPathLineEdit, "currentPathChanged(QString)"),
            (self.ui.dicomPathLineEdit, "currentPathChanged(QString)"),
            (self.ui.runPathLineEdit, "currentPathChanged(QString)"),
            (self.ui.studyPathLineEdit, "currentPathChanged(QString)"),
            (self.ui.studySourcesLineEdit, "textChanged(QString)"),
            (self.ui.studyLabelsLineEdit, "textChanged(QString)"),
            (self.ui.studySeedsSpinBox, "valueChanged(int)"),
            (self.ui.studyFoldsSpinBox, "valueChanged(int)"),
            (self.ui.modelPathLineEdit, "currentPathChanged(QString)"),
            (self.ui.labelsLineEdit, "textChanged(QString)"),
            (self.ui.archLineEdit, "textChanged(QString)"),
            (self.ui.pretrainedLineEdit, "textChanged(QString)"),
            (self.ui.taskComboBox, "currentTextChanged(QString)"),
            (self.ui.presetComboBox, "currentTextChanged(QString)"),
            (self.ui.strategyComboBox, "currentTextChanged(QString)"),
            (self.ui.deviceComboBox, "currentTextChanged(QString)"),
            (self.ui.precisionComboBox, "currentTextChanged(QString)"),
            (self.ui.providerComboBox, "currentTextChanged(QString)"),
            (self.ui.epochsSpinBox, "valueChanged(int)"),
            (self.ui.finetuneFoldsSpinBox, "valueChanged(int)"),
            (self.ui.foldsRefitCheckBox, "toggled(bool)"),
            (self.ui.useModelCheckBox, "toggled(bool)"),
            (self.ui.inputVolumeSelector, "currentNodeChanged(vtkMRMLNode*)"),
            (self.ui.inputSegmentationSelector, "currentNodeChanged(vtkMRMLNode*)"),
            (self.ui.runVolumeSelector, "currentNodeChanged(vtkMRMLNode*)"),
        ):
            widget.connect(signal, self.updateParameterNodeFromGUI)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.initializeParameterNode()
        self._updateButtons()

    def _populateCombos(self) -> None:
        """Fill the choice boxes from their owners (works before the first-use install)."""
        from MedTuneLib.panel_state import choices

        items = choices()
        for combo, key in (
            (self.ui.taskComboBox, "task"),
            (self.ui.presetComboBox, "preset"),
            (self.ui.strategyComboBox, "strategy"),
            (self.ui.deviceComboBox, "device"),
            (self.ui.precisionComboBox, "precision"),
            (self.ui.providerComboBox, "provider"),
        ):
            current = combo.currentText
            combo.clear()
            combo.addItems(list(items[key]))
            if current and combo.findText(current) >= 0:
                combo.setCurrentText(current)

    def cleanup(self) -> None:
        """Module closed or reloaded: stop the timer and every child process (runs stay resumable)."""
        self.removeObservers()
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.cleanup()

    def onReload(self) -> None:
        """Reload re-executes MedTuneLib too (not only this file), after stopping what runs."""
        self.cleanup()
        support.purge_lib_modules()
        ScriptedLoadableModuleWidget.onReload(self)

    # ------------------------------------------------------------------------------------ parameter node
    def enter(self) -> None:
        if self.ui is not None:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Use the scene's MedTune parameter node and show its state (defaults in a new scene)."""
        self._parameterNode = self.logic.getParameterNode()
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self) -> None:
        from MedTuneLib.panel_state import PanelState, get_node

        state = PanelState.read(self._parameterNode)
        self._updatingGUI = True
        try:
            ui = self.ui
            ui.datasetPathLineEdit.currentPath = state.datasetPath
            ui.dicomPathLineEdit.currentPath = state.dicomPath
            ui.runPathLineEdit.currentPath = state.runPath
            ui.modelPathLineEdit.currentPath = state.modelPath
            ui.labelsLineEdit.text = state.labels or ui.labelsLineEdit.text
            ui.archLineEdit.text, ui.pretrainedLineEdit.text = state.arch, state.pretrained
            combos = ((ui.taskComboBox, state.task), (ui.presetComboBox, state.preset),
                      (ui.strategyComboBox, state.strategy), (ui.deviceComboBox, state.device),
                      (ui.precisionComboBox, state.precision), (ui.providerComboBox, state.provider))  # fmt: skip
            for combo, value in combos:
                if value and combo.findText(value) >= 0:
                    combo.setCurrentText(value)
            ui.epochsSpinBox.value, ui.finetuneFoldsSpinBox.value = state.epochs, state.folds
            ui.studySourcesLineEdit.text, ui.studyLabelsLineEdit.text = state.studySources, state.studyLabels
            ui.studySeedsSpinBox.value, ui.studyPathLineEdit.currentPath = state.studySeeds, state.studyPath
            ui.studyFoldsSpinBox.value = state.studyFolds
            ui.useModelCheckBox.checked = state.useModel
            ui.foldsRefitCheckBox.checked = state.foldsRefit
            for selector, role in ((ui.inputVolumeSelector, "inputVolume"),
                                   (ui.inputSegmentationSelector, "inputSegmentation"),
                                   (ui.runVolumeSelector, "runVolume")):  # fmt: skip
                node = get_node(self._parameterNode, role)
                if node is not None:
                    selector.setCurrentNode(node)
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *_: Any) -> None:
        if self._updatingGUI or self._parameterNode is None:
            return
        from MedTuneLib.panel_state import PanelState, set_node

        ui = self.ui
        PanelState(
            datasetPath=ui.datasetPathLineEdit.currentPath, task=ui.taskComboBox.currentText,
            labels=ui.labelsLineEdit.text, dicomPath=ui.dicomPathLineEdit.currentPath,
            useModel=bool(ui.useModelCheckBox.checked), preset=ui.presetComboBox.currentText,
            arch=ui.archLineEdit.text, pretrained=ui.pretrainedLineEdit.text, strategy=ui.strategyComboBox.currentText,
            epochs=int(ui.epochsSpinBox.value), folds=int(ui.finetuneFoldsSpinBox.value),
            foldsRefit=bool(ui.foldsRefitCheckBox.checked), device=ui.deviceComboBox.currentText,
            runPath=ui.runPathLineEdit.currentPath, precision=ui.precisionComboBox.currentText,
            modelPath=ui.modelPathLineEdit.currentPath, provider=ui.providerComboBox.currentText,
            studySources=ui.studySourcesLineEdit.text, studyLabels=ui.studyLabelsLineEdit.text,
            studySeeds=int(ui.studySeedsSpinBox.value), studyPath=ui.studyPathLineEdit.currentPath,
            studyFolds=int(ui.studyFoldsSpinBox.value),
        ).write(self._parameterNode)  # fmt: skip
        set_node(self._parameterNode, "inputVolume", ui.inputVolumeSelector.currentNode())
        set_node(self._parameterNode, "inputSegmentation", ui.inputSegmentationSelector.currentNode())
        set_node(self._parameterNode, "runVolume", ui.runVolumeSelector.currentNode())

    # ------------------------------------------------------------------------------------- scene events
    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        """Before the scene closes: offer to save the loaded case's labels (no wait cursor is active here)."""
        session = self.logic.session if self.logic else None
        if session is not None and session.has_unsaved_labels():
            if slicer.util.confirmYesNoDisplay(f"Save the labels of {session.case_id} before the scene closes?"):
                with slicer.util.tryWithErrorDisplay("Failed to save the labels (nothing was lost)."):
                    self.ui.labelStatusLabel.text = session.save_labels()

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        session = self.logic.session if self.logic else None
        if session is not None:
            session.case_id, session.case_nodes, session.run_task = None, None, None
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller: Any, event: Any) -> None:
        if self.parent.isEntered:  # a loaded scene brings its own MedTune parameter node
            self.initializeParameterNode()

    # ----------------------------------------------------------------------------------- dependencies
    def _withDependencies(self, training: bool, then: Any) -> None:
        """Run ``then()`` once MedTune's packages are there; install them first (asked, in the background)."""
        if self.logic.install_job is not None:
            slicer.util.showStatusMessage("MedTune is still installing its packages; try again when it is done.", 5000)
            return
        plan = self.logic.dependency_plan(training=training)
        if plan.errors:
            slicer.util.errorDisplay(plan.errors[0], windowTitle="MedTune cannot install its packages")
            return
        if plan.needed:
            if not slicer.util.confirmOkCancelDisplay(plan.text(), windowTitle="MedTune needs Python packages"):
                return
            self.logic.start_install(plan)
            self._afterInstall = then
            self.ui.datasetStatusLabel.text = self.logic.install_job.state.text()
            self.timer.start()
            self._updateButtons()
            return
        then()

    def _pollInstall(self) -> None:
        job = self.logic.install_job
        state = job.poll()
        self.ui.datasetStatusLabel.text = state.text()
        slicer.util.showStatusMessage(state.text(), 2 * POLL_MS)
        if not state.finished:
            return
        self.logic.install_job = None
        then, self._afterInstall = self._afterInstall, None
        self._updateButtons()
        if not state.ok:
            slicer.util.errorDisplay(state.error, windowTitle="MedTune: installation failed")
            return
        self._populateCombos()
        if then is not None:
            then()

    # -------------------------------------------------------------------------------------------- dataset
    def onOpenDataset(self) -> None:
        self._withDependencies(False, self._openDataset)

    def _openDataset(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to open the dataset.", waitCursor=True):
            session = self.logic.require_session(create=True)
            from MedTuneLib.panel_state import TASKS

            task, spatial_dims = TASKS.get(self.ui.taskComboBox.currentText, ("segmentation", 3))
            ds = session.open_dataset(
                self.ui.datasetPathLineEdit.currentPath, task, self.ui.labelsLineEdit.text, spatial_dims
            )
            session.set_provider(self.ui.providerComboBox.currentText)
            self.ui.presetComboBox.setCurrentText(session.default_preset())
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
        """Before another case replaces the loaded one, offer to save its edits (asked with no wait cursor)."""
        session = self.logic.session
        if session is None or not session.has_unsaved_labels():
            return True
        if slicer.util.confirmYesNoDisplay(f"Save the labels of {session.case_id} before leaving it?"):
            with slicer.util.tryWithErrorDisplay("Failed to save the labels (nothing was lost)."):
                self.ui.labelStatusLabel.text = session.save_labels()
        return True

    def onNextCase(self) -> None:
        if not self._keepUnsavedLabels():
            return
        with slicer.util.tryWithErrorDisplay("Failed to choose the next case."):
            self.logic.require_session().start_next_case(self.ui.useModelCheckBox.checked)
            self.ui.labelStatusLabel.text = "Choosing the next case (the model pre-fills what it has not seen)..."
            self.timer.start()
            self._updateButtons()

    def onLoadCase(self) -> None:
        item = self.ui.caseListWidget.currentItem()
        if item is None or not self._keepUnsavedLabels():
            return
        with slicer.util.tryWithErrorDisplay("Failed to load the case."):
            self.logic.require_session().start_load_case(item.data(qt.Qt.UserRole), self.ui.useModelCheckBox.checked)
            self.ui.labelStatusLabel.text = "Preparing the case..."
            self.timer.start()
            self._updateButtons()

    def _loadPreparedCase(self, case_id: str) -> None:
        """Main thread: the prepared case into the scene (files and nodes only; the prediction was made already)."""
        with slicer.util.tryWithErrorDisplay("Failed to load the case.", waitCursor=True):
            self.logic.session.load_case(case_id, slicer.mrmlScene)
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
        editor.setSourceVolumeNode(volume)

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
        self._withDependencies(True, lambda: self._startFinetune(resume))

    def _startFinetune(self, resume: bool) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to start fine-tuning."):
            self.logic.start_finetune(
                run=self.ui.runPathLineEdit.currentPath.strip(),
                preset=self.ui.presetComboBox.currentText,
                arch=self.ui.archLineEdit.text.strip(),
                pretrained=self.ui.pretrainedLineEdit.text.strip(),
                strategy=self.ui.strategyComboBox.currentText,
                epochs=self.ui.epochsSpinBox.value,
                device=self.ui.deviceComboBox.currentText,
                folds=int(self.ui.finetuneFoldsSpinBox.value),
                folds_refit=bool(self.ui.foldsRefitCheckBox.checked),
                resume=resume,
            )
            self.ui.runPathLineEdit.currentPath = str(self.logic.session.job.run_dir)
            self.ui.finetuneProgressBar.setValue(0)
            self.timer.start()
            self._updateButtons()

    def onResumeFinetune(self) -> None:
        self.onStartFinetune(resume=True)

    def onCancelExport(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to cancel the export."):
            self.logic.require_session().cancel_export()
            self.ui.exportStatusLabel.text = "Export cancelled."
            self._updateButtons()

    def onCancelFinetune(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to cancel."):
            self.logic.require_session().cancel_finetune()
            self.ui.finetuneStatusLabel.text = "Cancelled; Resume continues from the last saved epoch."
            self._updateButtons()

    # ---------------------------------------------------------------------------------------------- study
    def onStartStudy(self) -> None:
        self._withDependencies(True, self._startStudy)

    def _startStudy(self) -> None:
        """A label-efficiency study with the Fine-tune panel's preset and epochs (a child process; MedTuneLib's
        ``study_logic``); a study folder planned with the same settings resumes."""
        with slicer.util.tryWithErrorDisplay("Failed to start the study."):
            job = self.logic.require_session().start_study(
                study=self.ui.studyPathLineEdit.currentPath.strip() or None,
                preset=self.ui.presetComboBox.currentText or None,
                sources=self.ui.studySourcesLineEdit.text.strip(),
                labels=self.ui.studyLabelsLineEdit.text.strip(),
                seeds=int(self.ui.studySeedsSpinBox.value),
                folds=int(self.ui.studyFoldsSpinBox.value),
                epochs=int(self.ui.epochsSpinBox.value),
                strategy=self.ui.strategyComboBox.currentText,
            )
            self.ui.studyPathLineEdit.currentPath = str(job.study_dir)
            self.ui.studyProgressBar.setValue(0)
            self.ui.studyStatusLabel.text = job.state.text()
            self.timer.start()
            self._updateButtons()

    def onCancelStudy(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to cancel the study."):
            self.logic.require_session().cancel_study()
            self.ui.studyStatusLabel.text = "Study cancelled; start it again to resume (finished runs are kept)."
            self._updateButtons()

    # ------------------------------------------------------------------------------------ export and run
    def onExport(self) -> None:
        self._withDependencies(True, self._startExport)

    def _startExport(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to start the export."):
            run = self.ui.runPathLineEdit.currentPath or None
            self.logic.require_session().start_export(run, self.ui.precisionComboBox.currentText)
            self.ui.exportStatusLabel.text = "Exporting and checking against PyTorch..."
            self.timer.start()
            self._updateButtons()

    def onProviderChanged(self, provider: str) -> None:
        session = self.logic.session if self.logic else None
        if session is not None and provider:
            with slicer.util.tryWithErrorDisplay("Unknown provider."):
                session.set_provider(provider)

    def onModelPathChanged(self, path: str) -> None:
        if self.logic.session is not None:
            self.logic.session.set_model(path or None)
            self._startPrefill()

    def _startPrefill(self) -> None:
        """Pre-fill the unlabeled cases with the current model in the background (for the uncertainty order)."""
        session = self.logic.session
        if session is None or session.dataset is None or not self.ui.useModelCheckBox.checked:
            return
        with slicer.util.tryWithErrorDisplay("Failed to pre-fill the cases."):
            if session.start_prefill(self.ui.providerComboBox.currentText):
                self.ui.labelStatusLabel.text = "Pre-filling the unlabeled cases with the model..."
                self.timer.start()

    def onRun(self) -> None:
        self._withDependencies(False, self._startRun)

    def _startRun(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to run the model."):
            session = self.logic.require_session(create=True)
            session.set_model(self.ui.modelPathLineEdit.currentPath or session.model_path)
            session.start_run(self.ui.runVolumeSelector.currentNode(), self.ui.providerComboBox.currentText)
            self.ui.runStatusLabel.text = "Running (the first TensorRT run builds its engine)..."
            self.timer.start()
            self._updateButtons()

    # ---------------------------------------------------------------------------------------------- timer
    def onTimer(self) -> None:
        """Render installs and one :meth:`MedTuneSession.poll`; errors are shown once, with the timer stopped."""
        if self.logic.install_job is not None:
            self._pollInstall()
            return
        session = self.logic.session
        if session is None:
            self.timer.stop()
            return
        report = session.poll()
        if report.finetune is not None:
            self.ui.finetuneProgressBar.setValue(int(round(100 * report.finetune.fraction)))
            self.ui.finetuneStatusLabel.text = report.finetune.text()
        if report.study is not None:
            self.ui.studyProgressBar.setValue(int(round(100 * report.study.fraction)))
            done = f" Report: {session.study_job.report_path}" if report.study.status == "completed" else ""
            self.ui.studyStatusLabel.text = report.study.text() + done
        if report.export_result is not None:
            self.ui.exportStatusLabel.text = report.export_result.text()
            self.ui.modelPathLineEdit.currentPath = str(session.model_path)  # also starts the pre-fill
        if report.run_result is not None:
            self._showRunResult(report.run_result)
        if report.prefilled is not None:
            self.ui.labelStatusLabel.text = f"Pre-filled {report.prefilled} case(s); most uncertain first."
            self._refreshCases()
        if report.all_labeled:
            self.ui.labelStatusLabel.text = "Every case is labeled."
        if report.case_ready is not None:
            self._loadPreparedCase(report.case_ready)
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
        installing = self.logic is not None and self.logic.install_job is not None
        running = session is not None and session.job is not None and not session.job.state.finished
        preparing = session is not None and session.case_future is not None
        self.ui.openDatasetButton.enabled = not installing
        self.ui.startFinetuneButton.enabled = not running and not installing
        self.ui.resumeFinetuneButton.enabled = not running and not installing
        self.ui.cancelFinetuneButton.enabled = running
        studying = session is not None and session.study_job is not None and not session.study_job.state.finished
        self.ui.startStudyButton.enabled = not studying and not installing
        self.ui.cancelStudyButton.enabled = studying
        exporting = session is not None and session.export_job is not None
        self.ui.exportButton.enabled = not running and not exporting and not installing
        self.ui.cancelExportButton.enabled = exporting
        self.ui.runButton.enabled = session is None or session.run_task is None
        self.ui.nextCaseButton.enabled = not preparing
        self.ui.loadCaseButton.enabled = not preparing

    def _refreshCases(self) -> None:
        self.ui.caseListWidget.clear()
        session = self.logic.session
        for case in session.cases(self.ui.useModelCheckBox.checked):
            entropy = f", uncertainty {case['entropy']:.3f}" if case.get("entropy") is not None else ""
            item = qt.QListWidgetItem(f"{case['id']}  [{case['status']}, {case['split']}{entropy}]")
            item.setData(qt.Qt.UserRole, case["id"])
            self.ui.caseListWidget.addItem(item)


class MedTuneLogic(ScriptedLoadableModuleLogic):
    """Slicer-side entry to ``MedTuneLib``: the dependency plan and installer, then a ``MedTuneSession``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session: Any = None
        self.install_job: Any = None

    @staticmethod
    def python_executable() -> str:
        """Slicer's Python launcher for child processes (``PythonSlicer``), else this interpreter."""
        import shutil

        return shutil.which("PythonSlicer") or sys.executable

    def dependency_plan(self, training: bool = False) -> Any:
        from MedTuneLib.dependencies import dependency_plan

        return dependency_plan(pytorch_extension=hasattr(slicer.modules, "pytorchutils"), training=training)

    def start_install(self, plan: Any) -> Any:
        """Install the plan's packages in child processes (the Widget polls ``install_job``)."""
        from MedTuneLib.dependencies import InstallJob

        self.install_job = InstallJob(plan, self.python_executable(), env=support.child_env()).start()
        return self.install_job

    def require_session(self, create: bool = False) -> Any:
        if self.session is None and create:
            from MedTuneLib.module_logic import MedTuneSession

            self.session = MedTuneSession(python=self.python_executable(), env=support.child_env())
        if self.session is None:
            raise ValueError("Open a dataset first.")
        return self.session

    def cleanup(self) -> None:
        if self.install_job is not None:
            self.install_job.cancel()  # undoes what this install put in
            self.install_job = None
        if self.session is not None:
            self.session.cancel_all()

    def start_finetune(self, *, run: str, preset: str, arch: str, pretrained: str, strategy: str, epochs: int,
                       device: str, folds: int = -1, folds_refit: bool = False,
                       resume: bool = False) -> Any:  # fmt: skip
        """Start a run with the Fine-tune panel's choices, or resume one with its own settings (``folds`` -1: the
        preset's default, 0: one run, K: a K-fold run; ``folds_refit``: a K-fold run deploys one model refit on
        all the cases instead of the K fold models' ensemble)."""
        return self.require_session().start_panel_finetune(
            run=run or None, preset=preset, arch=arch, pretrained=pretrained, strategy=strategy, epochs=epochs,
            device=device, resume=resume, folds=None if folds < 0 else folds, folds_refit=folds_refit,
        )


class MedTuneTest(ScriptedLoadableModuleTest):
    """In-app self-test (also the extension's ctest).

    Always (no install, no torch): the version gate, the bundled medtune, the dependency plan, and a torch-free
    label-and-run check. The full loop (import -> label -> fine-tune child process -> export -> run, the loop of
    ``tests/test_slicer_loop.py``) runs only with ``MEDTUNE_FULL_SELF_TEST=1`` and the training packages
    installed; otherwise it says why it skipped. An extension build never installs anything.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_support()
        self.setUp()
        self.test_full_loop()

    def test_support(self) -> None:
        self.assertIsNone(unsupported_reason())
        root = support.use_medtune(_MODULE_DIR)
        import medtune

        self.assertEqual(medtune.__version__, support.MEDTUNE_VERSION)
        self.assertTrue(os.path.abspath(medtune.__file__).startswith(os.path.abspath(root)))
        logic = MedTuneLogic()
        plan = logic.dependency_plan(training=True)
        self.assertFalse(any("medtune" in p for s in plan.steps for p in s.packages))
        self.delayDisplay(f"MedTune {medtune.__version__} from {root}; first use: {plan.text().splitlines()[0]}")

    def _trainingMissing(self) -> str:
        import importlib.util

        if os.environ.get("MEDTUNE_FULL_SELF_TEST") != "1":
            return "set MEDTUNE_FULL_SELF_TEST=1 to run the fine-tune/export loop"
        missing = [m for m in ("torch", "monai", "onnx") if importlib.util.find_spec(m) is None]
        return f"training packages missing ({', '.join(missing)})" if missing else ""

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
        reason = self._trainingMissing()
        if reason:
            self.delayDisplay(f"MedTune full loop skipped: {reason}")
            return
        import json
        import tempfile

        import nibabel as nib
        import numpy as np
        from MedTuneLib.finetune_logic import FinetuneSettings

        from medtune.data.synthetic import make_synthetic_segmentation
        from medtune.runtime.segment import load_volume_model, segment_file

        self.delayDisplay("MedTune loop: import -> label -> fine-tune -> export -> run")
        support.use_medtune(_MODULE_DIR)
        session = MedTuneLogic().require_session(create=True)
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
            session.start_run(current, "cpu")
            result = self._poll(session.finish_run)
            out = os.path.join(tmp, "runtime.nii.gz")
            segment_file(load_volume_model(session.model_path, "cpu"), current.GetStorageNode().GetFileName(), out)
            runtime = np.asarray(nib.load(out).dataobj)
            scene_labels = np.zeros(runtime.shape[::-1], np.uint8)
            for value in (1, 2):
                got = slicer.util.arrayFromSegmentBinaryLabelmap(result.node, f"label_{value}", current)
                scene_labels[got > 0] = value
            np.testing.assert_array_equal(scene_labels.transpose(2, 1, 0), runtime)
        self.delayDisplay("Test passed")
