"""Trade-off studies: one base config, axes to vary, one run directory per point.

A study file (TOML)::

    name = "codecs"                         # optional; default: the file's stem
    description = "what the study asks"     # optional
    base = "../stamen/configs/default.toml" # a run config, relative to the study file ...
    # [base]                                # ... or an inline table of config sections
    # task = { dataset = "digits" }
    seeds = [0, 1, 2]                       # optional axis: run.seed (default: the base's seed)

    [fixed]                                 # optional: overrides every point shares
    "run.rounds" = 10

    [grid]                                  # optional: the cartesian product of these axes
    "task.alpha" = [0.1, 1.0]
    "compression.ratio" = [0.05, 0.2]

    [[points]]                              # optional: an explicit list of points
    "strategy.name" = "fedavg"
    [[points]]
    strategy = { name = "fedprox", proximal_mu = 0.1 }   # the same as two strategy.* keys

The runs are ``points × grid × seeds`` (a missing axis counts as one empty point), each
``base + fixed + point + grid values + run.seed``. Keys are ``section.key``; quoted
(``"task.alpha" = 1``), bare dotted (``task.alpha = 1``) and inline tables
(``task = { alpha = 1 }``) all mean the same. A grid axis may also be a list of section
tables, each value setting several keys at once (``compression = [{ codec = "int8" },
{ codec = "topk", ratio = 0.01 }]``). **Plugin options follow their plugin**: a value that
switches ``strategy.name`` or ``compression.codec`` to another plugin drops the options the
base gave the previous one (a FedProx base's ``proximal_mu`` does not reach a FedAvg point,
an SRHT base's ``ratio`` does not reach an int8 point). Everything is validated before
anything runs: the study's own keys, every axis key and value against the config schema,
then every point's full config against its strategy, codec and task (each seed's data
split). Errors name the axis or key.

Each point runs in ``DIR/runs/<point-id>``; the id is a readable slug of the point's varied
values plus a hash of its overrides (``alpha=0.1_ratio=0.05_seed=0-1a2b3c4d``), so it is
stable across reruns of the same study file.

**Resuming.** A point whose run directory holds ``summary.json`` of the same config is
finished and skipped. A point interrupted mid-run (no summary) is *resumed from its last
checkpoint* with ``run_federation(..., resume=True)`` when the checkpoint was written by the
same config — resuming equals an uninterrupted run (tests/test_server_loop.py) and keeps the
rounds already paid for; a missing, unreadable or foreign checkpoint means the point is
rerun from scratch (its directory is cleared first). A finished point whose study now asks
for more ``run.rounds`` is extended the same way. A finished run of a *different* config in
a point's directory is an error (nothing is overwritten): use another ``--out``.

**Engines.** ``simulation`` (default) runs each point with :func:`stamen.experiment.simulate`
(Flower's simulation engine on Ray) in its own subprocess; ``inprocess`` runs the real server
loop and client handlers in one process (:class:`stamen.server.inprocess_grid.InProcessGrid`),
with no Ray start-up: fast, and exact (same seed, same metrics as the simulation engine).
With the inprocess engine and one job, points run in the calling process. With ``--jobs N``
points run in N worker processes (``spawn``, one fresh process per point, so no Ray or torch
state leaks between points), each with one torch thread and — for the simulation engine — a
private local Ray instance of ``max(1, cores // N)`` CPUs (``federation.client_cpus`` must fit
in that share; ``federation.ray_address`` points use that cluster instead). A point that fails
does not stop the others: its error goes to ``runs/<id>/error.txt`` and study.json, and the
next rerun retries it.

Outputs: ``DIR/results.csv`` (one row per finished run; rewritten atomically after every
point), ``DIR/study.json`` (the study, its points and their status).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from stamen.config import SECTIONS, ConfigError, StamenConfig, validate
from stamen.server.results import RunDirectory, atomic_write

log = logging.getLogger("stamen.sweep")

ENGINE_NAMES = ("simulation", "inprocess")
LOGGERS = ("tensorboard", "mlflow")
STUDY_KEYS = ("name", "description", "base", "fixed", "seeds", "grid", "points")
#: sections whose keys are fixed by the config schema (the others take plugin options)
_SCHEMA_SECTIONS = tuple(s for s in SECTIONS
                         if StamenConfig.model_fields[s].annotation.model_config.get("extra") == "forbid")
#: outcome columns of results.csv, in order (optional ones only when some run has them)
OUTCOME_COLUMNS = ("final_test_accuracy", "best_test_accuracy", "total_uplink_bytes", "total_downlink_bytes")
OPTIONAL_COLUMNS = ("epsilon", "delta", "robust_accuracy")
TAIL_COLUMNS = ("rounds", "wall_s", "run_dir")


class StudyError(ConfigError):
    """A study that cannot be run; the message names the bad axis or key."""


class SweepFailed(RuntimeError):
    """Some points of a study failed (the others finished and are in results.csv)."""


# ---------------------------------------------------------------------------------------
# the study: parsing and validation
# ---------------------------------------------------------------------------------------
Override = tuple[str, Any]  # ("section.key", value)


@dataclass(frozen=True)
class Point:
    id: str
    overrides: tuple[Override, ...]  # the point's own overrides, then grid values, then run.seed
    seed: int
    cfg: StamenConfig

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_fmt_value(v)}" for k, v in self.overrides)


@dataclass
class Study:
    name: str
    description: str
    source: str  # the study file, or "<inline>"
    base: dict[str, Any]  # the base config's sections (as read, before `fixed`)
    fixed: tuple[Override, ...]
    grid: dict[str, list[tuple[Override, ...]]]  # axis -> the overrides of each of its values
    grid_raw: dict[str, list[Any]]  # axis -> its values as written
    points: list[tuple[Override, ...]]
    seeds: list[int]
    seeds_given: bool
    varied_keys: list[str]  # flattened section.key names varied by points and grid (not run.seed)
    runs: list[Point] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "base": self.base, "fixed": dict(self.fixed), "grid": self.grid_raw,
                "points": [dict(p) for p in self.points], "seeds": self.seeds,
                "varied_keys": self.varied_keys}


def load_study(path: str | Path, *, check_plugins: bool = True) -> Study:
    """Read and validate a study file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"study file {str(p)!r} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise StudyError(f"study file {str(p)!r} is not valid TOML: {err}") from None
    return parse_study(data, root=p.parent, name=p.stem, source=str(p), check_plugins=check_plugins)


def parse_study(data: dict[str, Any], *, root: str | Path = ".", name: str = "study", source: str = "<inline>",
                check_plugins: bool = True) -> Study:
    """Validate a study table and expand it into its runs; raise StudyError naming the bad key."""
    if not isinstance(data, dict):
        raise StudyError("a study must be a table")
    unknown = [k for k in data if k not in STUDY_KEYS]
    if unknown:
        raise StudyError(f"unknown study key {unknown[0]!r}; a study has {', '.join(STUDY_KEYS)} "
                         "(config keys to vary go under [grid] or [[points]], shared ones under [fixed])")
    study_name = data.get("name", name)
    if not isinstance(study_name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", study_name):
        raise StudyError(f"study key 'name' must be a simple name (letters, digits, . _ -), got {study_name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise StudyError(f"study key 'description' must be a string, got {description!r}")

    base = _read_base(data, Path(root))
    fixed = _read_overrides(data.get("fixed", {}), "[fixed]")
    shared = _apply(base, fixed)
    bad = _value_errors(shared, [k for k, _ in fixed])
    if bad:
        raise StudyError(f"[fixed]: {bad}")

    grid, grid_raw = _read_grid(data.get("grid", {}), shared)
    points = _read_points(data.get("points", []), shared)
    seeds, seeds_given = _read_seeds(data, int(shared.get("run", {}).get("seed", StamenConfig().run.seed)))

    for i, point in enumerate(points):
        for key, _ in point:
            clash = _overlaps(key, set(grid))
            if clash:
                raise StudyError(f"[[points]] #{i + 1} sets {key!r}, which [grid] axis {clash!r} also varies; "
                                 "vary each key in one place")
    varied = _varied_keys([*points, *(items for axis in grid.values() for items in axis)])
    study = Study(study_name, description, source, base, fixed, grid, grid_raw, points, seeds, seeds_given, varied)
    study.runs = _expand(study, shared)
    if check_plugins:
        check_points(study.runs)
    return study


def _read_base(data: dict[str, Any], root: Path) -> dict[str, Any]:
    if "base" not in data:
        raise StudyError("study lacks 'base': name a run config file (base = \"config.toml\", relative to the "
                         "study file) or give its sections inline ([base] table; empty for the defaults)")
    base = data["base"]
    if isinstance(base, str):
        path = (root / base) if not Path(base).is_absolute() else Path(base)
        if not path.is_file():
            raise StudyError(f"study key 'base': config file {str(path)!r} does not exist "
                             f"(paths are relative to the study file's folder {str(root)!r})")
        try:
            base = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise StudyError(f"study key 'base': config file {str(path)!r} is not valid TOML: {err}") from None
    elif not isinstance(base, dict):
        raise StudyError(f"study key 'base' must be a config file path or a table of config sections, got {base!r}")
    try:
        validate(base)
    except ConfigError as err:
        raise StudyError(f"study key 'base': {err}") from None
    return json.loads(json.dumps(base))


def _value_errors(data: dict[str, Any], keys: Iterable[str]) -> str:
    """Schema errors of ``data`` located at ``keys`` (errors elsewhere, e.g. a cross-key rule
    that another axis satisfies, are left to the full point's validation)."""
    from pydantic import ValidationError

    keys = list(keys)
    try:
        StamenConfig.model_validate(data)
    except ValidationError as err:
        msgs = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            key = next((k for k in keys if loc == k or loc.startswith(k + ".")), None)
            if key is not None:
                msgs.append(f"bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
        return "; ".join(dict.fromkeys(msgs))
    return ""


def _check_key(key: Any, value: Any, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise StudyError(f"{where}: keys must be config keys like 'task.alpha', got {key!r}")
    parts = key.split(".")
    if any(not p for p in parts):
        raise StudyError(f"{where}: key {key!r} must look like section.key")
    if parts[0] not in SECTIONS:
        raise StudyError(f"{where}: unknown config section {parts[0]!r} in key {key!r}; "
                         f"sections are {', '.join(SECTIONS)}")
    if len(parts) == 1:
        raise StudyError(f"{where}: key {key!r} must look like section.key (or {key} = {{ ... }} with its keys)")
    if parts[0] in _SCHEMA_SECTIONS:
        fields = StamenConfig.model_fields[parts[0]].annotation.model_fields
        if parts[1] not in fields or len(parts) > 2:
            raise StudyError(f"{where}: unknown config key {key!r}; {parts[0]}.* keys are {', '.join(fields)}")
    if key == "run.seed" and where != "[fixed]":
        raise StudyError(f"{where}: vary 'run.seed' with the top-level list seeds = [...], not as an axis")
    return key


def _flat_items(table: dict[str, Any], where: str) -> tuple[Override, ...]:
    """A table of overrides as flat ``("section.key", value)`` pairs.

    TOML reads a bare dotted key (``task.alpha = 1``) and an inline table
    (``task = { alpha = 1 }``) as the same nested table, and a quoted key
    (``"task.alpha" = 1``) as a flat one: all three set the one key task.alpha.
    """
    items = []
    for key, value in table.items():
        if isinstance(key, str) and key in SECTIONS and isinstance(value, dict):
            if not value:
                raise StudyError(f"{where}: section table {key!r} is empty")
            items.extend((_check_key(f"{key}.{k}", v, where), v) for k, v in value.items())
        else:
            items.append((_check_key(key, value, where), value))
    keys = [k for k, _ in items]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise StudyError(f"{where}: key {dup!r} is given twice")
    return tuple(items)


def _read_overrides(table: Any, where: str) -> tuple[Override, ...]:
    if not isinstance(table, dict):
        raise StudyError(f"{where} must be a table of section.key = value, got {table!r}")
    return _flat_items(table, where)


Axis = list[tuple[Override, ...]]  # one entry per value: the overrides that value sets


def _read_grid(table: Any, shared: dict[str, Any]) -> tuple[dict[str, Axis], dict[str, list[Any]]]:
    """Axes ``section.key = [v1, v2]``, or ``section = [{...}, {...}]`` (each value a set of keys)."""
    if not isinstance(table, dict):
        raise StudyError(f"[grid] must be a table of axes (section.key = [values]), got {table!r}")
    raw: list[tuple[str, Any]] = []
    for key, values in table.items():
        if isinstance(key, str) and key in SECTIONS and isinstance(values, dict):  # bare dotted keys
            raw.extend((f"{key}.{k}", v) for k, v in values.items())
        else:
            raw.append((key, values))
    axes: dict[str, Axis] = {}
    for key, values in raw:
        where = f"[grid] axis {key!r}"
        if not isinstance(values, list):
            raise StudyError(f"{where} must be a list of values, got {values!r}")
        if not values:
            raise StudyError(f"{where} is empty; give at least one value")
        if isinstance(key, str) and key in SECTIONS:  # an axis of section tables
            if not all(isinstance(v, dict) for v in values):
                raise StudyError(f"{where} must be a list of tables of {key}.* keys, got {values!r}")
            axis = [_flat_items({key: v}, where) for v in values]
        else:
            _check_key(key, values[0], where)
            axis = [((key, v),) for v in values]
        if len({_canonical(v) for v in axis}) != len(axis):
            raise StudyError(f"{where} repeats a value: {values!r}")
        for items in axis:
            bad = _value_errors(_apply(shared, items), [k for k, _ in items])
            if bad:
                raise StudyError(f"{where} value {_label(items) if len(items) > 1 else _fmt_value(items[0][1])}: "
                                 f"{bad}")
        clash = _overlaps(key, set(axes))
        if clash:
            raise StudyError(f"{where} overlaps [grid] axis {clash!r}; vary each key in one place")
        axes[key] = axis
    return axes, dict(raw)


def _read_points(points: Any, shared: dict[str, Any]) -> list[tuple[Override, ...]]:
    if not isinstance(points, list):
        raise StudyError(f"'points' must be an array of tables ([[points]]), got {points!r}")
    out: list[tuple[Override, ...]] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(points):
        where = f"[[points]] #{i + 1}"
        if not isinstance(table, dict):
            raise StudyError(f"{where} must be a table of section.key = value, got {table!r}")
        if not table:
            raise StudyError(f"{where} is empty; give at least one key (an empty point repeats the base)")
        items = _flat_items(table, where)
        bad = _value_errors(_apply(shared, items), [k for k, _ in items])
        if bad:
            raise StudyError(f"{where} ({_label(items)}): {bad}")
        canon = _canonical(sorted(items))
        if canon in seen:
            raise StudyError(f"{where} repeats [[points]] #{seen[canon] + 1}")
        seen[canon] = i
        out.append(items)
    return out


def _read_seeds(data: dict[str, Any], default: int) -> tuple[list[int], bool]:
    if "seeds" not in data:
        return [default], False
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise StudyError(f"study key 'seeds' must be a non-empty list of integers, got {seeds!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise StudyError(f"study key 'seeds': {s!r} is not an integer")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"study key 'seeds' repeats a seed: {seeds!r}")
    return list(seeds), True


def _overlaps(key: str, others: set[str]) -> str | None:
    for other in others:
        if key == other or key.startswith(other + ".") or other.startswith(key + "."):
            return other
    return None


def _varied_keys(override_lists: Iterable[Iterable[Override]]) -> list[str]:
    keys: list[str] = []
    for items in override_lists:
        for k, _ in items:
            if k not in keys:
                keys.append(k)
    return keys


def _expand(study: Study, shared: dict[str, Any]) -> list[Point]:
    runs, ids = [], {}
    for point in study.points or [()]:
        for combo in itertools.product(*study.grid.values()):
            for seed in study.seeds:
                overrides = (*point, *itertools.chain.from_iterable(combo), ("run.seed", seed))
                cfg = _point_config(shared, overrides, study.name)
                pid = point_id(overrides)
                if pid in ids:
                    raise StudyError(f"two points resolve to the same run id {pid!r}: {ids[pid]} and "
                                     f"{_label(overrides)}")
                ids[pid] = _label(overrides)
                runs.append(Point(pid, overrides, seed, cfg))
    return runs


def _point_config(shared: dict[str, Any], overrides: tuple[Override, ...], study: str) -> StamenConfig:
    data = _apply(shared, overrides)
    try:
        cfg = validate(data)
    except ConfigError as err:
        raise StudyError(f"point ({_label(overrides)}): {err}") from None
    cfg.run.name = f"{study}-{point_id(overrides)}"
    return cfg


def check_points(points: list[Point]) -> None:
    """Build every point's strategy and codec, and each distinct task once: plugin options
    (``strategy.*``, ``compression.*``, ``privacy.*``) fail here, before anything runs."""
    from stamen.sketching.codec import make_codec
    from stamen.strategies.registry import build_strategy
    from stamen.tasks.task import load_task

    tasks: set[str] = set()
    for p in points:
        try:
            build_strategy(p.cfg)
            try:
                make_codec(p.cfg.compression.codec, **p.cfg.compression.options())
            except TypeError as err:
                raise ValueError(f"bad compression.* options for codec {p.cfg.compression.codec!r}: {err}") from None
            key = p.cfg.fingerprint("task") + f"/{p.cfg.federation.clients}/{p.cfg.run.seed}"
            if key not in tasks:
                load_task(p.cfg.task, p.cfg.federation.clients, p.cfg.run.seed).new_model()
                tasks.add(key)
        except ValueError as err:  # ConfigError, StrategyConfigError, DataError, codec errors
            raise StudyError(f"point ({p.label}): {err}") from None


#: keys naming a plugin; the plugin's options (the section's extra keys) belong to it
PLUGIN_KEYS = {"strategy.name": "strategy", "compression.codec": "compression"}


def _apply(data: dict[str, Any], overrides: Iterable[Override]) -> dict[str, Any]:
    """``data`` with the overrides set. Plugin options follow their plugin: an override that
    switches ``strategy.name`` or ``compression.codec`` to another plugin first drops the
    section's plugin options (keys other than the section's own fields), which belonged to
    the previous plugin; the point's own options for the new plugin are set after that."""
    out = json.loads(json.dumps(data))
    items = list(overrides)
    for key, value in [it for it in items if it[0] in PLUGIN_KEYS] + [it for it in items if it[0] not in PLUGIN_KEYS]:
        parts = key.split(".")
        if key in PLUGIN_KEYS:
            section, name = parts
            model = StamenConfig.model_fields[section].annotation
            sec = out.get(section, {})
            if value != sec.get(name, model.model_fields[name].default):
                out[section] = {k: v for k, v in sec.items() if k in model.model_fields}
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StudyError(f"key {key!r}: {part!r} is not a section")
        node[parts[-1]] = json.loads(json.dumps(value))
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _label(overrides: Iterable[Override]) -> str:
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in overrides)


def point_id(overrides: Iterable[Override]) -> str:
    """``<slug>-<hash>``: readable short names of the varied values and 8 hex of their hash."""
    items = list(overrides)
    flat = items
    tails = [k.rsplit(".", 1)[-1] for k, _ in flat]
    parts = []
    for (key, value), tail in zip(flat, tails):
        name = tail if tails.count(tail) == 1 else key
        parts.append(f"{name}={_fmt_value(value)}")
    slug = re.sub(r"[^A-Za-z0-9.=+-]+", "_", "_".join(parts)).strip("_")[:72] or "base"
    digest = hashlib.sha256(_canonical([[k, v] for k, v in items]).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------
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


class SweepReporter:
    """Hooks for progress: override any of them (the default does nothing)."""

    def study_started(self, study: Study, plans: list[Plan]) -> None: ...
    def point_started(self, plan: Plan) -> None: ...
    def point_round(self, point_id: str, row: dict[str, Any]) -> None: ...
    def point_finished(self, plan: Plan, summary: dict[str, Any]) -> None: ...
    def point_failed(self, plan: Plan, error: str) -> None: ...
    def study_finished(self, result: "StudyResult") -> None: ...


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
            for plan in todo:
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


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------
def results_rows(out_dir: Path, study: Study) -> list[dict[str, Any]]:
    """One row per finished run of the study (read back from the runs' own files)."""
    from stamen.report import read_outcome

    rows = []
    for p in study.runs:
        run_dir = Path(out_dir) / "runs" / p.id
        if not (run_dir / "summary.json").is_file():
            continue
        outcome = read_outcome(run_dir)
        cfg = p.cfg.to_dict()
        row: dict[str, Any] = {"point_id": p.id}
        for key in study.varied_keys:
            section, _, name = key.partition(".")
            row[key] = cfg.get(section, {}).get(name)
        row["seed"] = p.seed
        row.update({k: outcome.get(k) for k in (*OUTCOME_COLUMNS, *OPTIONAL_COLUMNS, "rounds", "wall_s")})
        row["run_dir"] = f"runs/{p.id}"
        rows.append(row)
    return rows


def write_results(out_dir: Path, study: Study) -> Path:
    """``results.csv``: the varied keys, seed, accuracy, bytes, ε/δ and robust accuracy (when
    some run has them), rounds, wall time; written atomically."""
    rows = results_rows(out_dir, study)
    optional = [c for c in OPTIONAL_COLUMNS if any(r.get(c) is not None for r in rows)]
    columns = ["point_id", *study.varied_keys, "seed", *OUTCOME_COLUMNS, *optional, *TAIL_COLUMNS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_csv_cell(r.get(c)) for c in columns])
    path = Path(out_dir) / "results.csv"
    atomic_write(path, buf.getvalue())
    return path


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return _fmt_value(v)


def _write_study(out: Path, study: Study, engine: str, jobs: int, status: dict[str, str],
                 errors: dict[str, str]) -> None:
    runs = [{"id": p.id, "dir": f"runs/{p.id}", "seed": p.seed, "overrides": dict(p.overrides[:-1]),
             "status": status[p.id], **({"error": errors[p.id]} if p.id in errors else {})} for p in study.runs]
    counts = {s: sum(1 for v in status.values() if v == s) for s in ("done", "failed", "pending")}
    doc = {"format": 1, **study.describe(), "engine": engine, "jobs": jobs, "counts": counts,
           "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": "results.csv", "runs": runs}
    atomic_write(out / "study.json", json.dumps(doc, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------
# optional experiment trackers
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# progress display
# ---------------------------------------------------------------------------------------
class RichSweepReporter(SweepReporter):
    """A rich progress display: the study's points, and one bar (rounds, accuracy) per running point."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        self._bars: dict[str, Any] = {}
        self._overall = None
        self._skipped = self._failed = 0

    def __enter__(self) -> "RichSweepReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def study_started(self, study: Study, plans: list[Plan]) -> None:
        self._skipped = sum(p.action == "skip" for p in plans)
        self._overall = self.progress.add_task(f"[bold]{study.name}[/] points", total=len(plans),
                                               completed=self._skipped, info=self._info())

    def _info(self) -> str:
        return f"{self._skipped} finished before" + (f", [red]{self._failed} failed[/]" if self._failed else "")

    def point_started(self, plan: Plan) -> None:
        note = f" (resumed {plan.reason})" if plan.action == "resume" else ""
        self._bars[plan.point.id] = self.progress.add_task(
            f"  {plan.point.id}", total=plan.point.cfg.run.rounds, completed=plan.from_round, info=f"starting{note}")

    def point_round(self, point_id: str, row: dict[str, Any]) -> None:
        bar = self._bars.get(point_id)
        if bar is not None:
            acc = row.get("test_accuracy")
            self.progress.update(bar, completed=row.get("round") or 0, info=f"acc {acc:.4f}" if acc is not None else "")

    def _end(self, plan: Plan, text: str) -> None:
        bar = self._bars.pop(plan.point.id, None)
        if bar is not None:
            self.progress.remove_task(bar)
        self.progress.console.print(text)
        if self._overall is not None:
            self.progress.update(self._overall, advance=1, info=self._info())

    def point_finished(self, plan: Plan, summary: dict[str, Any]) -> None:
        acc = summary.get("final_test_accuracy")
        acc_text = f"{acc:.4f}" if isinstance(acc, (int, float)) else "n/a"
        self._end(plan, f"[green]done[/] {plan.point.id}  final accuracy {acc_text}")

    def point_failed(self, plan: Plan, error: str) -> None:
        self._failed += 1
        self._end(plan, f"[red]failed[/] {plan.point.id}: {error}")
