"""The cohort trained as one vectorised computation (client/cohort.py) against its oracle, the
per-client loop (client/trainers.py ``run_local_steps``, unchanged): the same clients, batches and
starting weights must give the same trained weights, losses and step counts up to float rounding,
and a whole run the same metrics.jsonl."""

import logging
import math

import numpy as np
import pytest
import torch
from _fakes import flower_identity  # noqa: F401
from _localgrid import LocalGrid
from torch import nn

from stamen import config as C
from stamen.client import cohort as V
from stamen.client.app import train_local
from stamen.client.trainers import TRAINERS, TrainJob, TrainSettings, train_sgd
from stamen.core import derive_seed
from stamen.server.inprocess_grid import InProcessGrid
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
from stamen.tasks.task import load_task

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# float tolerances of vectorised vs loop: the kernels differ (batched matmuls, a weighted sum for the
# batch mean, padded rows of weight 0), so sums are rounded in another order; a few ulps per step
W_ATOL, W_RTOL = 2e-5, 1e-4  # trained weights
LOSS_RTOL = 1e-5  # mean training loss
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-6  # run metrics (losses); accuracies within one test example


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def _task(*overrides, clients=12):
    cfg = C.load(overrides=[f"federation.clients={clients}", *overrides])
    return cfg, load_task(cfg.task, clients, 0)


def _jobs(task, settings, trainer="sgd", options=None, pids=None, weights=None, extra=()):
    """LocalJobs of ``pids`` with the batch generators the client pipeline derives; ``extra``: (X, y)
    clients appended (e.g. an empty one)."""
    weights = weights or task.initial_weights()
    data = [(p, *task.data.client(p)) for p in (pids if pids is not None else range(task.data.num_clients))]
    data += [(1000 + i, X, y) for i, (X, y) in enumerate(extra)]
    return [V.LocalJob(weights, X, y, settings, torch.Generator().manual_seed(derive_seed(0, 3, "batches", p)),
                       TrainJob(dict(options or {}), None, task, p, 3, 0), trainer) for p, X, y in data]


def _both(model, make_jobs, **kw):
    loop = V.train_clients(model, make_jobs(), lambda j: train_local(model, j), vectorise=False)
    vec = V.train_clients(model, make_jobs(), lambda j: train_local(model, j), vectorise=True, **kw)
    return loop, vec


def _assert_close(loop, vec, *, vectorised=True):
    assert len(loop) == len(vec)
    for a, b in zip(loop, vec):
        assert not isinstance(a, Exception) and not isinstance(b, Exception), (a, b)
        assert b.vectorised is vectorised
        assert a.steps == b.steps
        assert b.train_loss == pytest.approx(a.train_loss, rel=LOSS_RTOL, abs=1e-7)
        assert set(a.weights) == set(b.weights)
        for n in a.weights:
            np.testing.assert_allclose(b.weights[n], a.weights[n], atol=W_ATOL, rtol=W_RTOL, err_msg=n)


SETTINGS = {
    "sgd": dict(),
    "momentum": dict(momentum=0.9),
    "weight_decay": dict(weight_decay=0.05),
    "momentum+weight_decay": dict(momentum=0.5, weight_decay=0.01),
    "adam": dict(optimizer="adam", lr=0.003),
    "adam+weight_decay": dict(optimizer="adam", lr=0.003, weight_decay=0.01),
    "proximal": dict(proximal_mu=0.5),
    "proximal+momentum": dict(proximal_mu=0.1, momentum=0.9),
    "two_epochs": dict(epochs=2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_sgd_trainer_equals_the_loop(name, device):
    # synthetic clients of very different sizes (50..~450 examples): step counts 1..45 per epoch; one client
    # has 3 examples (a single short batch) and one has none (no step at all)
    cfg, task = _task("task.dataset=synthetic", "task.max_client_samples=500", "task.batch_size=10",
                      "task.local_epochs=1", "task.lr=0.05", "task.hidden=32")
    s = TrainSettings.from_task(cfg.task, device, **SETTINGS[name])
    rng = np.random.default_rng(0)
    tiny = (rng.normal(size=(3, 60)).astype(np.float32), np.array([1, 2, 3]))
    empty = (np.zeros((0, 60), np.float32), np.zeros(0, np.int64))
    model = task.new_model().to(device)
    loop, vec = _both(model, lambda: _jobs(task, s, extra=[tiny, empty]))
    _assert_close(loop, vec)
    steps = [r.steps for r in loop]
    assert len(set(steps)) > 3 and steps[-1] == 0 and steps[-2] == s.epochs  # clients take different step counts


ATTACKS = {
    "linf": {"attack-eps": 0.3, "attack-steps": 3},
    "l2+mix": {"attack-eps": 0.5, "attack-steps": 2, "attack-norm": "l2", "attack-mix": 0.5},
    "no_random_start": {"attack-eps": 0.2, "attack-steps": 2, "attack-random-start": False},
    "eps0": {"attack-eps": 0.0},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ATTACKS))
def test_adversarial_trainer_equals_the_loop(name, device):
    import stamen.client.trainers_adversarial  # noqa: F401  (registers the trainer)

    cfg, task = _task("task.dataset=synthetic", "task.max_client_samples=200", "task.batch_size=10",
                      "task.local_epochs=1", "task.lr=0.05", "task.hidden=32", clients=8)
    s = TrainSettings.from_task(cfg.task, device, momentum=0.5)
    model = task.new_model().to(device)
    loop, vec = _both(model, lambda: _jobs(task, s, "adversarial", ATTACKS[name]))
    _assert_close(loop, vec)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", ["cnn", "logreg", "mlp"])
def test_every_task_model_vectorises(model_name, device):
    cfg, task = _task(f"task.model={model_name}", "task.hidden=32", "task.local_epochs=1", clients=6)
    s = TrainSettings.from_task(cfg.task, device, momentum=0.9)
    model = task.new_model().to(device)
    assert V.stacked_forward(model).path == "batched matmuls"
    loop, vec = _both(model, lambda: _jobs(task, s))
    _assert_close(loop, vec)


class Residual(nn.Module):
    """Not a chain of layers: vectorised through torch.func (vmap over functional_call)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.b(torch.tanh(h) + 0.1 * h)


def test_any_pure_model_vectorises_through_torch_func():
    cfg, task = _task("task.local_epochs=1", clients=6)
    s = TrainSettings.from_task(cfg.task, "cpu", optimizer="adam", lr=0.01)
    model = Residual()
    assert V.stacked_forward(model).path == "torch.func vmap"
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    loop, vec = _both(model, lambda: _jobs(task, s, weights=weights))
    _assert_close(loop, vec)


def test_a_client_trains_the_same_whoever_shares_its_stack(monkeypatch):
    """Carriers train a round's clients in packs, the in-process grid all at once, chunks split big
    cohorts: a client's floats must not depend on that, or the engines would disagree."""
    cfg, task = _task("task.dataset=synthetic", "task.max_client_samples=300", "task.batch_size=10",
                      "task.local_epochs=1", "task.hidden=32", clients=10)
    s = TrainSettings.from_task(cfg.task, "cpu", momentum=0.9)
    model = task.new_model()
    loop = lambda j: train_local(model, j)  # noqa: E731
    whole = V.train_clients(model, _jobs(task, s), loop)
    parts = (V.train_clients(model, _jobs(task, s, pids=[0, 7, 3]), loop)
             + V.train_clients(model, _jobs(task, s, pids=[9]), loop))
    monkeypatch.setenv(V.ENV_CHUNK_MB, "0.05")  # a few clients per chunk
    chunked = V.train_clients(model, _jobs(task, s), loop)
    for i, part in zip([0, 7, 3, 9], parts):
        for n in part.weights:
            assert np.array_equal(part.weights[n], whole[i].weights[n])
    for a, b in zip(whole, chunked):
        assert all(np.array_equal(a.weights[n], b.weights[n]) for n in a.weights) and a.train_loss == b.train_loss


def test_trained_weights_never_alias_the_callers_weights():
    cfg, task = _task("task.local_epochs=1", clients=3)
    s = TrainSettings.from_task(cfg.task, "cpu")
    model = task.new_model()
    start = task.initial_weights()
    before = {k: v.copy() for k, v in start.items()}
    V.train_clients(model, _jobs(task, s, pids=[1], weights=start), lambda j: train_local(model, j))
    assert all(np.array_equal(start[k], before[k]) for k in start)  # a stack of one client copies too


def test_what_cannot_be_vectorised_trains_in_the_loop_and_says_so_once(caplog, monkeypatch):
    cfg, task = _task("task.local_epochs=1", clients=4)
    s = TrainSettings.from_task(cfg.task, "cpu")
    monkeypatch.setattr(V, "_NOTED", set())

    def my_trainer(model, X, y, settings, generator, job):  # a plugin's trainer: no vectorised form
        return train_sgd(model, X, y, settings, generator, job)

    monkeypatch.setitem(TRAINERS, "mine", my_trainer)
    monkeypatch.setitem(TRAINERS, "sgd", my_trainer)  # registered over sgd: no longer train_sgd
    model = task.new_model()
    with caplog.at_level(logging.INFO, logger="stamen.client"):
        for trainer in ("mine", "mine", "sgd"):
            loop, vec = _both(model, lambda: _jobs(task, s, trainer))
            for a, b in zip(loop, vec):
                assert not b.vectorised and all(np.array_equal(a.weights[n], b.weights[n]) for n in a.weights)
    notes = [r.getMessage() for r in caplog.records if "vectorised cohort training off" in r.getMessage()]
    assert len(notes) == 2 and "'mine'" in notes[0] and "'sgd'" in notes[1]


class WithBuffer(nn.Module):
    """A buffer (as BatchNorm's running statistics) is per-client state the stack does not carry."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 10)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return self.a(x.flatten(1)) * self.scale


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.func's vmap refuses it mid-run."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 10)

    def forward(self, x):
        out = self.a(x.flatten(1))
        return out if float(out.detach().sum()) > -1e9 else -out


@pytest.mark.parametrize("make", [WithBuffer, DataDependent])
def test_models_that_cannot_be_vectorised_fall_back_with_the_same_batches(make, caplog, monkeypatch):
    cfg, task = _task("task.local_epochs=2", clients=4)
    s = TrainSettings.from_task(cfg.task, "cpu")
    monkeypatch.setattr(V, "_NOTED", set())
    model = make()
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="stamen.client"):
        loop, vec = _both(model, lambda: _jobs(task, s, weights=weights))
    for a, b in zip(loop, vec):  # the loop from rewound generators: the same floats
        assert not b.vectorised and all(np.array_equal(a.weights[n], b.weights[n]) for n in a.weights)
    notes = [r for r in caplog.records if "vectorised cohort training off" in r.getMessage()]
    assert len(notes) == 1  # an error inside the vectorised path warns; a declared limit informs
    assert notes[0].levelno == (logging.WARNING if make is DataDependent else logging.INFO)


def test_a_client_whose_training_raises_gets_its_own_error():
    import stamen.client.trainers_adversarial  # noqa: F401

    cfg, task = _task("task.local_epochs=1", clients=4)
    s = TrainSettings.from_task(cfg.task, "cpu")
    model = task.new_model()
    jobs = _jobs(task, s, "adversarial", {"attack-eps": 0.1})
    jobs[2].job.options["attack-eps"] = -1.0  # bad options for one client only
    out = V.train_clients(model, jobs, lambda j: train_local(model, j))
    assert isinstance(out[2], ValueError) and "attack-eps" in str(out[2])
    assert all(o.vectorised for i, o in enumerate(out) if i != 2)


def test_the_switch(monkeypatch):
    cfg = C.load(overrides=[])
    assert V.vectorise_enabled(cfg)
    for off in ("0", "false", "off"):
        monkeypatch.setenv(V.ENV_SWITCH, off)
        assert not V.vectorise_enabled(cfg)
    monkeypatch.setenv(V.ENV_SWITCH, "1")
    assert V.vectorise_enabled(cfg)


# -- whole runs: metrics.jsonl of the vectorised run vs the per-client path ----------------------

BASE = ["federation.clients=8", "run.rounds=3", "task.local_epochs=1", "task.hidden=16"]

RUNS = {
    "fedavg+faults": ["faults.client_failure=0.25", "faults.byzantine_fraction=0.25",
                      "faults.byzantine_attack=label_flip", "federation.fraction_train=0.75"],
    "sign_flip+median": ["faults.byzantine_fraction=0.25", "faults.byzantine_attack=sign_flip",
                         "strategy.name=fedmedian"],
    "fedprox+momentum": ["strategy.name=fedprox", "strategy.proximal_mu=0.1", "task.momentum=0.9"],
    "adam+topk": ["task.optimizer=adam", "task.lr=0.003", "task.weight_decay=0.001", "compression.codec=topk"],
    "local_dp": ["privacy.clip=0.5", "privacy.noise_multiplier=0.3", "privacy.site=local", "privacy.sampling=none",
                 "privacy.reproducible_noise=true"],
    "fat": ["strategy.name=fat", "task.local_epochs=1"],
    "sketched_catchup": ["strategy.name=sketched_fedavg", "compression.codec=srht", "compression.ratio=0.25",
                         "federation.fraction_train=0.5"],
}


def _metrics(path):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in RunDirectory(path).read_metrics()]


def assert_same_run(a, b, test_examples):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in ra:
            x, y = ra[k], rb[k]
            if isinstance(x, float) and isinstance(y, float):
                tol = 1.0 / test_examples + 1e-12 if "accuracy" in k else max(METRIC_ATOL, METRIC_RTOL * abs(x))
                assert math.isclose(x, y, abs_tol=tol), (ra["round"], k, x, y)
            else:
                assert x == y, (ra["round"], k, x, y)


@pytest.mark.parametrize("name", list(RUNS))
def test_a_vectorised_run_equals_the_per_client_run(name, tmp_path, monkeypatch):
    cfg = C.load(overrides=BASE + RUNS[name])
    run_federation(InProcessGrid(cfg, vectorise=False), cfg, tmp_path / "loop")
    stacked = []
    original = V._train_stack
    monkeypatch.setattr(V, "_train_stack", lambda *a: stacked.append(len(a[1])) or original(*a))
    run_federation(InProcessGrid(cfg, vectorise=True), cfg, tmp_path / "vectorised")
    assert len(stacked) == cfg.run.rounds  # every round's clients trained as one stack (no fallback)
    test_examples = len(load_task(cfg.task, cfg.federation.clients, cfg.run.seed).data.test[1])
    a, b = _metrics(tmp_path / "loop"), _metrics(tmp_path / "vectorised")
    assert_same_run(a, b, test_examples)
    assert sum(r["clients"] for r in a) > 0


def test_the_environment_switch_reaches_the_grid(tmp_path, monkeypatch):
    import stamen.client.cohort as cohort

    cfg = C.load(overrides=BASE)
    calls = []
    original = cohort._train_stack
    monkeypatch.setattr(cohort, "_train_stack", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv(V.ENV_SWITCH, "0")
    run_federation(LocalGrid(cfg), cfg, tmp_path / "off")
    assert not calls
    monkeypatch.setenv(V.ENV_SWITCH, "1")
    run_federation(LocalGrid(cfg), cfg, tmp_path / "on")
    assert len(calls) == 3  # one stack per round: every client of the round at once


@pytest.mark.slow
def test_a_ray_simulation_trains_each_carrier_as_one_stack_and_equals_the_loop(tmp_path):
    """The real engine: Ray actors, carrier SuperNodes, packs; compared with the per-client loop."""
    from stamen.experiment import simulate

    cfg = C.load(overrides=BASE + ["federation.fraction_train=0.75", "faults.client_failure=0.2",
                                   "compression.codec=topk"])
    simulate(cfg, tmp_path / "ray")
    run_federation(InProcessGrid(cfg, vectorise=False), cfg, tmp_path / "loop")
    test_examples = len(load_task(cfg.task, cfg.federation.clients, cfg.run.seed).data.test[1])
    a, b = _metrics(tmp_path / "loop"), _metrics(tmp_path / "ray")
    assert_same_run(a, b, test_examples)
    assert sum(r["rejected"] for r in a) > 0
