"""StamenStrategy's reply handling and sampling, with hand-made Flower messages."""

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from stamen import protocol as P
from stamen.config import load
from stamen.strategies.base import sample_count
from stamen.strategies.registry import StrategyConfigError, build_strategy

from _fakes import LAYOUT, NODES, bound_strategy, configure, flower_identity, global_weights, reply_to  # noqa: F401


def test_fedavg_of_decoded_updates_matches_numpy_weighted_mean():
    s = bound_strategy()
    msgs = configure(s)
    assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(NODES.values())
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=LAYOUT.d).astype(np.float32) for _ in msgs]
    ns = [10, 20, 30, 40]
    arrays, metrics = s.aggregate_train(1, [reply_to(m, d, n) for m, d, n in zip(msgs, deltas, ns)])
    g = LAYOUT.flatten(global_weights()).numpy()
    expected = g + sum(n * d for n, d in zip(ns, deltas)) / sum(ns)
    got = LAYOUT.flatten(P.from_array_record(arrays)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert s.last_rejected == [] and s.last_participants == [0, 1, 2, 3]


def test_aggregation_does_not_depend_on_arrival_order():
    s = bound_strategy()
    msgs = configure(s)
    rng = np.random.default_rng(1)
    replies = [reply_to(m, rng.normal(size=LAYOUT.d), 7 + i) for i, m in enumerate(msgs)]
    a, _ = s.aggregate_train(1, replies)
    configure(s)
    b, _ = s.aggregate_train(1, replies[::-1])
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy())


@pytest.mark.parametrize("defect, reason", [
    ("nan", "NaN"),
    ("codec", "codec"),
    ("shape", "shape"),
    ("examples", "num-examples"),
    ("partition", "partition-id"),
    ("missing", "lacks"),
])
def test_bad_replies_are_rejected_and_the_round_goes_on(defect, reason):
    s = bound_strategy()
    msgs = configure(s)
    good = [reply_to(m, np.ones(LAYOUT.d), 5) for m in msgs[1:]]
    m0 = msgs[0]
    bad = {
        "nan": lambda: reply_to(m0, np.full(LAYOUT.d, np.nan), 5),
        "codec": lambda: reply_to(m0, np.ones(LAYOUT.d), 5, codec="topk"),
        "shape": lambda: reply_to(m0, np.ones(LAYOUT.d + 1), 5),
        "examples": lambda: reply_to(m0, np.ones(LAYOUT.d), 0),
        "partition": lambda: reply_to(m0, np.ones(LAYOUT.d), 5, pid=99),
        "missing": lambda: Message(content=RecordDict({P.METRICS: P.train_reply({}, {}, "dense", 0)[P.METRICS]}),
                                   reply_to=m0),
    }[defect]()
    arrays, _ = s.aggregate_train(1, [bad] + good)
    assert len(s.last_rejected) == 1 and reason in s.last_rejected[0][1]
    expected = LAYOUT.flatten(global_weights()).numpy() + 1.0
    np.testing.assert_allclose(LAYOUT.flatten(P.from_array_record(arrays)).numpy(), expected, rtol=1e-6)


def test_all_replies_bad_leaves_model_unchanged():
    s = bound_strategy()
    msgs = configure(s)
    arrays, metrics = s.aggregate_train(1, [reply_to(m, np.full(LAYOUT.d, np.inf), 5) for m in msgs])
    assert arrays is None and metrics is None and len(s.last_rejected) == len(msgs)


def test_fedprox_sends_mu_to_clients():
    s = bound_strategy("fedprox", proximal_mu=0.7)
    msg = configure(s)[0]
    assert msg.content.config_records[P.CONFIG]["proximal-mu"] == 0.7


def test_unknown_strategy_option_is_named():
    with pytest.raises(StrategyConfigError, match="strategy.mu"):
        build_strategy(load(overrides=["strategy.name=fedprox", "strategy.mu=1"]))


def test_sampling_is_seeded_and_takes_the_fraction():
    s = bound_strategy()
    a = s.sample_partitions(3, 0.5)
    assert len(a) == sample_count(0.5, 4) == 2 and a == s.sample_partitions(3, 0.5)
    rounds = {tuple(s.sample_partitions(r, 0.5)) for r in range(1, 30)}
    assert len(rounds) > 1
    assert sample_count(0.1, 30) == 3 and sample_count(0.01, 30) == 1 and sample_count(1.0, 7) == 7


def test_state_dict_round_trip_keeps_server_optimizer_state():
    s = bound_strategy("fedadam")
    msgs = configure(s)
    s.aggregate_train(1, [reply_to(m, np.ones(LAYOUT.d), 5) for m in msgs])
    state = s.state_dict()
    t = bound_strategy("fedadam")
    t.load_state_dict(state)
    for k in s.m_t:
        assert np.array_equal(s.m_t[k], t.m_t[k]) and np.array_equal(s.v_t[k], t.v_t[k])
