"""Trackers for a study (``stamen sweep --log tensorboard|mlflow|wandb``): each finished point is
one tracker run (``stamen/trackers.py``) — its rounds replayed from ``metrics.jsonl``, its
overrides as hyperparameters, its outcome as final metrics. A missing package is a clear
:class:`~stamen.sweep_points.StudyError` before anything runs.
"""

from __future__ import annotations

from pathlib import Path

from stamen.server.results import RunDirectory
from stamen.sweep_points import Point, Study, StudyError
from stamen.sweep_results import OPTIONAL_COLUMNS, OUTCOME_COLUMNS
from stamen.trackers import TRACKERS, TrackerError, check_tracker, make_tracker


class StudyLogger:
    """Logs every finished point of ``study`` to one tracker backend under ``DIR/<kind>``."""

    def __init__(self, kind: str, out: Path, study: Study):
        try:
            check_tracker(kind)
        except TrackerError as err:
            raise StudyError(str(err)) from None
        self.kind, self.root, self.study = kind, Path(out) / kind, study

    def log_point(self, point: Point, run_dir: Path) -> None:
        from stamen.report import read_outcome

        tracker = make_tracker(self.kind, self.root, point.id, experiment=self.study.name)
        for row in RunDirectory(run_dir).read_metrics():
            tracker.log_round(row)
        outcome = read_outcome(run_dir)
        tracker.finish({**dict(point.overrides[:-1]), "run.seed": point.seed},
                       {k: float(outcome[k]) for k in (*OUTCOME_COLUMNS, *OPTIONAL_COLUMNS)
                        if isinstance(outcome.get(k), (int, float))})


def make_logger(kind: str, out: Path, study: Study) -> StudyLogger:
    if kind not in TRACKERS:
        raise StudyError(f"--log must be one of {', '.join(TRACKERS)}, got {kind!r}")
    return StudyLogger(kind, out, study)
