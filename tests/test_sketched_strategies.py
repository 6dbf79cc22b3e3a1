"""sketched_fedavg and fetchsgd: aggregation in sketch space against direct computations."""

import numpy as np
import pytest
import torch
from _fakes import LAYOUT, bound_strategy, configure, flower_identity, global_weights, reply_to  # noqa: F401

from stamen import protocol as P
from stamen.sketching.codec import CodecContext, make_codec


def encoded_reply(msg, codec, delta, n, rnd, pid_of):
    ctx = CodecContext(0, rnd, LAYOUT, node=pid_of(msg))
    return reply_to(msg, None, n, codec=codec.name, payload=codec.encode(torch.tensor(delta, dtype=torch.float32), ctx))


def pid_of(msg):
    from _fakes import NODES

    return next(p for p, nid in NODES.items() if nid == msg.metadata.dst_node_id)


@pytest.mark.parametrize("codec_name, decode", [("srht", "adjoint"), ("gaussian", "adjoint"), ("countsketch", "adjoint")])
def test_sketched_fedavg_equals_desketched_weighted_mean(codec_name, decode):
    s = bound_strategy("sketched_fedavg", f"compression.codec={codec_name}", "compression.ratio=0.5",
                       codec=codec_name, server_lr=0.5)
    codec = make_codec(codec_name, ratio=0.5)
    msgs = configure(s, rnd=3)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=LAYOUT.d).astype(np.float32) for _ in msgs]
    ns = [1, 2, 3, 4]
    arrays, _ = s.aggregate_train(3, [encoded_reply(m, codec, d, n, 3, pid_of) for m, d, n in zip(msgs, deltas, ns)])
    # oracle: R is linear, so the de-sketched mean sketch is Rᵀ R (weighted mean of Δ)
    op = codec.operator(CodecContext(0, 3, LAYOUT))
    mean = torch.tensor(sum(n * d for n, d in zip(ns, deltas)) / sum(ns))
    expected = LAYOUT.flatten(global_weights()) + 0.5 * op.adjoint(op.apply(mean))
    got = LAYOUT.flatten(P.from_array_record(arrays))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_sketched_fedavg_refuses_non_mergeable_codecs():
    with pytest.raises(ValueError, match="mergeable sketch codec"):
        bound_strategy("sketched_fedavg", "compression.codec=topk")


def fetch_round(s, rnd, delta):
    codec = make_codec("countsketch", rows=5, ratio=1.0)
    msgs = configure(s, rnd=rnd)
    arrays, _ = s.aggregate_train(rnd, [encoded_reply(m, codec, delta, 1, 0, pid_of) for m in msgs])
    return (LAYOUT.flatten(P.from_array_record(arrays)) - LAYOUT.flatten(global_weights())).numpy()


def test_fetchsgd_extracts_heavy_hitters_and_keeps_the_rest_as_error():
    planted = np.zeros(LAYOUT.d, np.float32)
    planted[2], planted[5] = 4.0, -3.0
    s = bound_strategy("fetchsgd", k=1, ratio=1.0, momentum=0.0)
    first = fetch_round(s, 1, planted)
    assert np.count_nonzero(first) == 1 and first[2] == pytest.approx(4.0, rel=1e-5)
    # nothing new arrives, but the error table still holds coordinate 5
    second = fetch_round(s, 2, np.zeros(LAYOUT.d, np.float32))
    assert np.count_nonzero(second) == 1 and second[5] == pytest.approx(-3.0, rel=1e-5)


def test_fetchsgd_without_error_feedback_forgets():
    planted = np.zeros(LAYOUT.d, np.float32)
    planted[2], planted[5] = 4.0, -3.0
    s = bound_strategy("fetchsgd", k=1, ratio=1.0, momentum=0.0, error_feedback=False)
    fetch_round(s, 1, planted)
    assert np.count_nonzero(fetch_round(s, 2, np.zeros(LAYOUT.d, np.float32))) <= 1
    assert abs(fetch_round(s, 3, np.zeros(LAYOUT.d, np.float32))[5]) < 1e-6


def test_fetchsgd_momentum_accumulates():
    planted = np.zeros(LAYOUT.d, np.float32)
    planted[0] = 1.0
    s = bound_strategy("fetchsgd", k=1, ratio=1.0, momentum=0.5, error_feedback=False)
    assert fetch_round(s, 1, planted)[0] == pytest.approx(1.0)
    # the extracted bucket is zeroed, so momentum restarts there: 1.0 again, not 1.5
    assert fetch_round(s, 2, planted)[0] == pytest.approx(1.0)
