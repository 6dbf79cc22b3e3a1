"""sketched_fedavg and fetchsgd: aggregation in sketch space against direct computations."""

import numpy as np
import pytest
import torch
from _fakes import LAYOUT, bound_strategy, configure, flower_identity, global_weights, reply_to  # noqa: F401
from flwr.app import ConfigRecord

from stamen import schema as P
from stamen.schema import train as T
from stamen.sketching.downlink import weights_check
from stamen.strategies.catchup import payload_key
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
    with pytest.raises(ValueError, match="mergeable sketch"):
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


def test_fetchsgd_unsketches_planted_heavy_hitters_like_a_hand_made_count_sketch():
    """The paper's defaults (5 rows, c = 0.1·d columns, k = 10 % of c, Alg. 1's server step) on a vector with five
    planted heavy hitters in dense small noise, with collisions in every bucket (d/c = 10 coordinates per bucket).
    Oracle: the table built by hand with np.add.at from the shared hashes, the median-over-rows estimates
    computed by hand, the top-k of those, and the error table with the extracted buckets zeroed."""
    from _fakes import FakeGrid

    from stamen.core import Layout

    d = 2000
    layout = Layout(("w",), ((d,),))
    s = bound_strategy("fetchsgd", layout=layout, momentum=0.0)
    method = s.method
    assert method.k is None and method.local_steps == 1
    columns = s.run.codec.sketch_size(d)
    assert columns == 200 and method.top_k() == 20  # ⌈0.1 · 200⌉
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 0.01, size=d).astype(np.float32)
    planted = {17: 6.0, 444: -8.0, 901: 5.0, 1337: -7.0, 1999: 9.0}
    for i, v in planted.items():
        x[i] = v
    w0 = {"w": np.zeros(d, np.float32)}
    msgs = list(s.configure_train(1, P.to_array_record(w0), ConfigRecord(), FakeGrid()))
    ctx0 = CodecContext(0, 0, layout)  # FetchSGD's one operator for the whole run
    replies = [reply_to(m, None, 1, codec="countsketch", payload=s.run.codec.encode(torch.from_numpy(x), ctx0))
               for m in msgs]
    arrays, _ = s.aggregate_train(1, replies)
    update = P.from_array_record(arrays)["w"].reshape(-1)

    op = s.run.codec.operator(ctx0)
    buckets, signs = op.hashes.buckets.numpy().astype(np.int64), op.hashes.signs.numpy().astype(np.float64)
    table = np.zeros((5, columns))
    for j in range(5):
        np.add.at(table[j], buckets[j], signs[j] * x.astype(np.float64))
    estimates = np.median(signs * table[np.arange(5)[:, None], buckets], axis=0)
    top = np.sort(np.argsort(-np.abs(estimates), kind="stable")[:20])
    assert set(planted) <= set(top.tolist())
    assert np.flatnonzero(update).tolist() == top.tolist()
    np.testing.assert_allclose(update[top], estimates[top], rtol=1e-5, atol=1e-5)
    for i, v in planted.items():
        assert abs(update[i] - v) < 0.2  # collisions move a heavy hitter's estimate by noise only
    # error accumulation: S_e = η·S, then zeroed in every row at the buckets of the extracted coordinates
    expected_error = table.copy()
    for j in range(5):
        expected_error[j, buckets[j, top]] = 0.0
    np.testing.assert_allclose(method.s_e.numpy(), expected_error, rtol=1e-5, atol=1e-5)


def test_fetchsgd_client_duty_is_one_stochastic_gradient_by_default():
    s = bound_strategy("fetchsgd")
    config = configure(s)[0].content.config_records[P.CONFIG]
    assert config[T.TRAINER] == "steps" and config[T.LOCAL_STEPS] == 1
    local = bound_strategy("fetchsgd", local_steps=0)  # local epochs instead: outside the paper
    assert T.TRAINER not in configure(local)[0].content.config_records[P.CONFIG]
    assert bound_strategy("fetchsgd", k=7).method.top_k() == 7


# -- the compressed downlinks (catch-up: strategies/catchup.py, client/catchup.py) ---------------------

import logging  # noqa: E402

from _localgrid import LocalGrid, run_capturing_strategy  # noqa: E402
from flwr.app import ConfigRecord, RecordDict  # noqa: E402

import stamen.client.trainers_ferret as CF  # noqa: E402
import stamen.client.trainers_sketched as CS  # noqa: E402
import stamen.strategies.ferret as SF  # noqa: E402
import stamen.strategies.sketched as SS  # noqa: E402
from stamen.client.app import DOWNLINKS  # noqa: E402
from stamen.client.trainers import TrainJob  # noqa: E402
from stamen.config import load  # noqa: E402
from stamen.strategies.preflight import build_pipeline  # noqa: E402
from stamen.strategies.registry import StrategyConfigError  # noqa: E402
from stamen.tasks.task import load_task  # noqa: E402

FL_BASE = ["federation.clients=6", "federation.fraction_train=0.5", "run.rounds=6", "task.local_epochs=1",
           "task.hidden=16"]
SKETCHED_SRHT = ["strategy.name=sketched_fedavg", "compression.codec=srht", "compression.ratio=0.2"]
SKETCHED_CS = ["strategy.name=sketched_fedavg", "compression.codec=countsketch", "compression.ratio=0.05",
               "compression.rows=3", "strategy.server_lr=0.5"]
FETCH = ["strategy.name=fetchsgd", "strategy.k=150", "strategy.ratio=0.5"]
DOWN_KEYS = ("downlink_bytes",) + tuple(f"{p}_{m}" for p in ("sketched", "fetchsgd") for m in (
    "dense_nodes", "catchup_nodes", "catchup_rounds", "history_rounds", "history_bytes"))




def fl_run(tmp_path, name, *overrides, cfg=None, resume=False, grid=None):
    """Run on the in-process grid; return (cfg, run directory, the strategy object, the grid)."""
    cfg = cfg or load(overrides=FL_BASE + list(overrides))
    return (cfg, *run_capturing_strategy(cfg, tmp_path / name, resume=resume, grid=grid))


def without(rows, *keys):
    return [{k: v for k, v in r.items() if k not in ("wall_s",) + keys} for r in rows]


def rebuild_everywhere(s, grid, final_arrays, next_round):
    """Deliver round ``next_round``'s downlink to every node; {node: (rebuilt flat weights, sync mode, rounds)}."""
    s.run.fraction_train = 1.0
    keys, out = s.method.downlink.catchup, {}
    task = load_task(grid.cfg.task, grid.cfg.federation.clients, grid.cfg.run.seed)
    for msg in s.configure_train(next_round, P.to_array_record(final_arrays), ConfigRecord(), grid):
        ctx = grid.contexts[msg.metadata.dst_node_id]
        config = dict(msg.content.config_records[P.CONFIG])
        job = TrainJob(options=config, state=ctx.state, task=task, partition_id=int(ctx.node_config["partition-id"]),
                       server_round=next_round, seed=grid.cfg.run.seed)
        weights = DOWNLINKS[config["downlink"]](msg.content, job)
        out[msg.metadata.dst_node_id] = (task.layout.flatten(weights), config[keys.sync], config.get(keys.rounds))
    return out


def test_both_sides_use_the_same_downlink_entries():
    for server, client in ((SF.KEYS, CF.FERRET), (SS.SKETCHED_KEYS, CS.SKETCHED), (SS.FETCHSGD_KEYS, CS.FETCHSGD)):
        for name in ("sync", "global_round", "base_round", "rounds", "check_sum", "check_norm"):
            assert getattr(server, name) == getattr(client, name) == f"{server.prefix}-" + {
                "sync": "sync", "global_round": "round", "base_round": "base-round", "rounds": "rounds",
                "check_sum": "sum", "check_norm": "norm"}[name], (server.prefix, name)
        assert server.downlink == client.prefix and server.downlink in DOWNLINKS
    assert T.SKETCHED_SERVER_LR == CS.SKETCHED_SERVER_LR == "sketched-server-lr"
    # Ferret's wire format is unchanged by the refactoring
    assert (SF.KEYS.sync, SF.KEYS.global_round, SF.KEYS.check_sum, CF.GLOBAL_COPY) == ("ferret-sync", "ferret-round", "ferret-sum",
                                                                       "ferret-global")


@pytest.mark.parametrize("name", ["sketched_fedavg", "fetchsgd"])
def test_downlink_option_is_validated(name):
    extra = ["compression.codec=srht"] if name == "sketched_fedavg" else []
    with pytest.raises(StrategyConfigError, match="strategy.downlink"):
        build_pipeline(load(overrides=[f"strategy.name={name}", "strategy.downlink=sparse", *extra]))
    assert build_pipeline(load(overrides=[f"strategy.name={name}", *extra])).method.downlink.enabled
    assert not build_pipeline(load(overrides=[f"strategy.name={name}", "strategy.downlink=dense", *extra])
                              ).method.downlink.enabled


@pytest.mark.parametrize("opts", [SKETCHED_SRHT, SKETCHED_CS, FETCH], ids=["sketched-srht", "sketched-countsketch",
                                                                           "fetchsgd"])
def test_compressed_downlink_gives_the_dense_run(tmp_path, one_torch_thread, opts):
    """Oracle: the same config with the dense downlink. Partial participation: nodes miss rounds and catch up."""
    _, a, s, grid = fl_run(tmp_path, "compressed", *opts)
    _, b, _, _ = fl_run(tmp_path, "dense", *opts, "strategy.downlink=dense")
    ra, rb = a.read_metrics(), b.read_metrics()
    p = s.method.downlink.catchup.prefix
    assert all(r["rejected"] == 0 and r["clients"] == 3 for r in ra)  # every rebuilt copy passed its check
    assert ra[0][f"{p}_dense_nodes"] == 3  # first participation: dense
    assert max(max(r[f"{p}_catchup_rounds"], default=0) for r in ra) >= 2  # someone missed several rounds
    assert all(r[f"{p}_dense_nodes"] == 3 and r[f"{p}_history_rounds"] == 0 for r in rb)
    for x, y in zip(without(ra, *DOWN_KEYS), without(rb, *DOWN_KEYS)):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == (pytest.approx(y[k], rel=1e-6, abs=1e-9) if isinstance(y[k], float) else y[k]), k
    wa, wb = a.load_checkpoint()["arrays"], b.load_checkpoint()["arrays"]
    for k in wb:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-6, atol=1e-7)
    assert sum(r["downlink_bytes"] for r in ra) < sum(r["downlink_bytes"] for r in rb)
    # every node, whatever it missed, rebuilds the server's final model (the same arithmetic: bit for bit here)
    layout = s.run.layout
    rebuilt = rebuild_everywhere(s, grid, wa, len(ra) + 1)
    assert {how for _, how, _ in rebuilt.values()} == {"dense", "catch-up"}
    for flat, how, rounds in rebuilt.values():
        assert torch.equal(flat, layout.flatten(wa)), (how, rounds)


@pytest.mark.parametrize("opts, payload_bytes", [
    (["strategy.name=sketched_fedavg", "compression.codec=srht", "compression.ratio=0.05"],
     lambda d: 4 * max(1, round(0.05 * d))),  # s fp32 values
    (["strategy.name=sketched_fedavg", "compression.codec=countsketch", "compression.ratio=0.02",
      "compression.rows=3"], lambda d: 4 * 3 * max(1, round(0.02 * d))),  # rows × s fp32 buckets
    (["strategy.name=fetchsgd", "strategy.k=100", "strategy.ratio=0.2"], lambda d: 100 * (4 + 4)),  # int32 + fp32
], ids=["srht", "countsketch", "fetchsgd"])
def test_downlink_bytes_shrink_by_the_payload_ratio(tmp_path, one_torch_thread, opts, payload_bytes):
    """Full participation: round 1 is dense for everyone, later rounds carry one round's update per node."""
    n = 4
    over = ["federation.clients=4", "federation.fraction_train=1.0", "run.rounds=3", *opts]
    cfg, a, s, _ = fl_run(tmp_path, "compressed", *over)
    _, b, _, _ = fl_run(tmp_path, "dense", *over, "strategy.downlink=dense")
    d = load_task(cfg.task, n, 0).layout.d
    dense_msg = b.read_metrics()[0]["downlink_bytes"] / n
    header = dense_msg - 4 * d  # the records and config entries around the d fp32 weights
    assert 0 < header < 1024
    assert all(r["downlink_bytes"] == b.read_metrics()[0]["downlink_bytes"] for r in b.read_metrics())
    rows, p = a.read_metrics(), s.method.downlink.catchup.prefix
    assert rows[0][f"{p}_dense_nodes"] == n and abs(rows[0]["downlink_bytes"] / n - dense_msg) < 256
    expected = payload_bytes(d)
    for r in rows[1:]:
        assert r[f"{p}_catchup_nodes"] == n and r[f"{p}_catchup_rounds"] == [1] * n
        per_node = r["downlink_bytes"] / n
        # the payload as computed independently, plus a header like the dense one (the catch-up entries add a little)
        assert expected <= per_node <= expected + header + 256, (per_node, expected, header)
        assert dense_msg / per_node >= (4 * d + header) / (expected + header + 256)
        assert r[f"{p}_history_bytes"] == expected  # one round kept: everyone holds the previous one


class StateLosingGrid(LocalGrid):
    """Before round ``at``'s train messages: wipe one node's state, corrupt another node's copy."""

    def __init__(self, cfg, client, at, wipe, corrupt):
        super().__init__(cfg)
        self.client, self.at, self.wipe, self.corrupt = client, at, wipe, corrupt

    def send_and_receive(self, messages, *, timeout=None):
        for m in messages:
            if m.metadata.message_type == "train" and m.content.config_records[P.CONFIG]["server-round"] == self.at:
                state = self.contexts[m.metadata.dst_node_id].state
                if m.metadata.dst_node_id == self.wipe:
                    self.contexts[m.metadata.dst_node_id].state = RecordDict()  # a restarted node: no copy
                elif m.metadata.dst_node_id == self.corrupt:
                    rnd, flat = self.client.held_copy(state)
                    flat[0] += 0.5
                    self.client.store_copy(state, rnd, flat)
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("opts", [SKETCHED_SRHT, FETCH], ids=["sketched", "fetchsgd"])
def test_lost_state_and_a_bad_copy_fail_cleanly_then_get_dense_weights(tmp_path, one_torch_thread, caplog, opts):
    cfg = load(overrides=FL_BASE + ["federation.fraction_train=1.0", "run.rounds=4", *opts])
    client = CS.SKETCHED if opts is SKETCHED_SRHT else CS.FETCHSGD
    grid = StateLosingGrid(cfg, client, at=3, wipe=1000, corrupt=1007)
    with caplog.at_level(logging.WARNING, logger="stamen.strategy"):
        _, rd, s, grid = fl_run(tmp_path, "a", cfg=cfg, grid=grid)
    rows, p = rd.read_metrics(), s.method.downlink.catchup.prefix
    assert [r["rejected"] for r in rows] == [0, 0, 2, 0]
    assert [r[f"{p}_dense_nodes"] for r in rows] == [6, 0, 0, 2]  # round 4: the two nodes whose copies were lost
    text = caplog.text
    assert "holds no copy of the global model" in text  # the wiped node
    assert "rebuilt global weights differ from the server's" in text  # the corrupted copy failed its check
    assert client.held_copy(grid.contexts[1007].state)[0] == 3  # re-synced from the dense weights in round 4
    final = rd.load_checkpoint()["arrays"]
    for flat, _, _ in rebuild_everywhere(s, grid, final, 5).values():
        assert torch.equal(flat, s.run.layout.flatten(final))


def test_client_refuses_a_sketch_catch_up_it_cannot_apply():
    cfg = load(overrides=FL_BASE + SKETCHED_SRHT)
    task = load_task(cfg.task, 6, 0)
    w = task.initial_weights()
    flat = task.layout.flatten(w)
    total, norm = weights_check(flat)
    keys, state = SS.SKETCHED_KEYS, RecordDict()
    base = {T.CODEC: "srht", "codec-options": '{"ratio": 0.2}', T.SKETCHED_SERVER_LR: 1.0, "downlink": "sketched",
            keys.global_round: 3, keys.check_sum: total, keys.check_norm: norm}

    def job(config):
        return TrainJob(options=config, state=state, task=task, partition_id=0, server_round=4, seed=0)

    catch_up = RecordDict({P.ARRAYS: P.to_array_record({}), P.CONFIG: ConfigRecord({})})
    with pytest.raises(ValueError, match="holds no copy"):
        CS.sketched_downlink(catch_up, job({**base, keys.sync: "catch-up", keys.base_round: 2, keys.rounds: [3]}))
    dense = RecordDict({P.ARRAYS: P.to_array_record(w)})
    assert torch.equal(task.layout.flatten(CS.sketched_downlink(dense, job({**base, keys.sync: "dense"}))), flat)
    assert CS.SKETCHED.held_copy(state)[0] == 3
    with pytest.raises(ValueError, match="carries no arrays for it"):  # round 4 listed, not sent
        CS.sketched_downlink(catch_up, job({**base, keys.sync: "catch-up", keys.base_round: 3,
                                            keys.global_round: 4, keys.rounds: [4]}))
    with pytest.raises(ValueError, match="differ from the server"):  # a wrong step: the check catches it
        sketch = {"4.sketch": np.ones(242, np.float32)}
        CS.sketched_downlink(RecordDict({P.ARRAYS: P.to_array_record(sketch)}),
                             job({**base, keys.sync: "catch-up", keys.base_round: 3, keys.global_round: 4,
                                  keys.rounds: [4]}))
    assert CS.SKETCHED.held_copy(state) is None  # a copy that failed its check is dropped


@pytest.mark.parametrize("opts", [SKETCHED_SRHT, FETCH], ids=["sketched", "fetchsgd"])
def test_resume_equals_uninterrupted(tmp_path, one_torch_thread, opts):
    _, full, _, _ = fl_run(tmp_path, "full", *opts, "run.rounds=5")
    _, part, s2, _ = fl_run(tmp_path, "part", *opts, "run.rounds=2")
    state = part.load_checkpoint()["strategy"]
    assert state["method"]["downlink"]["history"]  # the checkpoint keeps the history (nodes restart empty)
    _, _, s, _ = fl_run(tmp_path, "part", cfg=load(part.config_path, ["run.rounds=5"]), resume=True)
    # the resumed run's nodes start empty, so they first get dense weights: only the downlink differs
    assert without(part.read_metrics(), *DOWN_KEYS) == without(full.read_metrics(), *DOWN_KEYS)
    for k, v in full.load_checkpoint()["arrays"].items():
        assert np.array_equal(v, part.load_checkpoint()["arrays"][k])
    p = s.method.downlink.catchup.prefix
    assert part.read_metrics()[2][f"{p}_dense_nodes"] == 3
    assert sum(r[f"{p}_catchup_nodes"] for r in part.read_metrics()[3:]) > 0
