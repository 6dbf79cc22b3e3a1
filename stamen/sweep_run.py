"""Running the points of a study: engines, resume/skip planning, one job, worker processes.

**Resuming.** A point whose run directory holds ``summary.json`` of the same config is
finished and skipped. A point interrupted mid-run (no summary) is *resumed from its last
checkpoint* with ``run_federation(..., resume=True)`` when the checkpoint was written by the
same config — resuming equals an uninterrupted run (tests/test_server_loop.py) and keeps the
rounds already paid for; a missing, unreadable or foreign checkpoint means the point is
rerun from scratch (its directory is cleared first). A finished point whose study now asks
for more ``run.rounds`` is extended the same way. A finished run of a *different* config in
a point's directory is an error (nothing is overwritten): use another ``--out``.
(:func:`plan_point`.)

**Engines.** ``simulation`` (default) runs each point with :func:`stamen.experiment.simulate`
(Flower's simulation engine on Ray) in its own subprocess; ``inprocess`` runs the real server
loop and client handlers in one process (:class:`stamen.server.inprocess_grid.InProcessGrid`),
with no Ray start-up: fast, and exact (same seed, same metrics as the simulation engine).
With the inprocess engine and one job, points run in the calling process. With ``--jobs N``
points run in N worker processes (``spawn``, one fresh process per point, so no Ray or torch
state leaks between points; :func:`_run_pool`), each with one torch thread and — for the
simulation engine — a private local Ray instance of ``max(1, cores // N)`` CPUs
(``federation.client_cpus`` must fit in that share; ``federation.ray_address`` points use that
cluster instead). A point that fails does not stop the others: :func:`execute_job` returns
its error and writes the traceback to ``runs/<id>/error.txt``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from stamen.config import StamenConfig, validate
from stamen.server.results import RunDirectory, atomic_write
from stamen.sweep_points import Point, StudyError

if TYPE_CHECKING:
    from stamen.sweep_progress import SweepReporter

ENGINE_NAMES = ("simulation", "inprocess")


def _run_inprocess(cfg: StamenConfig, out: Path, *, resume: bool, on_round, cpus: int, verbose: bool) -> dict:
    from stamen.server.inprocess_grid import InProcessGrid
    from stamen.server.loop import run_federation

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    return run_federation(InProcessGrid(cfg), cfg, out, resume=resume, on_round=on_round)


def _run_simulation(cfg: StamenConfig, out: Path, *, resume: bool, on_round, cpus: int, verbose: bool) -> dict:
    from stamen.experiment import simulate

    if not cfg.federation.ray_address:
        # A private local Ray instance of this job's share of the cores; Flower's Ray backend
        # uses an initialized Ray as it is. address="local" never joins another job's cluster.
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        import ray

        if not ray.is_initialized():
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     logging_level=logging.ERROR, log_to_driver=verbose)
    return simulate(cfg, out, resume=resume, on_round=on_round, verbose=verbose)


#: how a point runs, by --engine: fn(cfg, out, *, resume, on_round, cpus, verbose) -> summary
ENGINES: dict[str, Callable[..., dict[str, Any]]] = {"simulation": _run_simulation, "inprocess": _run_inprocess}


@dataclass
class Plan:
    point: Point
    action: str  # "skip" | "resume" | "fresh"
    reason: str = ""
    from_round: int = 0


def plan_point(point: Point, run_dir: Path) -> Plan:
    """What a rerun does with a point's directory (see the module docstring)."""
    from stamen.server.checkpoint import LegacyCheckpointError
    from stamen.server.loop import resume_fingerprint
    from stamen.server.results import CheckpointError

    run = RunDirectory(run_dir)
    if not run.path.exists():
        return Plan(point, "fresh")
    old = _read_config(run)
    same = old is not None and old == point.cfg.to_dict()
    finished = run.summary_path.is_file()
    if finished and same:
        return Plan(point, "skip", "finished")
    try:
        ck = run.load_checkpoint()
        resumable = ck.get("fingerprint") == resume_fingerprint(point.cfg) and int(ck["round"]) <= point.cfg.run.rounds
        done = int(ck["round"])
    except LegacyCheckpointError as err:  # never rerun over (and clear) a run the user may want to convert
        raise StudyError(f"point ({point.label}): {err}") from None
    except (CheckpointError, KeyError, TypeError, ValueError) as err:
        resumable, done, why = False, 0, str(err)
    else:
        why = "its checkpoint was written by another config"
    if resumable:
        return Plan(point, "resume", f"from round {done + 1}", done)
    if finished:
        diff = _config_diff(old, point.cfg.to_dict()) if old else ["config.toml unreadable"]
        raise StudyError(f"{run.path} holds a finished run of a different config (differs in {', '.join(diff)}); "
                         "use another --out, or delete that run directory to rerun it")
    return Plan(point, "fresh", f"restarting an interrupted run ({why})" if run.metrics_path.exists() else "")


def _read_config(run: RunDirectory) -> dict[str, Any] | None:
    try:
        return validate(tomllib.loads(run.config_path.read_text())).to_dict()
    except (OSError, ValueError):
        return None


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for k in sorted(set(sa) | set(sb)):
            if sa.get(k) != sb.get(k):
                keys.append(f"{section}.{k}")
    return keys[:8]


def _job(plan: Plan, out_dir: Path, engine: str, cpus: int, verbose: bool) -> dict[str, Any]:
    return {"id": plan.point.id, "cfg": plan.point.cfg.to_dict(), "out": str(out_dir / "runs" / plan.point.id),
            "engine": engine, "resume": plan.action == "resume", "cpus": cpus, "verbose": verbose}


def execute_job(job: dict[str, Any], on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one point (in this process); return ``{"ok": True, "summary"}`` or ``{"ok": False, "error"}``.

    Failures are returned, not raised, so one broken point does not stop a study; the
    traceback is written to the run directory's ``error.txt``.
    """
    cfg = validate(job["cfg"])
    out = Path(job["out"])
    run = RunDirectory(out)
    try:
        if job["resume"]:
            atomic_write(run.config_path, cfg.to_toml())  # an extended run records its new rounds
            for stale in (run.summary_path, out / "error.txt"):
                stale.unlink(missing_ok=True)
        elif out.exists():
            shutil.rmtree(out)
        summary = ENGINES[job["engine"]](cfg, out, resume=job["resume"], on_round=on_round, cpus=job["cpus"],
                                         verbose=job["verbose"])
        return {"ok": True, "summary": summary}
    except Exception as err:  # noqa: BLE001 - reported per point
        text = "".join(traceback.format_exception(err))
        try:
            atomic_write(out / "error.txt", text)
        except OSError:
            pass
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}


_EVENTS = None  # a multiprocessing queue in pool workers: (point id, round row) events


def _worker_init(events, threads: int) -> None:
    global _EVENTS
    import torch

    _EVENTS = events
    torch.set_num_threads(threads)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _worker_run(job: dict[str, Any]) -> dict[str, Any]:
    def on_round(row: dict[str, Any]) -> None:
        if _EVENTS is not None:
            _EVENTS.put((job["id"], {"round": row.get("round"), "test_accuracy": row.get("test_accuracy")}))

    if _EVENTS is not None:
        _EVENTS.put((job["id"], None))  # started
    return execute_job(job, on_round)


def _run_pool(todo: list[Plan], out: Path, engine: str, jobs: int, cpus: int, verbose: bool,
              reporter: SweepReporter, finished: Callable[[Plan, dict[str, Any]], None]) -> None:
    """Points in ``spawn`` worker processes, a fresh one per point (Ray and torch state never leak)."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    by_id = {p.point.id: p for p in todo}
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx, max_tasks_per_child=1,
                               initializer=_worker_init, initargs=(events, 1))

    def drain() -> None:
        while True:
            try:
                pid, row = events.get_nowait()
            except queue_mod.Empty:
                return
            if row is None:
                reporter.point_started(by_id[pid])
            else:
                reporter.point_round(pid, row)

    try:
        futures = {pool.submit(_worker_run, _job(p, out, engine, cpus, verbose)): p for p in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            drain()
            for fut in done:
                try:
                    outcome = fut.result()
                except Exception as err:  # noqa: BLE001 - a worker died (killed, out of memory)
                    outcome = {"ok": False, "error": f"worker process failed: {type(err).__name__}: {err}"}
                finished(futures[fut], outcome)
        drain()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
