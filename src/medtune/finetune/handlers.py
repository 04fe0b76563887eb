"""Ignite/MONAI handlers the bundle configs attach: progress stream, run state (checkpoint, best model,
early stopping, resume) and the freeze-then-unfreeze schedule.

Written here rather than taken from MONAI because resuming must restore more than MONAI's
``CheckpointSaver``/``CheckpointLoader``/``EarlyStopHandler`` persist together: the best metric so far,
the early-stopping patience counter and stable file names (``checkpoint_last.pt``, ``model.pt``) that the
CLI and the Slicer extension can find. Files are written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from medtune.atomic import write_bytes_atomic
from medtune.errors import MedTuneError, one_line, unpickling_refusal
from medtune.finetune.progress import ProgressWriter
from medtune.runfolder import BEST_MODEL, CHECKPOINT_LAST
from medtune.untrusted import csv_cell

# Set by ``medtune finetune``'s SIGINT handler (medtune.finetune.runner); checked at every engine iteration, so
# Ctrl-C stops a run within one step wherever the signal landed (a KeyboardInterrupt raised inside ``logging``
# would be swallowed with "Exception ignored in _releaseLock" and the run would go on).
STOP = threading.Event()


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to memory, then an atomic write (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def _unwrap(network: nn.Module) -> nn.Module:
    inner = getattr(network, "module", None)  # DistributedDataParallel / DataParallel wrap the network
    return inner if isinstance(inner, nn.Module) else network


def _flag(engine: Engine, **values: Any) -> None:
    """Put MedTune's results on ignite's ``engine.state`` (it takes new attributes; the runner reads them)."""
    for name, value in values.items():
        setattr(engine.state, name, value)


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


MODEL_SELECTIONS = ("best", "last")


class RunStateHandler:
    """Checkpoint each epoch, keep the best model, stop early, and resume an interrupted run.

    ``selection="best"``: ``model.pt`` is the epoch with the best validation metric (optimistic on that split);
    ``"last"``: ``model.pt`` is the final epoch's weights whatever the metric says (a fixed schedule, nnU-Net
    style: nothing is chosen on validation, so cross-validation may validate on the held-out fold). Early stopping
    (``patience`` > 0) needs a chosen epoch: it implies ``"best"``.

    ``checkpoint_last.pt`` (the resume point) is written every epoch. With ``"last"``, ``model.pt`` is written on
    validated epochs and the final one only (a 470 MB backbone validated once per run wrote it every epoch): an
    interrupted run's ``model.pt`` is its last validated epoch (the one ``run.json``'s metric describes), and the
    epoch of ``model.pt`` is kept in the checkpoint (``model_epoch``) so that resuming a run whose checkpoint is
    already at the final epoch writes the final ``model.pt`` if it is missing or older.

    Attach to the trainer *after* the ``ValidationHandler`` so the epoch's validation metric is known.
    """

    def __init__(
        self,
        output_dir: str | Path,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        validator: Engine | None = None,
        lr_scheduler: Any = None,
        key_metric: str = "val_metric",
        patience: int = 0,
        resume: bool = False,
        min_delta: float = 0.0,
        selection: str = "best",
    ):
        if selection not in MODEL_SELECTIONS:
            raise MedTuneError(f"model_selection must be one of {', '.join(MODEL_SELECTIONS)}, got {selection!r}")
        self.selection = "best" if patience else selection  # early stopping asks for the best epoch
        self.output_dir = Path(output_dir)
        self.network = network
        self.optimizer = optimizer
        self.validator = validator
        self.lr_scheduler = lr_scheduler
        self.key_metric = key_metric
        self.patience = int(patience or 0)
        self.resume = bool(resume)
        self.min_delta = float(min_delta)
        self.best_metric = -float("inf")
        self.best_epoch = 0
        self.bad_epochs = 0
        self.early_stopped = False
        self.resumed_from = 0
        self.model_epoch = 0  # the epoch whose weights model.pt holds (0: none written by this run yet)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._maybe_resume)
        engine.add_event_handler(Events.STARTED, self._stop_if_asked)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop_if_asked)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if self.validator is not None:
            self.validator.add_event_handler(Events.ITERATION_COMPLETED, self._stop_if_asked)

    @staticmethod
    def _stop_if_asked(engine: Engine) -> None:
        """Ctrl-C: end the engine now; the last completed epoch's checkpoint stays the resume point."""
        if STOP.is_set():
            _flag(engine, medtune_interrupted=True)
            engine.terminate()

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "model_epoch": self.model_epoch,
        }

    def current_metric(self, epoch: int | None = None) -> float | None:
        """The validation key metric (of trainer ``epoch`` if given; ``None`` when it was not validated)."""
        if self.validator is None or self.validator.state is None:
            return None
        if epoch is not None and getattr(self.validator.state, "epoch", None) != epoch:
            return None  # val_interval > 1: no validation this epoch
        value = self.validator.state.metrics.get(self.key_metric)
        return None if value is None else float(value)

    def _load(self, path: Path) -> dict[str, Any]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            if "weights_only" in str(exc) or "GLOBAL" in str(exc):
                raise MedTuneError(unpickling_refusal(exc), path) from exc
            raise MedTuneError(f"cannot resume from a corrupt checkpoint ({type(exc).__name__})", path) from exc

    def _maybe_resume(self, engine: Engine) -> None:
        path = self.output_dir / CHECKPOINT_LAST
        if not self.resume:
            for existing in (path, self.output_dir / BEST_MODEL):
                if existing.exists():
                    raise MedTuneError(
                        "output folder already holds a training run; resume it (resume=True) or use a new folder",
                        existing,
                    )
            return
        if not path.is_file():
            return
        ckpt = self._load(path)
        configured_lrs = [g["lr"] for g in self.optimizer.param_groups]  # this run's learning rates
        try:
            _unwrap(self.network).load_state_dict(ckpt["network"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, RuntimeError, KeyError) as exc:
            msg = one_line(exc, 120)
            raise MedTuneError(
                f"checkpoint does not fit this configuration (arch/strategy changed?): {msg}", path
            ) from exc
        for group, lr in zip(self.optimizer.param_groups, configured_lrs, strict=True):
            group["initial_lr"] = lr
        self._restore_schedule(ckpt.get("lr_scheduler"))
        state = ckpt["run_state"]
        self.best_metric, self.best_epoch, self.bad_epochs = (
            state["best_metric"],
            state["best_epoch"],
            state["bad_epochs"],
        )
        epoch = int(ckpt["trainer"]["epoch"])
        # checkpoints written before model_epoch existed: "last" wrote model.pt every epoch, "best" at best_epoch
        self.model_epoch = int(state.get("model_epoch", epoch if self.selection == "last" else self.best_epoch))
        engine.state.epoch = epoch
        engine.state.iteration = epoch * int(engine.state.epoch_length or 0)
        _flag(engine, medtune_best=(self.best_metric, self.best_epoch))
        self.resumed_from = epoch
        _flag(engine, medtune_resumed_from=epoch)
        if epoch >= (engine.state.max_epochs or 0):
            model = self.output_dir / BEST_MODEL
            if self.selection == "last" and (self.model_epoch != epoch or not model.is_file()) and _is_rank0():
                save_atomic(_unwrap(self.network).state_dict(), model)  # the checkpoint's weights: the final ones
                self.model_epoch = epoch
            engine.terminate()

    def _restore_schedule(self, sched_state: dict | None) -> None:
        """Continue the LR schedule at the resumed epoch, with this run's length and learning rates."""
        sched = self.lr_scheduler
        if sched is None or sched_state is None:
            return
        sched.last_epoch = int(sched_state.get("last_epoch", 0))
        if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
            t = min(sched.last_epoch, sched.T_max)
            for group in self.optimizer.param_groups:
                base = group["initial_lr"]
                group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * t / sched.T_max)) / 2
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _epoch_completed(self, engine: Engine) -> None:
        if STOP.is_set():  # interrupted during this epoch or its validation: keep the previous checkpoint
            _flag(engine, medtune_interrupted=True)
            engine.terminate()
            return
        epoch = engine.state.epoch
        if self.validator is None:  # no validation at all: the last epoch is the best one
            improved, validated = True, True
        else:
            metric = self.current_metric(epoch)
            validated = getattr(self.validator.state, "epoch", None) == epoch
            improved = metric is not None and math.isfinite(metric) and metric > self.best_metric + self.min_delta
            if self.selection == "last":  # the saved model is the last epoch's: record its (last validated) metric
                improved = metric is not None and math.isfinite(metric)
            if improved and metric is not None:
                self.best_metric = metric
        if improved:
            self.best_epoch = epoch
            self.bad_epochs = 0
        elif validated:
            self.bad_epochs += 1
        _flag(engine, medtune_best=(self.best_metric, self.best_epoch))
        final = epoch >= (engine.state.max_epochs or 0)
        if improved or (self.selection == "last" and (validated or final)):
            self.model_epoch = epoch  # before the checkpoint below records it
        if _is_rank0():
            if self.model_epoch == epoch:
                save_atomic(_unwrap(self.network).state_dict(), self.output_dir / BEST_MODEL)
            save_atomic(
                {
                    "network": _unwrap(self.network).state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                    "trainer": {"epoch": int(epoch), "iteration": int(engine.state.iteration)},
                    "run_state": self.state_dict(),
                },
                self.output_dir / CHECKPOINT_LAST,
            )
        stop = self.selection == "best" and self.patience and self.bad_epochs >= self.patience
        if stop and epoch < (engine.state.max_epochs or 0):
            self.early_stopped = True
            _flag(engine, medtune_early_stopped=True)
            engine.terminate()


class FreezeScheduleHandler:
    """``freeze_then_unfreeze``: train the head only for ``unfreeze_epoch`` epochs, then everything."""

    def __init__(
        self, network: nn.Module, arch: str, strategy: str, unfreeze_epoch: int, freeze_bn_stats: bool = False
    ):
        self.network = network
        self.arch = arch
        self.strategy = strategy
        self.unfreeze_epoch = int(unfreeze_epoch)
        self.freeze_bn_stats = freeze_bn_stats

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)

    def _epoch_started(self, engine: Engine) -> None:
        from medtune.finetune.strategies import unfreeze

        net = _unwrap(self.network)
        if self.strategy == "freeze_then_unfreeze" and engine.state.epoch > self.unfreeze_epoch:
            if getattr(net, "medtune_backbone_frozen", False):
                unfreeze(net, self.arch, self.freeze_bn_stats)


class ProgressStreamHandler:
    """Writes the JSON-lines progress stream (docs/formats.md §2) and, optionally, a console progress bar."""

    def __init__(
        self,
        path: str | Path,
        run_state: RunStateHandler | None = None,
        metric_name: str = "val_metric",
        every_n_steps: int = 1,
        progress_bar: bool = False,
        echo_json: bool = False,
    ):
        self.writer = ProgressWriter(path if _is_rank0() else None, echo=sys.stdout if echo_json else None)
        self.run_state = run_state
        self.metric_name = metric_name
        self.every = max(1, int(every_n_steps))
        self.progress_bar = progress_bar and _is_rank0()
        self._bar = None
        self._t0 = 0.0
        self._steps_done = 0
        self._epoch_losses: list[float] = []
        self._epoch_lr: float | None = None
        self._has_started = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        # after RunStateHandler (attached earlier) has seen the validation metric
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        engine.add_event_handler(Events.TERMINATE, self._terminated)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _eta(self, engine: Engine) -> float | None:
        if self._steps_done == 0:
            return None
        per_step = (time.time() - self._t0) / self._steps_done
        total = (engine.state.max_epochs or 0) * (engine.state.epoch_length or 0)
        return max(0.0, (total - engine.state.iteration) * per_step)

    def _started(self, engine: Engine) -> None:
        self._t0 = time.time()
        self._has_started = True
        self.writer.emit(
            "start",
            max_epochs=engine.state.max_epochs,
            steps_per_epoch=engine.state.epoch_length,
            start_epoch=int(getattr(engine.state, "medtune_resumed_from", 0)),
            metric_name=self.metric_name,
        )

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_losses = []
        opt = getattr(engine, "optimizer", None)
        self._epoch_lr = max(g["lr"] for g in opt.param_groups) if opt is not None else None
        if self.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=engine.state.epoch_length,
                desc=f"epoch {engine.state.epoch}/{engine.state.max_epochs}",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )

    def _iteration(self, engine: Engine) -> None:
        self._steps_done += 1
        out: Any = engine.state.output  # ignite annotates State.output as Optional[int]
        loss = out[0]["loss"] if isinstance(out, list) else out["loss"]
        loss = float(loss.item() if hasattr(loss, "item") else loss)
        self._epoch_losses.append(loss)
        step = (engine.state.iteration - 1) % (engine.state.epoch_length or 1) + 1
        eta = self._eta(engine)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", eta=f"{int((eta or 0) // 60)}:{int((eta or 0) % 60):02d}")
        if step % self.every == 0 or step == engine.state.epoch_length:
            self.writer.emit(
                "step",
                epoch=engine.state.epoch,
                max_epochs=engine.state.max_epochs,
                step=step,
                steps_per_epoch=engine.state.epoch_length,
                loss=loss,
                eta_seconds=eta,
            )

    def _epoch_completed(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        metric = self.run_state.current_metric(engine.state.epoch) if self.run_state else None
        best = getattr(engine.state, "medtune_best", (None, None))
        loss = sum(self._epoch_losses) / max(1, len(self._epoch_losses))
        rec = self.writer.emit(
            "epoch",
            epoch=engine.state.epoch,
            max_epochs=engine.state.max_epochs,
            loss=loss,
            metric=metric,
            metric_name=self.metric_name,
            best_metric=best[0] if best[0] is not None and best[0] != -float("inf") else None,
            best_epoch=best[1],
            lr=self._epoch_lr,
            elapsed_seconds=round(time.time() - self._t0, 2),
            eta_seconds=self._eta(engine),
        )
        if self.progress_bar:
            from medtune.finetune.progress import format_record

            sys.stderr.write(format_record(rec) + "\n")
        if getattr(engine.state, "medtune_early_stopped", False):
            self.writer.emit(
                "early_stop",
                epoch=engine.state.epoch,
                patience=self.run_state.patience if self.run_state else None,
                best_metric=best[0],
                best_epoch=best[1],
            )

    def _done(self, engine: Engine, status: str, error: str | None = None) -> None:
        best = getattr(engine.state, "medtune_best", (None, None))
        fields = {"error": error} if error else {}
        self.writer.emit(
            "done",
            status=status,
            epoch=engine.state.epoch,
            best_metric=best[0] if best[0] != -float("inf") else None,
            best_epoch=best[1],
            elapsed_seconds=round(time.time() - self._t0, 2),
            **fields,
        )

    def _completed(self, engine: Engine) -> None:
        status = "early_stopped" if getattr(engine.state, "medtune_early_stopped", False) else "completed"
        if STOP.is_set() or getattr(engine.state, "medtune_interrupted", False):
            status = "interrupted"
        self._done(engine, status)

    def _terminated(self, engine: Engine) -> None:
        pass  # COMPLETED still fires after terminate(); `done` is written there

    def _failed(self, engine: Engine, exc: BaseException) -> None:
        if self._bar is not None:
            self._bar.close()
        if not self._has_started:  # refused before this run began: leave an existing stream alone
            raise exc
        self._done(engine, "failed", f"{type(exc).__name__}: {one_line(exc) if str(exc) else ''}")
        raise exc


class ClassificationReportHandler:
    """Collects softmax outputs and labels during an evaluator run, then writes the evaluation report
    (``metrics.json``, ``report.md``, PNG plots, ``predictions.csv``) with :mod:`medtune.evaluate`."""

    def __init__(
        self,
        output_dir: str | Path,
        class_names: list[str],
        positive_class: int = 1,
        progress_path: str | Path | None = None,
        context: dict | None = None,
        n_bootstrap: int = 1000,
    ):
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.positive_class = int(positive_class)
        self.progress_path = Path(progress_path) if progress_path is not None else None
        self.context = dict(context or {})
        self.n_bootstrap = n_bootstrap
        self.probs: list[Any] = []
        self.labels: list[int] = []
        self.files: list[str] = []
        self.metrics: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.probs, self.labels, self.files = [], [], []

    def _collect(self, engine: Engine) -> None:
        out: Any = engine.state.output  # ignite annotates State.output as Optional[int]
        items = out if isinstance(out, list) else [out]
        batch: Any = engine.state.batch  # ignite annotates State.batch as Optional[int]
        if isinstance(batch, dict):  # not decollated: a list of paths
            paths = list(batch.get("image_path") or [""] * len(items))
        else:
            paths = [b.get("image_path", "") if isinstance(b, dict) else "" for b in batch]
        for item, path in zip(items, paths, strict=False):
            self.probs.append(item["pred"].detach().float().cpu().numpy())
            label = item["label"].detach().cpu()
            self.labels.append(int(label.argmax()) if label.numel() > 1 else int(label))
            self.files.append(str(path))

    def _write(self, engine: Engine) -> None:
        import numpy as np

        from medtune.atomic import write_with
        from medtune.evaluate import classification_metrics, write_classification_report

        probs = np.stack(self.probs)
        y = np.asarray(self.labels)
        self.metrics = classification_metrics(
            y, probs, self.class_names, positive_class=self.positive_class, n_bootstrap=self.n_bootstrap
        )
        write_classification_report(self.output_dir, self.metrics, self.class_names, self.progress_path, self.context)

        def _csv(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["file", "label", *[csv_cell(f"p_{n}") for n in self.class_names]])
                for f, lab, p in zip(self.files, y, probs, strict=True):  # file names: never a formula
                    writer.writerow([csv_cell(Path(f).name), int(lab), *[f"{v:.8f}" for v in p]])

        write_with(self.output_dir / "predictions.csv", _csv)


class SegmentationReportHandler:
    """Collects predicted and reference label maps during an evaluator run, then writes the segmentation
    report (Dice / HD95 / surface distance per class and case, CIs, overlays) with :mod:`medtune.evaluate`."""

    def __init__(
        self,
        output_dir: str | Path,
        class_names: list[str],
        progress_path: str | Path | None = None,
        context: dict | None = None,
        n_bootstrap: int = 1000,
        n_overlay_images: int = 64,
    ):
        self.output_dir = Path(output_dir)
        self.class_names = {i: n for i, n in enumerate(class_names) if i > 0}  # foreground classes
        self.progress_path = progress_path
        self.context = dict(context or {})
        self.n_bootstrap = n_bootstrap
        self.n_overlay_images = n_overlay_images
        self.cases: list[dict] = []
        self.metrics: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    @staticmethod
    def _labels(t: torch.Tensor) -> Any:
        arr = t.detach().cpu()
        return (arr.argmax(0) if arr.shape[0] > 1 else arr[0]).numpy().astype("uint8")

    def _collect(self, engine: Engine) -> None:
        out: Any = engine.state.output  # ignite annotates State.output as Optional[int]
        items = out if isinstance(out, list) else [out]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [None] * len(items)
        for item, src in zip(items, batch, strict=False):
            image = src.get("image") if isinstance(src, dict) else None
            meta = getattr(image, "meta", {}) or {}
            name = Path(str(meta.get("filename_or_obj", f"case_{len(self.cases):04d}"))).name
            spacing = getattr(image, "pixdim", None)
            case = {
                "case": name.split(".")[0],
                "pred": self._labels(item["pred"]),
                "label": self._labels(item["label"]),
                "spacing": tuple(float(s) for s in spacing) if spacing is not None else None,
            }
            if image is not None and len(self.cases) < self.n_overlay_images:
                case["image"] = image.detach().cpu().numpy()[0]
            self.cases.append(case)

    def _write(self, engine: Engine) -> None:
        from medtune.evaluate.seg_report import write_segmentation_report
        from medtune.evaluate.segmentation import evaluate_cases

        self.metrics = evaluate_cases(self.cases, self.class_names, n_bootstrap=self.n_bootstrap)
        overlay = [c for c in self.cases if "image" in c]
        write_segmentation_report(self.output_dir, self.metrics, overlay, self.progress_path, self.context)


class RankReportHandler:
    """Multi-process training: each rank writes ``rank<N>.json`` (iterations, samples seen, a checksum of
    its final weights) so a run can show that every rank trained and that the replicas stayed identical."""

    def __init__(self, output_dir: str | Path, network: nn.Module):
        self.output_dir = Path(output_dir)
        self.network = network
        self.samples = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _count(self, engine: Engine) -> None:
        out: Any = engine.state.output  # ignite annotates State.output as Optional[int]
        self.samples += len(out) if isinstance(out, list) else int(out["image"].shape[0])

    def _write(self, engine: Engine) -> None:
        import hashlib
        import json

        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        digest = hashlib.sha256()
        for key, value in sorted(_unwrap(self.network).state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        record = {
            "rank": rank,
            "world_size": world,
            "iterations": int(engine.state.iteration),
            "epochs": int(engine.state.epoch),
            "samples_seen": self.samples,
            "weights_sha256": digest.hexdigest(),
        }
        write_bytes_atomic(self.output_dir / f"rank{rank}.json", (json.dumps(record, indent=2) + "\n").encode())
