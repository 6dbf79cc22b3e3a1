"""Study files: reading and validating the TOML that describes a trade-off study.

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
{ codec = "topk", ratio = 0.01 }]``). Plugin options follow their plugin (see
``stamen.sweep_points``). Everything is validated before anything runs: the study's own
keys, every axis key and value against the config schema, then every point's full config
against its strategy, codec and task (each seed's data split). Errors name the axis or key.

:func:`load_study` / :func:`parse_study` return a :class:`~stamen.sweep_points.Study` with its
runs expanded into :class:`~stamen.sweep_points.Point` s.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Iterable

from stamen.config import SECTIONS, ConfigError, StamenConfig, validate
from stamen.sweep_points import (Override, Study, StudyError, _apply, _canonical, _expand, _fmt_value, _label,
                                 check_points)

STUDY_KEYS = ("name", "description", "base", "fixed", "seeds", "grid", "points")
#: sections whose keys are fixed by the config schema (the others take plugin options)
_SCHEMA_SECTIONS = tuple(s for s in SECTIONS
                         if StamenConfig.model_fields[s].annotation.model_config.get("extra") == "forbid")


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
