"""Trainer ``adversarial``: federated adversarial training on the client (Li, Song, Yang,
"Federated Adversarial Learning: A Framework with Convergence Analysis", ICML 2023).

Each local step makes adversarial examples for its batch with the *current* local model
(PGD inside an ε-ball, ℓ∞ or ℓ2, random start; the inner maximization) and takes one
optimizer step on ``(1 − mix)·CE(clean) + mix·CE(adversarial)`` (the outer minimization),
via :func:`stamen.tasks.attacks.adversarial_loss`. Everything else is the ``sgd`` trainer:
the same batches from the same generator, the same optimizer, FedProx's proximal term if
asked. With ε = 0 (or mix = 0) the loss *is* the clean loss, so the result equals ``sgd``
bit for bit.

The strategy (``fat``) sets the attack in the round's message config:

==================  =========================================================
``attack-eps``      radius ε ≥ 0 of the ball, in input units (required)
``attack-steps``    PGD steps per batch (default 10)
``attack-step-size``  PGD step; absent or < 0: 2.5·ε/steps (Madry's rule)
``attack-norm``     ``linf`` (default) or ``l2``
``attack-mix``      weight of the adversarial loss in [0, 1] (default 1)
``attack-random-start``  start PGD from a uniform point of the ball (default true)
==================  =========================================================

Adversarial examples are clipped to the task's input range (``task.data.input_range``);
the PGD random starts come from a private generator derived from
(run seed, round, "pgd", partition), separate from the batch generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from stamen.client.trainers import TrainJob, TrainSettings, register_trainer, run_local_steps, shuffled_epochs
from stamen.core import derive_seed
from stamen.schema import train as T
from stamen.tasks.attacks import NORMS, AttackConfig, adversarial_loss

#: message-config keys the adversarial trainer reads
ATTACK_KEYS = (T.ATTACK_EPS, T.ATTACK_STEPS, T.ATTACK_STEP_SIZE, T.ATTACK_NORM, T.ATTACK_MIX, T.ATTACK_RANDOM_START)


def _number(options: dict, key: str, default=None, *, integer: bool = False):
    if key not in options:
        if default is None:
            raise ValueError(f"the adversarial trainer needs the config entry {key!r} (set by the strategy)")
        return default
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config entry {key!r} must be a finite number, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"config entry {key!r} must be an integer, got {value!r}")
    return int(value) if integer else float(value)


def attack_from_options(options: dict) -> tuple[AttackConfig, float]:
    """The training attack and the adversarial-loss weight ``mix`` from a round's message config."""
    eps = _number(options, T.ATTACK_EPS)
    if eps < 0:
        raise ValueError(f"config entry 'attack-eps' must be >= 0, got {eps}")
    steps = _number(options, T.ATTACK_STEPS, 10, integer=True)
    if steps < 1:
        raise ValueError(f"config entry 'attack-steps' must be >= 1, got {steps}")
    step_size = _number(options, T.ATTACK_STEP_SIZE, -1.0)
    norm = options.get(T.ATTACK_NORM, "linf")
    if norm not in NORMS:
        raise ValueError(f"config entry 'attack-norm' must be one of {list(NORMS)}, got {norm!r}")
    mix = _number(options, T.ATTACK_MIX, 1.0)
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"config entry 'attack-mix' must be in [0, 1], got {mix}")
    random_start = options.get(T.ATTACK_RANDOM_START, True)
    if not isinstance(random_start, bool):
        raise ValueError(f"config entry 'attack-random-start' must be a bool, got {random_start!r}")
    attack = AttackConfig(kind="pgd", norm=norm, eps=eps, steps=steps,
                          step_size=None if step_size < 0 else step_size, random_start=random_start)
    return attack, mix


def input_clip(task) -> tuple[float, float]:
    lo, hi = task.data.input_range
    return float(lo), float(hi)


@register_trainer("adversarial")
def train_adversarial(model: nn.Module, X: np.ndarray, y: np.ndarray, s: TrainSettings,
                      generator: torch.Generator, job: TrainJob) -> tuple[float, int]:
    """Mini-batch adversarial training; returns (mean training objective, steps)."""
    attack, mix = attack_from_options(job.options)
    clip = input_clip(job.task)
    # a CPU generator: random starts are drawn on the CPU and moved, the same on any device
    pgd_gen = torch.Generator().manual_seed(derive_seed(job.seed, job.server_round, "pgd", job.partition_id))

    # the same loop and batches as train_sgd, so that ε = 0 gives the same floats
    return run_local_steps(model, X, y, s, shuffled_epochs(len(y), s, generator),
                           lambda m, xb, yb: adversarial_loss(m, xb, yb, attack, clip, mix=mix, generator=pgd_gen))
