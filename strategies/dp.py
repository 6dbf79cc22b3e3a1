"""The privacy stage of the round pipeline: client-level differential privacy for any strategy
that declares the site (DP-FedAvg in parameter space, sketched DP in sketch space).

On when ``privacy.clip`` or ``privacy.noise_multiplier`` / ``privacy.target_epsilon`` is set.
Mechanism (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018; sketch space: Song, Wang, Yu, Zhang, "Sketching for
First Order Method", ICML 2023), with ``C`` = ``privacy.clip``, ``z`` the noise multiplier:

- **client duty** (``client/privacy_hooks.py``, driven by :meth:`PrivacyStage.instructions`):
  clip what it sends to ``‖·‖ ≤ C`` — the update Δ before encoding (``dp-space = update``,
  strategies that aggregate decoded updates; per layer to ``C/√L`` with ``privacy.per_layer``)
  or the codec payload, e.g. the sketch RΔ (``dp-space = payload``, strategies that aggregate
  in sketch space). With ``privacy.site = "local"`` the client also adds ``N(0, (zC)²)`` itself,
  drawn from its own OS entropy: the server never sees that noise's seed.
- **server duty** (``site = "central"`` for updates, ``"sketch"`` for sketches): re-clip every
  decoded contribution to ``C`` (a client that did not clip, or a lossy codec, cannot raise the
  sensitivity), weight clients uniformly and release ``Σ v_i / D + N(0, (zC/D)²·I)`` with a
  *fixed* denominator ``D``: ``q·N`` under Poisson sampling, ``m`` for a fixed cohort, ``N``
  without sampling (:class:`NoisySum`, the pipeline's aggregate stage under DP). The sum of
  clipped contributions moves by at most ``C`` when one client is added or removed, so the
  noise is ``z`` times the sensitivity, which is what the accountant assumes; dropped replies
  contribute 0 and keep it there. A sketch is public and fixed for the round, so clipping it in
  sketch space bounds the sensitivity of the sum of sketches whatever R is; de-sketching, a
  server optimizer (FedAdam, FedAvgM, FetchSGD's momentum) and a global learning rate are
  post-processing.
- **sampling** matches the accounted scheme and is secret: ``poisson`` — each client joins
  independently with probability ``q = federation.fraction_train``; ``fixed`` — exactly
  ``m = ⌊q·N⌋`` clients without replacement; ``none`` — every client every round. Poisson and
  fixed samples are drawn from OS entropy (:class:`stamen.privacy.noise.SecretNoise`): a
  sample anyone could predict from ``run.seed`` would not amplify anything.
- **noise** comes from OS entropy too (every draw seeds a fresh private generator from
  ``secrets``). ``privacy.reproducible_noise = true`` keeps the old seeded noise for debugging;
  every output of such a run then says ε is not a guarantee.
- **accounting** (:class:`stamen.privacy.accounting.Accountant`, Google dp-accounting, RDP
  or PLD): one sampled-Gaussian event per round; ε at ``privacy.delta`` in every metrics
  line, the accountant and what ε covers in summary.json, and the run stops *before* a round
  that would take ε above ``privacy.epsilon_budget``. ``privacy.target_epsilon`` chooses ``z``
  instead: the smallest multiplier whose ``run.rounds`` rounds stay within the target (the
  configured accountant, sampling and δ); the chosen ``z`` goes into summary.json.
- **adaptive clipping** (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
  with Adaptive Clipping", NeurIPS 2021): clients report whether their update fit inside C
  (``dp-unclipped``); the server adds ``N(0, σ_b²)`` to the centred count ``Σ(b_i − 1/2)``
  (sensitivity 1/2; ``σ_b = privacy.adaptive_count_noise``, default ``D/20``), divides by D and
  moves C geometrically toward the target quantile. The update noise uses
  ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`` so both releases together cost one Gaussian query with
  multiplier ``z``; the accountant is driven with ``z``.

``site = "local"``: each client's release is a Gaussian mechanism on its own; the server takes
the plain mean over replies. The reported ``epsilon`` is the guarantee of the released model
under the same sampled accounting; summary.json adds ``local_epsilon``, what the untrusted
server learns about the client who participated most: ``k`` Gaussian releases of multiplier
``z/2`` (replace-one: two clipped updates differ by up to ``2C``), without amplification.

**What ε covers.** Every release that depends on client data is either in the mechanism or
refused before the run starts (``strategies/preflight.py``): data-dependent client selection
(curriculum scores), exploration uploads (FedLEx) and federated evaluation metrics are
refused under DP; client-reported training metrics (``train_loss``) are not written; the
operational counts in metrics.jsonl (``clients``, ``rejected``, bytes) are the server
operator's view and are listed in summary.json as outside the guarantee.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from stamen.config import ConfigError
from stamen.privacy.clipping import geometric_clip_update, l2_clip, update_noise_multiplier_for_adaptive_clipping
from stamen.privacy.noise import NOT_A_GUARANTEE, NoiseSource, noise_source
from stamen.schema import train as T
from stamen.strategies.method import Combiner, WeightedMean
from stamen.strategies.sampling import sample_count, sorted_ids

if TYPE_CHECKING:  # dp-accounting pulls in scipy (≈1.4 s): imported when a run accounts, not at start-up
    from stamen.privacy.accounting import Accountant

log = logging.getLogger("stamen.privacy")

#: privacy.site values by where a strategy aggregates (Capabilities.aggregation)
SERVER_SITE = {"update": "central", "payload": "sketch"}


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
    reproducible: bool = False
    target_epsilon: float | None = None

    @property
    def enabled(self) -> bool:
        return self.clip is not None or self.noise_multiplier > 0

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ: z itself, or the larger multiplier adaptive clipping leaves for the updates."""
        if not self.adaptive_clip or self.noise_multiplier == 0:
            return self.noise_multiplier
        return update_noise_multiplier_for_adaptive_clipping(self.noise_multiplier, self.count_noise)

    @property
    def accounted_sampling(self) -> str:
        """The sampling the accountant assumes: none under the distributed site (the server knows the cohort)."""
        return "none" if self.site == "distributed" else self.sampling

    @property
    def denominator(self) -> float:
        """The fixed denominator D of the released mean."""
        return {"poisson": self.q * self.population, "fixed": float(self.cohort or 1),
                "none": float(self.population)}[self.sampling]

    def make_accountant(self, noise_multiplier: float | None = None) -> Accountant:
        from stamen.privacy.accounting import Accountant

        sampling = self.accounted_sampling
        return Accountant(self.noise_multiplier if noise_multiplier is None else noise_multiplier, self.delta,
                          self.accountant, sampling,
                          sampling_probability=self.q if sampling == "poisson" else None,
                          cohort_size=self.cohort, population_size=self.population)

    def describe(self) -> dict[str, Any]:
        return {"clip": self.clip, "noise_multiplier": self.noise_multiplier,
                "update_noise_multiplier": self.update_noise_multiplier, "site": self.site,
                "per_layer": self.per_layer, "adaptive_clip": self.adaptive_clip,
                "adaptive_quantile": self.adaptive_quantile if self.adaptive_clip else None,
                "adaptive_lr": self.adaptive_lr if self.adaptive_clip else None,
                "adaptive_count_noise": self.count_noise if self.adaptive_clip else None,
                "population": self.population, "epsilon_budget": self.epsilon_budget,
                "target_epsilon": self.target_epsilon, "reproducible_noise": self.reproducible,
                "noise_source": ("seeded from run.seed (NOT a guarantee)" if self.reproducible
                                 else "OS entropy (secrets), a fresh seed per draw"),
                "denominator": ("mean over replies (each client noises its own update)" if self.site == "local"
                                else "the secure sum over its survivors (the noise is in the sum)"
                                if self.site == "distributed"
                                else f"fixed D = {self.denominator:g} ({self.sampling} sampling)")}


def privacy_plan(cfg, calibrate: bool = True) -> PrivacyPlan:
    """Resolve and cross-check ``privacy.*`` with ``federation.*``; ConfigError names the key.

    ``calibrate``: choose z for ``privacy.target_epsilon`` (a root search; the preflight's
    cheap pass skips it).
    """
    p, fed = cfg.privacy, cfg.federation
    n, frac = int(fed.clients), float(fed.fraction_train)
    clip = None if p.clip == "none" else float(p.clip)
    cohort = sample_count(frac, n) if p.sampling == "fixed" else None
    q = {"poisson": frac, "fixed": (cohort or 0) / n, "none": 1.0}[p.sampling]
    target = None if p.target_epsilon == "none" else float(p.target_epsilon)
    budget = None if p.epsilon_budget == "none" else float(p.epsilon_budget)
    z = float(p.noise_multiplier)
    plan = PrivacyPlan(clip=clip, noise_multiplier=z, site=p.site, delta=float(p.delta), accountant=p.accountant,
                       sampling=p.sampling, population=n, q=q, cohort=cohort,
                       epsilon_budget=budget if budget is not None else target, per_layer=bool(p.per_layer),
                       adaptive_clip=bool(p.adaptive_clip), adaptive_quantile=float(p.adaptive_quantile),
                       adaptive_lr=float(p.adaptive_lr), count_noise=0.0, reproducible=bool(p.reproducible_noise),
                       target_epsilon=target)
    if target is not None and calibrate and plan_problems(cfg) == []:
        from stamen.privacy.accounting import calibrate_noise_multiplier

        try:
            sampling = plan.accounted_sampling
            z = float(calibrate_noise_multiplier(target, cfg.run.rounds, plan.delta, accountant=plan.accountant,
                                                 sampling=sampling,
                                                 sampling_probability=q if sampling == "poisson" else None,
                                                 cohort_size=cohort, population_size=n))
        except ValueError as err:
            raise ConfigError(f"privacy.target_epsilon={target:g}: {err}") from None
        plan = replace(plan, noise_multiplier=z)
    elif target is not None:
        plan = replace(plan, noise_multiplier=1.0)  # a stand-in for the cheap checks; the real z is calibrated later
    count_noise = 0.0
    if plan.adaptive_clip and plan.noise_multiplier > 0:
        count_noise = (plan.denominator / 20.0 if p.adaptive_count_noise == "auto" else float(p.adaptive_count_noise))
    return replace(plan, count_noise=count_noise)


def plan_problems(cfg) -> list[str]:
    """What is wrong with ``privacy.*`` on its own and against ``federation.*`` (messages name the keys)."""
    p, fed = cfg.privacy, cfg.federation
    out = []
    if not p.enabled:
        return out
    n, frac = int(fed.clients), float(fed.fraction_train)
    if p.site == "distributed":
        if not cfg.secagg.enabled:
            out.append("privacy.site='distributed' adds the clients' noise shares under secure aggregation: set "
                       "secagg.enabled=true (or use privacy.site 'central' / 'local')")
        if p.accountant != "rdp":
            out.append("privacy.site='distributed' is accounted in zCDP (Kairouz et al. 2021), which the RDP "
                       "accountant composes exactly; PLD would treat the discrete noise as continuous: use "
                       "privacy.accountant='rdp'")
    elif p.sampling == "none" and frac != 1.0:
        out.append(f"privacy.sampling='none' accounts every client in every round, but federation.fraction_train="
                   f"{frac}; set fraction_train=1.0 or use sampling 'poisson'/'fixed'")
    if p.sampling == "fixed" and p.accountant == "pld":
        out.append("privacy.accountant='pld' does not support privacy.sampling='fixed' (no without-replacement "
                   "amplification in dp-accounting's PLD); use accountant 'rdp' or sampling 'poisson'")
    if p.delta >= 1.0 / n:
        out.append(f"privacy.delta={p.delta:g} must be below 1/federation.clients = {1.0 / n:g}: a δ that large allows "
                   f"the mechanism to reveal one client's data outright (use e.g. delta = {0.1 / n:.1e})")
    if p.target_epsilon != "none" and p.noise_multiplier > 0:
        out.append("privacy.target_epsilon and privacy.noise_multiplier both set: give one (target_epsilon chooses "
                   "the noise multiplier)")
    if p.target_epsilon != "none" and p.epsilon_budget != "none" and float(p.epsilon_budget) < float(p.target_epsilon):
        out.append(f"privacy.epsilon_budget={p.epsilon_budget} is below privacy.target_epsilon={p.target_epsilon}")
    return out


def budget_problems(plan: PrivacyPlan) -> list[str]:
    """A budget that cannot afford even one round is refused (the run would release nothing)."""
    if plan.epsilon_budget is None or plan.noise_multiplier <= 0:
        return []
    one = plan.make_accountant().epsilon_after(1)
    if one > plan.epsilon_budget:
        return [f"privacy.epsilon_budget={plan.epsilon_budget:g} is smaller than one round's epsilon {one:.4g} "
                f"(noise_multiplier={plan.noise_multiplier:g}, delta={plan.delta:g}, {plan.sampling} sampling, "
                f"{plan.accountant}); raise the budget or the noise multiplier"]
    return []


class NoisySum(Combiner):
    """``Σ v_i / D + N(0, std²·I)``: the released aggregate of central (or sketch-space) DP.

    Releases the noise alone for an empty cohort: skipping the round would reveal that nobody
    took part.
    """

    name = "dp-noisy-sum"

    def __init__(self, denominator: float, std: float, noise: NoiseSource, purpose: tuple):
        self.denominator, self.std, self.noise, self.purpose = float(denominator), float(std), noise, purpose

    def combine(self, vectors, weights, size):
        if not vectors and self.std <= 0:
            return None
        out = torch.zeros(size, dtype=torch.float32)
        for v in vectors:
            out.add_(v)
        out.div_(max(self.denominator, 1e-12))
        if self.std > 0:
            out.add_(self.noise.gaussian(size, self.std, *self.purpose))
        return out


class PrivacyStage:
    """Sampling, client instructions, server clipping, noisy aggregation and accounting (module doc).

    ``space``: where the strategy aggregates (``update`` or ``payload``), which decides what
    the clients clip and where the server's noise goes.
    """

    def __init__(self, plan: PrivacyPlan, space: str, *, secure: bool = False):
        # under secure aggregation the clients clip what is summed — the payload vector — and the
        # server's noise (central sites) goes on the unmasked sum of payloads
        self.plan, self.space, self.secure = plan, ("payload" if secure else space), secure
        self.noise = noise_source(plan.reproducible, 0)
        self.accountant = plan.make_accountant()
        self.clip = plan.clip
        self.participation: dict[int, int] = {}
        self.last_unclipped_fraction: float | None = None
        self.last_noise_std = 0.0
        self.cohort = 0
        self._bits = (0, 0)  # (unclipped, reported) of the current round

    def bind_seed(self, seed: int) -> None:
        """Only a reproducible (debugging) noise source uses the run seed."""
        self.noise = noise_source(self.plan.reproducible, seed)

    @property
    def central(self) -> bool:
        return self.plan.site in ("central", "sketch")

    # -- configure --------------------------------------------------------------------------
    def sample(self, server_round: int, pids) -> list[int]:
        """The round's cohort, from secret randomness (module doc, "sampling")."""
        ids = sorted_ids(pids)
        if self.plan.sampling == "poisson":
            u = self.noise.uniform(len(ids), server_round, "dp-poisson-sample")
            chosen = ids[u < self.plan.q].tolist()
        elif self.plan.sampling == "fixed":
            idx = self.noise.numpy_generator(server_round, "dp-fixed-sample").choice(
                len(ids), size=self.plan.cohort, replace=False)
            chosen = sorted(int(i) for i in ids[idx])
        else:
            chosen = ids.tolist()
        self.cohort = len(chosen)
        return chosen

    def instructions(self) -> dict[str, Any]:
        if self.clip is None:
            return {}
        out: dict[str, Any] = {T.DP_CLIP: float(self.clip), T.DP_SPACE: self.space}
        if self.space == "update":
            out[T.DP_PER_LAYER] = self.plan.per_layer
        if self.plan.site == "local" and self.plan.noise_multiplier > 0:
            out[T.DP_LOCAL_NOISE_STD] = float(self.plan.noise_multiplier * self.clip)
            if self.plan.reproducible:
                out[T.DP_REPRODUCIBLE] = True
        return out

    @property
    def required_metrics(self) -> tuple[str, ...]:
        """Every reply must carry the clipping bit: proof the client applied the privacy hook (not under
        secure aggregation, where a per-client bit would reach the server in the clear)."""
        return (T.DP_UNCLIPPED,) if self.clip is not None and not self.secure else ()

    def use_distributed_bound(self, epsilon_round: float) -> None:
        """The distributed site: compose each round as a Gaussian with z_eff = 1/ε_round, the zCDP bound of
        the discrete noise (privacy/distributed.py, "Accounting"), known once the payload size is."""
        z_eff = 1.0 / epsilon_round
        if z_eff < self.plan.noise_multiplier * (1 - 1e-9):
            log.warning("distributed DP: the discrete noise's zCDP bound gives z_eff=%.6g < z=%.6g (raise "
                        "secagg.scale); epsilon is accounted with z_eff", z_eff, self.plan.noise_multiplier)
        rounds = self.accountant.rounds
        self.accountant = self.plan.make_accountant(min(z_eff, self.plan.noise_multiplier))
        self.accountant.rounds = rounds

    def release_sum(self, total, survivors: int, server_round: int, sensitivity: float, sum_noise_std: float = 0.0):
        """The released mean of a secure sum of clipped payloads (secure aggregation): central sites add
        N(0, (z_Δ·Δ₂)²) to the sum and divide by the fixed D; the distributed site's noise (std
        ``sum_noise_std`` in payload units) is already in the sum, which is divided by its survivors."""
        if not self.central:
            self.last_noise_std = sum_noise_std / max(survivors, 1)
            return total / max(survivors, 1)
        return self._noisy_sum(server_round, sensitivity).combine([total], [1.0], total.numel())

    # -- aggregate --------------------------------------------------------------------------
    def privatize(self, accepted: list) -> list[float]:
        """Re-clip each accepted contribution to C (server sites), count the clipping bits;
        return the uniform weights the mechanism uses."""
        unclipped = reported = 0
        for reply in accepted:
            bit = reply.metrics.get(T.DP_UNCLIPPED)
            if bit is not None:
                unclipped, reported = unclipped + int(bit >= 0.5), reported + 1
            if self.central and self.clip is not None:
                reply.contribution = l2_clip(reply.contribution, self.clip)
        self._bits = (unclipped, reported)
        return [1.0] * len(accepted)

    def combiner(self, server_round: int) -> Combiner:
        if not self.central:
            self.last_noise_std = 0.0
            return WeightedMean()  # local DP: the plain mean over replies (post-processing)
        return self._noisy_sum(server_round, self.clip)

    def _noisy_sum(self, server_round: int, sensitivity: float | None) -> NoisySum:
        """The central sites' release: Σ/D + N(0, (z·Δ₂/D)²), Δ₂ the sensitivity of one client's term."""
        std = 0.0
        if self.plan.noise_multiplier > 0 and sensitivity is not None:
            std = self.plan.update_noise_multiplier * sensitivity / self.plan.denominator
        self.last_noise_std = std
        return NoisySum(self.plan.denominator, std, self.noise, (server_round, f"dp-{self.plan.site}-noise"))

    def after_round(self, server_round: int, participants: list[int]) -> None:
        """Compose the round into the accountant; move the clip norm (adaptive clipping)."""
        self.accountant.step()
        for pid in participants:
            self.participation[pid] = self.participation.get(pid, 0) + 1
        if self.plan.adaptive_clip and self.clip is not None:
            unclipped, reported = self._bits
            noise = 0.0
            if self.plan.count_noise > 0:
                noise = float(self.noise.gaussian(1, self.plan.count_noise, server_round, "dp-count-noise")[0])
            # centred bits (b − 1/2): the count's sensitivity is 1/2 under add/remove (Andrew et al.)
            fraction = (unclipped - 0.5 * reported + noise) / self.plan.denominator + 0.5
            self.last_unclipped_fraction = fraction
            self.clip = max(geometric_clip_update(self.clip, fraction, self.plan.adaptive_quantile,
                                                  self.plan.adaptive_lr), 1e-12)

    def stop_reason(self, server_round: int) -> str | None:
        budget, acc = self.plan.epsilon_budget, self.accountant
        if budget is None or self.plan.noise_multiplier <= 0 or not acc.would_exceed(budget, 1):
            return None
        return (f"privacy.epsilon_budget={budget:g} reached: round {server_round} would raise epsilon from "
                f"{acc.epsilon():.4g} to {acc.epsilon_after(acc.rounds + 1):.4g} (delta={acc.delta:g}, "
                f"{acc.kind}, {acc.sampling} sampling)")

    # -- records ----------------------------------------------------------------------------
    def local_epsilon(self) -> float | None:
        """ε the untrusted server learns about the most frequent participant (site='local')."""
        k = max(self.participation.values(), default=0)
        if k == 0:
            return 0.0
        from stamen.privacy.accounting import Accountant

        acc = Accountant(self.plan.noise_multiplier / 2.0, self.plan.delta, self.plan.accountant, "none")
        return finite_or_none(acc.epsilon_after(k))

    def round_metrics(self) -> dict[str, Any]:
        out = {"epsilon": finite_or_none(self.accountant.epsilon()), "dp_clip": self.clip,
               "dp_noise_std": self.last_noise_std, "dp_cohort": self.cohort}
        if self.plan.adaptive_clip:
            out["dp_unclipped_fraction"] = self.last_unclipped_fraction
        if self.plan.reproducible:
            out["epsilon_is_guarantee"] = False
        return out

    def summary(self) -> dict[str, Any]:
        acc = self.accountant
        description = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in acc.describe().items()}
        guarantee = self.plan.noise_multiplier > 0 and not self.plan.reproducible
        privacy = {**description, **self.plan.describe(), "final_clip": self.clip,
                   "epsilon_is_guarantee": guarantee, "covers": self.covers(),
                   "outside_the_guarantee": ["operational counts in metrics.jsonl (clients, dp_cohort, rejected, "
                                             "bytes, wall time): the server operator's view, not for publication"],
                   "withheld": ["client-reported training metrics (train_loss) are not written under DP"]}
        if self.plan.target_epsilon is not None:
            privacy["calibrated_noise_multiplier"] = self.plan.noise_multiplier
        if self.plan.noise_multiplier == 0:
            privacy["note"] = "no noise (privacy.noise_multiplier = 0): clipping only, epsilon is infinite"
        if self.plan.reproducible:
            privacy["note"] = NOT_A_GUARANTEE
        if self.plan.site == "local":
            privacy["local_epsilon"] = self.local_epsilon()
            privacy["local_epsilon_meaning"] = ("epsilon against the server of the most frequent participant: "
                                                "k Gaussian releases with multiplier z/2 (replace-one), no amplification")
        return {"epsilon": finite_or_none(acc.epsilon()), "delta": acc.delta, "privacy": privacy}

    def covers(self) -> list[str]:
        if self.plan.site == "distributed":
            return ["the secure sum of the clients' payloads: each clipped to C, scaled, stochastically rounded, "
                    "with discrete Gaussian noise shares added by every client before masking (Kairouz et al. 2021; "
                    "zCDP composed as an unsampled Gaussian, no amplification); the server never sees one payload"]
        where = {"central": "by the server in parameter space", "sketch": "by the server in sketch space",
                 "local": "by each client"}[self.plan.site]
        if self.secure:
            where = "by the server to the secure sum of payloads (C + √d/γ sensitivity after rounding)"
        out = [f"model updates: clipped to C ({self.space} space), Gaussian noise added {where}, "
               f"{self.plan.sampling} client sampling, every round composed"]
        if self.plan.adaptive_clip:
            out.append("adaptive clipping's count of unclipped updates (noised, composed into the same query)")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "clip": self.clip,
                "participation": {int(k): int(v) for k, v in self.participation.items()},
                "last_unclipped_fraction": self.last_unclipped_fraction, "last_noise_std": self.last_noise_std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.clip = state["clip"]
        self.participation = {int(k): int(v) for k, v in state["participation"].items()}
        self.last_unclipped_fraction = state["last_unclipped_fraction"]
        self.last_noise_std = state["last_noise_std"]
