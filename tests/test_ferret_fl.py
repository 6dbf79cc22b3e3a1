"""Ferret and FedKSeed end to end on the in-process grid: bytes, coefficient-space aggregation,
clients rebuilding the global model from coefficients, resume, randomness, the zeroth-order trainer."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from _fakes import flower_identity, reply_to  # noqa: F401
from _localgrid import LocalGrid, run_capturing_strategy
from flwr.app import ConfigRecord, Message, RecordDict

import stamen.client.trainers_ferret as CF  # registers DOWNLINKS["ferret"], trainers "steps"/"fedkseed"
import stamen.strategies.fedkseed as SK
import stamen.strategies.ferret as SF
from stamen import schema as P
from stamen.schema import train as T
from stamen.sketching.downlink import weights_check
from stamen.strategies.catchup import payload_key
from stamen.client.trainers import TrainJob, TrainSettings
from stamen.config import ConfigError, load
from stamen.server.results import RunDirectory
from stamen.core import Layout
from stamen.sketching.codec import CodecContext, PayloadError
from stamen.sketching.ferret import FerretCodec, basis, basis_variance, seed_pool
from stamen.strategies.preflight import build_pipeline
from stamen.strategies.registry import StrategyConfigError
from stamen.tasks.task import get_weights, load_task

BASE = ["federation.clients=6", "federation.fraction_train=0.5", "run.rounds=4", "task.local_epochs=1",
        "task.hidden=16", "strategy.name=ferret", "strategy.K=32"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(tmp_path, name, *overrides, cfg=None, resume=False, grid=None):
    """Run on the in-process grid; return (cfg, run directory, the strategy object, the grid)."""
    cfg = cfg or load(overrides=BASE + list(overrides))
    return (cfg, *run_capturing_strategy(cfg, tmp_path / name, resume=resume, grid=grid))


def flat_weights(arrays: dict, layout: Layout) -> torch.Tensor:
    return layout.flatten(arrays)


def strip(rows, *keys):
    return [{k: v for k, v in r.items() if k not in ("wall_s",) + keys} for r in rows]


# -- protocol -----------------------------------------------------------------------------------


def test_the_wire_format_is_the_schemas():
    """Both sides take Ferret's entries from stamen/schema/train.py; the strings themselves are the
    wire format (a version of the schema may not change them silently)."""
    keys = SF.KEYS
    assert (keys.sync, keys.global_round, keys.base_round, keys.rounds, keys.check_sum, keys.check_norm) == (
        "ferret-sync", "ferret-round", "ferret-base-round", "ferret-rounds", "ferret-sum", "ferret-norm")
    assert (CF.SYNC, CF.GLOBAL_ROUND, CF.CHECK_SUM, CF.GLOBAL_COPY) == ("ferret-sync", "ferret-round", "ferret-sum",
                                                                       "ferret-global")
    assert (T.FERRET_SERVER_LR, T.LOCAL_STEPS, T.ZO_STEPS, T.ZO_EPS, T.ZO_LR) == (
        "ferret-server-lr", "local-steps", "zo-steps", "zo-eps", "zo-lr")
    assert SF.KEYS.downlink in __import__("stamen.client.app", fromlist=["DOWNLINKS"]).DOWNLINKS
    assert payload_key(7, "seed") == "7.seed"


def test_options_and_config_errors_name_the_key():
    with pytest.raises(StrategyConfigError, match="strategy.K"):
        build_pipeline(load(overrides=["strategy.name=ferret", "strategy.K=0"]))
    with pytest.raises(StrategyConfigError, match="strategy.downlink"):
        build_pipeline(load(overrides=["strategy.name=ferret", "strategy.downlink=sparse"]))
    with pytest.raises(StrategyConfigError, match="unknown config key 'strategy.k'"):
        build_pipeline(load(overrides=["strategy.name=ferret", "strategy.k=3"]))
    with pytest.raises(ConfigError, match="compression"):
        build_pipeline(load(overrides=["strategy.name=ferret", "compression.codec=topk"]))
    with pytest.raises(ConfigError, match="privacy"):
        build_pipeline(load(overrides=["strategy.name=fedkseed", "privacy.clip=1.0"]))
    with pytest.raises(StrategyConfigError, match="strategy.eps"):
        build_pipeline(load(overrides=["strategy.name=fedkseed", "strategy.eps=0"]))
    s = build_pipeline(load(overrides=["strategy.name=ferret", "strategy.clip=none", "strategy.value_dtype=fp16"]))
    assert s.method.codec_options["clip"] is None and s.method.codec_options["value_dtype"] == "fp16"


# -- uplink bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize("value_dtype, value_bytes", [("fp32", 4), ("fp16", 2)])
def test_uplink_is_nnz_times_entry_size_plus_a_fixed_header(tmp_path, value_dtype, value_bytes):
    cfg, rd, s, _ = run(tmp_path, "a", f"strategy.value_dtype={value_dtype}", "run.rounds=2")
    rows = rd.read_metrics()
    # oracle for the header: the same reply with an empty payload (int16 indices: < 2**15 blocks and seeds)
    empty = {"block": np.zeros(0, np.int16), "seed": np.zeros(0, np.int16),
             "value": np.zeros(0, np.float16 if value_dtype == "fp16" else np.float32)}
    identity = {P.SCHEMA: P.SCHEMA_VERSION, P.RUN_ID: "0" * 16, P.NONCE: "0" * 32, P.SERVER_ROUND: 1,
                P.PARTITION_ID: 0}
    header = P.content_bytes(T.train_reply(empty, {P.NUM_EXAMPLES: 100, "train_loss": 0.5, "local_steps": 10},
                                           "ferret", identity))
    for r in rows:
        assert len(r["ferret_uplink_bytes"]) == len(r["ferret_nnz"]) == r["clients"] == 3
        assert sum(r["ferret_uplink_bytes"]) == r["uplink_bytes"]
        for up, nnz in zip(r["ferret_uplink_bytes"], r["ferret_nnz"]):
            assert 0 < nnz <= len(s.run.codec.blocks(s.run.layout)) * 32
            # varints of the lengths and of the example count differ by a few bytes
            assert abs(up - (nnz * (2 + 2 + value_bytes) + header)) <= 12


# -- coefficient-space aggregation ----------------------------------------------------------------


def _reconstruct_by_hand(payload, codec, layout, seed, server_round=1):
    """Second implementation: Σ γ v(pool[seed], block), one term at a time in float64, with the pool of the
    codec's scope (the round's own pool by default, the run's with ``pool_scope = "run"``)."""
    pool_round = server_round if codec.pool_scope == "round" else None
    blocks, pool = codec.blocks(layout), seed_pool(seed, codec.K, pool_round)
    out = np.zeros(layout.d, np.float64)
    for b, k, g in zip(payload["block"].tolist(), payload["seed"].tolist(), payload["value"].astype(np.float64)):
        start, end = blocks[b]
        out[start:end] += g * basis(pool[k], b, end - start).double().numpy()
    return out


@pytest.mark.parametrize("pool_scope", ["round", "run"])
def test_aggregation_in_coefficient_space_equals_weighted_mean_of_client_reconstructions(pool_scope):
    layout = Layout(("w1", "b1", "w2", "b2"), ((40, 30), (40,), (10, 40), (10,)))
    nodes = {0: 11, 1: 12, 2: 13}
    s = build_pipeline(load(overrides=["strategy.name=ferret", "strategy.K=24", "strategy.server_lr=0.7",
                                       f"strategy.pool_scope={pool_scope}"]))
    s.bind(seed=5, nodes=nodes, layout=layout, fraction_train=1.0, fraction_evaluate=0.0, rounds=5, timeout=10.0)
    rng = np.random.default_rng(0)
    w0 = {n: rng.normal(size=sh).astype(np.float32) for n, sh in zip(layout.names, layout.shapes)}
    msgs = list(s.configure_train(1, P.to_array_record(w0), ConfigRecord(), None))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12, 13]
    counts, payloads, replies = [30, 10, 60], [], []
    for pid, n in zip(nodes, counts):
        delta = torch.from_numpy(rng.normal(size=layout.d).astype(np.float32))
        payload = s.run.codec.encode(delta, CodecContext(5, 1, layout, node=pid))
        payloads.append(payload)
        reply = reply_to(next(m for m in msgs if m.metadata.dst_node_id == nodes[pid]), None, n, codec="ferret",
                         payload=payload)
        replies.append(reply)
    arrays, metrics = s.aggregate_train(1, replies[::-1])
    got = flat_weights(P.from_array_record(arrays), layout).double().numpy()
    mean = sum(n / sum(counts) * _reconstruct_by_hand(p, s.run.codec, layout, 5) for n, p in zip(counts, payloads))
    expected = flat_weights(w0, layout).double().numpy() + 0.7 * mean
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    assert s.last_participants == [0, 1, 2] and metrics["train_loss"] == pytest.approx(1.0)
    assert set(s.method.downlink.history) == {1}  # the aggregated coefficients are kept for the downlink


def test_per_round_bases_differ_between_rounds_and_client_and_server_agree():
    """The default (the paper's Alg. 1, line 10): every round a fresh seed pool. A client builds its codec from
    the instruction alone and projects on round r's bases; the server reconstructs with the same bases; an
    independent float64 reconstruction from seed_pool(seed, K, r) gives the server's weights after two rounds,
    and the round-1 and round-2 bases share no seed."""
    layout = Layout(("w1", "b1", "w2", "b2"), ((30, 20), (30,), (10, 30), (10,)))
    nodes, seed, K, lr = {0: 11, 1: 12}, 3, 16, 0.5
    s = build_pipeline(load(overrides=["strategy.name=ferret", f"strategy.K={K}", f"strategy.server_lr={lr}"]))
    assert s.method.options.pool_scope == "round" and s.method.options.local_steps == 10
    s.bind(seed=seed, nodes=nodes, layout=layout, fraction_train=1.0, fraction_evaluate=0.0, rounds=5, timeout=10.0)
    rng = np.random.default_rng(1)
    w0 = {n: rng.normal(size=sh).astype(np.float32) for n, sh in zip(layout.names, layout.shapes)}
    expected, arrays = flat_weights(w0, layout).double().numpy(), P.to_array_record(w0)
    chosen = {}
    for r in (1, 2):
        msgs = list(s.configure_train(r, arrays, ConfigRecord(), None))
        replies, payloads = [], []
        for pid, node in nodes.items():
            msg = next(m for m in msgs if m.metadata.dst_node_id == node)
            config = msg.content.config_records[P.CONFIG]
            assert config[T.TRAINER] == "steps" and config[T.LOCAL_STEPS] == 10
            client_codec = FerretCodec(**json.loads(config[T.CODEC_OPTIONS]))  # what the ClientApp builds
            payload = client_codec.encode(torch.from_numpy(rng.normal(size=layout.d).astype(np.float32)),
                                          CodecContext(seed, r, layout, node=pid))
            payloads.append(payload)
            replies.append(reply_to(msg, None, 10, codec="ferret", payload=payload))
        chosen[r] = {int(k) for p in payloads for k in p["seed"]}
        arrays, _ = s.aggregate_train(r, replies)
        expected = expected + lr * sum(0.5 * _reconstruct_by_hand(p, s.run.codec, layout, seed, r) for p in payloads)
        got = flat_weights(P.from_array_record(arrays), layout).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    used = [{int(seed_pool(seed, K, r)[k]) for k in chosen[r]} for r in (1, 2)]
    assert used[0] and used[1] and not used[0] & used[1]  # round 2's bases are new
    # with the run's pool the same round-2 payload would have meant other directions
    run_codec = FerretCodec(K=K, pool_scope="run")
    assert not np.allclose(_reconstruct_by_hand(payloads[0], run_codec, layout, seed, 2),
                           _reconstruct_by_hand(payloads[0], s.run.codec, layout, seed, 2))


def test_bad_payloads_are_rejected_and_the_round_goes_on():
    layout = Layout(("w",), ((50, 4),))
    s = build_pipeline(load(overrides=["strategy.name=ferret", "strategy.K=8"]))
    s.bind(seed=0, nodes={0: 1, 1: 2}, layout=layout, fraction_train=1.0, fraction_evaluate=0.0, rounds=5, timeout=10.0)
    msgs = list(s.configure_train(1, P.to_array_record({"w": np.zeros((50, 4), np.float32)}), ConfigRecord(), None))
    good = s.run.codec.encode(torch.ones(200), CodecContext(0, 1, layout, node=0))
    bad = dict(good, seed=np.full_like(good["seed"], 99))  # index outside the pool
    replies = [reply_to(m, None, 5, codec="ferret", payload=p) for p, m in ((good, msgs[0]), (bad, msgs[1]))]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None and s.last_participants == [0]
    assert len(s.last_rejected) == 1 and "out of range" in s.last_rejected[0][2]
    assert s.method.downlink.synced == {1: 0}  # the rejected node's copy is unknown: dense next time


# -- the downlink -------------------------------------------------------------------------------------


def _catch_up_everyone(s, grid, final_arrays, next_round):
    """Deliver round ``next_round``'s downlink to every node; return {node: rebuilt flat weights, how}."""
    s.run.fraction_train = 1.0
    out = {}
    for msg in s.configure_train(next_round, P.to_array_record(final_arrays), ConfigRecord(), grid):
        ctx = grid.contexts[msg.metadata.dst_node_id]
        config = dict(msg.content.config_records[P.CONFIG])
        job = TrainJob(options=config, state=ctx.state, task=load_task(grid.cfg.task, grid.cfg.federation.clients, 0),
                       partition_id=int(ctx.node_config["partition-id"]), server_round=next_round, seed=0)
        weights = CF.ferret_downlink(msg.content, job)
        out[msg.metadata.dst_node_id] = (job.task.layout.flatten(weights), config[SF.KEYS.sync], config.get(SF.KEYS.rounds))
    return out


def test_clients_rebuild_exactly_the_server_weights_after_partial_participation(tmp_path):
    cfg, rd, s, grid = run(tmp_path, "a", "run.rounds=6")
    rows = rd.read_metrics()
    assert all(r["rejected"] == 0 and r["clients"] == 3 for r in rows)  # no copy ever failed its check
    assert rows[0]["ferret_dense_nodes"] == 3
    assert max(max(r["ferret_catchup_rounds"], default=0) for r in rows) >= 2  # someone caught up on missed rounds
    final = rd.load_checkpoint()["arrays"]
    layout = load_task(cfg.task, 6, 0).layout
    server = layout.flatten(final)
    rebuilt = _catch_up_everyone(s, grid, final, 7)
    assert {how for _, how, _ in rebuilt.values()} == {"dense", "catch-up"}
    for node, (flat, how, rounds) in rebuilt.items():
        assert torch.equal(flat, server), (node, how, rounds)  # bit for bit
    # a catch-up costs a few KB, the dense weights 4·d bytes
    dense_msg = 4 * layout.d
    later = [r["downlink_bytes"] / 3 for r in rows[2:] if r["ferret_dense_nodes"] == 0]
    assert later and max(later) < dense_msg


def test_dense_downlink_gives_the_same_run(tmp_path):
    _, a, _, _ = run(tmp_path, "coef", "run.rounds=3")
    _, b, _, _ = run(tmp_path, "dense", "run.rounds=3", "strategy.downlink=dense")
    ra, rb = a.read_metrics(), b.read_metrics()
    down = ("downlink_bytes", "ferret_dense_nodes", "ferret_catchup_nodes", "ferret_catchup_rounds",
            "ferret_history_rounds", "ferret_history_bytes")
    assert strip(ra, *down) == strip(rb, *down)
    for k, v in a.load_checkpoint()["arrays"].items():
        assert np.array_equal(v, b.load_checkpoint()["arrays"][k])
    assert sum(r["downlink_bytes"] for r in ra) < sum(r["downlink_bytes"] for r in rb)
    assert all(r["ferret_dense_nodes"] == 3 and r["ferret_history_rounds"] == 0 for r in rb)


def test_catch_up_larger_than_the_dense_weights_falls_back_to_dense(tmp_path):
    # logistic regression: d = 650; 64 directions per block in 2 blocks is about as big as the weights
    _, rd, s, _ = run(tmp_path, "a", "task.model=logreg", "strategy.K=64", "run.rounds=4")
    rows = rd.read_metrics()
    assert all(r["ferret_history_bytes"] < 4 * s.run.layout.d for r in rows)
    assert all(r["rejected"] == 0 for r in rows)
    for r in rows:
        assert r["ferret_dense_nodes"] + r["ferret_catchup_nodes"] == 3


def test_client_refuses_a_catch_up_it_cannot_apply():
    cfg = load(overrides=BASE)
    task = load_task(cfg.task, 6, 0)
    layout = task.layout
    w = task.initial_weights()
    flat = layout.flatten(w)
    total, norm = weights_check(flat)
    state = RecordDict()
    base = {"codec-options": json.dumps({"K": 8}), T.FERRET_SERVER_LR: 1.0, SF.KEYS.global_round: 3, SF.KEYS.check_sum: total,
            SF.KEYS.check_norm: norm}

    def job(config):
        return TrainJob(options=config, state=state, task=task, partition_id=0, server_round=4, seed=0)

    catch_up = RecordDict({P.ARRAYS: P.to_array_record({}), P.CONFIG: ConfigRecord({})})
    with pytest.raises(ValueError, match="holds no copy"):
        CF.ferret_downlink(catch_up, job({**base, SF.KEYS.sync: "catch-up", SF.KEYS.base_round: 2, SF.KEYS.rounds: []}))
    dense = RecordDict({P.ARRAYS: P.to_array_record(w)})
    assert torch.equal(layout.flatten(CF.ferret_downlink(dense, job({**base, SF.KEYS.sync: "dense"}))), flat)
    assert CF.held_copy(state)[0] == 3
    # the server believes the node holds round 5: it does not
    with pytest.raises(ValueError, match="from round 3"):
        CF.ferret_downlink(catch_up, job({**base, SF.KEYS.sync: "catch-up", SF.KEYS.base_round: 5, SF.KEYS.global_round: 6,
                                          SF.KEYS.rounds: []}))
    CF.store_copy(state, 3, flat)
    with pytest.raises(ValueError, match="differ from the server"):
        CF.ferret_downlink(catch_up, job({**base, SF.KEYS.sync: "catch-up", SF.KEYS.base_round: 3, SF.KEYS.rounds: [],
                                          SF.KEYS.check_sum: total + 1.0}))
    assert CF.held_copy(state) is None  # a copy that failed its check is dropped
    with pytest.raises(ValueError, match="unknown ferret-sync"):
        CF.ferret_downlink(dense, job({**base, SF.KEYS.sync: "sparse"}))


def test_lost_reply_means_dense_weights_next_time(tmp_path):
    lost = {"n": 0}

    def fail(msg):  # lose node 1000's first train reply
        if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 1000 and not lost["n"]:
            lost["n"] += 1
            return True
        return False

    cfg = load(overrides=BASE + ["federation.fraction_train=1.0", "run.rounds=3"])
    _, rd, s, grid = run(tmp_path, "a", cfg=cfg, grid=LocalGrid(cfg, fail=fail))
    rows = rd.read_metrics()
    assert [r["clients"] for r in rows] == [5, 6, 6]
    assert [r["ferret_dense_nodes"] for r in rows] == [6, 1, 0]  # round 2: only the node whose reply was lost
    final = rd.load_checkpoint()["arrays"]
    layout = s.run.layout
    for flat, _, _ in _catch_up_everyone(s, grid, final, 4).values():
        assert torch.equal(flat, layout.flatten(final))


# -- resume, randomness --------------------------------------------------------------------------------


def test_resume_equals_uninterrupted(tmp_path):
    _, full, _, _ = run(tmp_path, "full", "run.rounds=5")
    cfg, part, s2, _ = run(tmp_path, "part", "run.rounds=2")
    state = s2.state_dict()
    assert state["method"]["downlink"]["history"]  # the checkpoint keeps the history (nodes restart empty)
    _, _, s, _ = run(tmp_path, "part", cfg=load(part.config_path, ["run.rounds=5"]), resume=True)
    # the resumed run's nodes start empty, so they first get dense weights: only the downlink differs
    down = ("downlink_bytes", "ferret_dense_nodes", "ferret_catchup_nodes", "ferret_catchup_rounds",
            "ferret_history_rounds", "ferret_history_bytes")
    assert strip(part.read_metrics(), *down) == strip(full.read_metrics(), *down)
    for k, v in full.load_checkpoint()["arrays"].items():
        assert np.array_equal(v, part.load_checkpoint()["arrays"][k])
    assert part.read_metrics()[2]["ferret_dense_nodes"] == 3


@pytest.mark.parametrize("strategy", ["ferret", "fedkseed"])
def test_global_random_state_is_untouched(tmp_path, strategy):
    extra = ["strategy.name=fedkseed", "strategy.K=16", "strategy.local_steps=3"] if strategy == "fedkseed" else []
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    run(tmp_path, "a", "run.rounds=2", *extra)
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0]
    assert np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])


# -- trainers --------------------------------------------------------------------------------------


def test_steps_trainer_takes_exactly_T_steps_over_reshuffled_passes():
    from stamen.client.trainers import epoch_batches

    model = torch.nn.Linear(3, 2)
    X = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 1, 0])
    s = TrainSettings(epochs=1, batch_size=4, lr=0.1)
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    job = TrainJob(options={T.LOCAL_STEPS: 5}, state=RecordDict(), task=None, partition_id=0, server_round=1, seed=0)
    loss, steps = CF.train_steps(model, X, y, s, torch.Generator().manual_seed(7), job)
    assert steps == 5
    # oracle: plain SGD over the batches of three shuffled passes (2 batches each), cut at 5
    g = torch.Generator().manual_seed(7)
    batches = [b for _ in range(3) for b in epoch_batches(6, 4, g)][:5]
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for idx in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(torch.as_tensor(X)[idx]), torch.as_tensor(y)[idx]).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_zeroth_order_trainer_matches_a_direct_implementation():
    cfg = load(overrides=BASE)
    task = load_task(cfg.task, 6, 0)
    layout = task.layout
    model = task.new_model()
    w0 = layout.flatten(get_weights(model)).double()
    X, y = task.data.client(0)
    options = {CF.ZO_STEPS: 6, CF.ZO_EPS: 1e-2, CF.ZO_LR: 1e-2, "codec-options": json.dumps({"K": 5})}
    state = RecordDict()
    job = TrainJob(options=options, state=state, task=task, partition_id=2, server_round=3, seed=9)
    s = TrainSettings(epochs=1, batch_size=16, lr=0.1)
    CF.train_zeroth_order(model, X, y, s, torch.Generator().manual_seed(1), job)
    got = layout.flatten(get_weights(model)).double()

    # direct implementation in float64 with a functional forward (independent of the trainer's in-place writes)
    from torch.func import functional_call

    ref_model = task.new_model().double()
    names = list(layout.names)

    def loss_at(flat, idx):
        params, start = {}, 0
        for name, shape, n in zip(names, layout.shapes, layout.numels):
            params[name] = flat[start:start + n].view(shape)
            start += n
        out = functional_call(ref_model, params, (torch.as_tensor(X[idx]).double(),))
        return float(torch.nn.functional.cross_entropy(out, torch.as_tensor(y[idx])))

    pool, d = seed_pool(9, 5), layout.d
    pick = np.random.default_rng(__import__("stamen.sketching.codec", fromlist=["derive_seed"]).derive_seed(
        9, 3, "fedkseed-seeds", 2))
    w, sums = w0.clone(), {}
    for idx in CF.step_batches(len(y), 16, 6, torch.Generator().manual_seed(1)):
        k = int(pick.integers(5))
        z = basis(pool[k], 0, d).double() / np.sqrt(basis_variance(d))
        g = (loss_at(w + 1e-2 * z, idx) - loss_at(w - 1e-2 * z, idx)) / 2e-2
        w = w - 1e-2 * g * z
        sums[k] = sums.get(k, 0.0) - 1e-2 * g / np.sqrt(basis_variance(d))
    assert torch.allclose(got, w, atol=1e-5)
    # the encoder sends exactly the accumulated coefficients (in the basis v = √ρ z)
    codec_state = P.from_array_record(state.array_records[CF.CODEC_STATE])
    enc = CF.FedKSeedEncoder(K=5, block_ratio=float(d))
    payload = enc.encode(got.float() - w0.float(), CodecContext(9, 3, layout, node=2), dict(codec_state))
    assert sorted(payload["seed"].tolist()) == sorted(sums)
    for k, v in zip(payload["seed"].tolist(), payload["value"].tolist()):
        assert v == pytest.approx(sums[k], rel=1e-3, abs=1e-7)
    assert (payload["block"] == 0).all()
    with pytest.raises(PayloadError, match="no coefficients of round 4"):
        enc.encode(got.float(), CodecContext(9, 4, layout, node=2), dict(codec_state))


def test_fedkseed_global_update_lies_in_the_span_of_the_seeded_directions(tmp_path):
    cfg, rd, s, grid = run(tmp_path, "a", "strategy.name=fedkseed", "strategy.K=16", "strategy.local_steps=8",
                           "strategy.lr=1e-3", "run.rounds=2")
    rows = rd.read_metrics()
    assert all(r["rejected"] == 0 and r["clients"] == 3 for r in rows)
    assert all(max(r["ferret_nnz"]) <= 8 for r in rows)  # at most one scalar per step
    layout = s.run.layout
    w0 = layout.flatten(load_task(cfg.task, 6, 0).initial_weights()).double().numpy()
    w2 = layout.flatten(rd.load_checkpoint()["arrays"]).double().numpy()
    V = np.stack([basis(k, 0, layout.d).double().numpy() for k in seed_pool(0, 16)], axis=1)  # all K directions
    coef, *_ = np.linalg.lstsq(V, w2 - w0, rcond=None)
    residual = np.linalg.norm(V @ coef - (w2 - w0))
    assert np.linalg.norm(w2 - w0) > 1e-4
    assert residual <= 1e-4 * np.linalg.norm(w2 - w0)
    # and not in the span of other directions: a different pool leaves most of it unexplained
    U = np.stack([basis(k, 0, layout.d).double().numpy() for k in seed_pool(1, 16)], axis=1)
    other, *_ = np.linalg.lstsq(U, w2 - w0, rcond=None)
    assert np.linalg.norm(U @ other - (w2 - w0)) > 0.5 * np.linalg.norm(w2 - w0)
    # clients rebuild the FedKSeed global model from the scalars, too
    for flat, _, _ in _catch_up_everyone(s, grid, rd.load_checkpoint()["arrays"], 3).values():
        assert torch.equal(flat, layout.flatten(rd.load_checkpoint()["arrays"]))


# -- one real simulation ---------------------------------------------------------------------------


@pytest.mark.slow
def test_ferret_in_a_ray_simulation_matches_the_in_process_run(tmp_path):
    """Nodes keep their copy of the global model in Flower's per-node state across rounds."""
    from stamen.experiment import simulate

    cfg = load(overrides=BASE + ["run.rounds=3"])
    simulate(cfg, tmp_path / "ray")
    rows = RunDirectory(tmp_path / "ray").read_metrics()
    assert all(r["rejected"] == 0 and r["clients"] == 3 for r in rows)
    assert sum(r["ferret_catchup_nodes"] for r in rows) > 0
    _, local, _, _ = run(tmp_path, "local", "run.rounds=3")
    assert strip(rows) == strip(local.read_metrics())
