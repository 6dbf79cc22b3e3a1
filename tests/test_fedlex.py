"""FedLEx: guidance math, guided and exploring trainers, the strategy on an in-process grid."""

import copy
import pickle

import numpy as np
import pytest
import torch
from _localgrid import LocalGrid
from flwr.app import ConfigRecord, RecordDict

from stamen import schema as P
from stamen.schema import train as T
from stamen.strategies.sampling import seeded_sample
from stamen.client import trainers_guided as TG
from stamen.client.trainers import TrainJob, TrainSettings, train_sgd
from stamen.config import load
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
from stamen.core import derive_seed
from stamen.sketching.codec import make_codec
from stamen.strategies import fedlex as FL
from stamen.strategies.preflight import build_pipeline
from stamen.strategies.registry import StrategyConfigError
from stamen.tasks.task import get_weights, load_task

BASE = ["federation.clients=6", "run.rounds=3", "task.local_epochs=1", "task.hidden=8", "task.batch_size=16",
        "task.partition=pathological"]
FEDLEX = ["strategy.name=fedlex", "strategy.exploration_epochs=3", "strategy.patience=2",
          "strategy.explorer_fraction=0.5"]
NON_METRIC = {"wall_s"}


def cfg_of(*overrides):
    return load(overrides=BASE + list(overrides))


def run(tmp_path, name, *overrides, resume=False, cfg=None, grid=None):
    cfg = cfg or cfg_of(*overrides)
    out = tmp_path / name
    summary = run_federation(grid or LocalGrid(cfg), cfg, out, resume=resume)
    return cfg, RunDirectory(out).read_metrics(), summary


# -- the math -----------------------------------------------------------------------------------
def test_displacement_and_both_normalization_orders_by_hand():
    # W0 = [1, 2, 3, 4], explorer a ends at [1, 0, 6, 4], explorer b at [2, 2, 3, 0]
    da = FL.squared_displacement({"w": np.array([0.0, -2.0, 3.0, 0.0], np.float32)})
    db = FL.squared_displacement({"w": np.array([1.0, 0.0, 0.0, -4.0], np.float32)})
    np.testing.assert_array_equal(da["w"], [0, 4, 9, 0])
    np.testing.assert_array_equal(db["w"], [1, 0, 0, 16])
    # normalize each (÷9 and ÷16), then average
    g1 = FL.guidance_matrix([da, db], "normalize_then_average")["w"]
    np.testing.assert_allclose(g1, [(0 + 1 / 16) / 2, (4 / 9 + 0) / 2, (1 + 0) / 2, (0 + 1) / 2], rtol=1e-6)
    # average ([0.5, 2, 4.5, 8]), then normalize: (x − 0.5) / 7.5
    g2 = FL.guidance_matrix([da, db], "average_then_normalize")["w"]
    np.testing.assert_allclose(g2, [0, 1.5 / 7.5, 4 / 7.5, 1], rtol=1e-6)
    assert g1.dtype == g2.dtype == np.float32
    # per tensor, not global; a constant tensor carries no preference: G = 1
    g3 = FL.guidance_matrix([{"w": np.array([1.0, 3.0], np.float32), "b": np.full(3, 5.0, np.float32)}],
                            "normalize_then_average")
    np.testing.assert_array_equal(g3["w"], [0, 1])
    np.testing.assert_array_equal(g3["b"], [1, 1, 1])
    with pytest.raises(ValueError, match="at least one explorer"):
        FL.guidance_matrix([], "normalize_then_average")


class _TwoParameters(torch.nn.Module):
    """logits = x · (w1, w2): a two-class model with exactly two parameters, one tensor "w"."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float32))

    def forward(self, x):
        return x * self.w


def _one_guided_step(guidance, w0, optimizer, lr):
    from types import SimpleNamespace

    from stamen.core import Layout

    layout = Layout(("w",), ((2,),))
    model = _TwoParameters(w0)
    X, y = np.array([[2.0]], np.float32), np.array([0])
    job = TrainJob(options=_guided_options(guidance, SimpleNamespace(layout=layout)), state=RecordDict(),
                   task=SimpleNamespace(layout=layout), partition_id=0, server_round=1, seed=0)
    TG.train_guided(model, X, y, TrainSettings(epochs=1, batch_size=1, lr=lr, optimizer=optimizer),
                    torch.Generator().manual_seed(0), job)
    return model.w.detach().double().numpy()


def test_guidance_and_its_step_on_a_two_parameter_problem_by_hand():
    """Three explorers of a two-parameter model, the default G (the authors' order: average the squared
    displacements, then min-max per tensor), built per round from the sampled explorers, and one guided step:
    every number by hand. Under SGD, G scales the step per coordinate (here it freezes w2); under Adam a
    constant per-coordinate scale cancels and only G's zeros matter."""
    import math

    s = build_pipeline(cfg_of("strategy.name=fedlex")).method
    o = s.fedlex_options
    assert (o.normalization, o.guidance, o.rescale, o.explorer_fraction) == ("average_then_normalize", "per_round",
                                                                              "none", 1.0)
    # explorers' updates Δ = W_i − W0 → D = Δ²: a (0.09, 0.01), b (0.04, 0.16), c (0.25, 0)
    updates = {0: [0.3, -0.1], 1: [-0.2, 0.4], 2: [0.5, 0.0]}
    s.displacements = {p: FL.squared_displacement({"w": np.array(u, np.float32)}) for p, u in updates.items()}
    s.guidance = FL.guidance_matrix(list(s.displacements.values()), o.normalization)
    # all three sampled: mean D = (0.38, 0.17)/3 → min-max → (1, 0)
    np.testing.assert_allclose(s.guidance_for([0, 1, 2])["w"], [1.0, 0.0])
    # only a and b sampled: mean D = (0.065, 0.085) → (0, 1): a per-round G differs from the global one
    np.testing.assert_allclose(s.guidance_for([0, 1])["w"], [0.0, 1.0])
    # the paper's figure read the other way: min-max each explorer ((1, 0), (0, 1), (1, 0)), then average
    np.testing.assert_allclose(FL.guidance_matrix(list(s.displacements.values()), "normalize_then_average")["w"],
                               [2 / 3, 1 / 3], rtol=1e-6)

    # one example x = 2, label 0, at w = (0.5, −0.5): logits (1, −1), softmax p = (σ(2), σ(−2)),
    # ∇w CE = x·(p − e_0) = 2·(−σ(−2), σ(−2))
    g = 2 * (1 / (1 + math.exp(2))) * np.array([-1.0, 1.0])
    w0, lr = [0.5, -0.5], 0.5
    default_g = {"w": s.guidance_for([0, 1, 2])["w"]}
    np.testing.assert_allclose(_one_guided_step(default_g, w0, "sgd", lr), np.array(w0) - lr * np.array([1, 0]) * g,
                               rtol=1e-6)
    thirds = {"w": np.array([2 / 3, 1 / 3], np.float32)}
    np.testing.assert_allclose(_one_guided_step(thirds, w0, "sgd", lr),
                               np.array(w0) - lr * np.array([2 / 3, 1 / 3]) * g, rtol=1e-6)
    # Adam's first step is lr·ĝ/(|ĝ| + ε) ≈ lr·sign(ĝ): the scale 2/3, 1/3 cancels, a zero still freezes
    ones = {"w": np.ones(2, np.float32)}
    adam_plain = _one_guided_step(ones, w0, "adam", 0.1)
    np.testing.assert_allclose(adam_plain, np.array(w0) - 0.1 * np.sign(g), rtol=1e-5)
    np.testing.assert_allclose(_one_guided_step(thirds, w0, "adam", 0.1), adam_plain, rtol=1e-5)
    np.testing.assert_allclose(_one_guided_step(default_g, w0, "adam", 0.1), [0.5 + 0.1, -0.5], rtol=1e-5)


# -- the client trainers ------------------------------------------------------------------------
def _task():
    return load_task(cfg_of().task, 6, 0)


def _job(task, options, state=None, pid=0):
    return TrainJob(options=options, state=RecordDict() if state is None else state, task=task,
                    partition_id=pid, server_round=1, seed=0)


def _guided_options(guidance, task):
    raw = FL.guidance_bytes(guidance, task.layout)
    return {"trainer": "guided", T.GUIDANCE: raw, T.GUIDANCE_VERSION: FL.guidance_version(raw)}


@pytest.mark.parametrize("opt,momentum,wd", [("sgd", 0.0, 0.0), ("sgd", 0.9, 0.01), ("adam", 0.0, 0.01)])
def test_coordinates_with_zero_guidance_do_not_move(opt, momentum, wd):
    task = _task()
    X, y = task.data.client(0)
    rng = np.random.default_rng(1)
    guidance = {k: (rng.random(v.shape) * (rng.random(v.shape) > 0.4)).astype(np.float32)
                for k, v in task.initial_weights().items()}
    model = task.new_model()
    s = TrainSettings(epochs=3, batch_size=8, lr=0.05, optimizer=opt, momentum=momentum, weight_decay=wd)
    TG.train_guided(model, X, y, s, torch.Generator().manual_seed(0), _job(task, _guided_options(guidance, task)))
    w0, w1 = task.initial_weights(), get_weights(model)
    for k in w0:
        frozen = guidance[k] == 0
        assert frozen.any() and (~frozen).any()
        np.testing.assert_array_equal(w1[k][frozen], w0[k][frozen])
        assert (w1[k][~frozen] != w0[k][~frozen]).mean() > 0.5
    # the hooks are gone afterwards: plain training moves the formerly frozen coordinates too
    train_sgd(model, X, y, s, torch.Generator().manual_seed(1))
    w2 = get_weights(model)
    assert np.mean([(w2[k] != w1[k])[guidance[k] == 0].mean() for k in w1]) > 0.5


def test_guidance_is_a_per_coordinate_step_size_under_sgd():
    task = _task()
    X, y = task.data.client(1)
    ones = {k: np.ones_like(v) for k, v in task.initial_weights().items()}
    half = {k: np.full_like(v, 0.5) for k, v in task.initial_weights().items()}
    s = TrainSettings(epochs=2, batch_size=8, lr=0.2, weight_decay=0.001)

    def trained(fn, settings, guidance=None):
        model = task.new_model()
        job = _job(task, _guided_options(guidance, task)) if guidance else None
        fn(model, X, y, settings, torch.Generator().manual_seed(3), job)
        return task.layout.flatten(get_weights(model))

    plain = trained(train_sgd, s)
    assert torch.equal(trained(TG.train_guided, s, ones), plain)  # G = 1: bit-identical to sgd
    # G = ½ everywhere is plain SGD (weight decay included) with half the learning rate
    halved = trained(train_sgd, TrainSettings(epochs=2, batch_size=8, lr=0.1, weight_decay=0.001))
    torch.testing.assert_close(trained(TG.train_guided, s, half), halved, rtol=1e-4, atol=1e-5)


def test_guidance_is_cached_in_node_state_and_checked():
    task = _task()
    X, y = task.data.client(0)
    g = {k: np.full_like(v, 0.25) for k, v in task.initial_weights().items()}
    options = _guided_options(g, task)
    state = RecordDict()
    s = TrainSettings(epochs=1, batch_size=8, lr=0.1)
    TG.train_guided(task.new_model(), X, y, s, torch.Generator().manual_seed(0), _job(task, options, state))
    assert state.config_records[TG.STATE_GUIDANCE_META]["version"] == options[T.GUIDANCE_VERSION]
    cached = P.from_array_record(state.array_records[TG.STATE_GUIDANCE])
    assert all(np.array_equal(cached[k], g[k]) for k in g)
    # later rounds: version only, G comes from the cache — same training as with G attached
    lean = {k: v for k, v in options.items() if k != T.GUIDANCE}
    a, b = task.new_model(), task.new_model()
    TG.train_guided(a, X, y, s, torch.Generator().manual_seed(5), _job(task, lean, state))
    TG.train_guided(b, X, y, s, torch.Generator().manual_seed(5), _job(task, options, RecordDict()))
    assert all(np.array_equal(get_weights(a)[k], get_weights(b)[k]) for k in g)
    with pytest.raises(ValueError, match="holds FedLEx guidance version None"):
        TG.train_guided(task.new_model(), X, y, s, torch.Generator(), _job(task, lean, RecordDict()))
    with pytest.raises(ValueError, match="do not match"):
        TG.train_guided(task.new_model(), X, y, s, torch.Generator(),
                        _job(task, {**options, T.GUIDANCE_VERSION: "0" * 16}, RecordDict()))
    with pytest.raises(ValueError, match="must hold"):
        TG.train_guided(task.new_model(), X, y, s, torch.Generator(),
                        _job(task, {**options, T.GUIDANCE: options[T.GUIDANCE][:-4]}, RecordDict()))
    assert TG.guidance_version(b"xyz") == FL.guidance_version(b"xyz")  # the two sides agree


def _oracle_exploration(task, pid, epochs, patience, settings):
    """Explore from a fresh W0 with plain ``train_sgd``, one epoch at a time (SGD without
    momentum has no optimizer state, so this equals one continuous run), early-stopping by hand."""
    X, y = task.data.client(pid)
    model = task.new_model()
    gen = torch.Generator().manual_seed(derive_seed(0, FL.EXPLORATION_ROUND, "batches", pid))
    best, best_w, stale = float("inf"), None, 0
    for _ in range(epochs):
        loss, _ = train_sgd(model, X, y, replace_epochs(settings, 1), gen)
        if loss < best:
            best, best_w, stale = loss, get_weights(model), 0
        else:
            stale += 1
            if stale >= patience:
                break
    w0 = task.initial_weights()
    return {k: (w0[k] - best_w[k]) ** 2 for k in w0}


def replace_epochs(s, epochs):
    from dataclasses import replace

    return replace(s, epochs=epochs)


def test_each_explorer_trains_its_own_copy_of_w0():
    cfg = cfg_of(*FEDLEX, "strategy.exploration_epochs=6", "strategy.patience=1", "strategy.explorer_fraction=0.6",
                 "task.lr=0.5")
    task = load_task(cfg.task, 6, 0)
    grid = LocalGrid(cfg)
    pipeline = build_pipeline(cfg)
    pipeline.bind(seed=0, nodes={i: nid for i, nid in enumerate(grid.node_ids)}, layout=task.layout,
                  fraction_train=1.0, fraction_evaluate=0.0, rounds=2, timeout=60.0)
    pipeline._grid = grid  # the grid configure_train would have been given
    strategy = pipeline.method
    w0 = task.initial_weights()
    arrays = P.to_array_record(w0)
    strategy.explore(arrays)
    assert all(np.array_equal(arrays[k].numpy(), w0[k]) for k in w0)  # the initial weights are untouched
    explorers = strategy.exploration["explorers"]
    assert len(explorers) == 3 and strategy.exploration["rejected"] == 0
    settings = TrainSettings.from_task(cfg.task, "cpu")
    for pid in explorers:
        oracle = _oracle_exploration(task, pid, 6, 1, settings)
        for k in oracle:
            np.testing.assert_array_equal(strategy.displacements[pid][k], oracle[k])
    assert len(strategy.exploration["epochs_run"]) == 3 and all(1 <= e <= 6 for e in strategy.exploration["epochs_run"])
    # the default order (the authors' code): average the displacements, then min-max per tensor
    expected = FL.guidance_matrix([strategy.displacements[p] for p in explorers], "average_then_normalize")
    assert all(np.array_equal(strategy.guidance[k], expected[k]) for k in expected)
    # a second exploration with the explorers in the other order gives the same displacements
    again = build_pipeline(cfg)
    again.bind(seed=0, nodes={i: nid for i, nid in enumerate(grid.node_ids)}, layout=task.layout,
               fraction_train=1.0, fraction_evaluate=0.0, rounds=2, timeout=60.0)
    again._grid = grid
    again.run.sample = lambda *a, **k: list(reversed(explorers))
    again = again.method
    again.explore(arrays)
    for pid in explorers:
        assert all(np.array_equal(again.displacements[pid][k], strategy.displacements[pid][k]) for k in w0)


# -- the strategy on the in-process grid --------------------------------------------------------
def _config_overhead(version):
    """Bytes that the entries ``trainer`` and ``fedlex-guidance-version`` add to a train message."""
    plain = {"codec": "dense", "server-round": 1}
    return (P.content_bytes(RecordDict({"config": ConfigRecord({**plain, "trainer": "guided",
                                                                T.GUIDANCE_VERSION: version})}))
            - P.content_bytes(RecordDict({"config": ConfigRecord(plain)})))


@pytest.mark.parametrize("base", ["fedavg", "fedavgm"])
def test_all_ones_guidance_reduces_to_the_base_strategy(tmp_path, monkeypatch, base):
    monkeypatch.setattr(FL, "guidance_matrix", lambda ds, order: {k: np.ones_like(v) for k, v in ds[0].items()})
    monkeypatch.setenv("STAMEN_VECTORISE", "0")  # the guided trainer runs the loop: compare with the base's loop
    opts = ["federation.fraction_train=0.5", "run.rounds=3"]
    _, plain, _ = run(tmp_path, "plain", *opts, f"strategy.name={base}")
    cfg, guided, summary = run(tmp_path, "guided", *opts, *FEDLEX, f"strategy.base={base}")
    d = load_task(cfg.task, 6, 0).layout.d
    for p, g in zip(plain, guided):
        extra = set(g) - set(p)
        assert {"guidance_downlink_bytes", "guidance_sent", "guidance_version"} <= extra
        same = {k: g[k] for k in p if k not in NON_METRIC | {"downlink_bytes"}}
        assert same == {k: p[k] for k in same}  # accuracy, losses, uplink bytes: identical
        overhead = g["clients"] * _config_overhead(g["guidance_version"])
        assert g["downlink_bytes"] == p["downlink_bytes"] + overhead + g["guidance_downlink_bytes"]
    per_node = guided[0]["guidance_downlink_bytes"] // guided[0]["guidance_sent"]
    assert 4 * d < per_node <= 4 * d + 64  # fp32 per parameter plus the entry name and framing
    assert "exploration" in guided[0] and "exploration" not in guided[1]
    assert guided[0]["exploration_downlink_bytes"] > 0 and guided[0]["exploration_uplink_bytes"] > 0
    assert summary["exploration"]["explorers"] == guided[0]["exploration"]["explorers"]
    assert summary["total_guidance_downlink_bytes"] == sum(r["guidance_downlink_bytes"] for r in guided)


def test_guidance_travels_once_per_node(tmp_path):
    """With one global G (``strategy.guidance = global``, not the default) G travels once per node."""
    opts = ["federation.fraction_train=0.5", "run.rounds=4"]
    cfg, plain, _ = run(tmp_path, "plain", *opts)
    _, rows, _ = run(tmp_path, "fedlex", *opts, *FEDLEX, "strategy.guidance=global")
    seen, per_node = set(), None
    for r, p in zip(rows, plain):
        sampled = set(seeded_sample(cfg.run.seed, r["round"], list(range(6)), 0.5))
        new = sampled - seen
        seen |= sampled
        assert r["guidance_sent"] == len(new)
        per_node = per_node or r["guidance_downlink_bytes"] // r["guidance_sent"]
        assert r["guidance_downlink_bytes"] == len(new) * per_node
        # nodes that hold G cost what plain FedAvg costs plus the two small config entries
        assert r["downlink_bytes"] - r["guidance_downlink_bytes"] == \
            p["downlink_bytes"] + r["clients"] * _config_overhead(r["guidance_version"])
    assert sum(r["guidance_sent"] for r in rows) == len(seen) < sum(r["clients"] for r in rows)


def test_per_round_guidance_is_the_sampled_explorers_g_and_travels_when_it_changes(tmp_path):
    """The default (the authors' code): each round, G from the explorers among that round's sampled partitions
    (the global G when none of them explored); a node is sent G whenever the version it holds is not the round's."""
    opts = ["federation.fraction_train=0.5", "run.rounds=4"]
    cfg, rows, _ = run(tmp_path, "fedlex", *opts, *FEDLEX)
    state = RunDirectory(tmp_path / "fedlex").load_checkpoint()["strategy"]["method"]
    layout = load_task(cfg.task, 6, 0).layout
    displacements = {int(p): d for p, d in state["displacements"].items()}
    explorers = rows[0]["exploration"]["explorers"]
    assert sorted(displacements) == explorers and len(explorers) == 3  # explorer_fraction 0.5 of 6
    global_g = FL.guidance_matrix([displacements[p] for p in explorers], "average_then_normalize")
    held, versions = {}, set()
    for r in rows:
        sampled = seeded_sample(cfg.run.seed, r["round"], list(range(6)), 0.5)
        mine = [p for p in sorted(sampled) if p in displacements]
        g = FL.guidance_matrix([displacements[p] for p in mine], "average_then_normalize") if mine else global_g
        version = FL.guidance_version(FL.guidance_bytes(g, layout))
        assert r["guidance_version"] == version
        assert r["guidance_sent"] == sum(held.get(p) != version for p in sampled)
        held.update({p: version for p in sampled})
        versions.add(version)
    assert len(versions) > 1  # the sampled explorers changed, and so did G


def test_lost_reply_means_guidance_is_sent_again(tmp_path):
    cfg = cfg_of(*FEDLEX, "run.rounds=2")
    dropped = []

    def fail(msg):  # lose node 1007's first guided train reply
        if msg.metadata.dst_node_id == 1007 and msg.content.config_records["config"].get("trainer") == "guided" \
                and not dropped:
            dropped.append(msg)
            return True
        return False

    _, rows, _ = run(tmp_path, "x", cfg=cfg, grid=LocalGrid(cfg, fail=fail))
    assert [r["guidance_sent"] for r in rows] == [6, 1]
    assert [r["clients"] for r in rows] == [5, 6]


def test_resume_keeps_the_guidance(tmp_path):
    opts = [*FEDLEX, "federation.fraction_train=0.5"]
    _, full, _ = run(tmp_path, "full", *opts, "run.rounds=4")
    cfg, _, _ = run(tmp_path, "part", *opts, "run.rounds=2")
    g_before = RunDirectory(tmp_path / "part").load_checkpoint()["strategy"]["method"]["guidance"]
    _, part, _ = run(tmp_path, "part", resume=True, cfg=load(tmp_path / "part" / "config.toml", ["run.rounds=4"]))
    g_after = RunDirectory(tmp_path / "part").load_checkpoint()["strategy"]["method"]["guidance"]
    assert all(np.array_equal(g_before[k], g_after[k]) for k in g_before)
    skip = NON_METRIC | {"downlink_bytes", "guidance_downlink_bytes", "guidance_sent", "exploration"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in part] == \
           [{k: v for k, v in r.items() if k not in skip} for r in full]
    assert part[0]["exploration"]["explorers"] == full[0]["exploration"]["explorers"]
    assert "exploration" not in part[2]  # no second exploration
    assert part[2]["guidance_sent"] == part[2]["clients"]  # fresh nodes get G once more


def test_per_round_guidance_uses_the_sampled_explorers():
    cfg = cfg_of(*FEDLEX, "strategy.guidance=per_round", "strategy.normalization=average_then_normalize")
    s = build_pipeline(cfg).method
    d = {0: {"w": np.array([0, 1, 4], np.float32)}, 3: {"w": np.array([9, 1, 0], np.float32)}}
    s.displacements, s.guidance = copy.deepcopy(d), {"w": np.array([0.5, 0.5, 0.5], np.float32)}
    np.testing.assert_allclose(s.guidance_for([0, 1])["w"], [0, 0.25, 1])
    # explorers 0 and 3 sampled: mean D = [4.5, 1, 2], normalized (x − 1) / 3.5
    np.testing.assert_allclose(s.guidance_for([0, 3, 5])["w"], [1, 0, 1 / 3.5], rtol=1e-6)
    np.testing.assert_array_equal(s.guidance_for([1, 2])["w"], [0.5, 0.5, 0.5])  # no explorer sampled: global G


def test_options_are_validated_naming_the_key():
    with pytest.raises(StrategyConfigError, match="strategy.base"):
        build_pipeline(cfg_of("strategy.name=fedlex", "strategy.base=nope"))
    with pytest.raises(StrategyConfigError, match="strategy.base"):
        build_pipeline(cfg_of("strategy.name=fedlex", "strategy.base=fedlex"))
    with pytest.raises(StrategyConfigError, match="strategy.explorer_fraction"):
        build_pipeline(cfg_of("strategy.name=fedlex", "strategy.explorer_fraction=0"))
    with pytest.raises(StrategyConfigError, match="strategy.server_momentum"):  # fedavg takes no momentum
        build_pipeline(cfg_of("strategy.name=fedlex", "strategy.server_momentum=0.5"))
    s = build_pipeline(cfg_of("strategy.name=fedlex", "strategy.base=fedavgm", "strategy.server_momentum=0.5"))
    assert type(s.method).__name__ == "FedLEx" and s.method.base.server.flower.server_momentum == 0.5


@pytest.mark.slow
def test_ray_simulation_matches_the_in_process_run(tmp_path):
    """Real worker processes: the trainers load there, G is cached in each node's state."""
    from stamen.experiment import simulate

    cfg = cfg_of(*FEDLEX, "federation.clients=4", "federation.fraction_train=0.5", "run.rounds=3")
    simulate(cfg, tmp_path / "ray")
    run_federation(LocalGrid(cfg), cfg, tmp_path / "local")

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in NON_METRIC | {"exploration"}} for r in rows]

    ray_rows, local_rows = (RunDirectory(tmp_path / n).read_metrics() for n in ("ray", "local"))
    assert strip(ray_rows) == strip(local_rows)
    assert sum(r["guidance_sent"] for r in ray_rows) < sum(r["clients"] for r in ray_rows)  # cached across rounds


def test_a_base_with_its_own_trainer_is_refused():
    for base in ("fat", "curriculum"):
        with pytest.raises(StrategyConfigError, match=f"strategy.base='{base}' asks clients for its own trainer"):
            build_pipeline(cfg_of("strategy.name=fedlex", f"strategy.base={base}"))


def test_unit_mean_rescaling_by_hand():
    g = FL.unit_mean({"w": np.array([0.0, 0.5, 1.0], np.float32), "b": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(g["w"], [0, 1, 2])
    np.testing.assert_array_equal(g["b"], [0, 0])
    s = build_pipeline(cfg_of("strategy.name=fedlex", "strategy.rescale=unit_mean")).method
    s.guidance = {"w": np.array([0.25, 0.75], np.float32)}
    np.testing.assert_array_equal(s.guidance_for([0])["w"], [0.5, 1.5])


def test_exploration_with_a_held_apart_slice():
    task = _task()
    X, y = task.data.client(2)
    tr, va = TG.holdout_split(len(y), 0.3, 0, 2)
    assert len(va) == round(0.3 * len(y)) and sorted(np.concatenate([tr, va]).tolist()) == list(range(len(y)))
    assert np.array_equal(TG.holdout_split(len(y), 0.3, 0, 2)[1], va)  # seeded, reproducible
    s = TrainSettings(epochs=1, batch_size=8, lr=1.0)  # large enough that the held-apart loss turns up
    opts = {T.EXPLORATION_EPOCHS: 8, T.EXPLORATION_PATIENCE: 2, T.EXPLORATION_HOLDOUT: 0.3}
    model, job = task.new_model(), _job(task, opts, pid=2)
    TG.train_explore(model, X, y, s, torch.Generator().manual_seed(4), job)
    # oracle: plain SGD epochs on the training part only, early stopping on the held-apart loss
    oracle, gen = task.new_model(), torch.Generator().manual_seed(4)
    best, best_w, stale, epochs = float("inf"), None, 0, 0
    for epochs in range(1, 9):
        train_sgd(oracle, X[tr], y[tr], s, gen)
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(oracle(torch.as_tensor(X[va])), torch.as_tensor(y[va])))
        if loss < best:
            best, best_w, stale = loss, get_weights(oracle), 0
        else:
            stale += 1
            if stale >= 2:
                break
    assert job.metrics["exploration_epochs_run"] == epochs < 8  # it did stop early ...
    assert job.metrics["exploration_best_epoch"] < epochs  # ... and went back to its best epoch
    assert all(np.array_equal(get_weights(model)[k], best_w[k]) for k in best_w)


def test_exploration_is_dense_whatever_the_run_codec(tmp_path):
    cfg = cfg_of(*FEDLEX, "run.rounds=2", "compression.codec=topk", "compression.ratio=0.05")
    grid = LocalGrid(cfg)
    _, rows, _ = run(tmp_path, "topk", cfg=cfg, grid=grid)
    assert rows[0]["exploration"]["rejected"] == 0 and [r["clients"] for r in rows] == [6, 6]
    # a top-5% payload would leave ≥ 95% of each displacement zero; dense leaves almost none
    strategy_state = RunDirectory(tmp_path / "topk").load_checkpoint()["strategy"]["method"]
    for d in strategy_state["displacements"].values():
        flat = np.concatenate([v.ravel() for v in d.values()])
        assert (flat > 0).mean() > 0.5
