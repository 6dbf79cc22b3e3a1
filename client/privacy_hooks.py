"""Client duty under differential privacy: clip (and, for local DP, noise) before anything leaves.

The privacy stage of the server's round pipeline (``strategies/dp.py``) decides the mechanism
and tells the client what to do with entries of the train message's config
(``stamen/schema/train.py``):

``dp-clip``             C, the L2 norm bound of what this client sends (absent: no privacy)
``dp-space``            ``update``: clip Δ before encoding (DP-FedAvg, local DP);
                        ``payload``: clip the codec's payload, e.g. the sketch RΔ (sketched DP)
``dp-local-noise-std``  σ of the Gaussian noise the client adds itself after clipping
                        (local DP: σ = zC); 0 or absent: the server adds the noise
``dp-per-layer``        clip each parameter tensor to C/√L (``update`` space only)

The ClientApp calls :func:`apply_client_privacy` on Δ before ``codec.encode`` and
:func:`apply_payload_privacy` on the payload after it; without ``dp-*`` entries both return
their input untouched, so runs without privacy are unchanged. Each reports
``dp-unclipped`` (1.0 if the clipped quantity already had norm ≤ C, else 0.0) in the reply
metrics: the only bit adaptive clipping (Andrew et al. 2021) needs, and the server noises
its count. The raw norm is never reported.

Noise comes from the generator the ClientApp hands in: seeded from this process's OS entropy
(``stamen.privacy.noise.SecretNoise``), so neither the server nor anyone holding the run
config can regenerate it; only with ``dp-reproducible`` (``privacy.reproducible_noise``, for
debugging) is it derived from the public run seed. Never the global RNG.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from stamen.privacy.clipping import l2_clip, l2_norm, per_layer_clip
from stamen.privacy.noise import add_gaussian_noise
from stamen.schema.train import DP_CLIP, DP_LOCAL_NOISE_STD, DP_PER_LAYER, DP_SPACE, DP_UNCLIPPED

SPACES = ("update", "payload")


def _settings(config: dict[str, Any]) -> tuple[float, str, float, bool] | None:
    """(C, space, local noise std, per-layer) from the message config, or None without ``dp-clip``."""
    if DP_CLIP not in config:
        if DP_LOCAL_NOISE_STD in config:
            raise ValueError(f"config entry {DP_LOCAL_NOISE_STD!r} needs {DP_CLIP!r}: noise is calibrated to a clip norm")
        return None
    clip = config[DP_CLIP]
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"config entry {DP_CLIP!r} must be a positive finite number, got {clip!r}")
    space = config.get(DP_SPACE, "update")
    if space not in SPACES:
        raise ValueError(f"config entry {DP_SPACE!r} must be one of {SPACES}, got {space!r}")
    std = config.get(DP_LOCAL_NOISE_STD, 0.0)
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ValueError(f"config entry {DP_LOCAL_NOISE_STD!r} must be a non-negative finite number, got {std!r}")
    per_layer = config.get(DP_PER_LAYER, False)
    if not isinstance(per_layer, bool):
        raise ValueError(f"config entry {DP_PER_LAYER!r} must be a bool, got {per_layer!r}")
    if per_layer and space != "update":
        raise ValueError(f"config entry {DP_PER_LAYER!r} applies to {DP_SPACE!r}='update' only")
    return float(clip), space, float(std), per_layer


def _clip_and_noise(x: torch.Tensor, clip: float, std: float, generator: torch.Generator,
                    segments: list[int] | None, metrics: dict | None) -> torch.Tensor:
    if metrics is not None:
        metrics[DP_UNCLIPPED] = 1.0 if l2_norm(x) <= clip else 0.0
    clipped = per_layer_clip(x, segments, clip) if segments is not None else l2_clip(x, clip)
    return add_gaussian_noise(clipped, std, generator) if std > 0 else clipped


def apply_client_privacy(delta: torch.Tensor, config: dict[str, Any], generator: torch.Generator,
                         layer_sizes: list[int] | tuple[int, ...] | None = None,
                         metrics: dict | None = None) -> torch.Tensor:
    """Clip (per layer if asked) and locally noise the flat update Δ as the config says.

    ``layer_sizes`` (the layout's ``numels``) is needed for ``dp-per-layer``. Returns Δ itself
    when the config asks for no privacy in update space.
    """
    settings = _settings(config)
    if settings is None or settings[1] != "update":
        return delta
    clip, _, std, per_layer = settings
    if per_layer and layer_sizes is None:
        raise ValueError(f"config entry {DP_PER_LAYER!r} needs the parameter layout's layer sizes")
    segments = [int(n) for n in layer_sizes] if per_layer else None
    return _clip_and_noise(delta, clip, std, generator, segments, metrics)


def apply_payload_privacy(payload: dict[str, np.ndarray], config: dict[str, Any], generator: torch.Generator,
                          metrics: dict | None = None) -> dict[str, np.ndarray]:
    """Clip (and locally noise) a codec payload as one vector: all its float arrays, in key order.

    For a sketch codec this is clipping RΔ to ``C`` in sketch space, which bounds each
    client's contribution to the *sum of payloads* by ``C`` whatever R is.
    """
    settings = _settings(config)
    if settings is None or settings[1] != "payload":
        return payload
    clip, _, std, _ = settings
    keys = sorted(payload)
    for k in keys:
        if np.asarray(payload[k]).dtype != np.float32:
            raise ValueError(f"{DP_SPACE}='payload' needs fp32 payload arrays; {k!r} is {np.asarray(payload[k]).dtype} "
                             f"(use a linear sketch codec)")
    arrays = [np.asarray(payload[k]) for k in keys]
    flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32, copy=False))
    out = _clip_and_noise(flat, clip, std, generator, None, metrics).numpy()
    result, start = {}, 0
    for k, a in zip(keys, arrays):
        result[k] = out[start:start + a.size].reshape(a.shape).astype(np.float32, copy=True)
        start += a.size
    return result
