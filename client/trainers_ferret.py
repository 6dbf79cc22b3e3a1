"""Client side of Ferret and FedKSeed: the coefficient downlink, a fixed-step trainer, the zeroth-order trainer.

- ``DOWNLINKS["ferret"]``: the catch-up downlink (``client/catchup.py``, shared with
  ``sketched_fedavg`` and ``fetchsgd``) with Ferret's step. The client keeps its own copy of the
  global weights in its node state (``ferret-global``, with the round it belongs to in
  ``ferret-sync``). A message either
  carries dense weights (``ferret-sync = "dense"``: first participation, or when catching up
  would cost more) or the aggregated coefficient payloads Γ_r of the rounds the node missed
  (``"catch-up"``); the client applies those it lacks in order, w ← w + η_s·reconstruct(Γ_r) —
  the server's own step, so the copy matches the server's weights bit for bit — checks the
  result against the fp64 sum and norm of the server's weights sent along, stores it and
  trains from it. The message protocol is documented in ``strategies/ferret.py``.
- trainer ``steps``: exactly ``local-steps`` optimizer steps (``task.optimizer``, ``task.lr``)
  on mini-batches from successive shuffled passes over the client's data.
- trainer ``fedkseed`` + encoder ``fedkseed``: FedKSeed's zeroth-order local training (see
  ``train_zeroth_order``); the update it makes is exactly Σ_k c_k v_k over the pool
  directions it used, and the encoder sends those exact coefficients in Ferret's payload
  format (one block), so the server aggregates and clients catch up exactly as for Ferret.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from stamen import schema as P
from stamen.schema import train as T
from stamen.client.app import DOWNLINKS
from stamen.client.catchup import CatchUpClient
from stamen.client.trainers import TrainJob, TrainSettings, epoch_batches, register_trainer, run_local_steps
from stamen.core import derive_seed
from stamen.sketching.codec import CodecContext, PayloadError, register_codec
from stamen.sketching.ferret import FerretCodec, basis, basis_variance, seed_pool

# Message config entries: stamen/schema/train.py (client and strategies share only messages)
FERRET = CatchUpClient("ferret")  # the catch-up downlink's entries and node-state records
SYNC, GLOBAL_ROUND, BASE_ROUND, ROUNDS = FERRET.sync, FERRET.global_round, FERRET.base_round, FERRET.rounds
SERVER_LR, CHECK_SUM, CHECK_NORM = T.FERRET_SERVER_LR, FERRET.check_sum, FERRET.check_norm
LOCAL_STEPS = T.LOCAL_STEPS
ZO_STEPS, ZO_EPS, ZO_LR = T.ZO_STEPS, T.ZO_EPS, T.ZO_LR
PAYLOAD_KEYS = ("block", "seed", "value")

# Node-state records
GLOBAL_COPY = FERRET.copy_record  # "ferret-global": ArrayRecord {"flat": the global weights, fp32, layout order}
SYNC_STATE = FERRET.round_record  # "ferret-sync": ConfigRecord {"round": the round those weights belong to}


# -- the coefficient downlink -----------------------------------------------------------------
held_copy, store_copy, forget_copy = FERRET.held_copy, FERRET.store_copy, FERRET.forget_copy


def ferret_downlink(content: RecordDict, job: TrainJob) -> dict[str, np.ndarray]:
    """The global weights of a ``downlink = "ferret"`` message (dense, or rebuilt from coefficients)."""
    config = job.options
    layout = job.task.layout
    codec: list[FerretCodec] = []  # built on first use (a dense message needs none)

    def step(flat: torch.Tensor, r: int, payload: dict[str, np.ndarray]) -> torch.Tensor:
        if not codec:
            codec.append(FerretCodec(**json.loads(config[T.CODEC_OPTIONS])))
        ctx = CodecContext(seed=job.seed, round=r, layout=layout)
        return flat.add(codec[0].decode(payload, ctx), alpha=float(config[SERVER_LR]))  # = strategies.ferret.apply_update

    return FERRET.rebuild(content, config, job.state, layout, step)


DOWNLINKS["ferret"] = ferret_downlink


# -- a fixed number of first-order steps ------------------------------------------------------------
def step_batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches, taken from successive shuffled passes over ``n`` examples."""
    out: list[torch.Tensor] = []
    while len(out) < steps:
        out.extend(epoch_batches(n, batch_size, generator))
    return out[:steps]


@register_trainer("steps")
def train_steps(model: nn.Module, X: np.ndarray, y: np.ndarray, s: TrainSettings, generator: torch.Generator,
                job: TrainJob) -> tuple[float, int]:
    """Exactly ``local-steps`` steps of ``task.optimizer`` (SGD or Adam) with ``task.lr`` (Ferret's T)."""
    steps = int(job.options[LOCAL_STEPS])
    if steps < 1:
        raise ValueError(f"trainer 'steps' needs {LOCAL_STEPS} >= 1, got {steps}")
    return run_local_steps(model, X, y, s, step_batches(len(y), s.batch_size, steps, generator))


# -- FedKSeed: zeroth-order steps along seeded directions -------------------------------------------
def fedkseed_direction_scale(d: int) -> float:
    """1/√ρ_d: the factor that turns the Ferret basis v(seed, 0) into FedKSeed's unit-variance direction z."""
    return 1.0 / math.sqrt(basis_variance(d))


#: the node-state record the ClientApp hands to the codec as its ``state`` dict (client/app.py)
CODEC_STATE = "codec-state"
_ZO_STATE_ROUND, _ZO_STATE_SEED, _ZO_STATE_VALUE = "fedkseed_round", "fedkseed_seed", "fedkseed_value"


def _load_flat(model: nn.Module, layout, flat: torch.Tensor) -> None:
    """Write a flat layout-order vector into the model's state tensors (in place, no autograd)."""
    state = model.state_dict()
    start = 0
    with torch.no_grad():
        for name, shape, n in zip(layout.names, layout.shapes, layout.numels):
            state[name].copy_(flat[start:start + n].view(shape))
            start += n


@register_trainer("fedkseed")
def train_zeroth_order(model: nn.Module, X: np.ndarray, y: np.ndarray, s: TrainSettings,
                       generator: torch.Generator, job: TrainJob) -> tuple[float, int]:
    """FedKSeed's local training (Qin et al., ICML 2024): ``zo-steps`` zeroth-order SGD steps.

    Each step picks a pool index k uniformly (a private generator from (run seed, round,
    partition)), takes the direction z_k = v(pool[k], 0)/√ρ_d — Ferret's shared basis over the
    whole model as one block, rescaled to unit-variance entries (bounded, near-uniform on
    ±√3 rather than Gaussian; E[z zᵀ] = I either way), always drawn on CPU in fp32 — and a
    mini-batch B, evaluates the loss at w ± ε z_k (two forward passes, no backward), and steps

        g = (f(w + ε z_k; B) − f(w − ε z_k; B)) / (2ε),    w ← w − lr · g · z_k.

    As a multiple of v(pool[k], 0) the step is c = −lr · g / √ρ_d; the trainer sums c per pool
    index and leaves the sums in the codec state for the ``fedkseed`` encoder. The model's
    final weights are w0 + Σ_t c_t v_t, accumulated in fp32 in step order. The perturbed
    weights are always w ± ε z written afresh from w (no drift from repeated ±).
    """
    options = job.options
    steps, eps, lr = int(options[ZO_STEPS]), float(options[ZO_EPS]), float(options[ZO_LR])
    codec_options = json.loads(options[T.CODEC_OPTIONS])
    K = int(codec_options["K"])
    layout = job.task.layout
    d = layout.d
    if steps < 1 or not eps > 0 or not lr > 0:
        raise ValueError(f"trainer 'fedkseed' needs {ZO_STEPS} >= 1, {ZO_EPS} > 0 and {ZO_LR} > 0, "
                         f"got {steps}, {eps}, {lr}")
    pool = seed_pool(job.seed, K)
    scale = fedkseed_direction_scale(d)
    pick = np.random.default_rng(derive_seed(job.seed, job.server_round, "fedkseed-seeds", job.partition_id))
    model.eval()  # forward passes only (and no dropout noise between the two)
    model.to(s.device)
    Xt, yt = torch.as_tensor(X, device=s.device), torch.as_tensor(y, device=s.device)
    w = layout.flatten({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
    sums: dict[int, float] = {}
    total = 0.0
    with torch.no_grad():
        for idx in step_batches(len(yt), s.batch_size, steps, generator):
            idx = idx.to(s.device)
            k = int(pick.integers(K))
            v = basis(pool[k], 0, d)
            _load_flat(model, layout, w + (eps * scale) * v)
            f_plus = float(nn.functional.cross_entropy(model(Xt[idx]), yt[idx]))
            _load_flat(model, layout, w - (eps * scale) * v)
            f_minus = float(nn.functional.cross_entropy(model(Xt[idx]), yt[idx]))
            g = (f_plus - f_minus) / (2.0 * eps)
            c = -lr * g * scale
            w.add_(v, alpha=c)
            sums[k] = sums.get(k, 0.0) + c
            total += 0.5 * (f_plus + f_minus)
    _load_flat(model, layout, w)
    seeds = np.array(sorted(sums), dtype=np.int64)
    job.state[CODEC_STATE] = P.to_array_record({
        _ZO_STATE_ROUND: np.array([job.server_round], dtype=np.int64), _ZO_STATE_SEED: seeds,
        _ZO_STATE_VALUE: np.array([sums[k] for k in seeds.tolist()], dtype=np.float64)})
    return total / steps, steps


@register_codec
class FedKSeedEncoder(FerretCodec):
    """Encoder ``fedkseed``: the exact coefficients the zeroth-order trainer accumulated, in Ferret's format.

    The update of ``train_zeroth_order`` is Σ_k c_k v(pool[k], 0) by construction; projecting
    it would only estimate the c_k, so ``encode`` sends the trainer's sums (left in the codec
    state for this round) as one-block Ferret coefficients: {block: 0…, seed: k, value: c_k}.
    Decoding, aggregation and the downlink are Ferret's. The strategy asks for a single block
    (``block_ratio`` large enough) and fp32 values.
    """

    name = "fedkseed"
    general_purpose = False  # encodes only the trainer's own coefficients: a strategy-internal wire format

    def encode(self, update: torch.Tensor, ctx: CodecContext, state: dict | None = None) -> dict[str, np.ndarray]:
        if len(self.blocks(ctx.layout)) != 1:
            raise ValueError("encoder 'fedkseed' needs one block over the whole model (a larger block_ratio)")
        state = {} if state is None else state
        if _ZO_STATE_ROUND not in state or int(np.asarray(state[_ZO_STATE_ROUND]).reshape(-1)[0]) != ctx.round:
            raise PayloadError(f"encoder 'fedkseed' found no coefficients of round {ctx.round}: it encodes what "
                               f"trainer 'fedkseed' accumulated, so the strategy must ask for that trainer")
        seeds = np.asarray(state.pop(_ZO_STATE_SEED), dtype=np.int64)
        values = np.asarray(state.pop(_ZO_STATE_VALUE), dtype=np.float64)
        state.pop(_ZO_STATE_ROUND)
        keep = values != 0.0
        return self.pack((np.zeros(int(keep.sum()), np.int64), seeds[keep], values[keep]), ctx, state)
