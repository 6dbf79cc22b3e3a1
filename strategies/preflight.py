"""The preflight: a whole run config against the chosen strategy's declared capabilities.

:func:`build_pipeline` is the composition root of the server: it builds the strategy's
method, checks the combination (:func:`combination_problems`), and assembles the round
pipeline with its aggregate and privacy stages. It runs before Ray, a SuperLink or any
client process starts (``stamen run`` calls it through ``stamen.experiment.preflight``), so
a combination either runs correctly or is refused with **one** message that lists every
problem, each naming the config keys and what would work instead
(:class:`CombinationError`, exit code 2 on the command line).
"""

from __future__ import annotations

import logging

from stamen.config import ConfigError
from stamen.core import Capabilities
from stamen.sketching.codec import make_codec
from stamen.strategies.dp import SERVER_SITE, PrivacyStage, budget_problems, plan_problems, privacy_plan
from stamen.strategies.method import Method
from stamen.strategies.pipeline import RoundPipeline
from stamen.strategies.registry import StrategySpec, build_method
from stamen.strategies.robust import aggregator_problems, make_combiner
from stamen.strategies.secagg import SecureAggregation

log = logging.getLogger("stamen.preflight")


class CombinationError(ConfigError):
    """A run config whose parts cannot run together; the message lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"this configuration cannot run ({len(self.problems)} problem"
                         f"{'s' if len(self.problems) != 1 else ''}):\n{lines}")


def combination_problems(cfg, spec: StrategySpec, method: Method) -> list[str]:
    """Everything that stops ``cfg`` from running correctly with ``method`` (empty: it can run)."""
    caps, name = method.capabilities, cfg.strategy.name
    return [*_codec_problems(cfg, caps, name, method), *_aggregator_problems(cfg, spec, method, name),
            *_privacy_problems(cfg, spec, method, name), *secagg_problems(cfg, spec, method, name)]


def _codec_problems(cfg, caps: Capabilities, name: str, method: Method) -> list[str]:
    codec, options = cfg.compression.codec, cfg.compression.options()
    if caps.codecs == ():
        if codec not in ("dense", method.codec_name) or options:
            opts = f" with options {sorted(options)}" if options else ""
            return [f"strategy {name!r} encodes updates with its own codec (options under strategy.*); leave "
                    f"compression.* at its default (got compression.codec={codec!r}{opts})"]
        return []
    if caps.codecs is not None and codec not in caps.codecs:
        return [f"strategy {name!r} needs compression.codec in {list(caps.codecs)}, got {codec!r}"
                + (f" ({caps.notes['codecs']})" if "codecs" in caps.notes else "")]
    try:
        make_codec(codec, **options)
    except (TypeError, ValueError) as err:
        return [f"bad compression.* for codec {codec!r}: {err}"]
    return []


def implied_aggregator(spec: StrategySpec, method: Method) -> str:
    """The robust rule a strategy name implies (fedmedian: median), also through a wrapper (FedLEx)."""
    return method.implied_aggregator or spec.aggregator


def _aggregator_problems(cfg, spec: StrategySpec, method: Method, name: str) -> list[str]:
    caps = method.capabilities
    aggregator, problems = aggregator_problems(cfg, implied_aggregator(spec, method))
    if aggregator != "mean" and not caps.robust:
        why = caps.notes.get("robust", f"it aggregates {caps.aggregation}s, not individual decoded updates")
        problems.append(f"strategy.aggregator={aggregator!r} is not available for strategy {name!r}: {why}")
    return problems


def _privacy_problems(cfg, spec: StrategySpec, method: Method, name: str) -> list[str]:
    caps, p = method.capabilities, cfg.privacy
    if not p.enabled:
        return []
    out = plan_problems(cfg)
    keys = "privacy.clip / privacy.noise_multiplier / privacy.target_epsilon"
    if not caps.privacy_sites:
        why = caps.notes.get("privacy", "it has no differential-privacy mechanism")
        out.append(f"{keys} are set but strategy {name!r} cannot be made private: {why}; unset them")
    elif p.site == "distributed":
        pass  # the secure aggregation stage's noise: secagg_problems decides what can combine with it
    elif p.site not in caps.privacy_sites:
        server_site = SERVER_SITE.get(caps.aggregation)
        out.append(f"privacy.site={p.site!r} is not available for strategy {name!r}, which aggregates "
                   f"{'decoded updates in parameter space' if caps.aggregation == 'update' else 'in sketch space'}; "
                   f"use privacy.site in {sorted(caps.privacy_sites)}"
                   + (f" ('{server_site}': the server clips and noises in that space)" if server_site else "")
                   + ("; sketch-space noise is for strategies that aggregate sketches (sketched_dp, "
                      "sketched_fedavg, fetchsgd)" if p.site == "sketch" else ""))
    aggregator, _ = aggregator_problems(cfg, implied_aggregator(spec, method))
    if aggregator != "mean" and p.site in ("central", "sketch"):
        out.append(f"privacy.site={p.site!r} noise is calibrated to a mean of clipped updates (sensitivity C/D), but "
                   f"strategy {name!r} aggregates with {aggregator}, whose sensitivity to one client is larger; use "
                   f"strategy.aggregator='mean' or privacy.site='local'")
    if caps.selection == "data_dependent":
        out.append(f"strategy {name!r} selects clients from what they report about their data "
                   f"({caps.notes.get('selection', 'data-dependent selection')}); that release is neither clipped, "
                   f"noised nor accounted, so {keys} would not be a guarantee"
                   + (f" — {caps.notes['selection_fix']}" if "selection_fix" in caps.notes else ""))
    for release in caps.extra_releases:
        out.append(f"strategy {name!r} releases {release}, which the privacy mechanism does not cover; "
                   + caps.notes.get("release_fix", "unset privacy.* or choose another strategy"))
    if cfg.federation.fraction_evaluate > 0:
        out.append(f"federation.fraction_evaluate={cfg.federation.fraction_evaluate} asks clients for evaluation "
                   f"metrics on their data, which are not privatized; set federation.fraction_evaluate=0 under "
                   f"{keys} (the central evaluation on the server's test set is unaffected)")
    if not out:
        plan = privacy_plan(cfg, calibrate=False)
        try:
            plan.update_noise_multiplier
        except ValueError as err:
            out.append(f"privacy.adaptive_count_noise={plan.count_noise:g} is too small for the noise multiplier "
                       f"{plan.noise_multiplier:g}: {err}")
        if p.target_epsilon == "none":
            out.extend(budget_problems(plan))
    return out


def secagg_problems(cfg, spec: StrategySpec, method: Method, name: str) -> list[str]:
    """Secure aggregation reveals only the sum of payloads: what needs more than that is refused."""
    caps, p, sa = method.capabilities, cfg.privacy, cfg.secagg
    if not sa.enabled:
        return []
    out = []
    if caps.aggregation == "own" or not caps.linear:
        out.append(f"secagg.enabled: strategy {name!r} does not aggregate a sum of payload vectors "
                   f"({caps.notes.get('robust', 'its aggregate is not linear in the replies')}); secure aggregation "
                   f"works with fedavg, fedprox, fedadam, fedavgm, fat, curriculum (without client "
                   f"selection), sketched_fedavg, fetchsgd and sketched_dp")
    elif caps.aggregation == "update" and not _linear_codec(cfg):
        out.append(f"secagg.enabled: compression.codec={cfg.compression.codec!r} is not linear, so the sum of the "
                   f"masked payloads does not decode to the sum of the updates; use a linear codec (dense, gaussian, "
                   f"rademacher, srht, sparsejl) or a sketch-space strategy (sketched_fedavg, fetchsgd, sketched_dp)")
    aggregator, _ = aggregator_problems(cfg, implied_aggregator(spec, method))
    if aggregator != "mean":
        out.append(f"secagg.enabled: strategy.aggregator={aggregator!r} needs every client's update, which secure "
                   f"aggregation hides (the server sees only their sum); use strategy.aggregator='mean'")
    if caps.selection == "data_dependent":
        out.append(f"secagg.enabled: strategy {name!r} selects clients from what they report about their data, in the "
                   f"clear; {caps.notes.get('selection_fix', 'choose a strategy that samples clients')}")
    for release in caps.extra_releases:
        out.append(f"secagg.enabled: strategy {name!r} sends {release} in the clear, outside secure aggregation")
    if p.enabled:
        if p.site == "local":
            out.append("secagg.enabled with privacy.site='local': noise each client adds before masking is the "
                       "distributed site; use privacy.site='distributed' (or 'central' / 'sketch': the server noises "
                       "the unmasked sum)")
        if p.adaptive_clip:
            out.append("secagg.enabled with privacy.adaptive_clip: the clients' clipping bits would reach the server "
                       "one by one; set privacy.adaptive_clip=false")
        if p.per_layer:
            out.append("secagg.enabled with privacy.per_layer: under secure aggregation clients clip the payload "
                       "vector as a whole; set privacy.per_layer=false")
        if sa.clip != "auto" and p.clip != "none" and float(sa.clip) != float(p.clip):
            out.append(f"secagg.clip={sa.clip} differs from privacy.clip={p.clip}: the clip norm of what is summed is "
                       f"the DP sensitivity; leave secagg.clip='auto'")
    try:
        sa.resolved(p.clip)
    except ConfigError as err:
        out.append(str(err))
    return out


def _linear_codec(cfg) -> bool:
    try:
        return make_codec(cfg.compression.codec, **cfg.compression.options()).linear
    except (TypeError, ValueError):
        return True  # a codec that cannot be built is reported by _codec_problems


def build_pipeline(cfg, *, calibrate: bool = True) -> RoundPipeline:
    """The round pipeline ``cfg`` asks for, or :class:`CombinationError` listing every problem.

    ``calibrate``: resolve ``privacy.target_epsilon`` into a noise multiplier (a root search
    over the accountant; seconds for PLD over many rounds).
    """
    spec, method = build_method(cfg)
    problems = combination_problems(cfg, spec, method)
    if problems:
        raise CombinationError(problems)
    caps = method.capabilities
    privacy = secagg = None
    if cfg.privacy.enabled:
        plan = privacy_plan(cfg, calibrate=calibrate)
        privacy = PrivacyStage(plan, space=caps.aggregation, secure=cfg.secagg.enabled)
        if cfg.compression.codec != "dense" and caps.aggregation == "update" and plan.site == "central":
            log.warning("privacy with codec %r: the server clips each *decoded* update to C; for sketches this "
                        "shrinks them (sketched_dp clips and noises in sketch space)", cfg.compression.codec)
        if plan.epsilon_budget is not None and plan.noise_multiplier > 0:
            fits = privacy.accountant.rounds_within_budget(plan.epsilon_budget, max_rounds=max(cfg.run.rounds, 1))
            if fits < cfg.run.rounds:
                log.warning("privacy.epsilon_budget=%g allows %d of run.rounds=%d rounds; the run will stop there",
                            plan.epsilon_budget, fits, cfg.run.rounds)
    if cfg.secagg.enabled:
        clip, scale = cfg.secagg.resolved(cfg.privacy.clip)
        distributed = privacy is not None and privacy.plan.site == "distributed"
        secagg = SecureAggregation(degree=cfg.secagg.degree, threshold=cfg.secagg.threshold, clip=clip, scale=scale,
                                   noise_multiplier=privacy.plan.noise_multiplier if distributed else 0.0)
    return RoundPipeline(method, make_combiner(cfg, implied_aggregator(spec, method)), privacy, secagg=secagg,
                         name=spec.name)
