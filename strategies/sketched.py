"""Strategies that aggregate in sketch space: ``sketched_fedavg`` and ``fetchsgd``.

``sketched_fedavg`` — iterative sketching (Song, Wang, Yu, Zhang, "Sketching for First Order
Method: Efficient Algorithm for Low-Bandwidth Channel and Vulnerability", ICML 2023). Round t draws a
fresh sketch R_t from (run seed, t) on every party (``compression.codec``: ``gaussian``,
``srht``, ``sparsejl``, ``rademacher`` or ``countsketch``); client duty: upload R_t Δ; server
duty: average the sketches (weighted by examples) *before* de-sketching, de-sketch once with
R_tᵀ (CountSketch: the linear mean-over-rows adjoint) and apply w ← w + η_g·R_tᵀ(mean sketch).
The sketch is unbiased (E[RᵀR] = I) but noisy: expect about d/s times more rounds than FedAvg
for s/d of the uplink bytes.

``fetchsgd`` — FetchSGD (Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez, Arora,
"FetchSGD: Communication-Efficient Federated Learning with Sketching", ICML 2020, Algorithm 1).
Client duty: ONE stochastic gradient step per round (``local_steps = 1``, trainer ``steps``: one
mini-batch of ``task.batch_size`` at ``task.lr``, so the update is Δ = −lr·g; the paper's clients
keep no local state and run no local epochs), uploaded as a CountSketch table S(Δ) under ONE
operator for the whole run (the momentum and error tables must live in the same sketch space;
the strategy tells clients ``codec-round = 0``). Server duty, in sketch space (Alg. 1): S = Σ w_i·S_i;
momentum S_u ← ρ·S_u + S; error accumulation S_e ← S_e + η_g·S_u; unsketch the k heavy hitters
of S_e (median-over-rows estimates), apply them as the update, and zero S_u and S_e in the
buckets of the extracted coordinates (what the authors' code, kiddyboots216/CommEfficient, does:
they found subtracting the sketch of the extracted update unstable). Momentum and error
accumulation are on by default (``strategy.momentum``, ``strategy.error_feedback``). With
Δ = −lr·g and η_g = 1 the paper's server learning rate is the client's ``task.lr``. No client
state on the uplink (the downlink keeps a copy of the global model, below).

FetchSGD defaults and the paper (the authors' code defaults, ``parse_args`` in
``CommEfficient/utils.py``: 5 rows × 500,000 columns, k = 50,000, one local iteration, ResNet-9):
``rows = 5``; ``ratio = 0.1`` columns per coordinate (a table smaller than the model, as theirs is
for ResNet-9); ``k`` unset → k = ⌈``k_ratio`` · columns⌉ with ``k_ratio = 0.1`` (their k is
10 % of their columns); ``local_steps = 1``. An explicit k above the columns per row is logged as
a warning: a table of c columns cannot tell more than c heavy hitters apart, so the extra
coordinates are mostly collision noise. ``local_steps = 0`` runs ``task.local_epochs`` epochs
instead (local SGD, which the paper compares against but FetchSGD does not use).

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
import math
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord
from pydantic import Field

from stamen.core import Capabilities
from stamen.schema import train as T
from stamen.sketching.codec import Codec, CodecContext, PayloadError
from stamen.sketching.downlink import sketch_step, sparse_payload, sparse_step
from stamen.strategies.catchup import CatchUpDownlink
from stamen.strategies.method import Method
from stamen.strategies.registry import Options, StrategySpec, register_strategy

log = logging.getLogger("stamen.strategy")

MERGEABLE = ("gaussian", "srht", "sparsejl", "rademacher", "countsketch")
DOWNLINKS = ("compressed", "dense")

SKETCHED_KEYS = T.CatchUpKeys("sketched")  # downlink "sketched": the mean sketch of each missed round
FETCHSGD_KEYS = T.CatchUpKeys("fetchsgd")  # downlink "fetchsgd": the k coordinates of each missed round

SKETCH_SPACE = Capabilities(
    aggregation="payload", codecs=MERGEABLE, privacy_sites=frozenset({"sketch", "local"}), robust=False,
    notes={"robust": "updates are averaged in sketch space and de-sketched once; a robust rule does not commute with "
                     "de-sketching (use fedavg/fedprox/fedadam with a compression codec instead)",
           "codecs": "a mergeable sketch whose payloads may be summed"})


class SketchMethod(Method):
    """Clients upload linear sketches; the server combines the payloads as vectors (weighted mean,
    or the DP noisy sum), then de-sketches once in :meth:`step` (module docstring).

    A payload is read as one fp32 vector: its arrays in key order, each checked against the
    codec's own payload for this model (keys, shapes, dtypes; encoded once from a zero update).
    """

    capabilities = SKETCH_SPACE
    #: fixed operator round (None: a fresh operator each round)
    codec_round: int | None = None

    def __init__(self, *, codec: str, codec_options: dict[str, Any], keys: T.CatchUpKeys | None, downlink: str):
        if downlink not in DOWNLINKS:
            raise ValueError(f"strategy.downlink must be one of {list(DOWNLINKS)}, got {downlink!r}")
        self.codec_name, self.codec_options = codec, dict(codec_options)
        self.downlink = CatchUpDownlink(keys, enabled=downlink == "compressed") if keys is not None else None
        self._template: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None
        self._update: dict[str, np.ndarray] | None = None  # this round's compact update (the downlink's U_t)

    def bind(self, run) -> None:
        super().bind(run)
        if self.downlink is not None:
            self.downlink.bind(run.layout)

    def ctx(self, server_round: int) -> CodecContext:
        rnd = server_round if self.codec_round is None else self.codec_round
        return CodecContext(seed=self.run.seed, round=rnd, layout=self.run.layout)

    # -- what the clients are told ------------------------------------------------------------
    def instructions(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        out: dict[str, Any] = {T.CODEC_OPTIONS: json.dumps(self.codec_options)}
        if self.codec_round is not None:
            out[T.CODEC_ROUND] = self.codec_round
        return out

    def messages(self, server_round, arrays, config, targets, identity):
        if self.downlink is None:
            return super().messages(server_round, arrays, config, targets, identity)
        flat = self.run.layout.flatten(arrays_to_numpy(arrays))
        return self.downlink.messages(server_round, arrays, flat, config, targets, identity)

    # -- payloads as vectors --------------------------------------------------------------------
    def template(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Keys, shapes and dtypes of this codec's payloads for the model (all fp32)."""
        if self._template is None:
            self._template = self.run.codec.template(self.ctx(1))
        return self._template

    def contribution_size(self) -> int:
        return int(sum(int(np.prod(shape)) for shape, _ in self.template().values()))

    def contribution(self, payload, ctx):
        return torch.from_numpy(Codec.flatten_payload(payload, self.template()))

    def unpack(self, vector: torch.Tensor) -> dict[str, np.ndarray]:
        return Codec.unflatten_payload(vector.numpy(), self.template())

    # -- after the round ------------------------------------------------------------------------
    def after_round(self, server_round, accepted, stepped) -> None:
        if self.downlink is not None:
            self.downlink.end_round(server_round, self._update if stepped is not None else None,
                                    {r.node for r in accepted})
        self._update = None

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        return self.downlink.downlink_metrics() if self.downlink is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"downlink": self.downlink.state_dict()} if self.downlink is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.downlink is not None:
            self.downlink.load_state_dict(state["downlink"])


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


class SketchedFedAvg(SketchMethod):
    """Iterative sketching: average sketches, de-sketch once, step with η_g (see module doc)."""

    def __init__(self, server_lr: float, **kw):
        super().__init__(keys=SKETCHED_KEYS, **kw)
        self.server_lr = float(server_lr)

    def instructions(self, server_round, arrays):
        out = super().instructions(server_round, arrays)
        if self.downlink.enabled:
            out[T.SKETCHED_SERVER_LR] = self.server_lr
        return out

    def step(self, server_round, global_arrays, aggregate, total_weight):
        mean = self.unpack(aggregate)
        try:  # w + η_g R_tᵀ ȳ (CountSketch: the linear adjoint); clients repeat exactly this step
            flat = sketch_step(self.run.layout.flatten(global_arrays), self.run.codec, mean, self.ctx(server_round),
                               self.server_lr)
        except PayloadError as err:
            log.warning("round %d: the mean sketch does not de-sketch (%s); the global model is unchanged",
                        server_round, err)
            return None
        self._update = mean
        return self.run.layout.unflatten(flat)


class FetchSGD(SketchMethod):
    """CountSketch momentum and error accumulation on the server, top-k unsketch (see module doc)."""

    capabilities = Capabilities(aggregation="payload", codecs=(), privacy_sites=frozenset({"sketch", "local"}),
                                robust=False, notes=SKETCH_SPACE.notes)
    codec_round = 0

    def __init__(self, k: int | None, momentum: float, error_feedback: bool, server_lr: float, *, rows: int,
                 ratio: float, downlink: str, k_ratio: float = 0.1, local_steps: int = 1):
        super().__init__(codec="countsketch", codec_options={"rows": rows, "ratio": ratio}, keys=FETCHSGD_KEYS,
                         downlink=downlink)
        self.k, self.momentum, self.error_feedback, self.server_lr = k, momentum, error_feedback, server_lr
        self.k_ratio, self.local_steps = float(k_ratio), int(local_steps)
        self.s_u: torch.Tensor | None = None  # momentum table
        self.s_e: torch.Tensor | None = None  # error-accumulation table

    def bind(self, run) -> None:
        super().bind(run)
        columns = self.run.codec.sketch_size(self.run.layout.d)
        if self.k is not None and self.k > columns:
            log.warning("strategy.k=%d exceeds the %d CountSketch columns per row (strategy.ratio=%s of d=%d): at most "
                        "%d heavy hitters can be told apart, the rest of the k coordinates are collision noise; unset "
                        "strategy.k to use k = ceil(strategy.k_ratio × columns)", self.k, columns,
                        self.codec_options["ratio"], self.run.layout.d, columns)

    def top_k(self) -> int:
        """k: ``strategy.k`` if set, else ⌈k_ratio · columns⌉ (the paper: 10 % of the columns); at most d."""
        if self.k is not None:
            return min(int(self.k), self.run.layout.d)
        columns = self.run.codec.sketch_size(self.run.layout.d)
        return max(1, min(math.ceil(self.k_ratio * columns), self.run.layout.d))

    def instructions(self, server_round, arrays):
        out = super().instructions(server_round, arrays)
        if self.local_steps > 0:  # one stochastic gradient per client and round (the paper's client)
            out.update({T.TRAINER: "steps", T.LOCAL_STEPS: self.local_steps})
        return out

    def step(self, server_round, global_arrays, aggregate, total_weight):
        codec, ctx = self.run.codec, self.ctx(server_round)
        table = torch.from_numpy(self.unpack(aggregate)[codec.payload_key])
        if self.s_u is None:
            self.s_u, self.s_e = torch.zeros_like(table), torch.zeros_like(table)
        self.s_u = self.momentum * self.s_u + table if self.momentum > 0 else table
        if self.error_feedback:
            self.s_e = self.s_e + self.server_lr * self.s_u
            source = self.s_e
        else:
            source = self.server_lr * self.s_u
        k = self.top_k()
        indices, values = codec.unsketch_topk({codec.payload_key: source.numpy()}, ctx, k)
        buckets = codec.operator(ctx).buckets(indices)  # (rows, k)
        rows = torch.arange(buckets.shape[0]).unsqueeze(1).expand_as(buckets)
        self.s_u[rows, buckets] = 0.0
        if self.error_feedback:
            self.s_e[rows, buckets] = 0.0
        self._update = sparse_payload(indices, values, self.run.layout.d)  # what the downlink carries
        flat = sparse_step(self.run.layout.flatten(global_arrays), self._update, ctx)  # clients repeat this step
        return self.run.layout.unflatten(flat)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "s_u": None if self.s_u is None else self.s_u.numpy(),
                "s_e": None if self.s_e is None else self.s_e.numpy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.s_u = None if state["s_u"] is None else torch.from_numpy(np.array(state["s_u"], np.float32))
        self.s_e = None if state["s_e"] is None else torch.from_numpy(np.array(state["s_e"], np.float32))


class SketchedOptions(Options):
    server_lr: float = Field(1.0, gt=0.0, description="η_g: step along the de-sketched mean update")
    downlink: Literal["compressed", "dense"] = Field(
        "compressed", description="compressed: clients get the mean sketch of each round they missed (dense weights "
                                  "when they hold no copy or catching up costs more); dense: the global weights")


class FetchSGDOptions(Options):
    k: int | None = Field(None, ge=1, description="coordinates unsketched (top-k of the error table) per round; "
                                                 "unset: ceil(k_ratio × columns)")
    k_ratio: float = Field(0.1, gt=0.0, le=1.0, description="k as a fraction of the CountSketch columns when k is "
                                                           "unset (the paper: 50,000 of 500,000)")
    local_steps: int = Field(1, ge=0, description="optimizer steps per client and round (the paper: one stochastic "
                                                 "gradient); 0: task.local_epochs epochs")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="ρ: server momentum in sketch space (0 = off)")
    error_feedback: bool = Field(True, description="error accumulation in sketch space")
    server_lr: float = Field(1.0, gt=0.0, description="η_g: scales the momentum table into the error table")
    rows: int = Field(5, ge=1, description="CountSketch rows")
    ratio: float = Field(0.1, gt=0.0, le=1.0, description="CountSketch buckets per row, as a fraction of d")
    downlink: Literal["compressed", "dense"] = Field(
        "compressed", description="compressed: clients get the k coordinates of each round they missed (dense "
                                  "weights when they hold no copy or catching up costs more); dense: the global weights")


def _make_sketched(options: SketchedOptions, cfg) -> SketchedFedAvg:
    return SketchedFedAvg(server_lr=options.server_lr, downlink=options.downlink, codec=cfg.compression.codec,
                          codec_options=cfg.compression.options())


def _make_fetchsgd(options: FetchSGDOptions, cfg) -> FetchSGD:
    return FetchSGD(k=options.k, momentum=options.momentum, error_feedback=options.error_feedback,
                    server_lr=options.server_lr, rows=options.rows, ratio=options.ratio, downlink=options.downlink,
                    k_ratio=options.k_ratio, local_steps=options.local_steps)


register_strategy(StrategySpec(
    "sketched_fedavg", _make_sketched, SketchedOptions,
    "Iterative sketching (Song et al. 2023): clients upload R_tΔ, the server averages sketches and de-sketches once",
    SKETCH_SPACE))
register_strategy(StrategySpec(
    "fetchsgd", _make_fetchsgd, FetchSGDOptions,
    "FetchSGD (Rothchild et al. 2020): CountSketch tables, momentum + error accumulation in sketch space, top-k",
    FetchSGD.capabilities))
