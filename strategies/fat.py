"""Strategy ``fat``: federated adversarial training (Li, Song, Yang, "Federated Adversarial Learning:
A Framework with Convergence Analysis", ICML 2023).

Server duty: FedAvg's example-weighted mean m of the client models, applied with a global
learning rate η_g::

    w ← w + η_g · (m − w)          (η_g = 1: FedAvg)

and, with every train message, the attack the clients must train against.

Client duty (trainer ``adversarial``, ``client/trainers_adversarial.py``): at every local step,
make PGD examples for the batch with the current local model inside the ε-ball (``attack-norm``,
``attack-eps``, ``attack-steps`` steps of ``attack-step-size`` from a random start, clipped to
the task's input range), then take an optimizer step on
``(1 − attack-mix)·CE(clean) + attack-mix·CE(adversarial)``.

With ε = 0 the clients train exactly as ``sgd`` and, with η_g = 1, the strategy is FedAvg
(tested bit for bit). Robust evaluation is on by default for this strategy
(:attr:`FatStrategy.robust_eval_default`, see ``server/evaluation.py``): the global model is
attacked with PGD-20 at the training ε/norm (the task's default threat model when ε = 0).

Defaults: ``strategy.eps`` / ``strategy.norm`` unset take the task's threat model
(``stamen.server.evaluation.DEFAULT_THREATS``: digits ℓ∞ 0.2, MNIST ℓ∞ 0.3, CIFAR-10 ℓ∞ 8/255,
FedProx synthetic ℓ∞ 0.3, …); PGD-10 with step 2.5·ε/10 in training (Madry used 40 steps on
MNIST; 10 keeps CPU studies affordable). The resolved attack goes into summary.json.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from stamen.core import Capabilities
from stamen.schema import train as T
from stamen.server.evaluation import DEFAULT_THREATS, default_threat_model
from stamen.strategies.method import FLOWER_NO_SAMPLING, UpdateMethod
from stamen.strategies.registry import Options, StrategySpec, register_strategy


class FatOptions(Options):
    eps: float | None = Field(None, ge=0.0, description="attack radius ε in input units; unset: the task's default "
                              "threat model (digits ℓ∞ 0.2, MNIST ℓ∞ 0.3, CIFAR-10 ℓ∞ 8/255, synthetic ℓ∞ 0.3)")
    norm: Literal["linf", "l2"] | None = Field(None, description="ball of the attack: linf or l2; "
                                               "unset: the task's default")
    steps: int = Field(10, ge=1, description="PGD steps per local batch (the inner maximization)")
    step_size: float | None = Field(None, ge=0.0, description="PGD step length; unset: 2.5·ε/steps (Madry's rule)")
    random_start: bool = Field(True, description="start PGD from a uniform point of the ε-ball")
    mix: float = Field(1.0, ge=0.0, le=1.0,
                       description="weight of the adversarial loss: (1−mix)·CE(clean) + mix·CE(adv)")
    server_lr: float = Field(1.0, gt=0.0,
                             description="global learning rate η_g: w ← w + η_g·(mean − w); 1 is FedAvg")


CAPABILITIES = Capabilities(aggregation="update", trainer="adversarial")


class FatMethod(UpdateMethod):
    """FedAvg with a global learning rate, whose clients train adversarially (PGD)."""

    capabilities = CAPABILITIES
    robust_eval_default = True  # server/evaluation.py turns robust evaluation on when eval.robust is unset

    def __init__(self, *, eps: float, norm: str, steps: int, step_size: float | None, random_start: bool,
                 mix: float, server_lr: float, default_threat: dict[str, Any], codec: str, codec_options: dict):
        super().__init__(FedAvg(**FLOWER_NO_SAMPLING), codec=codec, codec_options=codec_options)
        self.eps, self.norm, self.steps, self.step_size = float(eps), norm, int(steps), step_size
        self.random_start, self.mix, self.server_lr = bool(random_start), float(mix), float(server_lr)
        self.default_threat = dict(default_threat)

    # -- what the clients are told ------------------------------------------------------
    @property
    def resolved_step_size(self) -> float:
        return float(self.step_size) if self.step_size is not None else 2.5 * self.eps / self.steps

    def instructions(self, server_round, arrays) -> dict[str, Any]:
        return {**super().instructions(server_round, arrays), T.TRAINER: "adversarial", T.ATTACK_EPS: self.eps,
                T.ATTACK_STEPS: self.steps, T.ATTACK_STEP_SIZE: self.resolved_step_size, T.ATTACK_NORM: self.norm,
                T.ATTACK_MIX: self.mix, T.ATTACK_RANDOM_START: self.random_start}

    def describe_training_attack(self) -> dict[str, Any]:
        return {"kind": "pgd", "norm": self.norm, "eps": self.eps, "steps": self.steps,
                "step_size": self.resolved_step_size, "random_start": self.random_start, "mix": self.mix,
                "server_lr": self.server_lr}

    def threat_model(self) -> dict[str, Any]:
        """What the robust evaluation attacks with: the training ball, or the task's default when ε = 0."""
        return {"norm": self.norm, "eps": self.eps} if self.eps > 0 else dict(self.default_threat)

    # -- the server step ------------------------------------------------------------------
    def step(self, server_round, global_arrays, aggregate, total_weight):
        mean = super().step(server_round, global_arrays, aggregate, total_weight)
        if mean is None or self.server_lr == 1.0:
            return mean
        eta = np.float32(self.server_lr)
        return {k: (global_arrays[k].astype(np.float32)
                    + eta * (mean[k].astype(np.float32) - global_arrays[k].astype(np.float32))).astype(np.float32)
                for k in mean}


def build_fat(options: FatOptions, cfg) -> FatMethod:
    input_range = None
    if cfg.task.dataset not in DEFAULT_THREATS:  # only then is the data needed (for its input range)
        from stamen.tasks.task import load_task

        input_range = load_task(cfg.task, cfg.federation.clients, cfg.run.seed).data.input_range
    threat = default_threat_model(cfg.task.dataset, input_range)
    eps = options.eps if options.eps is not None else threat["eps"]
    norm = options.norm or threat["norm"]
    return FatMethod(eps=eps, norm=norm, steps=options.steps, step_size=options.step_size,
                     random_start=options.random_start, mix=options.mix, server_lr=options.server_lr,
                     default_threat=threat, codec=cfg.compression.codec, codec_options=cfg.compression.options())


register_strategy(StrategySpec(
    "fat", build_fat, FatOptions,
    "Federated adversarial training (Li et al. 2023): clients train on PGD examples, FedAvg with global lr η_g; "
    "robust evaluation on by default", CAPABILITIES))
