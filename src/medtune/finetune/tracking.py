"""Experiment tracking (MLflow / TensorBoard) through MONAI's own handlers.

MLflow: the stock bundle switch ``python -m monai.bundle run ... --tracking mlflow`` (MONAI's default settings:
an ``MLFlowHandler`` on the trainer and the validator) and ``medtune finetune --tracking mlflow`` use the same
handlers; ``train.json`` defines ``tracking_uri`` (default ``sqlite:///RUN/mlruns.db``, artifacts in
``RUN/mlruns/``), ``experiment_name`` and ``run_name``, which MONAI's patch keeps. TensorBoard: MONAI's
``TensorBoardStatsHandler`` on the trainer and validator, event files in ``RUN/tensorboard/``.

:class:`TrackingExtrasHandler` (always in ``train.json``, a no-op without a tracking handler) adds what the stock
handlers do not record: the run's parameters (preset, arch, pretrained source, strategy, label fraction, seed, ...),
the mean training loss and learning rate of every epoch, and, at the end, ``model.pt``, ``progress.jsonl``,
``run.json`` and a learning-curve plot as artifacts. ``medtune evaluate`` adds the report and its plots to the same
MLflow run (:func:`log_evaluation`), found through ``RUN/tracking.json``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, cast

from medtune.atomic import write_json_atomic

TRACKING_CHOICES = ("mlflow", "tensorboard")
TRACKING_FILE = "tracking.json"
RUN_ARTIFACTS = ("model.pt", "progress.jsonl", "run.json")


def tracking_settings(kind: str) -> dict[str, Any]:
    """``ConfigWorkflow(tracking=...)`` settings for ``kind`` (MONAI's own for MLflow)."""
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    if kind == "mlflow":
        return copy.deepcopy(DEFAULT_MLFLOW_SETTINGS)
    if kind == "tensorboard":
        ids = cast(dict[str, Any], copy.deepcopy(DEFAULT_MLFLOW_SETTINGS["handlers_id"]))
        return {
            "handlers_id": {k: ids[k] for k in ("trainer", "validator")},
            "configs": {
                "trainer": {
                    "_target_": "TensorBoardStatsHandler",
                    "log_dir": "@tensorboard_dir",
                    "iteration_log": True,
                    "epoch_log": False,
                    "tag_name": "train_loss",
                    "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
                },
                "validator": {
                    "_target_": "TensorBoardStatsHandler",
                    "log_dir": "@tensorboard_dir",
                    "iteration_log": False,
                },
            },
        }
    raise ValueError(f"unknown tracking {kind!r}; choose one of {', '.join(TRACKING_CHOICES)}")


def _attached(engine: Any, cls_name: str) -> Any | None:
    """The first handler object of class ``cls_name`` attached to ``engine`` (through a bound method)."""
    for handlers in engine._event_handlers.values():
        for func, *_ in handlers:
            owner = getattr(func, "__self__", None)
            if owner is not None and type(owner).__name__ == cls_name:
                return owner
    return None


class TrackingExtrasHandler:
    """Parameters, per-epoch loss/lr and the run's files for the MLflow / TensorBoard handler on the trainer."""

    def __init__(self, output_dir: str, params: dict[str, Any] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.params = {k: v for k, v in (params or {}).items()}
        self._losses: list[float] = []
        self._logged_params = False

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    # -- which tracker is on ---------------------------------------------------------------------------
    def _mlflow(self, engine: Any) -> Any | None:
        handler = _attached(engine, "MLFlowHandler")
        return handler if handler is not None and getattr(handler, "cur_run", None) is not None else None

    def _tensorboard(self, engine: Any) -> Any | None:
        handler = _attached(engine, "TensorBoardStatsHandler")
        return getattr(handler, "_writer", None) if handler is not None else None

    # -- events ----------------------------------------------------------------------------------------
    def _iteration(self, engine: Any) -> None:
        out = engine.state.output  # MONAI's trainer output: a list of per-item dicts (decollated) or a dict
        loss = (out[0] if isinstance(out, list) else out)["loss"]
        self._losses.append(float(loss))

    def _epoch(self, engine: Any) -> None:
        epoch = int(engine.state.epoch)
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        self._losses = []
        lr = float(engine.optimizer.param_groups[0]["lr"]) if getattr(engine, "optimizer", None) else None
        metrics = {k: v for k, v in (("epoch_loss", loss), ("lr", lr)) if v is not None}
        mlflow = self._mlflow(engine)
        if mlflow is not None:
            if not self._logged_params:
                mlflow._log_params(self._clean_params())
                self._record(mlflow)
            mlflow._log_metrics(metrics, step=epoch)
        writer = self._tensorboard(engine)
        if writer is not None:
            if not self._logged_params:
                writer.add_text("params", json.dumps(self._clean_params(), indent=1), epoch)
                write_json_atomic(
                    self.output_dir / TRACKING_FILE, {"kind": "tensorboard", "log_dir": str(writer.log_dir)}
                )
            for name, value in metrics.items():
                writer.add_scalar(name, value, epoch)
            writer.flush()
        self._logged_params = self._logged_params or mlflow is not None or writer is not None

    def _completed(self, engine: Any) -> None:
        mlflow = self._mlflow(engine)
        if mlflow is None:
            return
        run_id = mlflow.cur_run.info.run_id
        for path in self._artifacts():
            mlflow.client.log_artifact(run_id, str(path))

    # -- helpers ---------------------------------------------------------------------------------------
    def _clean_params(self) -> dict[str, Any]:
        return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in self.params.items()}

    def _record(self, mlflow: Any) -> None:
        """``RUN/tracking.json``: where the run is, so ``medtune evaluate`` can add its report."""
        write_json_atomic(
            self.output_dir / TRACKING_FILE,
            {
                "kind": "mlflow",
                "tracking_uri": mlflow.client.tracking_uri,
                "experiment_id": mlflow.cur_run.info.experiment_id,
                "run_id": mlflow.cur_run.info.run_id,
            },
        )

    def _artifacts(self) -> list[Path]:
        files = [self.output_dir / name for name in RUN_ARTIFACTS if (self.output_dir / name).is_file()]
        curve = self.output_dir / "learning_curve.png"
        try:
            from medtune.evaluate.plots import plot_learning_curve

            plot_learning_curve(self.output_dir / "progress.jsonl", curve)
            files.append(curve)
        except Exception:  # noqa: BLE001 - a plot is a bonus; the metrics are already logged
            pass
        return files


def log_evaluation(run: str | Path, eval_dir: str | Path) -> str | None:
    """Add an evaluation's report, metrics and plots to the run's MLflow run (if it was tracked); its run id."""
    info_path = Path(run) / TRACKING_FILE
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("kind") != "mlflow" or not isinstance(info.get("run_id"), str):
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(str(info["tracking_uri"]))
    name = Path(eval_dir).name
    for path in sorted(Path(eval_dir).iterdir()):
        if path.is_file():
            client.log_artifact(info["run_id"], str(path), artifact_path=name)
    metrics_file = Path(eval_dir) / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        for key, value in metrics.items():
            number = value.get("value") if isinstance(value, dict) else value
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                client.log_metric(info["run_id"], f"{name}_{key}", float(number))
    return str(info["run_id"])
