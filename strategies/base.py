"""What every Stamen strategy adds in front of a Flower Message-API strategy.

:class:`StamenStrategy` is a mixin placed *before* a Flower strategy in the MRO
(``class StamenFedAvg(StamenStrategy, FedAvg)``). It keeps Flower's round protocol and
aggregation rules and adds what Flower leaves to the app:

- **seeded sampling by partition**: nodes are chosen by partition id with a private RNG
  derived from (run seed, round), so a run is reproducible and samples the configured
  fraction from round 1 (Flower samples node ids with the global ``random`` module and may
  sample before every node registered);
- **decoding**: clients send the codec payload of their update Δ; each reply is checked
  (structure, codec name, example count, finiteness, payload shape) and decoded into the
  update Δ (:class:`Decoded`). A bad reply is dropped with its reason logged and counted in
  :attr:`last_rejected`; the round goes on. The client models ``w_global + Δ`` are combined by
  their example-weighted mean (Flower FedAvg's arithmetic) and the base strategy steps from it;
- **robust combination** (optional, ``strategy.aggregator``): the decoded client models are
  combined by a robust rule before the base strategy's step (strategies/robust.py);
- **state for checkpoints**: :meth:`state_dict` / :meth:`load_state_dict` capture what the
  strategy carries across rounds (server optimizer moments, momentum, ...).

Replies are processed in partition order, so float sums do not depend on arrival order.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from stamen import protocol as P
from stamen.sketching.codec import Codec, CodecContext, Layout, PayloadError, derive_seed

log = logging.getLogger("stamen.strategy")


@dataclass
class Decoded:
    """One accepted reply: its partition, node, decoded update Δ (flat fp32) and metrics."""

    pid: int
    node: int
    delta: torch.Tensor
    metrics: dict[str, Any]


class _GridView:
    """A Grid that exposes only the nodes Stamen sampled (everything else delegates)."""

    def __init__(self, grid, node_ids: list[int]):
        self._grid, self._node_ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def sample_count(fraction: float, population: int) -> int:
    return max(1, min(population, int(math.floor(fraction * population + 1e-9))))


class StamenStrategy:
    """Mixin: seeded sampling, reply validation and decoding, checkpointable state."""

    #: attributes that are wiring, not state, and are not checkpointed
    _transient = ("nodes", "codec", "layout", "seed", "stamen_fraction_train", "stamen_fraction_evaluate",
                  "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "_global", "aggregator", "robust_rule")

    #: how client models are combined (``strategy.aggregator``; strategies/robust.py attaches the rule)
    aggregator: str = "mean"
    robust_rule = None
    #: why ``strategy.aggregator`` cannot replace this strategy's mean (None: it can)
    robust_refusal: str | None = None

    def bind(self, *, seed: int, nodes: dict[int, int], layout: Layout, codec: Codec,
             fraction_train: float, fraction_evaluate: float) -> None:
        """Wire the strategy to a federation: node ids by partition id, layout and codec."""
        self.seed, self.nodes, self.layout, self.codec = seed, dict(sorted(nodes.items())), layout, codec
        self.stamen_fraction_train, self.stamen_fraction_evaluate = fraction_train, fraction_evaluate
        self.last_rejected: list[tuple[int, str]] = []
        self.last_participants: list[int] = []
        self._global: dict[str, np.ndarray] | None = None
        self.min_replies = 1

    # -- sampling ----------------------------------------------------------------------
    def sample_partitions(self, server_round: int, fraction: float, purpose: str = "train") -> list[int]:
        pids = sorted(self.nodes)
        rng = np.random.default_rng(derive_seed(self.seed, server_round, "sample", purpose))
        chosen = rng.choice(len(pids), size=sample_count(fraction, len(pids)), replace=False)
        return sorted(pids[i] for i in chosen)

    def client_instructions(self, server_round: int) -> dict[str, Any]:
        """Extra ``config`` entries sent with every train message (hook for plugins)."""
        return {P.CODEC: self.codec.name}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        pids = self.sample_partitions(server_round, self.stamen_fraction_train)
        self._global = P.from_array_record(arrays)
        config = ConfigRecord({**dict(config), **self.client_instructions(server_round)})
        view = _GridView(grid, [self.nodes[p] for p in pids])
        return super().configure_train(server_round, arrays, config, view)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        if self.stamen_fraction_evaluate <= 0:
            return []
        pids = self.sample_partitions(server_round, self.stamen_fraction_evaluate, "evaluate")
        return super().configure_evaluate(server_round, arrays, config, _GridView(grid, [self.nodes[p] for p in pids]))

    # -- replies -----------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        decoded = self.decode_replies(server_round, list(replies))
        if len(decoded) < self.min_replies:
            log.warning("round %d failed: %d valid replies (%d rejected), fewer than the minimum %d; "
                        "the global model is unchanged", server_round, len(decoded), len(self.last_rejected),
                        self.min_replies)
            return None, None
        if self.robust_rule is not None:
            from stamen.strategies.robust import robust_aggregate

            return robust_aggregate(self, server_round, self.as_messages(decoded), super().aggregate_train)
        # The example-weighted mean of the client models, computed here as Flower's FedAvg computes it
        # (Σ w_i·(n_i/Σn) in float32, in partition order), handed to the base strategy as its one reply:
        # its step (FedAvg: take it; FedAdam, FedAvgM: an optimizer step on it) is unchanged, and no
        # per-client weights record is built and parsed again.
        arrays, _ = super().aggregate_train(server_round, [self.mean_message(decoded)])
        return arrays, self.train_metrics(decoded)

    def decode_replies(self, server_round: int, replies: list[Message]) -> list[Decoded]:
        """Validate and decode every reply into its update Δ; record the rejected ones."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        self.last_rejected, self.last_participants, decoded = [], [], []
        for msg in sorted(replies, key=_reply_order):
            node = msg.metadata.src_node_id
            try:
                pid, delta, metrics = self.check_reply(msg, server_round)
                if pid in self.last_participants:
                    raise ValueError(f"duplicate reply for partition-id {pid}")
            except (PayloadError, ValueError, KeyError, TypeError) as err:
                log.warning("round %d: rejected reply from node %s: %s", server_round, node, err)
                self.last_rejected.append((node, str(err)))
                continue
            decoded.append(Decoded(pid, node, delta, metrics))
            self.last_participants.append(pid)
        return decoded

    def mean_message(self, decoded: list[Decoded]) -> Message:
        """One reply holding the example-weighted mean of the decoded client models."""
        g = self.layout.flatten(self._global).numpy()
        weights = [float(e.metrics[P.NUM_EXAMPLES]) for e in decoded]
        total = sum(weights)
        mean = np.zeros_like(g)
        for e, w in zip(decoded, weights):
            mean += (g + e.delta.detach().cpu().numpy()) * (w / total)
        content = RecordDict({P.ARRAYS: P.to_array_record(self.layout.unflatten(torch.from_numpy(mean))),
                              P.METRICS: MetricRecord({P.NUM_EXAMPLES: total})})
        return Message(content=content, dst_node_id=decoded[0].node, message_type=MessageType.TRAIN)

    def as_messages(self, decoded: list[Decoded]) -> list[Message]:
        """The decoded replies as Flower expects them: each client's weights ``w_global + Δ`` and metrics."""
        g = self.layout.flatten(self._global)
        return [Message(content=RecordDict({P.ARRAYS: P.to_array_record(self.layout.unflatten(g + e.delta)),
                                            P.METRICS: MetricRecord(e.metrics)}),
                        dst_node_id=e.node, message_type=MessageType.TRAIN) for e in decoded]

    def train_metrics(self, decoded: list[Decoded]):
        """Flower's aggregation of the train metrics (weighted by examples) over every decoded reply."""
        return self.train_metrics_aggr_fn([RecordDict({P.METRICS: MetricRecord(e.metrics)}) for e in decoded],
                                          self.weighted_by_key)

    def check_reply(self, msg: Message, server_round: int):
        """Return (partition id, decoded Δ, metrics) of a reply, or raise naming the defect."""
        pid, payload, clean = self.check_envelope(msg)
        ctx = CodecContext(seed=self.seed, round=server_round, layout=self.layout, node=pid)
        delta = self.codec.decode(payload, ctx)
        if delta.shape != (self.layout.d,) or not bool(delta.isfinite().all()):
            raise PayloadError("decoded update is not a finite vector of the model's size")
        return pid, delta, clean

    def check_envelope(self, msg: Message):
        """Return (partition id, payload arrays, metrics) of a reply whose records, codec name,
        partition id and metrics are sound (the payload itself is the codec's to check)."""
        if msg.has_error():
            raise ValueError(f"client error: {msg.error.reason}")
        content = msg.content
        for key, kind in ((P.UPDATE, "array_records"), (P.METRICS, "metric_records"), (P.META, "config_records")):
            if key not in getattr(content, kind):
                raise ValueError(f"reply lacks the {key!r} record")
        meta, metrics = content.config_records[P.META], content.metric_records[P.METRICS]
        expected = getattr(self, "wire_codec", None) or self.codec.name  # a plugin's own reply format
        if meta.get(P.CODEC) != expected:
            raise PayloadError(f"reply encoded with codec {meta.get(P.CODEC)!r}, expected {expected!r}")
        pid = meta.get(P.PARTITION_ID)
        if not isinstance(pid, int) or pid not in self.nodes:
            raise ValueError(f"reply names unknown partition-id {pid!r}")
        n = metrics.get(P.NUM_EXAMPLES)
        if not isinstance(n, (int, float)) or not (n > 0 and math.isfinite(n)):
            raise ValueError(f"reply has invalid {P.NUM_EXAMPLES} {n!r}")
        clean = {}
        for k, v in metrics.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"reply metric {k!r} is not a finite number: {v!r}")
            clean[k] = v
        return pid, P.from_array_record(content.array_records[P.UPDATE]), clean

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        """Extra entries for this round's line in metrics.jsonl (hook for plugins, e.g. ε)."""
        return {}

    def stop_reason(self, server_round: int) -> str | None:
        """A reason to stop before running ``server_round`` (e.g. an ε budget), or None."""
        return None

    def summary_metrics(self) -> dict[str, Any]:
        """Extra entries for summary.json (hook for plugins, e.g. δ and the accountant)."""
        return {}

    # -- checkpoint state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if k not in self._transient}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _reply_order(msg: Message):
    try:
        return (0, int(msg.content.config_records[P.META][P.PARTITION_ID]), msg.metadata.src_node_id)
    except Exception:  # malformed replies sort last and are rejected in order
        return (1, 0, msg.metadata.src_node_id)
