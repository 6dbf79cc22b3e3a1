"""Strategy plugins by name: ``strategy.name`` in the run config picks one.

A plugin is a :class:`StrategySpec`: a factory building its :class:`~stamen.strategies.method.Method`,
a pydantic model of its ``strategy.*`` options (unknown options are errors naming the key),
its declared :class:`~stamen.core.Capabilities`, and one line for ``stamen list``. Flower's own
baselines are registered here; every other plugin module registers itself with
:func:`register_strategy` when imported, and modules are found through the
``stamen.strategies`` entry points (:mod:`stamen.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from flwr.serverapp import strategy as fl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stamen.core import Capabilities
from stamen.strategies.method import FLOWER_NO_SAMPLING, Method, UpdateMethod


class StrategyConfigError(ValueError):
    """Bad ``strategy.*`` options; the message names the key."""


class Options(BaseModel):
    """Base for a plugin's ``strategy.*`` options."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class StrategySpec:
    name: str
    factory: Callable[..., Method]  # factory(options, cfg) -> Method
    options: type[Options]
    summary: str
    capabilities: Capabilities = Capabilities()
    #: the robust rule the name implies (fedmedian: median); ``strategy.aggregator`` may not contradict it
    aggregator: str = "mean"


STRATEGIES: dict[str, StrategySpec] = {}


def register_strategy(spec: StrategySpec) -> StrategySpec:
    if spec.name in STRATEGIES and STRATEGIES[spec.name] is not spec:
        raise StrategyConfigError(f"two plugins register strategy {spec.name!r}")
    STRATEGIES[spec.name] = spec
    return spec


def flower_method(base: type, **fixed: Any) -> Callable[[Options, Any], Method]:
    """A factory for a method whose server step is Flower's ``base`` strategy (UpdateMethod)."""

    def factory(options: Options, cfg) -> Method:
        return UpdateMethod(base(**FLOWER_NO_SAMPLING, **fixed, **options.model_dump()), codec=cfg.compression.codec,
                            codec_options=cfg.compression.options())

    return factory


class NoOptions(Options):
    pass


class FedProxOptions(Options):
    proximal_mu: float = Field(0.01, ge=0.0, description="μ of the proximal term μ/2·‖w − w_global‖²")


class FedAdamOptions(Options):
    eta: float = Field(0.01, gt=0.0, description="server learning rate")
    eta_l: float = Field(0.05, gt=0.0, description="client learning rate (informational; clients use task.lr)")
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0, description="adaptivity (epsilon) of the server Adam step")


class FedAvgMOptions(Options):
    server_learning_rate: float = Field(1.0, gt=0.0)
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0)


_UPDATES = Capabilities(aggregation="update", vectorisable=True)

for _spec in (
    StrategySpec("fedavg", flower_method(fl.FedAvg), NoOptions,
                 "FedAvg (McMahan et al. 2017): example-weighted mean of client models", _UPDATES),
    StrategySpec("fedprox", flower_method(fl.FedProx), FedProxOptions,
                 "FedProx (Li et al. 2020): FedAvg + proximal term μ/2‖w − w_global‖² in the client objective", _UPDATES),
    StrategySpec("fedadam", flower_method(fl.FedAdam), FedAdamOptions,
                 "FedAdam (Reddi et al. 2021): Adam on the server over the mean update", _UPDATES),
    StrategySpec("fedavgm", flower_method(fl.FedAvgM), FedAvgMOptions,
                 "FedAvgM (Hsu et al. 2019): server momentum over the mean update", _UPDATES),
    StrategySpec("fedmedian", flower_method(fl.FedAvg), NoOptions,
                 "FedMedian (Yin et al. 2018): coordinate-wise median of client models (= fedavg, aggregator median)",
                 _UPDATES, aggregator="median"),
    StrategySpec("krum", flower_method(fl.FedAvg), NoOptions, "Krum (Blanchard et al. 2017): the client model closest "
                 "to its neighbours (= fedavg, aggregator krum; f = strategy.num_malicious_nodes)", _UPDATES,
                 aggregator="krum"),
    StrategySpec("bulyan", flower_method(fl.FedAvg), NoOptions, "Bulyan (El Mhamdi et al. 2018): Krum selection, then "
                 "a coordinate-wise trimmed mean (= fedavg, aggregator bulyan)", _UPDATES, aggregator="bulyan"),
    StrategySpec("fedtrimmedavg", flower_method(fl.FedAvg), NoOptions, "Trimmed mean (Yin et al. 2018): coordinate-wise "
                 "mean without the β extremes (= fedavg, aggregator trimmed_mean; β = strategy.trim_beta)", _UPDATES,
                 aggregator="trimmed_mean"),
):
    register_strategy(_spec)


def load_strategy_plugins() -> None:
    from stamen.plugins import load_plugins

    load_plugins("stamen.strategies")


def strategy_spec(name: str) -> StrategySpec:
    if name not in STRATEGIES:  # Flower's baselines are registered above; plugins are imported on demand
        load_strategy_plugins()
    if name not in STRATEGIES:
        raise StrategyConfigError(f"unknown strategy.name {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def parse_options(spec: StrategySpec, options: dict[str, Any], prefix: str = "strategy") -> Options:
    try:
        return spec.options.model_validate(options)
    except ValidationError as err:
        msgs = []
        for e in err.errors():
            key = prefix + "." + ".".join(str(p) for p in e["loc"])
            msgs.append(f"unknown config key '{key}' for strategy {spec.name!r}" if e["type"] == "extra_forbidden"
                        else f"bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
        raise StrategyConfigError("; ".join(msgs)) from None


def build_method(cfg) -> tuple[StrategySpec, Method]:
    """The method a run config asks for (``strategy.name`` with its options), not yet bound."""
    spec = strategy_spec(cfg.strategy.name)
    return spec, spec.factory(parse_options(spec, cfg.strategy.options()), cfg)


def capability_table() -> str:
    """The declared capabilities of every registered strategy as a markdown table
    (ARCHITECTURE.md embeds it; ``stamen list --capabilities`` prints it)."""
    from stamen.config import StamenConfig
    from stamen.strategies.preflight import secagg_problems

    load_strategy_plugins()
    rows = ["| strategy | aggregates | codecs | privacy sites | robust rules | selection | extra releases | "
            "client trainer | secure aggregation |", "|---|---|---|---|---|---|---|---|---|"]
    for name, spec in sorted(STRATEGIES.items()):
        c = spec.capabilities
        codecs = "any" if c.codecs is None else (", ".join(c.codecs) if c.codecs else "its own")
        # what the preflight says of this strategy with its default options under secagg.enabled
        probe = StamenConfig.model_validate({"strategy": {"name": name}, "secagg": {"enabled": True, "clip": 1.0}})
        secure = "no" if secagg_problems(probe, spec, spec.factory(parse_options(spec, {}), probe), name) else "yes"
        rows.append(f"| `{name}` | {c.aggregation} | {codecs} | {', '.join(sorted(c.privacy_sites)) or '—'} | "
                    f"{'yes' if c.robust else 'no'} | {c.selection.replace('_', '-')} | "
                    f"{', '.join(c.extra_releases) or '—'} | {c.trainer} | {secure} |")
    return "\n".join(rows) + "\n"
