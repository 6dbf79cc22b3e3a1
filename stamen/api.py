"""Stamen as a library: run experiments from Python, read past runs, use the round pipeline
(strategies, codecs, privacy) inside your own Flower ServerApp.

    import stamen

    result = stamen.run_experiment("stamen/configs/default.toml", overrides=["run.rounds=5"])
    result.summary["final_test_accuracy"], result.metrics.tail()   # dict, pandas DataFrame
    again = stamen.load_run(result.dir)

Inside your own ``ServerApp`` (a Stamen ``ClientApp`` on the nodes), the round pipeline is a
Flower ``Strategy``: bind it to the grid, then let Flower's own loop drive it::

    @app.main()
    def main(grid, context):
        cfg = stamen.config.load(overrides=["strategy.name=fedavg", "privacy.clip=1.0", ...])
        pipeline, task = stamen.bound_pipeline(cfg, grid)
        result = pipeline.start(grid, initial_arrays=ArrayRecord(task.initial_weights()), num_rounds=3)
        pipeline.privacy.accountant.epsilon()   # what those rounds cost

(``tests/test_api.py`` runs exactly that.) Stamen's own loop (``server/loop.py``) adds
checkpoints, byte counts and the results directory around the same four strategy methods.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from stamen.config import StamenConfig, load, validate

if TYPE_CHECKING:
    import pandas

    from stamen.strategies.pipeline import RoundPipeline
    from stamen.tasks.task import Task

ENGINES = ("simulation", "inprocess")


@dataclass
class RunResult:
    """A finished (or resumable) run: its directory, summary and per-round metrics."""

    dir: Path
    summary: dict[str, Any]
    config: StamenConfig
    rows: list[dict[str, Any]] = field(repr=False, default_factory=list)

    @property
    def metrics(self) -> "pandas.DataFrame":
        """metrics.jsonl as a DataFrame, one row per round (nested entries stay Python objects)."""
        import pandas

        return pandas.DataFrame(self.rows)


def run_experiment(config: str | Path | dict | StamenConfig | None = None, overrides: Sequence[str] = (),
                   out: str | Path | None = None, *, engine: str = "simulation", resume: bool = False,
                   verbose: bool = False) -> RunResult:
    """Run one federation and return its :class:`RunResult`.

    ``config``: a TOML path, a nested dict of sections, a :class:`StamenConfig`, or None (the
    built-in defaults); ``overrides``: ``section.key=value`` strings applied on top (the rule of
    ``--set``); ``out``: the results directory (default ``runs/<name>-<timestamp>``);
    ``engine``: ``simulation`` (Flower's engine on Ray) or ``inprocess`` (the same server loop
    and client code in this process; the same metrics, no Ray). The preflight refuses a
    combination that cannot run correctly before anything starts (``ConfigError``).
    """
    from stamen.experiment import preflight, simulate
    from stamen.server.app import default_out_dir
    from stamen.server.results import ensure_writable_dir

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    cfg = _resolve(config, overrides)
    out_dir = Path(out) if out is not None else default_out_dir(cfg)
    ensure_writable_dir(out_dir)
    preflight(cfg)
    if engine == "simulation":
        simulate(cfg, out_dir, resume=resume, verbose=verbose)
    else:
        from stamen.server.inprocess_grid import InProcessGrid
        from stamen.server.loop import run_federation

        run_federation(InProcessGrid(cfg), cfg, out_dir, resume=resume)
    return load_run(out_dir)


def load_run(path: str | Path) -> RunResult:
    """A run directory written by Stamen (``config.toml``, ``metrics.jsonl``, ``summary.json``)."""
    from stamen.server.results import RunDirectory

    run = RunDirectory(path)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.path} is not a Stamen run directory (no config.toml)")
    summary = json.loads(run.summary_path.read_text()) if run.summary_path.is_file() else {}
    return RunResult(run.path, summary, load(run.config_path), run.read_metrics())


def bound_pipeline(cfg: StamenConfig, grid, *, timeout: float | None = None) -> tuple["RoundPipeline", "Task"]:
    """The round pipeline ``cfg`` asks for, bound to the nodes of ``grid`` (each node's partition
    and size learned by Stamen's discovery query), and the task (model, test set)."""
    from stamen.server.loop import discover_nodes, example_bounds
    from stamen.strategies.preflight import build_pipeline
    from stamen.tasks.task import load_task

    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    pipeline = build_pipeline(cfg)
    wait = cfg.federation.round_timeout_s if timeout is None else timeout
    nodes, sizes = discover_nodes(grid, cfg.federation.clients, wait)
    pipeline.bind(seed=cfg.run.seed, nodes=nodes, layout=task.layout, fraction_train=cfg.federation.fraction_train,
                  fraction_evaluate=cfg.federation.fraction_evaluate, rounds=cfg.run.rounds, timeout=wait,
                  bounds=example_bounds(sizes, cfg.federation.max_examples_per_client),
                  min_replies=cfg.faults.min_replies)
    return pipeline, task


def _resolve(config, overrides: Sequence[str]) -> StamenConfig:
    from stamen.config import apply_overrides

    if isinstance(config, StamenConfig):
        return validate(apply_overrides(config.to_dict(), list(overrides)))
    if isinstance(config, dict):
        return validate(apply_overrides(config, list(overrides)))
    return load(config, list(overrides))
