"""What a strategy plugin supplies to the round pipeline, and the stages it composes with.

The round pipeline (``strategies/pipeline.py``) runs every strategy the same way::

    sample → configure → collect → ACCEPT → decode → privatize → aggregate → step → record

A strategy plugin is a :class:`Method`: it supplies only what differs between FL methods —
which clients train (``select``, usually the pipeline's sampler), what they are told
(``instructions``, ``messages``: e.g. a compressed downlink), what a reply contributes
(``contribution``: the decoded update Δ, or a payload vector in sketch space), how
contributions combine (``aggregate``, through the pipeline's combiner: weighted mean, a
robust rule, or the DP noisy sum) and how the server steps (``step``). Extra phases
(FedLEx's exploration, curriculum scoring) go through ``before_round`` and the pipeline's
:meth:`RunInfo.exchange`, so their replies pass the same acceptance.

:class:`UpdateMethod` is the common case — clients send codec-encoded updates, the server
decodes each into Δ (parameter space), combines, and a Flower strategy object takes the
server step (FedAvg: take it; FedAdam: Adam; FedAvgM: momentum). Flower's strategies are
used by composition: the pipeline never subclasses or re-classes them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl

from stamen import schema as S
from stamen.core import Capabilities, Layout
from stamen.sketching.codec import Codec, CodecContext, PayloadError, make_codec

# Flower's fraction/minimum logic is bypassed: the pipeline samples; a Flower strategy only steps.
FLOWER_NO_SAMPLING = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=0, min_evaluate_nodes=0,
                          min_available_nodes=0)


@dataclass
class RunInfo:
    """What the pipeline tells a method when a run starts (wiring, not checkpointed state)."""

    seed: int
    layout: Layout
    nodes: dict[int, int]  # partition id -> node id
    codec: Codec  # the run's one codec object, built by the pipeline
    fraction_train: float
    fraction_evaluate: float
    rounds: int
    timeout: float
    #: seeded uniform sample of partitions: sample(round, fraction, purpose) (public randomness)
    sample: Callable[[int, float, str], list[int]]
    #: send one message per partition and accept the replies (extra phases; see RoundPipeline.exchange)
    exchange: Callable[..., Any]

    def ctx(self, server_round: int, node: int = -1) -> CodecContext:
        return CodecContext(seed=self.seed, round=server_round, layout=self.layout, node=node)


# -- combiners: the aggregate stage --------------------------------------------------------------
class Combiner:
    """Combines the contributions of the accepted replies into one vector."""

    name = "mean"

    def combine(self, vectors: Sequence[torch.Tensor], weights: Sequence[float], size: int) -> torch.Tensor | None:
        raise NotImplementedError


class WeightedMean(Combiner):
    """Σ w_i v_i / Σ w_i in fp32, in the order given (partition order): FedAvg's mean."""

    name = "mean"

    def combine(self, vectors, weights, size):
        if not vectors:
            return None
        total = float(sum(weights))
        out = torch.zeros(size, dtype=torch.float32)
        for v, w in zip(vectors, weights):
            out.add_(v, alpha=float(w) / total)
        return out


# -- the method contract -------------------------------------------------------------------------
class Method:
    """A strategy plugin (module docstring). Subclasses override what differs."""

    capabilities: ClassVar[Capabilities] = Capabilities()
    #: the codec a run of this method uses: name and options (the pipeline builds it once)
    codec_name: str = "dense"
    codec_options: dict[str, Any] = {}
    #: the codec name replies carry, if it differs from the codec's own (a plugin's wire format)
    wire_codec: str | None = None
    #: robust evaluation on by default (server/evaluation.py)
    robust_eval_default: bool = False
    #: the robust rule this method's name implies when it wraps another (FedLEx over fedmedian);
    #: None: the strategy spec's own (``StrategySpec.aggregator``)
    implied_aggregator: str | None = None

    run: RunInfo

    def build_codec(self, layout: Layout) -> Codec:
        """The run's codec (the pipeline calls this once per run and shares the object)."""
        return make_codec(self.codec_name, **self.codec_options)

    def bind(self, run: RunInfo) -> None:
        self.run = run

    # -- configure ------------------------------------------------------------------------------
    def select(self, server_round: int, sampled: list[int]) -> list[int]:
        """The partitions that train this round; ``sampled`` is the pipeline's sample."""
        return sampled

    def before_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """An extra phase before the round's train messages (e.g. exploration, scoring)."""

    def instructions(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        """Config entries every train message of the round carries (client duties)."""
        return {}

    def messages(self, server_round: int, arrays: ArrayRecord, config: dict[str, Any],
                 targets: list[tuple[int, int]], identity: Callable[[int, int], dict[str, Any]]) -> list[Message]:
        """One train message per (partition, node): the global weights and the config (plus identity)."""
        return [Message(content=RecordDict({S.ARRAYS: arrays, S.CONFIG: ConfigRecord({**config, **identity(node, pid)})}),
                        dst_node_id=node, message_type=MessageType.TRAIN) for pid, node in targets]

    # -- aggregate ------------------------------------------------------------------------------
    def contribution(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> Any:
        """What one reply contributes (raise ``PayloadError`` if the payload is malformed)."""
        raise NotImplementedError

    def contribution_size(self) -> int:
        """Length of a contribution vector (for a noise-only release)."""
        return self.run.layout.d

    def aggregate(self, server_round: int, contributions: list[Any], weights: list[float],
                  combiner: Combiner) -> Any:
        return combiner.combine(contributions, weights, self.contribution_size())

    def step(self, server_round: int, global_arrays: dict[str, np.ndarray], aggregate: Any,
             total_weight: float) -> dict[str, np.ndarray] | None:
        """The new global weights from the aggregate (None: the round fails, the model stays)."""
        raise NotImplementedError

    def after_round(self, server_round: int, accepted: list, stepped: dict[str, np.ndarray] | None) -> None:
        """Bookkeeping once the round is decided (catch-up history, guidance holders, scores)."""

    # -- records --------------------------------------------------------------------------------
    def round_metrics(self, server_round: int) -> dict[str, Any]:
        return {}

    def summary_metrics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the method carries across rounds, as a tree (dicts, lists, scalars, arrays)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint has {sorted(state)}")


def checked_update(delta: torch.Tensor, d: int) -> torch.Tensor:
    if delta.shape != (d,) or not bool(torch.isfinite(delta).all()):
        raise PayloadError("decoded update is not a finite vector of the model's size")
    return delta


class FlowerStep:
    """A Flower Message-API strategy used for its server step only.

    ``configure`` lets it see the round (FedOpt records the current weights, FedAvgM its start)
    and add its client duties to the config (FedProx's ``proximal-mu``) without sampling
    anyone; ``step`` hands it one reply holding the combined model, so its own
    ``aggregate_train`` (FedAvg: take it; FedAdam: Adam on it; FedAvgM: momentum) moves the
    global model.
    """

    #: optimizer state the Flower classes keep across rounds (checkpointed)
    STATE = ("m_t", "v_t", "momentum_vector")

    def __init__(self, flower: fl.FedAvg):
        self.flower = flower

    def configure(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        config = ConfigRecord()
        with _quiet_flower():  # its "Sampled 0 nodes" would mislead: the pipeline samples
            self.flower.configure_train(server_round, arrays, config, _NoNodes())
        config.pop(S.SERVER_ROUND, None)  # the pipeline's identity carries the round
        return dict(config)

    def step(self, server_round: int, model: dict[str, np.ndarray], total_weight: float) -> dict[str, np.ndarray] | None:
        one = Message(content=RecordDict({S.ARRAYS: S.to_array_record(model),
                                          S.METRICS: MetricRecord({S.NUM_EXAMPLES: float(total_weight)})}),
                      dst_node_id=0, message_type=MessageType.TRAIN)
        with _quiet_flower():
            arrays, _ = self.flower.aggregate_train(server_round, [one])
        # fp32 whatever the optimizer computed in (FedAdam's bias-corrected step is float64)
        return None if arrays is None else {k: np.asarray(v, np.float32) for k, v in S.from_array_record(arrays).items()}

    def state_dict(self) -> dict[str, Any]:
        return {k: _plain(getattr(self.flower, k)) for k in self.STATE if getattr(self.flower, k, None) is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if k not in self.STATE:
                raise ValueError(f"unknown server-optimizer state {k!r}")
            setattr(self.flower, k, v)


def _plain(value):
    """Flower's optimizer state as plain arrays (dicts and lists of numpy arrays)."""
    if isinstance(value, dict):
        return {k: np.asarray(v) for k, v in value.items()}
    if isinstance(value, list):
        return [np.asarray(v) for v in value]
    return value


@contextmanager
def _quiet_flower():
    """Flower's strategies log each call at INFO; as a step stage they report on a one-reply round."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


class _NoNodes:
    """A grid with no nodes: Flower's configure_train then samples nobody and returns no message."""

    def get_node_ids(self) -> list[int]:
        return []


class UpdateMethod(Method):
    """Clients send codec-encoded updates Δ; the server decodes each reply into Δ, the pipeline
    combines them (weighted mean, a robust rule or the DP noisy sum), and a Flower strategy
    object steps from w + Δ̄ (see :class:`FlowerStep`)."""

    capabilities = Capabilities(aggregation="update", vectorisable=True)

    def __init__(self, flower: fl.FedAvg, *, codec: str = "dense", codec_options: dict[str, Any] | None = None):
        self.server = FlowerStep(flower)
        self.codec_name, self.codec_options = codec, dict(codec_options or {})

    def instructions(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        return self.server.configure(server_round, arrays)

    def contribution(self, payload, ctx):
        return checked_update(self.run.codec.decode(payload, ctx), self.run.layout.d)

    def step(self, server_round, global_arrays, aggregate, total_weight):
        layout = self.run.layout
        model = layout.unflatten(layout.flatten(global_arrays) + aggregate)
        return self.server.step(server_round, model, total_weight)

    def state_dict(self) -> dict[str, Any]:
        return {"server": self.server.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(dict(state.get("server", {})))
