"""Optional experiment trackers for a study (``--log tensorboard`` / ``--log mlflow``).

Each finished point is logged as one tracker run: its per-round metrics, its overrides as
hyperparameters and its final outcome. The tracker's package is imported lazily, and a
missing one is a clear :class:`~stamen.sweep_points.StudyError` before anything runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from stamen.server.results import RunDirectory
from stamen.sweep_points import Point, Study, StudyError, _fmt_value
from stamen.sweep_results import OPTIONAL_COLUMNS, OUTCOME_COLUMNS

LOGGERS = ("tensorboard", "mlflow")
_LOGGED_METRICS = ("test_accuracy", "test_loss", "train_loss", "uplink_bytes", "downlink_bytes", "epsilon",
                   "robust_accuracy")


class TensorBoardLogger:
    """One TensorBoard run per point under ``DIR/tensorboard/<point-id>``."""

    def __init__(self, out: Path, study: Study):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise StudyError("--log tensorboard needs the 'tensorboard' package, which is not installed "
                             "(pip install tensorboard)") from None
        self._writer_cls, self.root, self.study = SummaryWriter, out / "tensorboard", study

    def log_point(self, point: Point, run_dir: Path) -> None:
        from stamen.report import read_outcome

        writer = self._writer_cls(log_dir=str(self.root / point.id))
        try:
            for row in RunDirectory(run_dir).read_metrics():
                for key in _LOGGED_METRICS:
                    if isinstance(row.get(key), (int, float)):
                        writer.add_scalar(key, row[key], global_step=int(row["round"]))
            outcome = read_outcome(run_dir)
            hparams = {k: (v if isinstance(v, (int, float, str, bool)) else _fmt_value(v))
                       for k, v in [*point.overrides[:-1], ("run.seed", point.seed)]}
            metrics = {f"final/{k}": outcome[k] for k in (*OUTCOME_COLUMNS, *OPTIONAL_COLUMNS)
                       if isinstance(outcome.get(k), (int, float))}
            writer.add_hparams(hparams, metrics, run_name=".")
        finally:
            writer.close()

    def close(self) -> None:
        pass


class MLflowLogger:
    """One MLflow run per point in experiment ``<study name>`` (tracking URI: $MLFLOW_TRACKING_URI,
    else ``DIR/mlruns``)."""

    def __init__(self, out: Path, study: Study):
        try:
            import mlflow
        except ImportError:
            raise StudyError("--log mlflow needs the 'mlflow' package, which is not installed "
                             "(pip install mlflow)") from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        mlflow.set_experiment(study.name)

    def log_point(self, point: Point, run_dir: Path) -> None:
        from stamen.report import read_outcome

        mlflow = self.mlflow
        with mlflow.start_run(run_name=point.id):
            mlflow.log_params({k: _fmt_value(v) for k, v in [*point.overrides[:-1],
                                                            ("run.seed", point.seed)]})
            for row in RunDirectory(run_dir).read_metrics():
                mlflow.log_metrics({k: float(row[k]) for k in _LOGGED_METRICS if isinstance(row.get(k), (int, float))},
                                   step=int(row["round"]))
            outcome = read_outcome(run_dir)
            mlflow.log_metrics({f"final_{k}": float(outcome[k]) for k in (*OUTCOME_COLUMNS, *OPTIONAL_COLUMNS)
                                if isinstance(outcome.get(k), (int, float))})

    def close(self) -> None:
        pass


def make_logger(kind: str, out: Path, study: Study):
    """The ``--log`` tracker, imported lazily; a clear StudyError when its package is missing."""
    if kind == "tensorboard":
        return TensorBoardLogger(out, study)
    if kind == "mlflow":
        return MLflowLogger(out, study)
    raise StudyError(f"--log must be one of {', '.join(LOGGERS)}, got {kind!r}")
