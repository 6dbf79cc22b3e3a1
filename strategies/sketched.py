"""Strategies that aggregate in sketch space: ``sketched_fedavg`` and ``fetchsgd``.

``sketched_fedavg`` — iterative sketching (Song, Wang, Yu, Zhang, ICML 2023). Round t draws a
fresh sketch R_t from (run seed, t) on every party (``compression.codec``: ``gaussian``,
``srht``, ``sparsejl``, ``rademacher`` or ``countsketch``); client duty: upload R_t Δ; server
duty: average the sketches (weighted by examples) *before* de-sketching, de-sketch once with
R_tᵀ (CountSketch: the linear mean-over-rows adjoint) and apply w ← w + η_g·R_tᵀ(mean sketch).
The sketch is unbiased (E[RᵀR] = I) but noisy: expect about d/s times more rounds than FedAvg
for s/d of the uplink bytes.

``fetchsgd`` — FetchSGD (Rothchild et al., ICML 2020). Clients upload CountSketch tables of
their update under ONE operator for the whole run (the momentum and error tables must live in
the same sketch space; the strategy tells clients ``codec-round = 0``). Server duty, in sketch
space: S = Σ w_i·S_i; momentum S_u ← ρ·S_u + S; error accumulation S_e ← S_e + η_g·S_u;
unsketch the k heavy hitters of S_e (median over rows), apply them as the update, and zero
S_u and S_e in the buckets of the extracted coordinates (the authors found exact subtraction
unstable). Momentum and error accumulation are on by default here (``strategy.momentum``,
``strategy.error_feedback``). No client state on the uplink (the downlink keeps a copy of the
global model, below).

Downlink (``strategy.downlink``): ``"compressed"`` (default) sends what the paper sends down — for
``sketched_fedavg`` the round's mean sketch ȳ_t (s floats; every party de-sketches it with R_tᵀ
and steps w ← w + η_g·R_tᵀȳ_t), for ``fetchsgd`` the k unsketched coordinates (a ``topk``
payload: int32 indices + fp32 values, w ← w + Σ v·e_i). With partial participation a sampled
client may not hold the previous global model, so both use the catch-up downlink they share with
Ferret (``strategies/catchup.py``, client side ``client/catchup.py`` and
``client/trainers_sketched.py``): the server keeps the recent per-round updates and which round
each node holds; a node that missed rounds gets the updates of those rounds (while they are
smaller than the dense weights), a node without a copy (first participation, lost reply, resumed
run) or too far behind gets the dense weights; the client applies the same step as the server
(``sketching/downlink.py``), so its copy matches the server's bit for bit, and checks it against
the fp64 sum and norm of the server's weights. Per-round metrics ``sketched_*`` / ``fetchsgd_*``
(``dense_nodes``, ``catchup_nodes``, ``catchup_rounds``, ``history_rounds``, ``history_bytes``)
record the mix; ``downlink_bytes`` counts the messages as sent. ``"dense"`` sends the global
weights to every sampled client, as plain FedAvg does. Evaluation messages are always dense.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from pydantic import Field

from stamen import protocol as P
from stamen.sketching.codec import CodecContext, PayloadError, make_codec
from stamen.sketching.downlink import sketch_step, sparse_payload, sparse_step
from stamen.strategies.base import _reply_order
from stamen.strategies.catchup import CatchUpKeys, CatchUpStrategy
from stamen.strategies.registry import _FLOWER_SAMPLING, Options, StrategySpec, register_strategy

log = logging.getLogger("stamen.strategy")

MERGEABLE = ("gaussian", "srht", "sparsejl", "rademacher", "countsketch")
DOWNLINKS = ("compressed", "dense")

# Message config entries shared with client/trainers_sketched.py (the two sides share only messages)
SKETCHED_KEYS = CatchUpKeys("sketched")  # downlink "sketched": the mean sketch of each missed round
FETCHSGD_KEYS = CatchUpKeys("fetchsgd")  # downlink "fetchsgd": the k coordinates of each missed round
SKETCHED_SERVER_LR = "sketched-server-lr"  # η_g of the de-sketching step


class SketchSpaceStrategy(CatchUpStrategy, FedAvg):
    """Validates replies, combines their sketches with example weights, leaves the rest to subclasses
    (and the downlink to :class:`CatchUpStrategy`)."""

    robust_refusal = ("updates are averaged in sketch space and de-sketched once; a robust rule does not commute "
                      "with de-sketching (use fedavg/fedprox/fedadam with a compression codec instead)")

    codec_round: int | None = None  # fixed operator round (None: a fresh operator each round)
    _transient = CatchUpStrategy._transient + ("downlink",)

    def __init__(self, *, downlink: str = "compressed", **kw):
        super().__init__(**kw)
        if downlink not in DOWNLINKS:
            raise ValueError(f"strategy.downlink must be one of {list(DOWNLINKS)}, got {downlink!r}")
        self.downlink = downlink

    def catchup_enabled(self) -> bool:
        return self.downlink == "compressed"

    def client_instructions(self, server_round: int) -> dict[str, Any]:
        out = {**super().client_instructions(server_round), "codec-options": json.dumps(self.codec_options)}
        if self.codec_round is not None:
            out["codec-round"] = self.codec_round
        return out

    def ctx(self, server_round: int) -> CodecContext:
        rnd = server_round if self.codec_round is None else self.codec_round
        return CodecContext(seed=self.seed, round=rnd, layout=self.layout)

    def combined_sketch(self, server_round: int, replies) -> tuple[dict[str, np.ndarray] | None, list, set[int]]:
        """The example-weighted mean of the valid replies' sketches, the valid reply contents and their nodes."""
        self.last_rejected, self.last_participants = [], []
        payloads, weights, contents, nodes = [], [], [], set()
        ctx = self.ctx(server_round)
        for msg in sorted(replies, key=_reply_order):
            node = msg.metadata.src_node_id
            try:
                pid, payload, metrics = self.check_envelope(msg)
                if pid in self.last_participants:
                    raise ValueError(f"duplicate reply for partition-id {pid}")
                self.codec.read_sketch(payload, ctx)  # keys, dtype, shape, finiteness
            except (PayloadError, ValueError, KeyError, TypeError) as err:
                log.warning("round %d: rejected reply from node %s: %s", server_round, node, err)
                self.last_rejected.append((node, str(err)))
                continue
            self.last_participants.append(pid)
            payloads.append(payload)
            weights.append(float(metrics[P.NUM_EXAMPLES]))
            contents.append(msg.content)
            nodes.add(node)
        if len(payloads) < self.min_replies:
            return None, contents, nodes
        total = sum(weights)
        return self.codec.combine(payloads, ctx, [w / total for w in weights]), contents, nodes

    def finish_round(self, server_round: int, flat: torch.Tensor | None, update: dict[str, np.ndarray] | None,
                     nodes: set[int], contents):
        """Record round t's compact update for the downlink; the (arrays, metrics) aggregate_train returns."""
        if flat is not None and not bool(torch.isfinite(flat).all()):
            log.warning("round %d: the update overflows; the global model is unchanged", server_round)
            flat, update = None, None
        self.end_catchup_round(server_round, update if flat is not None else None, nodes)
        if flat is None:
            return None, None
        return P.to_array_record(self.layout.unflatten(flat)), self.train_metrics(contents)

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        return self.downlink_metrics()

    @staticmethod
    def train_metrics(contents) -> MetricRecord:
        return aggregate_metricrecords(
            [type(c)({P.METRICS: c.metric_records[P.METRICS]}) for c in contents], P.NUM_EXAMPLES)


class SketchedFedAvg(SketchSpaceStrategy):
    """Iterative sketching: average sketches, de-sketch once, step with η_g (see module doc)."""

    catchup = SKETCHED_KEYS

    def __init__(self, server_lr: float, **kw):
        super().__init__(**kw)
        self.server_lr = server_lr

    def client_instructions(self, server_round: int) -> dict[str, Any]:
        out = super().client_instructions(server_round)
        if self.catchup_enabled():
            out[SKETCHED_SERVER_LR] = float(self.server_lr)
        return out

    def aggregate_train(self, server_round: int, replies):
        mean, contents, nodes = self.combined_sketch(server_round, list(replies))
        flat = None
        if mean is not None:
            try:  # w + η_g R_tᵀ ȳ (CountSketch: the linear adjoint); clients repeat exactly this step
                flat = sketch_step(self.layout.flatten(self._global), self.codec, mean, self.ctx(server_round),
                                   self.server_lr)
            except PayloadError as err:
                log.warning("round %d: the mean sketch does not de-sketch (%s); the global model is unchanged",
                            server_round, err)
        return self.finish_round(server_round, flat, mean, nodes, contents)


class FetchSGD(SketchSpaceStrategy):
    """CountSketch momentum and error accumulation on the server, top-k unsketch (see module doc)."""

    codec_round = 0
    catchup = FETCHSGD_KEYS

    def bind(self, **kw) -> None:
        """As StamenStrategy.bind, with this strategy's own CountSketch codec."""
        kw["codec"] = make_codec("countsketch", **self.codec_options)
        super().bind(**kw)

    def __init__(self, k: int, momentum: float, error_feedback: bool, server_lr: float, **kw):
        super().__init__(**kw)
        self.k, self.momentum, self.error_feedback, self.server_lr = k, momentum, error_feedback, server_lr
        self.s_u: torch.Tensor | None = None  # momentum table
        self.s_e: torch.Tensor | None = None  # error-accumulation table

    def aggregate_train(self, server_round: int, replies):
        mean, contents, nodes = self.combined_sketch(server_round, list(replies))
        if mean is None:
            return self.finish_round(server_round, None, None, nodes, contents)
        ctx = self.ctx(server_round)
        table = torch.from_numpy(np.array(mean[self.codec.payload_key], copy=True))
        if self.s_u is None:
            self.s_u, self.s_e = torch.zeros_like(table), torch.zeros_like(table)
        self.s_u = self.momentum * self.s_u + table if self.momentum > 0 else table
        if self.error_feedback:
            self.s_e = self.s_e + self.server_lr * self.s_u
            source = self.s_e
        else:
            source = self.server_lr * self.s_u
        k = min(self.k, self.layout.d)
        indices, values = self.codec.unsketch_topk({self.codec.payload_key: source.numpy()}, ctx, k)
        buckets = self.codec.operator(ctx).buckets(indices)  # (rows, k)
        rows = torch.arange(buckets.shape[0]).unsqueeze(1).expand_as(buckets)
        self.s_u[rows, buckets] = 0.0
        if self.error_feedback:
            self.s_e[rows, buckets] = 0.0
        update = sparse_payload(indices, values, self.layout.d)  # what the downlink carries
        flat = sparse_step(self.layout.flatten(self._global), update, ctx)  # clients repeat exactly this step
        return self.finish_round(server_round, flat, update, nodes, contents)


class SketchedOptions(Options):
    server_lr: float = Field(1.0, gt=0.0, description="η_g: step along the de-sketched mean update")
    downlink: Literal["compressed", "dense"] = Field(
        "compressed", description="compressed: clients get the mean sketch of each round they missed (dense weights "
                                  "when they hold no copy or catching up costs more); dense: the global weights")


class FetchSGDOptions(Options):
    k: int = Field(1000, ge=1, description="coordinates unsketched (top-k of the error table) per round")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="ρ: server momentum in sketch space (0 = off)")
    error_feedback: bool = Field(True, description="error accumulation in sketch space")
    server_lr: float = Field(1.0, gt=0.0, description="η_g: scales the momentum table into the error table")
    rows: int = Field(5, ge=1, description="CountSketch rows")
    ratio: float = Field(0.1, gt=0.0, le=1.0, description="CountSketch buckets per row, as a fraction of d")
    downlink: Literal["compressed", "dense"] = Field(
        "compressed", description="compressed: clients get the k coordinates of each round they missed (dense "
                                  "weights when they hold no copy or catching up costs more); dense: the global weights")


def _make_sketched(options: SketchedOptions, cfg) -> SketchedFedAvg:
    name = cfg.compression.codec
    if name not in MERGEABLE:
        raise ValueError(f"strategy 'sketched_fedavg' needs a mergeable sketch codec (compression.codec one of "
                         f"{list(MERGEABLE)}), got {name!r}")
    s = SketchedFedAvg(server_lr=options.server_lr, downlink=options.downlink, **_FLOWER_SAMPLING)
    s.codec_options = cfg.compression.options()
    make_codec(name, **s.codec_options)  # fail early on bad compression.* options
    return s


def _make_fetchsgd(options: FetchSGDOptions, cfg) -> FetchSGD:
    s = FetchSGD(k=options.k, momentum=options.momentum, error_feedback=options.error_feedback,
                 server_lr=options.server_lr, downlink=options.downlink, **_FLOWER_SAMPLING)
    if cfg.compression.codec not in ("dense", "countsketch") or cfg.compression.options():
        raise ValueError("strategy 'fetchsgd' brings its own CountSketch (strategy.rows, strategy.ratio); "
                         "leave compression.* at its defaults")
    s.codec_options = {"rows": options.rows, "ratio": options.ratio}
    make_codec("countsketch", **s.codec_options)
    return s


register_strategy(StrategySpec(
    "sketched_fedavg", _make_sketched, SketchedOptions,
    "Iterative sketching (Song et al. 2023): clients upload R_tΔ, the server averages sketches and de-sketches once"))
register_strategy(StrategySpec(
    "fetchsgd", _make_fetchsgd, FetchSGDOptions,
    "FetchSGD (Rothchild et al. 2020): CountSketch tables, momentum + error accumulation in sketch space, top-k"))
