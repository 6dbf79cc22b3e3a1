"""Federated datasets: what each client trains on and what the server evaluates.

Every dataset loader returns a :class:`FederatedData` — one ``(X, y)`` pair per client
and a central test set, all numpy, inputs already in model layout (``X.shape[1:] ==
input_shape``) and float32 within the declared ``input_range``. Loaders are registered
by name in :data:`DATASETS`; partition rules for pooled datasets in :data:`PARTITIONS`
(they wrap ``flwr-datasets`` partitioners). Everything is a pure function of the task
config, the client count and the run seed, so the server and every worker derive the
same split independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stamen.core import derive_seed


class DataError(ValueError):
    """A dataset or partition that cannot be built as configured."""


@dataclass
class FederatedData:
    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    input_range: tuple[float, float]
    clients: list[tuple[np.ndarray, np.ndarray]]
    test: tuple[np.ndarray, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= partition_id < len(self.clients):
            raise DataError(f"partition-id {partition_id} out of range: this task has {len(self.clients)} clients")
        return self.clients[partition_id]

    def size(self, partition_id: int) -> int:
        """The number of training examples of a client (without building its data when it is made on demand)."""
        sizes = getattr(self.clients, "sizes", None)
        if sizes is not None:
            if not 0 <= partition_id < len(sizes):
                raise DataError(f"partition-id {partition_id} out of range: this task has {len(sizes)} clients")
            return int(sizes[partition_id])
        return len(self.client(partition_id)[1])


# ---------------------------------------------------------------- partitioners ----
def _label_dataset(y: np.ndarray):
    from datasets import Dataset

    return Dataset.from_dict({"idx": np.arange(len(y), dtype=np.int64), "label": y.astype(np.int64)})


def _partition_indices(partitioner, y: np.ndarray, num_clients: int) -> list[np.ndarray]:
    partitioner.dataset = _label_dataset(y)
    return [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(num_clients)]


def partition_iid(y: np.ndarray, num_clients: int, seed: int, task) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner cuts contiguous ranges; the pooled arrays come already shuffled
    # from the train/test split, so contiguous chunks are IID.
    return _partition_indices(IidPartitioner(num_partitions=num_clients), y, num_clients)


def partition_dirichlet(y: np.ndarray, num_clients: int, seed: int, task) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    # flwr-datasets redraws until every client has min_partition_size examples; a skewed alpha on a
    # small pooled set (alpha 0.1, 20 clients of digits) rarely gets 10 each, so ask for fewer
    # (5, then 2: a client still gets a batch to train on) before giving up, quietly.
    import warnings

    first = max(1, min(10, len(y) // (2 * num_clients)))
    error = None
    for min_size in sorted({first, min(first, 5), min(first, 2)}, reverse=True):
        p = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=task.alpha,
                                 min_partition_size=min_size, self_balancing=False, seed=seed)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The specified min_partition_size")
                return _partition_indices(p, y, num_clients)
        except ValueError as err:
            error = err
    raise DataError(f"task.alpha={task.alpha} with {num_clients} clients: {error} (even with 2 examples per client; "
                    f"raise task.alpha or lower federation.clients)") from None


def partition_pathological(y: np.ndarray, num_clients: int, seed: int, task) -> list[np.ndarray]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    k = task.classes_per_client
    n_classes = len(np.unique(y))
    if k > n_classes:
        raise DataError(f"task.classes_per_client={k} exceeds the {n_classes} classes of the dataset")
    p = PathologicalPartitioner(num_partitions=num_clients, partition_by="label", num_classes_per_partition=k,
                                class_assignment_mode="first-deterministic", seed=seed)
    return _partition_indices(p, y, num_clients)


PARTITIONS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": partition_iid,
    "dirichlet": partition_dirichlet,
    "pathological": partition_pathological,
}


def split_pooled(X: np.ndarray, y: np.ndarray, task, num_clients: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Partition a pooled training set into ``num_clients`` client datasets."""
    partition = "dirichlet" if task.partition == "auto" else task.partition
    if partition not in PARTITIONS:
        raise DataError(f"unknown task.partition {task.partition!r}; choose one of {sorted(PARTITIONS)}"
                        " (the natural partition is only for datasets that have one, e.g. synthetic)")
    if num_clients > len(y):
        raise DataError(f"federation.clients={num_clients} exceeds the {len(y)} training samples")
    parts = PARTITIONS[partition](y, num_clients, derive_seed(seed, "partition") % (2**32), task)
    empty = [i for i, idx in enumerate(parts) if len(idx) == 0]
    if empty:
        raise DataError(f"task.partition={task.partition!r} left clients {empty[:5]} without data; "
                        "use fewer clients or a larger task.alpha")
    return [(X[idx], y[idx]) for idx in parts]


# -------------------------------------------------------------------- datasets ----
def load_digits_task(task, num_clients: int, seed: int) -> FederatedData:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=task.test_fraction, stratify=y,
                                          random_state=derive_seed(seed, "digits-split") % (2**32))
    clients = split_pooled(Xtr, ytr, task, num_clients, seed)
    return FederatedData("digits", 10, (1, 8, 8), (0.0, 1.0), clients, (Xte, yte),
                         {"partition": task.partition, "train_samples": len(ytr)})


def synthetic_fedprox(num_devices: int, alpha: float, beta: float, *, iid: bool, seed: int,
                      max_samples: int, dim: int = 60, num_classes: int = 10
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The FedProx Synthetic(α, β) devices as a list (see :func:`iter_synthetic_fedprox`)."""
    return list(iter_synthetic_fedprox(num_devices, alpha, beta, iid=iid, seed=seed, max_samples=max_samples,
                                       dim=dim, num_classes=num_classes))


def iter_synthetic_fedprox(num_devices: int, alpha: float, beta: float, *, iid: bool, seed: int,
                           max_samples: int, dim: int = 60, num_classes: int = 10):
    """The FedProx Synthetic(α, β) generator (Li et al., MLSys 2020, §5.1), one device at a time
    (a consumer that keeps only what it needs holds one device's raw draws at once).

    Device k: u_k ~ N(0, α), W_k, b_k with entries ~ N(u_k, 1); B_k ~ N(0, β),
    v_k ∈ R^60 with entries ~ N(B_k, 1); x ~ N(v_k, Σ) with Σ_jj = j^(-1.2);
    y = argmax softmax(W_k x + b_k). Sizes: ⌊lognormal(4, 2)⌋ + 50, capped at ``max_samples``.
    IID variant: one W, b ~ N(0, 1) for all devices and v = 0 for all (x ~ N(0, Σ)).
    """
    rng = np.random.default_rng(derive_seed(seed, "synthetic", alpha, beta, iid))
    sizes = np.minimum(rng.lognormal(4, 2, num_devices).astype(np.int64) + 50, max_samples)
    sd = np.sqrt(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)
    W_shared = rng.normal(0, 1, (dim, num_classes))
    b_shared = rng.normal(0, 1, num_classes)
    for k in range(num_devices):
        if iid:
            W, b, v = W_shared, b_shared, np.zeros(dim)
        else:
            u = rng.normal(0, np.sqrt(alpha))
            W = rng.normal(u, 1, (dim, num_classes))
            b = rng.normal(u, 1, num_classes)
            B = rng.normal(0, np.sqrt(beta))
            v = rng.normal(B, 1, dim)
        x = v + rng.normal(0, 1, (sizes[k], dim)) * sd
        y = np.argmax(x @ W + b, axis=1)
        yield x.astype(np.float32), y.astype(np.int64)


def _holdout_split(devices, holdout: float, seed: int):
    """Shuffle each device once; its last ``holdout`` fraction goes to the pooled test set."""
    clients, tx, ty = [], [], []
    for k, (x, y) in enumerate(devices):
        perm = np.random.default_rng(derive_seed(seed, "holdout", k)).permutation(len(y))
        x, y = x[perm], y[perm]
        n_test = max(1, int(round(holdout * len(y))))
        clients.append((x[:-n_test], y[:-n_test]))
        tx.append(x[-n_test:])
        ty.append(y[-n_test:])
    return clients, (np.concatenate(tx), np.concatenate(ty))


def _load_synthetic(task, num_clients: int, seed: int, iid: bool) -> FederatedData:
    if task.partition not in ("auto", "natural"):
        raise DataError(f"synthetic data has only the natural partition (one device per client); "
                        f"got task.partition={task.partition!r}")
    devices = iter_synthetic_fedprox(num_clients, task.synthetic_alpha, task.synthetic_beta, iid=iid, seed=seed,
                                     max_samples=task.max_client_samples)
    clients, test = _holdout_split(devices, 0.1, seed)  # device by device: no second copy of the raw draws
    name = "synthetic_iid" if iid else f"synthetic({task.synthetic_alpha:g},{task.synthetic_beta:g})"
    lo, hi = float(test[0].min()), float(test[0].max())
    return FederatedData(name, 10, (60,), (lo, hi), clients, test,
                         {"partition": "natural", "sizes": [len(c[1]) for c in clients]})


def load_synthetic_task(task, num_clients: int, seed: int) -> FederatedData:
    """FedProx Synthetic(α, β) with ``task.synthetic_alpha`` / ``task.synthetic_beta``; natural split."""
    return _load_synthetic(task, num_clients, seed, iid=False)


def load_synthetic_iid_task(task, num_clients: int, seed: int) -> FederatedData:
    """FedProx Synthetic-IID: one shared model for all devices; natural split."""
    return _load_synthetic(task, num_clients, seed, iid=True)


# ------------------------------------------------------- on-demand partitions ----
class OnDemandSynthetic:
    """FedProx Synthetic(α, β) devices made on demand: device k is a pure function of (seed, k).

    The sequential generator above draws every device from one stream, so device k needs
    devices 0..k−1 first and the federation is held in memory: fine for 10⁴ clients, not for
    10⁶. Here the sizes of all devices come from one vectorised draw (⌊lognormal(4, 2)⌋ + 50,
    capped; one int64 each: 8 MB at 10⁶), and device k's model, centre and samples from its
    own generator ``derive_seed(seed, "synthetic-device", α, β, iid, k)``; it is built when a
    client of it trains (or its test share is pooled) and kept in a small LRU cache. Same
    recipe as :func:`iter_synthetic_fedprox` (and the same holdout rule, the last 10 % of a
    once-shuffled device), different random streams: ``synthetic_ondemand`` is another dataset,
    not a faster ``synthetic``. Behaves as the ``clients`` list of a :class:`FederatedData`.
    """

    def __init__(self, num_devices: int, alpha: float, beta: float, *, iid: bool, seed: int, max_samples: int,
                 holdout: float = 0.1, dim: int = 60, num_classes: int = 10, cache: int = 512):
        self.alpha, self.beta, self.iid, self.seed = alpha, beta, iid, seed
        self.dim, self.num_classes, self.holdout, self.cache_size = dim, num_classes, holdout, cache
        rng = np.random.default_rng(derive_seed(seed, "synthetic-sizes", alpha, beta, iid))
        raw = np.minimum(rng.lognormal(4, 2, num_devices).astype(np.int64) + 50, max_samples)
        self.raw_sizes = raw
        self.sizes = raw - np.maximum(1, np.round(holdout * raw).astype(np.int64))  # training examples per client
        self.sd = np.sqrt(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)
        shared = np.random.default_rng(derive_seed(seed, "synthetic-shared", alpha, beta, iid))
        self.W_shared, self.b_shared = shared.normal(0, 1, (dim, num_classes)), shared.normal(0, 1, num_classes)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.sizes)

    def device(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """All of device k's samples, shuffled once (train first, the holdout last)."""
        rng = np.random.default_rng(derive_seed(self.seed, "synthetic-device", self.alpha, self.beta, self.iid, k))
        if self.iid:
            W, b, v = self.W_shared, self.b_shared, np.zeros(self.dim)
        else:
            u = rng.normal(0, np.sqrt(self.alpha))
            W = rng.normal(u, 1, (self.dim, self.num_classes))
            b = rng.normal(u, 1, self.num_classes)
            v = rng.normal(rng.normal(0, np.sqrt(self.beta)), 1, self.dim)
        x = v + rng.normal(0, 1, (int(self.raw_sizes[k]), self.dim)) * self.sd
        y = np.argmax(x @ W + b, axis=1)
        perm = rng.permutation(len(y))
        return x[perm].astype(np.float32), y[perm].astype(np.int64)

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(k)
        hit = self._cache.pop(k, None)
        if hit is None:
            x, y = self.device(k)
            n = int(self.sizes[k])
            hit = (x[:n], y[:n])
        self._cache[k] = hit  # most recently used last
        while len(self._cache) > self.cache_size:
            del self._cache[next(iter(self._cache))]
        return hit

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def test_set(self, devices: int) -> tuple[np.ndarray, np.ndarray]:
        """The pooled holdout of ``devices`` devices (a seeded sample; all of them if there are fewer)."""
        n = len(self)
        if devices >= n:
            chosen = np.arange(n)
        else:
            rng = np.random.default_rng(derive_seed(self.seed, "synthetic-test-devices", self.alpha, self.beta))
            chosen = np.sort(rng.choice(n, size=devices, replace=False))
        xs, ys = [], []
        for k in chosen:
            x, y = self.device(int(k))
            n_train = int(self.sizes[k])
            xs.append(x[n_train:])
            ys.append(y[n_train:])
        return np.concatenate(xs), np.concatenate(ys)


#: how many devices' holdouts make the test set of ``synthetic_ondemand`` (all of them below this)
ONDEMAND_TEST_DEVICES = 1000


def load_synthetic_ondemand_task(task, num_clients: int, seed: int) -> FederatedData:
    """FedProx Synthetic(α, β) with clients made on demand from the seed (:class:`OnDemandSynthetic`): for
    federations too large to hold (10⁶ clients). Test set: the holdouts of up to 1,000 devices."""
    if task.partition not in ("auto", "natural"):
        raise DataError(f"synthetic data has only the natural partition (one device per client); "
                        f"got task.partition={task.partition!r}")
    clients = OnDemandSynthetic(num_clients, task.synthetic_alpha, task.synthetic_beta, iid=False, seed=seed,
                                max_samples=task.max_client_samples)
    test = clients.test_set(ONDEMAND_TEST_DEVICES)
    name = f"synthetic_ondemand({task.synthetic_alpha:g},{task.synthetic_beta:g})"
    lo, hi = float(test[0].min()), float(test[0].max())
    return FederatedData(name, 10, (60,), (lo, hi), clients, test,  # type: ignore[arg-type]
                         {"partition": "natural", "sizes": clients.sizes, "on_demand": True})


# ---------------------------------------------------------------- hub datasets ----
# name -> (Hugging Face id, image column, input shape, channel mean, channel std)
HUB_DATASETS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "mnist": ("ylecun/mnist", "image", (1, 28, 28)),
    "fashion_mnist": ("zalando-datasets/fashion_mnist", "image", (1, 28, 28)),
    "cifar10": ("uoft-cs/cifar10", "img", (3, 32, 32)),
}

HUB_PARTITIONERS = {"iid": "IidPartitioner", "dirichlet": "DirichletPartitioner",
                    "pathological": "PathologicalPartitioner"}


def _images_to_array(column, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.stack([np.asarray(img, dtype=np.uint8) for img in column]).astype(np.float32) / 255.0
    if arr.ndim == 3:  # (n, h, w) grayscale
        arr = arr[:, None]
    elif arr.ndim == 4:  # (n, h, w, c)
        arr = arr.transpose(0, 3, 1, 2)
    if tuple(arr.shape[1:]) != shape:
        raise DataError(f"images have shape {tuple(arr.shape[1:])}, expected {shape}")
    return arr


def make_hub_partitioner(task, num_clients: int, seed: int):
    import flwr_datasets.partitioner as P

    if task.partition == "iid":
        return P.IidPartitioner(num_partitions=num_clients)
    if task.partition in ("dirichlet", "auto"):
        return P.DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=task.alpha,
                                      min_partition_size=10, seed=seed)
    if task.partition == "pathological":
        return P.PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                         num_classes_per_partition=task.classes_per_client,
                                         class_assignment_mode="first-deterministic", seed=seed)
    raise DataError(f"unknown task.partition {task.partition!r}; choose one of {sorted(HUB_PARTITIONERS)}")


def load_hub_task(name: str, task, num_clients: int, seed: int) -> FederatedData:
    """A Hugging Face dataset through ``flwr-datasets``' FederatedDataset.

    ``task.data_dir`` is the cache directory; when it holds a local copy of the dataset
    (a folder with train/test data files, e.g. parquet), that copy is loaded instead of
    the hub, which is how the tests exercise this path offline.
    """
    from flwr_datasets import FederatedDataset

    hub_id, column, shape = HUB_DATASETS[name]
    source, kwargs = hub_id, {}
    if task.data_dir:
        local = Path(task.data_dir) / name
        if local.is_dir():
            source = str(local)
        else:
            kwargs["cache_dir"] = task.data_dir
    s = derive_seed(seed, "hub", name) % (2**32)
    try:
        fds = FederatedDataset(dataset=source, partitioners={"train": make_hub_partitioner(task, num_clients, s)},
                               seed=s, **kwargs)
        clients = []
        for i in range(num_clients):
            part = fds.load_partition(i, "train")
            clients.append((_images_to_array(part[column], shape), np.asarray(part["label"], dtype=np.int64)))
        test = fds.load_split("test")
    except DataError:
        raise
    except Exception as err:  # network, missing files, bad format: name the dataset and the fix
        raise DataError(f"could not load dataset {name!r} from {source!r}: {type(err).__name__}: {err}. "
                        "Without network access, put a local copy under task.data_dir/<name>/") from None
    test_xy = (_images_to_array(test[column], shape), np.asarray(test["label"], dtype=np.int64))
    return FederatedData(name, 10, shape, (0.0, 1.0), clients, test_xy, {"partition": task.partition, "source": source})


DATASETS: dict[str, Callable[..., FederatedData]] = {
    "digits": load_digits_task,
    "synthetic": load_synthetic_task,
    "synthetic_iid": load_synthetic_iid_task,
    "synthetic_ondemand": load_synthetic_ondemand_task,
}
for _name in HUB_DATASETS:
    DATASETS[_name] = (lambda n: (lambda task, num_clients, seed: load_hub_task(n, task, num_clients, seed)))(_name)
    DATASETS[_name].__doc__ = f"{HUB_DATASETS[_name][0]} from the Hugging Face hub via flwr-datasets"


def load_stdlib_task(task, num_clients: int, seed: int) -> FederatedData:
    """Next-byte prediction on Python's standard library, one package per client (tasks/lm.py)."""
    from stamen.tasks.lm import load_stdlib_task as load

    return load(task, num_clients, seed)


DATASETS["stdlib"] = load_stdlib_task


_CACHE: dict[str, FederatedData] = {}


def load_federated_data(task, num_clients: int, seed: int) -> FederatedData:
    """Build (or reuse, per process) the federated dataset a config describes."""
    import json

    key = json.dumps([task.model_dump(mode="json"), num_clients, seed], sort_keys=True)
    if key not in _CACHE:
        if task.dataset not in DATASETS:
            raise DataError(f"unknown task.dataset {task.dataset!r}; choose one of {sorted(DATASETS)}")
        _CACHE.clear()  # one task per process at a time; don't hold old ones
        _CACHE[key] = DATASETS[task.dataset](task, num_clients, seed)
    return _CACHE[key]
