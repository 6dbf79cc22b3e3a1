"""Quantizing and sparsifying codecs: ``fp16``, ``int8`` (stochastic, unbiased) and ``topk``
(with client-side error feedback).

None of them is linear: their payloads cannot be summed before decoding (fp16 sums would
lose precision and overflow in the payload dtype; int8 payloads carry per-tensor scales;
top-k supports differ between clients). Decode each payload, then aggregate.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stamen.sketching.codec import Codec, CodecContext, PayloadError, register_codec

FP16_MAX = float(np.finfo(np.float16).max)


@register_codec
class Float16Codec(Codec):
    """Values cast to IEEE half precision: 2 bytes per coordinate, relative error <= 2^-11
    for |x| >= 6.1e-5 (smaller values lose relative precision as subnormals)."""

    name = "fp16"
    linear = False

    def encode(self, update: torch.Tensor, ctx: CodecContext, state: dict | None = None) -> dict[str, np.ndarray]:
        x = self.flat_update(update, ctx, self.name)
        peak = max_abs(x)
        if not peak <= FP16_MAX:  # also catches NaN
            raise ValueError(f"codec 'fp16': update has |value| up to {peak:.3g}, beyond the float16 maximum "
                             f"{FP16_MAX:g}; clip the update or use the 'dense' or 'int8' codec")
        return {"values": x.to("cpu", torch.float16).numpy().copy()}

    def decode(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
        self.expect_keys(payload, {"values"})
        values = self.expect(payload, "values", dtype=np.float16, shape=(ctx.d,))
        return torch.from_numpy(values.astype(np.float32))


@register_codec
class Int8Codec(Codec):
    """QSGD-style stochastic quantization to 255 levels with one fp32 scale per parameter tensor.

    For a tensor ``v`` with scale ``m = max|v|``: ``q = floor(127 v / m + u)``, ``u ~ U[0, 1)``
    drawn from the node's private generator ``ctx.generator("int8", node=True)``. Rounding up
    with probability equal to the fractional part makes ``E[q m / 127] = v`` (unbiased); the
    error per coordinate is at most ``m / 127``. Per-tensor scales keep a layer of small
    weights from being flattened to zero by another layer's large ones.
    Payload: ``q`` (int8, d) and ``scales`` (fp32, one per tensor in ``ctx.layout``).
    """

    name = "int8"
    linear = False
    LEVELS = 127

    def encode(self, update: torch.Tensor, ctx: CodecContext, state: dict | None = None) -> dict[str, np.ndarray]:
        x = self.flat_update(update, ctx, self.name).to("cpu")
        uniform = torch.rand(ctx.d, generator=ctx.generator("int8", node=True), dtype=torch.float32)
        q = torch.empty(ctx.d, dtype=torch.int8)
        scales = torch.zeros(len(ctx.layout.numels), dtype=torch.float32)
        for i, (start, stop) in enumerate(tensor_bounds(ctx.layout.numels)):
            scales[i] = quantize_segment_(x[start:stop], uniform[start:stop], q[start:stop], self.LEVELS)
        return {"q": q.numpy(), "scales": scales.numpy()}

    def decode(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
        self.expect_keys(payload, {"q", "scales"})
        q = self.expect(payload, "q", dtype=np.int8, shape=(ctx.d,))
        scales = self.expect(payload, "scales", dtype=np.float32, shape=(len(ctx.layout.numels),))
        if (scales < 0).any():
            raise PayloadError("payload array 'scales' has negative entries; scales are max-abs values (>= 0)")
        if ctx.d and int(q.min()) < -self.LEVELS:
            raise PayloadError(f"payload array 'q' has values below -{self.LEVELS}; int8 levels are in "
                               f"[-{self.LEVELS}, {self.LEVELS}]")
        out = torch.from_numpy(q.astype(np.float32))
        for scale, (start, stop) in zip(scales.tolist(), tensor_bounds(ctx.layout.numels)):
            out[start:stop].mul_(scale / self.LEVELS)
        return self.expect_finite_result(out, self.name)


def max_abs(x: torch.Tensor) -> float:
    """max |x| (NaN if x has one) without the |x| temporary that ``x.abs().max()`` allocates."""
    return float(torch.linalg.vector_norm(x, ord=float("inf"))) if x.numel() else 0.0


def tensor_bounds(numels: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each parameter tensor in the flat vector."""
    stops = np.cumsum(numels, dtype=np.int64).tolist()
    return list(zip([0] + stops[:-1], stops))


def quantize_segment_(values: torch.Tensor, uniform: torch.Tensor, out: torch.Tensor, levels: int) -> float:
    """Stochastically round ``levels * values / max|values|`` into the int8 tensor ``out``;
    return the scale ``max|values|`` (0 for an all-zero tensor, which encodes to zeros)."""
    if values.numel() == 0:
        return 0.0
    scale = max_abs(values)
    if not math.isfinite(scale):
        raise ValueError("codec 'int8': update contains NaN or infinite values")
    if scale == 0.0:
        out.zero_()
        return 0.0
    scaled = torch.div(values, scale).mul_(levels)  # divide first: levels/scale overflows for tiny scales
    scaled.add_(uniform).floor_().clamp_(-levels, levels)
    out.copy_(scaled)
    return scale


@register_codec
class TopKCodec(Codec):
    """The k largest-magnitude coordinates (indices + fp32 values), with error feedback.

    ``k`` is given directly or as ``ratio`` of d (default 0.01). Indices are int32 when d fits,
    else int64, sent in increasing order. With ``error_feedback`` (default) and a ``state``
    dict, what was not sent (``update + carried residual - sent``) is stored in
    ``state["topk.residual"]`` (fp32 numpy, length d) and added to the next round's update,
    so over rounds everything is eventually sent: Σ sent + final residual = Σ updates.
    """

    name = "topk"
    linear = False
    STATE_KEY = "topk.residual"

    def __init__(self, *, ratio: float | None = None, k: int | None = None, error_feedback: bool = True) -> None:
        if ratio is not None and k is not None:
            raise ValueError("codec 'topk': give either 'ratio' or 'k', not both")
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"codec 'topk': option 'k' must be a positive int, got {k!r}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
            raise ValueError(f"codec 'topk': option 'ratio' must be in (0, 1], got {ratio!r}")
        if not isinstance(error_feedback, bool):
            raise ValueError(f"codec 'topk': option 'error_feedback' must be true or false, got {error_feedback!r}")
        self.k = None if k is None else int(k)
        self.ratio = 0.01 if ratio is None and k is None else ratio
        self.error_feedback = error_feedback

    def k_for(self, d: int) -> int:
        """How many coordinates are sent for a d-dimensional update (between 1 and d)."""
        if d == 0:
            return 0
        wanted = self.k if self.k is not None else round(self.ratio * d)
        return int(min(d, max(1, wanted)))

    @staticmethod
    def index_dtype(d: int) -> np.dtype:
        return np.dtype(np.int32) if d <= np.iinfo(np.int32).max else np.dtype(np.int64)

    def encode(self, update: torch.Tensor, ctx: CodecContext, state: dict | None = None) -> dict[str, np.ndarray]:
        x = self.flat_update(update, ctx, self.name).to("cpu")
        carry = self.error_feedback and state is not None
        x = x + self._residual(state, ctx.d) if carry and self.STATE_KEY in state else x.clone()
        indices = largest_magnitude(x, self.k_for(ctx.d))
        values = x[indices]
        if carry:
            x[indices] = 0.0
            state[self.STATE_KEY] = x.numpy()
        return {"indices": indices.numpy().astype(self.index_dtype(ctx.d)), "values": values.numpy()}

    def decode(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
        self.expect_keys(payload, {"indices", "values"})
        k = self.k_for(ctx.d)
        values = self.expect(payload, "values", dtype=np.float32, shape=(k,))
        indices = self.expect(payload, "indices", shape=(k,))
        if indices.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise PayloadError(f"payload array 'indices' has dtype {indices.dtype}, expected int32 or int64")
        check_indices(indices, ctx.d)
        out = torch.zeros(ctx.d, dtype=torch.float32)
        out[torch.from_numpy(indices.astype(np.int64))] = torch.from_numpy(np.array(values, copy=True))
        return out

    def _residual(self, state: dict, d: int) -> torch.Tensor:
        residual = torch.as_tensor(np.asarray(state[self.STATE_KEY], dtype=np.float32))
        if residual.shape != (d,):
            raise ValueError(f"codec 'topk': the carried residual in state[{self.STATE_KEY!r}] has shape "
                             f"{tuple(residual.shape)}, but the update has d={d}; the model layout changed "
                             f"between rounds — clear that state entry")
        return residual


def largest_magnitude(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, increasing) of k entries of largest |x| (ties broken arbitrarily).

    ``torch.topk`` over all of d is slow on CPU and copies (value, index) pairs, ~3x the
    update in memory. For k << d we first keep only the candidates above a threshold read
    off a strided sample (aiming at ~2k of them), then run ``topk`` on those. Exact: if
    fewer than k pass, the threshold is lowered, and after a few tries we fall back.
    """
    d = x.numel()
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    magnitude = x.abs()
    stride = d // max(1 << 12, 64 * d // k)  # a sample with ~64 members of the top k
    if stride >= 8:
        sample = magnitude[::stride]
        for oversample in (2, 8, 32):
            rank = min(sample.numel(), -(-oversample * k * sample.numel() // d))
            threshold = torch.topk(sample, rank, sorted=False).values.min()
            candidates = (magnitude >= threshold).nonzero().squeeze(1)
            if candidates.numel() >= k:
                chosen = torch.topk(magnitude[candidates], k, sorted=False).indices
                return candidates[chosen].sort().values
    return torch.topk(magnitude, k, sorted=False).indices.sort().values


def check_indices(indices: np.ndarray, d: int) -> None:
    """Payload indices must lie in [0, d) and be distinct."""
    if indices.size == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= d:
        raise PayloadError(f"payload array 'indices' has entries outside [0, {d}): min {low}, max {high}")
    if np.unique(indices).size != indices.size:
        raise PayloadError("payload array 'indices' has duplicate entries")
