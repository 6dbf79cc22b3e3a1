import numpy as np
import pytest
import torch

from stamen.config import load
from stamen.tasks.data import DataError, load_federated_data, synthetic_fedprox
from stamen.tasks.models import build_model
from stamen.tasks.task import load_task


def task_cfg(*overrides):
    return load(overrides=list(overrides)).task


def test_synthetic_sizes_and_feature_covariance():
    devices = synthetic_fedprox(30, 1.0, 1.0, iid=False, seed=0, max_samples=1000)
    sizes = np.array([len(y) for _, y in devices])
    assert len(devices) == 30 and sizes.min() >= 50 and sizes.max() <= 1000
    assert all(x.shape[1] == 60 and x.dtype == np.float32 for x, _ in devices)
    assert set(np.concatenate([y for _, y in devices])) <= set(range(10))
    # IID variant: x ~ N(0, Σ) with Σ_jj = j^-1.2 — Monte-Carlo check of the diagonal
    iid = synthetic_fedprox(30, 0, 0, iid=True, seed=1, max_samples=1000)
    X = np.concatenate([x for x, _ in iid]).astype(np.float64)
    expected = np.arange(1, 61) ** -1.2
    n = len(X)
    # the sample variance has relative std sqrt(2/n); allow 5 of them
    assert np.all(np.abs(X.var(0) / expected - 1) < 5 * np.sqrt(2 / n))
    assert np.all(np.abs(X.mean(0)) < 5 * np.sqrt(expected / n))


def _mean_pairwise_label_tv(devices):
    dists = [np.bincount(y, minlength=10) / len(y) for _, y in devices]
    return np.mean([0.5 * np.abs(p - q).sum() for i, p in enumerate(dists) for q in dists[i + 1:]])


def test_synthetic_iid_shares_one_label_rule_noniid_is_heterogeneous():
    from sklearn.linear_model import LogisticRegression

    iid = synthetic_fedprox(10, 0, 0, iid=True, seed=0, max_samples=300)
    X, y = np.concatenate([x for x, _ in iid]), np.concatenate([y for _, y in iid])
    assert LogisticRegression(max_iter=3000).fit(X, y).score(X, y) > 0.9  # one linear rule
    noniid = synthetic_fedprox(10, 1, 1, iid=False, seed=0, max_samples=300)
    # per-device label distributions: alike under IID, far apart under Synthetic(1,1)
    assert _mean_pairwise_label_tv(iid) < 0.25 < 0.5 < _mean_pairwise_label_tv(noniid)


def test_synthetic_task_holds_out_ten_percent_per_device():
    data = load_federated_data(task_cfg("task.dataset=synthetic"), 12, 0)
    devices = synthetic_fedprox(12, 1.0, 1.0, iid=False, seed=0, max_samples=1000)
    for (x, y), (dx, dy) in zip(data.clients, devices):
        assert len(y) == len(dy) - max(1, round(0.1 * len(dy)))
    assert len(data.test[1]) == sum(max(1, round(0.1 * len(dy))) for _, dy in devices)


def test_digits_partitions_cover_the_training_set_disjointly():
    for part in ("iid", "dirichlet", "pathological"):
        data = load_federated_data(task_cfg(f"task.partition={part}"), 10, 0)
        xs = np.concatenate([x.reshape(len(x), -1) for x, _ in data.clients])
        assert len(xs) == data.info["train_samples"]
        assert len(np.unique(xs, axis=0)) == len(np.unique(xs, axis=0))  # sanity
        assert data.test[0].shape[1:] == (1, 8, 8) and data.clients[0][0].min() >= 0 and data.clients[0][0].max() <= 1


def test_pathological_gives_k_classes_per_client():
    data = load_federated_data(task_cfg("task.partition=pathological", "task.classes_per_client=2"), 20, 0)
    assert all(len(np.unique(y)) <= 2 for _, y in data.clients)


def _mean_label_entropy(data):
    ent = []
    for _, y in data.clients:
        p = np.bincount(y, minlength=10) / len(y)
        ent.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    return float(np.mean(ent))


def test_dirichlet_alpha_controls_label_skew():
    skewed = _mean_label_entropy(load_federated_data(task_cfg("task.alpha=0.1"), 10, 0))
    mild = _mean_label_entropy(load_federated_data(task_cfg("task.alpha=100"), 10, 0))
    iid = _mean_label_entropy(load_federated_data(task_cfg("task.partition=iid"), 10, 0))
    assert skewed < mild and abs(mild - iid) < 0.2 and iid > 0.9 * np.log(10)


def test_partitions_are_seeded():
    a = load_federated_data(task_cfg(), 10, 0).clients[3][1]
    b = load_federated_data(task_cfg(), 10, 0).clients[3][1]
    c = load_federated_data(task_cfg(), 10, 1).clients[3][1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("overrides, match", [
    (("task.dataset=nope",), "unknown task.dataset"),
    (("task.partition=nope",), "unknown task.partition"),
    (("task.dataset=synthetic", "task.partition=iid"), "natural partition"),
    (("task.partition=pathological", "task.classes_per_client=11"), "classes_per_client"),
])
def test_bad_task_configs_are_named(overrides, match):
    with pytest.raises(DataError, match=match):
        load_federated_data(task_cfg(*overrides), 5, 0)


def test_more_clients_than_samples_is_an_error():
    with pytest.raises(DataError, match="exceeds"):
        load_federated_data(task_cfg(), 5000, 0)


def test_hub_loader_reads_a_local_copy(tmp_path):
    """The flwr-datasets path, offline: a tiny MNIST-shaped parquet copy under task.data_dir."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    root = tmp_path / "mnist"
    root.mkdir()
    for split, n in (("train", 60), ("test", 20)):
        imgs = [PILImage.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n)]
        ds = Dataset.from_dict({"image": imgs, "label": [i % 10 for i in range(n)]}, features=features)
        ds.to_parquet(str(root / f"{split}.parquet"))
    cfg = task_cfg("task.dataset=mnist", "task.partition=iid", f"task.data_dir={str(tmp_path)!r}")
    data = load_federated_data(cfg, 3, 0)
    assert [len(y) for _, y in data.clients] == [20, 20, 20]
    assert data.clients[0][0].shape == (20, 1, 28, 28) and data.test[0].shape == (20, 1, 28, 28)
    assert 0 <= data.test[0].min() and data.test[0].max() <= 1


def test_hub_loader_without_network_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the libraries read these at import: if an earlier test imported them, set their constants too
    # (otherwise the hub is dialled and the test waits on network timeouts)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    cfg = task_cfg("task.dataset=cifar10", f"task.data_dir={str(tmp_path)!r}")
    with pytest.raises(DataError, match="local copy"):
        load_federated_data(cfg, 3, 0)


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])  # image classifiers; gpt: tests/test_lm_*.py
def test_models_shape_and_deterministic_init(name):
    state = torch.get_rng_state()
    a = build_model(name, (1, 8, 8), 10, 32, seed=5)
    b = build_model(name, (1, 8, 8), 10, 32, seed=5)
    assert torch.equal(state, torch.get_rng_state()), "model init must not use the global RNG"
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert a(torch.zeros(4, 1, 8, 8)).shape == (4, 10)


def test_cnn_needs_images():
    with pytest.raises(ValueError, match="image inputs"):
        build_model("cnn", (60,), 10, 32, seed=0)


def test_task_layout_matches_model():
    task = load_task(task_cfg("task.model=logreg"), 4, 0)
    assert task.layout.d == 64 * 10 + 10
