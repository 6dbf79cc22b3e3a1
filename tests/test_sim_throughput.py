"""The simulation-throughput harness (benchmarks/sim_throughput.py): its workload rules are Stamen's,
its JSON has every field, and the bare loop and Stamen learn the same model on the same workload."""

import json

import numpy as np
import pytest
import torch

from stamen.benchmarks import _sim_workload as W
from stamen.benchmarks import sim_throughput as S
from stamen.config import load
from stamen.tasks.task import evaluate, load_task

RUN_FIELDS = ("system", "clients", "rounds", "status", "command", "startup_s", "median_round_s", "updates_per_s",
              "samples_per_s", "final_test_accuracy", "peak_rss_mib", "peak_pss_mib", "peak_processes", "total_s",
              "round_end_s", "round_clients", "round_samples", "round_test_accuracy")


def stamen_task(n=10, seed=0):
    cfg = load(None, S.stamen_overrides(n, 2, seed))
    return cfg, load_task(cfg.task, n, seed)


def test_workload_rules_are_stamens():
    from stamen.client.trainers import TrainSettings, epoch_batches, train_sgd
    from stamen.core import derive_seed
    from stamen.strategies.sampling import seeded_sample

    for parts in [(0, 3, "sample", "train"), (7, 1, "batches", 42), ("x", 1.5)]:
        assert W.derive_seed(*parts) == derive_seed(*parts)
    for n, rnd in [(10, 1), (100, 2), (1000, 20)]:
        assert W.cohort(0, rnd, n, 0.1) == seeded_sample(0, rnd, list(range(n)), 0.1)
    gen = torch.Generator().manual_seed(derive_seed(0, 4, "batches", 7))
    assert torch.equal(W.batch_order(0, 4, 7, 95), torch.cat(epoch_batches(95, 10, gen)))

    cfg, task = stamen_task()
    wl_model = W.MLP(60, 64, 10)
    wl_model.load_state_dict({k: torch.as_tensor(v) for k, v in task.initial_weights().items()})
    ref = task.new_model()
    X, y = task.data.client(3)
    W.local_train(wl_model, X, y, W.batch_order(0, 1, 3, len(y)), 10, 0.05)
    settings = TrainSettings.from_task(cfg.task, "cpu")
    train_sgd(ref, X, y, settings, torch.Generator().manual_seed(derive_seed(0, 1, "batches", 3)))
    for (k, a), b in zip(wl_model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert W.evaluate(wl_model, *task.data.test) == evaluate(ref, *task.data.test)


def test_stamen_synthetic_split_is_the_fedprox_rule():
    """Sizes ⌊lognormal(4, 2)⌋ + 50 capped at 500; each device shuffled once, its last 10 % to the test set."""
    from stamen.tasks.data import synthetic_fedprox

    cfg, task = stamen_task(n=30)
    devices = synthetic_fedprox(30, 1.0, 1.0, iid=False, seed=0, max_samples=500)
    test_x, start = task.data.test[0], 0
    for (dx, _), (cx, cy) in zip(devices, task.data.clients):
        n = len(dx)
        assert 50 <= n <= 500
        n_test = max(1, int(round(0.1 * n)))
        assert len(cy) == n - n_test
        held_out = test_x[start:start + n_test]
        start += n_test
        rows = lambda a: sorted(map(tuple, a.tolist()))  # noqa: E731
        assert rows(np.concatenate([cx, held_out])) == rows(dx)
    assert start == len(test_x)


def run_harness(tmp_path, systems):
    out = tmp_path / "sim.json"
    rc = S.main(["--sizes", "10", "--rounds", "2", "--systems", systems, "--out", str(out),
                 "--work-dir", str(tmp_path / "work")])
    return rc, json.loads(out.read_text())


def test_bare_loop_run_writes_every_field_and_learns(tmp_path):
    rc, result = run_harness(tmp_path, "bare")
    assert rc == 0
    assert {"command", "environment", "settings", "workloads", "runs", "summary"} <= set(result)
    assert "sim_throughput" in result["command"] and "--sizes 10" in result["command"]
    env = result["environment"]
    assert env["cpu_count"] >= 1 and env["torch"].startswith("2.13") and env["flwr"] == "1.39.0"
    assert result["workloads"]["10"]["clients_per_round"] == 1
    (run,) = result["runs"]
    assert set(RUN_FIELDS) <= set(run)
    assert run["status"] == "ok" and run["peak_processes"] == 1 and run["peak_rss_mib"] > 10
    assert len(run["round_end_s"]) == 2 and 0 < run["startup_s"] <= run["round_end_s"][1] <= run["total_s"]
    # above chance (10 classes) and above the initial model's accuracy
    _, task = stamen_task()
    _, initial_acc = evaluate(task.new_model(), *task.data.test)
    assert run["final_test_accuracy"] > max(0.1, initial_acc) + 0.1
    (row,) = result["summary"]
    assert row["round_vs_bare"] == 1.0 and row["final_test_accuracy"] == run["final_test_accuracy"]


@pytest.mark.slow
def test_bare_loop_and_stamen_agree(tmp_path):
    """Same data, initial weights, sampled clients and batch order: the two differ only in float
    rounding (Stamen's server rebuilds each client's weights as w_global + Δ in fp32 before the
    weighted average; the bare loop averages the client weights directly), about 1e-7 relative in
    the weights. A test prediction can flip only at a near-tie of two logits, so we allow 2 of the
    199 test examples (0.01) and 1e-4 relative in test loss; in practice they are equal."""
    rc, result = run_harness(tmp_path, "bare,stamen")
    assert rc == 0
    bare, stamen = (next(r for r in result["runs"] if r["system"] == s) for s in ("bare", "stamen"))
    assert stamen["peak_processes"] > 3  # driver + Ray GCS, raylet, workers: the whole tree is counted
    assert bare["round_clients"] == stamen["round_clients"] and bare["round_samples"] == stamen["round_samples"]
    assert abs(bare["final_test_accuracy"] - stamen["final_test_accuracy"]) <= 0.01
    assert bare["round_test_loss"][-1] == pytest.approx(stamen["round_test_loss"][-1], rel=1e-4)
    assert {r["system"]: r["round_vs_bare"] for r in result["summary"]}["bare"] == 1.0


PFL_VENV = S.default_pfl_venv()


@pytest.mark.skipif(not (PFL_VENV / "bin" / "python").exists(),
                    reason=f"no pfl virtualenv at {PFL_VENV} (`python -m stamen.benchmarks.sim_throughput "
                           "--systems pfl` creates it)")
def test_pfl_trains_the_same_model_as_the_bare_loop(tmp_path):
    """pfl gets the same cohorts and batch order; it averages Δs weighted by data points and adds the
    mean with a central SGD step of lr 1, so again only float rounding differs (same tolerance)."""
    rc, result = run_harness(tmp_path, "bare,pfl")
    assert rc == 0
    bare, pfl = (next(r for r in result["runs"] if r["system"] == s) for s in ("bare", "pfl"))
    assert pfl["peak_processes"] == 1
    assert bare["round_samples"] == pfl["round_samples"]
    assert abs(bare["final_test_accuracy"] - pfl["final_test_accuracy"]) <= 0.01
    assert bare["round_test_loss"][-1] == pytest.approx(pfl["round_test_loss"][-1], rel=1e-4)
