"""Clipping and the Gaussian mechanism: norms are bounded, noise has the std the formula says."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stamen.privacy.clipping import (
    AdaptiveClipper,
    geometric_clip_update,
    l2_clip,
    l2_norm,
    per_layer_clip,
    per_layer_clip_norms,
    update_noise_multiplier_for_adaptive_clipping,
)
from stamen.privacy.noise import (
    add_gaussian_noise,
    central_noise_std,
    gaussian_noise,
    local_noise_std,
)

FP32_REL = 1e-6  # fp32 rounding of x·(C/‖x‖) can land a few ulps above C


def _vector(seed: int, d: int, scale: float) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * scale


# -- flat clipping -------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(1, 400), scale=st.floats(1e-4, 1e4), clip=st.floats(1e-3, 1e3))
def test_l2_clip_bounds_the_norm_and_keeps_the_direction(seed, d, scale, clip):
    x = _vector(seed, d, scale)
    y = l2_clip(x, clip)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert l2_norm(y) <= clip * (1 + FP32_REL)
    if l2_norm(x) > clip:
        assert l2_norm(y) == pytest.approx(clip, rel=1e-5)
        assert torch.allclose(y / l2_norm(y), x / l2_norm(x), atol=1e-5)


def test_l2_clip_leaves_small_vectors_untouched_and_input_unmodified():
    x = torch.tensor([0.3, -0.4])  # norm 0.5
    y = l2_clip(x, 1.0)
    assert torch.equal(y, x) and y is not x
    big = torch.tensor([3.0, 4.0])
    clipped = l2_clip(big, 1.0)
    assert torch.allclose(clipped, torch.tensor([0.6, 0.8]))
    assert torch.equal(big, torch.tensor([3.0, 4.0]))


def test_l2_clip_rejects_bad_input():
    with pytest.raises(ValueError, match="clip_norm"):
        l2_clip(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="clip_norm"):
        l2_clip(torch.ones(3), -1.0)
    with pytest.raises(ValueError, match="flat"):
        l2_clip(torch.ones(2, 2), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        l2_clip(torch.tensor([1.0, float("nan")]), 1.0)


# -- per-layer clipping --------------------------------------------------------------------

@pytest.mark.parametrize("split", ["equal", "proportional"])
def test_per_layer_norms_split_the_budget_exactly(split):
    norms = per_layer_clip_norms(2.0, [10, 1, 300, 5], split)
    assert math.sqrt(sum(c * c for c in norms)) == pytest.approx(2.0, rel=1e-12)
    if split == "equal":
        assert norms == pytest.approx([1.0] * 4)
    else:
        assert norms[2] > norms[0] > norms[3] > norms[1]


@pytest.mark.parametrize("split", ["equal", "proportional"])
def test_per_layer_clip_bounds_each_layer_and_the_total(split):
    lengths = [50, 10, 200, 4]
    x = torch.cat([_vector(i, n, s) for i, (n, s) in enumerate(zip(lengths, [10.0, 0.001, 3.0, 50.0]))])
    y = per_layer_clip(x, lengths, 1.5, split)
    bounds = per_layer_clip_norms(1.5, lengths, split)
    for seg_in, seg_out, bound in zip(torch.split(x, lengths), torch.split(y, lengths), bounds):
        assert l2_norm(seg_out) <= bound * (1 + FP32_REL)
        if l2_norm(seg_in) <= bound:
            assert torch.equal(seg_in, seg_out)  # a small layer is not touched
    assert l2_norm(y) <= 1.5 * (1 + FP32_REL)


def test_per_layer_clip_rejects_wrong_lengths():
    with pytest.raises(ValueError, match="segment_lengths"):
        per_layer_clip(torch.ones(10), [3, 3], 1.0)
    with pytest.raises(ValueError, match="split"):
        per_layer_clip_norms(1.0, [3], "sqrt")


# -- adaptive clipping ---------------------------------------------------------------------

def test_geometric_update_direction():
    assert geometric_clip_update(1.0, 0.9, 0.5, 0.2) < 1.0  # most fit: C too large, shrink
    assert geometric_clip_update(1.0, 0.1, 0.5, 0.2) > 1.0  # few fit: grow
    assert geometric_clip_update(1.0, 0.5, 0.5, 0.2) == 1.0
    assert geometric_clip_update(2.0, 0.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))


def _lognormal_norms(generator: torch.Generator, n: int) -> torch.Tensor:
    return torch.exp(torch.randn(n, generator=generator, dtype=torch.float64) * 0.5 + math.log(3.0))


@pytest.mark.parametrize("quantile", [0.5, 0.9])
@pytest.mark.parametrize("count_noise_std", [0.0, 5.0])
def test_adaptive_clipper_tracks_the_target_quantile(quantile, count_noise_std):
    """Norms ~ logNormal(log 3, 0.5²): the γ-quantile is 3·exp(0.5·Φ⁻¹(γ))."""
    data_gen = torch.Generator().manual_seed(1)
    clipper = AdaptiveClipper(initial_clip_norm=0.05, target_quantile=quantile, learning_rate=0.2,
                              count_noise_std=count_noise_std, generator=torch.Generator().manual_seed(2))
    history = []
    for _ in range(400):
        history.append(clipper.observe_norms(_lognormal_norms(data_gen, 100)))
    true_quantile = 3.0 * math.exp(0.5 * math.sqrt(2) * torch.special.erfinv(torch.tensor(2 * quantile - 1)).item())
    late = torch.tensor(history[-100:], dtype=torch.float64)
    assert float(late.mean()) == pytest.approx(true_quantile, rel=0.1)
    # and the fraction of norms it leaves unclipped is near the target
    fresh = _lognormal_norms(data_gen, 20_000)
    assert float((fresh <= clipper.clip_norm).double().mean()) == pytest.approx(quantile, abs=0.06)
    assert clipper.rounds == 400


def test_adaptive_clipper_validation_and_state():
    with pytest.raises(ValueError, match="generator"):
        AdaptiveClipper(count_noise_std=1.0)
    with pytest.raises(ValueError, match="target_quantile"):
        AdaptiveClipper(target_quantile=1.0)
    clipper = AdaptiveClipper(initial_clip_norm=1.0)
    with pytest.raises(ValueError, match="unclipped_fraction_count"):
        clipper.update(11, 10)
    with pytest.raises(ValueError, match="n"):
        clipper.update(1, 0)
    clipper.update(10, 10)
    restored = AdaptiveClipper()
    restored.load_state_dict(clipper.state_dict())
    assert restored.clip_norm == clipper.clip_norm == pytest.approx(math.exp(-0.1))


def test_update_noise_multiplier_for_adaptive_clipping():
    # Andrew et al. 2021: z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)
    assert update_noise_multiplier_for_adaptive_clipping(1.0, 0.0) == 1.0
    assert update_noise_multiplier_for_adaptive_clipping(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5)
    with pytest.raises(ValueError, match="count_noise_std"):
        update_noise_multiplier_for_adaptive_clipping(1.0, 0.4)


# -- the Gaussian mechanism ----------------------------------------------------------------

def test_noise_std_formulas():
    assert central_noise_std(1.2, 0.5, 10) == pytest.approx(0.06)
    assert local_noise_std(1.2, 0.5) == pytest.approx(0.6)
    assert central_noise_std(0.0, 1.0, 5) == 0.0
    with pytest.raises(ValueError, match="noise_multiplier"):
        central_noise_std(-1.0, 1.0, 5)
    with pytest.raises(ValueError, match="clip_norm"):
        local_noise_std(1.0, 0.0)
    with pytest.raises(ValueError, match="num_clients"):
        central_noise_std(1.0, 1.0, 0)


def _chi_square_interval(sample_variance: float, n: int, confidence: float = 0.999) -> tuple[float, float]:
    """Confidence interval for σ² from (n-1)S²/σ² ~ χ²(n-1)."""
    from scipy.stats import chi2

    tail = (1 - confidence) / 2
    return ((n - 1) * sample_variance / chi2.ppf(1 - tail, n - 1),
            (n - 1) * sample_variance / chi2.ppf(tail, n - 1))


@pytest.mark.parametrize("z, clip, m", [(1.0, 1.0, 1), (1.1, 0.5, 20), (0.3, 2.0, 100)])
def test_added_noise_has_the_formula_std(z, clip, m):
    std = central_noise_std(z, clip, m)
    x = torch.linspace(-1, 1, 200_000)
    noised = add_gaussian_noise(x, std, torch.Generator().manual_seed(7))
    assert noised.dtype == torch.float32
    residual = (noised - x).double()
    low, high = _chi_square_interval(float(residual.var()), residual.numel())
    assert low <= std ** 2 <= high
    assert abs(float(residual.mean())) < 5 * std / math.sqrt(residual.numel())  # zero mean, 5σ


def test_noise_never_touches_the_global_rng_and_secret_draws_never_repeat():
    from stamen.privacy.noise import SecretNoise, SeededNoise

    torch.manual_seed(123)
    before = torch.get_rng_state()
    secret = SecretNoise()
    a, b = secret.gaussian(1000, 1.0, 3, "dp-local", 2), secret.gaussian(1000, 1.0, 3, "dp-local", 2)
    assert not torch.equal(a, b)  # the same purpose twice: two independent draws
    assert SecretNoise().uniform(50, 1).tolist() != SecretNoise().uniform(50, 1).tolist()
    seeded = SeededNoise(5)  # debugging only: reproducible from the run seed
    c, d = seeded.gaussian(1000, 1.0, 3, "dp-local", 2), seeded.gaussian(1000, 1.0, 3, "dp-local", 2)
    e = seeded.gaussian(1000, 1.0, 3, "dp-local", None)
    assert torch.equal(c, d) and not torch.equal(c, e)
    assert torch.equal(torch.get_rng_state(), before)
    assert secret.reproducible is False and seeded.reproducible is True


def test_add_gaussian_noise_leaves_input_untouched_and_validates():
    x = torch.ones(5)
    add_gaussian_noise(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.ones(5))
    assert torch.equal(add_gaussian_noise(x, 0.0, torch.Generator().manual_seed(0)), x)
    with pytest.raises(TypeError, match="Generator"):
        add_gaussian_noise(x, 1.0, None)
    with pytest.raises(ValueError, match="std"):
        gaussian_noise((3,), -1.0, torch.Generator())
