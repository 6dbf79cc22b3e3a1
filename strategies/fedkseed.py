"""Strategy ``fedkseed``: zeroth-order local training along K seeded directions (the Ferret paper's baseline).

Qin, Chen, Yao, Wang, Ding, Deng, "Federated Full-Parameter Tuning of Billion-Sized Language
Models with Communication Cost under 18 Kilobytes" (ICML 2024).

**Client duty** (trainer ``fedkseed``, ``client/trainers_ferret.py``). ``local_steps`` times: pick
a pool index k uniformly, take the shared direction z_k (drawn from the k-th of the run's K pool
seeds — FedKSeed's K candidate seeds are fixed for the whole run, which is what bounds its
uplink to K scalars, so its pool is always per run, unlike ``ferret``'s per-round default —:
Ferret's basis over the whole model as one block, rescaled to unit-variance entries —
bounded near-uniform rather than Gaussian, E[z zᵀ] = I; always CPU fp32), evaluate the loss on
one mini-batch at w ± ε z_k (two forward passes, no backward) and step

    g = (f(w + ε z_k) − f(w − ε z_k)) / (2ε),    w ← w − lr · g · z_k.

The local update is then exactly Σ_k c_k v_k with c_k = −lr/√ρ · Σ_{steps on k} g (the
accumulated scalar per seed, in the basis v = √ρ z); the client sends the non-zero c_k as
one-block Ferret coefficients (encoder ``fedkseed``): (block, seed index, fp32 value) per
seed it used — at most min(K, local_steps) triples of 8 bytes, rather than K dense scalars.

**Server duty.** As ``ferret`` (this class derives from it): aggregate the scalars per seed,
weighted by examples, C = Σ_i (n_i/Σn) c_i, and step w ← w + η_s Σ_k C_k v_k — with
``server_lr`` η_s = 1 this is w − lr Σ_k (Σ_i p_i acc_i[k]) z_k, FedAvg of the clients'
zeroth-order models. ``downlink = "coefficients"`` sends clients the aggregated scalars of the
rounds they missed (Ferret's catch-up scheme, dense weights on first participation), ``"dense"``
the weights.

**Defaults, scaled to a CPU and a ~1 M-parameter model.** The paper uses K = 4096, ε = 5e-4,
200 steps with lr 3e-7 on billion-parameter LLMs. Each step here costs two forward passes and
one d-sized direction (~6 ms of CPU for 1.1 M parameters), so the defaults are K = 4096, ε = 5e-4,
``local_steps`` = 20 and ``lr`` = 1e-3 — on the pretrained stdlib GPT (1.1 M parameters; 20 steps,
batch 12, two clients) lr 1e-6 … 3e-4 barely moved the test loss, 1e-3 lowered it most reliably
(≈ −0.004 nat per client-round) and 3e-3 was erratic;
the server's reconstruction costs one direction per distinct seed used in the round
(≤ clients × steps), independent of K.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field

from stamen.config import ConfigError
from stamen.core import Layout
from stamen.schema import train as T
from stamen.sketching.ferret import FerretCodec, block_partition
from stamen.strategies.ferret import COEFFICIENTS, FerretMethod
from stamen.strategies.registry import Options, StrategySpec, register_strategy


class FedKSeedOptions(Options):
    K: int = Field(4096, ge=1, le=2**31 - 1, description="number of candidate seeds (directions) per run")
    local_steps: int = Field(20, ge=1, description="zeroth-order steps per client and round")
    eps: float = Field(5e-4, gt=0.0, description="perturbation scale ε of the two-point estimate")
    lr: float = Field(1e-3, gt=0.0, description="client learning rate of the zeroth-order steps")
    server_lr: float = Field(1.0, gt=0.0, description="η_s in w ← w + η_s·Σ_k C_k v_k")
    downlink: Literal["coefficients", "dense"] = "coefficients"


class FedKSeedMethod(FerretMethod):
    """FedKSeed on Ferret's machinery: see the module docstring."""

    capabilities = replace(COEFFICIENTS, trainer="fedkseed")
    wire_codec = "fedkseed"

    def build_codec(self, layout: Layout) -> FerretCodec:
        options = self.layout_codec_options(layout)
        if len(block_partition(layout, options["block_ratio"])) != 1:
            raise ConfigError("strategy 'fedkseed' needs the model as one block, but its parameter layout does not "
                              "pack into one (more than half of its tensors are empty)")
        return FerretCodec(**options)

    @property
    def codec_options(self) -> dict[str, Any]:  # type: ignore[override]
        return self.layout_codec_options(self.run.layout)

    def layout_codec_options(self, layout: Layout) -> dict[str, Any]:
        # one block over the whole model: the block limit ratio × median(numel) must reach d
        return {"K": self.options.K, "value_dtype": "fp32", "block_ratio": float(max(layout.d, 1)), "clip": None,
                "pool_scope": "run"}

    def instructions(self, server_round, arrays) -> dict[str, Any]:
        o = self.options
        out = {T.CODEC_OPTIONS: json.dumps(self.layout_codec_options(self.run.layout), sort_keys=True),
               T.TRAINER: "fedkseed", T.ZO_STEPS: int(o.local_steps), T.ZO_EPS: float(o.eps), T.ZO_LR: float(o.lr)}
        if self.downlink.enabled:
            out[T.FERRET_SERVER_LR] = float(o.server_lr)
        return out

    def summary_metrics(self) -> dict[str, Any]:
        o = self.options
        return {"fedkseed": {"K": o.K, "local_steps": o.local_steps, "eps": o.eps, "lr": o.lr,
                             "downlink": o.downlink, "parameters": self.run.layout.d}}


def build_fedkseed(options: FedKSeedOptions, cfg) -> FedKSeedMethod:
    return FedKSeedMethod(options)


register_strategy(StrategySpec(
    "fedkseed", build_fedkseed, FedKSeedOptions,
    "FedKSeed (Qin et al. 2024): zeroth-order local steps along K seeded directions; clients send one scalar per "
    "seed used, the server aggregates scalars per seed", FedKSeedMethod.capabilities))
