"""Local trainers: how a client learns in one round.

A trainer is ``trainer(model, X, y, settings, generator, job) -> (mean train loss, steps)``:
it trains ``model`` (holding the global weights) in place on the client's data. ``job``
carries what some trainers need beyond the data: the round's message config (the
strategy's instructions, e.g. ``proximal-mu`` or attack settings), the node's persistent
state (a Flower ``RecordDict``), the task, the partition id and the round, and a
``metrics`` dict the trainer may fill (sent back with the reply). The strategy picks the
trainer with the config entry ``trainer`` (default ``sgd``); plugins register theirs in
:data:`TRAINERS`. Batches come from a private generator derived from
(run seed, round, partition), so a run is reproducible whatever the scheduling.

Many clients of one process train as one vectorised computation where their trainer has a
vectorised form (client/cohort.py: ``sgd`` and ``adversarial``; a plugin trainer may carry its own
as ``fn.stacked_loss``, a :class:`~stamen.client.cohort.StackedLoss` whose ``batches`` are this
loop's); every other trainer runs this loop, one client at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: adds μ/2·‖w − w_global‖² to the local objective
    device: str = "cpu"

    @classmethod
    def from_task(cls, task_cfg, device: str, **overrides) -> "TrainSettings":
        base = dict(epochs=task_cfg.local_epochs, batch_size=task_cfg.batch_size, lr=task_cfg.lr,
                    optimizer=task_cfg.optimizer, momentum=task_cfg.momentum,
                    weight_decay=task_cfg.weight_decay, device=device)
        base.update(overrides)
        return cls(**base)


@dataclass
class TrainJob:
    """Everything about one local training job besides model, data and settings."""

    options: dict[str, Any]  # the round's message config from the strategy
    state: Any  # the node's persistent flwr RecordDict (context.state)
    task: Any  # stamen.tasks.Task
    partition_id: int
    server_round: int
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)  # extra reply metrics


def make_optimizer(params, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown task.optimizer {s.optimizer!r}; choose 'sgd' or 'adam'")


def epoch_batches(n: int, batch_size: int, generator: torch.Generator):
    """Index batches of one shuffled pass over ``n`` examples."""
    perm = torch.randperm(n, generator=generator)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def run_local_steps(model: nn.Module, X: np.ndarray, y: np.ndarray, s: TrainSettings, batches: Iterable[torch.Tensor],
                    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                    ) -> tuple[float, int]:
    """The optimizer loop every trainer shares: one step per index batch, FedProx's proximal
    term when ``s.proximal_mu > 0``. ``loss_fn(model, x, y)`` defaults to cross-entropy;
    trainers differ only in their batches (order, pacing) and their loss (e.g. adversarial)."""
    model.train()
    model.to(s.device)
    Xt, yt = torch.as_tensor(X, device=s.device), torch.as_tensor(y, device=s.device)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if s.proximal_mu > 0 else None
    opt = make_optimizer(params, s)
    total, count, steps = 0.0, 0, 0
    for idx in batches:
        idx = idx.to(s.device)
        if loss_fn is None:
            loss = nn.functional.cross_entropy(model(Xt[idx]), yt[idx])
        else:
            loss = loss_fn(model, Xt[idx], yt[idx])
        total += float(loss.detach()) * len(idx)
        count += len(idx)
        if anchor is not None:
            loss = loss + 0.5 * s.proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return total / max(1, count), steps


def shuffled_epochs(n: int, s: TrainSettings, generator: torch.Generator) -> Iterable[torch.Tensor]:
    """``s.epochs`` shuffled passes, each drawn when the previous one is done."""
    return (idx for _ in range(s.epochs) for idx in epoch_batches(n, s.batch_size, generator))


def train_sgd(model: nn.Module, X: np.ndarray, y: np.ndarray, s: TrainSettings,
              generator: torch.Generator, job: TrainJob | None = None) -> tuple[float, int]:
    """Mini-batch first-order training (SGD or Adam), optionally with FedProx's proximal term."""
    return run_local_steps(model, X, y, s, shuffled_epochs(len(y), s, generator))


Trainer = Callable[[nn.Module, np.ndarray, np.ndarray, TrainSettings, torch.Generator, TrainJob], tuple[float, int]]

TRAINERS: dict[str, Trainer] = {"sgd": train_sgd}


def register_trainer(name: str):
    """Decorator: make a trainer selectable by a strategy's ``trainer`` config entry."""

    def deco(fn: Trainer) -> Trainer:
        TRAINERS[name] = fn
        return fn

    return deco


def get_trainer(name: str) -> Trainer:
    load_client_plugins()
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r} requested by the strategy; known: {sorted(TRAINERS)}")
    return TRAINERS[name]


def load_client_plugins() -> None:
    """Import the trainer plugins (``stamen.trainers`` entry points, :mod:`stamen.plugins`); they
    register trainers, downlinks and queries. Once per process."""
    from stamen.plugins import load_plugins

    load_plugins("stamen.trainers")
