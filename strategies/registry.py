"""Strategy plugins by name: ``strategy.name`` in the run config picks one.

A plugin is a :class:`StrategySpec`: a factory building the strategy object, a pydantic
model of its ``strategy.*`` options (unknown options are errors naming the key), and one
line for ``stamen list``. Flower's own Message-API strategies are registered here; Stamen
plugins register themselves from their modules with :func:`register_strategy`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from flwr.serverapp import strategy as fl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stamen.strategies.base import StamenStrategy


class StrategyConfigError(ValueError):
    """Bad ``strategy.*`` options; the message names the key."""


class Options(BaseModel):
    """Base for a plugin's ``strategy.*`` options."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class StrategySpec:
    name: str
    factory: Callable[..., StamenStrategy]  # factory(options, cfg) -> strategy
    options: type[Options]
    summary: str
    sends_updates: bool = True  # clients reply with a codec-encoded update Δ


STRATEGIES: dict[str, StrategySpec] = {}


def register_strategy(spec: StrategySpec) -> StrategySpec:
    STRATEGIES[spec.name] = spec
    return spec


def stamen_class(base: type) -> type:
    """A Stamen strategy class in front of a Flower strategy class."""
    return type(f"Stamen{base.__name__}", (StamenStrategy, base), {"__doc__": base.__doc__})


# Flower's fraction/minimum logic is bypassed: Stamen samples, then hands Flower exactly
# the sampled nodes (see StamenStrategy.configure_train).
_FLOWER_SAMPLING = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=0,
                        min_evaluate_nodes=0, min_available_nodes=0)


def _flower(base: type, **fixed: Any) -> Callable[[Options, Any], StamenStrategy]:
    cls = stamen_class(base)

    def factory(options: Options, cfg) -> StamenStrategy:
        return cls(**_FLOWER_SAMPLING, **fixed, **options.model_dump())

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


def _robust_alias(aggregator: str) -> Callable[[Options, Any], StamenStrategy]:
    """FedAvg whose clients' models are combined by ``aggregator`` (strategies/robust.py)."""
    fedavg = _flower(fl.FedAvg)

    def factory(options: Options, cfg) -> StamenStrategy:
        strategy = fedavg(options, cfg)
        strategy.aggregator = aggregator
        return strategy

    return factory


for _spec in (
    StrategySpec("fedavg", _flower(fl.FedAvg), NoOptions, "FedAvg (McMahan et al. 2017): example-weighted mean of client models"),
    StrategySpec("fedprox", _flower(fl.FedProx), FedProxOptions,
                 "FedProx (Li et al. 2020): FedAvg + proximal term μ/2‖w − w_global‖² in the client objective"),
    StrategySpec("fedadam", _flower(fl.FedAdam), FedAdamOptions, "FedAdam (Reddi et al. 2021): Adam on the server over the mean update"),
    StrategySpec("fedavgm", _flower(fl.FedAvgM), FedAvgMOptions, "FedAvgM (Hsu et al. 2019): server momentum over the mean update"),
    StrategySpec("fedmedian", _robust_alias("median"), NoOptions,
                 "FedMedian (Yin et al. 2018): coordinate-wise median of client models (= fedavg, aggregator median)"),
    StrategySpec("krum", _robust_alias("krum"), NoOptions, "Krum (Blanchard et al. 2017): the client model closest to "
                 "its neighbours (= fedavg, aggregator krum; f = strategy.num_malicious_nodes)"),
    StrategySpec("bulyan", _robust_alias("bulyan"), NoOptions, "Bulyan (El Mhamdi et al. 2018): Krum selection, then a "
                 "coordinate-wise trimmed mean (= fedavg, aggregator bulyan)"),
    StrategySpec("fedtrimmedavg", _robust_alias("trimmed_mean"), NoOptions, "Trimmed mean (Yin et al. 2018): "
                 "coordinate-wise mean without the β extremes (= fedavg, aggregator trimmed_mean; β = strategy.trim_beta)"),
):
    register_strategy(_spec)


def _load_plugins() -> None:
    """Import every plugin module of the package (all but base and registry); they register themselves."""
    import pkgutil

    import stamen.strategies as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "registry", "robust") and not mod.name.startswith("_"):
            importlib.import_module(f"stamen.strategies.{mod.name}")


def strategy_spec(name: str) -> StrategySpec:
    if name not in STRATEGIES:  # Flower's strategies are registered above; plugins are imported on demand
        _load_plugins()
    if name not in STRATEGIES:
        raise StrategyConfigError(f"unknown strategy.name {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def parse_options(spec: StrategySpec, options: dict[str, Any]) -> Options:
    try:
        return spec.options.model_validate(options)
    except ValidationError as err:
        msgs = []
        for e in err.errors():
            key = "strategy." + ".".join(str(p) for p in e["loc"])
            msgs.append(f"unknown config key '{key}' for strategy {spec.name!r}" if e["type"] == "extra_forbidden"
                        else f"bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
        raise StrategyConfigError("; ".join(msgs)) from None


def build_strategy(cfg) -> StamenStrategy:
    """The strategy object a run config asks for (not yet bound to a federation)."""
    spec = strategy_spec(cfg.strategy.name)
    strategy = spec.factory(parse_options(spec, cfg.strategy.options()), cfg)
    from stamen.strategies.robust import configure_aggregator

    configure_aggregator(strategy, cfg)  # strategy.aggregator: robust combination of client models
    if cfg.privacy.enabled:  # clipping / noise / accounting (strategies/dp.py)
        from stamen.strategies.dp import make_private

        strategy = make_private(strategy, spec, cfg)
    return strategy
