"""Stamen: federated learning simulation and deployment on Flower (ARCHITECTURE.md).

The library surface is :mod:`stamen.api`, re-exported here lazily so that ``import stamen``
stays cheap: :func:`run_experiment`, :func:`load_run`, :func:`bound_pipeline`, :class:`RunResult`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunResult", "bound_pipeline", "load_run", "run_experiment"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from stamen import api

        return getattr(api, name)
    raise AttributeError(f"module 'stamen' has no attribute {name!r}")
