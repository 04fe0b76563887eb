"""The studio page: trame-slicer's viewer layout (views, Segment Editor, volume properties, layouts) on the left,
the MedTune panel (Dataset / Label / Fine-tune / Export / Run, as in the Slicer module) on the right.

The left side is composed like trame-slicer's ``SegmentationAppUI`` (same widgets and logic classes) without its
file upload / scene download buttons: the studio reads files only through the path guard.
"""

from __future__ import annotations

from typing import Any

from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_server.utils.typed_state import TypedState
from trame_slicer.app.ui import (
    ControlButton,
    LayoutButton,
    MprInteractionButton,
    SegmentEditorToolbarUI,
    SegmentEditorUI,
    SegmentEditorUndoRedoUI,
    ViewerLayout,
    ViewerLayoutState,
    VolumePropertyUI,
)

STATUS_COLORS = {"labeled": "green", "predicted": "orange", "unlabeled": "grey"}


class StudioUI:
    """Builds the page; ``studio`` is the :class:`medtune.studio.app.Studio` whose methods the buttons call."""

    def __init__(self, server: Any, studio: Any) -> None:
        self.studio = studio
        self.tools: dict[type, Any] = {}
        with ViewerLayout(server, title="MedTune Studio", is_drawer_visible=False) as self.layout:
            self.typed = self.layout.typed_state
            with self.layout.drawer:
                self.segment_editor = self._tool(SegmentEditorUI)
                self.volume_property = self._tool(VolumePropertyUI)
            with self.layout.toolbar:
                self._tool_button("Segment Editor", "mdi-brush", SegmentEditorUI)
                self._tool_button("Volume Properties", "mdi-tune-variant", VolumePropertyUI)
                no_volume = (f"!{self.typed.name.is_volume_loaded}",)
                self.layout_button = LayoutButton(classes="mt-1", disabled=no_volume)
                self.mpr_button = MprInteractionButton(classes="mt-1", disabled=no_volume)
                SegmentEditorToolbarUI(editor_ui=self.segment_editor, id="mt-effects")
            with self.layout.undo_redo:
                SegmentEditorUndoRedoUI(editor_ui=self.segment_editor, v_if=(self._active(SegmentEditorUI),))
            with self.layout.content:
                studio.layout_logic.layout_manager.initialize_layout_grid(self.layout)
            with self.layout:
                self._medtune_panel()
                self._confirm_dialog()

    # --------------------------------------------------------------------------------------- left (trame-slicer)
    def _active(self, tool: type) -> str:
        return f"{self.typed.name.active_tool} === '{tool.__name__}'"

    def _tool(self, tool: type) -> Any:
        self.tools[tool] = tool(v_if=(self._active(tool),))
        return self.tools[tool]

    def _tool_button(self, name: str, icon: str, tool: type) -> None:
        data = self.typed.data

        def toggle() -> None:
            show = not data.is_drawer_visible or data.active_tool != tool.__name__
            data.is_drawer_visible = show
            data.active_tool = tool.__name__ if show else None

        ControlButton(name=name, icon=icon, click=toggle, active=(self._active(tool),),
                      disabled=(f"!{self.typed.name.is_volume_loaded}",), classes="mt-1")  # fmt: skip

    # ----------------------------------------------------------------------------------------- right (MedTune)
    def _medtune_panel(self) -> None:
        st = self.studio
        with v.VNavigationDrawer(location="right", permanent=True, width=400, id="mt-panel"):
            with html.Div(classes="pa-2 text-body-2"):
                with html.Div(classes="d-flex align-center mb-1"):
                    html.Span("MedTune", classes="text-h6")
                    v.VSpacer()
                    v.VChip("{{ mt_clients }} tab(s) on this session", size="x-small", id="mt-clients",
                            color=("mt_clients > 1 ? 'orange' : 'grey'",))  # fmt: skip
                v.VAlert(v_if=("mt_error",), type="error", density="compact", closable=True, classes="mb-2",
                         text=("mt_error",), id="mt-error", click_close="mt_error = ''")  # fmt: skip
                html.Div("{{ mt_status }}", id="mt-status", classes="mb-2 text-medium-emphasis")
                v.VProgressLinear(v_if=("mt_busy",), indeterminate=True, color="primary", classes="mb-2")
                with v.VExpansionPanels(multiple=True, variant="accordion", model_value=("mt_panels", [0, 1, 2, 3]),
                                        update_modelValue="mt_panels = $event"):  # fmt: skip
                    self._dataset_section(st)
                    self._label_section(st)
                    self._finetune_section(st)
                    self._export_run_section(st)

    def _dataset_section(self, st: Any) -> None:
        with v.VExpansionPanel(title="Dataset"), v.VExpansionPanelText():
            v.VTextField(v_model=("mt_dataset_path",), label="Dataset folder", density="compact", hide_details=True,
                         id="mt-dataset-path", classes="mb-1")  # fmt: skip
            html.Div("Allowed folders: {{ mt_roots }}", classes="text-caption mb-1")
            with html.Div(v_if=("!mt_dataset_open",)):
                v.VSelect(v_model=("mt_task",), items=("mt_task_items",), label="New dataset task", density="compact",
                          hide_details=True, classes="mb-1")  # fmt: skip
                v.VTextField(v_model=("mt_labels_text",), label="New dataset labels (1: liver, 2: tumor)",
                             density="compact", hide_details=True, classes="mb-1")  # fmt: skip
            v.VBtn("Open or create dataset", click=lambda: st.action(st.open_dataset), id="mt-open-dataset",
                   size="small", block=True, classes="mb-1")  # fmt: skip
            html.Div("{{ mt_dataset_info }}", v_if=("mt_dataset_open",), id="mt-dataset-info", classes="text-caption")
            with html.Div(v_if=("mt_dataset_open",), classes="mt-2"):
                v.VTextField(v_model=("mt_import_path",), label="Import volume (NIfTI file)", density="compact",
                             hide_details=True, id="mt-import-path", classes="mb-1")  # fmt: skip
                v.VTextField(v_if=("!mt_is_classification",), v_model=("mt_import_label_path",),
                             label="with its label map (optional)", density="compact", hide_details=True,
                             classes="mb-1")  # fmt: skip
                v.VBtn("Import volume", click=lambda: st.action(st.import_volume), size="small", id="mt-import",
                       classes="mb-1")  # fmt: skip
                v.VTextField(v_model=("mt_dicom_path",), label="Import DICOM series (folder)", density="compact",
                             hide_details=True, id="mt-dicom-path", classes="mb-1")  # fmt: skip
                v.VBtn("Import DICOM series", click=lambda: st.action(st.import_dicom), size="small",
                       id="mt-import-dicom")  # fmt: skip

    def _label_section(self, st: Any) -> None:
        with v.VExpansionPanel(title="Label"), v.VExpansionPanelText():
            with html.Div(classes="d-flex align-center mb-1"):
                v.VBtn("Next case", click=st.next_case, color="primary", size="small", id="mt-next-case",
                       disabled=("!mt_dataset_open || mt_busy",))  # fmt: skip
                v.VCheckbox(v_model=("mt_use_model",), label="pre-fill with the model", density="compact",
                            id="mt-use-model", hide_details=True, classes="ml-2")  # fmt: skip
            with html.Div(v_if=("mt_case_id",), classes="mb-1"):
                html.Span("Case ")
                html.B("{{ mt_case_id }}", id="mt-case-id")
                v.VChip("unsaved changes", v_if=("mt_unsaved",), color="warning", size="x-small", classes="ml-2",
                        id="mt-unsaved")  # fmt: skip
            v.VSelect(v_if=("mt_is_classification && mt_case_id",), v_model=("mt_class_value",),
                      items=("mt_class_items",), label="Class", density="compact", hide_details=True,
                      id="mt-class", classes="mb-1")  # fmt: skip
            v.VBtn("Save labels", click=lambda: st.action(st.save_labels), size="small", id="mt-save",
                   disabled=("!mt_case_id",), classes="mb-2")  # fmt: skip
            with v.VList(density="compact", max_height=220, classes="overflow-y-auto", id="mt-cases"):
                with v.VListItem(v_for="c in mt_cases", key="c.id", click=(st.load_case, "[c.id]"),
                                 active=("c.id === mt_case_id",)):  # fmt: skip
                    with html.Div(classes="d-flex align-center"):
                        html.Span("{{ c.id }}", classes="mr-2")
                        v.VChip("{{ c.status }}", size="x-small", classes="mr-1",
                                color=(f"({STATUS_COLORS!r})[c.status] || 'grey'",))  # fmt: skip
                        html.Span("{{ c.split }}", classes="text-caption mr-1")
                        html.Span("{{ c.entropy === null ? '' : 'uncertainty ' + c.entropy }}", classes="text-caption")

    def _finetune_section(self, st: Any) -> None:
        with v.VExpansionPanel(title="Fine-tune"), v.VExpansionPanelText():
            with html.Div(classes="d-flex"):
                v.VSelect(v_model=("mt_preset",), items=("mt_preset_items",), label="Preset", density="compact",
                          hide_details=True, classes="mr-1")  # fmt: skip
                v.VSelect(v_model=("mt_strategy",), items=("mt_strategy_items",), label="Strategy",
                          density="compact", hide_details=True)  # fmt: skip
            with html.Div(classes="d-flex mt-1"):
                v.VTextField(v_model=("mt_arch",), label="Architecture", density="compact", hide_details=True,
                             id="mt-arch", classes="mr-1")  # fmt: skip
                v.VTextField(v_model=("mt_pretrained",), label="Pretrained source", density="compact",
                             hide_details=True, id="mt-pretrained")  # fmt: skip
            with html.Div(classes="d-flex mt-1"):
                v.VTextField(v_model=("mt_epochs",), label="Epochs", type="number", density="compact",
                             hide_details=True, id="mt-epochs", classes="mr-1")  # fmt: skip
                v.VSelect(v_model=("mt_device",), items=("mt_device_items",), label="Device", density="compact",
                          hide_details=True)  # fmt: skip
            v.VTextarea(v_model=("mt_settings_text",), label="Bundle settings (KEY=VALUE per line)", rows=2,
                        auto_grow=True, density="compact", hide_details=True, id="mt-settings",
                        classes="mt-1")  # fmt: skip
            with html.Div(classes="d-flex mt-1"):
                v.VTextField(v_model=("mt_run_path",), label="Run folder (empty: a new one under runs/)",
                             density="compact", hide_details=True, id="mt-run-path", classes="mr-1")  # fmt: skip
                v.VTextField(v_model=("mt_folds",), label="Folds (empty: preset default, 0: one run)",
                             density="compact", hide_details=True, id="mt-folds")  # fmt: skip
            with html.Div(classes="d-flex mt-1"):
                v.VBtn("Fine-tune", click=lambda: st.action(st.start_finetune), color="primary", size="small",
                       id="mt-finetune", disabled=("!mt_dataset_open || mt_ft_running",))  # fmt: skip
                v.VBtn("Resume", click=lambda: st.action(st.start_finetune, True), size="small", classes="ml-1",
                       id="mt-resume", disabled=("!mt_ft_resumable || mt_ft_running",))  # fmt: skip
                v.VBtn("Cancel", click=lambda: st.action(st.cancel_finetune), size="small", classes="ml-1",
                       id="mt-cancel", disabled=("!mt_ft_running",))  # fmt: skip
            v.VProgressLinear(model_value=("mt_ft_progress",), height=14, color="primary", classes="mt-2",
                              id="mt-ft-progress")  # fmt: skip
            html.Div("{{ mt_ft_progress }}% · {{ mt_ft_text }}", id="mt-ft-text", classes="text-caption")
            with v.VList(density="compact", id="mt-runs", v_if=("mt_runs.length",)):
                with v.VListItem(v_for="r in mt_runs", key="r.path", click="mt_run_path = r.path",
                                 active=("r.path === mt_run_path",)):  # fmt: skip
                    html.Div("{{ r.name }} · {{ r.kind }} · {{ r.status }}", classes="text-caption")
                    html.Div("{{ r.estimate }}", classes="text-caption", v_if=("r.estimate",))

    def _export_run_section(self, st: Any) -> None:
        with v.VExpansionPanel(title="Export and run"), v.VExpansionPanelText():
            with html.Div(classes="d-flex align-center"):
                v.VSelect(v_model=("mt_precision",), items=("mt_precision_items",), label="Precision",
                          density="compact", hide_details=True, classes="mr-1")  # fmt: skip
                v.VBtn("Export", click=lambda: st.action(st.start_export), size="small", id="mt-export",
                       disabled=("mt_exporting || mt_ft_running",))  # fmt: skip
                v.VBtn("Cancel", click=lambda: st.action(st.cancel_export), size="small", classes="ml-1",
                       disabled=("!mt_exporting",))  # fmt: skip
            html.Div("{{ mt_export_text }}", id="mt-export-text", classes="text-caption mb-2",
                     style=("mt_parity_passed === false ? 'color: #e57373' : ''",))  # fmt: skip
            v.VTextField(v_model=("mt_model_path",), label="ONNX model (model.onnx or its folder)", density="compact",
                         hide_details=True, id="mt-model-path", classes="mb-1")  # fmt: skip
            with html.Div(classes="d-flex align-center"):
                v.VSelect(v_model=("mt_provider",), items=("mt_provider_items",), label="Provider",
                          density="compact", hide_details=True, classes="mr-1")  # fmt: skip
                v.VBtn("Run on this case", click=lambda: st.action(st.run_model), size="small", id="mt-run",
                       disabled=("mt_running || !mt_case_id",))  # fmt: skip
            html.Div("{{ mt_run_text }}", id="mt-run-text", classes="text-caption mt-1")
            with v.VTable(v_if=("mt_run_table.length",), density="compact", id="mt-run-table"):
                with html.Tbody():
                    with html.Tr(v_for="row in mt_run_table", key="row.name"):
                        html.Td("{{ row.name }}")
                        html.Td("{{ row.p }}")

    def _confirm_dialog(self) -> None:
        st = self.studio
        with v.VDialog(v_model=("mt_confirm_open",), persistent=True, max_width=420), v.VCard(id="mt-confirm"):
            v.VCardTitle("Unsaved labels")
            v.VCardText("{{ mt_confirm_text }} Save them before leaving the case?")
            with v.VCardActions():
                v.VSpacer()
                v.VBtn("Stay", click=(st.confirm_leave, "['stay']"), id="mt-confirm-stay")
                v.VBtn("Discard", click=(st.confirm_leave, "['discard']"), color="error", id="mt-confirm-discard")
                v.VBtn("Save and continue", click=(st.confirm_leave, "['save']"), color="primary",
                       id="mt-confirm-save")  # fmt: skip


def viewer_state(state: Any) -> Any:
    """The trame-slicer viewer layout's typed state (volume loaded, drawer, active tool)."""
    return TypedState(state, ViewerLayoutState).data
