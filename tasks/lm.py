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

This module is that Task wiring, and the public face of the task: the public names of the
parts below are importable from ``stamen.tasks.lm`` (``__all__``).

- ``stamen.tasks.lm_corpus`` — ``ByteTokenizer`` and the stdlib corpus with its client split;
- ``stamen.tasks.lm_model`` — ``GPT``, its loss, batches, evaluation and central training;
- ``stamen.tasks.lm_pretrain`` — central pretraining and its on-disk weight cache;
- ``stamen.tasks.lm_hf`` — for users with network access, ``load_hf_text_dataset`` /
  ``hf_causal_lm`` reach the Hugging Face hub (``datasets`` is a dependency;
  ``transformers`` is optional and imported lazily).

Everything random comes from private generators seeded from the arguments; the global
RNGs are never touched. Pure torch + stdlib (``datasets`` only on the HF path).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from stamen.tasks.lm_corpus import (EXCLUDED_DIRS, EXCLUDED_GROUPS, PRETRAIN_GROUPS, ByteTokenizer, CorpusError,
                                    LMCorpus, merge_groups, source_groups, stdlib_corpus, stdlib_root)
from stamen.tasks.lm_hf import hf_causal_lm, load_hf_text_dataset, texts_to_tokens
from stamen.tasks.lm_model import (GPT, CausalSelfAttention, GPTConfig, TransformerBlock, evaluate_lm, lm_batches,
                                   lm_loss, train_lm)
from stamen.tasks.lm_pretrain import (PRETRAIN_BATCH, PRETRAIN_LR, PRETRAIN_SEED, PretrainResult, default_cache_dir,
                                      pretrain, pretrain_key, pretrained_state)

__all__ = [
    "EXCLUDED_DIRS", "EXCLUDED_GROUPS", "PRETRAIN_BATCH", "PRETRAIN_GROUPS", "PRETRAIN_LR", "PRETRAIN_SEED",
    "GPT", "ByteTokenizer", "CausalSelfAttention", "CorpusError", "GPTConfig", "LMCorpus", "LMModelSpec",
    "PretrainResult", "TokenLogitsGPT", "TransformerBlock", "VocabSize", "build_gpt", "default_cache_dir",
    "evaluate_lm", "hf_causal_lm", "lm_batches", "lm_loss", "load_hf_text_dataset", "load_stdlib_task",
    "merge_groups", "pretrain", "pretrain_key", "pretrained_state", "source_groups", "stdlib_corpus", "stdlib_root",
    "texts_to_tokens", "token_windows", "train_lm",
]


# -- the federated task: dataset "stdlib", model "gpt" ------------------------------------------
#
# ``stamen.tasks.data.DATASETS["stdlib"]`` and ``stamen.tasks.models.MODELS["gpt"]`` call into
# this module. A client's examples are fixed windows of its token stream, so the ordinary
# trainers (``train_sgd``: shuffled mini-batches, cross-entropy) and ``evaluate`` work unchanged:
# the model returns logits shaped (batch, vocab, positions) for targets (batch, positions), and
# Stamen's loss is then the per-token cross-entropy (perplexity = exp(test_loss)).


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
