"""A federation too large to hold: on-demand partitions (tasks/data.py ``synthetic_ondemand``) and the
in-process grid's per-node state only where there is some (server/inprocess_grid.py)."""

import numpy as np
import pytest
from _fakes import flower_identity  # noqa: F401

from stamen import config as C
from stamen.server import loop
from stamen.server.inprocess_grid import InProcessGrid
from stamen.server.results import RunDirectory
from stamen.tasks.data import OnDemandSynthetic, iter_synthetic_fedprox
from stamen.tasks.task import load_task

ONDEMAND = ["task.dataset=synthetic_ondemand", "task.max_client_samples=200", "task.hidden=16",
            "task.local_epochs=1", "task.batch_size=10", "federation.fraction_train=0.25", "run.rounds=3"]


def test_a_client_is_a_function_of_the_seed_and_its_index():
    big = OnDemandSynthetic(100_000, 1.0, 1.0, iid=False, seed=3, max_samples=300, cache=2)
    again = OnDemandSynthetic(100_000, 1.0, 1.0, iid=False, seed=3, max_samples=300, cache=2)
    for k in (99_999, 5, 70_000, 5):  # any order, cache evictions included
        x, y = big[k]
        x2, y2 = again[k]
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
        assert len(y) == big.sizes[k] and x.shape == (len(y), 60) and x.dtype == np.float32
        whole_x, whole_y = big.device(k)  # the holdout is the device's last share
        assert np.array_equal(whole_x[:len(y)], x) and len(whole_y) == big.raw_sizes[k]
    assert len(big._cache) <= 2
    other = OnDemandSynthetic(100_000, 1.0, 1.0, iid=False, seed=4, max_samples=300)
    assert not np.array_equal(other[5][0][:3], big[5][0][:3])
    with pytest.raises(IndexError):
        big[100_000]


def test_on_demand_devices_follow_the_fedprox_recipe():
    """Same distribution as the sequential generator (different streams): sizes ⌊lognormal(4, 2)⌋ + 50
    capped, ten classes, inputs centred per device; compared on summary statistics over many devices."""
    n = 400
    lazy = OnDemandSynthetic(n, 1.0, 1.0, iid=False, seed=0, max_samples=500)
    seq = list(iter_synthetic_fedprox(n, 1.0, 1.0, iid=False, seed=0, max_samples=500))
    seq_sizes = np.array([len(y) for _, y in seq])
    assert abs(np.median(lazy.raw_sizes) - np.median(seq_sizes)) < 25
    assert lazy.raw_sizes.min() >= 50 and lazy.raw_sizes.max() <= 500
    lazy_std = np.mean([lazy.device(k)[0].std(0).mean() for k in range(50)])
    seq_std = np.mean([x.std(0).mean() for x, _ in seq[:50]])
    assert lazy_std == pytest.approx(seq_std, rel=0.1)


def test_sizes_without_building_the_data(monkeypatch):
    cfg = C.load(overrides=ONDEMAND + ["federation.clients=1000000"])
    data = load_task(cfg.task, cfg.federation.clients, 0).data
    assert data.num_clients == 1_000_000 and data.info["on_demand"]
    assert len(data.test[1]) > 1000  # the holdouts of 1,000 sampled devices
    monkeypatch.setattr(OnDemandSynthetic, "device", lambda self, k: pytest.fail("built a client's data"))
    assert data.size(123_456) == int(data.clients.sizes[123_456]) > 0


def test_discovery_in_one_call_equals_asking_every_node():
    cfg = C.load(overrides=ONDEMAND + ["federation.clients=40"])
    grid = InProcessGrid(cfg)
    assert loop.discover_nodes(grid, 40, 60.0) == grid.describe_partitions()
    assert len(grid.contexts) == 0  # the queries left no per-node state behind


def test_an_on_demand_run_keeps_state_only_for_nodes_that_have_some(tmp_path):
    # top-k error feedback keeps a residual per client that trained: a context for those only
    cfg = C.load(overrides=ONDEMAND + ["federation.clients=5000", "federation.fraction_train=0.002",
                                       "compression.codec=topk"])
    grid = InProcessGrid(cfg)
    run = loop.run_federation(grid, cfg, tmp_path / "run")
    rows = RunDirectory(tmp_path / "run").read_metrics()
    assert run["rounds"] == 3 and all(r["clients"] == 10 for r in rows)
    assert 10 <= len(grid.contexts) <= 30  # the clients that trained at least once, not 5000
    assert all(len(ctx.state) for ctx in grid.contexts.values())


def test_an_on_demand_run_is_the_same_vectorised_and_one_by_one(tmp_path):
    from test_cohort import _metrics, assert_same_run

    cfg = C.load(overrides=ONDEMAND + ["federation.clients=60"])
    loop.run_federation(InProcessGrid(cfg, vectorise=False), cfg, tmp_path / "a")
    loop.run_federation(InProcessGrid(cfg, vectorise=True), cfg, tmp_path / "b")
    assert_same_run(_metrics(tmp_path / "a"), _metrics(tmp_path / "b"),
                    len(load_task(cfg.task, 60, 0).data.test[1]))
