"""Distributed DP for secure aggregation: integer updates, discrete Gaussian noise shares, the field.

Under secure aggregation the server learns only the sum of the clients' vectors, so the noise
must be in that sum before anyone unmasks it: each client adds its *share* of the noise. Sums
must also be exact in a finite field (masks cancel only modulo m), so everything is an integer.
A client with an update x (its payload vector, fp32):

1. clips x to L2 norm C and scales it: γx (``γ`` = ``secagg.scale``);
2. rounds γx stochastically to integers — unbiased, with randomness from OS entropy — so
   ‖round(γx)‖₂ ≤ γC + √d: the integer vector's L2 sensitivity is Δ₂ = γC + √d whatever the
   rounding (each coordinate moves by less than 1);
3. adds a discrete Gaussian N_Z(0, σ_c²) per coordinate (:func:`discrete_gaussian`; Canonne,
   Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020, Algorithm 3:
   a discrete Laplace proposal accepted with probability exp(−(|y| − σ²/t)²/(2σ²)));
4. maps the result into Z_m (m = 2^bits) and masks it (``strategies/secagg.py``).

**Privacy of the sum** (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", ICML 2021, Theorem 1): with n ≥ 1 parties each
adding N_Z(0, σ_c²) independently, releasing the integer sum of clipped, rounded vectors plus the
noise satisfies ½ε²-concentrated DP (ρ = ε²/2 zCDP) for neighbouring sums that differ by a vector
of L2 norm ≤ Δ₂, with

    ε = min( sqrt(Δ₂²/(nσ_c²) + ½τd),  Δ₂/(√n σ_c) + τ√d ),   τ = 10 Σ_{k=1}^{n−1} exp(−2π²σ_c² k/(k+1)).

τ is what the sum of discrete Gaussians lacks to be one discrete Gaussian of variance nσ_c²; for
σ_c ≥ 1 it is below 10⁻⁷ n, so ε ≈ Δ₂/(√n σ_c), the Gaussian mechanism's. The noise is
calibrated for n = t, the fewest survivors the protocol unmasks (its threshold): each client
adds σ_c² = σ²/t, so any round that unmasks has total noise variance ≥ σ² = (zΔ₂)².

**Accounting.** ρ-zCDP has Rényi DP αρ at every order α — exactly the RDP of a Gaussian mechanism
with multiplier z_eff = 1/ε (ρ = 1/(2z_eff²)). So the run's RDP accountant composes each round as
an unsampled Gaussian event with z_eff from :func:`round_epsilon_bound` (the worst round the
cohort sizes allow; z_eff = z to float precision whenever σ_c ≥ 1), which is what
``dp_accounting.ZCDpEvent`` gives too (a test compares them). No sampling amplification: the
server runs the protocol with the cohort, so it knows who took part. ``tests/test_secagg.py``
checks the sampler (its pmf by a χ² test) and that the sum of n shares has variance nσ_c².

**The field** (:func:`field_bits`): the server must recover Σ values exactly, so m must exceed
twice the largest magnitude the sum can take: ``n_max·(γC + 1)`` for the signal plus a noise
bound of 12 standard deviations (a coordinate exceeds it with probability < 10⁻³² — times d
coordinates, still negligible), plus one bit of margin. Arithmetic is in uint64 with natural
wrap-around, exact modulo m = 2^bits because m divides 2^64; bits ≤ 62 keeps n·m < 2^64.
"""

from __future__ import annotations

import math

import numpy as np


def stochastic_round(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased integer rounding: ⌊y⌋ + Bernoulli(y − ⌊y⌋), int64."""
    floor = np.floor(y)
    return (floor + (rng.random(y.shape) < (y - floor))).astype(np.int64)


def discrete_gaussian(shape: int | tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Samples of N_Z(0, σ²) (P[k] ∝ exp(−k²/(2σ²)) on the integers), int64; σ = 0 gives zeros."""
    size = int(np.prod(shape))
    if sigma <= 0:
        return np.zeros(shape, np.int64)
    t = math.floor(sigma) + 1
    p = 1.0 - math.exp(-1.0 / t)  # discrete Laplace(t) = difference of two geometric variables
    out = np.empty(0, np.int64)
    while out.size < size:
        n = max(64, int(1.3 * (size - out.size)))
        y = rng.geometric(p, n).astype(np.int64) - rng.geometric(p, n).astype(np.int64)
        accept = rng.random(n) < np.exp(-((np.abs(y) - sigma ** 2 / t) ** 2) / (2 * sigma ** 2))
        out = np.concatenate([out, y[accept]])
    return out[:size].reshape(shape)


def l2_sensitivity(clip: float, scale: float, d: int) -> float:
    """Δ₂ of a clipped, scaled, stochastically rounded vector: γC + √d."""
    return scale * clip + math.sqrt(d)


def ddg_epsilon(sensitivity: float, sigma_client: float, parties: int, d: int) -> float:
    """ε of ½ε²-concentrated DP for the distributed discrete Gaussian (module docstring)."""
    if sigma_client <= 0:
        return math.inf
    n = int(parties)
    tau = 10 * sum(math.exp(-2 * math.pi ** 2 * sigma_client ** 2 * k / (k + 1)) for k in range(1, n))
    return min(math.sqrt(sensitivity ** 2 / (n * sigma_client ** 2) + 0.5 * tau * d),
               sensitivity / (math.sqrt(n) * sigma_client) + tau * math.sqrt(d))


def field_bits(max_parties: int, clip: float, scale: float, sigma_client: float) -> int:
    """The bit width b of the field Z_{2^b} in which no sum of ``max_parties`` vectors wraps."""
    signal = max_parties * (scale * clip + 1)
    noise = 12 * sigma_client * math.sqrt(max_parties)
    bits = math.ceil(math.log2(2 * (signal + noise) + 1)) + 1
    limit = 63 - math.ceil(math.log2(max(max_parties, 2)))
    if bits > limit:
        raise ValueError(f"the secure sum of {max_parties} clients needs a {bits}-bit field, more than the {limit} "
                         f"bits uint64 arithmetic allows; lower secagg.scale or the cohort")
    return bits


def to_field(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers → Z_{2^b} (uint64)."""
    return values.astype(np.int64).view(np.uint64) & np.uint64((1 << bits) - 1)


def from_field(values: np.ndarray, bits: int) -> np.ndarray:
    """Z_{2^b} → the signed integers in [−2^{b−1}, 2^{b−1}) (int64)."""
    m = np.uint64(1 << bits)
    v = values.astype(np.uint64) & (m - np.uint64(1))
    signed = v.astype(np.int64)
    return np.where(v >= np.uint64(1 << (bits - 1)), signed - (1 << bits), signed)


def round_epsilon_bound(noise_multiplier: float, sensitivity: float, d: int, max_parties: int) -> float:
    """An upper bound on :func:`ddg_epsilon` for any round of the protocol: t ≤ n ≤ ``max_parties``
    survivors, each adding σ_c² = (zΔ₂)²/t with t ≤ ``max_parties``.

    The first term Δ₂²/(nσ_c²) = t/(n z²) ≤ 1/z²; τ ≤ 10(N − 1)·exp(−π²σ_min²) with σ_min = zΔ₂/√N
    (k/(k + 1) ≥ 1/2). So ε ≤ sqrt(1/z² + ½τd): the round is ½ε²-zCDP, the Gaussian mechanism's
    1/(2z_eff²) with z_eff = 1/ε — which is how the accountant composes it.
    """
    if noise_multiplier <= 0:
        return math.inf
    n = max(int(max_parties), 2)
    sigma_min = noise_multiplier * sensitivity / math.sqrt(n)
    tau = 10 * (n - 1) * math.exp(-math.pi ** 2 * sigma_min ** 2)
    return math.sqrt(1.0 / noise_multiplier ** 2 + 0.5 * tau * d)
