"""Strategy ``ferret``: first-order local training, shared-randomness projection both ways.

Shu, Li, Wang, Zhou, Liu, Low, Zhang, "Ferret: Federated Full-Parameter Tuning at Scale for
Large Language Models" (ICML 2025, arXiv 2409.06277). The math is the codec
``stamen.sketching.ferret.FerretCodec``; this module is the round protocol around it.

**Client duty** (the paper's Algorithm 1, client side). Train from the global weights w
(``task.optimizer``, ``task.lr``; ``local_steps = T`` exactly T optimizer steps — trainer
``steps``; T = 0: ``task.local_epochs`` epochs instead), then encode its update
Δ = w_local − w with codec ``ferret`` (options in the message's ``codec-options``): the round's
seed pool (``pool_scope = "round"``: fresh seeds and bases every round, Alg. 1 line 10), per
block l a budget K_l ∝ ‖Δ_l‖ and γ_k = ⟨Δ_l, v_k⟩ / (ρ_l K_l) for K_l seeds of the pool
(``sketching/ferret.py``: ``budgets``, ``project``). The reply carries only the non-zero
(block, seed, γ) triples.

**Server duty.** Aggregate in coefficient space, weighted by examples:
Γ = Σ_i (n_i / Σ n) γ_i per (block, seed) (``codec.aggregate``; Γ is rounded to the wire value
dtype, since it is also what travels down), reconstruct once, Δ̂ = Σ Γ v (with the optional
per-coefficient ``clip``), and step w ← w + η_s · Δ̂ (``server_lr`` = η_s; Stamen's Δ points from
the global to the local model, so the sign is +). Reconstruction costs O(Σ_l K_l d_l) whatever
the number of clients.

**Downlink** (``downlink``):

- ``"dense"``: every sampled client gets the global weights (d fp32 numbers);
- ``"coefficients"`` (default): clients rebuild the global model themselves, with the catch-up
  downlink that ``sketched_fedavg`` and ``fetchsgd`` share (``strategies/catchup.py``,
  ``client/catchup.py``; here the per-round update is Γ_r). The server keeps
  the history of aggregated payloads Γ_r (a few KB per round) and, per node, the round whose
  global weights the node holds (``synced``: set when the node's reply is accepted — it trained
  from those weights; dropped when its reply is lost or rejected). A node sampled in round t
  that holds round s < t − 1 gets Γ_{s+1}, …, Γ_{t−1} (``ferret-sync = "catch-up"``); a node with
  no copy — first participation, after a lost reply, after a resume (nodes restart with empty
  state) — or whose catch-up would be larger than the dense weights gets the dense weights
  (``ferret-sync = "dense"``). The client (``DOWNLINKS["ferret"]`` in
  ``client/trainers_ferret.py``) keeps its copy and the round it belongs to in its node state,
  applies the rounds it lacks in order with the same code as the server
  (w ← w + η_s·reconstruct(Γ_r)), so its copy equals the server's bit for bit, and checks it
  against the sum and norm of the server's weights the message carries before training.
  History older than every synced node's round, or beyond the dense size, is dropped.

**Defaults and the paper** (Shu et al. 2025, Alg. 1 and its experimental setup; reference code allen4747/Ferret,
``scripts/ferret.sh``). Measured against these in RESULTS.md, "Method fidelity":

- ``pool_scope = "round"``: the paper draws seeds and bases anew each round (Alg. 1 line 10).
  ``"run"`` is the reference code's single pool (``candidate_seeds`` drawn once in ``main.py``);
  it costs the same bytes but confines the run to K directions per block (digits MLP, 20 rounds,
  3 seeds: 0.834 against 0.918 with the per-round pool; FedAvg 0.916);
- ``local_steps = 10``: the paper's T = 10 local iterations (the script: 40 mini-batches with
  4-step gradient accumulation, i.e. 10 optimizer steps);
- ``server_lr = 1``: the reference code's server lr (``--slr_max`` 10, 3 or 5) multiplies
  coefficients ⟨Δ, v⟩·d_l/K_l that reconstruct about ρ_l d_l ≈ 1/3 of Δ, so it is ≈ 3.3 / 1 / 1.7 in
  Stamen's unbiased units; 1 is the middle of that range and the unbiased FedAvg step. Models
  with big blocks need much less (below: on the 1.1 M-parameter stdlib GPT with K = 64, η_s = 1
  ends at test loss 6.16 where FedAvg reaches 2.96);
- ``clip = none``: the reference code bounds the norm of every term γ·v by 10 when applying it;
  that guard is ``clip ≈ 17`` here (|γ| ≤ 10·√3, see ``clip_coefficients``), off by default
  because it biases the estimate;
- ``K = 64`` (the reference script uses 200, ``main.py`` 4096): reconstruction costs
  O(Σ_l K_l d_l) of CPU per round, and the usable ``server_lr`` grows with K (below);
- the local optimizer is the run's ``task.optimizer`` / ``task.lr`` (the paper: plain SGD,
  lr 1e-4 for billion-parameter LLMs).

**Choosing ``server_lr``.** Δ̂ is unbiased but noisy: ‖Δ̂_l − Δ_l‖ ≈ √(d_l/K_l)·‖Δ_l‖, so with
blocks of d_l ~ 10⁵ (a 1 M-parameter GPT) a full step (η_s = 1) adds noise tens of times larger
than the update itself. Measured on the pretrained stdlib GPT (one round of 4 clients × 11 Adam
steps, lr 1e-3): the best η_s was ≈ 0.03–0.05 with K = 64 and ≈ 0.1 with K = 256, both losing
the test loss at η_s = 0.3–1; on small models (d_l ~ 10³, e.g. the digits MLP) η_s = 1 works.
The usable η_s grows about linearly with K (and so does the compute, O(Σ K_l d_l)).

Bytes are the real serialized messages (the loop counts them); each round's metrics line also has
the per-client uplink bytes and coefficient counts (``ferret_uplink_bytes``, ``ferret_nnz``) and
the downlink mix (``ferret_dense_nodes``, ``ferret_catchup_nodes``, ``ferret_catchup_rounds``).
Checkpoints keep the history and the sync table; on resume the table is cleared (the nodes of a
resumed run start with empty state, so they first get dense weights) and the history is kept.
Evaluation messages (``federation.fraction_evaluate``) carry the dense weights.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord
from pydantic import Field

from stamen import schema as S
from stamen.core import Capabilities
from stamen.schema import train as T
from stamen.sketching.codec import CodecContext
from stamen.sketching.ferret import FerretCodec
from stamen.strategies.catchup import CatchUpDownlink
from stamen.strategies.method import Method, WeightedMean
from stamen.strategies.registry import Options, StrategySpec, register_strategy
from stamen.strategies.sketched import arrays_to_numpy

log = logging.getLogger("stamen.strategy.ferret")

KEYS = T.CatchUpKeys("ferret")  # the catch-up downlink's entries (strategies/catchup.py)


def apply_update(flat: torch.Tensor, codec: FerretCodec, payload: dict[str, np.ndarray], ctx: CodecContext,
                 server_lr: float) -> torch.Tensor:
    """w + η_s · reconstruct(Γ): the server step (the client's downlink repeats exactly this)."""
    return flat.add(codec.decode(payload, ctx), alpha=float(server_lr))


class FerretOptions(Options):
    K: int = Field(64, ge=1, le=2**31 - 1, description="seed pool size: at most K directions per block")
    block_ratio: float = Field(0.9, gt=0.0, description="blocks pack tensors up to block_ratio × median numel")
    local_steps: int = Field(10, ge=0, description="optimizer steps per client and round (the paper's T = 10); "
                                                 "0: task.local_epochs epochs")
    server_lr: float = Field(1.0, gt=0.0, description="η_s in w ← w + η_s·Δ̂")
    value_dtype: Literal["fp32", "fp16"] = "fp32"
    clip: Annotated[float, Field(gt=0.0)] | Literal["none"] | None = Field(
        None, description="bound on every aggregated |γ| when reconstructing (none: no bound)")
    downlink: Literal["coefficients", "dense"] = "coefficients"
    pool_scope: Literal["run", "round"] = Field(
        "round", description="round: fresh seeds and bases every round (the paper, Alg. 1 line 10); run: one seed "
                             "pool for the whole run (the authors' reference code)")


COEFFICIENTS = Capabilities(
    aggregation="own", codecs=(), privacy_sites=frozenset(), robust=False, linear=True,
    notes={"robust": "the server averages per-seed scalar coefficients and clients rebuild the model from that mean; "
                     "a median or Krum of coefficients is a different rule, not a robust aggregate of models",
           "privacy": "its per-seed coefficients have no clipping or noise mechanism (use fedavg or sketched_dp for "
                      "private runs)"})


class FerretMethod(Method):
    """Ferret's round protocol: see the module docstring. The catch-up downlink's ``history``
    holds the aggregated payloads Γ_r (wire dtypes)."""

    capabilities = COEFFICIENTS
    codec_name = FerretCodec.name

    def __init__(self, options: FerretOptions):
        self.options = options
        self.downlink = CatchUpDownlink(KEYS, enabled=options.downlink == "coefficients")
        self._round: dict[str, Any] = {}
        self._update: dict[str, np.ndarray] | None = None

    @property
    def codec_options(self) -> dict[str, Any]:  # type: ignore[override]
        o = self.options
        return {"K": o.K, "value_dtype": o.value_dtype, "block_ratio": o.block_ratio,
                "clip": None if o.clip in (None, "none") else float(o.clip), "pool_scope": o.pool_scope}

    def bind(self, run) -> None:
        super().bind(run)
        self.downlink.bind(run.layout)

    # -- what the clients are told ----------------------------------------------------------
    def instructions(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        out: dict[str, Any] = {T.CODEC_OPTIONS: json.dumps(self.codec_options, sort_keys=True)}
        if self.options.local_steps > 0:
            out.update({T.TRAINER: "steps", T.LOCAL_STEPS: int(self.options.local_steps)})
        if self.downlink.enabled:
            out[T.FERRET_SERVER_LR] = float(self.options.server_lr)
        return out

    def messages(self, server_round, arrays, config, targets, identity):
        flat = self.run.layout.flatten(arrays_to_numpy(arrays))
        return self.downlink.messages(server_round, arrays, flat, config, targets, identity)

    # -- replies: aggregated in coefficient space ---------------------------------------------
    def contribution(self, payload, ctx):
        self.run.codec.unpack(payload, ctx)  # dtypes, index ranges, finiteness, no repeated pair
        return payload

    def aggregate(self, server_round, contributions, weights, combiner):
        if not isinstance(combiner, WeightedMean):
            raise TypeError(f"{type(self).__name__} aggregates coefficients by their weighted mean only")
        self._round = {"nnz": [int(len(p["value"])) for p in contributions], "aggregated_nnz": 0}
        if not contributions:
            return None
        total = sum(weights)
        return self.run.codec.aggregate(contributions, [w / total for w in weights], self.run.ctx(server_round))

    def step(self, server_round, global_arrays, aggregate, total_weight):
        """Γ applied once: w + η_s·reconstruct(Γ) (Γ is rounded to the wire dtype, as it travels down)."""
        layout = self.run.layout
        flat = apply_update(layout.flatten(global_arrays), self.run.codec, aggregate, self.run.ctx(server_round),
                            self.options.server_lr)
        self._update = aggregate
        self._round["aggregated_nnz"] = int(len(aggregate["value"]))
        return layout.unflatten(flat)

    def after_round(self, server_round, accepted, stepped) -> None:
        self._round["uplink"] = [S.message_bytes(r.message) for r in accepted]
        self.downlink.end_round(server_round, self._update if stepped is not None else None,
                                {r.node for r in accepted})
        self._update = None

    # -- what is recorded ---------------------------------------------------------------------
    def round_metrics(self, server_round: int) -> dict[str, Any]:
        r = self._round
        uplink = r.get("uplink", [])
        return {"ferret_uplink_bytes": list(uplink),  # per accepted client, in partition order
                "ferret_nnz": list(r.get("nnz", [])),
                "uplink_bytes_per_client": float(np.mean(uplink)) if uplink else None,
                "ferret_aggregated_nnz": r.get("aggregated_nnz", 0), **self.downlink.downlink_metrics()}

    def summary_metrics(self) -> dict[str, Any]:
        return {"ferret": {"K": self.options.K, "downlink": self.options.downlink,
                           "blocks": len(self.run.codec.blocks(self.run.layout)), "parameters": self.run.layout.d}}

    def state_dict(self) -> dict[str, Any]:
        return {"downlink": self.downlink.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.downlink.load_state_dict(state["downlink"])


def build_ferret(options: FerretOptions, cfg) -> FerretMethod:
    FerretCodec(K=options.K, value_dtype=options.value_dtype, block_ratio=options.block_ratio)  # codec's own checks
    return FerretMethod(options)


register_strategy(StrategySpec(
    "ferret", build_ferret, FerretOptions,
    "Ferret (Shu et al. 2025): clients send ~K projections of their update on shared random bases per block; "
    "the server aggregates in coefficient space; clients rebuild the global model from the coefficients",
    COEFFICIENTS))
