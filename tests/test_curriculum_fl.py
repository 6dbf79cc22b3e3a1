"""Curriculum learning in the federation: trainer, scoring query, strategy `curriculum`, task.curriculum."""

import logging
import math
import typing

import numpy as np
import pytest
import torch
from _localgrid import LocalGrid
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.nn import functional as F

from stamen import schema as P
from stamen.tasks import curriculum as C
from stamen.client.trainers import TrainJob, TrainSettings, get_trainer, train_sgd
from stamen.client.trainers_curriculum import LOCAL_MODEL_STATE, curriculum_settings, expert_model
from stamen.config import load
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
from stamen.strategies.curriculum import CurriculumOptions
from stamen.strategies.preflight import build_pipeline
from stamen.strategies.registry import StrategyConfigError
from stamen.tasks.task import get_weights, load_task

torch.set_num_threads(1)  # as the client workers do

BASE = ["federation.clients=5", "run.rounds=3", "task.local_epochs=1", "task.hidden=16"]
#: client selection by curriculum is off by default (the paper's main grid); the tests of the selector turn it on
CLIENT_CURRICULUM = ["strategy.name=curriculum", "strategy.client_curriculum=true"]


from _fakes import flower_identity  # noqa: E402,F401  (autouse fixture)


class RecordingGrid(LocalGrid):
    """LocalGrid that keeps every message it delivers and every reply (an independent record)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.log = []  # (message type, query kind, [partition ids], messages, replies)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        kind = messages[0].metadata.message_type if messages else ""
        query = messages[0].content.config_records[P.CONFIG].get("query", "") if messages else ""
        pids = sorted(self.node_ids.index(m.metadata.dst_node_id) for m in messages)
        self.log.append((kind, query, pids, messages, replies))
        return replies


def run(tmp_path, name, *overrides, grid_cls=LocalGrid):
    cfg = load(overrides=BASE + list(overrides))
    grid = grid_cls(cfg)
    out = tmp_path / name
    summary = run_federation(grid, cfg, out)
    rd = RunDirectory(out)
    return grid, rd.read_metrics(), summary, rd.load_checkpoint()


def _task(*overrides):
    return load_task(load(overrides=BASE + list(overrides)).task, 5, 0)


def _job(task, options, state=None):
    return TrainJob(options=options, state=RecordDict() if state is None else state, task=task, partition_id=0,
                    server_round=1, seed=0)


# ----------------------------------------------------------------------------- trainer


def test_vanilla_curriculum_trainer_is_sgd_bit_for_bit():
    task = _task()
    X, y = task.data.client(2)
    s = TrainSettings(epochs=3, batch_size=7, lr=0.1, momentum=0.3, proximal_mu=0.1)
    a, b = task.new_model(), task.new_model()
    la = train_sgd(a, X, y, s, torch.Generator().manual_seed(3))
    lb = get_trainer("curriculum")(b, X, y, s, torch.Generator().manual_seed(3),
                                   _job(task, {"curriculum-ordering": "vanilla", "curriculum-report-score": True}))
    assert la == lb
    for k, v in get_weights(a).items():
        assert np.array_equal(v, get_weights(b)[k]), k


class Recorder(nn.Module):
    """Wraps a model; records the inputs of every training-mode forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x):
        if self.training:
            self.batches.append(x.detach().clone())
        return self.inner(x)


def _rows(X):
    """Examples as hashable rows (a multiset comparison does not care about duplicate images)."""
    return [row.tobytes() for row in np.ascontiguousarray(X, dtype=np.float32).reshape(len(X), -1)]


@pytest.mark.parametrize("ordering", ["curriculum", "anti"])
def test_first_pass_trains_on_the_easiest_examples(ordering):
    """Oracle: per-example cross-entropy computed by hand (log-softmax of the linear layers)."""
    task = _task("task.model=logreg")
    sizes = [len(c[1]) for c in task.data.clients]
    pid = int(np.argmax(sizes))
    X, y = task.data.client(pid)
    n = len(y)
    assert n >= 160
    model = task.new_model()
    W, bias = model.linear.weight.detach().numpy().astype(np.float64), model.linear.bias.detach().numpy()
    logits = X.reshape(n, -1).astype(np.float64) @ W.T + bias
    losses = -(logits[np.arange(n), y] - np.log(np.exp(logits).sum(axis=1)))
    rec = Recorder(model)
    s = TrainSettings(epochs=1, batch_size=16, lr=0.0)  # lr 0: the model (and the losses) stay fixed
    get_trainer("curriculum")(rec, X, y, s, torch.Generator().manual_seed(0),
                              _job(task, {"curriculum-ordering": ordering, "curriculum-pacing": "linear",
                                          "curriculum-a": 0.8, "curriculum-b": 0.2}))
    first_pass = C.pacing_linear(0, math.ceil(n / 16), n, 0.8, 0.2)
    assert first_pass == max(32, int(0.2 * n))
    seen = []
    for batch in rec.batches:
        seen += _rows(batch.numpy())
        if len(seen) >= first_pass:
            break
    ranked = np.argsort(losses if ordering == "curriculum" else -losses, kind="stable")
    assert sorted(seen[:first_pass]) == sorted(_rows(X[ranked[:first_pass]]))
    assert len(rec.batches) == math.ceil(n / 16)  # T = epochs·⌈n/batch⌉ steps, paced or not


def test_local_scorer_keeps_the_trained_model_in_node_state():
    task = _task()
    X, y = task.data.client(0)
    state = RecordDict()
    model = task.new_model()
    get_trainer("curriculum")(model, X, y, TrainSettings(epochs=1, batch_size=16, lr=0.1),
                              torch.Generator().manual_seed(0),
                              _job(task, {"curriculum-ordering": "curriculum", "curriculum-scorer": "L"}, state))
    stored = P.from_array_record(state.array_records[LOCAL_MODEL_STATE])
    for k, v in get_weights(model).items():
        assert np.array_equal(stored[k], v)


def test_expert_is_deterministic_and_cached():
    from stamen.client import trainers_curriculum as TC

    task = _task()
    s = TrainSettings(epochs=1, batch_size=16, lr=0.1)
    e1 = expert_model(task, s, 2)
    assert expert_model(task, s, 2) is e1
    TC._EXPERTS.clear()
    e2 = expert_model(task, s, 2)
    assert e2 is not e1
    for k, v in get_weights(e1).items():
        assert np.array_equal(v, get_weights(e2)[k])
    # trained on all clients' data: better than the initial model on the pooled training data
    X = np.concatenate([c[0] for c in task.data.clients])
    Y = torch.as_tensor(np.concatenate([c[1] for c in task.data.clients]))
    with torch.no_grad():
        assert F.cross_entropy(e1(torch.as_tensor(X)), Y) < F.cross_entropy(task.new_model()(torch.as_tensor(X)), Y)


@pytest.mark.parametrize("options, key", [
    ({"curriculum-ordering": "easy"}, "curriculum-ordering"),
    ({"curriculum-pacing": "cubic"}, "curriculum-pacing"),
    ({"curriculum-a": 0.0}, "curriculum-a"),
    ({"curriculum-b": 1.5}, "curriculum-b"),
    ({"curriculum-scorer": "X"}, "curriculum-scorer"),
    ({"curriculum-score": "rank"}, "curriculum-score"),
    ({"curriculum-report-score": 1}, "curriculum-report-score"),
    ({"curriculum-expert-epochs": 0}, "curriculum-expert-epochs"),
])
def test_bad_trainer_entries_are_named(options, key):
    with pytest.raises(ValueError, match=key):
        curriculum_settings(options)


# ----------------------------------------------------------------------------- strategy


def test_vanilla_curriculum_strategy_is_fedavg(tmp_path, monkeypatch):
    # the curriculum trainer has no vectorised form: compare it with FedAvg's per-client loop, float for float
    monkeypatch.setenv("STAMEN_VECTORISE", "0")
    _, fedavg, _, ck_a = run(tmp_path, "a", "strategy.name=fedavg", "federation.fraction_train=0.6")
    _, cur, _, ck_b = run(tmp_path, "b", "strategy.name=curriculum", "strategy.ordering=vanilla",
                          "strategy.client_curriculum=false", "federation.fraction_train=0.6")
    for ra, rb in zip(fedavg, cur, strict=True):
        assert set(rb) - set(ra) == {"scoring_evaluations", "scoring_bytes", "score_reports"}
        assert rb["scoring_evaluations"] == rb["scoring_bytes"] == rb["score_reports"] == 0
        assert {k for k in ra if ra[k] != rb[k]} - {"wall_s"} == {"downlink_bytes"}
    for k, v in ck_a["arrays"].items():
        assert np.array_equal(v, ck_b["arrays"][k])
    # oracle for the downlink difference: the curriculum entries in each train message's config
    weights = P.to_array_record(_task().initial_weights())
    base = {"server-round": 1, "codec": "dense", P.SCHEMA: 1, P.RUN_ID: "0" * 16, P.NONCE: "0" * 32,
            P.PARTITION_ID: 0}  # as every instruction: identity entries of the same lengths
    extra = {"trainer": "curriculum", "curriculum-ordering": "vanilla", "curriculum-pacing": "linear",
             "curriculum-a": 0.8, "curriculum-b": 0.2, "curriculum-scorer": "G", "curriculum-score": "loss",
             "curriculum-expert-epochs": 20, "curriculum-report-score": False}
    per_msg = (P.content_bytes(RecordDict({P.ARRAYS: weights, P.CONFIG: ConfigRecord({**base, **extra})}))
               - P.content_bytes(RecordDict({P.ARRAYS: weights, P.CONFIG: ConfigRecord(base)})))
    for ra, rb in zip(fedavg, cur):
        assert rb["downlink_bytes"] - ra["downlink_bytes"] == ra["clients"] * per_msg


def test_defaults_are_the_papers_data_curriculum_without_client_selection(tmp_path):
    """Defaults (the authors' main grid): easy-first data with linear pacing a = 0.8, b = 0.2 scored by the global
    model; clients are sampled as under FedAvg (no client curriculum, no scoring rounds)."""
    o = build_pipeline(load(overrides=["strategy.name=curriculum"])).method.options
    assert (o.data_curriculum, o.ordering, o.pacing, o.a, o.b, o.scorer) == (True, "curriculum", "linear", 0.8, 0.2,
                                                                             "G")
    assert not o.client_curriculum and (o.client_a, o.client_b) == (0.2, 0.4)
    grid_a, _, _, _ = run(tmp_path, "a", "strategy.name=fedavg", "federation.fraction_train=0.6",
                          grid_cls=RecordingGrid)
    grid_b, rows, _, _ = run(tmp_path, "b", "strategy.name=curriculum", "federation.fraction_train=0.6",
                             grid_cls=RecordingGrid)
    assert _train_rounds(grid_a) == _train_rounds(grid_b)  # the seeded sample: the same clients as FedAvg
    assert all(r["scoring_evaluations"] == 0 and "client_pool" not in r for r in rows)
    assert not [q for _, q, _, _, _ in grid_b.log if q == "curriculum-score"]


def test_client_curriculum_with_full_participation_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="stamen.strategy"):
        run(tmp_path, "a", *CLIENT_CURRICULUM, "federation.fraction_train=1.0", "run.rounds=1")
    assert "client selection cannot change who trains" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stamen.strategy"):
        run(tmp_path, "b", *CLIENT_CURRICULUM, "federation.fraction_train=0.4", "run.rounds=1")
    assert "client selection cannot change who trains" not in caplog.text


def _train_rounds(grid):
    return [pids for kind, _, pids, _, _ in grid.log if kind == "train"]


def test_full_pool_selects_every_client_once_per_pass(tmp_path):
    grid, rows, _, _ = run(tmp_path, "a", "federation.clients=8", "federation.fraction_train=0.25", "run.rounds=8",
                           *CLIENT_CURRICULUM, "strategy.client_b=1.0", "strategy.data_curriculum=false",
                           grid_cls=RecordingGrid)
    rounds = _train_rounds(grid)
    assert [len(r) for r in rounds] == [2] * 8
    assert sorted(sum(rounds[:4], [])) == list(range(8))  # first pass: everyone once
    assert sorted(sum(rounds[4:], [])) == list(range(8))  # second pass: everyone once again
    assert all(r["client_pool"] == 8 for r in rows)


def test_first_rounds_pick_the_easiest_clients(tmp_path):
    """Oracle: each client's mean loss under the initial global model, computed independently."""
    cfg = load(overrides=BASE + ["federation.clients=8"])
    task = load_task(cfg.task, 8, 0)
    model = task.new_model()
    with torch.no_grad():
        mean_loss = [float(F.cross_entropy(model(torch.as_tensor(X)), torch.as_tensor(y)))
                     for X, y in task.data.clients]
    grid, rows, _, _ = run(tmp_path, "a", "federation.clients=8", "federation.fraction_train=0.25", "run.rounds=2",
                           *CLIENT_CURRICULUM, "strategy.client_b=0.4", grid_cls=RecordingGrid)
    pool = C.pacing_linear(0, 2 * 2, 8, 0.2, 0.4, min_count=2)
    assert rows[0]["client_pool"] == pool == 3
    easiest = set(np.argsort(mean_loss, kind="stable")[:pool].tolist())
    assert set(_train_rounds(grid)[0]) <= easiest
    # anti-curriculum: from the hardest
    grid, _, _, _ = run(tmp_path, "b", "federation.clients=8", "federation.fraction_train=0.25", "run.rounds=1",
                        *CLIENT_CURRICULUM, "strategy.client_ordering=anti", grid_cls=RecordingGrid)
    hardest = set(np.argsort(-np.array(mean_loss), kind="stable")[:pool].tolist())
    assert set(_train_rounds(grid)[0]) <= hardest


def test_scoring_rounds_are_counted(tmp_path):
    grid, rows, _, _ = run(tmp_path, "a", "federation.clients=6", "federation.fraction_train=0.5", "run.rounds=4",
                           *CLIENT_CURRICULUM, "strategy.rescore_every=2", grid_cls=RecordingGrid)
    queries = [(msgs, replies) for kind, q, _, msgs, replies in grid.log if q == "curriculum-score"]
    assert len(queries) == 2  # rounds 1 and 3
    assert [r["scoring_evaluations"] for r in rows] == [6, 0, 6, 0]
    for (msgs, replies), row in zip(queries, [rows[0], rows[2]]):
        assert len(msgs) == 6 and all(r.content.metric_records[P.METRICS]["client-score"] > 0 for r in replies)
        assert row["scoring_bytes"] == sum(P.content_bytes(m.content) + P.content_bytes(r.content)
                                           for m, r in zip(msgs, replies))
    assert rows[1]["scoring_bytes"] == rows[3]["scoring_bytes"] == 0
    # default: one scoring round per pass, ceil(N/K) = 2 rounds here as well
    grid, rows, _, _ = run(tmp_path, "b", "federation.clients=6", "federation.fraction_train=0.5", "run.rounds=4",
                           *CLIENT_CURRICULUM, grid_cls=RecordingGrid)
    assert [r["scoring_evaluations"] for r in rows] == [6, 0, 6, 0]


def test_stale_scores_ride_on_train_replies(tmp_path):
    grid, rows, _, _ = run(tmp_path, "a", "federation.clients=6", "federation.fraction_train=0.5", "run.rounds=3",
                           *CLIENT_CURRICULUM, "strategy.client_scoring=stale", grid_cls=RecordingGrid)
    assert [r["scoring_evaluations"] for r in rows] == [6, 0, 0]  # only the initial scoring round
    assert [r["score_reports"] for r in rows] == [3, 3, 3]
    train_replies = [replies for kind, _, _, _, replies in grid.log if kind == "train"]
    assert all("client-score" in r.content.metric_records[P.METRICS] for rs in train_replies for r in rs)


def test_curriculum_strategy_resumes_exactly(tmp_path):
    """A run stopped after round 2 and resumed equals the uninterrupted run (selector state is checkpointed)."""
    common = ["federation.fraction_train=0.4", *CLIENT_CURRICULUM, "strategy.client_scoring=stale",
              "run.rounds=4"]
    _, full, _, _ = run(tmp_path, "full", *common)
    cfg = load(overrides=BASE + common)

    def crash(row):
        if row["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_federation(LocalGrid(cfg), cfg, tmp_path / "part", on_round=crash)
    run_federation(LocalGrid(cfg), cfg, tmp_path / "part", resume=True)
    part = RunDirectory(tmp_path / "part").read_metrics()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(part) == strip(full)


def test_task_curriculum_works_under_other_strategies(tmp_path):
    _, plain, _, _ = run(tmp_path, "a", "strategy.name=fedprox", "run.rounds=2")
    _, ordered, _, _ = run(tmp_path, "b", "strategy.name=fedprox", "run.rounds=2", "task.curriculum=curriculum",
                           "task.curriculum_b=0.3")
    assert plain[0]["downlink_bytes"] == ordered[0]["downlink_bytes"]  # nothing extra travels
    assert plain[-1]["train_loss"] != ordered[-1]["train_loss"]
    # a strategy that names its own trainer wins: fat with ε = 0 is unaffected by task.curriculum
    _, fat, _, _ = run(tmp_path, "c", "strategy.name=fat", "strategy.eps=0", "eval.robust=false", "run.rounds=2")
    _, fat_cur, _, _ = run(tmp_path, "d", "strategy.name=fat", "strategy.eps=0", "eval.robust=false", "run.rounds=2",
                           "task.curriculum=curriculum")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(fat) == strip(fat_cur)


@pytest.mark.parametrize("key, value", [("client_b", 0), ("a", 1.5), ("ordering", "easy"), ("pacing", "cubic"),
                                        ("client_scoring", "never"), ("scorer", "X"), ("rescore_every", -1),
                                        ("clients", 3)])
def test_bad_strategy_options_are_named(key, value):
    with pytest.raises(StrategyConfigError, match=f"strategy.{key}"):
        build_pipeline(load(overrides=["strategy.name=curriculum", f"strategy.{key}={value}"]))


def test_option_vocabularies_match_the_client_module():
    fields = CurriculumOptions.model_fields
    assert set(typing.get_args(fields["ordering"].annotation)) == set(C.ORDERINGS)
    assert set(typing.get_args(fields["pacing"].annotation)) == set(C.PACING)
    assert set(typing.get_args(fields["scorer"].annotation)) == set(C.SCORE_KINDS)
    assert all(f.description for f in fields.values())
    from stamen.config import TaskSection

    assert set(typing.get_args(TaskSection.model_fields["curriculum_pacing"].annotation)) == set(C.PACING)


@pytest.mark.slow
def test_scoring_queries_and_local_state_under_ray_match_in_process(tmp_path):
    """The real engine delivers the scoring queries and keeps node state (scorer L): same metrics as in process."""
    from stamen.experiment import simulate
    from stamen.server.inprocess_grid import InProcessGrid

    cfg = load(overrides=BASE + ["federation.clients=4", "federation.fraction_train=0.5", "run.rounds=3",
                                 *CLIENT_CURRICULUM, "strategy.scorer=LG", "strategy.rescore_every=2"])
    simulate(cfg, tmp_path / "ray")
    run_federation(InProcessGrid(cfg), cfg, tmp_path / "inproc")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    ray_rows = RunDirectory(tmp_path / "ray").read_metrics()
    assert [r["scoring_evaluations"] for r in ray_rows] == [4, 0, 4]
    assert strip(ray_rows) == strip(RunDirectory(tmp_path / "inproc").read_metrics())
