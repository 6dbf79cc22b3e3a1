"""A task = a federated dataset + a model family, built from the run config.

Both apps build the same :class:`Task` from the same config and seed: the server uses
the test set and the initial weights, each client its own partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from stamen.core import Layout, derive_seed
from stamen.tasks.data import FederatedData, load_federated_data
from stamen.tasks.models import build_model


@dataclass
class Task:
    data: FederatedData
    model_name: str
    hidden: int
    seed: int

    def new_model(self) -> nn.Module:
        """A model with the run's initial weights (identical on every party)."""
        return build_model(self.model_name, self.data.input_shape, self.data.num_classes, self.hidden,
                           derive_seed(self.seed, "model-init") % (2**63))

    @cached_property
    def layout(self) -> Layout:
        return Layout.from_arrays(get_weights(self.new_model()))

    def initial_weights(self) -> dict[str, np.ndarray]:
        return get_weights(self.new_model())


def load_task(task_cfg, num_clients: int, seed: int) -> Task:
    data = load_federated_data(task_cfg, num_clients, seed)
    return Task(data, task_cfg.model, task_cfg.hidden, seed)


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    state = model.state_dict()
    if set(weights) != set(state):
        missing, extra = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
        raise ValueError(f"weights do not match the model: missing {missing}, unexpected {extra}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(weights[k])).reshape(state[k].shape) for k in state})


@torch.no_grad()
def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray, batch_size: int = 512,
             device: str = "cpu") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(X, y)``.

    Targets may carry extra dimensions (a sequence model returns logits shaped
    ``(batch, classes, positions)`` for targets ``(batch, positions)``): loss and accuracy
    are then per target element, e.g. per token for a language model.
    """
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for i in range(0, len(y), batch_size):
        xb = torch.as_tensor(X[i:i + batch_size], device=device)
        yb = torch.as_tensor(y[i:i + batch_size], device=device)
        logits = model(xb)
        total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
        n += yb.numel()
    n = max(1, n)
    return total_loss / n, correct / n
