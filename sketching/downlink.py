"""The arithmetic of the catch-up downlinks, shared by the server and the clients.

A strategy with a catch-up downlink (``strategies/catchup.py`` on the server,
``client/catchup.py`` on the clients) moves the global model each round t by a compact update
U_t (a payload of a few arrays): w_t = step(w_{t−1}, U_t). The server takes that step and keeps
U_t; a client that missed rounds takes the same steps, with these same functions, on its own copy
— so on one machine both copies agree bit for bit — and checks the result against
``weights_check`` of the server's weights, which the message carries.

The steps of the strategies that use it:

- ``sketch_step`` (``sketched_fedavg``): U_t is the example-weighted mean sketch ȳ_t, and
  w ← w + η_g · R_tᵀ ȳ_t, with R_t the round's shared operator (CountSketch: the linear
  mean-over-rows adjoint, not the median estimate);
- ``sparse_step`` (``fetchsgd``): U_t is a ``topk`` payload (ascending indices, fp32 values) of
  the k coordinates unsketched that round, and w ← w + Σ values·e_indices;
- Ferret's step (reconstruct the aggregated coefficients) is ``strategies.ferret.apply_update``.

Pure tensor code: no Flower.
"""

from __future__ import annotations

import numpy as np
import torch

from stamen.sketching.codec import Codec, CodecContext, PayloadError
from stamen.sketching.codecs_quant import TopKCodec


def weights_check(flat: torch.Tensor) -> tuple[float, float]:
    """(Σ w, ‖w‖) in fp64: what a client compares its rebuilt copy of the global weights against."""
    w = flat.to(torch.float64)
    return float(w.sum()), float(w.norm())


def weights_match(flat: torch.Tensor, expected_sum: float, expected_norm: float, rtol: float = 1e-5) -> bool:
    """Whether ``flat`` has the server's Σw and ‖w‖, to ``rtol``·‖w‖ (the sum to that times √d)."""
    total, norm = weights_check(flat)
    tol = rtol * max(float(expected_norm), 1e-12)
    return abs(total - expected_sum) <= tol * float(np.sqrt(max(flat.numel(), 1))) and abs(norm - expected_norm) <= tol


def desketch(codec: Codec, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
    """R_tᵀ y: the linear de-sketch of a sketch payload (CountSketch: ``adjoint_decode``)."""
    return getattr(codec, "adjoint_decode", codec.decode)(payload, ctx)


def sketch_step(flat: torch.Tensor, codec: Codec, payload: dict[str, np.ndarray], ctx: CodecContext,
                server_lr: float) -> torch.Tensor:
    """w + η_g · R_tᵀ ȳ: iterative sketching's global step (``ctx.round`` selects R_t)."""
    return flat.add(desketch(codec, payload, ctx), alpha=float(server_lr))


def sparse_payload(indices: torch.Tensor, values: torch.Tensor, d: int) -> dict[str, np.ndarray]:
    """The k coordinates of a sparse update as a ``topk`` payload (int32 indices when d fits)."""
    idx = indices.detach().to("cpu", torch.int64).numpy().astype(TopKCodec.index_dtype(d))
    return {"indices": idx, "values": values.detach().to("cpu", torch.float32).numpy().copy()}


def sparse_step(flat: torch.Tensor, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
    """w + Σ values·e_indices, after checking the payload (keys, dtypes, equal lengths, distinct
    indices in range); the coordinates outside the payload are left as they are."""
    Codec.expect_keys(payload, {"indices", "values"})
    k = int(np.asarray(payload["values"]).size)
    if k == 0:
        raise PayloadError("a sparse update payload must carry at least one coordinate")
    return flat + TopKCodec(k=k).decode(payload, ctx)
