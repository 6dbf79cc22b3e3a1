"""Real Flower simulations on Ray, small: results files, bytes, reproducibility, resume."""

import json

import pytest

from stamen.config import load
from stamen.experiment import simulate
from stamen.server.results import RunDirectory
from stamen.tasks.task import load_task

pytestmark = pytest.mark.slow

SMALL = ["federation.clients=6", "run.rounds=3", "task.local_epochs=1", "task.hidden=32"]


def run(tmp_path, name, *overrides):
    cfg = load(overrides=SMALL + list(overrides))
    out = tmp_path / name
    summary = simulate(cfg, out)
    return cfg, RunDirectory(out), summary


def strip_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_run_writes_results_and_counts_bytes(tmp_path):
    cfg, rd, summary = run(tmp_path, "a", "federation.fraction_train=0.5")
    rows = rd.read_metrics()
    assert [r["round"] for r in rows] == [1, 2, 3]
    for key in ("round", "test_accuracy", "test_loss", "train_loss", "clients", "uplink_bytes", "downlink_bytes", "wall_s"):
        assert all(r[key] is not None for r in rows), key
    # the configured fraction from round 1 on: 3 of 6 clients every round
    assert all(r["clients"] == 3 for r in rows)
    # a dense update of d fp32 numbers per client, plus a small framing of names, shapes and metrics
    d = load_task(cfg.task, 6, 0).layout.d
    for r in rows:
        assert 3 * 4 * d < r["uplink_bytes"] < 3 * (4 * d + 2048)
        assert 3 * 4 * d < r["downlink_bytes"] < 3 * (4 * d + 2048)
    assert summary["total_uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
    assert load(rd.config_path) == cfg
    assert (rd.path / "accuracy_loss.png").stat().st_size > 1000
    assert (rd.path / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert json.loads(rd.summary_path.read_text())["versions"]["flwr"] == "1.39.0"


def test_same_seed_same_metrics_under_ray_and_in_process(tmp_path):
    from _localgrid import LocalGrid

    from stamen.server.loop import run_federation

    # per-client state across rounds (error-feedback top-k) and error replies (failures) included
    opts = ["federation.fraction_train=0.5", "run.rounds=3", "compression.codec=topk", "faults.client_failure=0.2"]
    cfg, a, _ = run(tmp_path, "a", *opts)  # virtual clients on carrier SuperNodes (the default)
    _, b, _ = run(tmp_path, "b", *opts, "federation.virtual_clients=false")  # one SuperNode per client
    _, d, _ = run(tmp_path, "d", *opts, "federation.sim_nodes=4")  # 4 carriers on 2 actors
    assert strip_wall(a.read_metrics()) == strip_wall(b.read_metrics()) == strip_wall(d.read_metrics())
    assert sum(r["rejected"] for r in a.read_metrics()) > 0
    # scheduling does not enter the numbers: the same run in one process gives the same metrics
    run_federation(LocalGrid(cfg), cfg, tmp_path / "c")
    assert strip_wall(RunDirectory(tmp_path / "c").read_metrics()) == strip_wall(a.read_metrics())
