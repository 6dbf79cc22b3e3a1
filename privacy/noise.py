"""The Gaussian mechanism at Stamen's three noise sites, with private generators.

Where the noise goes decides its standard deviation (``z`` = noise multiplier,
``C`` = clip norm, ``m`` = clients aggregated this round):

- central (DP-FedAvg, McMahan et al. 2018): the server adds ``N(0, (zC/m)²)`` to
  the *mean* of ``m`` clipped updates, i.e. ``N(0, (zC)²)`` on their sum;
- local: each client adds ``N(0, (zC)²)`` to its own clipped update;
- sketch space: a client clips its sketch ``RΔ`` to ``C`` and adds ``N(0, (zC)²·I_s)``
  (the same formula as local, in ``s`` dimensions).

In every case ``z`` is the ratio of the noise std to the L2 sensitivity of the
released sum, which is what the accountant (:mod:`stamen.privacy.accounting`)
consumes. Noise is drawn in fp32 from a ``torch.Generator`` the caller seeds
(e.g. with :func:`noise_generator`), never from the global RNG, so that runs are
reproducible and no other component's random stream is perturbed.

Pure tensor code: torch plus the seed helper from the sketching codec module.
"""

from __future__ import annotations

import math

import torch

from stamen.sketching.codec import derive_seed


def _check_noise_multiplier(noise_multiplier: float) -> float:
    z = float(noise_multiplier)
    if not math.isfinite(z) or z < 0:
        raise ValueError(f"noise_multiplier (z) must be non-negative and finite, got {noise_multiplier!r}")
    return z


def _check_clip_norm(clip_norm: float) -> float:
    c = float(clip_norm)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"clip_norm (C) must be positive and finite, got {clip_norm!r}")
    return c


def central_noise_std(noise_multiplier: float, clip_norm: float, num_clients: int) -> float:
    """Std ``zC/m`` of the noise the server adds to the mean of ``m`` clipped updates (DP-FedAvg).

    Adding one client changes the sum by at most ``C`` and hence the mean of a
    fixed-denominator ``m`` by ``C/m``; noise ``zC/m`` keeps the ratio at ``z``.
    """
    z, c = _check_noise_multiplier(noise_multiplier), _check_clip_norm(clip_norm)
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients <= 0:
        raise ValueError(f"num_clients (m) must be a positive integer, got {num_clients!r}")
    return z * c / int(num_clients)


def local_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """Std ``zC`` each client adds to its own update (or sketch) clipped to ``C``."""
    return _check_noise_multiplier(noise_multiplier) * _check_clip_norm(clip_norm)


def gaussian_noise(shape: torch.Size | tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """An fp32 draw of ``N(0, std²)`` with the given shape, on the generator's device."""
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be non-negative and finite, got {std!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator seeded by the caller (the global RNG is never used)")
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=generator.device)
    return noise.mul_(std)


def add_gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``x + N(0, std²·I)`` as a new fp32 tensor on ``x``'s device; ``x`` is left untouched.

    The draw happens on the generator's device (a CPU generator gives the same
    noise whatever device ``x`` lives on) and is then moved to ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    noise = gaussian_noise(x.shape, std, generator)
    return x.detach().to(torch.float32) + noise.to(x.device)


def noise_generator(seed: int, round: int, purpose: str = "dp-noise", node: int | None = None,
                    device: str = "cpu") -> torch.Generator:
    """A private generator for noise, derived from (run seed, round, purpose[, node]).

    Use ``node=None`` for the server's central noise and the client's partition id
    for local noise, so that no two parties ever share a noise stream.
    """
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, round, purpose, node))
    return g
