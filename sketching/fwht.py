"""Fast Walsh–Hadamard transform (orthonormal, Sylvester/natural order) on torch tensors.

``fwht(x)`` computes ``x @ H_n / sqrt(n)`` along the last dimension, where ``H_n`` is the
Sylvester Hadamard matrix (``scipy.linalg.hadamard(n)``) and ``n`` a power of two. The
scaled transform is orthonormal and symmetric, hence its own inverse.

Why not the textbook butterfly: on CPU a radix-2 butterfly makes log2(n) full passes over
memory, and at n = 2^24 that is memory-bound and several times slower than needed. We use
``H_n = H_B ⊗ H_B ⊗ ... ⊗ H_b`` (Kronecker factors of size B = 2^k, k ≤ 4 by default): each
stage multiplies one group of k index bits by a small dense ``B × B`` Hadamard block (a
batched matmul), so the whole transform is ``ceil(log2(n) / k)`` passes, O(n log n)
arithmetic, and the only dense matrix ever built is the 16 × 16 block. Each stage works
in place on slices of at most ``chunk`` elements, so extra memory is bounded by the chunk
(4 MiB at the default, at most 1/8 of the input for small inputs), not by n.

Works on any device (the block is moved to the input's device) and on batches: every
leading dimension is a batch dimension.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

DEFAULT_RADIX_BITS = 4  # 16x16 blocks: the fastest on the CPUs measured (see benchmarks/)
DEFAULT_CHUNK = 1 << 20  # elements per in-place slice; bounds the temporary memory


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    if n < 1:
        raise ValueError(f"next_power_of_two needs n >= 1, got {n}")
    return 1 << (n - 1).bit_length()


@lru_cache(maxsize=16)
def _hadamard_block_cpu(bits: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard block of size 2^bits (fp64, CPU), built by doubling."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(bits):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(2**bits)


def hadamard_block(bits: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Small orthonormal Hadamard block used as one radix stage (never the full n × n matrix)."""
    return _hadamard_block_cpu(bits).to(device=device, dtype=dtype)


def fwht_(x: torch.Tensor, *, radix_bits: int = DEFAULT_RADIX_BITS, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """In-place orthonormal Walsh–Hadamard transform along the last dimension; returns ``x``.

    ``x`` must be contiguous and floating point with a power-of-two last dimension.
    """
    n = _check_input(x)
    if not x.is_contiguous():
        raise ValueError("fwht_ needs a contiguous tensor (use fwht(x) for a copy)")
    if radix_bits < 1:
        raise ValueError(f"radix_bits must be >= 1, got {radix_bits}")
    if n == 1 or x.numel() == 0:
        return x
    total_bits = n.bit_length() - 1
    chunk = min(chunk, max(1 << 12, x.numel() // 8))  # small inputs: temporaries <= 1/8 of x
    inner = 1  # size of the index bits already transformed (the trailing "c" axis)
    done = 0
    while done < total_bits:
        bits = min(radix_bits, total_bits - done)
        _radix_stage_(x, hadamard_block(bits, x.device, x.dtype), inner, chunk)
        inner <<= bits
        done += bits
    return x


def fwht(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform of a copy of ``x`` along the last dimension."""
    _check_input(x)
    return fwht_(x.clone(memory_format=torch.contiguous_format), **kwargs)


def _check_input(x: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fwht expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("fwht needs at least one dimension")
    if not x.is_floating_point():
        raise ValueError(f"fwht needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}; zero-pad to {next_power_of_two(max(n, 1))}")
    return n


def _radix_stage_(x: torch.Tensor, block: torch.Tensor, inner: int, chunk: int) -> None:
    """Multiply the index-bit group of size ``B = len(block)`` just above ``inner`` by ``block``.

    Viewing the flat data as ``(outer, B, inner)``, the stage is ``view[a] = block @ view[a]``
    for every ``a``; for ``inner == 1`` the same thing is ``view(-1, B) @ block`` (the block is
    symmetric). Slices of ``outer`` are processed so that the temporary stays <= ``chunk``.
    """
    size = block.shape[0]
    if inner == 1:
        view = x.view(-1, size)
        rows = max(1, chunk // size)
        for start in range(0, view.shape[0], rows):
            part = view[start : start + rows]
            part.copy_(part @ block)
        return
    view = x.view(-1, size, inner)
    rows = max(1, chunk // (size * inner))
    cols = min(inner, max(1, chunk // size))
    for start in range(0, view.shape[0], rows):
        for col in range(0, inner, cols):
            part = view[start : start + rows, :, col : col + cols]
            part.copy_(torch.matmul(block, part))
