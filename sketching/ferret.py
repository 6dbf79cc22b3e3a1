"""Ferret: shared-randomness block projection of first-order updates.

Shu et al., "Ferret: Federated Full-Parameter Tuning at Scale for Large Language
Models" (ICML 2025, arXiv 2409.06277).

A client trains with ordinary optimizer steps, then sends only the projections of
its update Δ onto a few random directions per parameter block. The directions are
never sent: every party regenerates them from seeds in a pool that all parties
derive from the run seed and, by default, the round (a fresh pool every round, as
in the paper's Algorithm 1). What travels is a list of sparse coefficients
``(block index, seed index, γ)``.

The pieces, each a small pure function:

- ``block_partition`` splits the flat parameter vector into L blocks (from the
  ``Layout`` alone, so client and server agree without talking);
- ``seed_pool`` draws the K candidate seeds of a round (or of a whole run);
- ``basis`` regenerates the direction v(seed, block) — always on CPU, in fp32;
- ``budgets`` gives each block its number of directions K_l (bigger blocks of the
  update get more);
- ``choose_seed_indices`` picks which K_l of the K pool seeds a block uses;
- ``project`` computes γ_k = ⟨Δ_l, v_k⟩ / (ρ_l K_l), so that
  ``reconstruct`` (Δ̂_l = Σ_k γ_k v_k) is unbiased: E[Δ̂] = Δ;
- ``aggregate_coefficients`` sums w_i γ_i per (block, seed): the server
  aggregates in coefficient space, so its reconstruction cost does not grow with
  the number of clients, and the aggregated coefficients are the downlink.

``FerretCodec`` (codec name ``"ferret"``) wraps these behind the ``Codec``
contract; it is registered by importing ``stamen.sketching.codecs_ferret``
(which ``make_codec`` does automatically).

Pure tensor code: torch and numpy only.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from stamen.core import Layout, derive_seed
from stamen.sketching.codec import Codec, CodecContext, PayloadError, register_codec

Block = tuple[int, int]
Coefficients = tuple[np.ndarray, np.ndarray, np.ndarray]  # (block idx, seed idx, value)

#: The fixed device/dtype rule for shared randomness: every party draws bases here,
#: then moves them where they are needed. CPU and CUDA generators produce different
#: streams, so any other choice would make client and server disagree.
BASIS_DEVICE = torch.device("cpu")
BASIS_DTYPE = torch.float32

_FP16_MAX = float(np.finfo(np.float16).max)
_FP32_MAX = float(np.finfo(np.float32).max)


# -- blocks ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def block_partition(layout: Layout, ratio: float = 0.9) -> tuple[Block, ...]:
    """Flat ``[start, end)`` ranges of Ferret's parameter blocks, from the layout alone.

    Walk the tensors in layout order and pack consecutive tensors into one block
    until adding the next would make it exceed ``ratio × median(numel)``; the next
    tensor then starts a new block. A tensor larger than that limit therefore forms
    a block of its own. For a transformer this gives about one block per weight
    matrix, with the small vectors (biases, norms) packed together — so blocks have
    comparable sizes and the per-block budget K_l tracks where the update is.

    Zero-sized tensors join whatever block is open and a block that would cover
    nothing is dropped, so the ranges tile ``[0, d)`` exactly. The result depends
    only on the layout's shapes (cached per layout), which is what lets client and
    server derive the same blocks independently. This is the reference code's
    grouping (``FerretFramework._group_parameters`` in ``optimizers/ferret_optimizer.py``
    of allen4747/Ferret: target 0.9 × median numel, the paper's block-wise
    reconstruction over L blocks).
    """
    if not ratio > 0:
        raise ValueError(f"block ratio must be > 0, got {ratio}")
    numels = layout.numels
    if not numels:
        return ()
    limit = ratio * float(np.median(np.asarray(numels, dtype=np.float64)))
    blocks: list[Block] = []
    start = size = 0
    for n in numels:
        if size > 0 and size + n > limit:
            blocks.append((start, start + size))
            start, size = start + size, 0
        size += n
    if size > 0:
        blocks.append((start, start + size))
    return tuple(blocks)


# -- shared seeds and bases ------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _seed_pool_cached(run_seed: int, K: int, round: int | None) -> np.ndarray:
    parts = (int(run_seed), "ferret-pool") if round is None else (int(run_seed), "ferret-pool", int(round))
    rng = np.random.default_rng(derive_seed(*parts))
    pool = rng.integers(0, np.iinfo(np.int64).max, size=K, dtype=np.int64)
    # Two equal seeds would give two identical directions (a biased estimate); with
    # 63-bit seeds this practically never happens, but redraw deterministically if so.
    while len(np.unique(pool)) < K:
        pool = rng.integers(0, np.iinfo(np.int64).max, size=K, dtype=np.int64)
    pool.flags.writeable = False
    return pool


def seed_pool(run_seed: int, K: int, round: int | None = None) -> np.ndarray:
    """The K candidate seeds (int64, distinct, read-only) every party derives from the run seed.

    With a round (``FerretCodec(pool_scope="round")``, the default) the pool is fresh
    every round, drawn from a private numpy Generator seeded by ``derive_seed(run_seed,
    "ferret-pool", round)``: the paper's Algorithm 1 (line 10, "randomly set s(j) and
    generate bases") draws new seeds and bases every round, and reusing one seed set
    across rounds is only mentioned there as an optional saving. ``round=None`` draws
    one pool for the whole run (``derive_seed(run_seed, "ferret-pool")``): what the
    authors' released code does (``candidate_seeds`` drawn once in ``main.py`` of
    allen4747/Ferret). With a per-run pool the global model can only move within the
    span of K directions per block over the whole run; on the digits MLP that costs
    accuracy (RESULTS.md, "Method fidelity"). Both cost the same bytes.
    """
    if int(K) < 1:
        raise ValueError(f"Ferret needs K >= 1 candidate seeds, got {K}")
    return _seed_pool_cached(int(run_seed), int(K), None if round is None else int(round))


def _truncation_series(a: float, power_offset: int) -> float:
    """Σ_n (−1/2)^n / n! · a^{2n} / (2n + power_offset): ∫_0^a x^{p−1} e^{−x²/2} dx / a^p.

    Converges fast for a ≤ 1 (the only case: a = 1/√d_l with d_l ≥ 1); 30 terms
    leave an error below 1e-40.
    """
    total, coef = 0.0, 1.0
    for n in range(30):
        total += coef * a ** (2 * n) / (2 * n + power_offset)
        coef *= -0.5 / (n + 1)
    return total


def truncated_normal_moments(d: int) -> tuple[float, float]:
    """(ρ, μ4): variance and fourth moment of N(0, 1) truncated to [−1/√d, 1/√d].

    Closed form, with a = 1/√d, φ/Φ the standard normal pdf/cdf:
        ρ = 1 − 2 a φ(a) / (2 Φ(a) − 1)            (≈ a²/3 = 1/(3d) for large d)
    That expression subtracts two numbers close to 1 when d is large, so we evaluate
    the same quantity as a ratio of power series, exact to float64 precision for
    every d ≥ 1:
        ρ  = a² · S(3) / S(1),    μ4 = a⁴ · S(5) / S(1),
        S(m) = Σ_n (−1/2)^n / n! · a^{2n} / (2n + m).
    μ4 enters the variance of the estimate (see ``reconstruction_variance``).
    """
    if int(d) < 1:
        raise ValueError(f"block dimension must be >= 1, got {d}")
    a = 1.0 / math.sqrt(int(d))
    s1 = _truncation_series(a, 1)
    return a * a * _truncation_series(a, 3) / s1, a**4 * _truncation_series(a, 5) / s1


def basis_variance(d: int) -> float:
    """ρ_l: the per-entry variance of a basis vector of a block of dimension ``d``."""
    return truncated_normal_moments(d)[0]


def reconstruction_variance(delta_block: torch.Tensor, K_l: int) -> torch.Tensor:
    """Per-entry variance of Δ̂_l for one block: ((μ4/ρ² − 2) Δ_i² + ‖Δ‖²) / K_l.

    From Δ̂ = (1/(ρK)) Σ_k v_k v_kᵀ Δ with i.i.d. entries of variance ρ and fourth
    moment μ4 (for the near-uniform truncated normal μ4/ρ² ≈ 9/5). Summed over
    entries: E‖Δ̂_l − Δ_l‖² = (d_l + μ4/ρ² − 2) ‖Δ_l‖² / K_l — the error falls as
    1/√K and a single reconstruction is very noisy (cosine ≈ √(K/d)).
    """
    rho, mu4 = truncated_normal_moments(delta_block.numel())
    x = delta_block.to(torch.float64)
    return ((mu4 / rho**2 - 2.0) * x * x + x.dot(x)) / K_l


def basis(seed: int, block_index: int, d_l: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The direction v(seed, block): d_l entries of N(0, 1) truncated to [−1/√d_l, 1/√d_l].

    Sampling method (inverse CDF, exact for the truncated normal): with
    a = 1/√d_l and e = erf(a/√2) = 2Φ(a) − 1, draw u ~ U[−e, e) (one
    ``Tensor.uniform_`` call) and set
        v = √2 · erfinv(u),
    clamped to [−a, a] against rounding. The uniforms come from a private
    ``torch.Generator`` seeded with ``derive_seed(seed, block_index)`` — the block
    offset keeps equal-sized blocks from sharing a basis — always drawn on CPU in
    fp32 (the fixed device/dtype rule: CPU and CUDA streams differ), then moved to
    ``device``. The global torch RNG is never touched. The distribution is the paper's
    and the reference code's (``trunc_normal_(std=1, a=-1/√d_l, b=1/√d_l)``); the
    stream is Stamen's own, so bases are not bit-identical to the reference code's.
    """
    d_l = int(d_l)
    if d_l < 1:
        raise ValueError(f"block dimension must be >= 1, got {d_l}")
    a = 1.0 / math.sqrt(d_l)
    e = math.erf(a / math.sqrt(2.0))
    gen = torch.Generator(device=BASIS_DEVICE)
    gen.manual_seed(derive_seed(int(seed), int(block_index)))
    v = torch.empty(d_l, device=BASIS_DEVICE, dtype=BASIS_DTYPE).uniform_(-e, e, generator=gen)
    v.erfinv_().mul_(math.sqrt(2.0)).clamp_(-a, a)
    return v.to(device)


# -- client side: budgets, seed choice, projection ---------------------------------------


def block_norms(delta: torch.Tensor, blocks: Sequence[Block]) -> np.ndarray:
    """‖Δ_l‖ for every block, accumulated in float64 (one block at a time)."""
    return np.array([float(delta[s:e].to(torch.float64).norm()) for s, e in blocks], dtype=np.float64)


def budgets(delta: torch.Tensor, blocks: Sequence[Block], K: int) -> list[int]:
    """K_l = max(2, floor(K · ‖Δ_l‖ / max_j ‖Δ_j‖)), capped at K, per block.

    Blocks where the update is larger get more directions. A block whose update is
    exactly zero gets K_l = 0: it has nothing to send (every coefficient would be 0)
    and spending directions on it would only cost compute. So an all-zero update
    gets all zeros, and the paper's floor of 2 applies to non-zero blocks only.
    A non-finite update is rejected: its norms (and every γ) would be meaningless.
    The rule is the reference code's ``project_update`` (``max(int(‖Δ_l‖/max‖Δ_j‖ · K), 2)``).
    """
    if int(K) < 1:
        raise ValueError(f"Ferret needs K >= 1, got {K}")
    norms = block_norms(delta, blocks)
    if not np.isfinite(norms).all():
        raise ValueError("the update contains NaN or infinite values; Ferret cannot project it")
    top = float(norms.max()) if len(norms) else 0.0
    if top == 0.0:
        return [0] * len(blocks)
    return [0 if n == 0.0 else min(int(K), max(2, math.floor(K * n / top))) for n in norms]


def choose_seed_indices(K_l: int, K: int, generator: np.random.Generator) -> np.ndarray:
    """Which K_l of the K pool seeds a block uses: uniform without replacement, sorted.

    Distinct seeds give independent directions, which the unbiased 1/(ρ K_l) scaling
    assumes. The choice is private to the client (the indices travel in the
    payload), so any generator works; ``project`` derives one per block.
    """
    if not 0 <= K_l <= K:
        raise ValueError(f"cannot choose {K_l} of {K} seeds")
    return np.sort(generator.choice(int(K), size=int(K_l), replace=False)).astype(np.int64)


def selection_generator(selection_seed: int, block_index: int) -> np.random.Generator:
    """The private generator of one block's seed choice: ``derive_seed(selection_seed, "ferret-select", block)``.

    One generator per block keeps a block's choice independent of the others' budgets.
    """
    return np.random.default_rng(derive_seed(int(selection_seed), "ferret-select", int(block_index)))


def project(delta: torch.Tensor, blocks: Sequence[Block], pool: np.ndarray, K: int,
            selection_seed: int) -> Coefficients:
    """Sparse Ferret coefficients of a flat update: (block int32, seed int32, value fp32).

    For each block l with budget K_l > 0 and each chosen pool index k,
    γ_k = ⟨Δ_l, v_k⟩ / (ρ_l K_l) — the unbiased scaling (the reference code's
    ⟨Δ_l, v_k⟩·d_l/K_l is this times ρ_l d_l ≈ 1/3, i.e. Δ/3 in expectation). Exact zeros
    are skipped. ``selection_seed`` should be derived from (run seed, round, node)
    so that reruns repeat and clients differ; blocks get their own generator from it.
    One basis vector is alive at a time; compute is O(Σ_l K_l d_l).
    """
    delta = delta.detach().reshape(-1).to(torch.float32)
    if len(pool) < K:
        raise ValueError(f"seed pool has {len(pool)} seeds, K={K} needs at least that many")
    out_b: list[int] = []
    out_s: list[int] = []
    out_v: list[float] = []
    for l, ((start, end), K_l) in enumerate(zip(blocks, budgets(delta, blocks, K))):
        if K_l == 0:
            continue
        d_l = end - start
        scale = 1.0 / (basis_variance(d_l) * K_l)
        block = delta[start:end]
        for k in choose_seed_indices(K_l, K, selection_generator(selection_seed, l)):
            gamma = float(torch.dot(block, basis(pool[k], l, d_l, block.device))) * scale
            if gamma != 0.0:
                out_b.append(l)
                out_s.append(int(k))
                out_v.append(gamma)
    return (np.asarray(out_b, dtype=np.int32), np.asarray(out_s, dtype=np.int32),
            np.asarray(out_v, dtype=np.float32))


# -- both sides: aggregation and reconstruction --------------------------------------------


def _merge_duplicates(block: np.ndarray, seed: np.ndarray, value: np.ndarray) -> Coefficients:
    """Sum values that share a (block, seed) pair (float64 accumulation); sorted, zeros dropped."""
    block = np.asarray(block, dtype=np.int64).reshape(-1)
    seed = np.asarray(seed, dtype=np.int64).reshape(-1)
    value = np.asarray(value, dtype=np.float64).reshape(-1)
    if not len(block) == len(seed) == len(value):
        raise PayloadError(f"coefficient arrays differ in length: block {len(block)}, seed {len(seed)}, "
                           f"value {len(value)}")
    if len(block) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    if block.min() < 0 or seed.min() < 0 or seed.max() >= 2**31 or block.max() >= 2**31:
        raise PayloadError("coefficient indices must be in [0, 2**31)")
    keys, inverse = np.unique((block << 32) | seed, return_inverse=True)
    sums = np.zeros(len(keys), dtype=np.float64)
    np.add.at(sums, inverse, value)
    keep = sums != 0.0
    keys, sums = keys[keep], sums[keep]
    return (keys >> 32).astype(np.int32), (keys & 0xFFFFFFFF).astype(np.int32), sums.astype(np.float32)


def aggregate_coefficients(coefficients: Sequence[Coefficients], weights: Sequence[float]) -> Coefficients:
    """Σ_i w_i γ_i per (block, seed): aggregation in coefficient space.

    Because reconstruction is linear in the coefficients, reconstructing this sum
    equals the weighted sum of the clients' reconstructions — but costs one basis
    per distinct (block, seed) instead of one per client. Weights are used as
    given: pass n_i / Σ n for an example-weighted mean, 1/N for a uniform one.
    The result (sorted by block, then seed; exact zeros dropped) is also what the
    server sends down.
    """
    if len(coefficients) != len(weights):
        raise ValueError(f"{len(coefficients)} coefficient sets but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(w).all():
        raise ValueError(f"aggregation weights must be finite, got {list(weights)}")
    if not coefficients:
        return _merge_duplicates(np.zeros(0), np.zeros(0), np.zeros(0))
    blocks = np.concatenate([np.asarray(c[0], dtype=np.int64).reshape(-1) for c in coefficients])
    seeds = np.concatenate([np.asarray(c[1], dtype=np.int64).reshape(-1) for c in coefficients])
    values = np.concatenate([wi * np.asarray(c[2], dtype=np.float64).reshape(-1)
                             for wi, c in zip(w, coefficients)])
    return _merge_duplicates(blocks, seeds, values)


def clip_coefficients(values: np.ndarray, clip: float | None) -> np.ndarray:
    """Clamp every |γ| to ``clip`` (None: unchanged).

    The reference code bounds the norm of each term γ·v by 10 when the server
    applies it, as a guard against an occasional huge coefficient. We bound |γ|
    instead, which needs no basis norm: since ‖v‖² ≈ ρ_l d_l ≈ 1/3, a term-norm
    bound c corresponds to |γ| ≤ c·√3. Clipping makes the estimate biased.
    """
    if clip is None:
        return values
    return np.clip(values, -float(clip), float(clip))


def validate_coefficients(block: np.ndarray, seed: np.ndarray, value: np.ndarray, num_blocks: int,
                          K: int) -> None:
    """Raise PayloadError unless the arrays are 1-D, of equal length, in range and finite."""
    for name, arr in (("block", block), ("seed", seed), ("value", value)):
        if np.asarray(arr).ndim != 1:
            raise PayloadError(f"coefficient array {name!r} must be 1-D, got shape {np.shape(arr)}")
    if not len(block) == len(seed) == len(value):
        raise PayloadError(f"coefficient arrays differ in length: block {len(block)}, seed {len(seed)}, "
                           f"value {len(value)}")
    if len(block) and (int(np.min(block)) < 0 or int(np.max(block)) >= num_blocks):
        raise PayloadError(f"block index out of range [0, {num_blocks}): "
                           f"min {int(np.min(block))}, max {int(np.max(block))}")
    if len(seed) and (int(np.min(seed)) < 0 or int(np.max(seed)) >= K):
        raise PayloadError(f"seed index out of range [0, {K}): min {int(np.min(seed))}, max {int(np.max(seed))}")
    if not np.isfinite(np.asarray(value, dtype=np.float64)).all():
        raise PayloadError("coefficient values contain NaN or infinite values")


def reconstruct(block_idx: np.ndarray, seed_idx: np.ndarray, values: np.ndarray, blocks: Sequence[Block],
                pool: np.ndarray, d: int, device: torch.device | str = "cpu",
                clip: float | None = None) -> torch.Tensor:
    """Δ̂ = Σ γ v(pool[seed], block) as a flat fp32 tensor of length ``d`` on ``device``.

    Duplicate (block, seed) pairs are summed first, so each basis is generated once
    however many clients sent it; then the terms are walked block by block, with one
    block-sized basis alive at a time (memory O(d + max d_l)). ``clip`` bounds each
    |γ| after merging (see ``clip_coefficients``).
    """
    validate_coefficients(np.asarray(block_idx), np.asarray(seed_idx), np.asarray(values), len(blocks), len(pool))
    if blocks and blocks[-1][1] != d:
        raise ValueError(f"blocks cover {blocks[-1][1]} entries, the update has {d}")
    b, s, v = _merge_duplicates(block_idx, seed_idx, values)
    v = clip_coefficients(v, clip)
    out = torch.zeros(int(d), dtype=torch.float32, device=device)
    for l, k, gamma in zip(b.tolist(), s.tolist(), v.tolist()):
        start, end = blocks[l]
        out[start:end].add_(basis(pool[k], l, end - start, device), alpha=gamma)
    return out


# -- the codec --------------------------------------------------------------------------


def index_dtype(n: int) -> np.dtype:
    """The narrowest wire dtype for indices in [0, n): int16 up to 2**15 entries, else int32."""
    return np.dtype(np.int16) if n <= 2**15 else np.dtype(np.int32)


_VALUE_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}


@register_codec
class FerretCodec(Codec):
    """Ferret's sparse shared-randomness projection as a codec (name ``"ferret"``).

    Payload: ``{"block": int16|int32, "seed": int16|int32, "value": fp16|fp32}``,
    three 1-D arrays of equal length nnz, one entry per non-zero coefficient, sorted
    by (block, seed). Index dtypes are the narrowest that fit (int16 while there are
    at most 2**15 blocks / seeds), values as ``value_dtype``; there is no header, so
    ``payload_bytes = nnz × (index bytes + index bytes + value bytes)``.

    Options: ``K`` pool size (max directions per block, default 64); ``value_dtype``
    ``"fp32"`` or ``"fp16"`` (fp16 saturates at ±65504; the count of saturated
    values is written to ``state["ferret_saturated"]``); ``block_ratio`` (0.9, see
    ``block_partition``); ``clip`` per-term |γ| bound applied when reconstructing
    (None); ``pool_scope`` ``"round"`` (default: a fresh pool each round, the
    paper's Algorithm 1, line 10) or ``"run"`` (one pool for the whole run, the
    authors' reference code; see ``seed_pool``).

    ``linear`` is False in the codec contract's sense (payloads are sparse lists
    with different supports and cannot be summed array-wise), but Ferret is linear
    in coefficient space: a strategy should ``unpack`` each reply, combine them
    with ``aggregate`` (or ``aggregate_coefficients``), ``reconstruct`` once and
    send the aggregated payload down; clients ``decode`` it to the same Δ̂.
    """

    name = "ferret"
    linear = False

    def __init__(self, K: int = 64, value_dtype: str = "fp32", block_ratio: float = 0.9,
                 clip: float | None = None, pool_scope: str = "round") -> None:
        if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or not 1 <= int(K) <= 2**31 - 1:
            raise ValueError(f"ferret option K must be an integer >= 1, got {K!r}")
        if value_dtype not in _VALUE_DTYPES:
            raise ValueError(f"ferret option value_dtype must be one of {sorted(_VALUE_DTYPES)}, got {value_dtype!r}")
        if not (isinstance(block_ratio, (int, float)) and block_ratio > 0):
            raise ValueError(f"ferret option block_ratio must be a number > 0, got {block_ratio!r}")
        if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
            raise ValueError(f"ferret option clip must be None or a number > 0, got {clip!r}")
        if pool_scope not in ("run", "round"):
            raise ValueError(f"ferret option pool_scope must be 'run' or 'round', got {pool_scope!r}")
        self.K = int(K)
        self.value_dtype = value_dtype
        self.block_ratio = float(block_ratio)
        self.clip = None if clip is None else float(clip)
        self.pool_scope = pool_scope

    # -- shared derivations
    def blocks(self, layout: Layout) -> tuple[Block, ...]:
        """The block ranges for ``layout`` (cached)."""
        return block_partition(layout, self.block_ratio)

    def pool(self, ctx: CodecContext) -> np.ndarray:
        """The seed pool for this context (per run, or per round with ``pool_scope="round"``)."""
        return seed_pool(ctx.seed, self.K, ctx.round if self.pool_scope == "round" else None)

    @staticmethod
    def selection_seed(ctx: CodecContext) -> int:
        """The client's private seed-choice seed: derived from (run seed, round, node)."""
        return derive_seed(ctx.seed, ctx.round, "ferret-select", ctx.node)

    # -- payload packing
    def pack(self, coefficients: Coefficients, ctx: CodecContext, state: dict | None = None) -> dict[str, np.ndarray]:
        """Coefficients → payload with the wire dtypes (used by encode and for the downlink)."""
        b, s, v = coefficients
        v = np.asarray(v, dtype=np.float64)
        if self.value_dtype == "fp16":
            saturated = int(np.count_nonzero(np.abs(v) > _FP16_MAX))
            v = np.clip(v, -_FP16_MAX, _FP16_MAX)
            if state is not None:
                state["ferret_saturated"] = saturated
        return {
            "block": np.asarray(b).astype(index_dtype(len(self.blocks(ctx.layout)))),
            "seed": np.asarray(s).astype(index_dtype(self.K)),
            "value": v.astype(_VALUE_DTYPES[self.value_dtype]),
        }

    def unpack(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> Coefficients:
        """Validated payload → (block int64, seed int64, value fp32); PayloadError if malformed."""
        if not isinstance(payload, dict):
            raise PayloadError(f"ferret payload must be a dict of arrays, got {type(payload).__name__}")
        extra = sorted(set(payload) - {"block", "seed", "value"})
        if extra:
            raise PayloadError(f"ferret payload has unexpected arrays {extra} (expected block, seed, value)")
        blocks = self.blocks(ctx.layout)
        n_blocks = len(blocks)
        b = self.expect(payload, "block", dtype=index_dtype(n_blocks))
        s = self.expect(payload, "seed", dtype=index_dtype(self.K))
        v = self.expect(payload, "value", dtype=_VALUE_DTYPES[self.value_dtype], finite=False)
        # before any temporary of the payload's size: no valid payload has more than blocks × K entries
        most = n_blocks * self.K
        if any(a.ndim != 1 or len(a) > most for a in (b, s, v)):
            raise PayloadError(f"ferret payload arrays must be 1-D with at most {most} entries (blocks × K), got "
                               f"shapes {b.shape}, {s.shape}, {v.shape}")
        validate_coefficients(b, s, v, n_blocks, self.K)
        b, s = b.astype(np.int64), s.astype(np.int64)
        if len(np.unique((b << 32) | s)) != len(b):
            raise PayloadError("ferret payload repeats a (block, seed) pair")
        # |Δ̂_i| <= Σ_k |γ_k| / √d_l in block l (basis entries are bounded by 1/√d_l): refuse coefficients whose
        # reconstruction could overflow fp32. Weighted means of accepted payloads stay within the same bound.
        reach = np.bincount(b, weights=np.abs(v.astype(np.float64)), minlength=n_blocks) / np.sqrt(
            np.array([end - start for start, end in blocks], dtype=np.float64))
        if len(reach) and float(reach.max()) > _FP32_MAX / 2:
            raise PayloadError(f"ferret coefficients too large: block {int(reach.argmax())} would reconstruct to "
                               f"values up to {float(reach.max()):.3g}, beyond the float32 range")
        return b, s, v.astype(np.float32)

    # -- the Codec contract
    def encode(self, update: torch.Tensor, ctx: CodecContext, state: dict | None = None) -> dict[str, np.ndarray]:
        """Project a flat fp32 update of length ``ctx.d`` onto the shared bases."""
        if update.numel() != ctx.d:
            raise ValueError(f"update has {update.numel()} entries, the layout needs {ctx.d}")
        coefficients = project(update.reshape(-1), self.blocks(ctx.layout), self.pool(ctx), self.K,
                               self.selection_seed(ctx))
        return self.pack(coefficients, ctx, state)

    def decode(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
        """Rebuild Δ̂ (flat fp32, on ``ctx.device``) from a client's or the aggregated payload."""
        b, s, v = self.unpack(payload, ctx)
        return reconstruct(b, s, v, self.blocks(ctx.layout), self.pool(ctx), ctx.d, ctx.device, self.clip)

    def aggregate(self, payloads: Sequence[dict[str, np.ndarray]], weights: Sequence[float],
                  ctx: CodecContext) -> dict[str, np.ndarray]:
        """Σ_i w_i · payload_i in coefficient space, as a payload (the downlink)."""
        return self.pack(aggregate_coefficients([self.unpack(p, ctx) for p in payloads], weights), ctx)


# The codec registry imports ``codecs_*`` modules; ``stamen.sketching.codecs_ferret``
# imports this one so that ``make_codec("ferret", ...)`` finds it.
__all__ = [
    "BASIS_DEVICE", "BASIS_DTYPE", "FerretCodec", "aggregate_coefficients", "basis", "basis_variance",
    "block_norms", "block_partition", "budgets", "choose_seed_indices", "clip_coefficients", "index_dtype",
    "project", "reconstruct", "reconstruction_variance", "seed_pool", "selection_generator",
    "truncated_normal_moments", "validate_coefficients",
]
