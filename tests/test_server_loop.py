"""The server loop with an in-process grid: results, resume, bad input — fast and exact."""

import numpy as np
import pytest
from _localgrid import LocalGrid

from stamen.config import load
from stamen.server.loop import run_federation
from stamen.server.results import CheckpointError, RunDirectory
from stamen.tasks.task import load_task

BASE = ["federation.clients=5", "run.rounds=3", "task.local_epochs=1", "task.hidden=16"]


def run(tmp_path, name, *overrides, resume=False, cfg=None):
    cfg = cfg or load(overrides=BASE + list(overrides))
    out = tmp_path / name
    summary = run_federation(LocalGrid(cfg), cfg, out, resume=resume)
    return cfg, RunDirectory(out), summary


def strip_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_metrics_rows_and_exact_dense_bytes(tmp_path):
    from stamen import protocol as P

    cfg, rd, summary = run(tmp_path, "a", "federation.fraction_train=0.6")
    rows = rd.read_metrics()
    assert [r["clients"] for r in rows] == [3, 3, 3]
    d = load_task(cfg.task, 5, 0).layout.d
    # oracle: the protobuf size of a dense payload of d fp32 numbers with its records
    reply = P.train_reply({"values": np.zeros(d, np.float32)},
                          {P.NUM_EXAMPLES: 1, "train_loss": 0.5, "local_steps": 1}, "dense", 0)
    one = P.content_bytes(reply)
    for r in rows:
        assert abs(r["uplink_bytes"] - 3 * one) <= 3 * 16  # varints of counts differ by a few bytes
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]


def test_reproducible_and_seed_sensitive(tmp_path):
    _, a, _ = run(tmp_path, "a", "federation.fraction_train=0.6")
    _, b, _ = run(tmp_path, "b", "federation.fraction_train=0.6")
    _, c, _ = run(tmp_path, "c", "federation.fraction_train=0.6", "run.seed=3")
    assert strip_wall(a.read_metrics()) == strip_wall(b.read_metrics()) != strip_wall(c.read_metrics())


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm", "fedavg", "fedprox", "fedmedian", "krum", "fedtrimmedavg"])
def test_resume_equals_uninterrupted(tmp_path, strategy):
    opts = [f"strategy.name={strategy}", "federation.fraction_train=0.6"]
    _, full, _ = run(tmp_path, "full", *opts, "run.rounds=4")
    cfg, part, _ = run(tmp_path, "part", *opts, "run.rounds=2")
    run(tmp_path, "part", resume=True, cfg=load(part.config_path, ["run.rounds=4"]))
    assert strip_wall(part.read_metrics()) == strip_wall(full.read_metrics())


def test_resume_refuses_other_config_and_broken_checkpoint(tmp_path):
    cfg, rd, _ = run(tmp_path, "a", "run.rounds=1")
    with pytest.raises(CheckpointError, match="different config"):
        run(tmp_path, "a", resume=True, cfg=load(rd.config_path, ["run.seed=9"]))
    rd.checkpoint_path.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="unreadable"):
        run(tmp_path, "a", resume=True, cfg=load(rd.config_path, ["run.rounds=2"]))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(tmp_path, "empty", resume=True, cfg=cfg)


def test_lost_replies_are_survived(tmp_path):
    cfg = load(overrides=BASE)
    grid = LocalGrid(cfg, fail=lambda m: m.metadata.message_type == "train" and m.metadata.dst_node_id == 1000)
    run_federation(grid, cfg, tmp_path / "x")
    rows = RunDirectory(tmp_path / "x").read_metrics()
    assert [r["clients"] for r in rows] == [4, 4, 4]


def test_federated_evaluation_is_recorded(tmp_path):
    _, rd, _ = run(tmp_path, "a", "federation.fraction_evaluate=1.0")
    rows = rd.read_metrics()
    assert all(0 <= r["federated_eval_accuracy"] <= 1 and r["eval_uplink_bytes"] > 0 for r in rows)


def test_proximal_term_keeps_weights_near_the_anchor():
    import torch

    from stamen.client.trainers import TrainSettings, train_sgd
    from stamen.tasks.task import get_weights

    task = load_task(load(overrides=BASE).task, 5, 0)
    X, y = task.data.client(0)
    dist = []
    for mu in (0.0, 1.0, 100.0):
        model = task.new_model()
        w0 = task.layout.flatten(get_weights(model))
        train_sgd(model, X, y, TrainSettings(epochs=3, batch_size=8, lr=0.005, proximal_mu=mu),
                  torch.Generator().manual_seed(0))
        dist.append(float((task.layout.flatten(get_weights(model)) - w0).norm()))
    assert dist[0] > dist[1] > dist[2]
