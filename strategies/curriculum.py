"""Strategy ``curriculum``: curricula for data and for clients (Vahidian, Kadaveru, Baek, Wang,
Kungurtsev, Chen, Bhatti, Chen, "When Do Curricula Work in Federated Learning?", ICCV 2023).

Server duty: FedAvg aggregation, plus, when ``client_curriculum = true`` (off by default),
**client selection by curriculum**:
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

**Defaults and the paper** (the authors' code, sreevatsank1999/Curriculum-FL,
``automation/run_experiments-byobu.sh``: the main grid over data orderings and Dirichlet β).
The data curriculum is the method: ordering ``curriculum`` (easy first), ``linear`` pacing with
a = 0.8, b = 0.2, scores of the global model (``G``), as the grid runs it. Client curriculum is
**off** by default (``client_curriculum = false``): the main grid runs client ordering ``rand``
with ``step`` pacing a = b = 1 (every client eligible, i.e. plain sampling), and the
client-curriculum experiments use partial participation (10 of 100 clients per round) under
strong label skew (Dirichlet 0.05); when switched on, the client pacing defaults are those
(``client_a`` = 0.2, ``client_b`` = 0.4, ``fedavg_curr.sh``). With ``federation.fraction_train
= 1`` every client trains every round, so client selection is meaningless (the pool never
drops below one round's cohort) and only its scoring rounds cost; the strategy logs a warning
then. The authors' clients run 10 local epochs (batch 10, SGD lr 0.01, momentum 0.9); Stamen
uses the run's ``task.*`` settings, which is why the data pacing sees fewer steps
(RESULTS.md, "Method fidelity").

To use the data curriculum under another strategy, set ``task.curriculum`` (and
``task.curriculum_pacing`` / ``_a`` / ``_b`` / ``_scorer``) instead: the ClientApp then uses the
curriculum trainer whenever the strategy asks for no trainer of its own.

Client selection reuses :class:`ClientCurriculum` from ``tasks/curriculum.py`` (pure code both
sides share: pacing functions, orderings, scorers). Under differential privacy client selection
by curriculum is refused before the run starts (the scores are an unprivatized release of
client data); the data curriculum alone (``client_curriculum = false``) is allowed.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from stamen import schema as S
from stamen.core import Capabilities, derive_seed
from stamen.schema import query as Q
from stamen.schema import train as T
from stamen.strategies.method import FLOWER_NO_SAMPLING, UpdateMethod
from stamen.strategies.registry import Options, StrategySpec, register_strategy
from stamen.strategies.sampling import sample_count
from stamen.tasks.curriculum import ClientCurriculum

log = logging.getLogger("stamen.strategy")

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
    client_curriculum: bool = Field(False, description="select clients by curriculum (else seeded uniform "
                                    "sampling, as the paper's main grid); useful only with fraction_train < 1")
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


_NOTES = {"selection": "curriculum client selection orders clients by the losses they report",
          "selection_fix": "set strategy.client_curriculum=false to keep the data curriculum, which stays on each "
                           "client, or turn privacy off"}


class CurriculumMethod(UpdateMethod):
    """FedAvg + curriculum data ordering on the clients + curriculum client selection."""

    def __init__(self, options: CurriculumOptions, *, rounds: int, codec: str, codec_options: dict):
        super().__init__(FedAvg(**FLOWER_NO_SAMPLING), codec=codec, codec_options=codec_options)
        self.options = options
        self.rounds = int(rounds)
        self.selector: ClientCurriculum | None = None
        self.last_scoring_round = 0
        self.selected: list[int] = []
        self.round_cost = {"scoring_evaluations": 0, "scoring_bytes": 0, "score_reports": 0}

    @property
    def capabilities(self) -> Capabilities:
        o = self.options
        trainer = "curriculum" if (o.data_curriculum or self._stale) else "sgd"
        if not o.client_curriculum:
            return Capabilities(aggregation="update", trainer=trainer)
        return Capabilities(aggregation="update", trainer=trainer, selection="data_dependent", notes=_NOTES)

    @property
    def _stale(self) -> bool:
        return self.options.client_curriculum and self.options.client_scoring == "stale"

    def scoring_options(self) -> dict[str, Any]:
        o = self.options
        return {T.CURRICULUM_SCORER: o.scorer, T.CURRICULUM_SCORE: o.score,
                T.CURRICULUM_EXPERT_EPOCHS: o.expert_epochs}

    def instructions(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        base = super().instructions(server_round, arrays)
        o = self.options
        if not o.data_curriculum and not self._stale:
            return base  # plain sgd clients
        return {**base, T.TRAINER: "curriculum", T.CURRICULUM_ORDERING: o.ordering if o.data_curriculum else "vanilla",
                T.CURRICULUM_PACING: o.pacing, T.CURRICULUM_A: o.a, T.CURRICULUM_B: o.b, **self.scoring_options(),
                T.CURRICULUM_REPORT_SCORE: self._stale}

    # -- selection -------------------------------------------------------------------------
    def clients_per_round(self) -> int:
        return sample_count(self.run.fraction_train, len(self.run.nodes))

    def rescore_interval(self) -> int:
        every = self.options.rescore_every
        return every if every > 0 else math.ceil(len(self.run.nodes) / self.clients_per_round())

    def _scoring_due(self, server_round: int) -> bool:
        if self.selector is None:
            return True
        return not self._stale and server_round - self.last_scoring_round >= self.rescore_interval()

    def before_round(self, server_round: int, arrays: ArrayRecord) -> None:
        self.round_cost = {"scoring_evaluations": 0, "scoring_bytes": 0, "score_reports": 0}
        if not self.options.client_curriculum:
            return
        if self.selector is None and self.clients_per_round() >= len(self.run.nodes):
            log.warning("strategy.client_curriculum=true with every client training every round "
                        "(federation.fraction_train=%s): client selection cannot change who trains, only its scoring "
                        "rounds cost; set federation.fraction_train below 1 (the paper: 10 of 100 clients per round) "
                        "or strategy.client_curriculum=false", self.run.fraction_train)
        if self._scoring_due(server_round):
            self._scoring_round(server_round, arrays)
        gen = torch.Generator().manual_seed(derive_seed(self.run.seed, server_round, "client-curriculum"))
        self.selected = sorted(self.selector.select(server_round, gen))

    def select(self, server_round: int, sampled: list[int]) -> list[int]:
        return list(self.selected) if self.options.client_curriculum else sampled

    def _scoring_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Every client scores the global model on its data; the selector gets the new scores."""
        extra = {Q.QUERY: Q.CURRICULUM_SCORE_QUERY, **self.scoring_options()}
        done = self.run.exchange(
            "curriculum-score", server_round, sorted(self.run.nodes),
            lambda identity: RecordDict({S.ARRAYS: arrays, S.CONFIG: ConfigRecord({**extra, **identity})}),
            MessageType.QUERY, required_metrics=(T.CLIENT_SCORE,))
        scores = {r.pid: float(r.metrics[T.CLIENT_SCORE]) for r in done.verdict.accepted}
        if len(scores) < self.clients_per_round():
            raise RuntimeError(f"round {server_round}: only {len(scores)} of {len(self.run.nodes)} clients answered "
                               f"the curriculum scoring query validly; {self.clients_per_round()} are needed per round")
        self._update_scores(scores)
        self.last_scoring_round = server_round
        self.round_cost["scoring_evaluations"] += done.messages
        self.round_cost["scoring_bytes"] += done.downlink_bytes + done.uplink_bytes

    def _new_selector(self, scores: dict[int, float]) -> ClientCurriculum:
        o, k = self.options, self.clients_per_round()
        return ClientCurriculum(scores, ordering=o.client_ordering, pacing=o.client_pacing, a=o.client_a,
                                b=o.client_b, total_updates=self.rounds * k, clients_per_round=k)

    def _update_scores(self, scores: dict[int, float]) -> None:
        if self.selector is None:
            self.selector = self._new_selector(scores)
        else:
            self.selector.update_scores(scores)

    # -- stale scores ride on the train replies ----------------------------------------------
    def after_round(self, server_round: int, accepted: list, stepped) -> None:
        if self._stale and self.selector is not None:
            fresh = {r.pid: float(r.metrics[T.CLIENT_SCORE]) for r in accepted if T.CLIENT_SCORE in r.metrics}
            if fresh:
                self.selector.update_scores(fresh)
            self.round_cost["score_reports"] = len(fresh)

    # -- records ------------------------------------------------------------------------------
    def round_metrics(self, server_round: int) -> dict[str, Any]:
        row = dict(self.round_cost)
        if self.selector is not None:
            row["client_pool"] = self.selector.pool_size(server_round)
        return row

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_scoring_round": self.last_scoring_round,
                "selector": None if self.selector is None else self.selector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.last_scoring_round = int(state["last_scoring_round"])
        if state["selector"] is not None:  # a resumed run may have more rounds: pace clients over the new horizon
            self.selector = self._new_selector(dict(state["selector"]["scores"]))
            self.selector.load_state_dict(state["selector"])


def build_curriculum(options: CurriculumOptions, cfg) -> CurriculumMethod:
    return CurriculumMethod(options, rounds=cfg.run.rounds, codec=cfg.compression.codec,
                            codec_options=cfg.compression.options())


register_strategy(StrategySpec(
    "curriculum", build_curriculum, CurriculumOptions,
    "Curricula for FL (Vahidian et al. 2023): clients train easy-to-hard paced data; curriculum client selection",
    Capabilities(aggregation="update", trainer="curriculum", selection="data_dependent", notes=_NOTES)))
