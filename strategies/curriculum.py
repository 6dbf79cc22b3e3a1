"""Strategy ``curriculum``: curricula for data and for clients (Vahidian et al., ICCV 2023;
``/work/shared/specs/curriculum.md``).

Server duty: FedAvg aggregation, plus **client selection by curriculum** (``client_curriculum``):
clients are scored by the mean difficulty of their data, ordered (``client_ordering``), and a
pacing function over the count of client updates so far (``client_pacing``, a = ``client_a``,
b = ``client_b``) decides how many of the ordered clients are eligible; each round takes the
next ``clients_per_round`` = ⌊fraction_train·N⌋ from a shuffled pass over that pool
(:class:`stamen.tasks.curriculum.ClientCurriculum`). Client scores come from

- ``client_scoring = "full"``: a *scoring round* — every client evaluates the global model on its
  data (a ``query`` message, ``curriculum-score``) — in round 1 and then every ``rescore_every``
  rounds (0: once per pass over the clients, ⌈N/K⌉ rounds), as the reference code re-scores
  every client on each pass;
- ``client_scoring = "stale"``: one scoring round in round 1, then each client's score from its
  last participation, reported in its train reply (``client-score``; no extra messages).

The cost is recorded per round in metrics.jsonl: ``scoring_evaluations`` (client evaluations
spent on scoring rounds), ``scoring_bytes`` (their query + reply bytes, not included in
``uplink_bytes`` / ``downlink_bytes``), ``score_reports`` (stale scores piggybacked on replies)
and ``client_pool`` (eligible clients this round).

Client duty (``data_curriculum``; trainer ``curriculum``, ``client/trainers_curriculum.py``):
score its examples (``scorer`` G/L/LG/E, ``score`` loss/misclassification), order them
(``ordering``), and train on the paced prefix (``pacing``, ``a``, ``b``) for the usual
epochs·⌈n/batch⌉ steps. ``ordering = "vanilla"`` trains exactly as plain SGD.

To use the data curriculum under another strategy, set ``task.curriculum`` (and
``task.curriculum_pacing`` / ``_a`` / ``_b`` / ``_scorer``) instead: the ClientApp then uses the
curriculum trainer whenever the strategy asks for no trainer of its own.

Client selection reuses :class:`ClientCurriculum` from ``tasks/curriculum.py`` (pure code both
sides share: pacing functions, orderings, scorers).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from stamen import protocol as P
from stamen.tasks.curriculum import ClientCurriculum
from stamen.sketching.codec import derive_seed
from stamen.strategies.base import StamenStrategy, sample_count
from stamen.strategies.registry import _FLOWER_SAMPLING, Options, StrategySpec, register_strategy

log = logging.getLogger("stamen.strategy")

SCORE_QUERY = "curriculum-score"  # the client's query handler (client/trainers_curriculum.py)
CLIENT_SCORE = "client-score"

Ordering = Literal["curriculum", "anti", "random", "vanilla"]
Pacing = Literal["linear", "quad", "root", "exp", "log", "step"]


class CurriculumOptions(Options):
    data_curriculum: bool = Field(True, description="clients order and pace their examples (trainer 'curriculum')")
    ordering: Ordering = Field("curriculum", description="example order: curriculum (easy first), anti, random, "
                               "vanilla (all data, plain SGD)")
    pacing: Pacing = Field("linear", description="data pacing g(t): linear, quad, root, exp, log, step")
    a: float = Field(0.8, gt=0.0, le=1.0,
                     description="data pacing a: fraction of local steps after which all data is in")
    b: float = Field(0.2, gt=0.0, le=1.0, description="data pacing b: starting fraction of the data")
    scorer: Literal["G", "L", "LG", "E"] = Field("G", description="scoring model: G global, L local (last "
                                                  "participation), LG both, E central expert (oracle)")
    score: Literal["loss", "misclassification"] = Field("loss", description="per-example difficulty: "
                                                         "cross-entropy or 0/1 error")
    expert_epochs: int = Field(20, ge=1, description="epochs of the central expert model (scorer E)")
    client_curriculum: bool = Field(True, description="select clients by curriculum (else seeded uniform sampling)")
    client_ordering: Ordering = Field("curriculum", description="client order by mean score: curriculum, anti, "
                                      "random, vanilla (partition-id order)")
    client_pacing: Pacing = Field("linear", description="client pacing over the count of client updates so far")
    client_a: float = Field(0.2, gt=0.0, le=1.0, description="client pacing a: fraction of all updates after which "
                            "every client is eligible")
    client_b: float = Field(0.4, gt=0.0, le=1.0, description="client pacing b: starting fraction of eligible clients")
    client_scoring: Literal["full", "stale"] = Field("full", description="full: scoring rounds where every client "
                                                     "evaluates the global model; stale: scores from each client's "
                                                     "last participation")
    rescore_every: int = Field(0, ge=0, description="full scoring: rounds between scoring rounds; 0 = once per pass "
                               "over the clients, ceil(N/K)")


class CurriculumStrategy(StamenStrategy, FedAvg):
    """FedAvg + curriculum data ordering on the clients + curriculum client selection."""

    _transient = StamenStrategy._transient + ("timeout", "rounds")  # from the run config, not state

    def __init__(self, options: CurriculumOptions, *, rounds: int, timeout: float):
        super().__init__(**_FLOWER_SAMPLING)
        self.options = options.model_dump()
        self.rounds, self.timeout = int(rounds), float(timeout)
        self.selector: ClientCurriculum | None = None
        self.last_scoring_round = 0
        self.selected: list[int] = []
        self.round_cost = {"scoring_evaluations": 0, "scoring_bytes": 0, "score_reports": 0}

    # -- options as the clients read them ----------------------------------------------
    @property
    def _client_selection(self) -> bool:
        return bool(self.options["client_curriculum"])

    @property
    def _stale(self) -> bool:
        return self._client_selection and self.options["client_scoring"] == "stale"

    def scoring_options(self) -> dict[str, Any]:
        o = self.options
        return {"curriculum-scorer": o["scorer"], "curriculum-score": o["score"],
                "curriculum-expert-epochs": o["expert_epochs"]}

    def client_instructions(self, server_round: int) -> dict[str, Any]:
        base = super().client_instructions(server_round)
        o = self.options
        if not o["data_curriculum"] and not self._stale:
            return base  # plain sgd clients
        ordering = o["ordering"] if o["data_curriculum"] else "vanilla"
        return {**base, "trainer": "curriculum", "curriculum-ordering": ordering, "curriculum-pacing": o["pacing"],
                "curriculum-a": o["a"], "curriculum-b": o["b"], **self.scoring_options(),
                "curriculum-report-score": self._stale}

    # -- selection ---------------------------------------------------------------------
    def clients_per_round(self) -> int:
        return sample_count(self.stamen_fraction_train, len(self.nodes))

    def rescore_interval(self) -> int:
        every = self.options["rescore_every"]
        return every if every > 0 else math.ceil(len(self.nodes) / self.clients_per_round())

    def _scoring_due(self, server_round: int) -> bool:
        if self.selector is None:
            return True
        return not self._stale and server_round - self.last_scoring_round >= self.rescore_interval()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        self.round_cost = {"scoring_evaluations": 0, "scoring_bytes": 0, "score_reports": 0}
        if self._client_selection:
            if self._scoring_due(server_round):
                self._scoring_round(server_round, arrays, grid)
            gen = torch.Generator().manual_seed(derive_seed(self.seed, server_round, "client-curriculum"))
            self.selected = sorted(self.selector.select(server_round, gen))
        return super().configure_train(server_round, arrays, config, grid)

    def sample_partitions(self, server_round: int, fraction: float, purpose: str = "train") -> list[int]:
        if purpose == "train" and self._client_selection:
            return list(self.selected)
        return super().sample_partitions(server_round, fraction, purpose)

    def _scoring_round(self, server_round: int, arrays: ArrayRecord, grid) -> None:
        """Every client scores the global model on its data; the selector gets the new scores."""
        config = ConfigRecord({"server-round": server_round, "query": SCORE_QUERY, **self.scoring_options()})
        content = RecordDict({P.ARRAYS: arrays, P.CONFIG: config})
        messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=nid)
                    for nid in self.nodes.values()]
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        scores = {}
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: node %s failed its scoring query: %s", server_round,
                            reply.metadata.src_node_id, reply.error.reason)
                continue
            try:
                pid = int(reply.content.config_records[P.META][P.PARTITION_ID])
                score = float(reply.content.metric_records[P.METRICS][CLIENT_SCORE])
            except (KeyError, TypeError, ValueError) as err:
                log.warning("round %d: malformed scoring reply from node %s: %s", server_round,
                            reply.metadata.src_node_id, err)
                continue
            if pid in self.nodes and math.isfinite(score):
                scores[pid] = score
        if len(scores) < self.clients_per_round():
            raise RuntimeError(f"round {server_round}: only {len(scores)} of {len(self.nodes)} clients answered the "
                               f"curriculum scoring query; {self.clients_per_round()} are needed per round")
        self._update_scores(scores)
        self.last_scoring_round = server_round
        self.round_cost["scoring_evaluations"] += len(replies)
        self.round_cost["scoring_bytes"] += (len(messages) * P.content_bytes(content)
                                             + sum(P.message_bytes(r) for r in replies))

    def _update_scores(self, scores: dict[int, float]) -> None:
        if self.selector is None:
            k = self.clients_per_round()
            o = self.options
            self.selector = ClientCurriculum(scores, ordering=o["client_ordering"], pacing=o["client_pacing"],
                                             a=o["client_a"], b=o["client_b"], total_updates=self.rounds * k,
                                             clients_per_round=k)
        else:
            self.selector.update_scores(scores)

    # -- stale scores ride on the train replies ----------------------------------------
    def decode_replies(self, server_round: int, replies: list[Message]):
        accepted = super().decode_replies(server_round, replies)
        if self._stale and self.selector is not None:
            fresh = {}
            for e in accepted:
                score = e.metrics.get(CLIENT_SCORE)
                if score is not None:
                    fresh[e.pid] = float(score)
            if fresh:
                self.selector.update_scores(fresh)
            self.round_cost["score_reports"] = len(fresh)
        return accepted

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.selector is not None:  # a resumed run may have more rounds: pace clients over the new horizon
            self.selector.total_updates = self.rounds * self.selector.clients_per_round

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        row = dict(self.round_cost)
        if self.selector is not None:
            row["client_pool"] = self.selector.pool_size(server_round)
        return row


def build_curriculum(options: CurriculumOptions, cfg) -> CurriculumStrategy:
    return CurriculumStrategy(options, rounds=cfg.run.rounds, timeout=cfg.federation.round_timeout_s)


register_strategy(StrategySpec(
    "curriculum", build_curriculum, CurriculumOptions,
    "Curricula for FL (Vahidian et al. 2023): clients train easy-to-hard paced data; curriculum client selection"))
