"""Sketch operators and the fast Walsh–Hadamard transform, checked against independent oracles.

Monte-Carlo tests use fixed seeds (so they are deterministic) and tolerances of five
standard errors estimated from the samples themselves: a correct operator fails such a
check with probability ~1e-6 per coordinate, a biased one (e.g. a missing sqrt(n/s)) fails
by hundreds of standard errors.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from stamen.sketching import operators as ops
from stamen.sketching.fwht import fwht, fwht_, next_power_of_two
from stamen.sketching.operators import (
    OPERATORS,
    CountSketch,
    GaussianSketch,
    RademacherSketch,
    make_operator,
    median_of_rows,
)

SMALL_OPTIONS = {"gaussian": {}, "rademacher": {}, "srht": {}, "countsketch": {"rows": 3}, "sparsejl": {"k": 2}}
KINDS = sorted(OPERATORS)


def vector(d: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sketch_like(op, seed: int = 1) -> torch.Tensor:
    return torch.randn(op.sketch_shape, generator=torch.Generator().manual_seed(seed))


def adjoint_scale(op) -> float:
    """``adjoint`` is the exact transpose, except CountSketch's, which is transpose / rows."""
    return float(op.rows) if isinstance(op, CountSketch) else 1.0


# -- FWHT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128, 1024])
@pytest.mark.parametrize("radix_bits,chunk", [(4, 1 << 20), (1, 1 << 20), (3, 8), (2, 1)])
def test_fwht_matches_scipy_hadamard(n, radix_bits, chunk):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    reference = x @ torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64)).T / math.sqrt(n)
    torch.testing.assert_close(fwht(x, radix_bits=radix_bits, chunk=chunk), reference, rtol=0, atol=1e-12)


def test_fwht_is_orthonormal_involution_in_place_and_batched():
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(0))
    y = fwht(x)
    torch.testing.assert_close(fwht(y), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    z = x.clone()
    assert fwht_(z) is z and torch.equal(z, y)


def test_fwht_rejects_bad_input():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(12))
    with pytest.raises(ValueError, match="floating"):
        fwht(torch.zeros(8, dtype=torch.int64))
    assert next_power_of_two(1) == 1 and next_power_of_two(5) == 8 and next_power_of_two(8) == 8


# -- shared properties --------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_apply_and_adjoint_are_linear(kind):
    op = make_operator(kind, 50, 12, seed=7, **SMALL_OPTIONS[kind])
    a, b = vector(50, 1), vector(50, 2)
    torch.testing.assert_close(op.apply(2.5 * a - b), 2.5 * op.apply(a) - op.apply(b), rtol=1e-5, atol=1e-5)
    u, v = sketch_like(op, 3), sketch_like(op, 4)
    torch.testing.assert_close(op.adjoint(u + 3 * v), op.adjoint(u) + 3 * op.adjoint(v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_adjoint_is_the_transpose(kind):
    """Dot-product test <Rx, y> = c <x, adjoint(y)>, with c = rows for CountSketch, else 1."""
    op = make_operator(kind, 40, 9, seed=11, **SMALL_OPTIONS[kind])
    x, y = vector(40, 5), sketch_like(op, 6)
    lhs = float((op.apply(x).double() * y.double()).sum())
    rhs = adjoint_scale(op) * float((x.double() * op.adjoint(y).double()).sum())
    assert lhs == pytest.approx(rhs, rel=1e-5, abs=1e-5)


def monte_carlo_rtr(kind: str, x: torch.Tensor, s: int, seeds: range, **options) -> torch.Tensor:
    """Samples of adjoint(apply(x)) = RᵀRx over operator seeds, shape (len(seeds), d)."""
    samples = []
    for seed in seeds:
        op = make_operator(kind, x.numel(), s, seed, **options)
        samples.append(op.adjoint(op.apply(x)).double())
    return torch.stack(samples)


@pytest.mark.parametrize("kind", KINDS)
def test_expected_rtr_is_identity(kind):
    """E[RᵀR x] = x: the mean over 1000 seeds is within 5 standard errors in every coordinate."""
    d, s, n = 13, 5, 1000  # d = 13 pads SRHT to n = 16
    x = vector(d, 21, torch.float64).float()
    samples = monte_carlo_rtr(kind, x, s, range(n), **SMALL_OPTIONS[kind])
    stderr = samples.std(dim=0) / math.sqrt(n)
    error = (samples.mean(dim=0) - x.double()).abs()
    assert bool((error <= 5 * stderr + 1e-6).all()), f"{kind}: |mean - x| = {error} vs 5 SE = {5 * stderr}"
    # the test has teeth: a 50% scale error (a wrong normalisation) would fall outside the band
    assert bool(((samples.mean(dim=0) * 1.5 - x.double()).abs() > 5 * stderr).any())


def test_gaussian_second_moment_oracle():
    """E‖RᵀRx‖² = (1 + (d+1)/s)‖x‖² for N(0, 1/s) entries (tolerance: 5 standard errors)."""
    d, s, n = 6, 3, 4000
    x = vector(d, 3)
    sq = monte_carlo_rtr("gaussian", x, s, range(n)).pow(2).sum(dim=1)
    expected = (1 + (d + 1) / s) * float(x.double().pow(2).sum())
    stderr = float(sq.std()) / math.sqrt(n)
    assert abs(float(sq.mean()) - expected) <= 5 * stderr, (float(sq.mean()), expected, stderr)
    assert abs(float(x.double().pow(2).sum()) - expected) > 5 * stderr  # the oracle is not trivially met


# -- determinism and shared randomness ----------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_operator_different_seed_different(kind):
    a = make_operator(kind, 64, 10, 5, **SMALL_OPTIONS[kind])
    b = make_operator(kind, 64, 10, 5, **SMALL_OPTIONS[kind])
    c = make_operator(kind, 64, 10, 6, **SMALL_OPTIONS[kind])
    x = vector(64)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert torch.equal(a.apply(x), b.apply(x)) and not torch.equal(a.apply(x), c.apply(x))


DETERMINISM_SCRIPT = r"""
import hashlib, json, sys, torch
from stamen.sketching.operators import make_operator
spec = json.loads(sys.argv[1])
x = torch.randn(spec["d"], generator=torch.Generator().manual_seed(0))
out = {}
for kind, options in spec["options"].items():
    op = make_operator(kind, spec["d"], spec["s"], spec["seed"], **options)
    out[kind] = [op.fingerprint(), hashlib.sha256(op.apply(x).numpy().tobytes()).hexdigest()]
print(json.dumps(out))
"""


def test_operators_identical_across_processes():
    """Another interpreter builds the same random state and the same sketch bytes."""
    spec = {"d": 3000, "s": 97, "seed": 123456789, "options": SMALL_OPTIONS}
    proc = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, json.dumps(spec)],
                          capture_output=True, text=True, timeout=120, check=True)
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    x = torch.randn(spec["d"], generator=torch.Generator().manual_seed(0))
    for kind, options in SMALL_OPTIONS.items():
        op = make_operator(kind, spec["d"], spec["s"], spec["seed"], **options)
        assert theirs[kind] == [op.fingerprint(), hashlib.sha256(op.apply(x).numpy().tobytes()).hexdigest()], kind


def test_global_rngs_untouched():
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    x = vector(300)
    for kind in KINDS:
        op = make_operator(kind, 300, 40, 9, **SMALL_OPTIONS[kind])
        op.adjoint(op.apply(x))
    op = make_operator("countsketch", 300, 40, 9)
    op.topk(op.apply(x), 5)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_dense_sketch_does_not_depend_on_memory_bound():
    """Tiles are defined by s alone, so parties with different memory limits agree."""
    a = GaussianSketch(5000, 300, 1)
    b = GaussianSketch(5000, 300, 1, max_block_bytes=4 * 300 * 3500)
    assert a.tile_cols == b.tile_cols and a.fingerprint() == b.fingerprint()


# -- CountSketch ----------------------------------------------------------------------------
def test_countsketch_tables_merge():
    op = CountSketch(2000, 64, seed=3, rows=5)
    a, b = vector(2000, 1), vector(2000, 2)
    torch.testing.assert_close(op.apply(a) + op.apply(b), op.apply(a + b), rtol=1e-5, atol=1e-5)
    assert op.apply(a).shape == (5, 64)


def test_countsketch_recovers_planted_heavy_hitters():
    d, k = 20000, 12
    x = 0.5 * vector(d, 4)
    heavy = torch.randperm(d, generator=torch.Generator().manual_seed(5))[:k].sort().values
    planted = torch.linspace(40, 90, k) * torch.tensor([1.0, -1.0]).repeat(k // 2)
    x[heavy] = planted
    op = CountSketch(d, 1000, seed=8, rows=5)
    indices, values = op.topk(op.apply(x), k)
    assert torch.equal(indices, heavy)
    torch.testing.assert_close(values, planted, rtol=0, atol=5.0)
    assert op.buckets(indices).shape == (5, k)


def test_countsketch_estimate_is_exact_without_collisions():
    op = CountSketch(10, 1 << 16, seed=1, rows=3)  # 10 coordinates in 65536 buckets
    x = vector(10)
    torch.testing.assert_close(op.estimate(op.apply(x)), x)
    torch.testing.assert_close(op.adjoint(op.apply(x)), x)


def test_countsketch_is_bitwise_reproducible_across_chunks(monkeypatch):
    """Chunked scatter-adds keep coordinate order, so chunk size does not change a single bit."""
    d = 3 * ops.SCATTER_CHUNK + 17
    op, x = CountSketch(d, 5000, seed=2, rows=4), vector(d)
    chunked = op.apply(x)
    assert torch.equal(chunked, op.apply(x))
    monkeypatch.setattr(ops, "SCATTER_CHUNK", 1 << 62)
    assert torch.equal(op.apply(x), chunked)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 20])
def test_median_of_rows(rows):
    v = torch.randn(rows, 101, generator=torch.Generator().manual_seed(rows))
    ordered = v.sort(dim=0).values
    expected = ordered[rows // 2] if rows % 2 else (ordered[rows // 2 - 1] + ordered[rows // 2]) / 2
    torch.testing.assert_close(median_of_rows(v), expected, rtol=0, atol=0)


# -- refusals and validation ----------------------------------------------------------------
def test_gaussian_refuses_a_block_it_cannot_hold():
    with pytest.raises(ValueError, match=r"d=100, s=1000000.*MiB.*max_block_bytes"):
        GaussianSketch(100, 1_000_000, 0, max_block_bytes=1 << 20)


def test_dense_sketches_refuse_huge_sizes_without_allocating():
    for cls in (GaussianSketch, RademacherSketch):
        with pytest.raises(ValueError, match=r"d=10000000, s=1000000 .*TiB.*srht"):
            cls(10_000_000, 1_000_000, 0)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown sketch operator"):
        make_operator("nope", 10, 2, 0)
    with pytest.raises(ValueError, match="bad options"):
        make_operator("srht", 10, 2, 0, rows=3)
    with pytest.raises(ValueError, match="positive int"):
        make_operator("srht", 0, 2, 0)
    with pytest.raises(ValueError, match="exceeds the padded dimension"):
        make_operator("srht", 5, 9, 0)
    op = make_operator("srht", 10, 4, 0)
    with pytest.raises(ValueError, match="length d=10"):
        op.apply(torch.zeros(11))
    with pytest.raises(ValueError, match="expects shape"):
        op.adjoint(torch.zeros(5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    op = make_operator(kind, 3000, 200, 4, **SMALL_OPTIONS[kind])
    x = vector(3000)
    y = op.apply(x.cuda())
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), op.apply(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(op.adjoint(y).cpu(), op.adjoint(op.apply(x)), rtol=1e-4, atol=1e-4)
