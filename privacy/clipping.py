"""L2 clipping of model updates: flat, per-layer, and adaptive (quantile-tracking).

Clipping bounds each client's contribution, which is what turns Gaussian noise
into a differential-privacy guarantee: the noise is calibrated to the clip norm
``C`` (the L2 sensitivity of one client's update), so the accountant can only be
right if *every* update that is aggregated has norm at most ``C``.

All functions take and return flat fp32 vectors (a model update in ``Layout``
order, see :mod:`stamen.sketching.codec`) and never modify their input.

Pure tensor code: torch only; no Flower, no application imports.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

def _check_clip_norm(clip_norm: float, name: str = "clip_norm") -> float:
    value = float(clip_norm)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {clip_norm!r}")
    return value


def _check_flat(update: torch.Tensor) -> torch.Tensor:
    if not isinstance(update, torch.Tensor):
        raise TypeError(f"update must be a torch.Tensor, got {type(update).__name__}")
    if update.dim() != 1:
        raise ValueError(f"update must be a flat (1-D) vector, got shape {tuple(update.shape)}")
    if not torch.isfinite(update).all():
        raise ValueError("update contains NaN or infinite values; refusing to clip (sensitivity would be unbounded)")
    return update.to(torch.float32)


def l2_norm(update: torch.Tensor) -> float:
    """L2 norm of a flat update, computed in fp64 so that huge ``d`` does not lose precision."""
    return float(torch.linalg.vector_norm(update.detach().to(torch.float64)))


def clip_scale(norm: float, clip_norm: float) -> float:
    """The factor ``min(1, C / ||x||)``: 1 for updates already inside the ball (they pass untouched)."""
    clip_norm = _check_clip_norm(clip_norm)
    if norm <= clip_norm:
        return 1.0
    return clip_norm / norm


def l2_clip(update: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Flat L2 clipping ``x · min(1, C/||x||)`` of one client's update (a new fp32 tensor).

    Scaling (rather than truncating coordinates) keeps the update's direction,
    which is what FedAvg needs; vectors with norm ≤ C are returned unchanged.
    """
    x = _check_flat(update)
    scale = clip_scale(l2_norm(x), clip_norm)
    if scale == 1.0:
        return x.clone()
    return x * torch.tensor(scale, dtype=torch.float32, device=x.device)


def per_layer_clip_norms(clip_norm: float, segment_lengths: Sequence[int], split: str = "equal") -> list[float]:
    """Split a total budget ``C`` into per-layer bounds ``C_l`` with ``sqrt(sum C_l²) = C``.

    Because the layers are disjoint blocks of the flat vector, clipping each
    block to ``C_l`` bounds the whole update's norm by ``sqrt(sum C_l²) = C``,
    so the same accountant (sensitivity ``C``) stays valid.

    ``split``:
      - ``"equal"``: ``C_l = C / sqrt(L)``, every layer gets the same share
        (McMahan et al. 2018's per-layer variant);
      - ``"proportional"``: ``C_l = C · sqrt(n_l / d)``, a share that grows with
        the layer's size, so a big layer is not squeezed as hard as a tiny bias.
    """
    clip_norm = _check_clip_norm(clip_norm)
    lengths = [int(n) for n in segment_lengths]
    if not lengths:
        raise ValueError("segment_lengths must name at least one layer")
    if any(n <= 0 for n in lengths):
        raise ValueError(f"segment_lengths must all be positive, got {lengths}")
    if split == "equal":
        return [clip_norm / math.sqrt(len(lengths))] * len(lengths)
    if split == "proportional":
        d = sum(lengths)
        return [clip_norm * math.sqrt(n / d) for n in lengths]
    raise ValueError(f"split must be 'equal' or 'proportional', got {split!r}")


def per_layer_clip(update: torch.Tensor, segment_lengths: Sequence[int], clip_norm: float,
                   split: str = "equal") -> torch.Tensor:
    """Clip each layer (a contiguous segment of the flat update) to its share of ``C``.

    The total norm of the result is at most ``clip_norm`` (see :func:`per_layer_clip_norms`).
    """
    x = _check_flat(update)
    lengths = [int(n) for n in segment_lengths]
    if sum(lengths) != x.numel():
        raise ValueError(f"segment_lengths sum to {sum(lengths)} but the update has {x.numel()} entries")
    bounds = per_layer_clip_norms(clip_norm, lengths, split)
    parts = [l2_clip(segment, bound) for segment, bound in zip(torch.split(x, lengths), bounds)]
    return torch.cat(parts)


# -- adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021) ------------------------

def geometric_clip_update(clip_norm: float, unclipped_fraction: float, target_quantile: float,
                          learning_rate: float) -> float:
    """One step of the geometric quantile update ``C ← C · exp(-η (b̄ - γ))``.

    ``b̄`` is the (possibly noised) fraction of clients whose update norm was at
    most ``C``. If more than the target fraction ``γ`` fit inside the ball,
    ``C`` is too large and shrinks; if fewer fit, it grows. The multiplicative
    form makes the step size scale-free, so ``C`` can move across orders of
    magnitude in a few rounds (the paper's Algorithm 1).
    """
    clip_norm = _check_clip_norm(clip_norm)
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def update_noise_multiplier_for_adaptive_clipping(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier left for the updates once the clip-count query takes its share.

    Adaptive clipping releases a second Gaussian query (the noised count of
    unclipped clients, sensitivity 1/2 after centring the bits). Andrew et al.
    (2021, Thm. 1) show that the pair is as private as one Gaussian query with
    multiplier ``z`` when the update noise uses
    ``z_Δ = (z⁻² - (2σ_b)⁻²)^(-1/2)``. The accountant is then driven with ``z``.
    """
    z, sigma_b = float(noise_multiplier), float(count_noise_std)
    if not math.isfinite(z) or z <= 0:
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier!r}")
    if not math.isfinite(sigma_b) or sigma_b < 0:
        raise ValueError(f"count_noise_std must be non-negative and finite, got {count_noise_std!r}")
    if sigma_b == 0:
        return z
    remaining = z ** -2 - (2.0 * sigma_b) ** -2
    if remaining <= 0:
        raise ValueError(
            f"count_noise_std={sigma_b} is too small for noise_multiplier={z}: the clip-count query alone "
            f"would spend the whole budget; use count_noise_std > z/2 = {z / 2}")
    return remaining ** -0.5


class AdaptiveClipper:
    """Tracks a clip norm ``C`` that follows a target quantile of client update norms.

    Server-side state across rounds. Each round the server learns how many of
    the ``n`` participating clients had ``||Δ|| ≤ C`` (clients report a bit),
    optionally noises that count with ``N(0, count_noise_std²)`` from a private
    generator, and moves ``C`` geometrically toward the target quantile.
    Defaults follow the paper: ``γ = 0.5`` (median), ``η = 0.2``.
    """

    def __init__(self, initial_clip_norm: float = 0.1, target_quantile: float = 0.5, learning_rate: float = 0.2,
                 count_noise_std: float = 0.0, generator: torch.Generator | None = None,
                 min_clip_norm: float = 1e-12) -> None:
        self.clip_norm = _check_clip_norm(initial_clip_norm, "initial_clip_norm")
        if not 0.0 < float(target_quantile) < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
        if not math.isfinite(learning_rate) or learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive and finite, got {learning_rate!r}")
        if not math.isfinite(count_noise_std) or count_noise_std < 0:
            raise ValueError(f"count_noise_std must be non-negative and finite, got {count_noise_std!r}")
        if count_noise_std > 0 and generator is None:
            raise ValueError("count_noise_std > 0 needs generator= (a private torch.Generator; "
                             "the global RNG is never used)")
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_std = float(count_noise_std)
        self.min_clip_norm = _check_clip_norm(min_clip_norm, "min_clip_norm")
        self.generator = generator
        self.rounds = 0
        self.last_unclipped_fraction: float | None = None

    def update(self, unclipped_fraction_count: float, n: int) -> float:
        """Fold in one round: ``unclipped_fraction_count`` of ``n`` clients had norm ≤ C. Returns the new C."""
        if isinstance(n, bool) or int(n) != n or n <= 0:
            raise ValueError(f"n (clients this round) must be a positive integer, got {n!r}")
        count = float(unclipped_fraction_count)
        if not 0 <= count <= n:
            raise ValueError(f"unclipped_fraction_count must be in [0, n={n}], got {unclipped_fraction_count!r}")
        fraction = (count + self._count_noise()) / n
        self.last_unclipped_fraction = fraction
        new_norm = geometric_clip_update(self.clip_norm, fraction, self.target_quantile, self.learning_rate)
        self.clip_norm = max(new_norm, self.min_clip_norm)
        self.rounds += 1
        return self.clip_norm

    def observe_norms(self, norms: Sequence[float] | torch.Tensor) -> float:
        """Convenience for simulations: count the norms ≤ C and :meth:`update`. Returns the new C."""
        values = torch.as_tensor(norms, dtype=torch.float64).reshape(-1)
        if values.numel() == 0:
            raise ValueError("observe_norms needs at least one norm")
        return self.update(int((values <= self.clip_norm).sum()), int(values.numel()))

    def _count_noise(self) -> float:
        if self.count_noise_std == 0:
            return 0.0
        return float(torch.randn((), generator=self.generator, dtype=torch.float64)) * self.count_noise_std

    def state_dict(self) -> dict[str, float | int | None]:
        """Serializable state for checkpoints (the generator's state is the caller's to save)."""
        return {"clip_norm": self.clip_norm, "target_quantile": self.target_quantile,
                "learning_rate": self.learning_rate, "count_noise_std": self.count_noise_std,
                "rounds": self.rounds, "last_unclipped_fraction": self.last_unclipped_fraction}

    def load_state_dict(self, state: dict) -> None:
        self.clip_norm = _check_clip_norm(state["clip_norm"])
        self.target_quantile = float(state["target_quantile"])
        self.learning_rate = float(state["learning_rate"])
        self.count_noise_std = float(state["count_noise_std"])
        self.rounds = int(state["rounds"])
        fraction = state.get("last_unclipped_fraction")
        self.last_unclipped_fraction = None if fraction is None else float(fraction)
