"""Federated adversarial training: trainer, strategy `fat`, robust evaluation — in-process and exact."""

import numpy as np
import pytest
import torch
from _localgrid import LocalGrid
from flwr.app import ConfigRecord, Message, RecordDict

from _fakes import flower_identity, reply_to  # noqa: F401
from stamen import schema as P
from stamen.client.trainers import TrainJob, TrainSettings, get_trainer, train_sgd
from stamen.client.trainers_adversarial import attack_from_options
from stamen.config import load
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
from stamen.core import Layout, derive_seed
from stamen.sketching.codec import make_codec
from stamen.strategies.preflight import build_pipeline
from stamen.strategies.registry import StrategyConfigError
from stamen.tasks.attacks import AttackConfig, robust_accuracy
from stamen.tasks.task import get_weights, load_task, set_weights

BASE = ["federation.clients=5", "run.rounds=3", "task.local_epochs=1", "task.hidden=16",
        "federation.fraction_train=0.6"]
VOLATILE = {"wall_s"}

torch.set_num_threads(1)  # as the client workers do; on a shared 2-core machine more threads only spin


from _fakes import flower_identity  # noqa: E402,F401  (autouse fixture)


def run(tmp_path, name, *overrides):
    cfg = load(overrides=BASE + list(overrides))
    out = tmp_path / name
    summary = run_federation(LocalGrid(cfg), cfg, out)
    rd = RunDirectory(out)
    return cfg, rd.read_metrics(), summary, rd.load_checkpoint()


def _job(task, options, pid=0, rnd=1):
    return TrainJob(options=options, state=RecordDict(), task=task, partition_id=pid, server_round=rnd, seed=0)


# ----------------------------------------------------------------------------- trainer


def test_adversarial_trainer_with_eps_zero_is_sgd_bit_for_bit():
    task = load_task(load(overrides=BASE).task, 5, 0)
    X, y = task.data.client(1)
    s = TrainSettings(epochs=2, batch_size=8, lr=0.1, momentum=0.5)
    a, b = task.new_model(), task.new_model()
    la = train_sgd(a, X, y, s, torch.Generator().manual_seed(7))
    lb = get_trainer("adversarial")(b, X, y, s, torch.Generator().manual_seed(7),
                                    _job(task, {"attack-eps": 0.0, "attack-steps": 5}))
    assert la == lb
    for k, v in get_weights(a).items():
        assert np.array_equal(v, get_weights(b)[k]), k


def test_adversarial_trainer_makes_the_client_model_robust():
    """Oracle: robust accuracy on the client's own data, same attack, sgd vs adversarial training."""
    task = load_task(load(overrides=BASE).task, 5, 0)
    X, y = task.data.client(0)
    s = TrainSettings(epochs=15, batch_size=16, lr=0.1)
    attack = AttackConfig(eps=0.2, steps=10)
    accs = {}
    for eps in (0.0, 0.2):
        model = task.new_model()
        get_trainer("adversarial")(model, X, y, s, torch.Generator().manual_seed(0),
                                   _job(task, {"attack-eps": eps, "attack-steps": 10}))
        accs[eps] = robust_accuracy(model, X, y, attack, (0.0, 1.0), generator=torch.Generator().manual_seed(1))
    assert accs[0.2] > accs[0.0] + 0.05, accs


@pytest.mark.parametrize("options, key", [
    ({}, "attack-eps"),
    ({"attack-eps": -0.1}, "attack-eps"),
    ({"attack-eps": "big"}, "attack-eps"),
    ({"attack-eps": 0.1, "attack-norm": "l1"}, "attack-norm"),
    ({"attack-eps": 0.1, "attack-steps": 0}, "attack-steps"),
    ({"attack-eps": 0.1, "attack-steps": 2.5}, "attack-steps"),
    ({"attack-eps": 0.1, "attack-mix": 1.5}, "attack-mix"),
    ({"attack-eps": 0.1, "attack-random-start": "yes"}, "attack-random-start"),
])
def test_bad_attack_entries_are_named(options, key):
    with pytest.raises(ValueError, match=key):
        attack_from_options(options)


def test_attack_options_round_trip():
    attack, mix = attack_from_options({"attack-eps": 0.3, "attack-steps": 4, "attack-step-size": -1.0,
                                       "attack-norm": "l2", "attack-mix": 0.5})
    assert attack == AttackConfig(kind="pgd", norm="l2", eps=0.3, steps=4, step_size=None) and mix == 0.5
    assert attack.resolved_step_size == pytest.approx(2.5 * 0.3 / 4)


# ----------------------------------------------------------------------------- strategy


def test_fat_with_eps_zero_is_fedavg(tmp_path):
    _, fedavg, _, ck_a = run(tmp_path, "fedavg", "strategy.name=fedavg")
    _, fat, _, ck_b = run(tmp_path, "fat", "strategy.name=fat", "strategy.eps=0.0", "eval.robust=false")
    for ra, rb in zip(fedavg, fat, strict=True):
        assert set(ra) == set(rb)
        diff = {k for k in ra if ra[k] != rb[k]} - VOLATILE
        assert diff == {"downlink_bytes"}, diff
    for k, v in ck_a["arrays"].items():
        assert np.array_equal(v, ck_b["arrays"][k]), k
    # the only difference: the attack settings riding in each train message's config (oracle: protobuf size)
    weights = P.to_array_record(load_task(load(overrides=BASE).task, 5, 0).initial_weights())
    base = {"server-round": 1, "codec": "dense", P.SCHEMA: 1, P.RUN_ID: "0" * 16, P.NONCE: "0" * 32,
            P.PARTITION_ID: 0}  # as every instruction: identity entries of the same lengths
    extra = {"trainer": "adversarial", "attack-eps": 0.0, "attack-steps": 10, "attack-step-size": 0.0,
             "attack-norm": "linf", "attack-mix": 1.0, "attack-random-start": True}
    per_msg = (P.content_bytes(RecordDict({P.ARRAYS: weights, P.CONFIG: ConfigRecord({**base, **extra})}))
               - P.content_bytes(RecordDict({P.ARRAYS: weights, P.CONFIG: ConfigRecord(base)})))
    for ra, rb in zip(fedavg, fat):
        assert rb["downlink_bytes"] - ra["downlink_bytes"] == ra["clients"] * per_msg


LAYOUT = Layout(("w", "b"), ((2, 2), (2,)))
NODES = {0: 1001, 1: 1002, 2: 1003}


class _FakeGrid:
    def get_node_ids(self):
        return list(NODES.values())


def _bound(**opts):
    cfg = load(overrides=["strategy.name=fat"] + [f"strategy.{k}={v}" for k, v in opts.items()])
    s = build_pipeline(cfg)
    s.bind(seed=0, nodes=NODES, layout=LAYOUT, fraction_train=1.0, fraction_evaluate=0.0, rounds=2, timeout=10.0)
    return s


@pytest.mark.parametrize("eta", [1.0, 0.5, 2.0])
def test_server_learning_rate_matches_hand_computation(eta):
    g = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.array([0.5, -0.5], np.float32)}
    s = _bound(server_lr=eta)
    msgs = list(s.configure_train(1, P.to_array_record(g), ConfigRecord(), _FakeGrid()))
    cfg = msgs[0].content.config_records[P.CONFIG]
    assert cfg["trainer"] == "adversarial" and cfg["attack-eps"] == pytest.approx(0.2)  # digits default
    # client deltas (flattened w then b) and example counts 1, 1, 2
    deltas = {1001: [1, 0, 0, 0, 2, 0], 1002: [0, 1, 0, 0, 0, 0], 1003: [0, 0, 2, 2, 0, -4]}
    counts = {1001: 1, 1002: 1, 1003: 2}
    replies = [reply_to(m, deltas[m.metadata.dst_node_id], counts[m.metadata.dst_node_id]) for m in msgs]
    arrays, _ = s.aggregate_train(1, replies)
    # by hand: mean Δ = (1·Δ1 + 1·Δ2 + 2·Δ3)/4 = [0.25, 0.25, 1, 1, 0.5, -2]; w = g + η·meanΔ
    mean_delta = np.array([0.25, 0.25, 1.0, 1.0, 0.5, -2.0])
    expected = np.array([1, 2, 3, 4, 0.5, -0.5]) + eta * mean_delta
    got = LAYOUT.flatten(P.from_array_record(arrays)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("key, value", [("eps", -0.1), ("norm", "l1"), ("steps", 0), ("mix", 1.5),
                                        ("server_lr", 0), ("step_size", -1), ("radius", 1)])
def test_bad_strategy_options_are_named(key, value):
    with pytest.raises(StrategyConfigError, match=f"strategy.{key}"):
        build_pipeline(load(overrides=["strategy.name=fat", f"strategy.{key}={value}"]))


def test_defaults_follow_the_task():
    digits = build_pipeline(load(overrides=["strategy.name=fat"])).method
    assert (digits.eps, digits.norm, digits.steps) == (0.2, "linf", 10)
    assert digits.resolved_step_size == pytest.approx(0.05)
    synth = build_pipeline(load(overrides=["strategy.name=fat", "task.dataset=synthetic"])).method
    assert synth.eps > 0 and synth.norm == "linf"
    explicit = build_pipeline(load(overrides=["strategy.name=fat", "strategy.eps=0.05", "strategy.norm=l2"])).method
    assert (explicit.eps, explicit.norm) == (0.05, "l2")
    zero = build_pipeline(load(overrides=["strategy.name=fat", "strategy.eps=0"])).method
    assert zero.threat_model() == {"norm": "linf", "eps": 0.2}  # ε = 0 still evaluates under the task's threat


# ----------------------------------------------------------------------------- robust evaluation


def test_robust_accuracy_is_recorded_and_reproducible(tmp_path):
    cfg, rows, summary, ck = run(tmp_path, "fat", "strategy.name=fat", "strategy.steps=3", "run.rounds=3",
                                 "eval.robust_every=2")
    robust = [r["robust_accuracy"] for r in rows]
    assert robust[0] is None and robust[1] is not None and robust[2] is not None  # rounds 2 and 3 (the last)
    for r in rows[1:]:
        assert 0.0 <= r["robust_accuracy"] <= r["test_accuracy"]
        assert 0.0 <= r["fgsm_accuracy"] <= r["test_accuracy"]
    assert summary["robust_eval"]["pgd"] == {"kind": "pgd", "norm": "linf", "eps": 0.2, "steps": 20,
                                             "step_size": pytest.approx(0.025), "random_start": True}
    assert summary["robust_eval"]["fgsm"]["kind"] == "fgsm"
    assert summary["train_attack"]["eps"] == 0.2 and summary["train_attack"]["steps"] == 3
    assert summary["final_robust_accuracy"] == rows[-1]["robust_accuracy"]
    # oracle: attack the final global model again with the documented settings and generator
    task = load_task(cfg.task, 5, 0)
    model = task.new_model()
    set_weights(model, ck["arrays"])
    gen = torch.Generator().manual_seed(derive_seed(0, 3, "robust-eval", "pgd"))
    again = robust_accuracy(model, *task.data.test, AttackConfig(eps=0.2, steps=20, step_size=0.025), (0.0, 1.0),
                            512, gen)
    assert again == rows[-1]["robust_accuracy"]


def test_robust_evaluation_is_off_for_fedavg_unless_asked(tmp_path):
    _, rows, summary, _ = run(tmp_path, "a", "run.rounds=1")
    assert "robust_accuracy" not in rows[0] and "robust_eval" not in summary
    _, rows, summary, _ = run(tmp_path, "b", "run.rounds=1", "eval.robust=true", "eval.fgsm=false",
                              "eval.attack_eps=0.1", "eval.attack_norm=l2", "eval.robust_samples=50")
    assert 0 <= rows[0]["robust_accuracy"] <= 1 and "fgsm_accuracy" not in rows[0]
    assert summary["robust_eval"]["pgd"]["eps"] == 0.1 and summary["robust_eval"]["pgd"]["norm"] == "l2"
    assert summary["robust_eval"]["samples"] == 50

