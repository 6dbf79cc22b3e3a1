"""Leakage of one client's update under the platform's mechanisms: raw, sketched, clipped and noised.

What the attacker observes is built the way the mechanisms build it (``strategies/dp.py``,
``strategies/sketched_dp.py``): the update (a single example's gradient, the DLG setting),
sketched with a codec's own shared-seed operator (``RΔ``, flattened), clipped to ``C`` *in the
space that is sent* (the sketch under ``sketched_dp``, the update otherwise) and noised with
``N(0, (zC)²)``. That noise level is what one client's contribution carries under every site:
local DP adds it per client, and under central DP the sum carries it, so an observer who
knows every other client's update (the worst case DP protects against) sees exactly
``clip(RΔ) + N(0, (zC)²)``. The attacker knows R (it follows from the shared seed) and
matches ``R·∇̂`` against the observation (:mod:`.gradient_inversion`).

Pure tensor code (torch + the sketching codecs); every random draw from a private generator.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from stamen.privacy.attacks.gradient_inversion import (ATTACKS, Projection, label_accuracy, model_gradient, mse,
                                                       psnr, sigmoid_mlp)
from stamen.privacy.clipping import l2_clip
from stamen.privacy.noise import add_gaussian_noise
from stamen.core import Layout, derive_seed
from stamen.sketching.codec import CodecContext, make_codec

#: sketch codecs whose operator is differentiable by autograd (the attack back-propagates through R)
ATTACKABLE_SKETCHES = ("gaussian", "rademacher", "countsketch", "sparsejl")


def codec_projection(codec: str, d: int, *, ratio: float, seed: int = 0, round: int = 1,
                     **options) -> tuple[Projection, int]:
    """``v ↦ payload(v)`` (flattened) of a sketch codec, with the operator every party builds for (seed, round).

    Returns the projection and the number of floats it produces. SRHT is refused: its fast
    transform writes into preallocated buffers, which autograd cannot differentiate.
    """
    if codec not in ATTACKABLE_SKETCHES:
        raise ValueError(f"sketch {codec!r} cannot be attacked by gradient matching here; choose one of "
                         f"{ATTACKABLE_SKETCHES}")
    sketch = make_codec(codec, ratio=ratio, **options)
    operator = sketch.operator(CodecContext(seed=seed, round=round, layout=Layout(("update",), ((int(d),),))))
    return (lambda v: operator.apply(v).reshape(-1)), int(np.prod(operator.sketch_shape))


def observe(gradient: Tensor, *, project: Projection | None = None, clip: float | None = None,
            noise_std: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """What is observed of one update: sketch, then clip (in the sent space), then Gaussian noise."""
    observed = gradient.detach() if project is None else project(gradient.detach()).detach()
    if clip is not None:
        observed = l2_clip(observed, clip)
    if noise_std > 0:
        if generator is None:
            raise ValueError("noise_std > 0 needs a private torch.Generator")
        observed = add_gaussian_noise(observed, noise_std, generator)
    return observed


def attack_observations(model: nn.Module, inputs: Tensor, labels: Tensor, *, attack: str = "ig",
                        project: Projection | None = None, clip: float | None = None, noise_multiplier: float = 0.0,
                        seeds: Sequence[int] = (0,), iterations: int = 300,
                        data_range: tuple[float, float] = (0.0, 1.0), num_classes: int | None = None,
                        **attack_options) -> dict:
    """Reconstruct each input from its observed single-example update, once per seed; average the scores.

    Noise std is ``noise_multiplier · clip`` (see the module docstring). The observation noise
    and the attacker's initialisation use separate generators derived from (seed, input).
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {sorted(ATTACKS)}, got {attack!r}")
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be non-negative, got {noise_multiplier!r}")
    if noise_multiplier > 0 and clip is None:
        raise ValueError("noise_multiplier > 0 needs clip (noise std = noise_multiplier * clip)")
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model(inputs[:1]).shape[-1])
    span = data_range[1] - data_range[0]
    trials = []
    for i in range(inputs.shape[0]):
        x, y = inputs[i:i + 1], labels[i:i + 1]
        with torch.enable_grad():
            gradient = model_gradient(model, x, y).detach()
        for seed in seeds:
            noise = torch.Generator().manual_seed(derive_seed(int(seed), i, "attack-observation-noise"))
            observed = observe(gradient, project=project, clip=clip,
                               noise_std=noise_multiplier * (clip or 0.0), generator=noise)
            result = ATTACKS[attack](model, observed, tuple(inputs.shape[1:]), num_classes,
                                     generator=torch.Generator().manual_seed(derive_seed(int(seed), i, "attack-init")),
                                     project=project, data_range=data_range, iterations=iterations, **attack_options)
            trials.append({"input": i, "seed": int(seed), "mse": mse(x, result.inputs),
                           "psnr": psnr(x, result.inputs, span), "label_accuracy": label_accuracy(y, result.labels)})
    values = torch.tensor([t["psnr"] for t in trials], dtype=torch.float64)
    return {"attack": attack, "trials": len(trials), "iterations": iterations,
            "psnr": float(values.mean()), "psnr_std": float(values.std()) if len(trials) > 1 else 0.0,
            "mse": float(np.mean([t["mse"] for t in trials])),
            "label_accuracy": float(np.mean([t["label_accuracy"] for t in trials])), "per_trial": trials}


def digits(n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` scikit-learn 8×8 digits in [0, 1] (bundled with scikit-learn, offline)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if not 1 <= n <= len(data.target):
        raise ValueError(f"inputs must be between 1 and {len(data.target)}, got {n}")
    images = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target[:n], dtype=torch.int64)


def leakage_study(*, attack: str = "ig", sketch: str = "gaussian", sketch_ratios: Sequence[float] = (0.0,),
                  noise_multipliers: Sequence[float] = (0.0,), clip: float = 1.0, inputs: int = 4,
                  seeds: Sequence[int] = (0,), iterations: int = 300, hidden: int = 16, model_seed: int = 0,
                  sketch_options: dict | None = None) -> list[dict]:
    """PSNR of reconstructions for every (sketch ratio, noise multiplier) on digits with a small sigmoid MLP.

    Ratio 0 means the raw update (no sketch). ``clip`` is applied in every cell (it only
    rescales a single-example gradient whose norm exceeds it, which cosine-based IG ignores).
    """
    if clip is not None and (not math.isfinite(clip) or clip <= 0):
        raise ValueError(f"clip must be positive, got {clip!r}")
    images, labels = digits(inputs)
    model = sigmoid_mlp(images.shape[1:], 10, hidden, model_seed)
    d = sum(p.numel() for p in model.parameters())
    rows = []
    for ratio in sketch_ratios:
        if not 0 <= ratio <= 1:
            raise ValueError(f"sketch ratio must be in [0, 1] (0 = no sketch), got {ratio!r}")
        project, size = (None, d) if ratio == 0 else codec_projection(
            sketch, d, ratio=ratio, seed=model_seed + 1, **(sketch_options or {}))
        for z in noise_multipliers:
            report = attack_observations(model, images, labels, attack=attack, project=project, clip=clip,
                                         noise_multiplier=z, seeds=seeds, iterations=iterations)
            rows.append({"sketch": "none" if ratio == 0 else sketch, "sketch_ratio": ratio, "observed_size": size,
                         "d": d, "noise_multiplier": z, "clip": clip, "noise_std": z * clip,
                         **{k: v for k, v in report.items() if k != "per_trial"}, "per_trial": report["per_trial"]})
    return rows
