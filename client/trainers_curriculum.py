"""Trainer ``curriculum`` and the ``curriculum-score`` query (Vahidian et al.,
"When Do Curricula Work in Federated Learning?", ICCV 2023).

The trainer scores the client's examples, orders them, and trains on the paced prefix:

1. **score** (when the ordering needs it, or the strategy asks for the client's score):
   per-example cross-entropy (or 0/1 misclassification) under ``G`` — the model as received —,
   ``L`` — this node's model from its last participation, kept in the node's persistent
   state (falls back to G) —, ``LG`` (both summed) or ``E`` — an expert trained centrally on
   all clients' training data, built deterministically and cached per process (an oracle
   for studies);
2. **order**: ``curriculum`` (easy first), ``anti`` (hard first), ``random``, ``vanilla`` (identity);
3. **pace**: ``paced_batches`` over T = epochs·⌈n/batch⌉ steps with the named pacing (a, b):
   g(t) is the share of the ordered data in use at step t, from b at t = 0 to all of it at
   t = a·T (the paper's pacing functions; its main grid: linear, a = 0.8, b = 0.2, the
   ``curriculum`` strategy's defaults).
   ``vanilla`` paces with ``step`` a = b = 1 (all data from step 0), which draws exactly the
   batches of the ``sgd`` trainer from the same generator, so it trains bit for bit as ``sgd``.

Options, from the round's message config (the ``curriculum`` strategy sends them; under any
other strategy the run config's ``task.curriculum*`` keys supply them, see
:func:`task_curriculum_options`):

=============================  ==============================================================
``curriculum-ordering``        curriculum | anti | random | vanilla (default vanilla)
``curriculum-pacing``          linear | quad | root | exp | log | step (default linear)
``curriculum-a``, ``-b``       pacing a (fraction of T until all data is in), b (start fraction)
``curriculum-scorer``          G | L | LG | E (default G)
``curriculum-score``           loss | misclassification (default loss)
``curriculum-report-score``    send the client's mean example score back as ``client-score``
``curriculum-expert-epochs``   epochs of the central expert model (scorer E; default 20)
=============================  ==============================================================

The ``curriculum-score`` query (registered in ``stamen.client.app.QUERIES``) is a scoring
round's client side: set the global weights, score the node's data with the scorer, reply
with ``client-score`` (the mean) and ``num-examples``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from stamen import schema as P
from stamen.schema import query as Q
from stamen.schema import train as T
from stamen.tasks.curriculum import (
    ORDERINGS,
    PACING,
    SCORE_KINDS,
    SCORERS,
    client_score,
    order_examples,
    paced_batches,
    pacing_schedule,
    score_examples,
    total_local_steps,
)
from stamen.client.trainers import TrainJob, TrainSettings, register_trainer, run_local_steps, train_sgd
from stamen.core import derive_seed
from stamen.tasks.task import get_weights, set_weights

SCORE_QUERY = Q.CURRICULUM_SCORE_QUERY
CLIENT_SCORE = T.CLIENT_SCORE  # reply metric: the client's mean example score
LOCAL_MODEL_STATE = "curriculum-local-model"  # node state: weights after its last local training
SCORE_BATCH = 256


@dataclass(frozen=True)
class CurriculumSettings:
    ordering: str = "vanilla"
    pacing: str = "linear"
    a: float = 0.8
    b: float = 0.2
    scorer: str = "G"
    score: str = "loss"
    report_score: bool = False
    expert_epochs: int = 20


def _choice(options: dict, key: str, valid, default: str) -> str:
    value = options.get(key, default)
    if value not in valid:
        raise ValueError(f"config entry {key!r} must be one of {list(valid)}, got {value!r}")
    return value


def _fraction(options: dict, key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"config entry {key!r} must be a number in (0, 1], got {value!r}")
    return float(value)


def curriculum_settings(options: dict) -> CurriculumSettings:
    """Validate a message config's ``curriculum-*`` entries (a bad one raises naming the key)."""
    report = options.get(T.CURRICULUM_REPORT_SCORE, False)
    if not isinstance(report, bool):
        raise ValueError(f"config entry 'curriculum-report-score' must be a bool, got {report!r}")
    epochs = options.get(T.CURRICULUM_EXPERT_EPOCHS, 20)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"config entry 'curriculum-expert-epochs' must be an int >= 1, got {epochs!r}")
    return CurriculumSettings(
        ordering=_choice(options, T.CURRICULUM_ORDERING, ORDERINGS, "vanilla"),
        pacing=_choice(options, T.CURRICULUM_PACING, tuple(PACING), "linear"),
        a=_fraction(options, T.CURRICULUM_A, 0.8),
        b=_fraction(options, T.CURRICULUM_B, 0.2),
        scorer=_choice(options, T.CURRICULUM_SCORER, SCORE_KINDS, "G"),
        score=_choice(options, T.CURRICULUM_SCORE, SCORERS, "loss"),
        report_score=report,
        expert_epochs=epochs,
    )


def task_curriculum_options(task_cfg) -> dict:
    """Message-config entries for the data curriculum set in the run config's ``task.curriculum*`` keys.

    ``client/app.py`` merges them into a train message that names no trainer, so the data
    curriculum works under FedAvg, FedProx, FedAdam, … without a strategy of its own.
    """
    return {T.TRAINER: "curriculum", T.CURRICULUM_ORDERING: task_cfg.curriculum,
            T.CURRICULUM_PACING: task_cfg.curriculum_pacing, T.CURRICULUM_A: task_cfg.curriculum_a,
            T.CURRICULUM_B: task_cfg.curriculum_b, T.CURRICULUM_SCORER: task_cfg.curriculum_scorer}


# --------------------------------------------------------------------------- scoring models

_EXPERTS: dict[tuple, nn.Module] = {}


def _data_digest(clients) -> str:
    h = hashlib.sha256()
    for X, y in clients:
        h.update(np.ascontiguousarray(X).tobytes())
        h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()


def expert_model(task, settings: TrainSettings, epochs: int) -> nn.Module:
    """A model trained centrally on all clients' training data (scorer E), cached per process.

    Deterministic: the task's initial weights, the task's optimizer settings, ``epochs`` passes
    with batches from a generator derived from (run seed, "curriculum-expert").
    """
    s = replace(settings, epochs=epochs, proximal_mu=0.0)
    key = (_data_digest(task.data.clients), task.model_name, task.hidden, task.seed, s)
    if key not in _EXPERTS:
        X = np.concatenate([x for x, _ in task.data.clients])
        y = np.concatenate([t for _, t in task.data.clients])
        model = task.new_model()
        gen = torch.Generator().manual_seed(derive_seed(task.seed, "curriculum-expert"))
        train_sgd(model, X, y, s, gen)
        model.eval()
        _EXPERTS.clear()  # one task per process at a time
        _EXPERTS[key] = model
    return _EXPERTS[key]


def local_model(job: TrainJob, device: str) -> nn.Module | None:
    """This node's model from its last participation (None if it never trained)."""
    record = job.state.array_records.get(LOCAL_MODEL_STATE) if job.state is not None else None
    if record is None:
        return None
    model = job.task.new_model()
    set_weights(model, P.from_array_record(record))
    return model.to(device)


def example_scores(model: nn.Module, X, y, c: CurriculumSettings, job: TrainJob,
                   settings: TrainSettings) -> torch.Tensor:
    """Difficulty of each of the node's examples under the configured scorer (``model`` = G)."""
    local = local_model(job, settings.device) if c.scorer in ("L", "LG") else None
    expert = expert_model(job.task, settings, c.expert_epochs) if c.scorer == "E" else None
    return score_examples(c.scorer, model, local, expert, X, y, batch_size=SCORE_BATCH, scorer=c.score)


# --------------------------------------------------------------------------- trainer


@register_trainer("curriculum")
def train_curriculum(model: nn.Module, X: np.ndarray, y: np.ndarray, s: TrainSettings,
                     generator: torch.Generator, job: TrainJob) -> tuple[float, int]:
    """Score, order, pace, then mini-batch training as ``sgd``; returns (mean train loss, steps)."""
    c = curriculum_settings(job.options)
    n = len(y)
    T = total_local_steps(n, s.batch_size, s.epochs)
    model.to(s.device)
    scores = None
    if c.ordering in ("curriculum", "anti") or c.report_score:
        scores = example_scores(model, X, y, c, job, s)  # G = the model as received
        if c.report_score:
            job.metrics[CLIENT_SCORE] = client_score(scores)
    if c.ordering == "vanilla":
        order, pace = torch.arange(n), pacing_schedule("step", total_steps=T, n=n, a=1.0, b=1.0)
    else:
        order_gen = torch.Generator().manual_seed(derive_seed(job.seed, job.server_round, "curriculum-order",
                                                              job.partition_id))
        order = order_examples(scores if scores is not None else torch.zeros(n), c.ordering, order_gen)
        pace = pacing_schedule(c.pacing, total_steps=T, n=n, a=c.a, b=c.b)

    # with vanilla pacing the batches are epoch_batches' batches, so this is train_sgd exactly
    result = run_local_steps(model, X, y, s, paced_batches(order, pace, T, s.batch_size, generator))
    if c.scorer in ("L", "LG") and job.state is not None:
        job.state[LOCAL_MODEL_STATE] = P.to_array_record(get_weights(model))
    return result


# --------------------------------------------------------------------------- scoring query


def handle_score_query(cfg, msg: Message, context: Context) -> RecordDict:
    """A scoring round's client side: the node's mean example score under the global model (and scorer)."""
    from stamen.client.app import _partition_id, _worker

    w = _worker(cfg)
    pid = _partition_id(context)
    X, y = w.task.data.client(pid)
    config = dict(msg.content.config_records[P.CONFIG])
    c = curriculum_settings(config)
    set_weights(w.model, P.from_array_record(msg.content.array_records[P.ARRAYS]))
    job = TrainJob(options=config, state=context.state, task=w.task, partition_id=pid,
                   server_round=int(config.get(P.SERVER_ROUND, 0)), seed=cfg.run.seed)
    scores = example_scores(w.model, X, y, c, job, TrainSettings.from_task(cfg.task, w.device))
    score = client_score(scores)
    if not math.isfinite(score):
        raise ValueError(f"partition {pid}: its curriculum score is not finite ({score})")
    metrics = MetricRecord({P.NUM_EXAMPLES: len(y), CLIENT_SCORE: score})
    return RecordDict({P.METRICS: metrics})  # handle_query adds the identity meta


def _register_query() -> None:
    from stamen.client.app import QUERIES

    QUERIES[SCORE_QUERY] = handle_score_query


_register_query()
