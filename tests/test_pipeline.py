"""The round pipeline with hand-made Flower messages: aggregation, acceptance (every reply bound
to the instruction the server issued), sampling, state."""

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from stamen import schema as P
from stamen.config import load
from stamen.strategies.pipeline import ForeignClientError
from stamen.strategies.preflight import build_pipeline
from stamen.strategies.registry import StrategyConfigError
from stamen.strategies.sampling import sample_count, seeded_sample

from _fakes import BOUND, LAYOUT, NODES, bound_strategy, configure, flower_identity, global_weights, reply_to  # noqa: F401


def flat(arrays):
    return LAYOUT.flatten(P.from_array_record(arrays)).numpy()


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
    np.testing.assert_allclose(flat(arrays), expected, rtol=1e-5, atol=1e-6)
    assert s.last_rejected == [] and s.last_participants == [0, 1, 2, 3]
    assert metrics["train_loss"] == pytest.approx(1.0)


def test_every_instruction_carries_its_own_identity():
    s = bound_strategy()
    msgs = configure(s, rnd=3)
    configs = [dict(m.content.config_records[P.CONFIG]) for m in msgs]
    assert {c[P.RUN_ID] for c in configs} == {"test-run"} and {c[P.SERVER_ROUND] for c in configs} == {3}
    assert sorted(c[P.PARTITION_ID] for c in configs) == [0, 1, 2, 3]
    assert len({c[P.NONCE] for c in configs}) == 4  # one fresh nonce per instruction
    for m, c in zip(msgs, configs):
        assert NODES[c[P.PARTITION_ID]] == m.metadata.dst_node_id


def test_aggregation_does_not_depend_on_arrival_order():
    s = bound_strategy()
    msgs = configure(s)
    rng = np.random.default_rng(1)
    replies = [reply_to(m, rng.normal(size=LAYOUT.d), 7 + i) for i, m in enumerate(msgs)]
    a, _ = s.aggregate_train(1, replies)
    b, _ = s.aggregate_train(1, replies[::-1])
    assert np.array_equal(flat(a), flat(b))


def _other(msgs, m0):
    return next(m for m in msgs if m is not m0)


@pytest.mark.parametrize("defect, code", [
    ("nan", "payload"),
    ("codec", "codec"),
    ("shape", "payload"),
    ("examples", "num-examples"),
    ("inflated", "num-examples"),
    ("partition", "wrong-partition"),
    ("missing", "not-stamen"),
    ("round", "wrong-round"),
    ("run", "wrong-run"),
    ("nonce", "unknown-instruction"),
    ("schema", "schema"),
    ("metric", "metrics"),
])
def test_bad_replies_are_rejected_with_their_reason_and_the_round_goes_on(defect, code):
    s = bound_strategy()
    msgs = configure(s)
    good = [reply_to(m, np.ones(LAYOUT.d), 5) for m in msgs[1:]]
    m0 = msgs[0]
    bad = {
        "nan": lambda: reply_to(m0, np.full(LAYOUT.d, np.nan), 5),
        "codec": lambda: reply_to(m0, np.ones(LAYOUT.d), 5, codec="topk"),
        "shape": lambda: reply_to(m0, np.ones(LAYOUT.d + 1), 5),
        "examples": lambda: reply_to(m0, np.ones(LAYOUT.d), 0),
        "inflated": lambda: reply_to(m0, np.ones(LAYOUT.d), 1e12),
        "partition": lambda: None,  # built below
        "missing": lambda: Message(content=RecordDict({P.METRICS: reply_to(m0, [], 1).content[P.METRICS]}),
                                   reply_to=m0),
        "round": lambda: reply_to(m0, np.ones(LAYOUT.d), 5, meta={P.SERVER_ROUND: 0}),
        "run": lambda: reply_to(m0, np.ones(LAYOUT.d), 5, meta={P.RUN_ID: "another-run"}),
        "nonce": lambda: reply_to(m0, np.ones(LAYOUT.d), 5, meta={P.NONCE: "0" * 32}),
        "schema": lambda: reply_to(m0, np.ones(LAYOUT.d), 5, meta={P.SCHEMA: 99}),
        "metric": lambda: reply_to(m0, np.ones(LAYOUT.d), 5, metrics={"train_loss": float("inf")}),
    }[defect]()
    if defect == "partition":  # a partition the instruction was not for
        m0_pid = dict(m0.content.config_records[P.CONFIG])[P.PARTITION_ID]
        bad = reply_to(m0, np.ones(LAYOUT.d), 5, pid=(m0_pid + 1) % 4)
    arrays, _ = s.aggregate_train(1, [bad] + good)
    assert [c for _, c, _ in s.last_rejected] == [code] and s.last_reasons == {code: 1}
    np.testing.assert_allclose(flat(arrays), LAYOUT.flatten(global_weights()).numpy() + 1.0, rtol=1e-6)


def test_a_node_cannot_answer_for_another_partition_nor_knock_out_the_victim():
    """The forged reply (node A's instruction, partition B claimed) is rejected; B's own reply counts."""
    s = bound_strategy()
    msgs = configure(s)
    pid_of = {m.metadata.dst_node_id: dict(m.content.config_records[P.CONFIG])[P.PARTITION_ID] for m in msgs}
    attacker, victim = msgs[0], msgs[1]
    forged = reply_to(attacker, np.full(LAYOUT.d, 100.0), 5, pid=pid_of[victim.metadata.dst_node_id])
    honest = [reply_to(m, np.ones(LAYOUT.d), 5) for m in msgs[1:]]
    arrays, _ = s.aggregate_train(1, [forged] + honest)
    assert sorted(s.last_participants) == sorted(pid_of[m.metadata.dst_node_id] for m in msgs[1:])
    assert s.last_reasons == {"wrong-partition": 1}
    np.testing.assert_allclose(flat(arrays), LAYOUT.flatten(global_weights()).numpy() + 1.0, rtol=1e-6)


def test_a_reply_from_another_node_than_the_instruction_went_to_is_rejected():
    s = bound_strategy()
    msgs = configure(s)
    stolen = reply_to(msgs[0], np.ones(LAYOUT.d), 5)
    stolen.metadata._src_node_id = msgs[1].metadata.dst_node_id  # delivered by another node
    s.aggregate_train(1, [stolen] + [reply_to(m, np.ones(LAYOUT.d), 5) for m in msgs[1:]])
    assert s.last_reasons == {"wrong-node": 1}


def test_replayed_reply_of_the_previous_round_and_duplicates_are_rejected():
    s = bound_strategy()
    old = configure(s, rnd=1)
    old_replies = [reply_to(m, np.ones(LAYOUT.d), 5) for m in old]
    s.aggregate_train(1, old_replies)
    new = configure(s, rnd=2)
    fresh = [reply_to(m, np.zeros(LAYOUT.d), 5) for m in new]
    s.aggregate_train(2, [old_replies[0], fresh[1], fresh[1]] + fresh[2:])
    assert s.last_reasons == {"wrong-round": 1, "duplicate": 1}
    assert len(s.last_participants) == 3


def test_example_count_bound_is_what_the_partition_reported():
    s = bound_strategy()
    msgs = configure(s)
    s.aggregate_train(1, [reply_to(m, np.ones(LAYOUT.d), BOUND) for m in msgs])
    assert s.last_rejected == []
    msgs = configure(s, rnd=2)
    s.aggregate_train(2, [reply_to(m, np.ones(LAYOUT.d), BOUND + 1) for m in msgs])
    assert s.last_reasons == {"num-examples": 4}


def test_all_replies_bad_leaves_model_unchanged():
    s = bound_strategy()
    msgs = configure(s)
    arrays, metrics = s.aggregate_train(1, [reply_to(m, np.full(LAYOUT.d, np.inf), 5) for m in msgs])
    assert arrays is None and metrics is None and len(s.last_rejected) == len(msgs)


def test_a_round_of_foreign_replies_stops_the_run_with_a_clear_error():
    s = bound_strategy()
    msgs = configure(s)
    plain = [Message(content=RecordDict({P.ARRAYS: P.to_array_record(global_weights()),
                                         P.METRICS: reply_to(m, [], 1).content[P.METRICS]}), reply_to=m)
             for m in msgs]
    with pytest.raises(ForeignClientError, match="0 of 4 replies were Stamen replies"):
        s.aggregate_train(1, plain)


def test_fedprox_sends_mu_to_clients():
    s = bound_strategy("fedprox", proximal_mu=0.7)
    msg = configure(s)[0]
    assert msg.content.config_records[P.CONFIG]["proximal-mu"] == 0.7


def test_unknown_strategy_option_is_named():
    with pytest.raises(StrategyConfigError, match="strategy.mu"):
        build_pipeline(load(overrides=["strategy.name=fedprox", "strategy.mu=1"]))


def test_sampling_is_seeded_and_takes_the_fraction():
    pids = list(NODES)
    a = seeded_sample(0, 3, pids, 0.5)
    assert len(a) == sample_count(0.5, 4) == 2 and a == seeded_sample(0, 3, pids, 0.5)
    rounds = {tuple(seeded_sample(0, r, pids, 0.5)) for r in range(1, 30)}
    assert len(rounds) > 1
    assert sample_count(0.1, 30) == 3 and sample_count(0.01, 30) == 1 and sample_count(1.0, 7) == 7
    s = bound_strategy(fraction=0.5)
    assert sorted(dict(m.content.config_records[P.CONFIG])[P.PARTITION_ID] for m in configure(s, 3)) == a
    # the same draw from any order of the ids, a list or the array the pipeline keeps (sorted once)
    import numpy as np

    ids = np.arange(1000, dtype=np.int64) * 3
    want = seeded_sample(7, 2, [int(i) for i in ids[::-1]], 0.05)
    assert seeded_sample(7, 2, ids, 0.05) == want == seeded_sample(7, 2, np.random.permutation(ids), 0.05)
    assert len(want) == 50 and set(want) <= set(ids.tolist()) and want == sorted(want)


def test_state_dict_round_trip_keeps_server_optimizer_state():
    s = bound_strategy("fedadam")
    msgs = configure(s)
    s.aggregate_train(1, [reply_to(m, np.ones(LAYOUT.d), 5) for m in msgs])
    state = s.state_dict()
    t = bound_strategy("fedadam")
    t.load_state_dict(state)
    a, b = s.method.server.flower, t.method.server.flower
    for k in a.m_t:
        assert np.array_equal(a.m_t[k], b.m_t[k]) and np.array_equal(a.v_t[k], b.v_t[k])
