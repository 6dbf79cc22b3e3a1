"""The workload of ``sim_throughput``, shared by the workers of every system.

Only numpy, torch and the standard library: pfl's worker imports this file from its own
virtualenv, where Stamen is not installed. The rules below are Stamen's (so that the bare
loop, pfl and Stamen train the same clients on the same batches and their accuracies agree);
``tests/test_sim_throughput.py`` checks each one against Stamen's own function:

- :func:`derive_seed` = ``stamen.sketching.codec.derive_seed``;
- :func:`cohort` = ``stamen.strategies.sampling.seeded_sample`` (which partitions train in a round);
- :func:`batch_order` = the permutation of ``stamen.client.trainers.epoch_batches`` for one epoch;
- :class:`MLP` has the parameter names of ``stamen.tasks.models.MLP`` (the initial weights
  are Stamen's, stored in the workload file), :func:`local_train` is the loop of
  ``run_local_steps`` (plain SGD, mean cross-entropy per batch), :func:`evaluate` that of
  ``stamen.tasks.task.evaluate``.

A workload file (``.npz``) holds every client's samples back to back (``X``, ``y``, with
``offsets``), the pooled test set, the initial weights (``init/<name>``) and the settings
(``meta``, JSON). A worker appends one JSON line per event to its report file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of printable parts (Stamen's rule)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cohort_size(fraction: float, population: int) -> int:
    return max(1, min(population, int(math.floor(fraction * population + 1e-9))))


def cohort(seed: int, server_round: int, num_clients: int, fraction: float) -> list[int]:
    """The partition ids that train in ``server_round``, sorted (Stamen's seeded sampling)."""
    rng = np.random.default_rng(derive_seed(seed, server_round, "sample", "train"))
    chosen = rng.choice(num_clients, size=cohort_size(fraction, num_clients), replace=False)
    return sorted(int(i) for i in chosen)


def batch_order(seed: int, server_round: int, partition_id: int, n: int) -> torch.Tensor:
    """One epoch's shuffled order of a client's ``n`` samples in ``server_round``."""
    gen = torch.Generator().manual_seed(derive_seed(seed, server_round, "batches", partition_id))
    return torch.randperm(n, generator=gen)


class MLP(nn.Module):
    """60-hidden-10 with ReLU; parameter names as Stamen's MLP (``net.1.*``, ``net.3.*``)."""

    def __init__(self, inputs: int, hidden: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def local_train(model: nn.Module, X: np.ndarray, y: np.ndarray, order: torch.Tensor, batch_size: int,
                lr: float) -> float:
    """One epoch of plain SGD over ``order`` in batches; returns the mean training loss."""
    model.train()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    total, count = 0.0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        loss = nn.functional.cross_entropy(model(Xt[idx]), yt[idx])
        total += float(loss.detach()) * len(idx)
        count += len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return total / max(1, count)


@torch.no_grad()
def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray, batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``(X, y)``."""
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = torch.as_tensor(X[i:i + batch_size]), torch.as_tensor(y[i:i + batch_size])
        logits = model(xb)
        total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = max(1, len(y))
    return total_loss / n, correct / n


# ------------------------------------------------------------------ the workload file ----
@dataclass
class Workload:
    X: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    test_X: np.ndarray
    test_y: np.ndarray
    init: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def client(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[partition_id]), int(self.offsets[partition_id + 1])
        return self.X[a:b], self.y[a:b]

    def size(self, partition_id: int) -> int:
        return int(self.offsets[partition_id + 1] - self.offsets[partition_id])

    def new_model(self) -> MLP:
        m = self.meta
        model = MLP(m["inputs"], m["hidden"], m["classes"])
        model.load_state_dict({k: torch.as_tensor(v) for k, v in self.init.items()})
        return model


def save_workload(path: str, clients: list[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray],
                  init: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    offsets = np.zeros(len(clients) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(y) for _, y in clients])
    arrays = {"X": np.concatenate([x for x, _ in clients]).astype(np.float32),
              "y": np.concatenate([y for _, y in clients]).astype(np.int64),
              "offsets": offsets, "test_X": test[0].astype(np.float32), "test_y": test[1].astype(np.int64),
              "meta": np.array(json.dumps(meta))}
    arrays.update({f"init/{k}": np.asarray(v, dtype=np.float32) for k, v in init.items()})
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_workload(path: str) -> Workload:
    with np.load(path) as f:
        init = {k[len("init/"):]: f[k] for k in f.files if k.startswith("init/")}
        return Workload(f["X"], f["y"], f["offsets"], f["test_X"], f["test_y"], init, json.loads(str(f["meta"])))


def load_meta(path: str) -> tuple[dict[str, Any], np.ndarray]:
    """Only the settings and the offsets (cheap: the npz members are read lazily)."""
    with np.load(path) as f:
        return json.loads(str(f["meta"])), f["offsets"]


def fedavg_accumulate(total: dict[str, np.ndarray] | None, weights: dict[str, np.ndarray],
                      factor: float) -> dict[str, np.ndarray]:
    """``total + factor · weights`` in fp32, in place (Flower's FedAvg order: one client at a time)."""
    if total is None:
        return {k: np.asarray(v, dtype=np.float32) * factor for k, v in weights.items()}
    for k, v in weights.items():
        total[k] += np.asarray(v, dtype=np.float32) * factor
    return total


# ----------------------------------------------------------------------- the report ----
class Report:
    """Appends JSON lines to the worker's report file (flushed at once: a killed run keeps its rounds)."""

    def __init__(self, path: str):
        self._f = open(path, "a", buffering=1)

    def event(self, kind: str, **fields: Any) -> None:
        self._f.write(json.dumps({"event": kind, "t": time.time(), **fields}) + "\n")
        self._f.flush()

    def round_end(self, server_round: int, *, clients: int, samples: int, test_accuracy: float | None,
                  test_loss: float | None) -> None:
        self.event("round", round=server_round, clients=clients, samples=samples, test_accuracy=test_accuracy,
                   test_loss=test_loss)

    def close(self) -> None:
        self._f.close()
