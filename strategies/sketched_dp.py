"""Strategy ``sketched_dp``: differentially private federated averaging in sketch space.

Clients upload a linear sketch ``RΔ`` of their update (``compression.codec``: ``gaussian``,
``srht``, ``sparsejl``, ``rademacher``, ``countsketch`` or ``dense`` — any codec whose
payloads may be summed before decoding); every party regenerates R from (run seed, round),
so R never travels. The server averages the sketches and de-sketches **once**
(``/work/shared/specs/sketching_privacy.md``; Song, Wang, Yu, Zhang, ICML 2023).

Privacy (``privacy.*``, see ``strategies/dp.py`` for sampling and accounting, shared):

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
client sketches, de-sketched once.

Options (``strategy.*``): ``desketch`` — ``decode`` (the codec's decoder: the adjoint for
dense sketches, the median-over-rows estimate for CountSketch), ``adjoint`` (CountSketch's
linear mean-over-rows estimate), ``topk`` (CountSketch heavy hitters, FetchSGD-style, keeping
``topk`` coordinates); ``server_lr`` η_g.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from stamen import protocol as P
from stamen.config import ConfigError
from stamen.privacy.clipping import l2_clip
from stamen.sketching.codec import Codec, CodecContext, PayloadError, derive_seed, make_codec
from stamen.strategies.base import StamenStrategy, _reply_order
from stamen.strategies.dp import DP_CLIP, DP_LOCAL_NOISE_STD, DP_SPACE, PrivacyRuntime, PrivateStrategyBase, \
    chooses_own_clients, privacy_plan
from stamen.strategies.registry import _FLOWER_SAMPLING, Options, StrategySpec, register_strategy

log = logging.getLogger("stamen.strategy.sketched_dp")


class SketchedDPOptions(Options):
    desketch: Literal["decode", "adjoint", "topk"] = Field(
        "decode", description="how the mean sketch becomes an update: the codec's decode, CountSketch's linear "
                              "adjoint, or CountSketch top-k heavy hitters")
    topk: int = Field(0, ge=0, description="coordinates kept with desketch='topk' (0: the sketch width s)")
    server_lr: float = Field(1.0, gt=0.0, description="global learning rate η_g: w ← w + η_g·desketch(mean sketch)")


def summable(codec: Codec) -> bool:
    """Whether payloads of this codec may be summed before decoding."""
    return bool(codec.linear or getattr(codec, "mergeable", False))


class SketchedDPStrategy(PrivateStrategyBase, StamenStrategy, FedAvg):
    """Clip + Gaussian noise + accounting on linear sketches, aggregated in sketch space."""

    robust_refusal = ("its noise is calibrated to the mean of clipped sketches, and a robust rule does not commute "
                      "with de-sketching")

    handles_privacy = True  # build_strategy must not wrap it with the parameter-space mechanism
    _transient = StamenStrategy._transient + ("_dp", "_template")

    def __init__(self, *, desketch: str, topk: int, server_lr: float, runtime: PrivacyRuntime):
        super().__init__(**_FLOWER_SAMPLING)
        self.desketch, self.topk, self.server_lr = desketch, int(topk), float(server_lr)
        self._dp = runtime
        self._template: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None

    # -- what the clients are told ------------------------------------------------------
    def client_instructions(self, server_round: int) -> dict[str, Any]:
        out = dict(super().client_instructions(server_round))
        if self._dp.clip is not None:
            out.update({DP_CLIP: float(self._dp.clip), DP_SPACE: "payload"})
            if self._dp.local_noise_std() > 0:
                out[DP_LOCAL_NOISE_STD] = float(self._dp.local_noise_std())
        return out

    # -- aggregation in sketch space -----------------------------------------------------
    def aggregate_train(self, server_round: int, replies):
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        self.last_rejected, self.last_participants, accepted = [], [], []
        self._dp.unclipped = self._dp.reported = 0
        for msg in sorted(replies, key=_reply_order):
            try:
                pid, vector, metrics = self.check_payload_reply(msg, server_round)
            except (PayloadError, ValueError, KeyError, TypeError) as err:
                log.warning("round %d: rejected reply from node %s: %s", server_round, msg.metadata.src_node_id, err)
                self.last_rejected.append((msg.metadata.src_node_id, str(err)))
                continue
            accepted.append((msg, vector, metrics))
            self.last_participants.append(pid)

        central = self._dp.plan.enabled and self._dp.plan.site == "sketch"
        # fixed denominator D under server-side noise; a plain mean otherwise (post-processing of local noise)
        denominator = self._dp.denominator() if central else float(len(accepted))
        std = self._dp.central_noise_std() if central else 0.0
        self._dp.last_noise_std = std
        arrays, metrics = None, None
        if accepted or std > 0:  # an empty Poisson cohort still releases the noise (see strategies/dp.py)
            total = torch.zeros(self._template_size(server_round), dtype=torch.float32)
            for _, vector, _ in accepted:
                total.add_(vector)
            mean = total / np.float32(max(denominator, 1e-12))
            if std > 0:
                g = torch.Generator().manual_seed(derive_seed(self.seed, server_round, "dp-sketch-noise"))
                mean.add_(torch.randn(mean.shape, generator=g, dtype=torch.float32).mul_(std))
            delta = self.desketch_update(self._unpack(mean), server_round)
            weights = {k: v.astype(np.float32) for k, v in self._global.items()}
            flat = self.layout.flatten(weights) + np.float32(self.server_lr) * delta
            arrays = P.to_array_record(self.layout.unflatten(flat))
        if accepted:
            contents = [RecordDict({P.METRICS: MetricRecord(m)}) for _, _, m in accepted]
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        if self._dp.plan.enabled:
            self.finish_private_round(server_round)
        return arrays, metrics

    def desketch_update(self, payload: dict[str, np.ndarray], server_round: int) -> torch.Tensor:
        """The update Δ̂ of the (mean, noised) payload, decoded once."""
        ctx = CodecContext(seed=self.seed, round=server_round, layout=self.layout)
        if self.desketch == "decode":
            delta = self.codec.decode(payload, ctx)
        elif self.desketch == "adjoint":
            delta = self.codec.adjoint_decode(payload, ctx)
        else:
            k = self.topk or int(np.prod(self.codec.payload_shape(self.layout.d)[-1:]))
            delta = self.codec.decode_topk(payload, ctx, min(k, self.layout.d))
        if delta.shape != (self.layout.d,) or not bool(torch.isfinite(delta).all()):
            raise PayloadError("de-sketched update is not a finite vector of the model's size")
        return delta.to(torch.float32)

    # -- replies -------------------------------------------------------------------------
    def check_payload_reply(self, msg, server_round: int) -> tuple[int, torch.Tensor, dict[str, Any]]:
        """(partition id, payload as one fp32 vector — re-clipped under site 'sketch' —, metrics) or raise."""
        pid, payload, clean = self.check_envelope(msg)
        if self._dp.plan.enabled:
            self.check_privacy_bit(clean)
        vector = self._payload_vector(payload, server_round)
        if self._dp.plan.enabled and self._dp.plan.site == "sketch" and self._dp.clip is not None:
            vector = l2_clip(vector, self._dp.clip)  # server-side enforcement of the sensitivity C
        return pid, vector, clean

    def _payload_vector(self, payload: dict[str, np.ndarray], server_round: int) -> torch.Tensor:
        """The payload's arrays (in key order) as one fp32 vector, after checking them against the codec's."""
        template = self._payload_template(server_round)
        Codec.expect_keys(payload, set(template))
        parts = []
        for key in sorted(template):
            shape, dtype = template[key]
            parts.append(Codec.expect(payload, key, dtype=dtype, shape=shape).reshape(-1))
        return torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=True))

    def _payload_template(self, server_round: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Keys, shapes and dtypes of this codec's payloads (from encoding a zero update once)."""
        if self._template is None:
            ctx = CodecContext(seed=self.seed, round=server_round, layout=self.layout)
            zero = self.codec.encode(torch.zeros(self.layout.d), ctx, {})
            self._template = {k: (tuple(np.asarray(v).shape), np.asarray(v).dtype) for k, v in zero.items()}
            bad = [k for k, (_, dt) in self._template.items() if dt != np.float32]
            if bad:
                raise ConfigError(f"compression.codec={self.codec.name!r} has non-fp32 payload arrays {bad}; "
                                  f"sketched_dp sums payloads, so it needs a linear fp32 sketch")
        return self._template

    def _template_size(self, server_round: int) -> int:
        return int(sum(int(np.prod(shape)) for shape, _ in self._payload_template(server_round).values()))

    def _unpack(self, vector: torch.Tensor) -> dict[str, np.ndarray]:
        out, start = {}, 0
        array = vector.numpy()
        for key in sorted(self._template):
            shape, _ = self._template[key]
            size = int(np.prod(shape))
            out[key] = array[start:start + size].reshape(shape).astype(np.float32, copy=True)
            start += size
        return out


def build_sketched_dp(options: SketchedDPOptions, cfg) -> SketchedDPStrategy:
    codec_name = cfg.compression.codec
    try:
        codec = make_codec(codec_name, **cfg.compression.options())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad compression.* for codec {codec_name!r}: {err}") from None
    if not summable(codec):
        raise ConfigError(f"strategy 'sketched_dp' sums client payloads before decoding, but compression.codec="
                          f"{codec_name!r} is not linear (its payloads cannot be added); use a linear sketch: "
                          f"gaussian, srht, sparsejl, rademacher, countsketch (or dense)")
    if options.desketch in ("adjoint", "topk") and not hasattr(codec, "adjoint_decode"):
        raise ConfigError(f"strategy.desketch={options.desketch!r} needs compression.codec='countsketch', "
                          f"got {codec_name!r}; use desketch='decode'")
    if cfg.privacy.enabled and cfg.privacy.site == "central":
        raise ConfigError("strategy 'sketched_dp' clips and noises in sketch space: set privacy.site='sketch' "
                          "(server adds the noise to the mean sketch) or 'local' (clients noise their sketches); "
                          "'central' means parameter-space clipping (use strategy fedavg for that)")
    plan = privacy_plan(cfg)
    runtime = PrivacyRuntime(plan, own_selection=chooses_own_clients(SketchedDPStrategy))
    strategy = SketchedDPStrategy(desketch=options.desketch, topk=options.topk, server_lr=options.server_lr,
                                  runtime=runtime)
    if plan.epsilon_budget is not None:
        fits = runtime.accountant.rounds_within_budget(plan.epsilon_budget, max_rounds=max(cfg.run.rounds, 1))
        if fits < cfg.run.rounds:
            log.warning("privacy.epsilon_budget=%g allows %d of run.rounds=%d rounds; the run will stop there",
                        plan.epsilon_budget, fits, cfg.run.rounds)
    return strategy


register_strategy(StrategySpec(
    "sketched_dp", build_sketched_dp, SketchedDPOptions,
    "Sketched DP-FedAvg: clients clip (and optionally noise) a linear sketch RΔ; the server averages sketches, "
    "adds N(0,(zC/D)²) in sketch space (privacy.site='sketch'), de-sketches once; ε accounted per round"))
