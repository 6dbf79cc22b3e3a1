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
consumes. Noise is drawn in fp32 from a private ``torch.Generator``, never from the
global RNG, so no other component's random stream is perturbed.

**Where the generator's seed comes from** (:class:`NoiseSource`). DP noise and DP client
sampling are *secret* randomness: if anyone can regenerate them they can subtract the noise
(and a predictable Poisson sample gives none of the amplification the accountant credits).
``run.seed`` is public — it sits in ``config.toml`` and on command lines — so secret draws
never derive from it. :class:`SecretNoise` (the default) seeds a fresh private generator
from the operating system's CSPRNG (``secrets``) for every draw and keeps no copy of the
seed; a client's local noise is drawn on the client, from its own entropy, which the server
never sees. Each draw is a Mersenne-Twister/Philox stream from a 64-bit secret seed (torch)
or a PCG64 stream from 128 secret bits (numpy, for sampling): guessing the seed takes ~2⁶⁴
tries per draw, and the raw stream is never observed (only noise added to data), so the
generator's own predictability from long output runs does not apply. The cost is one
``getrandom`` call per draw (~µs); drawing 10⁷ fp32 normals costs what it did before
(``benchmarks/privacy_noise.py``). :class:`SeededNoise` keeps the old reproducible noise for
debugging only (``privacy.reproducible_noise``); every output of such a run says its ε is
not a guarantee.

Pure tensor code: torch, numpy and the seed rule of :mod:`stamen.core`.
"""

from __future__ import annotations

import math
import secrets
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from stamen.core import derive_seed


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


class NoiseSource(ABC):
    """Where secret random draws come from: DP noise and DP client sampling.

    ``purpose`` parts (round, site, node …) name a draw; a :class:`SeededNoise` derives its
    seed from them, a :class:`SecretNoise` ignores them (every draw is fresh).
    """

    #: True when anyone who knows the run seed can regenerate the draws (no DP guarantee)
    reproducible: bool

    @abstractmethod
    def seed(self, *purpose: Any) -> int:
        """A 63-bit seed for one draw."""

    def generator(self, *purpose: Any, device: str = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.seed(*purpose))
        return g

    def gaussian(self, shape: torch.Size | tuple[int, ...] | int, std: float, *purpose: Any,
                 device: str = "cpu") -> torch.Tensor:
        """An fp32 draw of ``N(0, std²)`` of ``shape``."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return gaussian_noise(shape, std, self.generator(*purpose, device=device))

    def uniform(self, n: int, *purpose: Any) -> np.ndarray:
        """``n`` independent U[0, 1) draws (float64), e.g. for Poisson sampling."""
        return self.numpy_generator(*purpose).random(int(n))

    def numpy_generator(self, *purpose: Any) -> np.random.Generator:
        return np.random.default_rng(self.seed(*purpose))


class SecretNoise(NoiseSource):
    """Every draw from a fresh generator seeded by the OS CSPRNG (see the module docstring)."""

    reproducible = False

    def seed(self, *purpose: Any) -> int:
        return secrets.randbits(63)

    def numpy_generator(self, *purpose: Any) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


class SeededNoise(NoiseSource):
    """Draws derived from (run seed, purpose): reproducible, for debugging only — no DP guarantee."""

    reproducible = True

    def __init__(self, run_seed: int):
        self.run_seed = int(run_seed)

    def seed(self, *purpose: Any) -> int:
        return derive_seed(self.run_seed, "dp-noise", *purpose)


def noise_source(reproducible: bool, run_seed: int) -> NoiseSource:
    """The noise source ``privacy.reproducible_noise`` asks for."""
    return SeededNoise(run_seed) if reproducible else SecretNoise()


#: what outputs say when the noise was seeded from the run seed
NOT_A_GUARANTEE = ("privacy.reproducible_noise = true: the noise was derived from the public run seed, so anyone "
                   "with config.toml can regenerate and remove it; epsilon is NOT a privacy guarantee (debugging only)")
