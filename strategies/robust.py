"""Robust aggregation as an option of every update-sending strategy (``strategy.aggregator``).

A strategy's aggregation has two parts: *combine* the clients' models into one, then *step*
the global model with it (FedAvg: take it; FedAvgM: momentum on ``combined − w``; FedAdam:
Adam on it; FAT: a global learning rate). ``strategy.aggregator`` replaces the combine part —
the example-weighted mean — with a robust rule, and keeps the step, so ``fedadam`` with
``aggregator = "median"`` runs Adam on the coordinate-wise median's pseudo-gradient.

The rules are Flower's own implementations (:class:`RobustCombiner`, the pipeline's aggregate
stage), applied to the decoded client updates — equivalently the client models, since every
rule is translation-equivariant:

=================  ======================================  ==============================
aggregator         rule (Flower class)                     options (``strategy.*``)
=================  ======================================  ==============================
``mean``           example-weighted mean (no change)       —
``median``         coordinate-wise median (FedMedian)      —
``trimmed_mean``   coordinate-wise β-trimmed mean          ``trim_beta`` (β, default 0.2)
                   (FedTrimmedAvg)
``krum``           the model closest to its n − f − 2      ``num_malicious_nodes`` (f)
                   neighbours (Krum)
``multikrum``      mean of the m best Krum scores          ``num_malicious_nodes``,
                   (MultiKrum)                             ``num_nodes_to_select`` (m;
                                                           0 = n − f)
``bulyan``         Krum selection of n − 2f, then the      ``num_malicious_nodes``
                   mean of the n − 4f values closest to
                   the median per coordinate (Bulyan)
=================  ======================================  ==============================

The strategy names ``fedmedian``, ``fedtrimmedavg``, ``krum`` and ``bulyan`` are FedAvg
with the matching aggregator. Train metrics are still the weighted mean over every accepted
reply (the rule decides the model, not what is reported).

Where the math does not allow it the run is refused by the preflight (``strategies/preflight.py``)
before it starts, with the reason: strategies whose capabilities say ``robust = False``
(Ferret and FedKSeed aggregate per-seed scalar coefficients — a median of coefficients is a
different rule from a median of models, and the clients rebuild the model from the *mean* of
coefficients; ``sketched_fedavg``/``fetchsgd``/``sketched_dp`` average in sketch space, and a
median does not commute with de-sketching). Central DP noise is calibrated to a mean of
clipped updates and is refused with a robust rule. A rule that needs more replies than a
round's cohort (Krum: n ≥ 2f + 3, Bulyan: n ≥ 4f + 3) is refused at start for the sampled
cohort size; a round that ends with fewer valid replies fails cleanly (model unchanged).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl

from stamen import schema as P
from stamen.config import ConfigError
from stamen.strategies.method import FLOWER_NO_SAMPLING, Combiner, WeightedMean

log = logging.getLogger("stamen.strategy")

Aggregator = Literal["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan"]
AGGREGATORS: tuple[str, ...] = Aggregator.__args__  # type: ignore[attr-defined]
_USES_F = ("krum", "multikrum", "bulyan")

_NO_SAMPLING = FLOWER_NO_SAMPLING  # the pipeline samples; the rule only aggregates


def min_replies_for(aggregator: str, f: int) -> int:
    """The fewest replies a rule is defined for (Krum: n − f − 2 ≥ 1 neighbours; Bulyan: n ≥ 4f + 3)."""
    return {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(aggregator, 1)


def make_rule(aggregator: str, *, num_malicious_nodes: int = 0, num_nodes_to_select: int = 0,
              trim_beta: float = 0.2):
    """The Flower strategy whose ``aggregate_train`` implements ``aggregator`` (None for the mean)."""
    f = int(num_malicious_nodes)
    if aggregator == "mean":
        return None
    if aggregator == "median":
        return fl.FedMedian(**_NO_SAMPLING)
    if aggregator == "trimmed_mean":
        return fl.FedTrimmedAvg(**_NO_SAMPLING, beta=float(trim_beta))
    if aggregator == "krum":
        return fl.Krum(**_NO_SAMPLING, num_malicious_nodes=f)
    if aggregator == "multikrum":
        return _MultiKrumNMinusF(**_NO_SAMPLING, num_malicious_nodes=f, num_nodes_to_select=int(num_nodes_to_select))
    if aggregator == "bulyan":
        return fl.Bulyan(**_NO_SAMPLING, num_malicious_nodes=f)
    raise ConfigError(f"unknown strategy.aggregator {aggregator!r}; choose one of {list(AGGREGATORS)}")


class _MultiKrumNMinusF(fl.MultiKrum):
    """MultiKrum whose m = 0 means n − f (the round's reply count minus the tolerated attackers)."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if self.num_nodes_to_select > 0:
            return super().aggregate_train(server_round, replies)
        self.num_nodes_to_select = max(1, len(replies) - self.num_malicious_nodes)
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.num_nodes_to_select = 0


def aggregator_problems(cfg, default: str = "mean") -> tuple[str, list[str]]:
    """The aggregator a config asks for (``strategy.aggregator``, else the strategy's own rule
    ``default``) and what is wrong with its options (messages naming the keys)."""
    section = cfg.strategy
    problems = []
    if section.aggregator is not None and default != "mean" and section.aggregator != default:
        problems.append(f"strategy.name={section.name!r} aggregates with {default!r}; strategy.aggregator="
                        f"{section.aggregator!r} contradicts it (use strategy.name='fedavg' with the aggregator)")
    aggregator = section.aggregator or default
    f = section.num_malicious_nodes
    if f and aggregator not in _USES_F:
        problems.append(f"strategy.num_malicious_nodes={f} is an option of the aggregators {list(_USES_F)}, "
                        f"but strategy.aggregator is {aggregator!r}")
    if section.num_nodes_to_select and aggregator != "multikrum":
        problems.append("strategy.num_nodes_to_select is an option of strategy.aggregator='multikrum' only")
    if section.trim_beta is not None and aggregator != "trimmed_mean":
        problems.append("strategy.trim_beta is an option of strategy.aggregator='trimmed_mean' only")
    if aggregator != "mean":
        from stamen.strategies.sampling import sample_count

        cohort = sample_count(cfg.federation.fraction_train, cfg.federation.clients)
        need = min_replies_for(aggregator, f)
        if cohort < need:
            problems.append(f"strategy.aggregator={aggregator!r} with num_malicious_nodes={f} needs at least {need} "
                            f"replies per round, but a round samples {cohort} clients (federation.clients × "
                            f"fraction_train); lower num_malicious_nodes or sample more clients")
        if aggregator == "multikrum" and section.num_nodes_to_select > cohort:
            problems.append(f"strategy.num_nodes_to_select={section.num_nodes_to_select} exceeds the {cohort} clients "
                            "sampled per round")
    return aggregator, problems


class RobustCombiner(Combiner):
    """A robust rule (Flower's implementation) over the decoded updates Δ_i of a round.

    The rules are translation-equivariant (median, trimmed mean) or depend on pairwise
    distances only (Krum, Multi-Krum, Bulyan), so combining the updates Δ_i is combining the
    client models w + Δ_i, shifted by w. Example counts are passed as Flower's weights (only
    the mean-based parts of Multi-Krum use them).
    """

    def __init__(self, aggregator: str, *, num_malicious_nodes: int = 0, num_nodes_to_select: int = 0,
                 trim_beta: float = 0.2):
        self.name = aggregator
        self.rule = make_rule(aggregator, num_malicious_nodes=num_malicious_nodes,
                              num_nodes_to_select=num_nodes_to_select, trim_beta=trim_beta)
        self.need = min_replies_for(aggregator, num_malicious_nodes)

    def combine(self, vectors, weights, size):
        if len(vectors) < self.need:
            log.warning("aggregator %s needs %d valid replies, got %d", self.name, self.need, len(vectors))
            return None
        # one flat array per reply: every rule is coordinate-wise or uses distances over all coordinates
        messages = [Message(content=RecordDict({P.ARRAYS: P.to_array_record({"delta": v.numpy()}),
                                                P.METRICS: MetricRecord({P.NUM_EXAMPLES: float(w)})}),
                            dst_node_id=i + 1, message_type=MessageType.TRAIN)
                    for i, (v, w) in enumerate(zip(vectors, weights))]
        combined, _ = self.rule.aggregate_train(0, messages)
        return None if combined is None else torch.from_numpy(np.array(combined["delta"].numpy(), np.float32))


def make_combiner(cfg, default: str = "mean") -> Combiner:
    """The aggregate stage ``strategy.aggregator`` asks for (checked by the preflight first)."""
    aggregator, problems = aggregator_problems(cfg, default)
    if problems:
        raise ConfigError("; ".join(problems))
    if aggregator == "mean":
        return WeightedMean()
    s = cfg.strategy
    return RobustCombiner(aggregator, num_malicious_nodes=s.num_malicious_nodes,
                          num_nodes_to_select=s.num_nodes_to_select,
                          trim_beta=0.2 if s.trim_beta is None else s.trim_beta)
