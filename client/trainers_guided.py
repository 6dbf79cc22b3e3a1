"""FedLEx's client side: the ``explore`` and ``guided`` trainers (Internò et al.,
"Federated Loss Exploration for Improved Convergence on Non-IID Data", IJCNN 2024).

``explore`` (exploration, once, before round 1). The model holds the initial weights W0,
loaded from the message into this worker's model (never the message's arrays themselves),
so every explorer trains its own copy. It trains for up to ``exploration-epochs`` epochs with
the run's local optimizer (``task.optimizer``, ``task.lr``, one optimizer for the whole
exploration) and stops early after ``exploration-patience`` epochs without a strictly lower
monitored loss. The monitored loss is the epoch's mean training loss (the reference explores
on the full local data; the authors' code monitors the last mini-batch's loss), or, with
``exploration-holdout`` h > 0, the loss on a seeded held-apart share h of the local data,
which it then does not train on. The model ends at its best epoch's weights W_i (the
authors' code keeps the last epoch's); the app sends Δ_i = W_i − W0 and the server squares
it into D_i = (W0 − W_i)².

``guided`` (every round). grad ← grad ⊙ G after every backward pass, then the optimizer step
(the authors' ``param.grad *= mask`` before ``optimizer.step()`` in ``FedlexClient.update``,
ChristianInterno/FedLEx; no rescaling of G, no learning-rate compensation):
a per-coordinate step-size scale for SGD, and with Adam (which normalizes per coordinate)
mostly a freeze of the coordinates where G = 0. Weight decay is folded into the gradient
before the scaling, so G = 0 coordinates stay exactly frozen under SGD (with or without
momentum) and Adam; with G = 1 everywhere the training is bit-identical to ``sgd``.

G arrives once per version (with the default per-round G, a new version whenever the round's
sampled explorers give a different G): the strategy attaches ``fedlex-guidance`` (raw little-endian fp32 in layout
order) to a node's config only when the node does not hold the version named by
``fedlex-guidance-version`` (a hash of those bytes). The trainer checks the bytes against the
version and caches G in the node's state as an ArrayRecord with the version beside it.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace

import numpy as np
import torch
from flwr.app import ConfigRecord
from torch import nn

from stamen import schema as P
from stamen.schema import train as T
from stamen.client.trainers import (
    TrainJob,
    TrainSettings,
    epoch_batches,
    make_optimizer,
    register_trainer,
    train_sgd,
)
from stamen.core import derive_seed

EXPLORATION_EPOCHS, EXPLORATION_PATIENCE, EXPLORATION_HOLDOUT = (
    T.EXPLORATION_EPOCHS, T.EXPLORATION_PATIENCE, T.EXPLORATION_HOLDOUT)
GUIDANCE, GUIDANCE_VERSION = T.GUIDANCE, T.GUIDANCE_VERSION
# Node state records holding the cached G and its version.
STATE_GUIDANCE, STATE_GUIDANCE_META = "fedlex-guidance", "fedlex-guidance-meta"


def guidance_version(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


# -- exploration -------------------------------------------------------------------------------
def _option(job: TrainJob, key: str, kind: type, minimum):
    if key not in job.options:
        raise ValueError(f"trainer 'explore' needs the config entry {key!r}")
    value = kind(job.options[key])
    if not value >= minimum:
        raise ValueError(f"config entry {key!r} must be >= {minimum}, got {value!r}")
    return value


def holdout_split(n: int, fraction: float, seed: int, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-apart indices): a seeded share ``fraction`` of ``n`` held apart (≥ 1 each)."""
    if fraction <= 0:
        return np.arange(n), np.arange(0)
    k = min(n - 1, max(1, int(round(fraction * n))))
    if k < 1:
        raise ValueError(f"exploration-holdout={fraction}: a client with {n} examples cannot hold one apart")
    perm = np.random.default_rng(derive_seed(seed, "fedlex-holdout", partition_id) % (2**63)).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


@register_trainer("explore")
def train_explore(model: nn.Module, X: np.ndarray, y: np.ndarray, s: TrainSettings,
                  generator: torch.Generator, job: TrainJob) -> tuple[float, int]:
    """Train the model (holding W0) until early stopping; leave it at its best epoch's weights."""
    max_epochs = _option(job, EXPLORATION_EPOCHS, int, 1)
    patience = _option(job, EXPLORATION_PATIENCE, int, 1)
    holdout = float(job.options.get(EXPLORATION_HOLDOUT, 0.0))
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"config entry {EXPLORATION_HOLDOUT!r} must be in [0, 1), got {holdout!r}")
    train_idx, val_idx = holdout_split(len(y), holdout, job.seed, job.partition_id)
    model.train()
    model.to(s.device)
    Xt, yt = torch.as_tensor(X[train_idx], device=s.device), torch.as_tensor(y[train_idx], device=s.device)
    Xv, yv = torch.as_tensor(X[val_idx], device=s.device), torch.as_tensor(y[val_idx], device=s.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, s)
    best, best_state, best_epoch, stale, epochs, steps = float("inf"), None, 0, 0, 0, 0
    total, count = 0.0, 0
    for epoch in range(1, max_epochs + 1):
        ep_total, ep_count = 0.0, 0
        for idx in epoch_batches(len(yt), s.batch_size, generator):
            idx = idx.to(s.device)
            loss = nn.functional.cross_entropy(model(Xt[idx]), yt[idx])
            ep_total += float(loss.detach()) * len(idx)
            ep_count += len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        total, count, epochs = total + ep_total, count + ep_count, epoch
        if len(val_idx):
            with torch.no_grad():
                model.eval()
                monitored = float(nn.functional.cross_entropy(model(Xv), yv))
                model.train()
        else:
            monitored = ep_total / max(1, ep_count)
        if monitored < best:
            best, best_epoch, stale = monitored, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    job.metrics.update(exploration_epochs_run=float(epochs), exploration_best_epoch=float(best_epoch),
                       exploration_best_loss=best if np.isfinite(best) else -1.0)
    return total / max(1, count), steps


# -- guided training ---------------------------------------------------------------------------
def decode_guidance(raw: bytes, layout) -> dict[str, np.ndarray]:
    """G from its wire bytes; checks size and that it is finite and ≥ 0 (≤ 1 unless rescaled)."""
    if not isinstance(raw, bytes) or len(raw) != 4 * layout.d:
        raise ValueError(f"config entry {GUIDANCE!r} must hold {4 * layout.d} bytes (fp32 per parameter), "
                         f"got {len(raw) if isinstance(raw, bytes) else type(raw).__name__}")
    flat = np.frombuffer(raw, "<f4").astype(np.float32)
    if not (np.isfinite(flat).all() and flat.min(initial=0.0) >= 0.0):
        raise ValueError(f"config entry {GUIDANCE!r} must hold finite values >= 0")
    return layout.unflatten(torch.from_numpy(flat))


def node_guidance(job: TrainJob) -> dict[str, np.ndarray]:
    """The G this round asks for: from the message (then cached) or from the node's cache."""
    want = job.options.get(GUIDANCE_VERSION)
    if not want:
        raise ValueError(f"trainer 'guided' needs the config entry {GUIDANCE_VERSION!r}")
    if GUIDANCE in job.options:
        raw = job.options[GUIDANCE]
        guidance = decode_guidance(raw, job.task.layout)
        if guidance_version(raw) != want:
            raise ValueError(f"the {GUIDANCE!r} bytes do not match {GUIDANCE_VERSION!r}={want!r}")
        job.state[STATE_GUIDANCE] = P.to_array_record(guidance)
        job.state[STATE_GUIDANCE_META] = ConfigRecord({"version": want})
        return guidance
    meta = job.state.config_records.get(STATE_GUIDANCE_META)
    have = meta.get("version") if meta is not None else None
    if have != want:
        raise ValueError(f"this node holds FedLEx guidance version {have!r}, the server asked for {want!r} "
                         f"without sending it (entry {GUIDANCE!r}); the server resends it after this failure")
    return P.from_array_record(job.state.array_records[STATE_GUIDANCE])


@register_trainer("guided")
def train_guided(model: nn.Module, X: np.ndarray, y: np.ndarray, s: TrainSettings,
                 generator: torch.Generator, job: TrainJob) -> tuple[float, int]:
    """``train_sgd`` with every parameter's gradient scaled by G (weight decay folded in first)."""
    guidance = node_guidance(job)
    wd = s.weight_decay
    handles = []
    try:
        for name, p in model.named_parameters():
            if name not in guidance:
                raise ValueError(f"the guidance matrix has no tensor {name!r}")
            g = torch.as_tensor(guidance[name], device=s.device).reshape(p.shape)

            def scale(grad, g=g, p=p):
                return (grad.add(p.detach(), alpha=wd) if wd else grad) * g

            handles.append(p.register_hook(scale))
        return train_sgd(model, X, y, replace(s, weight_decay=0.0), generator, job)
    finally:
        for h in handles:
            h.remove()
