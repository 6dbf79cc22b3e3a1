"""Strategy ``ferret``: first-order local training, shared-randomness projection both ways.

Shu et al., "Ferret: Federated Full-Parameter Tuning at Scale for Large Language Models"
(ICML 2025, arXiv 2409.06277); ``/work/shared/specs/ferret.md``. The math is the codec
``stamen.sketching.ferret.FerretCodec``; this module is the round protocol around it.

**Client duty.** Train from the global weights w as usual (``task.optimizer``, ``task.lr``; with
``local_steps = T > 0`` exactly T optimizer steps — trainer ``steps`` — else ``task.local_epochs``
epochs), then encode its update Δ = w_local − w with codec ``ferret`` (options in the message's
``codec-options``): per block l, γ_k = ⟨Δ_l, v_k⟩ / (ρ_l K_l) for K_l seeds of the shared pool.
The reply carries only the non-zero (block, seed, γ) triples.

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
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from stamen import protocol as P
from stamen.config import ConfigError
from stamen.sketching.codec import Codec, CodecContext, Layout, PayloadError
from stamen.sketching.downlink import weights_check  # noqa: F401  (part of this module's protocol)
from stamen.sketching.ferret import FerretCodec
from stamen.strategies.base import _reply_order
from stamen.strategies.catchup import CatchUpKeys, CatchUpStrategy, payload_key  # noqa: F401
from stamen.strategies.registry import _FLOWER_SAMPLING, Options, StrategySpec, register_strategy

log = logging.getLogger("stamen.strategy.ferret")

# Message config entries shared with client/trainers_ferret.py (the two sides share only messages).
KEYS = CatchUpKeys("ferret")  # the catch-up downlink's entries (strategies/catchup.py)
DOWNLINK_NAME = KEYS.downlink  # "ferret": config "downlink", the client's DOWNLINKS entry
SYNC = KEYS.sync  # "ferret-sync": "dense" | "catch-up"
GLOBAL_ROUND = KEYS.global_round  # "ferret-round": the round whose global weights the client trains from (t − 1)
BASE_ROUND = KEYS.base_round  # "ferret-base-round": catch-up: the round the server believes the node holds
ROUNDS = KEYS.rounds  # "ferret-rounds": catch-up: the rounds whose payloads the message carries, in order
SERVER_LR = "ferret-server-lr"
CHECK_SUM, CHECK_NORM = KEYS.check_sum, KEYS.check_norm  # fp64 Σw and ‖w‖ of the global weights
LOCAL_STEPS = "local-steps"  # trainer "steps": exactly this many optimizer steps
PAYLOAD_KEYS = ("block", "seed", "value")


def apply_update(flat: torch.Tensor, codec: FerretCodec, payload: dict[str, np.ndarray], ctx: CodecContext,
                 server_lr: float) -> torch.Tensor:
    """w + η_s · reconstruct(Γ): the server step (the client's downlink repeats exactly this)."""
    return flat.add(codec.decode(payload, ctx), alpha=float(server_lr))


class FerretOptions(Options):
    K: int = Field(64, ge=1, le=2**31 - 1, description="seed pool size: at most K directions per block")
    block_ratio: float = Field(0.9, gt=0.0, description="blocks pack tensors up to block_ratio × median numel")
    local_steps: int = Field(0, ge=0, description="optimizer steps per client and round; 0: task.local_epochs epochs")
    server_lr: float = Field(1.0, gt=0.0, description="η_s in w ← w + η_s·Δ̂")
    value_dtype: Literal["fp32", "fp16"] = "fp32"
    clip: Annotated[float, Field(gt=0.0)] | Literal["none"] | None = Field(
        None, description="bound on every aggregated |γ| when reconstructing (none: no bound)")
    downlink: Literal["coefficients", "dense"] = "coefficients"
    pool_scope: Literal["run", "round"] = Field("run", description="one seed pool per run (the paper) or per round")


class FerretStrategy(CatchUpStrategy, FedAvg):
    """Ferret's round protocol: see the module docstring. ``history`` holds the aggregated payloads
    Γ_r (wire dtypes), ``synced`` the round each node holds (the catch-up downlink's state)."""

    robust_refusal = ("the server averages per-seed scalar coefficients and clients rebuild the model from that mean; "
                      "a median or Krum of coefficients is a different rule, not a robust aggregate of models")

    _transient = CatchUpStrategy._transient + ("options", "_round")
    #: the codec name clients put in their replies
    wire_codec = FerretCodec.name
    catchup = KEYS

    def __init__(self, options: FerretOptions):
        super().__init__(**_FLOWER_SAMPLING)
        self.options = options
        self._round: dict[str, Any] = {}

    def catchup_enabled(self) -> bool:
        return self.options.downlink == "coefficients"

    # -- wiring ---------------------------------------------------------------------------
    def bind(self, *, seed: int, nodes: dict[int, int], layout: Layout, codec: Codec, fraction_train: float,
             fraction_evaluate: float) -> None:
        """As StamenStrategy.bind, with this strategy's own codec (``compression.codec`` is not used)."""
        super().bind(seed=seed, nodes=nodes, layout=layout, codec=self.make_codec(layout),
                     fraction_train=fraction_train, fraction_evaluate=fraction_evaluate)

    def codec_options(self, layout: Layout) -> dict[str, Any]:
        o = self.options
        return {"K": o.K, "value_dtype": o.value_dtype, "block_ratio": o.block_ratio,
                "clip": None if o.clip in (None, "none") else float(o.clip), "pool_scope": o.pool_scope}

    def make_codec(self, layout: Layout) -> FerretCodec:
        return FerretCodec(**self.codec_options(layout))

    # -- what the clients are told ----------------------------------------------------------
    def client_instructions(self, server_round: int) -> dict[str, Any]:
        out = {P.CODEC: self.wire_codec,
               "codec-options": json.dumps(self.codec_options(self.layout), sort_keys=True)}
        if self.options.local_steps > 0:
            out.update({"trainer": "steps", LOCAL_STEPS: int(self.options.local_steps)})
        if self.options.downlink == "coefficients":
            out.update({"downlink": DOWNLINK_NAME, SERVER_LR: float(self.options.server_lr)})
        return out

    # -- replies ----------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies):
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        self.last_rejected, self.last_participants = [], []
        accepted, uplink, nnz = [], [], []
        for msg in sorted(replies, key=_reply_order):
            try:
                pid, payload, metrics = self.check_payload_reply(msg, server_round)
            except (PayloadError, ValueError, KeyError, TypeError) as err:
                log.warning("round %d: rejected reply from node %s: %s", server_round, msg.metadata.src_node_id, err)
                self.last_rejected.append((msg.metadata.src_node_id, str(err)))
                continue
            accepted.append((msg.metadata.src_node_id, payload, metrics))
            self.last_participants.append(pid)
            uplink.append(P.message_bytes(msg))
            nnz.append(int(len(payload["value"])))
        self._round = {"uplink": uplink, "nnz": nnz, "aggregated_nnz": 0}
        arrays, metrics, aggregated = None, None, None
        if accepted:
            arrays, aggregated = self._step(server_round, [p for _, p, _ in accepted],
                                            [float(m[P.NUM_EXAMPLES]) for _, _, m in accepted])
            contents = [RecordDict({P.METRICS: MetricRecord(m)}) for _, _, m in accepted]
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        else:
            log.warning("round %d: no valid replies (%d rejected); the global model is unchanged",
                        server_round, len(self.last_rejected))
        self.end_catchup_round(server_round, aggregated, {node for node, _, _ in accepted})
        return arrays, metrics

    def _step(self, server_round: int, payloads: list[dict[str, np.ndarray]], examples: list[float]):
        """Aggregate in coefficient space and apply Γ once: (new weights, Γ), or (None, None) on overflow."""
        total = sum(examples)
        ctx = CodecContext(seed=self.seed, round=server_round, layout=self.layout)
        aggregated = self.codec.aggregate(payloads, [n / total for n in examples], ctx)
        flat = apply_update(self.layout.flatten(self._global), self.codec, aggregated, ctx, self.options.server_lr)
        if not bool(torch.isfinite(flat).all()):
            log.warning("round %d: the aggregated update overflows; the global model is unchanged", server_round)
            return None, None
        self._round["aggregated_nnz"] = int(len(aggregated["value"]))
        return P.to_array_record(self.layout.unflatten(flat)), aggregated

    def check_payload_reply(self, msg: Message, server_round: int) -> tuple[int, dict[str, np.ndarray], dict]:
        """(partition id, validated payload, metrics) of a reply, or raise naming the defect."""
        pid, payload, clean = self.check_envelope(msg)  # records, codec (wire_codec), partition, metrics
        ctx = CodecContext(seed=self.seed, round=server_round, layout=self.layout, node=pid)
        self.codec.unpack(payload, ctx)  # dtypes, index ranges, finiteness, no repeated pair
        return pid, payload, clean

    # -- what is recorded ---------------------------------------------------------------------
    def round_metrics(self, server_round: int) -> dict[str, Any]:
        r = self._round
        uplink, nnz = r.get("uplink", []), r.get("nnz", [])
        return {
            "ferret_uplink_bytes": list(uplink),  # per accepted client, in partition order
            "ferret_nnz": list(nnz),
            "uplink_bytes_per_client": float(np.mean(uplink)) if uplink else None,
            "ferret_aggregated_nnz": r.get("aggregated_nnz", 0),
            **self.downlink_metrics(),  # ferret_dense_nodes, ferret_catchup_nodes, ... (strategies/catchup.py)
        }

    def summary_metrics(self) -> dict[str, Any]:
        return {"ferret": {"K": self.options.K, "downlink": self.options.downlink,
                           "blocks": len(self.codec.blocks(self.layout)), "parameters": self.layout.d}}


def check_plain_config(cfg, name: str) -> None:
    """Ferret-family strategies bring their own codec and have no privacy mechanism: refuse both."""
    if cfg.compression.codec not in ("dense", "ferret") or cfg.compression.options():
        raise ConfigError(f"strategy {name!r} encodes updates with its own codec (options under strategy.*); "
                          f"leave compression.* at its default (got compression.codec={cfg.compression.codec!r}"
                          f"{' with options ' + str(sorted(cfg.compression.options())) if cfg.compression.options() else ''})")
    if cfg.privacy.enabled:
        raise ConfigError(f"strategy {name!r} has no differential-privacy mechanism; unset privacy.clip and "
                          f"privacy.noise_multiplier")


def build_ferret(options: FerretOptions, cfg) -> FerretStrategy:
    check_plain_config(cfg, "ferret")
    FerretCodec(K=options.K, value_dtype=options.value_dtype, block_ratio=options.block_ratio)  # codec's own checks
    return FerretStrategy(options)


register_strategy(StrategySpec(
    "ferret", build_ferret, FerretOptions,
    "Ferret (Shu et al. 2025): clients send ~K projections of their update on shared random bases per block; "
    "the server aggregates in coefficient space; clients rebuild the global model from the coefficients"))
