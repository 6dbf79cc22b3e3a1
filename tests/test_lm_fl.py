"""The federated language-modelling task: dataset ``stdlib`` (token windows), model ``gpt``, a run."""

from __future__ import annotations

import math
import random
from itertools import combinations

import numpy as np
import pytest
import torch
from _localgrid import LocalGrid

import stamen.client.trainers_ferret  # noqa: F401  (registers DOWNLINKS["ferret"])
from stamen.config import load
from stamen.experiment import preflight
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
from stamen.tasks.data import DataError
from stamen.tasks.lm import (GPTConfig, TokenLogitsGPT, VocabSize, build_gpt, lm_loss, stdlib_corpus,
                             token_windows)
from stamen.tasks.models import build_model
from stamen.tasks.task import evaluate, get_weights, load_task

#: a small GPT and little data: every test here runs in seconds
SMALL = ["task.dataset=stdlib", "task.model=gpt", "task.context=32", "task.n_layer=1", "task.n_head=2",
         "task.n_embd=32", "task.max_bytes_per_client=3300", "task.max_test_bytes=2000", "task.pretrained=false",
         "federation.clients=5", "task.batch_size=8", "task.local_epochs=1", "task.optimizer=adam", "task.lr=0.003"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task():
    cfg = load(overrides=SMALL)
    return load_task(cfg.task, 5, 0)


def test_token_windows_are_fixed_non_overlapping_and_shifted():
    tokens = torch.arange(23, dtype=torch.uint8)
    X, y = token_windows(tokens, 4)
    assert X.dtype == y.dtype == np.int64 and X.shape == y.shape == (4, 4)  # 23 // 5 = 4 windows, 3 dropped
    assert X[:, 0].tolist() == [0, 5, 10, 15] and X[1].tolist() == [5, 6, 7, 8] and y[1].tolist() == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="context"):
        token_windows(tokens, 0)


def test_client_examples_are_the_windows_of_their_own_token_stream(task):
    data = task.data
    assert data.name == "stdlib" and data.num_classes == 256 and data.input_shape == (32,)
    corpus = stdlib_corpus(max_bytes_per_client=3300, seed=0, num_clients=5, max_test_bytes=2000,
                           test_fraction=0.2, pretrain_seed=0)
    assert data.info["client_names"] == list(corpus.client_names)
    for pid in range(5):
        X, y = data.client(pid)
        stream = corpus.client(pid).numpy().astype(np.int64)
        assert X.shape == y.shape == (3300 // 33, 32) and X.dtype == y.dtype == np.int64
        for i in (0, len(X) - 1):  # oracle: slice the stream directly
            assert np.array_equal(X[i], stream[33 * i:33 * i + 32]) and np.array_equal(y[i], stream[33 * i + 1:33 * i + 33])
        assert X.min() >= 0 and X.max() <= 255
    Xt, yt = data.test
    assert Xt.shape == (2000 // 33, 32) and np.array_equal(Xt[:, 1:], yt[:, :-1])


def _byte_histogram(X):
    h = np.bincount(X.reshape(-1), minlength=256).astype(np.float64)
    return h / h.sum()


def test_clients_are_non_iid(task):
    """Byte distributions differ between packages far more than between random splits of the same text."""
    parts = [task.data.client(p)[0] for p in range(5)]
    natural = np.mean([0.5 * np.abs(_byte_histogram(a) - _byte_histogram(b)).sum() for a, b in combinations(parts, 2)])
    pooled = np.concatenate(parts)
    perm = np.random.default_rng(0).permutation(len(pooled))
    shuffled = np.array_split(pooled[perm], 5)
    iid = np.mean([0.5 * np.abs(_byte_histogram(a) - _byte_histogram(b)).sum() for a, b in combinations(shuffled, 2)])
    assert natural > 2 * iid


def test_gpt_model_logits_and_per_token_loss(task):
    model = task.new_model()
    assert isinstance(model, TokenLogitsGPT) and model.config == GPTConfig(context=32, n_layer=1, n_head=2, n_embd=32)
    X, y = task.data.test
    logits = model(torch.as_tensor(X[:3]))
    assert logits.shape == (3, 256, 32)
    loss, acc = evaluate(model, X, y, batch_size=16)
    # oracle: the GPT's own mean next-token loss, computed on (batch, positions, vocab) logits
    with torch.no_grad():
        ref = float(lm_loss(model.gpt, torch.as_tensor(X), torch.as_tensor(y)))
        pred = model.gpt(torch.as_tensor(X)).argmax(-1).numpy()
    assert loss == pytest.approx(ref, rel=1e-5)
    assert acc == pytest.approx(float((pred == y).mean()), abs=1e-9)
    # untrained: about uniform over the 256 bytes, so perplexity = exp(loss) is near 256
    assert 150 < math.exp(loss) < 400


def test_gpt_init_is_seeded_and_leaves_the_global_rng_alone(task):
    random.seed(1)
    torch.manual_seed(1)
    state = torch.get_rng_state().clone()
    a, b = task.new_model(), task.new_model()
    assert torch.equal(state, torch.get_rng_state())
    for k, v in get_weights(a).items():
        assert np.array_equal(v, get_weights(b)[k])
    other = build_model("gpt", (32,), task.data.num_classes, 0, seed=99)
    assert not np.array_equal(get_weights(other)["gpt.wte.weight"], get_weights(a)["gpt.wte.weight"])
    # without the task's spec (a plain int): a default-shaped GPT from scratch
    plain = build_gpt((16,), 256)
    assert plain.config.context == 16 and plain.config.n_embd == 208
    with pytest.raises(ValueError, match="shape"):
        build_gpt((4, 4), 256)


def test_pretrained_start_is_cached_and_better_than_scratch(tmp_path):
    cfg = load(overrides=SMALL + ["task.pretrained=true", "task.pretrain_steps=30", f"task.cache_dir={tmp_path}"])
    task = load_task(cfg.task, 5, 0)
    pretrained = task.new_model()
    files = list(tmp_path.glob("gpt-pretrain-*.pt"))
    assert len(files) == 1
    again = task.new_model()  # memoised / from the cache: identical weights
    for k, v in get_weights(pretrained).items():
        assert np.array_equal(v, get_weights(again)[k])
    scratch = load_task(load(overrides=SMALL).task, 5, 0).new_model()
    X, y = task.data.test
    assert evaluate(pretrained, X, y)[0] < evaluate(scratch, X, y)[0] - 0.5
    # the cached base model does not depend on the run seed or the federation's size
    other = load_task(load(overrides=SMALL + ["task.pretrained=true", "task.pretrain_steps=30",
                                              f"task.cache_dir={tmp_path}", "federation.clients=4"]).task, 4, 3)
    for k, v in get_weights(other.new_model()).items():
        assert np.array_equal(v, get_weights(pretrained)[k])
    assert len(list(tmp_path.glob("gpt-pretrain-*.pt"))) == 1


def test_run_config_for_ferret_on_the_lm_task_validates():
    cfg = load(overrides=["task.dataset=stdlib", "task.model=gpt", "strategy.name=ferret", "task.pretrained=false",
                          "federation.clients=8"])
    preflight(cfg)  # what `stamen run --set ...` does before starting Ray
    assert load_task(cfg.task, 8, 0).layout.d >= 1_000_000
    with pytest.raises(DataError, match="task.n_embd"):
        load_task(load(overrides=SMALL + ["task.n_embd=33"]).task, 5, 0)
    with pytest.raises(DataError, match="task.partition"):
        load_task(load(overrides=SMALL + ["task.partition=dirichlet"]).task, 5, 0)
    with pytest.raises(DataError, match="federation.clients=400"):
        load_task(load(overrides=SMALL).task, 400, 0)
    with pytest.raises(DataError, match="task.max_test_bytes"):
        load_task(load(overrides=SMALL + ["task.max_test_bytes=20"]).task, 5, 0)


def test_vocab_size_is_an_int_that_survives_pickling(task):
    import pickle

    n = task.data.num_classes
    assert isinstance(n, VocabSize) and n == 256 and int(n) + 1 == 257 and str(n) == "256"
    back = pickle.loads(pickle.dumps(n))
    assert back == 256 and back.spec.config == n.spec.config


@pytest.mark.parametrize("strategy", [["strategy.name=fedavg"],
                                      ["strategy.name=ferret", "strategy.K=16", "strategy.local_steps=4"],
                                      ["strategy.name=fedkseed", "strategy.K=64", "strategy.local_steps=4",
                                       "strategy.lr=1e-5"]])
def test_federated_lm_rounds_on_the_in_process_grid(tmp_path, strategy):
    cfg = load(overrides=SMALL + strategy + ["run.rounds=2", "federation.fraction_train=0.4"])
    summary = run_federation(LocalGrid(cfg), cfg, tmp_path / "run")
    rows = RunDirectory(tmp_path / "run").read_metrics()
    assert [r["clients"] for r in rows] == [2, 2] and all(r["rejected"] == 0 for r in rows)
    assert all(np.isfinite(r["test_loss"]) for r in rows)
    d = load_task(cfg.task, 5, 0).layout.d
    if strategy[0] != "strategy.name=fedavg":
        assert all(r["uplink_bytes"] < 2 * 4 * d / 5 for r in rows)  # far below two dense updates
    if strategy[0] == "strategy.name=fedavg":
        assert rows[-1]["test_loss"] < rows[0]["test_loss"] or rows[0]["test_loss"] < math.log(256)
    assert summary["parameters"] == d
