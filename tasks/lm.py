"""A federated language-modelling task that needs no download: Python's own source code.

Each client is one top-level package of the Python standard library (``asyncio``,
``email``, ``xml`` …) or an alphabetical bucket of its top-level modules, so clients
differ in vocabulary and style — a natural non-IID split. A few packages are held
apart for central pretraining, and a slice of every group's files is held out as the
test set. Text is tokenized as raw bytes (``ByteTokenizer``), and ``GPT`` is a small
pre-LN causal transformer (≈1.1 M parameters by default) that trains on CPU.

As a federated task (``task.dataset = "stdlib"``, ``task.model = "gpt"``; ``load_stdlib_task``,
``build_gpt``) a client's examples are fixed, non-overlapping windows of its token stream and
the model returns logits shaped (batch, vocab, positions), so Stamen's trainers and evaluation
work unchanged and the test loss is the per-token cross-entropy (perplexity = exp(test_loss)).
The model starts from a centrally pretrained GPT, cached on disk (``pretrained_state``).

For users with network access, ``load_hf_text_dataset`` / ``hf_causal_lm`` reach the
Hugging Face hub (``datasets`` is a dependency; ``transformers`` is optional and
imported lazily).

Everything random comes from private generators seeded from the arguments; the global
RNGs are never touched. Pure torch + stdlib (``datasets`` only on the HF path).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stamen.sketching.codec import derive_seed

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


# -- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the GPT. The default has 1,124,032 parameters (n_embd 192 would give 963,840)."""

    vocab_size: int = 256
    context: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 208
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class TransformerBlock(nn.Module):
    """Pre-LN: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT-style causal LM: token + position embeddings, pre-LN blocks, tied head.

    The output head reuses the token embedding (``F.linear(x, wte.weight)``) instead of
    a second module holding the same tensor, so ``state_dict()`` lists each parameter
    once — a federated update (and its Layout) must not carry a tied matrix twice.
    Initial weights are GPT-2's (normal 0.02; residual projections 0.02/√(2 n_layer))
    drawn from a private generator seeded by ``seed``: the module is built on the meta
    device first, so the global RNG is never consumed.
    """

    def __init__(self, config: GPTConfig | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.config = cfg = config or GPTConfig()
        with torch.device("meta"):
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.context, cfg.n_embd)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.to_empty(device="cpu")
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2 initialisation from ``torch.Generator().manual_seed(seed)``, in named_parameters order."""
        g = torch.Generator().manual_seed(int(seed) % 2**63)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                std = residual_std if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T), T ≤ context."""
        T = idx.shape[1]
        if T > self.config.context:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context {self.config.context}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on inputs ``x`` and targets ``y``."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# -- batches, evaluation, training ----------------------------------------------------------------


def _check_length(tokens: torch.Tensor, context: int) -> None:
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    if tokens.numel() < context + 1:
        raise ValueError(f"need at least context + 1 = {context + 1} tokens, got {tokens.numel()}")


def _windows(tokens: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = tokens[starts[:, None] + torch.arange(context + 1)].long()
    return w[:, :-1], w[:, 1:]


def lm_batches(tokens: torch.Tensor, context: int, batch_size: int, generator: torch.Generator,
               num_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random next-token windows: yields (x, y) int64 of shape (batch_size, context), y = x shifted by one.

    Starts are uniform over every position that leaves ``context + 1`` tokens, drawn
    from ``generator`` (CPU). Infinite unless ``num_batches`` is given.
    """
    _check_length(tokens, context)
    n_starts = tokens.numel() - context
    produced = 0
    while num_batches is None or produced < num_batches:
        starts = torch.randint(0, n_starts, (batch_size,), generator=generator)
        yield _windows(tokens, starts, context)
        produced += 1


@torch.no_grad()
def evaluate_lm(model: nn.Module, tokens: torch.Tensor, context: int | None = None, batch_size: int = 32,
                max_batches: int | None = 8) -> tuple[float, float]:
    """(mean next-token loss in nats, perplexity) over fixed, evenly spaced windows.

    The same windows every call (no randomness), so rounds are comparable: at most
    ``max_batches × batch_size`` non-overlapping-where-possible windows spread over the
    whole token stream. The model's train/eval mode is restored afterwards.
    """
    context = context or model.config.context
    _check_length(tokens, context)
    last_start = tokens.numel() - context - 1
    n = max(1, tokens.numel() // (context + 1))
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    starts = torch.linspace(0, last_start, n).round().long()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, n, batch_size):
            x, y = _windows(tokens, starts[i:i + batch_size], context)
            total += float(lm_loss(model, x.to(device), y.to(device))) * len(x)
    finally:
        model.train(was_training)
    loss = total / n
    return loss, math.exp(loss)


def train_lm(model: nn.Module, tokens: torch.Tensor, *, steps: int, lr: float, batch_size: int = 16,
             seed: int = 0, context: int | None = None, weight_decay: float = 0.0,
             grad_clip: float | None = 1.0) -> list[float]:
    """AdamW (β = 0.9, 0.95) on random windows of ``tokens``; returns the loss of every step.

    Windows come from ``torch.Generator().manual_seed(seed)``; with dropout 0 the run is
    deterministic for a fixed thread count.
    """
    context = context or model.config.context
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    model.train()
    losses = []
    for x, y in lm_batches(tokens, context, batch_size, gen, num_batches=steps):
        loss = lm_loss(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# -- central pretraining with an on-disk cache ----------------------------------------------------

_CACHE_FORMAT = "stamen.tasks.lm.pretrain/1"
#: the corpus parameters that shape ``pretrain_tokens`` (with their sha256, part of the cache key)
_PRETRAIN_CORPUS_PARAMS = ("source", "python", "max_pretrain_bytes", "pretrain_groups", "pretrain_seed")


@dataclass
class PretrainResult:
    model: GPT
    losses: list[float]  # per step of the run that produced the weights
    seconds: float  # wall time of that run (not of the cache load)
    from_cache: bool
    cache_path: Path | None


def pretrain_key(model_cfg: GPTConfig, corpus: LMCorpus, steps: int, lr: float, seed: int,
                 batch_size: int) -> dict[str, Any]:
    """Everything the pretrained weights depend on; its hash names the cache file.

    Of the corpus only what shapes the pretraining slice counts (not the client or test split),
    so federations of any size share one cached model.
    """
    return {
        "format": _CACHE_FORMAT, "model": asdict(model_cfg),
        "corpus": {k: corpus.params.get(k) for k in _PRETRAIN_CORPUS_PARAMS},
        "pretrain_sha256": hashlib.sha256(corpus.pretrain_tokens.numpy().tobytes()).hexdigest(),
        "steps": int(steps), "lr": float(lr), "seed": int(seed), "batch_size": int(batch_size),
        "python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__,
    }


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _save_atomically(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same directory, then os.replace: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_cached(path: Path, key: dict[str, Any], model_cfg: GPTConfig) -> PretrainResult | None:
    """The cached result, or None (with a warning saying why) when the file is unusable."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _CACHE_FORMAT:
            raise ValueError(f"not a {_CACHE_FORMAT} file")
        if blob.get("key") != json.dumps(key, sort_keys=True):
            raise ValueError("it was built for different settings (model, corpus, steps, seed or versions)")
        model = GPT(model_cfg)
        model.load_state_dict(blob["state_dict"])
        return PretrainResult(model, list(blob["losses"]), float(blob["seconds"]), True, path)
    except Exception as err:  # noqa: BLE001 — any unreadable cache is rebuilt, loudly
        warnings.warn(f"pretraining cache {path} is unusable ({type(err).__name__}: {err}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None


def pretrain(model_cfg: GPTConfig, corpus: LMCorpus, steps: int = 300, lr: float = 3e-3, seed: int = 0,
             cache_dir: str | Path | None = None, *, batch_size: int = 16) -> PretrainResult:
    """Central pretraining of a GPT on the corpus's held-apart slice, cached on disk.

    The model is initialised from ``derive_seed(seed, "gpt-init")`` and trained with
    ``train_lm`` on ``corpus.pretrain_tokens``. With ``cache_dir`` the weights are
    stored as ``gpt-pretrain-<hash>.pt``, keyed by ``pretrain_key`` (model config,
    corpus parameters and pretraining bytes, steps, lr, batch size, seed, Python and
    torch versions), and written atomically. A cache file that cannot be read or was
    built for other settings is rebuilt with a ``RuntimeWarning``.
    """
    key = pretrain_key(model_cfg, corpus, steps, lr, seed, batch_size)
    path = Path(cache_dir) / f"gpt-pretrain-{_key_hash(key)[:20]}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        cached = _load_cached(path, key, model_cfg)
        if cached is not None:
            return cached
    model = GPT(model_cfg, seed=derive_seed(seed, "gpt-init"))
    start = time.perf_counter()
    losses = train_lm(model, corpus.pretrain_tokens, steps=steps, lr=lr, batch_size=batch_size,
                      seed=derive_seed(seed, "gpt-pretrain-batches"))
    seconds = time.perf_counter() - start
    model.eval()
    if path is not None:
        _save_atomically({"format": _CACHE_FORMAT, "key": json.dumps(key, sort_keys=True),
                          "state_dict": model.state_dict(), "losses": losses, "seconds": seconds}, path)
    return PretrainResult(model, losses, seconds, False, path)


# -- the federated task: dataset "stdlib", model "gpt" ------------------------------------------
#
# ``stamen.tasks.data.DATASETS["stdlib"]`` and ``stamen.tasks.models.MODELS["gpt"]`` call into
# this section. A client's examples are fixed windows of its token stream, so the ordinary
# trainers (``train_sgd``: shuffled mini-batches, cross-entropy) and ``evaluate`` work unchanged:
# the model returns logits shaped (batch, vocab, positions) for targets (batch, positions), and
# Stamen's loss is then the per-token cross-entropy (perplexity = exp(test_loss)).

#: pretraining settings of the ``gpt`` model's starting point (task.pretrain_steps sets the steps)
PRETRAIN_LR = 3e-3
PRETRAIN_BATCH = 16
PRETRAIN_SEED = 0  # the base model is one fixed artifact, whatever the run seed (like a public checkpoint)


def token_windows(tokens: torch.Tensor | np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, non-overlapping next-token windows of a token stream: (X, y), int64, shape (n, context).

    Window i is ``tokens[i·(context+1) : (i+1)·(context+1)]``; X holds its first ``context``
    tokens and y its last ``context`` (X shifted by one), so ``y[:, t]`` is the token after
    ``X[:, t]``. The tail that does not fill a window is dropped.
    """
    context = int(context)
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    flat = torch.as_tensor(np.asarray(tokens)).reshape(-1).long()
    n = flat.numel() // (context + 1)
    w = flat[: n * (context + 1)].reshape(n, context + 1).numpy()
    return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])


@dataclass(frozen=True, eq=False)
class LMModelSpec:
    """What the ``gpt`` model of a task is: its shape and where its initial weights come from."""

    config: GPTConfig
    pretrained: bool = False
    pretrain_steps: int = 300
    cache_dir: str | None = None
    corpus: LMCorpus | None = None  # holds the pretraining slice; needed when ``pretrained``


class VocabSize(int):
    """``FederatedData.num_classes`` of an LM task: the vocabulary size, carrying the task's ``LMModelSpec``.

    The model registry's factories see only ``(input_shape, num_classes, hidden)`` — no task
    config and no data — yet the ``gpt`` model needs its shape, the pretraining slice of the
    corpus and the cache directory. The ``stdlib`` loader therefore hands them over on the
    class count it returns; everywhere else this is the plain int 256.
    """

    spec: LMModelSpec | None

    def __new__(cls, value: int, spec: LMModelSpec | None = None) -> "VocabSize":
        obj = super().__new__(cls, int(value))
        obj.spec = spec
        return obj

    def __reduce__(self):
        return (VocabSize, (int(self), self.spec))


class TokenLogitsGPT(nn.Module):
    """``GPT`` with logits permuted to (batch, vocab, positions) — the layout of ``F.cross_entropy``.

    Parameters live under ``gpt.`` (the tied embedding/head matrix once). ``initialize(seed)``
    (called by ``stamen.tasks.models.build_model``) loads the cached centrally pretrained
    weights when the spec says ``pretrained``, else draws GPT-2's initialisation from ``seed``.
    """

    def __init__(self, spec: LMModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.gpt = GPT(spec.config)

    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    def initialize(self, seed: int) -> None:
        if self.spec.pretrained:
            self.gpt.load_state_dict(pretrained_state(self.spec))
        else:
            self.gpt.reset_parameters(seed)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx).transpose(1, 2)


def default_cache_dir() -> Path:
    """``$STAMEN_CACHE_DIR``, else ``~/.cache/stamen`` (absolute: Ray workers may run elsewhere)."""
    env = os.environ.get("STAMEN_CACHE_DIR")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "stamen"


_PRETRAINED: dict[str, dict[str, torch.Tensor]] = {}


def pretrained_state(spec: LMModelSpec) -> dict[str, torch.Tensor]:
    """The state dict of the spec's centrally pretrained GPT (``pretrain``, disk-cached, memoised per process)."""
    if spec.corpus is None:
        raise ValueError("a pretrained gpt needs the corpus's pretraining slice; build it through the 'stdlib' dataset "
                         "or set task.pretrained=false")
    cache_dir = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    key = _key_hash(pretrain_key(spec.config, spec.corpus, spec.pretrain_steps, PRETRAIN_LR, PRETRAIN_SEED,
                                 PRETRAIN_BATCH)) + str(cache_dir)
    if key not in _PRETRAINED:
        result = pretrain(spec.config, spec.corpus, spec.pretrain_steps, PRETRAIN_LR, PRETRAIN_SEED, cache_dir,
                          batch_size=PRETRAIN_BATCH)
        _PRETRAINED.clear()  # one base model per process at a time
        _PRETRAINED[key] = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return _PRETRAINED[key]


def build_gpt(input_shape: tuple[int, ...], num_classes: int, hidden: int = 0) -> TokenLogitsGPT:
    """The ``gpt`` model factory: from the task's spec (see ``VocabSize``), else a from-scratch default GPT.

    ``hidden`` is not used (the width is ``task.n_embd``).
    """
    if len(tuple(input_shape)) != 1:
        raise ValueError(f"model 'gpt' needs token windows of shape (context,), got input shape {tuple(input_shape)}")
    context = int(tuple(input_shape)[0])
    spec = getattr(num_classes, "spec", None)
    if spec is None:
        spec = LMModelSpec(GPTConfig(vocab_size=int(num_classes), context=context))
    if spec.config.context != context or spec.config.vocab_size != int(num_classes):
        raise ValueError(f"model 'gpt' spec (context {spec.config.context}, vocabulary {spec.config.vocab_size}) does "
                         f"not match the data (context {context}, vocabulary {int(num_classes)})")
    return TokenLogitsGPT(spec)


@functools.lru_cache(maxsize=2)
def _cached_corpus(**kwargs: Any) -> LMCorpus:
    return stdlib_corpus(**kwargs)


def load_stdlib_task(task, num_clients: int, seed: int):
    """``FederatedData`` of the stdlib corpus: one client per package or module bucket (natural, non-IID).

    Examples are ``token_windows`` of ``task.context`` tokens: each client's stream is cut at
    ``task.max_bytes_per_client`` bytes, the test set at ``task.max_test_bytes`` (a
    ``task.test_fraction`` of every group's files, shared with no client). Inputs and targets are
    int64 token ids; ``num_classes`` is the byte vocabulary (256) carrying the ``gpt`` model's
    spec from ``task.context``, ``n_layer``, ``n_head``, ``n_embd``, ``pretrained``,
    ``pretrain_steps`` and ``cache_dir``.
    """
    from stamen.tasks.data import DataError, FederatedData

    if task.partition not in ("auto", "natural"):
        raise DataError(f"the stdlib corpus has only its natural partition (one package per client); "
                        f"got task.partition={task.partition!r}")
    if task.n_embd % task.n_head:
        raise DataError(f"task.n_embd ({task.n_embd}) must be divisible by task.n_head ({task.n_head})")
    for key in ("max_bytes_per_client", "max_test_bytes"):
        if getattr(task, key) < task.context + 1:
            raise DataError(f"task.{key}={getattr(task, key)} holds no window of task.context + 1 = "
                            f"{task.context + 1} tokens; raise it or lower task.context")
    try:
        corpus = _cached_corpus(max_bytes_per_client=int(task.max_bytes_per_client), seed=int(seed),
                                num_clients=int(num_clients), max_test_bytes=int(task.max_test_bytes),
                                test_fraction=float(task.test_fraction), pretrain_seed=PRETRAIN_SEED)
    except CorpusError as err:
        raise DataError(f"task.dataset='stdlib' with federation.clients={num_clients}: {err}") from None
    clients = [token_windows(t, task.context) for t in corpus.client_tokens]
    test = token_windows(corpus.test_tokens, task.context)
    config = GPTConfig(vocab_size=256, context=task.context, n_layer=task.n_layer, n_head=task.n_head,
                       n_embd=task.n_embd)
    spec = LMModelSpec(config, pretrained=bool(task.pretrained), pretrain_steps=int(task.pretrain_steps),
                       cache_dir=task.cache_dir or None, corpus=corpus)
    info = {"partition": "natural", "client_names": list(corpus.client_names),
            "windows": [len(y) for _, y in clients], "test_windows": len(test[1]),
            "pretrain_tokens": int(corpus.pretrain_tokens.numel())}
    return FederatedData("stdlib", VocabSize(256, spec), (task.context,), (0.0, 255.0), clients, test, info)


# -- Hugging Face path (needs network for hub datasets / checkpoints) ---------------------------


def load_hf_text_dataset(name: str, split: str = "train", cache_dir: str | Path | None = None, *,
                         data_files: Any = None, text_field: str = "text"):
    """A ``datasets.Dataset`` with a text column, from the hub, a local builder or a saved dataset.

    ``name`` may be a hub id (``"wikitext"``, needs network), a packaged builder with
    local files (``"json"`` with ``data_files=...``) or a directory written by
    ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (loaded with
    ``load_from_disk``; for a DatasetDict ``split`` picks the split).
    """
    import datasets

    local = Path(name)
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise KeyError(f"saved dataset {name} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, split=split, data_files=data_files,
                                   cache_dir=None if cache_dir is None else str(cache_dir))
    if text_field not in ds.column_names:
        raise KeyError(f"dataset {name!r} has no column {text_field!r}; its columns are {ds.column_names} "
                       f"(pass text_field=)")
    return ds


def texts_to_tokens(texts: Iterable[str], max_bytes: int | None = None,
                    tokenizer: ByteTokenizer | None = None) -> torch.Tensor:
    """Concatenate texts (blank line between) into one token tensor (uint8 without specials)."""
    tokenizer = tokenizer or ByteTokenizer()
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text + "\n\n"))
        if max_bytes is not None and len(ids) >= max_bytes:
            ids = ids[:max_bytes]
            break
    dtype = torch.uint8 if tokenizer.vocab_size <= 256 else torch.int64
    return torch.tensor(ids, dtype=dtype)


def hf_causal_lm(checkpoint: str, cache_dir: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """``transformers.AutoModelForCausalLM.from_pretrained(checkpoint)``; transformers is optional."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("hf_causal_lm needs the optional package 'transformers' (pip install transformers); "
                          "the built-in GPT (stamen.tasks.lm.GPT) works without it") from err
    return transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, cache_dir=None if cache_dir is None else str(cache_dir), **kwargs)
