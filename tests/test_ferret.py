"""Ferret's block projection: math against closed forms and Monte-Carlo, plus the codec contract."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from stamen.core import Layout
from stamen.sketching.codec import Codec, CodecContext, PayloadError, make_codec
from stamen.sketching.ferret import (
    FerretCodec,
    aggregate_coefficients,
    basis,
    basis_variance,
    block_partition,
    budgets,
    choose_seed_indices,
    clip_coefficients,
    index_dtype,
    project,
    reconstruct,
    reconstruction_variance,
    seed_pool,
    truncated_normal_moments,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# numels 30, 8, 16, 3: median 12, limit 10.8 -> every tensor closes the block before it.
SMALL = Layout(("w1", "b1", "w2", "b2"), ((6, 5), (8,), (4, 4), (3,)))


def _delta_for(layout: Layout, scales: list[float], seed: int = 0) -> torch.Tensor:
    """A flat update whose blocks have very different norms (so budgets differ)."""
    g = torch.Generator().manual_seed(seed)
    parts = [s * torch.randn(n, generator=g) for n, s in zip(layout.numels, scales)]
    return torch.cat(parts)


def _ctx(layout: Layout, seed: int = 7, round: int = 1, node: int = 0) -> CodecContext:
    return CodecContext(seed=seed, round=round, layout=layout, node=node)


# -- the truncated normal --------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 5, 30, 1000])
def test_variance_matches_closed_form_with_phi_and_Phi(d):
    a = 1 / math.sqrt(d)
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    closed = 1 - 2 * a * phi / math.erf(a / math.sqrt(2))  # 2Φ(a) − 1 = erf(a/√2)
    rho, mu4 = truncated_normal_moments(d)
    assert rho == pytest.approx(closed, rel=1e-9)
    assert rho < 1 / (3 * d)  # truncated normal is a bit narrower than the uniform
    assert mu4 / rho**2 == pytest.approx(9 / 5, abs=0.15)  # near-uniform kurtosis


def test_large_d_variance_tends_to_uniform():
    assert basis_variance(10**8) * 3 * 10**8 == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("d", [3, 1000, 200_000])
def test_basis_entries_have_variance_rho_and_stay_in_range(d):
    n = min(20_000, max(1, 400_000 // d))
    x = torch.cat([basis(s, 0, d) for s in range(n)]).double()
    assert x.abs().max() <= 1 / math.sqrt(d) + 1e-7
    rho, mu4 = truncated_normal_moments(d)
    # sd of the sample variance ≈ sqrt((μ4 − ρ²)/N) ρ-relative; allow 5 sd.
    tol = 5 * math.sqrt((mu4 / rho**2 - 1) / x.numel())
    assert float(x.var()) / rho == pytest.approx(1.0, abs=tol)
    assert abs(float(x.mean())) < 5 * math.sqrt(rho / x.numel())


def test_equal_sized_blocks_get_different_bases():
    assert not torch.equal(basis(123, 0, 50), basis(123, 1, 50))
    assert torch.equal(basis(123, 1, 50), basis(np.int64(123), np.int32(1), 50))  # numpy ints, same seed


def test_bases_identical_in_a_separate_process():
    """Another interpreter (and another thread count: 2 there, 1 here) regenerates the same bytes."""
    script = (
        "import hashlib\n"
        "import torch\n"
        "from stamen.sketching.ferret import basis, seed_pool\n"
        "torch.set_num_threads(2)\n"
        "h = hashlib.sha256()\n"
        "pool = seed_pool(11, 16)\n"
        "h.update(pool.tobytes())\n"
        "for k in range(4):\n"
        "    for l, d in enumerate([1, 17, 4096]):\n"
        "        h.update(basis(pool[k], l, d).numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    h = hashlib.sha256()
    pool = seed_pool(11, 16)
    h.update(pool.tobytes())
    for k in range(4):
        for l, d in enumerate([1, 17, 4096]):
            h.update(basis(pool[k], l, d).numpy().tobytes())
    assert out.stdout.strip() == h.hexdigest()


def test_seed_pool_is_distinct_readonly_and_per_run():
    pool = seed_pool(3, 64)
    assert pool.dtype == np.int64 and len(np.unique(pool)) == 64
    assert np.array_equal(pool, seed_pool(3, 64))
    assert not np.array_equal(pool, seed_pool(4, 64))
    assert not np.array_equal(pool, seed_pool(3, 64, round=2))
    with pytest.raises(ValueError):
        pool[0] = 1


# -- blocks ------------------------------------------------------------------------------


def test_block_partition_hand_computed():
    assert block_partition(SMALL) == ((0, 30), (30, 38), (38, 54), (54, 57))
    # numels 4, 4, 4, 100, 4, 4: median 4, ratio 3 -> limit 12; the 100 stands alone.
    layout = Layout(tuple("abcdef"), ((4,), (4,), (2, 2), (10, 10), (4,), (4,)))
    assert block_partition(layout, 3.0) == ((0, 12), (12, 112), (112, 120))
    # A zero-sized tensor joins the open block; the ranges still tile [0, d).
    layout = Layout(("a", "e", "b"), ((5,), (0,), (5,)))
    assert block_partition(layout) == ((0, 5), (5, 10))
    assert block_partition(Layout((), ())) == ()


def test_block_partition_identical_for_rebuilt_layout():
    shapes = ((64, 32), (32,), (32, 32), (32,), (10, 32), (10,))
    names = ("l1.w", "l1.b", "l2.w", "l2.b", "out.w", "out.b")
    first = block_partition(Layout(names, shapes))
    block_partition.cache_clear()
    rebuilt = Layout(tuple(str(n) for n in names), tuple(tuple(int(x) for x in s) for s in shapes))
    assert block_partition(rebuilt) == first
    arrays = {n: np.zeros(s, np.float32) for n, s in zip(names, shapes)}
    assert block_partition(Layout.from_arrays(arrays)) == first
    assert first[0] == (0, 2048) and first[-1][1] == Layout(names, shapes).d
    assert all(a[1] == b[0] for a, b in zip(first, first[1:]))


# -- budgets and seed choice ---------------------------------------------------------------


def test_budgets_follow_block_norms():
    blocks = ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5))
    delta = torch.tensor([4.0, -2.0, 1.0, 0.0, 0.1])
    assert budgets(delta, blocks, 8) == [8, 4, 2, 0, 2]  # floor of 2, zero block skipped
    assert budgets(delta, blocks, 1) == [1, 1, 1, 0, 1]  # capped at K
    assert budgets(torch.zeros(5), blocks, 8) == [0] * 5
    with pytest.raises(ValueError, match="NaN"):
        budgets(torch.tensor([1.0, float("nan"), 0, 0, 0]), blocks, 8)


def test_choose_seed_indices_distinct_sorted():
    idx = choose_seed_indices(10, 64, np.random.default_rng(0))
    assert len(set(idx.tolist())) == 10 and list(idx) == sorted(idx) and idx.max() < 64
    assert len(choose_seed_indices(64, 64, np.random.default_rng(0))) == 64
    with pytest.raises(ValueError):
        choose_seed_indices(65, 64, np.random.default_rng(0))


# -- the estimator ------------------------------------------------------------------------


def test_reconstruction_is_unbiased_monte_carlo():
    """Mean of N reconstructions (independent pools) vs Δ, with per-entry z-scores.

    Var(Δ̂_i) = ((μ4/ρ² − 2)Δ_i² + ‖Δ_l‖²)/K_l in closed form (``reconstruction_variance``);
    the mean of N runs then has variance Var/N. We require every |z| < 4.5 (57 entries,
    two-sided normal tail ⇒ false alarm ≈ 4e-4) and mean z² in [0.5, 1.6] (≈ χ²₅₇/57,
    sd 0.19). The empirical variance must also match the formula (total within 12%).
    """
    K, N = 8, 1200
    blocks = block_partition(SMALL)
    delta = _delta_for(SMALL, [1.0, 0.5, 0.2, 2.0])
    ks = budgets(delta, blocks, K)
    assert len(set(ks)) > 2  # budgets really differ between blocks
    samples = torch.stack([
        reconstruct(*project(delta, blocks, seed_pool(run, K), K, run), blocks, seed_pool(run, K), SMALL.d)
        for run in range(N)
    ]).double()
    var = torch.cat([reconstruction_variance(delta[s:e], k) for (s, e), k in zip(blocks, ks)])
    z = (samples.mean(0) - delta.double()) / torch.sqrt(var / N)
    assert float(z.abs().max()) < 4.5
    assert 0.5 < float((z**2).mean()) < 1.6
    assert float(samples.var(0).sum() / var.sum()) == pytest.approx(1.0, abs=0.12)


def test_error_decreases_with_K_as_predicted():
    """E‖Δ̂ − Δ‖² = (d + μ4/ρ² − 2)‖Δ‖²/K for one block; mean over 20 seeds within 15%."""
    layout = Layout(("w",), ((2000,),))
    blocks = block_partition(layout)
    delta = _delta_for(layout, [1.0])
    rho, mu4 = truncated_normal_moments(layout.d)
    errors = []
    for K in (4, 16, 64, 256):
        sq = [float((reconstruct(*project(delta, blocks, seed_pool(r, K), K, r), blocks, seed_pool(r, K),
                                 layout.d) - delta).norm() ** 2) for r in range(20)]
        predicted = (layout.d + mu4 / rho**2 - 2) * float(delta.norm() ** 2) / K
        assert np.mean(sq) == pytest.approx(predicted, rel=0.15)
        errors.append(math.sqrt(np.mean(sq)))
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_project_skips_zero_blocks_and_uses_budgets():
    blocks = block_partition(SMALL)
    delta = _delta_for(SMALL, [1.0, 0.0, 0.3, 0.0])
    b, s, v = project(delta, blocks, seed_pool(1, 16), 16, 5)
    assert b.dtype == np.int32 and s.dtype == np.int32 and v.dtype == np.float32
    assert set(b.tolist()) == {0, 2}
    assert np.bincount(b, minlength=4).tolist() == budgets(delta, blocks, 16)
    assert np.all(v != 0)


def test_aggregate_coefficients_equals_weighted_sum_of_reconstructions():
    K, blocks = 16, block_partition(SMALL)
    pool = seed_pool(2, K)
    coeffs = [project(_delta_for(SMALL, [1, 1, 1, 1], seed=i), blocks, pool, K, 100 + i) for i in range(4)]
    weights = [0.1, 0.2, 0.3, 0.4]
    agg = aggregate_coefficients(coeffs, weights)
    direct = sum(w * reconstruct(*c, blocks, pool, SMALL.d) for w, c in zip(weights, coeffs))
    torch.testing.assert_close(reconstruct(*agg, blocks, pool, SMALL.d), direct, rtol=1e-5, atol=1e-6)
    pairs = list(zip(agg[0].tolist(), agg[1].tolist()))
    assert pairs == sorted(set(pairs))  # one entry per (block, seed)
    assert len(pairs) <= len(blocks) * K


def test_clip_bounds_each_term():
    v = np.array([-5.0, 0.5, 3.0], np.float32)
    assert clip_coefficients(v, None) is v
    assert clip_coefficients(v, 1.0).tolist() == [-1.0, 0.5, 1.0]


# -- the codec -----------------------------------------------------------------------------


def test_make_codec_finds_ferret_and_validates_options():
    codec = make_codec("ferret", K=32, value_dtype="fp16")
    assert isinstance(codec, FerretCodec) and codec.K == 32
    for bad in ({"K": 0}, {"K": 2.5}, {"value_dtype": "int8"}, {"block_ratio": 0}, {"clip": -1},
                {"pool_scope": "forever"}):
        with pytest.raises(ValueError):
            FerretCodec(**bad)


@pytest.mark.parametrize("pool_scope, pool_round", [("round", 1), ("run", None)])
def test_encode_decode_roundtrip_and_determinism(pool_scope, pool_round):
    """Both pool scopes: the codec decodes with the pool of its scope (round 1's, or the run's)."""
    codec, ctx = FerretCodec(K=16, pool_scope=pool_scope), _ctx(SMALL)
    delta = _delta_for(SMALL, [1.0, 0.5, 0.2, 2.0])
    p1, p2 = codec.encode(delta, ctx), codec.encode(delta.clone(), ctx)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    other_node = codec.encode(delta, _ctx(SMALL, node=1))
    assert not np.array_equal(p1["seed"], other_node["seed"])  # clients choose their own seeds
    out = codec.decode(p1, ctx)
    assert out.dtype == torch.float32 and out.shape == (SMALL.d,)
    b, s, v = codec.unpack(p1, ctx)
    torch.testing.assert_close(out, reconstruct(b, s, v, block_partition(SMALL), seed_pool(7, 16, pool_round),
                                                SMALL.d))
    # The estimate points the right way (cosine well above √(K/d) noise level for d=57, K=16).
    assert float(torch.nn.functional.cosine_similarity(out, delta, dim=0)) > 0.2


def test_payload_size_is_nnz_times_entry_size():
    """No header: bytes = nnz × (block index + seed index + value) — int16 + int16 + fp32/fp16 here."""
    delta = _delta_for(SMALL, [1.0, 0.5, 0.2, 2.0])
    for value_dtype, value_bytes in (("fp32", 4), ("fp16", 2)):
        codec = FerretCodec(K=16, value_dtype=value_dtype)
        payload = codec.encode(delta, _ctx(SMALL))
        nnz = sum(budgets(delta, block_partition(SMALL), 16))
        assert payload["block"].dtype == np.int16 and payload["seed"].dtype == np.int16
        assert len(payload["value"]) == nnz
        assert Codec.payload_bytes(payload) == nnz * (2 + 2 + value_bytes)
    assert index_dtype(2**15) == np.int16 and index_dtype(2**15 + 1) == np.int32
    big = FerretCodec(K=40_000)  # more seeds than int16 can index
    packed = big.pack((np.array([0]), np.array([39_999]), np.array([1.0])), _ctx(SMALL))
    assert packed["seed"].dtype == np.int32 and packed["block"].dtype == np.int16
    assert big.unpack(packed, _ctx(SMALL))[1].tolist() == [39_999]


def test_fp16_saturates_and_reports():
    codec, ctx, state = FerretCodec(K=4, value_dtype="fp16"), _ctx(SMALL), {}
    payload = codec.encode(_delta_for(SMALL, [1e6, 1, 1, 1]), ctx, state)
    assert state["ferret_saturated"] > 0
    assert np.isfinite(payload["value"]).all()


def _good_payload():
    codec, ctx = FerretCodec(K=16), _ctx(SMALL)
    return codec, ctx, codec.encode(_delta_for(SMALL, [1.0, 0.5, 0.2, 2.0]), ctx)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.pop("seed"), "lacks array 'seed'"),
    (lambda p: p.update(extra=np.zeros(1)), "unexpected arrays"),
    (lambda p: p.update(value=p["value"].astype(np.float64)), "dtype float64"),
    (lambda p: p.update(block=p["block"].astype(np.int32)), "dtype int32"),
    (lambda p: p.update(value=p["value"][:-1]), "differ in length"),
    (lambda p: p.update(block=np.where(np.arange(len(p["block"])) == 0, 4, p["block"]).astype(np.int16)),
     "block index out of range"),
    (lambda p: p.update(seed=np.where(np.arange(len(p["seed"])) == 0, -1, p["seed"]).astype(np.int16)),
     "seed index out of range"),
    (lambda p: p.update(value=np.where(np.arange(len(p["value"])) == 0, np.nan, p["value"]).astype(np.float32)),
     "NaN"),
    (lambda p: p.update(block=p["block"].reshape(-1, 1)), "1-D"),
    (lambda p: p.update(block=np.concatenate([p["block"][:1], p["block"][:1]]),
                        seed=np.concatenate([p["seed"][:1], p["seed"][:1]]),
                        value=np.concatenate([p["value"][:1], p["value"][:1]])), "repeats"),
])
def test_decode_rejects_malformed_payloads(mutate, message):
    codec, ctx, payload = _good_payload()
    mutate(payload)
    with pytest.raises(PayloadError, match=message):
        codec.decode(payload, ctx)


def test_decode_rejects_non_dict():
    codec, ctx, _ = _good_payload()
    with pytest.raises(PayloadError):
        codec.decode([1, 2, 3], ctx)


def test_codec_aggregate_is_the_downlink():
    codec = FerretCodec(K=16)
    ctxs = [_ctx(SMALL, node=i) for i in range(3)]
    payloads = [codec.encode(_delta_for(SMALL, [1, 1, 1, 1], seed=i), c) for i, c in enumerate(ctxs)]
    server = _ctx(SMALL, node=-1)
    down = codec.aggregate(payloads, [1 / 3] * 3, server)
    expected = sum(codec.decode(p, server) for p in payloads) / 3
    torch.testing.assert_close(codec.decode(down, server), expected, rtol=1e-5, atol=1e-6)
    assert set(down) == {"block", "seed", "value"}


def test_global_rngs_untouched():
    codec, ctx = FerretCodec(K=8), _ctx(SMALL)
    delta = _delta_for(SMALL, [1, 1, 1, 1])
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    codec.decode(codec.encode(delta, ctx), ctx)
    assert torch.equal(torch_state, torch.get_rng_state())
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]


def test_encode_rejects_wrong_length_and_nan():
    codec, ctx = FerretCodec(K=8), _ctx(SMALL)
    with pytest.raises(ValueError, match="entries"):
        codec.encode(torch.zeros(SMALL.d + 1), ctx)
    bad = torch.zeros(SMALL.d)
    bad[3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        codec.encode(bad, ctx)


def test_zero_update_gives_empty_payload_and_zero_reconstruction():
    codec, ctx = FerretCodec(K=8), _ctx(SMALL)
    payload = codec.encode(torch.zeros(SMALL.d), ctx)
    assert len(payload["value"]) == 0 and Codec.payload_bytes(payload) == 0
    assert torch.equal(codec.decode(payload, ctx), torch.zeros(SMALL.d))


def test_round_scoped_pool_changes_directions():
    codec = FerretCodec(K=8, pool_scope="round")
    assert not np.array_equal(codec.pool(_ctx(SMALL, round=1)), codec.pool(_ctx(SMALL, round=2)))
    run_scoped = FerretCodec(K=8, pool_scope="run")  # the reference code's single pool
    assert np.array_equal(run_scoped.pool(_ctx(SMALL, round=1)), run_scoped.pool(_ctx(SMALL, round=2)))


def test_the_default_pool_is_the_papers_fresh_pool_per_round():
    """Alg. 1 line 10 of the paper: new seeds and bases every round (the default); the run pool is an option."""
    assert FerretCodec().pool_scope == "round"
    codec = FerretCodec(K=8)
    pools = [codec.pool(_ctx(SMALL, round=r)) for r in (1, 2, 3)]
    assert all(np.array_equal(p, seed_pool(7, 8, r)) for p, r in zip(pools, (1, 2, 3)))
    assert all(not set(pools[i].tolist()) & set(pools[j].tolist()) for i, j in ((0, 1), (0, 2), (1, 2)))
    # the same coefficients name different directions in different rounds
    payload = codec.pack((np.array([0]), np.array([3]), np.array([1.0])), _ctx(SMALL))
    v1, v2 = codec.decode(payload, _ctx(SMALL, round=1)), codec.decode(payload, _ctx(SMALL, round=2))
    start, end = block_partition(SMALL)[0]
    torch.testing.assert_close(v1[start:end], basis(seed_pool(7, 8, 1)[3], 0, end - start))
    torch.testing.assert_close(v2[start:end], basis(seed_pool(7, 8, 2)[3], 0, end - start))
    assert not torch.allclose(v1, v2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_update_uses_the_cpu_bases():
    """Bases are drawn on CPU then moved: a CUDA party must agree with a CPU party."""
    codec = FerretCodec(K=16)
    delta = _delta_for(SMALL, [1.0, 0.5, 0.2, 2.0])
    cpu_payload = codec.encode(delta, _ctx(SMALL))
    gpu_payload = codec.encode(delta.cuda(), _ctx(SMALL))
    assert np.array_equal(cpu_payload["block"], gpu_payload["block"])
    assert np.array_equal(cpu_payload["seed"], gpu_payload["seed"])
    np.testing.assert_allclose(cpu_payload["value"], gpu_payload["value"], rtol=1e-5, atol=1e-6)
    gpu_ctx = CodecContext(seed=7, round=1, layout=SMALL, node=0, device="cuda")
    out = codec.decode(cpu_payload, gpu_ctx)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), codec.decode(cpu_payload, _ctx(SMALL)), rtol=1e-5, atol=1e-6)
