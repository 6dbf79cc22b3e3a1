"""The round pipeline every strategy runs (ARCHITECTURE.md draws it):

    sample → configure → collect → accept → decode → privatize → aggregate → step → record

:class:`RoundPipeline` is a Flower Message-API ``Strategy`` (its four methods are the round
protocol Flower's ``Strategy.start`` and Stamen's own loop call), assembled from objects:

- a **method** (:class:`stamen.strategies.method.Method`, the strategy plugin): what differs
  between FL methods — selection, client instructions, downlink, what a reply contributes,
  how contributions aggregate, the server step;
- the run's **codec**, built once here and shared with the method;
- **acceptance** (:func:`stamen.strategies.accept.accept_replies`): one function for every
  reply of every strategy — run, round, node, partition, nonce, once, example bound, codec,
  payload — whose rejections are counted with their reasons;
- a **privacy stage** (:class:`stamen.strategies.dp.PrivacyStage`, or none): secret sampling,
  client clipping instructions, server re-clipping, the noisy sum, the accountant;
- a **combiner** (the aggregate stage): the weighted mean, a robust rule
  (``strategies/robust.py``) or, under DP, the privacy stage's noisy sum;
- **secure aggregation** (:class:`stamen.strategies.secagg.SecureAggregation`, or none): two
  query exchanges before the train messages, and instead of decoding each reply the server
  unmasks the sum of the masked payloads, releases its mean (with the privacy stage's noise at a
  central site) and decodes that once — the same aggregate and step stages follow.

Nothing is composed by re-classing objects or generating subclasses: reading a plugin's
module shows everything it does, and this module shows the order in which it happens.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from stamen import schema as S
from stamen.core import Layout
from stamen.schema import evaluate as E
from stamen.schema import train as T
from stamen.sketching.codec import PayloadError
from stamen.strategies.accept import Issued, Reply, Verdict, accept_replies
from stamen.privacy.distributed import round_epsilon_bound
from stamen.strategies.dp import PrivacyStage
from stamen.strategies.method import Combiner, Method, RunInfo, WeightedMean
from stamen.strategies.sampling import seeded_sample
from stamen.strategies.secagg import SecureAggregation

log = logging.getLogger("stamen.pipeline")


class ForeignClientError(RuntimeError):
    """Every reply of a round came from something that does not speak Stamen's schema."""


@dataclass
class Exchange:
    """The outcome of an extra phase: accepted/rejected replies and the bytes both ways."""

    verdict: Verdict
    downlink_bytes: int
    uplink_bytes: int
    messages: int


class RoundPipeline(Strategy):
    """One federated round, the same for every strategy (module docstring)."""

    def __init__(self, method: Method, combiner: Combiner, privacy: PrivacyStage | None = None, *,
                 secagg: SecureAggregation | None = None, name: str = ""):
        self.method, self.combiner, self.privacy, self.name = method, combiner, privacy, name
        self.secagg = secagg
        self.last_rejected: list[tuple[int, str, str]] = []
        self.last_participants: list[int] = []
        self.last_reasons: dict[str, int] = {}
        self.min_replies = 1
        self._issued: Issued | None = None
        self._eval_issued: Issued | None = None
        self._global: dict[str, np.ndarray] | None = None
        self._grid = None

    @property
    def capabilities(self):
        return self.method.capabilities

    # -- wiring ------------------------------------------------------------------------------
    def bind(self, *, seed: int, nodes: dict[int, int], layout: Layout, fraction_train: float,
             fraction_evaluate: float, rounds: int, timeout: float, bounds: dict[int, float] | None = None,
             run_id: str | None = None, min_replies: int = 1) -> None:
        """Wire the pipeline to a federation: partitions → node ids, the model's layout, the
        largest example count each partition may claim, this run's id; build the run's codec."""
        self.seed, self.nodes = seed, dict(sorted(nodes.items()))
        self.pids = np.fromiter(self.nodes, dtype=np.int64, count=len(self.nodes))  # sorted, made once
        self.bounds = dict(bounds or {})
        self.run_id = run_id or secrets.token_hex(8)
        self.min_replies = int(min_replies)
        codec = self.method.build_codec(layout)
        self.wire_codec = self.method.wire_codec or codec.name
        self.run = RunInfo(seed=seed, layout=layout, nodes=self.nodes, codec=codec, fraction_train=fraction_train,
                           fraction_evaluate=fraction_evaluate, rounds=rounds, timeout=timeout,
                           sample=lambda rnd, fraction, purpose: seeded_sample(seed, rnd, self.pids, fraction,
                                                                               purpose),
                           exchange=self.exchange)
        self.method.bind(self.run)
        if self.privacy is not None:
            self.privacy.bind_seed(seed)
        if self.secagg is not None:
            self.secagg.bind(self.run)
            if self.privacy is not None and self.privacy.plan.site == "distributed":
                self.privacy.use_distributed_bound(round_epsilon_bound(
                    self.privacy.plan.noise_multiplier, self.secagg.sensitivity, self.secagg.size, len(self.nodes)))

    # -- train -------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> list[Message]:
        self._grid = grid
        self._global = S.from_array_record(arrays)
        self.method.before_round(server_round, arrays)
        sampled = (self.privacy.sample(server_round, self.pids) if self.privacy is not None
                   else seeded_sample(self.seed, server_round, self.pids, self.run.fraction_train))
        chosen = self.method.select(server_round, sampled)
        issue = None
        if self.secagg is not None:  # key exchange and shares; each instruction carries its client's part
            per_client = self.secagg.setup(server_round, chosen) or {}
            chosen = sorted(per_client)
            issue = lambda node, pid: {**self._issued.issue(node, pid), **per_client[pid]}  # noqa: E731
        entries = {**dict(config), T.CODEC: self.wire_codec,  # the instruction names its codec completely
                   T.CODEC_OPTIONS: json.dumps(self.method.codec_options, sort_keys=True),
                   **self.method.instructions(server_round, arrays)}
        if self.privacy is not None:
            entries.update(self.privacy.instructions())
        self._issued = Issued(self.run_id, server_round, "train")
        return self.method.messages(server_round, arrays, entries, [(pid, self.nodes[pid]) for pid in chosen],
                                    issue or self._issued.issue)

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._issued is None or self._issued.round != server_round or self._global is None:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for that round")
        replies = list(replies)
        verdict = self.accept(replies, self._issued, codec=self.wire_codec,
                              required=self.privacy.required_metrics if self.privacy is not None else (),
                              decode=None if self.secagg is None else lambda r: self.secagg.read_masked(r.payload))
        accepted = verdict.accepted
        if self.secagg is not None:
            return self._secure_round(server_round, accepted, len(verdict.rejected))
        weights = self.privacy.privatize(accepted) if self.privacy is not None else [r.weight for r in accepted]
        combiner = self.privacy.combiner(server_round) if self.privacy is not None else self.combiner
        used = accepted
        if len(accepted) < self.min_replies:
            if self.privacy is None or self.privacy.last_noise_std <= 0:
                log.warning("round %d failed: %d valid replies (%d rejected), fewer than the minimum %d; the global "
                            "model is unchanged", server_round, len(accepted), len(verdict.rejected), self.min_replies)
                used = None
            else:  # central DP still releases (the noise alone): skipping would reveal the cohort's size
                log.warning("round %d: %d valid replies, fewer than the minimum %d; releasing the noise alone",
                            server_round, len(accepted), self.min_replies)
                used = []
        new = None
        if used is not None:
            try:
                aggregate = self.method.aggregate(server_round, [r.contribution for r in used], weights[:len(used)],
                                                  combiner)
                if aggregate is not None:
                    new = self.method.step(server_round, self._global, aggregate,
                                           float(sum(weights[:len(used)])) or 1.0)
                else:
                    log.warning("round %d failed: the %s aggregate is undefined for %d replies; the global model is "
                                "unchanged", server_round, combiner.name, len(used))
            except PayloadError as err:  # finite inputs whose aggregate overflows or does not decode
                log.warning("round %d failed: %s; the global model is unchanged", server_round, err)
        metrics = None if self.privacy is not None else _weighted_metrics(accepted)
        return self._finish(server_round, accepted, new, metrics)

    def _finish(self, server_round: int, accepted: list[Reply], new, metrics: MetricRecord | None
                ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's end, whatever aggregated: a non-finite model is dropped, the method and the privacy
        stage record the round."""
        if new is not None and not all(np.isfinite(a).all() for a in new.values()):
            log.warning("round %d: the update overflows; the global model is unchanged", server_round)
            new = None
        self.method.after_round(server_round, accepted, new)
        if self.privacy is not None:
            self.privacy.after_round(server_round, self.last_participants)
        return (None if new is None else S.to_array_record(new)), metrics

    def _secure_round(self, server_round: int, accepted: list[Reply], rejected: int
                      ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """decode → privatize → aggregate → step on the secure sum: unmask Σ survivors' payloads, release
        their mean (the privacy stage's noise at a central site), decode it once, step."""
        new = None
        unmasked = self.secagg.unmask(server_round, accepted) if len(accepted) >= self.min_replies else None
        if unmasked is None:
            log.warning("round %d failed: secure aggregation could not unmask the sum of %d valid replies (%d "
                        "rejected); the global model is unchanged", server_round, len(accepted), rejected)
        else:
            total, survivors = torch.from_numpy(unmasked[0]), unmasked[1]
            mean = (self.privacy.release_sum(total, survivors, server_round, self.secagg.real_sensitivity,
                                             self.secagg.sum_noise_std(survivors))
                    if self.privacy is not None else total / survivors)
            try:
                contribution = self.method.contribution(self.secagg.payload(mean.numpy()), self.run.ctx(server_round))
                aggregate = self.method.aggregate(server_round, [contribution], [1.0], WeightedMean())
                new = self.method.step(server_round, self._global, aggregate, float(survivors))
            except PayloadError as err:
                log.warning("round %d failed: %s; the global model is unchanged", server_round, err)
        return self._finish(server_round, accepted, new, None)

    def accept(self, replies: list[Message], issued: Issued, *, codec: str | None,
               required: tuple[str, ...] = (), decode: Callable[[Reply], Any] | None = None) -> Verdict:
        """The acceptance stage for this round's train replies; records who took part and why others did not.
        ``decode``: what a reply contributes (default: the method's contribution of its payload)."""
        rnd = issued.round
        verdict = accept_replies(
            replies, issued, bounds=self.bounds, codec=codec, required_metrics=required,
            decode=decode or (lambda r: self.method.contribution(r.payload, self.run.ctx(rnd, r.pid))))
        if replies and verdict.foreign == len(replies):
            raise ForeignClientError(
                f"round {rnd}: 0 of {len(replies)} replies were Stamen replies — is the ClientApp a Stamen app? "
                f"(a plain Flower ClientApp sends weights, not Stamen's encoded updates: ARCHITECTURE.md, "
                f"'Message schema')")
        self.last_participants = [r.pid for r in verdict.accepted]
        self.last_rejected = list(verdict.rejected)
        self.last_reasons = verdict.reasons
        return verdict

    # -- evaluate ----------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> list[Message]:
        if self.run.fraction_evaluate <= 0:
            return []
        pids = seeded_sample(self.seed, server_round, self.pids, self.run.fraction_evaluate, "evaluate")
        self._eval_issued = Issued(self.run_id, server_round, "evaluate")
        return [Message(content=RecordDict({S.ARRAYS: arrays, S.CONFIG: ConfigRecord(
            {**dict(config), **self._eval_issued.issue(self.nodes[p], p)})}), dst_node_id=self.nodes[p],
            message_type=MessageType.EVALUATE) for p in pids]

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        issued = self._eval_issued
        if issued is None or issued.round != server_round:  # no federated evaluation this round
            return None
        verdict = accept_replies(list(replies), issued, bounds=self.bounds,
                                 required_metrics=(E.EVAL_LOSS, E.EVAL_ACCURACY))
        return _weighted_metrics(verdict.accepted)

    # -- extra phases (exploration, scoring) ----------------------------------------------------
    def exchange(self, kind: str, server_round: int, pids: list[int], content: Callable[[dict[str, Any]], RecordDict],
                 message_type: str, *, codec: str | None = None, decode: Callable[[Reply], Any] | None = None,
                 required_metrics: tuple[str, ...] = (), timeout: float | None = None) -> Exchange:
        """Send one message per partition (``content(identity entries)``) and accept the replies
        exactly as train replies are accepted."""
        issued = Issued(self.run_id, server_round, kind)
        messages = [Message(content=content(issued.issue(self.nodes[p], p)), dst_node_id=self.nodes[p],
                            message_type=message_type) for p in pids]
        replies = list(self._grid.send_and_receive(messages, timeout=timeout or self.run.timeout))
        verdict = accept_replies(replies, issued, bounds=self.bounds, codec=codec, decode=decode,
                                 required_metrics=required_metrics)
        return Exchange(verdict, sum(S.message_bytes(m) for m in messages), sum(S.message_bytes(r) for r in replies),
                        len(messages))

    # -- records -----------------------------------------------------------------------------
    def stop_reason(self, server_round: int) -> str | None:
        return self.privacy.stop_reason(server_round) if self.privacy is not None else None

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        out = {"rejected_reasons": dict(self.last_reasons), **self.method.round_metrics(server_round)}
        if self.privacy is not None:
            out.update(self.privacy.round_metrics())
        if self.secagg is not None:
            out.update(self.secagg.round_metrics())
        return out

    def summary_metrics(self) -> dict[str, Any]:
        out = dict(self.method.summary_metrics())
        if self.privacy is not None:
            out.update(self.privacy.summary())
        if self.secagg is not None:
            out.update(self.secagg.summary())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(),
                "privacy": None if self.privacy is None else self.privacy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("privacy") is None) != (self.privacy is None):
            raise ValueError("the checkpoint was written with a different privacy.* setting")
        self.method.load_state_dict(state.get("method") or {})
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])

    def summary(self) -> None:  # Flower's Strategy API: log what runs
        log.info("Stamen round pipeline: strategy %s, codec %s, aggregate %s, privacy %s, secure aggregation %s",
                 self.name, self.wire_codec, self.combiner.name,
                 "off" if self.privacy is None else self.privacy.plan.site, "on" if self.secagg is not None else "off")


def _weighted_metrics(accepted: list[Reply]) -> MetricRecord | None:
    """Flower's example-weighted mean of the reply metrics, over the accepted replies."""
    if not accepted:
        return None
    return aggregate_metricrecords([RecordDict({S.METRICS: MetricRecord(r.metrics)}) for r in accepted],
                                   S.NUM_EXAMPLES)
