"""Leakage attacks for privacy studies: what an observer learns from an update."""

from stamen.privacy.attacks.gradient_inversion import (
    ATTACKS,
    AttackResult,
    dlg_attack,
    infer_labels,
    inverting_gradients_attack,
    label_accuracy,
    model_gradient,
    mse,
    observed_update,
    psnr,
    run_attack_trials,
    total_variation,
)

__all__ = [
    "ATTACKS",
    "AttackResult",
    "dlg_attack",
    "infer_labels",
    "inverting_gradients_attack",
    "label_accuracy",
    "model_gradient",
    "mse",
    "observed_update",
    "psnr",
    "run_attack_trials",
    "total_variation",
]
