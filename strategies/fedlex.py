"""FedLEx: federated loss exploration with a guidance matrix.

Internò, Olhofer, Jin, Hammer, "Federated Loss Exploration for Improved Convergence on
Non-IID Data" (IJCNN 2024). FedLEx is a plug-in in front of a base aggregation rule
(``strategy.base``: fedavg, fedavgm, fedadam, fedprox, ... any registered strategy whose
clients send updates aggregated in parameter space). :func:`build_fedlex` builds the base's
method through the registry exactly as ``strategy.name = <base>`` would (the base's own
``strategy.*`` options and validation) and puts :class:`FedLEx` in front of it by
composition: FedLEx adds the exploration phase, the guidance entries of each train message
and the guided trainer; the base aggregates and steps, and its state (momentum, Adam moments)
is checkpointed inside FedLEx's. A base that gives its clients a trainer of its own is
refused (FedLEx replaces the local trainer). Under DP the run is refused: the exploration
uploads are outside the mechanism. What FedLEx adds, server side and client side:

**Exploration** (once, before round 1's sampling, through the pipeline's acceptance).
A seeded fraction ``explorer_fraction`` of the partitions get a train message with
``trainer = "explore"``, ``server-round = 0`` and the initial weights W0. Each explorer loads
W0 into its model (its own copy: the message's arrays are never trained in place), trains it
for up to ``exploration_epochs`` epochs with early stopping (``patience`` epochs without a
lower monitored loss; the monitored loss is the epoch's mean training loss, or with
``holdout_fraction > 0`` the loss on a seeded held-apart slice of its local data), restores
its best epoch's weights W_i and replies. The reply is the ordinary dense update payload
Δ_i = W_i − W0 (fp32, forced ``codec = "dense"`` whatever the run's codec, so nothing is lost
to compression); the server squares it into the displacement D_i = (W0 − W_i)² = Δ_i², the
same fp32 numbers the client would have computed (negation is exact). Uploading Δ_i rather
than D_i costs the same bytes but also reveals the signs; it is what the client app's train
path can carry (a train reply's arrays are the codec payload of Δ).

**Guidance matrix** (:func:`guidance_matrix`). Per parameter tensor, min-max normalization
to [0, 1]. ``normalization``:

- ``average_then_normalize`` (default, the authors' code: ``create_mask`` in ``src/GTL_utils.py``
  of ChristianInterno/FedLEx takes the mean over scouts of the squared displacement per tensor,
  then min-max normalizes it): G = minmax(mean_i D_i). The paper's figure can be read either
  way, the code is unambiguous;
- ``normalize_then_average``: G = mean_i minmax(D_i). Each explorer has the same say whatever
  the scale of its displacement (one explorer that ran more epochs or diverged cannot
  dominate), and a coordinate is frozen (G = 0) only where every explorer's displacement is
  its tensor's minimum.

A tensor whose displacement is constant (max = min) carries no preference among its
coordinates and gets G = 1 there (the reference divides by zero). Min-max normalized squared
displacements are heavy-tailed, so mean(G) is small (0.01–0.02 after SGD exploration, 0.07–0.11
after Adam exploration in ``benchmarks/fedlex_study.py``): under SGD, G also shrinks the average
step that much. ``rescale = "unit_mean"`` (an ablation, not in the paper;
default ``none``) divides each tensor of G by its mean, keeping the per-coordinate pattern and
the zeros but the base's average step size.
``guidance``: ``per_round`` (default, the authors' code: each round, G from the stored D_i of
that round's sampled partitions that explored; the global G when none of them explored) or
``global`` (one G from all explorers, built once).

**Guided local training** (client duty, trainer ``guided``): after every backward pass
grad ← grad ⊙ G (the authors' ``param.grad *= mask``; no rescaling, no learning-rate
compensation), then the optimizer step (the run's ``task.optimizer``: SGD or Adam, with
``task.lr``; FedLEx adds no optimizer of its own, so it is compared with its base under the
same local optimizer). With SGD, G is a per-coordinate step size; with Adam the scale mostly
cancels and the effect comes from exact zeros.

**G travels once per node.** The server remembers, per node id, which G version (a hash of
its bytes) the node acknowledged by a valid reply, and attaches G only to the messages of
nodes that lack it: per-node messages whose ``config`` gains ``fedlex-guidance`` (G as raw
little-endian fp32 bytes in the layout's order). Every guided message carries
``trainer = "guided"`` and ``fedlex-guidance-version``; the client caches G in its node state
and refuses to train with a version it does not hold. G rides in the config record, not in an
extra ArrayRecord, because a trainer sees the round's config but not the message's other
records. A node whose reply is lost or rejected is sent G again next time it is sampled, and
a resumed run (fresh node state) resends it once per node.

**Defaults and the authors' setting** (ChristianInterno/FedLEx ``main.py`` and its README
commands): every client explores (``explorer_fraction = 1``) for up to 150 epochs with patience
40, G is built per round from the sampled clients' scouts by average-then-normalize, and
``rescale = "none"``. The authors trained locally with **Adam** (lr 3e-4, × 0.99 per round) over
FedAvg with server momentum 0.9; under Adam a constant per-coordinate scale of the gradient
cancels, so the step shrink that G causes under SGD (mean G ≈ 0.01–0.08) never shows in their
results. Stamen uses the run's ``task.optimizer``: set ``task.optimizer = "adam"`` (and
``strategy.base = "fedavgm"``) for the authors' regime; SGD runs are outside it (RESULTS.md,
"Method fidelity", reports both). One departure, on purpose: the authors' code explores in place on the server's
model object (``create_scout(model=self.model)`` in ``fedlexserver.py``), so its federated
training starts from the explorers' trained weights — a warm start that is not part of the
method; Stamen starts from the initial weights W0 that the explorers also started from.

Costs are measured: exploration message/reply bytes and wall time (round 1's metrics line and
the summary), guidance bytes per round (also included in the loop's ``downlink_bytes``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any, Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from pydantic import ConfigDict, Field

from stamen import schema as S
from stamen.core import Capabilities, Layout
from stamen.schema import train as T
from stamen.sketching.codec import make_codec
from stamen.strategies.method import Method
from stamen.strategies.registry import (
    Options,
    StrategyConfigError,
    StrategySpec,
    parse_options,
    register_strategy,
    strategy_spec,
)

log = logging.getLogger("stamen.strategy.fedlex")

TRAINER_EXPLORE, TRAINER_GUIDED = "explore", "guided"
EXPLORATION_ROUND = 0  # the ``server-round`` of exploration messages: they precede round 1

Normalization = Literal["normalize_then_average", "average_then_normalize"]


# -- the math (pure functions on {tensor name: fp32 array}) ---------------------------------
def squared_displacement(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """D = (W0 − W_final)² per element, fp32, from the update Δ = W_final − W0 (D = Δ²: negation is exact)."""
    return {k: np.square(np.asarray(v, np.float32), dtype=np.float32) for k, v in update.items()}


def minmax_per_tensor(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(D − min D) / (max D − min D) per tensor, fp32 in [0, 1]; a constant tensor maps to 1."""
    out = {}
    for k, v in d.items():
        v = np.asarray(v, np.float32)
        if v.size == 0:
            out[k] = v.copy()
            continue
        lo, hi = np.float32(v.min()), np.float32(v.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"displacement of tensor {k!r} is not finite")
        out[k] = np.ones_like(v) if hi <= lo else np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return out


def _mean(ds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: (np.sum(np.stack([d[k] for d in ds]), axis=0, dtype=np.float32) / np.float32(len(ds))).astype(np.float32)
            for k in ds[0]}


def guidance_matrix(displacements: list[dict[str, np.ndarray]], normalization: Normalization) -> dict[str, np.ndarray]:
    """G from the explorers' displacements D_i (see the module docstring for the two orders)."""
    if not displacements:
        raise ValueError("the guidance matrix needs at least one explorer's displacement")
    if normalization == "normalize_then_average":
        return _mean([minmax_per_tensor(d) for d in displacements])
    if normalization == "average_then_normalize":
        return minmax_per_tensor(_mean(displacements))
    raise ValueError(f"unknown strategy.normalization {normalization!r}")


def unit_mean(guidance: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """G / mean(G) per tensor (a tensor whose G is all zero stays zero)."""
    out = {}
    for k, v in guidance.items():
        m = np.float32(v.mean()) if v.size else np.float32(0)
        out[k] = (v / m).astype(np.float32) if m > 0 else v.copy()
    return out


def guidance_bytes(guidance: dict[str, np.ndarray], layout: Layout) -> bytes:
    """G as it travels: little-endian fp32 values in the layout's order."""
    return np.concatenate([np.asarray(guidance[n], "<f4").reshape(-1) for n in layout.names]).tobytes()


def guidance_version(raw: bytes) -> str:
    """The version a node caches G under: a hash of the bytes (same function on the client)."""
    return hashlib.sha256(raw).hexdigest()[:16]


# -- the strategy ----------------------------------------------------------------------------
class FedLExOptions(Options):
    """FedLEx's own ``strategy.*`` options; any other key is validated by the base strategy."""

    model_config = ConfigDict(extra="allow")
    base: str = Field("fedavg", description="the aggregation FedLEx guides: any registered strategy name")
    explorer_fraction: float = Field(1.0, gt=0.0, le=1.0, description="fraction of partitions that explore (the "
                                                                      "authors: all, perc_clients_for_mask = 1)")
    exploration_epochs: int = Field(150, ge=1, description="maximum local epochs of an explorer (the authors: 150)")
    patience: int = Field(40, ge=1, description="early stopping: epochs without a lower monitored loss (the "
                                                "authors: 40)")
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0,
                                    description="0: monitor the training loss; else the loss on this held-apart share")
    normalization: Normalization = Field(
        "average_then_normalize", description="average_then_normalize: G = minmax(mean D_i), the authors' code; "
                                              "normalize_then_average: G = mean minmax(D_i)")
    guidance: Literal["global", "per_round"] = Field(
        "per_round", description="per_round: G from the explorers among the round's sampled clients (the authors' "
                                 "code); global: one G from all explorers")
    rescale: Literal["none", "unit_mean"] = Field(
        "none", description="ablation, not in the paper: unit_mean divides each tensor of G by its mean")


class FedLEx(Method):
    """FedLEx in front of a base method (composition: ``self.base`` aggregates and steps)."""

    def __init__(self, base: Method, options: FedLExOptions, timeout: float):
        self.base, self.fedlex_options, self.exploration_timeout = base, options, timeout
        self.codec_name, self.codec_options, self.wire_codec = base.codec_name, base.codec_options, base.wire_codec
        self.explored = False
        self.displacements: dict[int, dict[str, np.ndarray]] = {}  # partition id -> D_i
        self.guidance: dict[str, np.ndarray] | None = None  # the global G
        self.exploration: dict[str, Any] = {}
        self.total_guidance_downlink_bytes = 0
        self.guidance_holders: dict[int, str] = {}  # node id -> G version it acknowledged (not checkpointed)
        self._round: dict[str, Any] = {}
        self._dense = make_codec("dense")

    @property
    def capabilities(self) -> Capabilities:
        base = self.base.capabilities
        return Capabilities(
            aggregation=base.aggregation, codecs=base.codecs, privacy_sites=base.privacy_sites, robust=base.robust,
            selection=base.selection, linear=base.linear, trainer=TRAINER_GUIDED,
            extra_releases=(*base.extra_releases, "exploration uploads (each explorer's update from the initial "
                                                  "weights, squared into the guidance matrix)"),
            notes={**base.notes, "release_fix": "FedLEx's exploration is not privatized; unset privacy.* or use "
                                                "strategy.base as the strategy itself"})

    def build_codec(self, layout: Layout):
        return self.base.build_codec(layout)

    def bind(self, run) -> None:
        super().bind(run)
        self.base.bind(run)

    # -- exploration ----------------------------------------------------------------------
    def before_round(self, server_round: int, arrays: ArrayRecord) -> None:
        if not self.explored:
            self.explore(arrays)
            self._explored_now = True
        else:
            self._explored_now = False
        self.base.before_round(server_round, arrays)

    def explore(self, arrays: ArrayRecord) -> None:
        """Send W0 to the explorers, collect their displacements, build the global G."""
        o = self.fedlex_options
        pids = self.run.sample(EXPLORATION_ROUND, o.explorer_fraction, "explore")
        config = {T.TRAINER: TRAINER_EXPLORE, T.CODEC: "dense", T.CODEC_OPTIONS: "{}",
                  T.EXPLORATION_EPOCHS: o.exploration_epochs, T.EXPLORATION_PATIENCE: o.patience,
                  T.EXPLORATION_HOLDOUT: o.holdout_fraction}
        ctx = self.run.ctx(EXPLORATION_ROUND)
        t0 = time.perf_counter()
        done = self.run.exchange(
            "explore", EXPLORATION_ROUND, pids,
            lambda identity: RecordDict({S.ARRAYS: arrays, S.CONFIG: ConfigRecord({**config, **identity})}),
            MessageType.TRAIN, codec="dense", timeout=self.exploration_timeout,
            decode=lambda r: self._dense.decode(r.payload, ctx))
        wall = time.perf_counter() - t0
        epochs = {}
        for reply in done.verdict.accepted:
            self.displacements[reply.pid] = squared_displacement(self.run.layout.unflatten(reply.contribution))
            epochs[reply.pid] = int(reply.metrics.get("exploration_epochs_run", -1))
        explorers = sorted(self.displacements)
        self.exploration = {"explorers": explorers, "asked": len(pids), "rejected": len(pids) - len(explorers),
                            "epochs_run": [epochs[p] for p in explorers], "wall_s": wall,
                            "downlink_bytes": done.downlink_bytes, "uplink_bytes": done.uplink_bytes}
        if explorers:
            self.guidance = guidance_matrix([self.displacements[p] for p in explorers], o.normalization)
        else:
            log.warning("exploration: no explorer replied validly; FedLEx runs as its base strategy %r", o.base)
        self.explored = True

    # -- guidance per round ---------------------------------------------------------------
    def guidance_for(self, pids: list[int]) -> dict[str, np.ndarray] | None:
        """The G this round's sampled partitions train with (None: unguided)."""
        o, guidance = self.fedlex_options, self.guidance
        if o.guidance == "per_round":
            mine = [p for p in pids if p in self.displacements]
            if mine:
                guidance = guidance_matrix([self.displacements[p] for p in mine], o.normalization)
        if guidance is not None and o.rescale == "unit_mean":
            guidance = unit_mean(guidance)
        return guidance

    def select(self, server_round: int, sampled: list[int]) -> list[int]:
        return self.base.select(server_round, sampled)

    def instructions(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        config = self.base.instructions(server_round, arrays)
        if config.get(T.TRAINER, "sgd") != "sgd":
            raise StrategyConfigError(f"strategy.base={self.fedlex_options.base!r} asks clients for its own trainer "
                                      f"{config[T.TRAINER]!r}; FedLEx's guided trainer cannot be combined with it")
        return config

    def messages(self, server_round, arrays, config, targets, identity):
        messages = self.base.messages(server_round, arrays, config, targets, identity)
        nodes = [m.metadata.dst_node_id for m in messages]
        self._round = {"version": "", "explored": self._explored_now, "nodes": nodes, "sent": 0, "bytes": 0}
        guidance = self.guidance_for(sorted(pid for pid, _ in targets))
        if guidance is None:
            return messages
        raw = guidance_bytes(guidance, self.run.layout)
        version, flat = guidance_version(raw), np.frombuffer(raw, "<f4")
        self._round.update(version=version, mean=float(flat.mean()), zeros=float((flat == 0).mean()))
        out, g_bytes = [], {}  # the bytes G adds to a config record, by the record's size without it
        for msg in messages:
            node = msg.metadata.dst_node_id
            lean = {**dict(msg.content.config_records[S.CONFIG]), T.TRAINER: TRAINER_GUIDED,
                    T.GUIDANCE_VERSION: version}
            config = lean
            if self.guidance_holders.get(node) != version:  # G travels once per node and version
                config = {**lean, T.GUIDANCE: raw}
                size = S.content_bytes(RecordDict({S.CONFIG: ConfigRecord(lean)}))
                if size not in g_bytes:
                    g_bytes[size] = S.content_bytes(RecordDict({S.CONFIG: ConfigRecord(config)})) - size
                self._round["sent"] += 1
                self._round["bytes"] += g_bytes[size]
            content = RecordDict({k: (ConfigRecord(config) if k == S.CONFIG else v) for k, v in msg.content.items()})
            out.append(Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type))
        self.total_guidance_downlink_bytes += self._round["bytes"]
        return out

    # -- aggregation: the base's ------------------------------------------------------------
    def contribution(self, payload, ctx):
        return self.base.contribution(payload, ctx)

    def contribution_size(self) -> int:
        return self.base.contribution_size()

    def aggregate(self, server_round, contributions, weights, combiner):
        return self.base.aggregate(server_round, contributions, weights, combiner)

    def step(self, server_round, global_arrays, aggregate, total_weight):
        return self.base.step(server_round, global_arrays, aggregate, total_weight)

    def after_round(self, server_round, accepted, stepped) -> None:
        self.base.after_round(server_round, accepted, stepped)
        version = self._round.get("version")
        if version:
            ok = {r.node for r in accepted}
            for node in self._round["nodes"]:
                if node in ok:
                    self.guidance_holders[node] = version
                else:  # lost or rejected: the node may lack G; send it again next time
                    self.guidance_holders.pop(node, None)

    # -- what is recorded -----------------------------------------------------------------
    def round_metrics(self, server_round: int) -> dict[str, Any]:
        row = dict(self.base.round_metrics(server_round))
        r = self._round
        row.update(guidance_downlink_bytes=r.get("bytes", 0), guidance_sent=r.get("sent", 0),
                   guidance_version=r.get("version", ""))
        if r.get("version"):
            row.update(guidance_mean=r["mean"], guidance_zero_fraction=r["zeros"])
        if r.get("explored"):
            ex = self.exploration
            row.update(exploration_downlink_bytes=ex["downlink_bytes"], exploration_uplink_bytes=ex["uplink_bytes"],
                       exploration={k: ex[k] for k in ("explorers", "asked", "rejected", "epochs_run", "wall_s")})
        return row

    def summary_metrics(self) -> dict[str, Any]:
        ex = self.exploration
        return {**self.base.summary_metrics(),
                "exploration": {k: ex.get(k) for k in ("explorers", "asked", "rejected", "epochs_run", "wall_s")},
                "exploration_downlink_bytes": ex.get("downlink_bytes", 0),
                "exploration_uplink_bytes": ex.get("uplink_bytes", 0),
                "total_guidance_downlink_bytes": self.total_guidance_downlink_bytes}

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "explored": self.explored,
                "displacements": {int(p): dict(d) for p, d in self.displacements.items()},
                "guidance": None if self.guidance is None else dict(self.guidance),
                "exploration": dict(self.exploration),
                "total_guidance_downlink_bytes": int(self.total_guidance_downlink_bytes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.explored = bool(state["explored"])
        self.displacements = {int(p): dict(d) for p, d in state["displacements"].items()}
        self.guidance = None if state["guidance"] is None else dict(state["guidance"])
        self.exploration = dict(state["exploration"])
        self.total_guidance_downlink_bytes = int(state["total_guidance_downlink_bytes"])
        self.guidance_holders = {}  # a resumed run talks to nodes with fresh state


def build_fedlex(options: FedLExOptions, cfg) -> FedLEx:
    """Build ``strategy.base`` exactly as ``strategy.name = <base>`` would (its own options, its own
    validation), and put FedLEx in front of it."""
    if options.base == "fedlex":
        raise StrategyConfigError("strategy.base='fedlex': FedLEx needs a base aggregation strategy, not itself")
    try:
        spec = strategy_spec(options.base)
    except StrategyConfigError as err:
        raise StrategyConfigError(str(err).replace("strategy.name", "strategy.base")) from None
    if spec.capabilities.aggregation != "update":
        raise StrategyConfigError(f"strategy.base={options.base!r}: FedLEx guides clients that send model updates "
                                  f"aggregated in parameter space; {options.base!r} aggregates "
                                  f"{spec.capabilities.aggregation}s")
    if spec.capabilities.trainer != "sgd":
        raise StrategyConfigError(f"strategy.base={options.base!r} asks clients for its own trainer "
                                  f"{spec.capabilities.trainer!r}; FedLEx's guided trainer cannot be combined with it")
    base = spec.factory(parse_options(spec, dict(options.model_extra or {})), cfg)
    fedlex = FedLEx(base, options, cfg.federation.round_timeout_s)
    fedlex.implied_aggregator = spec.aggregator  # strategy.base=fedmedian: FedLEx over the median
    return fedlex


register_strategy(StrategySpec(
    "fedlex", build_fedlex, FedLExOptions,
    "FedLEx (Internò et al. 2024): explorers' weight displacements → guidance matrix G; clients train with grad ⊙ G "
    "over a base strategy (strategy.base)",
    Capabilities(aggregation="update", trainer=TRAINER_GUIDED, extra_releases=("exploration uploads",))))
