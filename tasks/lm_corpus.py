"""The stdlib corpus: Python's own source code as byte tokens, split into federated clients.

Each client is one top-level package of the Python standard library (``asyncio``,
``email``, ``xml`` …) or an alphabetical bucket of its top-level modules, so clients
differ in vocabulary and style — a natural non-IID split. A few packages are held
apart for central pretraining, and a slice of every group's files is held out as the
test set (:func:`stdlib_corpus`). Text is tokenized as raw bytes (:class:`ByteTokenizer`).

Everything random comes from private generators seeded from the arguments; the global
RNGs are never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from stamen.core import derive_seed

# -- tokenizer ---------------------------------------------------------------------------


class ByteTokenizer:
    """Text ↔ token ids, one id per UTF-8 byte (vocabulary 256), plus optional BOS/EOS.

    Bytes need no vocabulary file and never produce unknown tokens, which keeps the
    task download-free. With ``bos`` or ``eos`` the vocabulary grows to 258 (ids 256
    and 257), so a model must be built with ``vocab_size=tokenizer.vocab_size``.
    """

    BOS_ID = 256
    EOS_ID = 257

    def __init__(self, bos: bool = False, eos: bool = False) -> None:
        self.bos, self.eos = bool(bos), bool(eos)

    @property
    def vocab_size(self) -> int:
        return 258 if (self.bos or self.eos) else 256

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of ``text`` (str is encoded as UTF-8), with BOS/EOS if enabled."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return [self.BOS_ID] * self.bos + list(data) + [self.EOS_ID] * self.eos

    def decode_bytes(self, ids: Iterable[int] | torch.Tensor) -> bytes:
        """The bytes behind ``ids``; special tokens are dropped, ids outside the vocabulary rejected."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside this tokenizer's vocabulary [0, {self.vocab_size})")
        return bytes(int(i) for i in ids if int(i) < 256)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


# -- the stdlib corpus ---------------------------------------------------------------------

#: Top-level stdlib entries that never become clients: the huge regression-test suite,
#: the IDE, 2to3's fixtures, generated data (codec tables, pydoc topics) and demos.
EXCLUDED_GROUPS = ("test", "idlelib", "lib2to3", "site-packages", "dist-packages", "pydoc_data",
                   "encodings", "__phello__", "turtledemo", "__pycache__")
#: Directory names skipped at any depth (package-internal test suites).
EXCLUDED_DIRS = ("test", "tests", "idle_test", "__pycache__")
#: Packages reserved for central pretraining (those present in this Python are used).
PRETRAIN_GROUPS = ("unittest", "distutils", "tkinter")

_SEPARATOR = b"\n\n"


class CorpusError(ValueError):
    """A corpus that cannot be built as asked (missing source tree, too many clients, ...)."""


@dataclass(eq=False)
class LMCorpus:
    """Byte-token tensors (uint8) of every client, the pretraining slice and the test split."""

    client_names: tuple[str, ...]
    client_tokens: tuple[torch.Tensor, ...]
    pretrain_tokens: torch.Tensor
    test_tokens: torch.Tensor
    client_files: tuple[tuple[str, ...], ...]
    test_files: tuple[str, ...]
    pretrain_files: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.client_names)

    def client(self, partition_id: int) -> torch.Tensor:
        """Tokens of one client; a clear error for an id outside the federation."""
        if not 0 <= partition_id < self.num_clients:
            raise CorpusError(f"partition-id {partition_id} out of range: this corpus has {self.num_clients} clients")
        return self.client_tokens[partition_id]

    def fingerprint(self) -> str:
        """sha256 over the parameters and every token tensor: equal corpora, equal fingerprints."""
        h = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode())
        for t in (*self.client_tokens, self.pretrain_tokens, self.test_tokens):
            h.update(t.numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()


def stdlib_root() -> Path:
    """Where this interpreter's standard-library sources live."""
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(directory: Path) -> list[Path]:
    """All ``.py`` files under ``directory``, sorted, skipping test suites and caches."""
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out)


def _module_buckets(modules: list[Path], bucket_bytes: int) -> dict[str, list[Path]]:
    """Group top-level modules (sorted by name) into consecutive buckets of about ``bucket_bytes``."""
    buckets: dict[str, list[Path]] = {}
    current: list[Path] = []
    size = 0
    for path in modules:
        current.append(path)
        size += path.stat().st_size
        if size >= bucket_bytes:
            buckets[f"modules:{current[0].stem}..{current[-1].stem}"] = current
            current, size = [], 0
    if current:
        buckets[f"modules:{current[0].stem}..{current[-1].stem}"] = current
    return buckets


def source_groups(root: Path, bucket_bytes: int = 400_000) -> dict[str, list[Path]]:
    """Name → files of every candidate group in a source tree, in sorted name order.

    Every package directory (a directory with ``__init__.py``) is a group; the
    top-level modules are bucketed alphabetically (``_module_buckets``).
    """
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"source tree {root} does not exist; pass root= a directory of Python files")
    groups: dict[str, list[Path]] = {}
    entries = sorted(root.iterdir())
    for entry in entries:
        if entry.is_dir() and entry.name not in EXCLUDED_GROUPS and (entry / "__init__.py").exists():
            files = _python_files(entry)
            if files:
                groups[entry.name] = files
    modules = [e for e in entries if e.is_file() and e.suffix == ".py"]
    groups.update(_module_buckets(modules, bucket_bytes))
    return dict(sorted(groups.items()))


def merge_groups(groups: dict[str, list[Path]], num_clients: int | None = None,
                 min_bytes: int = 0) -> dict[str, list[Path]]:
    """Merge neighbouring groups until each has ``min_bytes`` and at most ``num_clients`` remain.

    Deterministic: repeatedly take the smallest group (by bytes; ties by name) and fold
    it into its smaller neighbour in name order. Merging small neighbours keeps large,
    distinctive packages intact, so the split stays non-IID.
    """
    if num_clients is not None and num_clients < 1:
        raise CorpusError(f"num_clients must be >= 1, got {num_clients}")
    items = [(name, list(files), sum(f.stat().st_size for f in files)) for name, files in groups.items()]

    def too_many_or_too_small() -> bool:
        if len(items) <= 1:
            return False
        return (num_clients is not None and len(items) > num_clients) or min(i[2] for i in items) < min_bytes

    while too_many_or_too_small():
        i = min(range(len(items)), key=lambda j: (items[j][2], items[j][0]))
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(items)]
        j = min(neighbours, key=lambda n: (items[n][2], items[n][0]))
        a, b = sorted((i, j))
        items[a] = (f"{items[a][0]}+{items[b][0]}", items[a][1] + items[b][1], items[a][2] + items[b][2])
        del items[b]
    merged = {name: files for name, files, _ in items}
    if num_clients is not None and num_clients > len(merged):
        raise CorpusError(f"asked for {num_clients} clients but the source tree has only {len(merged)} groups "
                          f"of at least {min_bytes} bytes ({', '.join(merged)}); lower num_clients")
    return merged


def _split_test_files(files: list[Path], fraction: float, rng: np.random.Generator) -> tuple[list[Path], list[Path]]:
    """(train, test) whole files: test takes files in random order while it stays within
    ``fraction`` of the group's bytes (files that would overshoot are skipped).

    Splitting by bytes rather than by file count keeps a group with one big file and one
    small one from losing nearly all its text to the test side; the train side always
    keeps at least ``1 − fraction`` of the bytes. Train files come back in the seeded
    order, so which of them survive the per-client byte cap is seeded too.
    """
    sizes = [f.stat().st_size for f in files]
    budget = fraction * sum(sizes)
    train, test, used = [], [], 0
    for i in rng.permutation(len(files)):
        if len(files) > 1 and used + sizes[i] <= budget:
            test.append(files[i])
            used += sizes[i]
        else:
            train.append(files[i])
    return train, sorted(test)


def _concat_bytes(files: Sequence[Path], max_bytes: int | None) -> torch.Tensor:
    """Files joined by a blank line, cut at ``max_bytes``, as a uint8 tensor."""
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes() + _SEPARATOR
        if max_bytes is not None and total + len(data) > max_bytes:
            chunks.append(data[: max_bytes - total])
            break
        chunks.append(data)
        total += len(data)
    buf = b"".join(chunks)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)


def stdlib_corpus(max_bytes_per_client: int | None = 200_000, seed: int = 0, *, num_clients: int | None = None,
                  max_pretrain_bytes: int | None = 1_000_000, max_test_bytes: int | None = 200_000,
                  test_fraction: float = 0.1, pretrain_groups: Sequence[str] = PRETRAIN_GROUPS,
                  bucket_bytes: int = 400_000, min_group_bytes: int = 16_384,
                  root: str | Path | None = None, pretrain_seed: int | None = None) -> LMCorpus:
    """The federated stdlib corpus: one client per package / module bucket.

    - groups: every stdlib package except ``EXCLUDED_GROUPS`` and test suites, plus the
      top-level modules in alphabetical buckets of ~``bucket_bytes``; sorted by name;
    - pretraining: the groups named in ``pretrain_groups`` (whichever exist), never clients;
    - test: ``test_fraction`` of every client group's files, chosen with the seed, each
      group contributing an equal share of ``max_test_bytes`` — so the test set covers
      every client's domain but shares no file with any client;
    - clients: the remaining files of each group, in seeded order, cut at
      ``max_bytes_per_client``. Groups under ``min_group_bytes`` of source (``venv``,
      ``sqlite3``...) are merged into a neighbour, and with ``num_clients`` the groups
      are merged down to that many (``merge_groups``); asking for more clients than
      there are groups is an error.

    - ``pretrain_seed`` (default: ``seed``) orders the pretraining files; fixing it keeps the
      pretraining slice — hence a cached pretrained model — the same whatever the run seed.

    All sizes are byte (= token) caps that keep it CPU-friendly; None means no cap.
    Deterministic given the arguments and the Python installation.
    """
    root = Path(root) if root is not None else stdlib_root()
    groups = source_groups(root, bucket_bytes)
    reserved = [g for g in pretrain_groups if g in groups]
    if not reserved:
        raise CorpusError(f"none of the pretraining groups {list(pretrain_groups)} exist under {root}; "
                          f"choose some of {list(groups)}")
    pretrain_files = sorted(f for g in reserved for f in groups.pop(g))
    groups = merge_groups(groups, num_clients, min_group_bytes)
    if not groups:
        raise CorpusError(f"no client groups left under {root} after reserving {reserved} for pretraining")

    train_files, test_parts, test_files = {}, [], []
    test_share = None if max_test_bytes is None else max(1, max_test_bytes // len(groups))
    for name, files in groups.items():
        rng = np.random.default_rng(derive_seed(seed, "stdlib-split", name))
        train, test = _split_test_files(files, test_fraction, rng)
        train_files[name] = train
        test_files.extend(test)
        test_parts.append(_concat_bytes(test, test_share))

    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    pretrain_seed = seed if pretrain_seed is None else pretrain_seed
    pretrain_order = np.random.default_rng(derive_seed(pretrain_seed, "stdlib-pretrain")).permutation(
        len(pretrain_files))
    params = {
        "source": "python-stdlib" if root == stdlib_root() else str(root),
        "python": ".".join(map(str, sys.version_info[:3])), "seed": seed, "num_clients": num_clients,
        "max_bytes_per_client": max_bytes_per_client, "max_pretrain_bytes": max_pretrain_bytes,
        "max_test_bytes": max_test_bytes, "test_fraction": test_fraction, "pretrain_groups": reserved,
        "bucket_bytes": bucket_bytes, "min_group_bytes": min_group_bytes, "pretrain_seed": pretrain_seed,
    }
    return LMCorpus(
        client_names=tuple(train_files),
        client_tokens=tuple(_concat_bytes(f, max_bytes_per_client) for f in train_files.values()),
        pretrain_tokens=_concat_bytes([pretrain_files[i] for i in pretrain_order], max_pretrain_bytes),
        test_tokens=torch.cat(test_parts) if test_parts else torch.zeros(0, dtype=torch.uint8),
        client_files=tuple(tuple(rel(p) for p in f) for f in train_files.values()),
        test_files=tuple(sorted(rel(p) for p in test_files)),
        pretrain_files=tuple(rel(p) for p in pretrain_files),
        params=params,
    )
