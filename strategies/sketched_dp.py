"""Strategy ``sketched_dp``: differentially private federated averaging in sketch space.

Clients upload a linear sketch ``RΔ`` of their update (``compression.codec``: ``gaussian``,
``srht``, ``sparsejl``, ``rademacher``, ``countsketch`` or ``dense`` — any codec whose
payloads may be summed before decoding); every party regenerates R from (run seed, round),
so R never travels. The server averages the sketches and de-sketches **once** (Song, Wang,
Yu, Zhang, "Sketching for First Order Method: Efficient Algorithm for Low-Bandwidth Channel
and Vulnerability", ICML 2023). It is ``sketched_fedavg`` with a dense downlink, any linear
codec (``dense`` included) and a choice of de-sketching; ``sketched_fedavg`` and ``fetchsgd``
accept the same privacy sites.

Privacy (``privacy.*``; the privacy stage of ``strategies/dp.py``, shared by every strategy):

- client duty (``client/privacy_hooks.py``, ``dp-space = payload``): clip the *sketch* to
  ``‖RΔ‖ ≤ C`` — all arrays of the payload as one vector, e.g. the whole ``rows × s``
  CountSketch table. With ``privacy.site = "local"`` the client also adds ``N(0, (zC)²·I_s)``
  to its sketch before sending it.
- server duty (``privacy.site = "sketch"``): re-clip each received sketch to ``C``, then
  release ``Y = Σ_i RΔ_i / D + N(0, (zC/D)²·I_s)`` with the fixed denominator ``D`` (``q·N``
  under Poisson sampling, the sampled cohort otherwise), and de-sketch ``Y`` once:
  ``w ← w + η_g · desketch(Y)``.

Why the guarantee holds: after clipping, one client changes the *sum of sketches* by at most
``C`` in L2, whatever R is (R is public and fixed for the round, chosen independently of the
data); Gaussian noise of std ``zC`` on that sum is therefore the Gaussian mechanism with
multiplier ``z`` in ``s`` dimensions, and the same sampled-Gaussian accountant applies.
De-sketching (Rᵀ·, the CountSketch median, or its top-k) is post-processing. Clipping ``Δ``
in parameter space would *not* do: ``‖RΔ‖`` can exceed ``‖Δ‖`` (e.g. by √rows for a
CountSketch table), so the sketch's sensitivity would be unbounded in the worst case.
Note the scale: a CountSketch table of ``rows`` rows has ``‖T‖ ≈ √rows·‖Δ‖``, a normalised
dense sketch ``‖RΔ‖ ≈ ‖Δ‖``; choose ``privacy.clip`` for the sketch.

``privacy.site = "central"`` is refused here (it means clipping in parameter space); with
``privacy`` off (no clip, z = 0) this is plain sketched averaging: the uniform mean of the
client sketches (as under DP, clients weigh the same whatever their example counts),
de-sketched once.

Options (``strategy.*``): ``desketch`` — ``decode`` (the codec's decoder: the adjoint for
dense sketches, the median-over-rows estimate for CountSketch), ``adjoint`` (CountSketch's
linear mean-over-rows estimate), ``topk`` (CountSketch heavy hitters, FetchSGD-style, keeping
``topk`` coordinates); ``server_lr`` η_g.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from stamen.core import Capabilities
from stamen.sketching.codec import PayloadError
from stamen.strategies.registry import Options, StrategySpec, register_strategy
from stamen.strategies.sketched import SKETCH_SPACE, SketchMethod


class SketchedDPOptions(Options):
    desketch: Literal["decode", "adjoint", "topk"] = Field(
        "decode", description="how the mean sketch becomes an update: the codec's decode, CountSketch's linear "
                              "adjoint, or CountSketch top-k heavy hitters")
    topk: int = Field(0, ge=0, description="coordinates kept with desketch='topk' (0: the sketch width s)")
    server_lr: float = Field(1.0, gt=0.0, description="global learning rate η_g: w ← w + η_g·desketch(mean sketch)")


SUMMABLE = ("dense", *SKETCH_SPACE.codecs)
CAPABILITIES = Capabilities(aggregation="payload", codecs=SUMMABLE, privacy_sites=frozenset({"sketch", "local"}),
                            robust=False, notes={**SKETCH_SPACE.notes,
                                                 "codecs": "a linear codec whose fp32 payloads may be summed"})


class SketchedDPMethod(SketchMethod):
    """Clip + Gaussian noise + accounting on linear sketches (the pipeline's privacy stage in sketch
    space), aggregated in sketch space, de-sketched once; dense downlink."""

    capabilities = CAPABILITIES

    def __init__(self, *, desketch: str, topk: int, server_lr: float, codec: str, codec_options: dict):
        super().__init__(codec=codec, codec_options=codec_options, keys=None, downlink="dense")
        self.desketch, self.topk, self.server_lr = desketch, int(topk), float(server_lr)

    def bind(self, run) -> None:
        super().bind(run)
        if self.desketch in ("adjoint", "topk") and not hasattr(run.codec, "adjoint_decode"):
            raise PayloadError(f"strategy.desketch={self.desketch!r} needs compression.codec='countsketch'")

    def aggregate(self, server_round, contributions, weights, combiner):
        return combiner.combine(contributions, [1.0] * len(contributions), self.contribution_size())

    def step(self, server_round, global_arrays, aggregate, total_weight):
        delta = self.desketch_update(self.unpack(aggregate), server_round)
        layout = self.run.layout
        return layout.unflatten(layout.flatten(global_arrays) + np.float32(self.server_lr) * delta)

    def desketch_update(self, payload: dict[str, np.ndarray], server_round: int) -> torch.Tensor:
        """The update Δ̂ of the (mean, noised) payload, decoded once."""
        codec, ctx = self.run.codec, self.ctx(server_round)
        if self.desketch == "decode":
            delta = codec.decode(payload, ctx)
        elif self.desketch == "adjoint":
            delta = codec.adjoint_decode(payload, ctx)
        else:
            k = self.topk or int(np.prod(codec.payload_shape(self.run.layout.d)[-1:]))
            delta = codec.decode_topk(payload, ctx, min(k, self.run.layout.d))
        if delta.shape != (self.run.layout.d,) or not bool(torch.isfinite(delta).all()):
            raise PayloadError("de-sketched update is not a finite vector of the model's size")
        return delta.to(torch.float32)


def build_sketched_dp(options: SketchedDPOptions, cfg) -> SketchedDPMethod:
    from stamen.config import ConfigError

    if options.desketch in ("adjoint", "topk") and cfg.compression.codec != "countsketch":
        raise ConfigError(f"strategy.desketch={options.desketch!r} needs compression.codec='countsketch', "
                          f"got {cfg.compression.codec!r}; use desketch='decode'")
    return SketchedDPMethod(desketch=options.desketch, topk=options.topk, server_lr=options.server_lr,
                            codec=cfg.compression.codec, codec_options=cfg.compression.options())


register_strategy(StrategySpec(
    "sketched_dp", build_sketched_dp, SketchedDPOptions,
    "Sketched DP-FedAvg: clients clip (and optionally noise) a linear sketch RΔ; the server averages sketches, "
    "adds N(0,(zC/D)²) in sketch space (privacy.site='sketch'), de-sketches once; ε accounted per round",
    CAPABILITIES))
