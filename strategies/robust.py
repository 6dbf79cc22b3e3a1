"""Robust aggregation as an option of every update-sending strategy (``strategy.aggregator``).

A strategy's aggregation has two parts: *combine* the clients' models into one, then *step*
the global model with it (FedAvg: take it; FedAvgM: momentum on ``combined − w``; FedAdam:
Adam on it; FAT: a global learning rate). ``strategy.aggregator`` replaces the combine part —
the example-weighted mean — with a robust rule, and keeps the step, so ``fedadam`` with
``aggregator = "median"`` runs Adam on the coordinate-wise median's pseudo-gradient.

The rules are Flower's own implementations, applied to the decoded client models:

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

Where the math does not allow it the run is refused before it starts, with the reason:
strategies that aggregate something other than client models set ``robust_refusal``
(Ferret and FedKSeed aggregate per-seed scalar coefficients — a median of coefficients is a
different rule from a median of models, and the clients rebuild the model from the *mean* of
coefficients; ``sketched_fedavg``/``fetchsgd``/``sketched_dp`` average in sketch space, and a
median does not commute with de-sketching). Central DP noise is calibrated to a mean and is
refused with a robust rule in ``strategies/dp.py``. A rule that needs more replies than a
round's cohort (Krum: n ≥ 2f + 3, Bulyan: n ≥ 4f + 3) is refused at start for the sampled
cohort size; a round that ends with fewer valid replies fails cleanly (model unchanged).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal

from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl

from stamen import protocol as P
from stamen.config import ConfigError

log = logging.getLogger("stamen.strategy")

Aggregator = Literal["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan"]
AGGREGATORS: tuple[str, ...] = Aggregator.__args__  # type: ignore[attr-defined]
_USES_F = ("krum", "multikrum", "bulyan")

# Flower's sampling knobs are bypassed (Stamen samples; the rule only aggregates)
_NO_SAMPLING = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=0, min_evaluate_nodes=0,
                    min_available_nodes=0)


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


def configure_aggregator(strategy, cfg) -> None:
    """Resolve ``strategy.aggregator`` for a built strategy, check it is allowed, and attach the rule.

    A strategy name that *is* a robust rule (``fedmedian``, ``krum``, ...) carries its rule in
    ``strategy.aggregator``; naming a different ``strategy.aggregator`` with it is an error.
    """
    section = cfg.strategy
    implied = getattr(strategy, "aggregator", "mean")
    if section.aggregator is not None and implied != "mean" and section.aggregator != implied:
        raise ConfigError(f"strategy.name={section.name!r} aggregates with {implied!r}; strategy.aggregator="
                          f"{section.aggregator!r} contradicts it (use strategy.name='fedavg' with the aggregator)")
    aggregator = section.aggregator or implied
    f = section.num_malicious_nodes
    if f and aggregator not in _USES_F:
        raise ConfigError(f"strategy.num_malicious_nodes={f} is an option of the aggregators {list(_USES_F)}, "
                          f"but strategy.aggregator is {aggregator!r}")
    if section.num_nodes_to_select and aggregator != "multikrum":
        raise ConfigError("strategy.num_nodes_to_select is an option of strategy.aggregator='multikrum' only")
    if section.trim_beta is not None and aggregator != "trimmed_mean":
        raise ConfigError("strategy.trim_beta is an option of strategy.aggregator='trimmed_mean' only")
    strategy.aggregator, strategy.robust_rule = aggregator, None
    if aggregator == "mean":
        return
    refusal = getattr(strategy, "robust_refusal", None)
    if refusal:
        raise ConfigError(f"strategy.aggregator={aggregator!r} is not available for strategy "
                          f"{section.name!r}: {refusal}")
    from stamen.strategies.base import sample_count

    cohort = sample_count(cfg.federation.fraction_train, cfg.federation.clients)
    need = min_replies_for(aggregator, f)
    if cohort < need:
        raise ConfigError(f"strategy.aggregator={aggregator!r} with num_malicious_nodes={f} needs at least {need} "
                          f"replies per round, but a round samples {cohort} clients (federation.clients × "
                          f"fraction_train); lower num_malicious_nodes or sample more clients")
    if aggregator == "multikrum" and section.num_nodes_to_select > cohort:
        raise ConfigError(f"strategy.num_nodes_to_select={section.num_nodes_to_select} exceeds the {cohort} clients "
                          "sampled per round")
    strategy.robust_rule = make_rule(aggregator, num_malicious_nodes=f, num_nodes_to_select=section.num_nodes_to_select,
                                     trim_beta=0.2 if section.trim_beta is None else section.trim_beta)


def robust_aggregate(strategy, server_round: int, accepted: list[Message],
                     step: Callable[[int, list[Message]], Any]):
    """Combine the decoded replies with the strategy's robust rule, then let ``step`` (the base
    strategy's own ``aggregate_train``) move the global model to that single combined model."""
    contents = [m.content for m in accepted]
    metrics = strategy.train_metrics_aggr_fn(contents, strategy.weighted_by_key)
    total = sum(float(c.metric_records[P.METRICS][P.NUM_EXAMPLES]) for c in contents)
    need = min_replies_for(strategy.aggregator, getattr(strategy.robust_rule, "num_malicious_nodes", 0))
    if len(accepted) < need:
        log.warning("round %d failed: aggregator %s needs %d valid replies, got %d; the global model is unchanged",
                    server_round, strategy.aggregator, need, len(accepted))
        return None, None
    combined, _ = strategy.robust_rule.aggregate_train(server_round, accepted)  # consumes the replies' arrays
    if combined is None:
        log.warning("round %d failed: aggregator %s returned no model; the global model is unchanged",
                    server_round, strategy.aggregator)
        return None, None
    one = Message(content=RecordDict({P.ARRAYS: combined, P.METRICS: MetricRecord({P.NUM_EXAMPLES: total})}),
                  dst_node_id=accepted[0].metadata.dst_node_id, message_type=MessageType.TRAIN)
    arrays, _ = step(server_round, [one])
    return arrays, metrics
