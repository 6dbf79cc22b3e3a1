"""Seeded linear sketch operators R: R^d -> R^s and their de-sketching maps.

Every operator is a pure function of ``(d, s, seed[, options])``: all parties that build it
with the same arguments get the same matrix, so R never travels; callers derive the seed
with ``derive_seed(run_seed, round, "<sketch name>")``.

Conventions shared by all operators (see specs/sketching_privacy.md):

* ``apply(x)`` takes a 1-D float tensor of length ``d`` and returns the sketch (length ``s``;
  an ``(rows, s)`` table for CountSketch). ``adjoint(y)`` maps a sketch back to length ``d``.
  Both are linear and run on the input's device in fp32.
* Normalisation: ``E[adjoint(apply(x))] = x`` over the seed, i.e. ``E[RᵀR] = I``. For all
  operators but CountSketch, ``adjoint`` is the exact transpose (``<Rx, y> = <x, Rᵀy>``);
  for CountSketch it is the transpose divided by ``rows`` (the mean of the per-row
  estimates), see ``CountSketch``.
* Randomness: generated on CPU, fp32, from private generators seeded by
  ``derive_seed(seed, <purpose>)`` (a ``torch.Generator``; SRHT's row subset uses a private
  ``numpy.random.Generator`` because sampling without replacement is ~25x faster there).
  The global torch and numpy RNGs are never touched. Cached random state is moved to the
  input's device on first use. Bitwise-identical results are guaranteed for the random
  state on every party and for CPU ``apply``/``adjoint`` at the same thread count; CUDA
  scatter-adds use atomics, so their sums agree only up to fp rounding.
* Streams are defined with fixed constants (``TILE_ENTRIES``); changing them, or the
  torch/numpy version, changes every operator: all parties must run the same pins.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from stamen.core import derive_seed
from stamen.sketching.fwht import fwht_, next_power_of_two

DEFAULT_MAX_BLOCK_BYTES = 64 << 20  # the most a dense operator materialises at once
DEFAULT_MAX_ENTRIES = 1 << 31  # dense operators: refuse s*d above this (work per apply)
TILE_ENTRIES = 1 << 16  # dense operators: entries per generated tile (256 KiB; defines the stream)
# Hash-sketch loops work in chunks of at most 2^15 coordinates: that is torch's parallel grain
# size, so every step runs single-threaded. The scatter/gather is bound by cache misses, not
# cores, and on a busy machine an OpenMP region per step was measured up to 10x slower.
GATHER_CHUNK = 1 << 15  # most coordinates per de-sketching chunk ((rows, chunk) temporaries)
MIN_GATHER_CHUNK = 1 << 12  # ... and at least this many, so small models do not pay per-chunk overhead
SCATTER_CHUNK = 1 << 15  # coordinates per signed scatter-add step (128 KiB temporary, stays in cache)
MEDIAN_NETWORK_MAX_ROWS = 16  # up to this many rows, a min/max network beats torch.median


# ---------------------------------------------------------------------------------------
# small pure helpers
# ---------------------------------------------------------------------------------------
def seeded_generator(seed: int, *purpose: Any) -> torch.Generator:
    """A private CPU torch generator for one purpose of one operator (global RNG untouched)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *purpose))
    return g


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def median_of_rows(values: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 of a ``(rows, n)`` tensor; mean of the two middle values for even rows.

    For the few rows a CountSketch has, an odd-even transposition network of elementwise
    min/max is exact and ~10x faster on CPU than ``torch.median(dim=0)``.
    """
    rows = values.shape[0]
    if rows > MEDIAN_NETWORK_MAX_ROWS:
        ordered = list(values.sort(dim=0).values.unbind(0))
    else:
        ordered = list(values.unbind(0))
        for phase in range(rows):
            for i in range(phase % 2, rows - 1, 2):
                a, b = ordered[i], ordered[i + 1]
                ordered[i], ordered[i + 1] = torch.minimum(a, b), torch.maximum(a, b)
    mid = rows // 2
    if rows % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def gather_chunks(d: int) -> list[tuple[int, int]]:
    """Coordinate ranges for chunked de-sketching: about d/16 each (between MIN_GATHER_CHUNK and
    GATHER_CHUNK), so the ~2·rows chunk-sized temporaries of a median stay well below d."""
    size = min(GATHER_CHUNK, max(MIN_GATHER_CHUNK, d // 16))
    return [(start, min(d, start + size)) for start in range(0, d, size)]


class HashRows:
    """m hash functions over d coordinates, stored as tables: bucket ids and ±1 signs.

    ``buckets[j, i]`` (int32) and ``signs[j, i]`` (int8) are row j's bucket and sign of
    coordinate i: 5 bytes per coordinate per row. Signs are applied by a multiply into a
    temporary rather than folded into a doubled table, which measured ~2x faster on CPU
    (the scatter target stays half the size, so more of it stays in cache).
    """

    def __init__(self, buckets: torch.Tensor, signs: torch.Tensor) -> None:
        self.buckets, self.signs = buckets, signs
        self._copies: dict[str, HashRows] = {}

    @classmethod
    def draw(cls, d: int, ranges: list[tuple[int, int]], seed: int, *purpose: Any) -> "HashRows":
        """Row j: uniform buckets in ``[offset_j, offset_j + size_j)`` and uniform signs, drawn
        (buckets first, then signs) from the generator ``seeded_generator(seed, *purpose, j)``."""
        buckets = torch.empty(len(ranges), d, dtype=torch.int32)
        signs = torch.empty(len(ranges), d, dtype=torch.int8)
        for j, (offset, size) in enumerate(ranges):
            if offset + size >= 2**31:
                raise ValueError(f"sketch width {offset + size} too large for int32 bucket ids")
            g = seeded_generator(seed, *purpose, j)
            torch.randint(0, size, (d,), generator=g, out=buckets[j]).add_(offset)
            torch.randint(0, 2, (d,), generator=g, out=signs[j]).mul_(2).sub_(1)
        return cls(buckets, signs)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"buckets": self.buckets, "signs": self.signs}

    def on(self, device: torch.device) -> "HashRows":
        """These hash rows on ``device`` (copied once, then cached)."""
        if device.type == "cpu":
            return self
        key = str(device)
        if key not in self._copies:
            self._copies[key] = HashRows(self.buckets.to(device), self.signs.to(device))
        return self._copies[key]

    def scatter(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """``out[j, b] = Σ_i sign_j(i) x_i [bucket_j(i) = b]``, shape ``(rows, width)``.

        Serial on CPU, in coordinate order, so CPU results are bitwise reproducible (on CUDA
        ``index_add_`` uses atomics). Running rows in parallel threads was tried and measured
        slower on the shared 2-core machine (the scatter is bound by cache misses, not cores).
        """
        rows = self.buckets.shape[0]
        out = torch.zeros(rows, width, dtype=torch.float32, device=x.device)
        for j in range(rows):
            for start in range(0, x.numel(), SCATTER_CHUNK):  # the signed chunk stays in cache
                stop = start + SCATTER_CHUNK
                out[j].index_add_(0, self.buckets[j, start:stop], x[start:stop] * self.signs[j, start:stop])
        return out

    def gather(self, table: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``out[j, i - start] = sign_j(i) * table[j, bucket_j(i)]`` for ``start <= i < stop``;
        a one-row ``table`` is shared by all rows."""
        looked_up = []
        for j in range(self.buckets.shape[0]):
            row = table[j if table.shape[0] > 1 else 0].index_select(0, self.buckets[j, start:stop])
            looked_up.append(row.mul_(self.signs[j, start:stop]))
        return torch.stack(looked_up)


# ---------------------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------------------
class SketchOperator(ABC):
    """A seeded linear map R: R^d -> R^s with a de-sketching map (see the module docstring)."""

    kind: ClassVar[str]

    def __init__(self, d: int, s: int, seed: int) -> None:
        self.d = _positive_int("d", d)
        self.s = _positive_int("s", s)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        self._device_cache: dict[tuple[str, str], torch.Tensor] = {}

    # -- public API -------------------------------------------------------------------
    @property
    def sketch_shape(self) -> tuple[int, ...]:
        return (self.s,)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Sketch a length-d vector."""
        return self._apply(self._check_vector(x))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """De-sketch: a length-d vector with ``E[adjoint(apply(x))] = x``."""
        return self._adjoint(self._check_sketch(y))

    @property
    def state_bytes(self) -> int:
        """Bytes of cached random state (CPU copies) this operator keeps alive."""
        return int(sum(t.numel() * t.element_size() for t in self._state_tensors().values()))

    def fingerprint(self) -> str:
        """SHA-256 of all the operator's random state: equal on every party that built it."""
        h = hashlib.sha256(repr((self.kind, self.d, self.s, self.seed)).encode())
        for name, t in sorted(self._state_tensors().items()):
            h.update(name.encode())
            h.update(t.contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d}, s={self.s}, seed={self.seed})"

    # -- for subclasses ---------------------------------------------------------------
    @abstractmethod
    def _apply(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _adjoint(self, y: torch.Tensor) -> torch.Tensor: ...

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def _on(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The cached CPU tensor ``tensor`` on ``device`` (copied once per device)."""
        if device.type == "cpu":
            return tensor
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = tensor.to(device)
        return self._device_cache[key]

    def _check_vector(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_float_tensor(x, "x")
        if x.dim() != 1 or x.shape[0] != self.d:
            raise ValueError(f"{self.kind} sketch expects a 1-D vector of length d={self.d}, got shape {tuple(x.shape)}")
        return x

    def _check_sketch(self, y: torch.Tensor) -> torch.Tensor:
        y = _as_float_tensor(y, "sketch")
        if tuple(y.shape) != self.sketch_shape:
            raise ValueError(f"{self.kind} sketch expects shape {self.sketch_shape}, got {tuple(y.shape)}")
        return y


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _as_float_tensor(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"{what} must be a real-valued tensor, got {x.dtype}")
    return x.to(torch.float32)


# ---------------------------------------------------------------------------------------
# dense operators, regenerated tile by tile
# ---------------------------------------------------------------------------------------
class _TiledDenseSketch(SketchOperator):
    """A dense s×d matrix never held whole: columns come in fixed tiles, each tile from its
    own generator (seeded by its index), regenerated on every ``apply``/``adjoint``.

    The tile width depends on ``s`` only (``TILE_ENTRIES // s`` columns), never on the memory
    bound, so every party sees the same matrix whatever its ``max_block_bytes``. Work per
    call is ``s * d`` random draws, which is why large sizes are refused (``max_entries``).
    """

    def __init__(self, d: int, s: int, seed: int, *, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        super().__init__(d, s, seed)
        self.tile_cols = max(1, TILE_ENTRIES // self.s)
        self.max_block_bytes = int(max_block_bytes)
        self.max_entries = int(max_entries)
        self._refuse_if_too_large()

    def _refuse_if_too_large(self) -> None:
        tile_bytes = 4 * self.s * min(self.tile_cols, self.d)
        dense_bytes = 4 * self.s * self.d
        if tile_bytes > self.max_block_bytes:
            raise ValueError(
                f"{self.kind} sketch with d={self.d}, s={self.s}: its smallest block ({min(self.tile_cols, self.d)} "
                f"column(s) x {self.s} rows, fp32) needs {format_bytes(tile_bytes)}, more than max_block_bytes="
                f"{format_bytes(self.max_block_bytes)} (the whole matrix would need {format_bytes(dense_bytes)}). "
                f"Use a smaller sketch size, raise max_block_bytes, or use 'srht' or 'countsketch'.")
        if self.s * self.d > self.max_entries:
            raise ValueError(
                f"{self.kind} sketch with d={self.d}, s={self.s} has s*d={self.s * self.d:.3g} entries "
                f"({format_bytes(dense_bytes)} as a dense fp32 matrix), all regenerated on every apply and adjoint; "
                f"that is above max_entries={self.max_entries:.3g}. Use 'srht', 'countsketch' or 'sparsejl' at this d, "
                f"a smaller sketch, or raise max_entries if you accept the time.")

    @property
    def num_tiles(self) -> int:
        return -(-self.d // self.tile_cols)

    def tile(self, index: int) -> torch.Tensor:
        """Columns ``[index*tile_cols, ...)`` of ``sqrt(s) * R`` as a ``(cols, s)`` CPU fp32 tensor."""
        start = index * self.tile_cols
        cols = min(self.tile_cols, self.d - start)
        return self._draw_tile(cols, seeded_generator(self.seed, self.kind, "tile", index))

    @abstractmethod
    def _draw_tile(self, cols: int, g: torch.Generator) -> torch.Tensor:
        """A ``(cols, s)`` tile of unit-variance entries."""

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(self.s, dtype=torch.float32, device=x.device)
        for index in range(self.num_tiles):
            start = index * self.tile_cols
            tile = self.tile(index).to(x.device)
            y.addmv_(tile.T, x[start : start + tile.shape[0]])
            del tile  # one tile alive at a time
        return y.mul_(1.0 / math.sqrt(self.s))

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.d, dtype=torch.float32, device=y.device)
        for index in range(self.num_tiles):
            start = index * self.tile_cols
            tile = self.tile(index).to(y.device)
            torch.mv(tile, y, out=out[start : start + tile.shape[0]])
            del tile
        return out.mul_(1.0 / math.sqrt(self.s))

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr((self.kind, self.d, self.s, self.seed)).encode())
        for index in range(self.num_tiles):
            h.update(self.tile(index).numpy().tobytes())
        return h.hexdigest()


class GaussianSketch(_TiledDenseSketch):
    """Entries i.i.d. N(0, 1/s). Oracle: E‖RᵀRx‖² = (1 + (d+1)/s)‖x‖²."""

    kind = "gaussian"

    def _draw_tile(self, cols: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(cols, self.s, generator=g, dtype=torch.float32)


class RademacherSketch(_TiledDenseSketch):
    """AMS sketch: entries i.i.d. ±1/√s."""

    kind = "rademacher"

    def _draw_tile(self, cols: int, g: torch.Generator) -> torch.Tensor:
        # 8 signs per random byte: the generator, not memory, is the bottleneck of dense sketches
        packed = torch.randint(0, 256, (cols, -(-self.s // 8)), generator=g, dtype=torch.uint8)
        bits = packed.unsqueeze(-1).bitwise_right_shift(_BIT_SHIFTS).bitwise_and_(1)
        return bits.reshape(cols, -1)[:, : self.s].to(torch.float32).mul_(2).sub_(1)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------
# SRHT
# ---------------------------------------------------------------------------------------
class SRHT(SketchOperator):
    """Subsampled randomized Hadamard transform ``R = sqrt(n/s) · P · H · D``.

    ``x`` is zero-padded to ``n = next_power_of_two(d)``; ``D`` is a random ±1 diagonal, ``H``
    the orthonormal Walsh–Hadamard transform (``fwht``, O(n log n), no dense matrix), ``P``
    keeps ``s`` of the ``n`` rows, a uniform subset without replacement (kept in increasing
    order). ``E[PᵀP] = (s/n) I`` gives ``E[RᵀR] = I``; the spec's ``sqrt(d/s)`` becomes
    ``sqrt(n/s)`` once padded. Extra memory per call: one length-n buffer (<= 2d floats).
    """

    kind = "srht"

    def __init__(self, d: int, s: int, seed: int) -> None:
        super().__init__(d, s, seed)
        self.n = next_power_of_two(self.d)
        if self.s > self.n:
            raise ValueError(f"srht sketch size s={self.s} exceeds the padded dimension n={self.n} (d={self.d})")
        self.scale = math.sqrt(self.n / self.s)
        bits = torch.randint(0, 2, (self.d,), generator=seeded_generator(self.seed, self.kind, "signs"), dtype=torch.int8)
        self.signs = bits.to(torch.float32).mul_(2).sub_(1)
        rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, self.kind, "rows")))
        self.rows = torch.from_numpy(np.sort(rng.choice(self.n, size=self.s, replace=False)).astype(np.int64))

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"signs": self.signs, "rows": self.rows}

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        buf = torch.zeros(self.n, dtype=torch.float32, device=x.device)
        torch.mul(x, self._on("signs", self.signs, x.device), out=buf[: self.d])
        fwht_(buf)
        return buf.index_select(0, self._on("rows", self.rows, x.device)).mul_(self.scale)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        buf = torch.zeros(self.n, dtype=torch.float32, device=y.device)
        buf.index_copy_(0, self._on("rows", self.rows, y.device), y * self.scale)
        fwht_(buf)
        return buf[: self.d].mul_(self._on("signs", self.signs, y.device))


# ---------------------------------------------------------------------------------------
# hashing sketches: CountSketch and sparse JL
# ---------------------------------------------------------------------------------------
class CountSketch(SketchOperator):
    """``rows`` independent CountSketch rows of ``s`` buckets; ``apply`` gives a ``(rows, s)`` table.

    Hashes: for row j, bucket ``h_j(i)`` and sign ``σ_j(i)`` are independent uniform draws from
    a generator seeded with ``derive_seed(seed, "countsketch", "row", j)``, stored as tables
    (fully random hash functions, stronger than the 2-wise buckets / 4-wise signs FetchSGD's
    analysis needs) and cached in a ``HashRows``: 5 bytes per coordinate per row.

    Normalisation: the table holds the plain counters ``T[j, b] = Σ_{h_j(i)=b} σ_j(i) x_i`` (as in
    FetchSGD), so ``σ_j(i) T[j, h_j(i)]`` is an unbiased estimate of ``x_i`` in every row.
    ``adjoint(T)`` is the mean of those row estimates, ``(1/rows) Σ_j S_jᵀ T_j`` — the exact
    transpose divided by ``rows`` — so ``E[adjoint(apply(x))] = x`` and
    ``<apply(x), T> = rows · <x, adjoint(T)>``. ``estimate(T)`` is the median over rows
    (robust, not linear); ``topk`` recovers heavy hitters from it. Tables of different
    clients may be summed before either: ``apply`` is linear.
    """

    kind = "countsketch"

    def __init__(self, d: int, s: int, seed: int, *, rows: int = 5) -> None:
        super().__init__(d, s, seed)
        self.rows = _positive_int("rows", rows)
        self.hashes = HashRows.draw(self.d, [(0, self.s)] * self.rows, self.seed, self.kind, "row")

    @property
    def sketch_shape(self) -> tuple[int, ...]:
        return (self.rows, self.s)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return self.hashes.tensors

    def __repr__(self) -> str:
        return f"CountSketch(d={self.d}, s={self.s}, rows={self.rows}, seed={self.seed})"

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.hashes.on(x.device).scatter(x, self.s)

    def _adjoint(self, table: torch.Tensor) -> torch.Tensor:
        hashes = self.hashes.on(table.device)
        out = torch.empty(self.d, dtype=torch.float32, device=table.device)
        for start, stop in gather_chunks(self.d):
            out[start:stop] = hashes.gather(table, start, stop).mean(dim=0)
        return out

    def estimate(self, table: torch.Tensor) -> torch.Tensor:
        """Median-over-rows estimate of every coordinate (length d). Not linear in ``table``."""
        table = self._check_sketch(table)
        hashes = self.hashes.on(table.device)
        out = torch.empty(self.d, dtype=torch.float32, device=table.device)
        for start, stop in gather_chunks(self.d):
            out[start:stop] = median_of_rows(hashes.gather(table, start, stop))
        return out

    def topk(self, table: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Heavy hitters: (indices ascending, int64; median estimates, fp32) of the k
        coordinates with the largest estimated magnitude."""
        k = _positive_int("k", k)
        if k > self.d:
            raise ValueError(f"k={k} exceeds d={self.d}")
        estimate = self.estimate(table)
        indices = torch.topk(estimate.abs(), k, sorted=False).indices.sort().values
        return indices, estimate[indices]

    def buckets(self, indices: torch.Tensor) -> torch.Tensor:
        """``(rows, len(indices))`` bucket ids of the given coordinates, for zeroing the
        buckets of extracted coordinates (FetchSGD's momentum / error reset)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.d):
            raise ValueError(f"indices must lie in [0, {self.d})")
        return self.hashes.buckets[:, indices.cpu()].to(device=indices.device, dtype=torch.int64)


class SparseJL(SketchOperator):
    """Sparse Johnson–Lindenstrauss: k non-zeros of ±1/√k per column (Kane–Nelson block form).

    The s rows are split into k contiguous blocks; column i gets one non-zero per block, at a
    uniform row of that block with a uniform sign (so the k rows are distinct). Each column
    then has squared norm exactly 1 and off-diagonal products with zero-mean signs:
    ``E[RᵀR] = I``. ``adjoint`` is the exact transpose.
    """

    kind = "sparsejl"

    def __init__(self, d: int, s: int, seed: int, *, k: int = 4) -> None:
        super().__init__(d, s, seed)
        self.k = _positive_int("k", k)
        if self.k > self.s:
            raise ValueError(f"sparsejl needs k <= s, got k={self.k}, s={self.s}")
        bounds = [(b * self.s) // self.k for b in range(self.k + 1)]
        self.hashes = HashRows.draw(self.d, [(bounds[b], bounds[b + 1] - bounds[b]) for b in range(self.k)],
                                    self.seed, self.kind, "block")
        self.scale = 1.0 / math.sqrt(self.k)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return self.hashes.tensors

    def __repr__(self) -> str:
        return f"SparseJL(d={self.d}, s={self.s}, k={self.k}, seed={self.seed})"

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.hashes.on(x.device).scatter(x, self.s).sum(dim=0).mul_(self.scale)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        hashes = self.hashes.on(y.device)
        table = y.unsqueeze(0)
        out = torch.empty(self.d, dtype=torch.float32, device=y.device)
        for start, stop in gather_chunks(self.d):
            out[start:stop] = hashes.gather(table, start, stop).sum(dim=0)
        return out.mul_(self.scale)


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------
OPERATORS: dict[str, type[SketchOperator]] = {
    cls.kind: cls for cls in (GaussianSketch, RademacherSketch, SRHT, CountSketch, SparseJL)
}


def make_operator(kind: str, d: int, s: int, seed: int, **options: Any) -> SketchOperator:
    """Build a sketch operator by name (``gaussian``, ``rademacher``, ``srht``, ``countsketch``,
    ``sparsejl``); ``options`` go to its constructor (``rows``, ``k``, ``max_block_bytes``, ...)."""
    if kind not in OPERATORS:
        raise ValueError(f"unknown sketch operator {kind!r}; choose one of {sorted(OPERATORS)}")
    try:
        return OPERATORS[kind](d, s, seed, **options)
    except TypeError as exc:  # an option the operator does not take
        raise ValueError(f"bad options for sketch operator {kind!r}: {exc}") from None
