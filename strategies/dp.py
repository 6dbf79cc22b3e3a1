"""Client-level differential privacy for any update-sending strategy (DP-FedAvg and friends).

``build_strategy`` calls :func:`make_private` when ``privacy.clip`` or
``privacy.noise_multiplier`` is set; the strategy object then gets :class:`DPFedAvgMixin` in
front of its own class, so its round protocol and aggregation stay as they are and only
the privacy duties are added.

Mechanism (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models"), with ``C`` = ``privacy.clip``, ``z`` = ``privacy.noise_multiplier``:

- **client duty** (``client/privacy_hooks.py``, driven by the ``dp-*`` config entries this
  strategy sends): clip Δ to ``‖Δ‖ ≤ C`` (per layer to ``C/√L`` with ``privacy.per_layer``)
  before encoding; with ``privacy.site = "local"`` also add ``N(0, (zC)²)`` itself.
- **server duty** (``site = "central"``): re-clip every decoded Δ to ``C`` (a client that did
  not clip, or a lossy codec, cannot raise the sensitivity), weight clients uniformly and
  release ``ΣΔ_i / D + N(0, (zC/D)²·I)`` with a *fixed* denominator ``D``:
  ``D = q·N`` (the expected cohort) under Poisson sampling, ``D = m`` (the sampled cohort)
  otherwise. The sum of clipped updates changes by at most ``C`` when one client is added or
  removed, so the noise is ``z`` times the sensitivity, which is what the accountant assumes.
  Dividing by the *realised* Poisson cohort size instead would make the denominator itself
  depend on who participated; a fixed ``D`` keeps the estimator's sensitivity at ``C/D``
  (dropped replies simply contribute 0 to the sum).
- **sampling** matches the accounted scheme: ``poisson`` — each client joins independently
  with probability ``q = federation.fraction_train`` (a private RNG from (seed, round)), so
  cohort sizes vary; ``fixed`` — exactly ``m = ⌊q·N⌋`` clients without replacement;
  ``none`` — every client every round (``fraction_train`` must be 1).
- **accounting** (:class:`stamen.privacy.accounting.Accountant`, Google dp-accounting, RDP or
  PLD): one sampled-Gaussian event per round; ε at ``privacy.delta`` goes into every
  metrics.jsonl row (``epsilon``), the accountant's description into summary.json, and the
  run stops *before* a round that would take ε above ``privacy.epsilon_budget``
  (``summary["stopped"]``). The accountant's round count is checkpointed, so a resumed run
  continues the same ε sequence.

How the noise reaches the strategy's own aggregation: the server adds the *same* noise vector
ξ to every accepted client's (clipped, rescaled) update. The strategy's weighted mean with
uniform weights then yields ``mean + ξ`` exactly, and what a server optimizer (FedAdam,
FedAvgM, a global learning rate) does afterwards is post-processing. Strategies whose
aggregate is not a mean (median, Krum, trimmed mean) have sensitivity larger than ``C/D``
and are refused for central noise.

``site = "local"``: the server only checks that replies carry the clipping bit; each client's
release is a Gaussian mechanism on its own. The reported ``epsilon`` is then the (loose)
guarantee of the released model under the same sampled accounting; summary.json adds
``local_epsilon``, what the untrusted server itself learns about the client who participated
most: ``k`` Gaussian releases of multiplier ``z/2`` (replace-one: two clipped updates differ by
up to ``2C``), without amplification (the server knows who it sampled).

Adaptive clipping (``privacy.adaptive_clip``; Andrew, Thakkar, McMahan, Ramaswamy 2021):
clients report whether their update fit inside ``C`` (``dp-unclipped``); the server adds
``N(0, σ_b²)`` to the centred count ``Σ(b_i − 1/2)`` (sensitivity 1/2; ``σ_b =
privacy.adaptive_count_noise``, default ``D/20`` as in the paper), divides by ``D``, and moves
``C`` geometrically toward the target quantile. The update noise uses
``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`` so that both releases together cost what one Gaussian query
with multiplier ``z`` costs; the accountant is driven with ``z``.

Not covered: the metrics a reply carries (``num-examples``, ``train_loss``) are not privatized.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stamen import protocol as P
from stamen.config import ConfigError
from stamen.privacy.accounting import Accountant
from stamen.privacy.clipping import geometric_clip_update, l2_clip, update_noise_multiplier_for_adaptive_clipping
from stamen.sketching.codec import derive_seed
from stamen.strategies.base import StamenStrategy, sample_count

log = logging.getLogger("stamen.strategy.dp")

DP_CLIP, DP_SPACE, DP_LOCAL_NOISE_STD, DP_PER_LAYER, DP_UNCLIPPED = (
    "dp-clip", "dp-space", "dp-local-noise-std", "dp-per-layer", "dp-unclipped")


def finite_or_none(x: float | None) -> float | None:
    """JSON-safe ε: ``None`` stands for ∞ (no noise means no guarantee)."""
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class PrivacyPlan:
    """``privacy.*`` resolved against the federation: what is clipped, noised, sampled and accounted."""

    clip: float | None
    noise_multiplier: float
    site: str
    delta: float
    accountant: str
    sampling: str
    population: int  # N
    q: float  # sampling probability (fixed: m/N; none: 1)
    cohort: int | None  # m for fixed sampling
    epsilon_budget: float | None
    per_layer: bool
    adaptive_clip: bool
    adaptive_quantile: float
    adaptive_lr: float
    count_noise: float  # σ_b of the unclipped-count noise (adaptive clipping)

    @property
    def enabled(self) -> bool:
        return self.clip is not None or self.noise_multiplier > 0

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ: z itself, or the larger multiplier adaptive clipping leaves for the updates."""
        if not self.adaptive_clip or self.noise_multiplier == 0:
            return self.noise_multiplier
        return update_noise_multiplier_for_adaptive_clipping(self.noise_multiplier, self.count_noise)

    def describe(self) -> dict[str, Any]:
        return {"clip": self.clip, "noise_multiplier": self.noise_multiplier,
                "update_noise_multiplier": self.update_noise_multiplier, "site": self.site,
                "per_layer": self.per_layer, "adaptive_clip": self.adaptive_clip,
                "adaptive_quantile": self.adaptive_quantile if self.adaptive_clip else None,
                "adaptive_lr": self.adaptive_lr if self.adaptive_clip else None,
                "adaptive_count_noise": self.count_noise if self.adaptive_clip else None,
                "population": self.population, "epsilon_budget": self.epsilon_budget,
                "denominator": ("mean over replies (each client noises its own update)" if self.site == "local"
                                else "expected cohort q*N (fixed, Poisson sampling)" if self.sampling == "poisson"
                                else "sampled cohort m (fixed)")}


def privacy_plan(cfg) -> PrivacyPlan:
    """Resolve and cross-check ``privacy.*`` with ``federation.*``; ConfigError names the key."""
    p, fed = cfg.privacy, cfg.federation
    n, frac = int(fed.clients), float(fed.fraction_train)
    clip = None if p.clip == "none" else float(p.clip)
    if p.enabled and p.sampling == "none" and frac != 1.0:
        raise ConfigError(f"privacy.sampling='none' accounts every client in every round, but "
                          f"federation.fraction_train={frac}; set fraction_train=1.0 or use sampling 'poisson'/'fixed'")
    if p.enabled and p.sampling == "fixed" and p.accountant == "pld":
        raise ConfigError("privacy.accountant='pld' does not support privacy.sampling='fixed' (no without-replacement "
                          "amplification in dp-accounting's PLD); use accountant 'rdp' or sampling 'poisson'")
    cohort = sample_count(frac, n) if p.sampling == "fixed" else None
    q = {"poisson": frac, "fixed": (cohort or 0) / n, "none": 1.0}[p.sampling]
    expected = q * n
    count_noise = (expected / 20.0 if p.adaptive_count_noise == "auto" else float(p.adaptive_count_noise))
    if p.noise_multiplier == 0 and p.adaptive_count_noise == "auto":
        count_noise = 0.0
    plan = PrivacyPlan(clip=clip, noise_multiplier=float(p.noise_multiplier), site=p.site, delta=float(p.delta),
                       accountant=p.accountant, sampling=p.sampling, population=n, q=q, cohort=cohort,
                       epsilon_budget=None if p.epsilon_budget == "none" else float(p.epsilon_budget),
                       per_layer=bool(p.per_layer), adaptive_clip=bool(p.adaptive_clip),
                       adaptive_quantile=float(p.adaptive_quantile), adaptive_lr=float(p.adaptive_lr),
                       count_noise=count_noise)
    try:
        plan.update_noise_multiplier
    except ValueError as err:
        raise ConfigError(f"privacy.adaptive_count_noise={count_noise:g} is too small for privacy.noise_multiplier="
                          f"{plan.noise_multiplier:g}: {err}") from None
    return plan


class PrivacyRuntime:
    """What a private strategy carries across rounds: the plan, the accountant, the current clip norm."""

    def __init__(self, plan: PrivacyPlan, own_selection: bool = False):
        self.plan = plan
        self.own_selection = own_selection  # the strategy picks clients itself (sampling 'none')
        self.accountant = Accountant(plan.noise_multiplier, plan.delta, plan.accountant, plan.sampling,
                                     sampling_probability=plan.q if plan.sampling == "poisson" else None,
                                     cohort_size=plan.cohort, population_size=plan.population)
        self.clip = plan.clip
        self.participation: dict[int, int] = {}
        self.last_unclipped_fraction: float | None = None
        self.last_noise_std = 0.0
        # per round, not checkpointed
        self.cohort = 0
        self.unclipped = 0  # replies whose update fit inside C
        self.reported = 0  # replies that carried the bit
        self.decoded_round = 0  # the last round whose replies went through decode_replies

    def denominator(self) -> float:
        """The fixed denominator D of this round's mean: q·N (Poisson) or the sampled cohort size."""
        if self.plan.sampling == "poisson":
            return self.plan.q * self.plan.population
        return float(max(self.cohort, 1))

    def central_noise_std(self) -> float:
        """Std of the noise on the released mean: ``z_Δ·C/D``."""
        if self.plan.noise_multiplier == 0 or self.clip is None:
            return 0.0
        return self.plan.update_noise_multiplier * self.clip / self.denominator()

    def local_noise_std(self) -> float:
        return self.plan.noise_multiplier * self.clip if self.plan.site == "local" and self.clip else 0.0

    def after_round(self, seed: int, server_round: int, participants: list[int]) -> None:
        """Compose the round into the accountant; move the clip norm (adaptive clipping)."""
        self.accountant.step()
        for pid in participants:
            self.participation[pid] = self.participation.get(pid, 0) + 1
        if self.plan.adaptive_clip and self.clip is not None:
            noise = 0.0
            if self.plan.count_noise > 0:
                g = torch.Generator().manual_seed(derive_seed(seed, server_round, "dp-count-noise"))
                noise = float(torch.randn((), generator=g, dtype=torch.float64)) * self.plan.count_noise
            # Andrew et al.: centred bits (b - 1/2) make the count's sensitivity 1/2 under add/remove,
            # which is what the z_Δ formula assumes; the fixed denominator D keeps it there.
            fraction = (self.unclipped - 0.5 * self.reported + noise) / self.denominator() + 0.5
            self.last_unclipped_fraction = fraction
            self.clip = max(geometric_clip_update(self.clip, fraction, self.plan.adaptive_quantile,
                                                  self.plan.adaptive_lr), 1e-12)

    def local_epsilon(self) -> float | None:
        """ε the untrusted server learns about the most frequent participant (site='local')."""
        k = max(self.participation.values(), default=0)
        if k == 0:
            return 0.0
        acc = Accountant(self.plan.noise_multiplier / 2.0, self.plan.delta, self.plan.accountant, "none")
        return finite_or_none(acc.epsilon_after(k))

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "clip": self.clip,
                "participation": dict(self.participation), "last_unclipped_fraction": self.last_unclipped_fraction,
                "last_noise_std": self.last_noise_std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.clip = state["clip"]
        self.participation = dict(state["participation"])
        self.last_unclipped_fraction = state["last_unclipped_fraction"]
        self.last_noise_std = state["last_noise_std"]


class PrivateStrategyBase:
    """Sampling, accounting, budget stop, metrics and checkpoint state shared by private strategies.

    Expects ``self._dp`` (a :class:`PrivacyRuntime`) and sits before :class:`StamenStrategy`
    in the MRO. ``_dp`` is transient: its state travels in ``state_dict()["dp"]``.
    """

    _dp: PrivacyRuntime

    # -- sampling ------------------------------------------------------------------------
    def sample_partitions(self, server_round: int, fraction: float, purpose: str = "train") -> list[int]:
        if purpose != "train" or not self._dp.plan.enabled:
            return super().sample_partitions(server_round, fraction, purpose)
        plan = self._dp.plan
        if plan.sampling == "poisson":
            pids = sorted(self.nodes)
            rng = np.random.default_rng(derive_seed(self.seed, server_round, "dp-poisson-sample"))
            chosen = [pid for pid, u in zip(pids, rng.random(len(pids))) if u < plan.q]
        elif plan.sampling == "none" and not self._dp.own_selection:
            chosen = sorted(self.nodes)
        else:  # fixed: Stamen's seeded m-without-replacement; none + a selector: the selector's choice
            chosen = super().sample_partitions(server_round, fraction, purpose)
        self._dp.cohort = len(chosen)
        return chosen

    # -- hooks of the round loop ---------------------------------------------------------
    def stop_reason(self, server_round: int) -> str | None:
        reason = super().stop_reason(server_round)
        budget = self._dp.plan.epsilon_budget
        if reason or budget is None:
            return reason
        acc = self._dp.accountant
        if acc.would_exceed(budget, 1):
            return (f"privacy.epsilon_budget={budget:g} reached: round {server_round} would raise epsilon from "
                    f"{acc.epsilon():.4g} to {acc.epsilon_after(acc.rounds + 1):.4g} (delta={acc.delta:g}, "
                    f"{acc.kind}, {acc.sampling} sampling)")
        return None

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        out = dict(super().round_metrics(server_round))
        if not self._dp.plan.enabled:
            return out
        out.update(epsilon=finite_or_none(self._dp.accountant.epsilon()), dp_clip=self._dp.clip,
                   dp_noise_std=self._dp.last_noise_std, dp_cohort=self._dp.cohort)
        if self._dp.plan.adaptive_clip:
            out["dp_unclipped_fraction"] = self._dp.last_unclipped_fraction
        return out

    def summary_metrics(self) -> dict[str, Any]:
        out = dict(super().summary_metrics())
        if not self._dp.plan.enabled:
            return out
        acc = self._dp.accountant
        description = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in acc.describe().items()}
        privacy = {**description, **self._dp.plan.describe(), "final_clip": self._dp.clip}
        if self._dp.plan.noise_multiplier == 0:
            privacy["note"] = "no noise (privacy.noise_multiplier = 0): clipping only, epsilon is infinite"
        if self._dp.plan.site == "local":
            privacy["local_epsilon"] = self._dp.local_epsilon()
            privacy["local_epsilon_meaning"] = ("epsilon against the server of the most frequent participant: "
                                                "k Gaussian releases with multiplier z/2 (replace-one), no amplification")
        out.update(epsilon=finite_or_none(acc.epsilon()), delta=acc.delta, privacy=privacy)
        return out

    # -- replies ---------------------------------------------------------------------------
    def check_privacy_bit(self, metrics: dict[str, Any]) -> None:
        """Every reply must say the client clipped (the ``dp-unclipped`` bit); count the bits."""
        if self._dp.clip is None:
            return
        bit = metrics.get(DP_UNCLIPPED)
        if bit not in (0, 1, 0.0, 1.0):
            raise ValueError(f"reply lacks the {DP_UNCLIPPED!r} bit: the client did not apply the privacy hook "
                             f"(client/privacy_hooks.py)")
        self._dp.unclipped += int(bit)
        self._dp.reported += 1

    def finish_private_round(self, server_round: int) -> None:
        self._dp.after_round(self.seed, server_round, list(self.last_participants))

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["dp"] = self._dp.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        dp = state.pop("dp", None)
        if dp is None and self._dp.plan.enabled:
            raise ValueError("checkpoint has no privacy state (it was written without privacy.*)")
        if dp is not None:
            self._dp.load_state_dict(dp)
        super().load_state_dict(state)


def chooses_own_clients(cls: type) -> bool:
    """Whether a strategy class picks clients itself (then only sampling 'none' is accountable)."""
    return any("sample_partitions" in vars(c) for c in cls.__mro__
               if c not in (StamenStrategy, PrivateStrategyBase) and not issubclass(PrivateStrategyBase, c))


class DPFedAvgMixin(PrivateStrategyBase):
    """Clip on the client, re-clip + same-ξ noise + fixed denominator on the server (module docstring)."""

    def client_instructions(self, server_round: int) -> dict[str, Any]:
        out = dict(super().client_instructions(server_round))
        if self._dp.clip is not None:
            out.update({DP_CLIP: float(self._dp.clip), DP_SPACE: "update", DP_PER_LAYER: self._dp.plan.per_layer})
            if self._dp.local_noise_std() > 0:
                out[DP_LOCAL_NOISE_STD] = float(self._dp.local_noise_std())
        return out

    def check_reply(self, msg, server_round: int):
        pid, delta, metrics = super().check_reply(msg, server_round)
        self.check_privacy_bit(metrics)
        if self._dp.plan.site == "central" and self._dp.clip is not None:
            delta = l2_clip(delta, self._dp.clip)  # server-side enforcement of the sensitivity
        return pid, delta, {**metrics, P.NUM_EXAMPLES: 1}  # uniform weights: sensitivity C/D

    def decode_replies(self, server_round: int, replies):
        self._dp.unclipped = self._dp.reported = 0
        self._dp.decoded_round = server_round
        accepted = super().decode_replies(server_round, replies)
        self._dp.last_noise_std = 0.0
        if self._dp.plan.site != "central":
            return accepted
        std = self._dp.central_noise_std()
        self._dp.last_noise_std = std
        scale = np.float32(len(accepted) / self._dp.denominator())
        noise = self._central_noise(server_round, std)
        for e in accepted:  # each update becomes scale·Δ + ξ: the uniform mean is then ΣΔ/D + ξ
            e.delta = (e.delta if scale == 1.0 else e.delta * float(scale)) + noise
        return accepted

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        plan = self._dp.plan
        if plan.site == "central" and plan.noise_multiplier > 0 and self._dp.decoded_round != server_round:
            raise RuntimeError(
                f"{type(self).__name__[2:]} aggregated round {server_round} without StamenStrategy.decode_replies, so "
                f"the server could not clip and noise the updates (no DP guarantee); use privacy.site='local', or "
                f"strategy 'sketched_dp' for sketched updates")
        if arrays is None and plan.site == "central" and self._dp.last_noise_std > 0:
            # An empty (Poisson) cohort still releases ΣΔ/D + noise = noise; skipping it would reveal
            # that nobody took part. A server optimizer is bypassed in this rare case.
            log.warning("round %d: empty cohort; releasing the noise-only update", server_round)
            noise = self._central_noise(server_round, self._dp.last_noise_std)
            arrays = P.to_array_record(self.layout.unflatten(self.layout.flatten(self._global) + noise))
        self.finish_private_round(server_round)
        return arrays, metrics

    # -- helpers ---------------------------------------------------------------------------
    def _central_noise(self, server_round: int, std: float) -> torch.Tensor:
        """ξ ~ N(0, std²·I_d) (flat) from the server's private generator."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, server_round, "dp-central-noise"))
        return torch.randn(self.layout.d, generator=g, dtype=torch.float32).mul_(std)


_PRIVATE_CLASSES: dict[type, type] = {}


def make_private(strategy: StamenStrategy, spec, cfg) -> StamenStrategy:
    """Give ``strategy`` the privacy duties ``cfg.privacy`` asks for (see the module docstring).

    Strategies with ``handles_privacy = True`` (``sketched_dp``) implement the mechanism
    themselves and are returned unchanged.
    """
    if getattr(strategy, "handles_privacy", False) or not cfg.privacy.enabled:
        return strategy
    name = cfg.strategy.name
    if not getattr(spec, "sends_updates", True):
        raise ConfigError(f"privacy.* is set but strategy {name!r} sends no model updates to clip and noise")
    if cfg.privacy.site == "sketch":
        raise ConfigError(f"privacy.site='sketch' (clip and noise in sketch space) is implemented by "
                          f"strategy.name='sketched_dp', not {name!r}; use site 'central' or 'local'")
    plan = privacy_plan(cfg)
    if plan.site == "central" and plan.noise_multiplier > 0:
        rule = getattr(strategy, "aggregator", "mean")  # a robust rule: one client can move it by more than C/D
        if rule != "mean":
            raise ConfigError(f"privacy.site='central' noise is calibrated to a mean of clipped updates (sensitivity "
                              f"C/D), but strategy {name!r} aggregates with {rule}; use strategy.aggregator='mean' with a "
                              f"mean-based strategy (fedavg, fedprox, fedadam, fedavgm, ...) or site 'local'")
    if plan.sampling != "none" and chooses_own_clients(type(strategy)):
        raise ConfigError(f"strategy {name!r} chooses its own clients, so privacy.sampling={plan.sampling!r} "
                          f"(random sampling amplification) does not hold; use privacy.sampling='none'")
    if cfg.compression.codec != "dense" and plan.site == "central":
        log.warning("privacy with codec %r: the server clips each *decoded* update to C; for sketches this "
                    "shrinks them (use strategy 'sketched_dp', which clips and noises in sketch space)",
                    cfg.compression.codec)
    base = type(strategy)
    if base not in _PRIVATE_CLASSES:
        _PRIVATE_CLASSES[base] = type(f"DP{base.__name__}", (DPFedAvgMixin, base),
                                      {"_transient": tuple(base._transient) + ("_dp",), "__doc__": base.__doc__})
    strategy.__class__ = _PRIVATE_CLASSES[base]
    strategy._dp = PrivacyRuntime(plan, own_selection=chooses_own_clients(base))
    budget = plan.epsilon_budget
    if budget is not None:
        fits = strategy._dp.accountant.rounds_within_budget(budget, max_rounds=max(cfg.run.rounds, 1))
        if fits < cfg.run.rounds:
            log.warning("privacy.epsilon_budget=%g allows %d of run.rounds=%d rounds; the run will stop there",
                        budget, fits, cfg.run.rounds)
    return strategy
