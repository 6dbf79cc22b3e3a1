"""Client-side fault injection for simulations: failures, stragglers, Byzantine clients.

Every draw comes from a private generator derived from (run seed, round, partition), so the
same config gives the same faults on every rerun, in any engine. See ``FaultsSection`` in
``stamen/config.py`` for the settings.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from stamen.core import derive_seed


class InjectedFailure(RuntimeError):
    """A client failure injected by ``faults.client_failure`` (the reply carries this error)."""


@dataclass(frozen=True)
class ClientFault:
    fail: bool
    delay_s: float


def draw_client_fault(faults, seed: int, server_round: int, partition_id: int) -> ClientFault:
    rng = np.random.default_rng(derive_seed(seed, server_round, "client-fault", partition_id))
    fail, slow, u = rng.random(3)
    delay = 0.0
    if slow < faults.straggler_fraction and faults.straggler_delay_s > 0:
        delay = float(-faults.straggler_delay_s * math.log1p(-u))  # exponential with the given mean
    return ClientFault(fail=bool(fail < faults.client_failure), delay_s=delay)


def byzantine_partitions(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """The fixed set of Byzantine clients: round(fraction·N) of a seeded permutation."""
    count = int(round(fraction * num_clients))
    perm = np.random.default_rng(derive_seed(seed, "byzantine")).permutation(num_clients)
    return frozenset(int(p) for p in perm[:count])


def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    return (num_classes - 1 - y).astype(y.dtype)


def corrupt_update(delta: torch.Tensor, attack: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    """What a Byzantine client sends instead of its honest update Δ."""
    if attack == "sign_flip":
        return -scale * delta
    if attack == "scale":
        return scale * delta
    if attack == "noise":
        std = scale * float(delta.norm()) / math.sqrt(max(1, delta.numel()))
        return torch.randn(delta.shape, generator=generator, dtype=torch.float32) * std
    if attack == "label_flip":
        return delta  # the corruption happened in training (flipped labels)
    raise ValueError(f"unknown faults.byzantine_attack {attack!r}")


def before_training(faults, seed: int, server_round: int, partition_id: int) -> None:
    """Fail or stall this client as the fault settings say (called before local training)."""
    fault = draw_client_fault(faults, seed, server_round, partition_id)
    if fault.fail:
        raise InjectedFailure(f"injected failure of partition {partition_id} in round {server_round}")
    if fault.delay_s > 0:
        time.sleep(fault.delay_s)
