"""Models behind a registry: multinomial logistic regression, MLP, small CNN.

Each factory takes the task's input shape, class count and the task config (for
``task.hidden``) and returns a fresh ``nn.Module`` mapping a batch of inputs to logits.
Initial weights come from a private generator (see :func:`build_model`), never the
global RNG, so every party builds the same initial model from the run seed.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


class LogisticRegression(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 0):
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3×3 conv layers (32, 64 channels) with 2×2 max-pooling, then a hidden layer."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"model 'cnn' needs image inputs (channels, height, width), got shape {input_shape}")
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _gpt(input_shape: tuple[int, ...], num_classes: int, hidden: int) -> nn.Module:
    """The byte-level GPT of tasks/lm.py, logits shaped (batch, vocab, positions); see ``lm.build_gpt``."""
    from stamen.tasks.lm import build_gpt

    return build_gpt(input_shape, num_classes, hidden)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn": SmallCNN,
    "gpt": _gpt,
}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``task.model = name`` build ``factory(input_shape, num_classes, hidden)`` (a plugin's model;
    plugin modules are listed under the ``stamen.tasks`` entry points, stamen/plugins.py)."""
    MODELS[name] = factory


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, hidden: int, seed: int) -> nn.Module:
    """A model with deterministic initial weights drawn from a private generator."""
    if name not in MODELS:
        from stamen.plugins import load_plugins

        load_plugins("stamen.tasks")
    if name not in MODELS:
        raise ValueError(f"unknown task.model {name!r}; choose one of {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):  # the constructors' default init draws from the global RNG
        model = MODELS[name](tuple(input_shape), num_classes, hidden)
    if hasattr(model, "initialize"):  # models that set their own initial weights (gpt: pretrained or GPT-2 init)
        model.initialize(seed)
        return model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                # PyTorch's default init (Kaiming-uniform weights, fan-in bias), from our generator
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                module.weight.uniform_(-bound, bound, generator=g)
                module.bias.uniform_(-bound, bound, generator=g)
    return model
