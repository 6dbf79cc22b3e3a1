"""The GPT of the stdlib language-modelling task, and how to train and evaluate it centrally.

:class:`GPT` is a small pre-LN causal transformer (≈1.1 M parameters by default) that trains
on CPU; :func:`lm_loss` is its next-token cross-entropy, :func:`lm_batches` draws random
windows of a token stream, :func:`evaluate_lm` measures loss and perplexity on fixed windows
and :func:`train_lm` runs AdamW. Everything random comes from private generators seeded from
the arguments; the global RNGs are never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

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
