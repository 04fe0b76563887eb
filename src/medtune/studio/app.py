"""The studio page: trame-slicer's views and Segment Editor, plus a MedTune panel driving ``MedTuneSession``.

Everything MedTune does goes through the Slicer module's Qt-free session (``MedTuneLib.module_logic``):
dataset, queue, pre-fill, save, fine-tune (child process), export (child process), run (worker thread). This
file only turns page events into session calls and session state into page state. Page callbacks run on
trame's asyncio loop; nothing slow runs there: the session's workers and child processes are polled by one
asyncio task (:meth:`Studio.poll_loop`), and model loading for *Next case* runs in a thread.

Second tab: trame keeps one state per server, so every tab opened with the token shows the same session
(same case, same progress) live; the panel says how many tabs are connected.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

from medtune.errors import MedTuneError
from medtune.names import PRECISIONS, PROVIDERS  # the names' one owner
from medtune.untrusted import EXPRESSION_PREFIXES, SPECIAL_KEY

from .paths import PathGuard

log = logging.getLogger("medtune.studio")

POLL_SECONDS = 0.5
TASKS = {"segmentation (3D)": ("segmentation", 3), "classification (3D)": ("classification", 3),
         "classification (2D)": ("classification", 2)}  # fmt: skip


def import_medtunelib() -> types.ModuleType:
    """``MedTuneLib`` (the Slicer module's Qt-free logic), from the path or from this source checkout."""
    try:
        import MedTuneLib.module_logic  # noqa: F401 - already importable (Slicer, tests)
    except ImportError:
        for parent in Path(__file__).resolve().parents:
            candidate = parent / "slicer_extension" / "MedTune"
            if (candidate / "MedTuneLib" / "module_logic.py").is_file():
                sys.path.insert(0, str(candidate))
                break
        else:
            raise MedTuneError(
                "MedTune Studio drives the Slicer module's logic (slicer_extension/MedTune/MedTuneLib), which is "
                "not next to this installation; install MedTune from its source folder: pip install -e '.[studio]'"
            ) from None
    import MedTuneLib

    return MedTuneLib


def expose_to_slicer_util(slicer_app: Any) -> None:
    """Point ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` (what ``slicer.util`` needs) at
    trame-slicer's scene and logics (``MedTuneLib.headless.expose_to_slicer_util``, as the headless set-up)."""
    from MedTuneLib.headless import expose_to_slicer_util as expose

    expose(slicer_app.scene, {
        "colors": slicer_app.color_logic,
        "volumes": slicer_app.volumes_logic,
        "segmentations": slicer_app.segmentations_logic,
        "subjecthierarchy": slicer_app.subject_hierarchy_logic,
    })  # fmt: skip


def parse_settings(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (the CLI's ``--set``) -> ``{KEY: VALUE}``; values stay text (the CLI parses them).

    The page is not the local shell: MONAI's config parser evaluates ``$expr``, resolves ``@ref`` / ``%file`` and
    instantiates ``_target_`` dicts, also inside lists and dicts, so a value holding any of ``$ @ %``, a path
    separator or a special ``_key_`` is refused: bundle settings cannot run code or reach other files.
    """
    import re

    out: dict[str, str] = {}
    for line in filter(None, (ln.strip() for ln in str(text or "").splitlines())):
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise MedTuneError(f"setting {line!r} is not KEY=VALUE")
        # {'_target_': ...} would be instantiated; MONAI's syntax and special keys: medtune.untrusted
        special = any(SPECIAL_KEY.match(quoted) for quoted in re.findall(r"""['"]([^'"]*)['"]""", value))
        if any(c in value for c in (*EXPRESSION_PREFIXES, "/", "\\")) or special or SPECIAL_KEY.match(key):
            raise MedTuneError(f"setting {key}: expressions, references and paths are not allowed from the page")
        out[key] = value
    return out


def parse_folds(text: Any) -> int | None:
    """The Fine-tune panel's Folds field: empty = the preset's default, 0 = one run, K >= 2 = a K-fold ensemble."""
    text = str(text if text is not None else "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) == 1:
        raise MedTuneError(f"folds must be empty (preset default), 0 (one run) or at least 2, got {text!r}")
    return int(text)


class Studio:
    """One studio session: trame-slicer's scene and views, one ``MedTuneSession``, the page state."""

    def __init__(self, server: Any, dataset: str | Path | None, guard: PathGuard, python: str | None = None) -> None:
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.app.logic import (
            LayoutButtonLogic,
            MprInteractionButtonLogic,
            SegmentEditorLogic,
            VolumePropertyLogic,
        )
        from trame_slicer.core import SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        lib = import_medtunelib()
        from MedTuneLib.finetune_logic import DEVICES, PRESETS, STRATEGIES
        from MedTuneLib.module_logic import MedTuneSession

        self.lib = lib
        self.server = server
        self.state = server.state
        self.guard = guard
        server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        expose_to_slicer_util(self.slicer_app)
        register_rca_factories(self.slicer_app.view_manager, server)
        # trame-slicer's own logic for the views and the Segment Editor (what its SegmentationApp composes)
        self.editor_logic = SegmentEditorLogic(server, self.slicer_app)
        self.volume_property_logic = VolumePropertyLogic(server, self.slicer_app)
        self.layout_logic = LayoutButtonLogic(server, self.slicer_app)
        self.mpr_logic = MprInteractionButtonLogic(server, self.slicer_app)
        self.session = MedTuneSession(python=python)
        self._busy_actions: set[str] = set()
        self._poll_task: asyncio.Task | None = None
        self._ready = False
        self._set_defaults(PRESETS, STRATEGIES, DEVICES)  # the Slicer module's lists (MedTuneLib owns them)
        self.slicer_app.segmentation_editor.segmentation_modified.connect(self._on_segmentation_modified)
        server.controller.on_server_ready.add(self._on_server_ready)
        from .ui import StudioUI

        self.ui = StudioUI(server, self)
        self.editor_logic.set_ui(self.ui.segment_editor)
        self.volume_property_logic.set_ui(self.ui.volume_property)
        self.layout_logic.set_ui(self.ui.layout_button)
        self.mpr_logic.set_ui(self.ui.mpr_button)
        if dataset is not None:
            self.state.mt_dataset_path = str(dataset)
            if (Path(dataset) / "dataset.json").is_file():
                self.action(self.open_dataset)

    # ------------------------------------------------------------------------------------------- state
    def _set_defaults(self, presets: tuple, strategies: tuple, devices: tuple) -> None:
        s = self.state
        s.trame__title = "MedTune Studio"
        s.update({
            "mt_clients": 0, "mt_error": "", "mt_status": "Open a dataset to start.", "mt_busy": False,
            "mt_dataset_path": "", "mt_dataset_info": "", "mt_dataset_open": False, "mt_roots": self.guard.describe(),
            "mt_task_items": list(TASKS), "mt_task": next(iter(TASKS)), "mt_labels_text": "",
            "mt_is_classification": False, "mt_cases": [], "mt_case_id": "", "mt_unsaved": False,
            "mt_use_model": True, "mt_import_path": "", "mt_import_label_path": "", "mt_dicom_path": "",
            "mt_class_items": [], "mt_class_value": None, "mt_confirm_open": False, "mt_confirm_text": "",
            "mt_preset_items": list(presets), "mt_preset": presets[0], "mt_strategy_items": list(strategies),
            "mt_strategy": strategies[0], "mt_device_items": list(devices), "mt_device": devices[0],
            "mt_arch": "", "mt_pretrained": "", "mt_epochs": 10, "mt_settings_text": "", "mt_run_path": "",
            "mt_ft_running": False, "mt_ft_progress": 0, "mt_ft_text": "", "mt_ft_status": "", "mt_ft_epoch": 0,
            "mt_ft_resumable": False, "mt_folds": "", "mt_runs": [],
            "mt_precision_items": list(PRECISIONS), "mt_precision": "fp32", "mt_exporting": False,
            "mt_export_text": "", "mt_parity_passed": None,
            "mt_model_path": "", "mt_provider_items": list(PROVIDERS), "mt_provider": "auto", "mt_running": False,
            "mt_run_text": "", "mt_run_voxels": {}, "mt_run_table": [],
        })  # fmt: skip

    def action(self, fn: Any, *args: Any) -> Any:
        """Run a page action; a MedTune error (or any error) becomes one line in the panel, never a traceback."""
        self.state.mt_error = ""
        try:
            return fn(*args)
        except MedTuneError as exc:
            self.state.mt_error = str(exc)
        except Exception as exc:  # noqa: BLE001 - shown in the page, logged in full on the console
            log.error("studio action %s failed:\n%s", getattr(fn, "__name__", fn), traceback.format_exc())
            self.state.mt_error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        return None

    async def async_action(self, fn: Any, *args: Any) -> Any:
        self.state.mt_error = ""
        try:
            return await fn(*args)
        except MedTuneError as exc:
            self.state.mt_error = str(exc)
        except Exception as exc:  # noqa: BLE001
            log.error("studio action %s failed:\n%s", getattr(fn, "__name__", fn), traceback.format_exc())
            self.state.mt_error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        finally:
            self.state.flush()
        return None

    # --------------------------------------------------------------------------------------------- dataset
    def open_dataset(self) -> None:
        path = self.guard.resolve(self.state.mt_dataset_path, kind="dataset folder")
        task, dims = TASKS.get(self.state.mt_task, ("segmentation", 3))
        ds = self.session.open_dataset(path, task, self.state.mt_labels_text, dims)
        self.state.mt_dataset_path = str(ds.root)
        self.state.mt_dataset_open = True
        self.state.mt_is_classification = ds.is_classification
        self.state.mt_dataset_info = f"{ds.meta['task']} ({ds.meta['spatial_dims']}D), labels " + ", ".join(
            f"{v}: {n}" for v, n in sorted(ds.labels.items())
        )
        self.state.mt_class_items = [{"title": f"{v}: {n}", "value": v} for v, n in ds.class_choices()]
        self.state.mt_preset = self.session.default_preset()
        self._find_model()
        self.refresh_cases()
        self.state.mt_status = f"Opened {ds.root.name}: {len(self.state.mt_cases)} case(s)."

    def _find_model(self) -> None:
        """Use the dataset's newest exported model (``models/*/model.onnx``) when no model is chosen yet."""
        if self.session.model_path is not None:
            return
        root = self.session.require_dataset().root
        models = sorted(root.glob("models/*/model.onnx"), key=lambda p: p.stat().st_mtime)
        if models:
            self._use_model(models[-1])

    def refresh_cases(self) -> None:
        cases = self.session.cases(bool(self.state.mt_use_model))
        self.state.mt_cases = [
            {"id": c["id"], "status": c["status"], "split": c["split"],
             "entropy": None if c.get("entropy") is None else round(float(c["entropy"]), 3)}
            for c in cases
        ]  # fmt: skip
        run = self.session.resumable_run()
        self.state.mt_ft_resumable = run is not None
        self.refresh_runs()

    def refresh_runs(self) -> None:
        """The dataset's run folders (single and K-fold), with their honest figure once finished."""
        self.state.mt_runs = self.session.list_runs() if self.session.dataset is not None else []

    def import_volume(self) -> None:
        """Read a NIfTI (or any format Slicer reads) with Slicer's reader and import it as a new case."""
        self.session.require_dataset()
        path = self.guard.resolve(self.state.mt_import_path, must_exist=True, kind="volume file")
        label_text = str(self.state.mt_import_label_path or "").strip()
        label = self.guard.resolve(label_text, must_exist=True, kind="label file") if label_text else None
        io = self.slicer_app.io_manager
        volumes = io.load_volumes([str(path)])
        if not volumes:
            raise MedTuneError("Slicer could not read this volume", path)
        added = list(volumes)
        try:
            segmentation = None
            if label is not None:  # Slicer's reader with the label-map option, then one segment per value
                labelmap = self.slicer_app.volumes_logic.AddArchetypeVolume(str(label), "import label", 1)
                if labelmap is None:
                    raise MedTuneError("Slicer could not read this label map", label)
                added.append(labelmap)
                segmentation = self.slicer_app.segmentation_editor.create_segmentation_node_from_labelmap(labelmap)
                segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumes[0])
                added.append(segmentation)
            case_id = self.session.import_volume(volumes[0], segmentation, self.state.mt_class_value)
        finally:
            for node in added:
                if node.GetScene() is not None and node not in (self.session.case_nodes or ()):
                    node.GetScene().RemoveNode(node)
        self.refresh_cases()
        self.state.mt_status = f"Imported {path.name} as {case_id}."

    def import_dicom(self) -> None:
        self.session.require_dataset()
        folder = self.guard.resolve(self.state.mt_dicom_path, must_exist=True, kind="DICOM folder")
        case_id = self.session.import_dicom(folder)
        self.refresh_cases()
        self.state.mt_status = f"Imported the DICOM series as {case_id}."

    # ----------------------------------------------------------------------------------------------- label
    def _on_segmentation_modified(self, *_: Any) -> None:
        if self.session.case_id is not None and not self._busy_actions & {"load"}:
            self.state.mt_unsaved = True

    def _needs_confirm(self, then: str, case_id: str = "") -> bool:
        """Before another case replaces the loaded one: ask when it holds unsaved labels (True: asked)."""
        if self.session.case_id is None or not self.session.has_unsaved_labels():
            return False
        self.state.mt_confirm_text = f"{self.session.case_id} has unsaved labels."
        self.state.mt_confirm_open = True
        self._pending_leave = (then, case_id)
        return True

    async def confirm_leave(self, choice: str) -> None:
        """The unsaved-labels dialog: ``save`` (then go on), ``discard`` (go on) or ``stay``."""
        self.state.mt_confirm_open = False
        then, case_id = getattr(self, "_pending_leave", ("", ""))
        self._pending_leave = ("", "")
        if choice == "stay" or not then:
            return
        if choice == "save" and self.action(self.save_labels) is None:
            return  # the save failed: stay on this case (the error is shown)
        if then == "next":
            await self.next_case(confirmed=True)
        else:
            self.load_case(case_id, confirmed=True)

    async def next_case(self, confirmed: bool = False) -> None:
        """The most uncertain unlabeled case, pre-filled by the model (prediction in a worker thread)."""
        await self.async_action(self._next_case, confirmed)

    async def _next_case(self, confirmed: bool) -> None:
        self.session.require_dataset()
        if not confirmed and self._needs_confirm("next"):
            return
        use_model = bool(self.state.mt_use_model) and self.session.model_path is not None
        self._busy_actions.add("next")
        self.state.mt_busy = True
        try:
            if use_model:
                provider = self.state.mt_provider
                if self.session.start_prefill(provider):
                    self.state.mt_status = "Pre-filling the unlabeled cases with the model..."
                    self.state.flush()
                while self.session.prefill_future is not None and not self.session.prefill_future.done():
                    await asyncio.sleep(0.1)
                if self.session.prefill_future is not None:  # collect its result (errors shown once)
                    self._apply_report(self.session.poll())
            # the labeling worker opens the model and picks (and predicts) the case, off the event loop
            future = self.session.start_next_case(use_model)
            while not future.done():
                await asyncio.sleep(0.1)
            case_id = future.result()
            self.session.case_future = None
            self._prepare_scene()
            if case_id is not None:
                self.session.load_case(case_id, self.slicer_app.scene)
        finally:
            self._busy_actions.discard("next")
            self.state.mt_busy = False
        if case_id is None:
            self.state.mt_status = "Every case is labeled."
            self.refresh_cases()
            return
        self._show_case(prefilled=use_model)

    def load_case(self, case_id: str, confirmed: bool = False) -> None:
        def load() -> None:
            self.session.require_dataset()
            if not confirmed and self._needs_confirm("load", case_id):
                return
            self._prepare_scene()
            self.session.load_case(case_id, self.slicer_app.scene, False)
            self._show_case(prefilled=False)

        self.action(load)

    def _prepare_scene(self) -> None:
        """Empty the scene before a case loads (trame-slicer's own loader does the same: effect pipelines made
        before the views exist have no view)."""
        self._busy_actions.add("load")
        self.session.close_case()
        self.slicer_app.scene.Clear()

    def _show_case(self, prefilled: bool) -> None:
        try:
            if self.session.case_nodes is None or self.session.case_id is None:
                raise MedTuneError("no case is loaded")
            volume, second = self.session.case_nodes
            volume.CreateDefaultDisplayNodes()
            self.slicer_app.display_manager.show_volume(volume, do_reset_views=True)
            ds = self.session.require_dataset()
            if ds.is_classification:
                current = ds.get_class(self.session.case_id)
                self.state.mt_class_value = current if current is not None else second
            elif second is not None:
                second.CreateDefaultDisplayNodes()
                self.editor_logic.on_volume_changed(volume)  # the Segment Editor edits this case's segmentation
            from .ui import viewer_state

            viewer = viewer_state(self.state)
            viewer.is_volume_loaded = True
            viewer.is_drawer_visible = not ds.is_classification
            viewer.active_tool = "SegmentEditorUI" if not ds.is_classification else None
        finally:
            self._busy_actions.discard("load")
        self.state.mt_case_id = self.session.case_id
        self.state.mt_unsaved = False
        self.state.mt_run_text, self.state.mt_run_voxels, self.state.mt_run_table = "", {}, []
        how = " (pre-filled by the model)" if prefilled and not ds.is_classification else ""
        self.state.mt_status = f"Labeling {self.session.case_id}{how}."
        self.refresh_cases()

    def save_labels(self) -> str:
        ds = self.session.require_dataset()
        value = self.state.mt_class_value if ds.is_classification else None
        text = self.session.save_labels(None if value is None else int(value))
        self.state.mt_unsaved = False
        self.state.mt_status = text
        self.refresh_cases()
        return text

    # --------------------------------------------------------------------------------------------- finetune
    def start_finetune(self, resume: bool = False) -> None:
        s, session = self.state, self.session
        session.require_dataset()
        run_text = str(s.mt_run_path or "").strip()
        run = self.guard.resolve(run_text, kind="run folder") if run_text else None
        if resume:
            folder = run or session.resumable_run()
            if folder is not None:
                self.guard.resolve(folder, kind="run folder")
            job = session.start_panel_finetune(run=folder, resume=True)
        else:
            pretrained = str(s.mt_pretrained or "").strip()
            if ":" in pretrained and pretrained.partition(":")[2]:  # local:PATH, zoo:PATH, ...: a file
                self.guard.resolve(pretrained.partition(":")[2], must_exist=True, kind="pretrained weights")
            job = session.start_panel_finetune(
                run=run, preset=s.mt_preset, pretrained=pretrained, strategy=s.mt_strategy, epochs=int(s.mt_epochs),
                device=s.mt_device, arch=s.mt_arch.strip(), overrides=parse_settings(s.mt_settings_text),
                folds=parse_folds(s.mt_folds),
            )  # fmt: skip
        s.mt_run_path = str(job.run_dir)
        s.mt_ft_running, s.mt_ft_progress, s.mt_ft_status = True, 0, "starting"
        s.mt_ft_text = job.state.text()
        s.mt_status = f"Fine-tuning in a child process: {job.run_dir.name}"

    def cancel_finetune(self) -> None:
        self.session.cancel_finetune()
        self._apply_report(self.session.poll())
        self.state.mt_status = "Fine-tuning cancelled; Resume continues from the last saved epoch."
        self.refresh_cases()

    # ---------------------------------------------------------------------------------------- export / run
    def start_export(self) -> None:
        run_text = str(self.state.mt_run_path or "").strip()
        run = self.guard.resolve(run_text, kind="run folder") if run_text else None
        self.session.start_export(run, self.state.mt_precision)
        self.state.mt_exporting, self.state.mt_parity_passed = True, None
        self.state.mt_export_text = "Exporting and checking parity against PyTorch..."

    def cancel_export(self) -> None:
        self.session.cancel_export()
        self.state.mt_exporting = False
        self.state.mt_export_text = "Export cancelled."

    def _use_model(self, path: Path) -> None:
        self.session.set_model(path)
        self.state.mt_model_path = str(path)

    def set_model(self) -> None:
        text = str(self.state.mt_model_path or "").strip()
        if not text:
            self.session.set_model(None)
            return
        path = self.guard.resolve(text, must_exist=True, kind="ONNX model")
        self._use_model(path / "model.onnx" if path.is_dir() else path)
        self.state.mt_status = f"Model: {self.session.model_path}"
        if self.session.dataset is not None and self.state.mt_use_model:
            self.session.start_prefill(self.state.mt_provider)

    def run_model(self) -> None:
        if self.session.case_nodes is None:
            raise MedTuneError("load a case first (the model runs on the loaded volume)")
        self.set_model()
        self.session.start_run(self.session.case_nodes[0], self.state.mt_provider)
        self.state.mt_running = True
        self.state.mt_run_text = "Running the model (worker thread)..."

    def _show_run_result(self, result: Any) -> None:
        import numpy as np

        if result.task == "segmentation":
            self.slicer_app.display_manager.set_node_visible_in_group(result.node)
            counts = {str(int(v)): int(n) for v, n in zip(*np.unique(result.labels, return_counts=True), strict=True)}
            self.state.mt_run_voxels = counts
            found = ", ".join(f"label {v}: {n} voxels" for v, n in counts.items() if v != "0") or "no foreground"
            summary = found
        else:
            self.state.mt_run_table = [{"name": k, "p": round(float(v), 4)} for k, v in result.probabilities.items()]
            best = max(result.probabilities, key=result.probabilities.get)
            summary = f"class {best}"
        msg = f" ({result.provider_message})" if result.provider_message else ""
        self.state.mt_run_text = (
            f"{result.node.GetName()}: {summary} · {result.provider}{msg} · mean entropy {result.mean_entropy:.3f}"
        )

    # ---------------------------------------------------------------------------------------------- polling
    def _apply_report(self, report: Any) -> None:
        s = self.state
        if report.finetune is not None:
            ft = report.finetune
            s.mt_ft_progress = int(round(100 * ft.fraction))
            s.mt_ft_text, s.mt_ft_status, s.mt_ft_epoch = ft.text(), ft.status, ft.epoch
            s.mt_ft_running = not ft.finished
            if ft.finished:
                s.mt_ft_resumable = self.session.resumable_run() is not None
                self.refresh_runs()
        if report.export_result is not None:
            s.mt_exporting = False
            s.mt_export_text = report.export_result.text()
            s.mt_parity_passed = bool(report.export_result.parity.get("passed"))
            s.mt_model_path = str(self.session.model_path)
            if self.session.dataset is not None and s.mt_use_model:
                self.session.start_prefill(s.mt_provider)  # rank the queue with the new model
        if report.run_result is not None:
            s.mt_running = False
            self._show_run_result(report.run_result)
        if report.prefilled is not None:
            s.mt_status = f"Pre-filled {report.prefilled} case(s); most uncertain first."
            self.refresh_cases()
        if report.errors:
            s.mt_error = " | ".join(report.errors)
            s.mt_exporting = self.session.export_job is not None
            s.mt_running = self.session.run_task is not None

    async def poll_loop(self) -> None:
        """The UI timer: every half second while anything runs, one ``session.poll()`` pushed to the page."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                if not self.session.busy() and not self.state.mt_ft_running:
                    continue
                if "next" in self._busy_actions:  # next_case collects the pre-fill itself
                    continue
                with self.state:
                    self._apply_report(self.session.poll())
            except Exception:  # noqa: BLE001 - keep polling; the error is logged
                log.error("studio poll failed:\n%s", traceback.format_exc())

    # -------------------------------------------------------------------------------------------- lifecycle
    def _on_server_ready(self, **_: Any) -> None:
        self._ready = True
        if self._poll_task is None:
            self._poll_task = asyncio.get_event_loop().create_task(self.poll_loop())

    def clients_changed(self, delta: int) -> None:
        """A tab opened (+1) or closed (-1) its websocket (counted by :func:`medtune.studio.server.count_tabs`)."""
        with self.state:
            self.state.mt_clients = max(0, int(self.state.mt_clients or 0) + delta)

    def close(self) -> None:
        """Release the views' offscreen (EGL) render windows, the native resources a studio holds; call it once the
        server has stopped. Left to the interpreter's exit, they are destroyed after the GL libraries they need."""
        for view in self.slicer_app.view_manager.get_views():
            view.finalize()  # vtkRenderWindow.Finalize: frees the GL context (a no-op the second time)

    def shutdown(self) -> list[str]:
        """Stop child processes; keep unsaved labels in ``<dataset>/.versions/unsaved/``. Returns what was kept."""
        kept: list[str] = []
        if self._poll_task is not None:
            self._poll_task.cancel()
        self.session.cancel_all()
        ds, case_id = self.session.dataset, self.session.case_id
        try:
            nodes = self.session.case_nodes
            if ds is not None and case_id is not None and nodes is not None and self.session.has_unsaved_labels():
                from MedTuneLib.dataset_logic import write_nifti

                volume, segmentation = nodes
                mask = ds.segmentation_mask(segmentation, volume)
                from MedTuneLib.dataset_logic import ijk_to_ras

                out = ds.root / ".versions" / "unsaved" / f"{case_id}_{time.strftime('%Y%m%d_%H%M%S')}.nii.gz"
                out.parent.mkdir(parents=True, exist_ok=True)
                write_nifti(mask, ijk_to_ras(volume), out)
                kept.append(str(out))
        except Exception:  # noqa: BLE001 - shutting down: report, do not raise
            log.error("could not keep the unsaved labels:\n%s", traceback.format_exc())
        return kept
