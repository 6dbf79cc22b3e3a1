"""Experiment trackers: TensorBoard, MLflow, Weights & Biases (opt-in, ``--log``).

One :class:`Tracker` per run: :meth:`Tracker.log_round` with each metrics line as the run goes
(``stamen run --log tensorboard``) or replayed from ``metrics.jsonl`` (``stamen sweep --log``),
then :meth:`Tracker.finish` with the run's parameters and final outcome. Each tracker's package
is imported lazily; a missing one is a clear :class:`TrackerError` before the run starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "mlflow", "wandb")
LOGGED_METRICS = ("test_accuracy", "test_loss", "train_loss", "uplink_bytes", "downlink_bytes", "epsilon",
                  "robust_accuracy", "rejected")


class TrackerError(ValueError):
    """A tracker that cannot be used (its package is missing, or an unknown name)."""


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(row[k]) for k in LOGGED_METRICS
            if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)}


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}


class Tracker:
    """Base: subclasses write one run's rounds and outcome to their backend."""

    def log_round(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, params: dict[str, Any], outcome: dict[str, float]) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files under ``<root>/<name>`` (``tensorboard --logdir <root>``)."""

    def __init__(self, root: Path, name: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackerError("--log tensorboard needs the 'tensorboard' package (pip install "
                               "'stamen[tensorboard]')") from None
        self.writer = SummaryWriter(log_dir=str(Path(root) / name))

    def log_round(self, row):
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["round"]))
        self.writer.flush()

    def finish(self, params, outcome):
        self.writer.add_hparams(_plain(params), {f"final/{k}": v for k, v in outcome.items()}, run_name=".")
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run in experiment ``experiment`` ($MLFLOW_TRACKING_URI, else ``<root>/mlruns``)."""

    def __init__(self, root: Path, name: str, experiment: str):
        try:
            import mlflow
        except ImportError:
            raise TrackerError("--log mlflow needs the 'mlflow' package (pip install mlflow)") from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((Path(root) / "mlruns").resolve().as_uri())
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=name)

    def log_round(self, row):
        self.mlflow.log_metrics(_scalars(row), step=int(row["round"]))

    def finish(self, params, outcome):
        self.mlflow.log_params({k: str(v) for k, v in params.items()})
        self.mlflow.log_metrics({f"final_{k}": v for k, v in outcome.items()})
        self.mlflow.end_run()


class WandbTracker(Tracker):
    """A Weights & Biases run in project ``experiment`` (offline unless WANDB_MODE says otherwise)."""

    def __init__(self, root: Path, name: str, experiment: str):
        try:
            import wandb
        except ImportError:
            raise TrackerError("--log wandb needs the 'wandb' package (pip install wandb)") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project=experiment, name=name, dir=str(root), reinit=True)

    def log_round(self, row):
        self.run.log(_scalars(row), step=int(row["round"]))

    def finish(self, params, outcome):
        self.run.config.update(_plain(params))
        self.run.summary.update(outcome)
        self.run.finish()


def make_tracker(kind: str, root: Path, name: str, experiment: str = "stamen") -> Tracker:
    """The ``--log`` tracker for one run, its package imported now (TrackerError if missing)."""
    if kind == "tensorboard":
        return TensorBoardTracker(root, name)
    if kind == "mlflow":
        return MLflowTracker(root, name, experiment)
    if kind == "wandb":
        return WandbTracker(root, name, experiment)
    raise TrackerError(f"--log must be one of {', '.join(TRACKERS)}, got {kind!r}")


def check_tracker(kind: str) -> None:
    """Fail before a run starts if ``kind`` is unknown or its package is missing."""
    module = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}.get(kind)
    if module is None:
        raise TrackerError(f"--log must be one of {', '.join(TRACKERS)}, got {kind!r}")
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise TrackerError(f"--log {kind} needs the {module!r} package, which is not installed (pip install {module})")
