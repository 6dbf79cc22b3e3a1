"""Plugin discovery: one rule for every plugin family, built-in or a user's own package.

A plugin is a module that registers itself when imported (``register_strategy``,
``register_codec``, ``register_trainer``, ``register_dataset`` / ``register_model``). Modules
are found through Python entry points, one group per family:

==========================  ==========================================  ======================
group                       registers with                              example
==========================  ==========================================  ======================
``stamen.strategies``       ``stamen.strategies.registry``              ``ferret``
``stamen.codecs``           ``stamen.sketching.codec.register_codec``   ``countsketch``
``stamen.trainers``         ``stamen.client.trainers.register_trainer`` ``adversarial``
``stamen.tasks``            ``stamen.tasks.data`` / ``tasks.models``    ``stdlib``
==========================  ==========================================  ======================

Stamen's own plugins are listed in its ``pyproject.toml`` under ``[project.entry-points]``,
exactly as a user's package lists its own (ARCHITECTURE.md, "Add a strategy in one file"), so
there is no naming convention to get wrong: a module that is not listed is not a plugin, and
a listed module that fails to import stops the run with the entry point's name and the error.
"""

from __future__ import annotations

from importlib.metadata import entry_points

GROUPS = ("stamen.strategies", "stamen.codecs", "stamen.trainers", "stamen.tasks")

_LOADED: dict[str, list[str]] = {}  # group -> plugin names, once loaded (scanning entry points costs ~10 ms)


class PluginError(ImportError):
    """A registered plugin module failed to import."""


def load_plugins(group: str) -> list[str]:
    """Import every module registered under ``group`` (once per process); return their names."""
    if group in _LOADED:
        return list(_LOADED[group])
    if group not in GROUPS:
        raise ValueError(f"unknown plugin group {group!r}; known: {GROUPS}")
    eps = sorted(entry_points(group=group), key=lambda e: e.name)
    for ep in eps:
        try:
            ep.load()
        except Exception as err:  # noqa: BLE001 — any failure is reported with the plugin's name
            dist = ep.dist.name if ep.dist is not None else "?"
            raise PluginError(f"plugin {ep.name!r} ({group}, module {ep.value!r}, distribution {dist!r}) "
                              f"failed to import: {type(err).__name__}: {err}") from err
    _LOADED[group] = [ep.name for ep in eps]
    return list(_LOADED[group])
