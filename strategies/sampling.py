"""Which clients train: the pipeline's seeded sampler (public randomness).

Without DP the cohort of a round is ``⌊fraction · N⌋`` partitions drawn without replacement by a
private generator derived from (run seed, round, purpose): reproducible, the configured
fraction from round 1 (Flower's own sampling uses the global ``random`` module and may sample
before every node registered). Under DP the privacy stage samples instead, from OS entropy
(``strategies/dp.py``): a predictable sample would void the amplification the accountant credits.
"""

from __future__ import annotations

import math

import numpy as np

from stamen.core import derive_seed


def sample_count(fraction: float, population: int) -> int:
    """⌊fraction · population⌋ clients, at least one."""
    return max(1, min(population, int(math.floor(fraction * population + 1e-9))))


def seeded_sample(seed: int, server_round: int, pids: list[int], fraction: float, purpose: str = "train") -> list[int]:
    """``sample_count(fraction, len(pids))`` of ``pids`` without replacement, seeded by (seed, round, purpose)."""
    pids = sorted(pids)
    rng = np.random.default_rng(derive_seed(seed, server_round, "sample", purpose))
    chosen = rng.choice(len(pids), size=sample_count(fraction, len(pids)), replace=False)
    return sorted(pids[i] for i in chosen)
