"""The points of a trade-off study: how overrides become configs, labels and run ids.

:class:`Study` is a parsed study file (``stamen.sweep_study``) and :class:`Point` one run of
it: ``base + fixed + point + grid values + run.seed``, validated as a full config.

**Plugin options follow their plugin**: a value that switches ``strategy.name`` or
``compression.codec`` to another plugin drops the options the base gave the previous one (a
FedProx base's ``proximal_mu`` does not reach a FedAvg point, an SRHT base's ``ratio`` does
not reach an int8 point): the one override rule of ``stamen.config.apply_overrides``.
:func:`check_points` then runs the preflight on every point and builds each task (each seed's
data split), so a bad option or combination fails before anything runs.

Each point runs in ``DIR/runs/<point-id>``; the id is a readable slug of the point's varied
values plus a hash of its overrides (``alpha=0.1_ratio=0.05_seed=0-1a2b3c4d``), so it is
stable across reruns of the same study file (:func:`point_id`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from stamen.config import ConfigError, StamenConfig, apply_overrides, validate


class StudyError(ConfigError):
    """A study that cannot be run; the message names the bad axis or key."""


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
    """Run the preflight on every point (its round pipeline: plugin options, codec, privacy and the
    combination's capabilities) and build each distinct task once, so a bad point fails before
    anything runs."""
    from stamen.strategies.preflight import build_pipeline
    from stamen.tasks.task import load_task

    tasks: set[str] = set()
    for p in points:
        try:
            build_pipeline(p.cfg, calibrate=False)
            key = p.cfg.fingerprint("task") + f"/{p.cfg.federation.clients}/{p.cfg.run.seed}"
            if key not in tasks:
                load_task(p.cfg.task, p.cfg.federation.clients, p.cfg.run.seed).new_model()
                tasks.add(key)
        except ValueError as err:  # ConfigError, StrategyConfigError, DataError, codec errors
            raise StudyError(f"point ({p.label}): {err}") from None


def _apply(data: dict[str, Any], overrides: Iterable[Override]) -> dict[str, Any]:
    """``data`` with the overrides set, by the one override rule of :func:`stamen.config.apply_overrides`
    (plugin options follow their plugin)."""
    try:
        return apply_overrides(data, [(key.split("."), json.loads(json.dumps(value))) for key, value in overrides])
    except ConfigError as err:
        raise StudyError(str(err)) from None


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
