"""Sketching codecs: an update travels as ``R x`` for a seeded linear sketch R (see operators.py).

Every party builds the same operator from ``derive_seed(ctx.seed, ctx.round, <codec name>)``,
so R is fresh each round and never travels. Sketches are mergeable: the server may sum
(or weight-average) payloads with ``combine`` before decoding.

* ``gaussian``, ``rademacher``, ``srht``, ``sparsejl``: payload ``{"sketch": fp32 (s,)}``;
  ``decode`` is the adjoint ``Rᵀ y``, unbiased (``E[RᵀR] = I``) and linear, so ``linear = True``
  and ``decode(combine(payloads)) == Σ decode(payload)`` (up to fp rounding).
* ``countsketch``: payload ``{"table": fp32 (rows, s)}``; ``decode`` is the median-over-rows
  estimate of every coordinate — robust but NOT linear, so ``linear = False`` — while the
  table itself is mergeable (``mergeable = True``). For FetchSGD-style servers:
  ``combine`` the tables, then ``unsketch_topk`` (heavy hitters) or ``adjoint_decode``
  (the linear, unbiased mean-over-rows de-sketch).

Options: ``ratio`` (s as a fraction of d, default 0.1) or ``size`` (s itself); for
``countsketch`` s is the number of buckets per row, so its payload is ``rows * s`` floats
(half of the dense update at the defaults ``rows = 5``, ``ratio = 0.1``).
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from stamen.core import derive_seed
from stamen.sketching.codec import Codec, CodecContext, PayloadError, register_codec
from stamen.sketching.operators import CountSketch, SketchOperator, make_operator

_CACHE_LOCK = threading.Lock()
_LAST_OPERATOR: dict[str, tuple[tuple, SketchOperator]] = {}


def cached_operator(kind: str, d: int, s: int, seed: int, **options: Any) -> SketchOperator:
    """The operator for ``(kind, d, s, seed, options)``, reusing the last one built for ``kind``.

    One entry per kind: within a round every encode/decode hits it (no regenerated hashes);
    a new round's seed replaces it, so at most one operator per kind stays in memory.
    """
    key = (d, s, seed, tuple(sorted(options.items())))
    with _CACHE_LOCK:
        hit = _LAST_OPERATOR.get(kind)
        if hit is not None and hit[0] == key:
            return hit[1]
    operator = make_operator(kind, d, s, seed, **options)
    with _CACHE_LOCK:
        _LAST_OPERATOR[kind] = (key, operator)
    return operator


def clear_operator_cache() -> None:
    """Drop cached operators (frees CountSketch / SparseJL hash tables)."""
    with _CACHE_LOCK:
        _LAST_OPERATOR.clear()


class SketchCodec(Codec):
    """Base for codecs whose payload is ``operator.apply(update)`` (see the module docstring)."""

    operator_kind: ClassVar[str]
    payload_key: ClassVar[str] = "sketch"
    linear = True
    mergeable: ClassVar[bool] = True  # payloads may be summed, whether or not decode is linear
    DEFAULT_RATIO: ClassVar[float] = 0.1
    #: options this codec passes to its operator, besides ``ratio`` / ``size`` (``compression.*``)
    OPERATOR_OPTIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, ratio: float | None = None, size: int | None = None, **operator_options: Any) -> None:
        if ratio is not None and size is not None:
            raise ValueError(f"codec {self.name!r}: give either 'ratio' or 'size', not both")
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(f"codec {self.name!r}: option 'size' must be a positive int, got {size!r}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
            raise ValueError(f"codec {self.name!r}: option 'ratio' must be in (0, 1], got {ratio!r}")
        self.size = None if size is None else int(size)
        self.ratio = self.DEFAULT_RATIO if ratio is None and size is None else ratio
        self.operator_options = self._check_operator_options(operator_options)

    def _check_operator_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if options:
            raise ValueError(f"codec {self.name!r} got unknown options {sorted(options)}; it takes 'ratio' or 'size'")
        return {}

    # -- sizes and operators --------------------------------------------------------------
    def sketch_size(self, d: int) -> int:
        """s for a d-dimensional update: ``size`` if given, else ``round(ratio * d)`` (at least 1)."""
        return self.size if self.size is not None else max(1, round(self.ratio * d))

    def payload_shape(self, d: int) -> tuple[int, ...]:
        return (self.sketch_size(d),)

    def operator(self, ctx: CodecContext) -> SketchOperator:
        """The round's shared operator; the same on every party for the same (seed, round, d)."""
        seed = derive_seed(ctx.seed, ctx.round, self.name)
        s = self.sketch_size(ctx.d)
        return cached_operator(self.operator_kind, ctx.d, s, seed, **self.operator_options_for(s))

    def operator_options_for(self, s: int) -> dict[str, Any]:
        """Constructor options for the operator at sketch size s."""
        return self.operator_options

    # -- the codec contract ---------------------------------------------------------------
    def encode(self, update: torch.Tensor, ctx: CodecContext, state: dict | None = None) -> dict[str, np.ndarray]:
        x = self.flat_update(update, ctx, self.name)
        sketch = self.operator(ctx).apply(x)
        return {self.payload_key: sketch.to("cpu", torch.float32).numpy()}

    def decode(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
        sketch = self.read_sketch(payload, ctx)
        return self.expect_finite_result(self.operator(ctx).adjoint(sketch), self.name)

    def read_sketch(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
        """The payload's sketch as an fp32 tensor, after checking keys, dtype, shape and finiteness."""
        self.expect_keys(payload, {self.payload_key})
        arr = self.expect(payload, self.payload_key, dtype=np.float32, shape=self.payload_shape(ctx.d))
        return torch.from_numpy(np.array(arr, copy=True))

    def combine(self, payloads: Sequence[dict[str, np.ndarray]], ctx: CodecContext,
                weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
        """``Σ w_i payload_i`` in sketch space (fp32), each payload validated first.

        With weights ``n_i / Σ n`` this is FedAvg's weighted mean, taken before de-sketching.
        """
        if not payloads:
            raise ValueError(f"codec {self.name!r}: combine needs at least one payload")
        if weights is None:
            weights = [1.0] * len(payloads)
        if len(weights) != len(payloads):
            raise ValueError(f"combine got {len(payloads)} payloads but {len(weights)} weights")
        if not all(np.isfinite(float(w)) for w in weights):
            raise ValueError(f"combine weights must be finite numbers, got {list(weights)}")
        total = torch.zeros(self.payload_shape(ctx.d), dtype=torch.float32)
        for payload, weight in zip(payloads, weights):
            total.add_(self.read_sketch(payload, ctx), alpha=float(weight))
        if not bool(torch.isfinite(total).all()):
            raise PayloadError(f"codec {self.name!r}: the combined sketch overflowed")
        return {self.payload_key: total.numpy()}


@register_codec
class GaussianCodec(SketchCodec):
    """Dense Gaussian sketch; regenerated tile by tile, refused when s·d is too large
    (options ``max_block_bytes``, ``max_entries`` go to ``GaussianSketch``)."""

    name = "gaussian"
    operator_kind = "gaussian"
    OPERATOR_OPTIONS = ("max_block_bytes", "max_entries")

    def _check_operator_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return _only(self.name, options, set(self.OPERATOR_OPTIONS))


@register_codec
class RademacherCodec(GaussianCodec):
    """Dense ±1/√s (AMS) sketch; same limits as ``gaussian``."""

    name = "rademacher"
    operator_kind = "rademacher"


@register_codec
class SRHTCodec(SketchCodec):
    """Subsampled randomized Hadamard transform: O(d log d) time, no stored matrix."""

    name = "srht"
    operator_kind = "srht"


@register_codec
class SparseJLCodec(SketchCodec):
    """Sparse JL sketch with ``k`` (option, default 4, capped at s) non-zeros per column."""

    name = "sparsejl"
    operator_kind = "sparsejl"

    OPERATOR_OPTIONS = ("k",)

    def _check_operator_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = _only(self.name, options, set(self.OPERATOR_OPTIONS))
        k = options.setdefault("k", 4)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"codec {self.name!r}: option 'k' must be a positive int, got {k!r}")
        return options

    def operator_options_for(self, s: int) -> dict[str, Any]:
        """k is capped at s, so tiny models still get a (denser) sketch instead of an error."""
        return {"k": min(int(self.operator_options["k"]), s)}


@register_codec
class CountSketchCodec(SketchCodec):
    """CountSketch table (``rows`` × s buckets); decode = median estimate (not linear).

    Server recipes: ``combine`` tables from all clients (the sum of tables is the table of
    the sum), then ``unsketch_topk`` (FetchSGD) or ``adjoint_decode`` (linear, unbiased).
    """

    name = "countsketch"
    operator_kind = "countsketch"
    payload_key = "table"
    linear = False
    OPERATOR_OPTIONS = ("rows",)

    def _check_operator_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = _only(self.name, options, set(self.OPERATOR_OPTIONS))
        rows = options.setdefault("rows", 5)
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"codec {self.name!r}: option 'rows' must be a positive int, got {rows!r}")
        options["rows"] = int(rows)
        return options

    def payload_shape(self, d: int) -> tuple[int, ...]:
        return (self.operator_options["rows"], self.sketch_size(d))

    def operator(self, ctx: CodecContext) -> CountSketch:
        return super().operator(ctx)  # type: ignore[return-value]

    def decode(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
        table = self.read_sketch(payload, ctx)
        return self.expect_finite_result(self.operator(ctx).estimate(table), self.name)

    def adjoint_decode(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
        """Mean over rows of the signed bucket look-ups: linear in the table and unbiased."""
        table = self.read_sketch(payload, ctx)
        return self.expect_finite_result(self.operator(ctx).adjoint(table), self.name)

    def unsketch_topk(self, payload: dict[str, np.ndarray], ctx: CodecContext, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Heavy hitters of a (combined) table: (indices int64 ascending, median estimates fp32)."""
        table = self.read_sketch(payload, ctx)
        indices, values = self.operator(ctx).topk(table, k)
        return indices, self.expect_finite_result(values, self.name)

    def decode_topk(self, payload: dict[str, np.ndarray], ctx: CodecContext, k: int) -> torch.Tensor:
        """A length-d vector holding only the k heavy hitters of the table (FetchSGD's update)."""
        indices, values = self.unsketch_topk(payload, ctx, k)
        out = torch.zeros(ctx.d, dtype=torch.float32)
        out[indices] = values
        return out


def _only(codec: str, options: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"codec {codec!r} got unknown options {unknown}; it takes 'ratio' or 'size' and {sorted(allowed)}")
    return dict(options)
