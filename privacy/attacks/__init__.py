"""Leakage attacks for privacy studies: what an observer learns from an update.

Exports resolve lazily so that ``python -m stamen.privacy.attacks.gradient_inversion``
runs the module once (an eager import here would make runpy warn about a double import).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = (
    "ATTACKS",
    "AttackResult",
    "dlg_attack",
    "gaussian_projection",
    "infer_labels",
    "inverting_gradients_attack",
    "label_accuracy",
    "linear_adjoint",
    "model_gradient",
    "mse",
    "observed_update",
    "psnr",
    "run_attack_trials",
    "total_variation",
)

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module("stamen.privacy.attacks.gradient_inversion"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
