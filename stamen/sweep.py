"""Trade-off studies: one base config, axes to vary, one run directory per point.

``stamen sweep STUDY.toml`` reads a study file, expands it into points
(``points × grid × seeds``), runs every point not yet finished and writes the study's
outputs. This module is the orchestration (:func:`run_study`, :func:`fit_jobs`) and the
public face: the public names of the parts below are importable from ``stamen.sweep``
(``__all__``), so ``from stamen import sweep as S; S.load_study(...)`` keeps working. The parts:

- ``stamen.sweep_study`` — the study file format, its parsing and validation
  (:func:`load_study`, :func:`parse_study`);
- ``stamen.sweep_points`` — :class:`Study` and :class:`Point`: overrides applied to the base
  (plugin options follow their plugin), point ids, plugin checks (:func:`check_points`);
- ``stamen.sweep_run`` — engines (``simulation``, ``inprocess``), resume/skip planning
  (:func:`plan_point`), one point's job (:func:`execute_job`) and the worker-process pool;
- ``stamen.sweep_results`` — ``results.csv`` and ``study.json``;
- ``stamen.sweep_trackers`` — optional TensorBoard / MLflow / W&B logging (``--log``, ``stamen/trackers.py``);
- ``stamen.sweep_progress`` — the reporter hooks and the rich progress display.

Each point runs in ``DIR/runs/<point-id>``. A rerun skips finished points and resumes
interrupted ones from their last checkpoint. A point that fails does not stop the others:
its error goes to ``runs/<id>/error.txt`` and study.json, and the next rerun retries it.

Outputs: ``DIR/results.csv`` (one row per finished run; rewritten atomically after every
point), ``DIR/study.json`` (the study, its points and their status).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stamen.sweep_points import Override, Point, Study, StudyError, check_points, point_id
from stamen.sweep_progress import RichSweepReporter, SweepReporter
from stamen.sweep_results import (OPTIONAL_COLUMNS, OUTCOME_COLUMNS, TAIL_COLUMNS, _write_study, results_rows,
                                  write_results)
from stamen.sweep_run import ENGINE_NAMES, ENGINES, Plan, _job, _run_pool, execute_job, plan_point
from stamen.sweep_study import STUDY_KEYS, Axis, load_study, parse_study
from stamen.sweep_trackers import StudyLogger, make_logger

__all__ = [
    "ENGINE_NAMES", "ENGINES", "OPTIONAL_COLUMNS", "OUTCOME_COLUMNS", "STUDY_KEYS",
    "TAIL_COLUMNS", "Axis", "Override", "Plan", "Point", "RichSweepReporter", "Study", "StudyError",
    "StudyLogger", "StudyResult", "SweepFailed", "SweepReporter", "check_points", "execute_job", "fit_jobs",
    "load_study", "make_logger", "parse_study", "plan_point", "point_id", "results_rows", "run_study",
    "write_results",
]

log = logging.getLogger("stamen.sweep")


class SweepFailed(RuntimeError):
    """Some points of a study failed (the others finished and are in results.csv)."""


@dataclass
class StudyResult:
    out_dir: Path
    ran: list[str] = field(default_factory=list)  # ids run (or resumed) in this call, in completion order
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before this call
    failed: dict[str, str] = field(default_factory=dict)
    csv_path: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def fit_jobs(study: Study, engine: str, jobs: int, cores: int | None = None) -> int:
    """CPUs each job may use; raise StudyError when ``--jobs`` cannot fit the points' client CPUs."""
    if engine not in ENGINE_NAMES:
        raise StudyError(f"--engine must be one of {', '.join(ENGINE_NAMES)}, got {engine!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise StudyError(f"--jobs must be a positive integer, got {jobs!r}")
    cores = cores or os.cpu_count() or 1
    share = max(1, cores // jobs)
    if engine == "simulation":
        if jobs > cores:
            raise StudyError(f"--jobs {jobs} exceeds the {cores} CPU cores: each simulation needs at least one")
        for p in study.runs:
            if not p.cfg.federation.ray_address and p.cfg.federation.client_cpus > share:
                raise StudyError(f"point ({p.label}): federation.client_cpus={p.cfg.federation.client_cpus} does "
                                 f"not fit --jobs {jobs} on {cores} cores (each job gets {share}); lower --jobs "
                                 "or federation.client_cpus")
    return share


def run_study(study: Study, out_dir: str | Path, *, engine: str = "simulation", jobs: int = 1,
              reporter: SweepReporter | None = None, log_to: str | None = None, verbose: bool = False) -> StudyResult:
    """Run every point of ``study`` not yet finished in ``out_dir``; write results.csv and study.json."""
    out = Path(out_dir)
    reporter = reporter or SweepReporter()
    cpus = fit_jobs(study, engine, jobs)
    logger = make_logger(log_to, out, study) if log_to else None  # fails now if the package is missing
    plans = [plan_point(p, out / "runs" / p.id) for p in study.runs]  # conflicts fail before anything runs

    result = StudyResult(out)
    status = {p.id: "pending" for p in study.runs}
    errors: dict[str, str] = {}
    for plan in plans:
        if plan.action == "skip":
            result.skipped.append(plan.point.id)
            status[plan.point.id] = "done"
    _write_study(out, study, engine, jobs, status, errors)
    result.csv_path = write_results(out, study)
    reporter.study_started(study, plans)

    todo = [p for p in plans if p.action != "skip"]

    def finished(plan: Plan, outcome: dict[str, Any]) -> None:
        pid = plan.point.id
        if outcome["ok"]:
            result.ran.append(pid)
            if plan.action == "resume":
                result.resumed.append(pid)
            status[pid] = "done"
            errors.pop(pid, None)
            reporter.point_finished(plan, outcome["summary"])
            if logger is not None:
                logger.log_point(plan.point, out / "runs" / pid)
        else:
            result.failed[pid] = outcome["error"]
            status[pid], errors[pid] = "failed", outcome["error"]
            reporter.point_failed(plan, outcome["error"])
        _write_study(out, study, engine, jobs, status, errors)
        write_results(out, study)

    try:
        if jobs == 1 and engine == "inprocess":
            from stamen.server.loop import stop_requested

            for plan in todo:
                if stop_requested():  # Ctrl-C: start no further point; the interrupted one resumes on rerun
                    break
                reporter.point_started(plan)
                job = _job(plan, out, engine, cpus, verbose)
                finished(plan, execute_job(job, lambda row, pid=plan.point.id: reporter.point_round(pid, row)))
        elif todo:
            _run_pool(todo, out, engine, jobs, cpus, verbose, reporter, finished)
    finally:
        if logger is not None:
            logger.close()
        _write_study(out, study, engine, jobs, status, errors)
        write_results(out, study)
    reporter.study_finished(result)
    return result
