"""The typed run config: one object, validated, loaded from TOML plus ``--set`` overrides.

Sections and keys are fixed (unknown keys are errors naming the key). Plugin options
live under ``strategy.*`` and ``compression.*``; those sections accept extra keys, which
the chosen strategy or codec validates itself when it is built.

Both apps read this module (it imports nothing from the rest of Stamen), so the same
config drives simulation (passed by closure) and deployment (flattened into Flower's
``run_config``, see :func:`from_flat` / :func:`to_flat`).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what is expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = "stamen"
    seed: int = 0
    rounds: int = Field(20, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out_dir: str = ""  # results directory; "" = runs/<name>-<timestamp>


class FederationSection(_Section):
    clients: int = Field(20, ge=1)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(0.0, ge=0.0, le=1.0)
    client_cpus: float = Field(1.0, gt=0.0)
    client_gpus: float = Field(0.0, ge=0.0)
    ray_address: str = ""
    round_timeout_s: float = Field(600.0, gt=0.0)  # the longest a round waits for its replies
    # the most examples one client may claim in a reply (0: no cap beyond the size it reported when it joined)
    max_examples_per_client: int = Field(0, ge=0)
    # SuperNodes host many clients each, one Flower message per node per call (simulation:
    # server/virtual_grid.py; deployment: server/app.py DeployedCarriers); false = one SuperNode per client
    virtual_clients: bool = True
    sim_nodes: int = Field(0, ge=0)  # SuperNodes hosting the clients with virtual_clients; simulation: 0 = twice the actors Ray runs at once
    # a worker's clients train as one stacked computation where the trainer and model allow it
    # (client/cohort.py); false = one client at a time (same results within float tolerance)
    vectorise: bool = True


class TaskSection(_Section):
    dataset: str = "digits"
    partition: str = "auto"  # auto: the dataset's own default (dirichlet for pooled data, natural for synthetic)
    alpha: float = Field(0.5, gt=0.0)
    classes_per_client: int = Field(2, ge=1)
    model: str = "mlp"
    hidden: int = Field(128, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.1, gt=0.0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # FedProx Synthetic(alpha, beta) generator
    synthetic_alpha: float = Field(1.0, ge=0.0)
    synthetic_beta: float = Field(1.0, ge=0.0)
    max_client_samples: int = Field(1000, ge=2)
    # hub datasets (flwr-datasets / Hugging Face): local cache directory
    data_dir: str = ""
    # data curriculum under any strategy that asks for no trainer of its own (client/trainers_curriculum.py)
    curriculum: Literal["vanilla", "curriculum", "anti", "random"] = "vanilla"
    curriculum_pacing: Literal["linear", "quad", "root", "exp", "log", "step"] = "linear"
    curriculum_a: float = Field(0.8, gt=0.0, le=1.0)
    curriculum_b: float = Field(0.2, gt=0.0, le=1.0)
    curriculum_scorer: Literal["G", "L", "LG", "E"] = "G"
    # language modelling: dataset "stdlib" (byte tokens of Python's standard library), model "gpt" (tasks/lm.py)
    context: int = Field(64, ge=1)  # tokens per window; a client's examples are non-overlapping windows
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(208, ge=1)  # must be divisible by n_head; 208 gives the default GPT 1.11 M parameters
    pretrained: bool = True  # start from the cached central pretraining (else GPT-2 init from the run seed)
    pretrain_steps: int = Field(300, ge=1)
    cache_dir: str = ""  # pretrained weights; "" = $STAMEN_CACHE_DIR or ~/.cache/stamen
    max_bytes_per_client: int = Field(16_000, ge=2)  # = tokens; a client gets bytes // (context + 1) windows
    max_test_bytes: int = Field(16_384, ge=2)


class StrategySection(BaseModel):
    """``strategy.name`` plus the chosen plugin's own options (validated by the plugin), and how
    client models are combined: ``aggregator`` with its options (strategies/robust.py)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "fedavg"
    # unset: the strategy's own rule (mean; median for fedmedian, ...)
    aggregator: Literal["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan"] | None = None
    num_malicious_nodes: int = Field(0, ge=0)  # f of krum / multikrum / bulyan
    num_nodes_to_select: int = Field(0, ge=0)  # m of multikrum; 0 = replies − f
    trim_beta: float | None = Field(None, ge=0.0, lt=0.5)  # fraction cut at each end by trimmed_mean; unset: 0.2

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CompressionSection(BaseModel):
    """``compression.codec`` plus the codec's options (validated by the codec)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    codec: str = "dense"
    downlink: Literal["dense"] = "dense"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PrivacySection(_Section):
    """Client-level differential privacy (strategies/dp.py). Off by default.

    On when ``clip`` is set with ``noise_multiplier > 0`` or ``target_epsilon`` (or ``clip`` alone:
    clipping without noise, ε infinite): clients clip their update to L2 norm ``clip`` (C);
    Gaussian noise with std ``noise_multiplier``·C (z·C) on the sum of clipped updates is added
    at ``site`` (``central``: the server, in parameter space; ``sketch``: the server, in sketch
    space, for strategies that aggregate sketches; ``local``: each client; ``distributed``: each
    client adds its share of discrete Gaussian noise under secure aggregation, ``secagg.*``,
    so the server sees only the noised sum); ε at ``delta`` is
    accounted for the ``sampling`` scheme each round and the run stops before exceeding
    ``epsilon_budget``. ``target_epsilon`` chooses z so that ``run.rounds`` rounds end at that ε.
    Noise and DP sampling come from OS entropy; ``reproducible_noise`` derives them from the
    public run seed instead, for debugging only (every output then says ε is not a guarantee).
    """

    clip: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | Literal["none"] = "none"  # C; "none": no clipping
    noise_multiplier: float = Field(0.0, ge=0.0, allow_inf_nan=False)  # z; 0 = no noise (epsilon is infinite)
    target_epsilon: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | Literal["none"] = "none"  # choose z for it
    site: Literal["central", "local", "sketch", "distributed"] = "central"
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    accountant: Literal["rdp", "pld"] = "rdp"
    # poisson: each client joins with probability q = federation.fraction_train; fixed: exactly
    # m = floor(fraction_train·clients) without replacement; none: every client every round
    sampling: Literal["poisson", "fixed", "none"] = "poisson"
    epsilon_budget: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | Literal["none"] = "none"
    per_layer: bool = False  # clip each parameter tensor to C/sqrt(L) (total norm still <= C)
    adaptive_clip: bool = False  # Andrew et al. 2021: C follows a quantile of update norms (clip = initial C)
    adaptive_quantile: float = Field(0.5, gt=0.0, lt=1.0)
    adaptive_lr: float = Field(0.2, gt=0.0, allow_inf_nan=False)
    adaptive_count_noise: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | Literal["auto"] = "auto"
    reproducible_noise: bool = False  # debugging only: noise and DP sampling from run.seed; NO guarantee

    @model_validator(mode="after")
    def _consistent(self) -> "PrivacySection":
        noised = self.noise_multiplier > 0 or self.target_epsilon != "none"
        if noised and self.clip == "none":
            raise ValueError("privacy.noise_multiplier / privacy.target_epsilon need privacy.clip (the clip norm C the "
                             "noise is scaled to)")
        if self.adaptive_clip and self.clip == "none":
            raise ValueError("privacy.adaptive_clip needs privacy.clip (the initial clip norm)")
        if self.adaptive_clip and self.site == "local":
            raise ValueError("privacy.adaptive_clip works with privacy.site 'central' or 'sketch', not 'local'")
        if self.epsilon_budget != "none" and not noised:
            raise ValueError("privacy.epsilon_budget needs privacy.noise_multiplier > 0 or privacy.target_epsilon "
                             "(without noise epsilon is infinite)")
        if self.site in ("local", "distributed") and not noised:
            raise ValueError(f"privacy.site={self.site!r} needs privacy.noise_multiplier > 0 or privacy.target_epsilon")
        return self

    @property
    def enabled(self) -> bool:
        return self.clip != "none" or self.noise_multiplier > 0 or self.target_epsilon != "none"


class SecAggSection(_Section):
    """Secure aggregation (SecAgg+, Bell et al. 2020; strategies/secagg.py). Off by default.

    The server learns only the sum of a round's payloads: each client clips its payload vector to
    L2 norm ``clip`` (C), scales it by ``scale`` (γ), rounds it stochastically to integers of
    Z_{2^b} (b chosen from C, γ, the cohort and the noise so that no sum wraps) and masks it with
    pairwise and self masks; dropped clients' masks are recovered from Shamir shares held by their
    neighbours. ``degree``: k of the k-regular neighbour graph (0: every client is a neighbour of
    every other); ``threshold``: the fraction of a neighbourhood (the client and its k neighbours)
    whose shares rebuild a secret, t = max(2, ⌈threshold·(k+1)⌉) — above 0.5 a server that lies
    about who dropped cannot get both secrets of a client. ``clip`` "auto" is ``privacy.clip``;
    ``scale`` "auto" is 2^16 / C. With ``privacy.site = "distributed"`` each client adds discrete
    Gaussian noise before masking (privacy/distributed.py).
    """

    enabled: bool = False
    degree: int = Field(0, ge=0)
    threshold: float = Field(0.6, gt=0.0, le=1.0)
    clip: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | Literal["auto"] = "auto"
    scale: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | Literal["auto"] = "auto"

    def resolved(self, privacy_clip: float | str) -> tuple[float, float]:
        """(C, γ) with "auto" resolved; ConfigError when no clip norm is known."""
        if self.clip != "auto":
            clip = float(self.clip)
        elif privacy_clip != "none":
            clip = float(privacy_clip)
        else:
            raise ConfigError("secagg.enabled needs a clip norm (the field must bound every client's payload): set "
                              "secagg.clip (e.g. 10.0) or privacy.clip")
        return clip, (float(self.scale) if self.scale != "auto" else 2.0 ** 16 / clip)


class EvalSection(_Section):
    every: int = Field(1, ge=1)
    batch_size: int = Field(512, ge=1)
    # Robust accuracy of the global model under attack (server/evaluation.py). robust = "auto":
    # the strategy's default (on for `fat`, off otherwise). Attack settings left at "auto" take the
    # threat model of the strategy (fat: its training ε and norm), else the task's default.
    robust: bool | Literal["auto"] = "auto"
    robust_every: int = Field(5, ge=1)  # in rounds; the last round is always evaluated
    attack_eps: Annotated[float, Field(ge=0.0)] | Literal["auto"] = "auto"
    attack_norm: Literal["auto", "linf", "l2"] = "auto"
    attack_steps: int = Field(20, ge=1)  # PGD steps: stronger than training
    attack_step_size: Annotated[float, Field(ge=0.0)] | Literal["auto"] = "auto"  # auto: 2.5·ε/steps
    fgsm: bool = True  # also report fgsm_accuracy (a cheap check)
    robust_samples: int = Field(0, ge=0)  # attack only the first n test examples (0: all)


class FaultsSection(_Section):
    """Fault injection for simulations (client/faults.py, server/faults.py). All off by default.

    Client faults are drawn per (seed, round, partition), so a faulty run is reproducible:
    ``client_failure`` — probability that a sampled client fails (replies with an error);
    ``straggler_fraction`` — probability that it is slow, sleeping an exponential delay of mean
    ``straggler_delay_s`` before replying (with ``round_deadline_s`` > 0 the server stops
    waiting at that deadline); ``drop_reply`` / ``duplicate_reply`` — probability that the
    transport loses a reply or delivers it twice. Byzantine clients: a fixed set of
    ``byzantine_fraction`` of all clients corrupt every update they send with
    ``byzantine_attack`` (``sign_flip``: −s·Δ, ``scale``: s·Δ, ``noise``: Gaussian of std
    s·‖Δ‖/√d, ``label_flip``: train on labels c−1−y), ``s`` = ``byzantine_scale``. A round
    whose accepted replies are fewer than ``min_replies`` fails: the model is unchanged and
    its metrics line says ``failed: true``.
    """

    client_failure: float = Field(0.0, ge=0.0, le=1.0)
    straggler_fraction: float = Field(0.0, ge=0.0, le=1.0)
    straggler_delay_s: float = Field(1.0, ge=0.0)
    round_deadline_s: float = Field(0.0, ge=0.0)  # 0: wait up to federation.round_timeout_s
    drop_reply: float = Field(0.0, ge=0.0, le=1.0)
    duplicate_reply: float = Field(0.0, ge=0.0, le=1.0)
    min_replies: int = Field(1, ge=1)
    byzantine_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    byzantine_attack: Literal["sign_flip", "scale", "noise", "label_flip"] = "sign_flip"
    byzantine_scale: float = Field(1.0, gt=0.0)


class StamenConfig(_Section):
    run: RunSection = RunSection()
    federation: FederationSection = FederationSection()
    task: TaskSection = TaskSection()
    strategy: StrategySection = StrategySection()
    compression: CompressionSection = CompressionSection()
    privacy: PrivacySection = PrivacySection()
    secagg: SecAggSection = SecAggSection()
    eval: EvalSection = EvalSection()
    faults: FaultsSection = FaultsSection()

    # -- (de)serialization ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        # TOML has no null: unset optional keys are left out (they load back as their default None)
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def fingerprint(self, *sections: str) -> str:
        """A stable hash of some sections (e.g. what a cached data partition depends on)."""
        import hashlib

        d = self.to_dict()
        part = {s: d[s] for s in sections} if sections else d
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = tuple(StamenConfig.model_fields)


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'")
        else:
            got = e.get("input")
            lines.append(f"bad value for '{key}': {e['msg']} (got {got!r})")
    return "; ".join(lines)


def validate(data: dict[str, Any]) -> StamenConfig:
    """Validate a nested dict into a StamenConfig, raising ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a table of sections, got {type(data).__name__}")
    for section, value in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'; sections are {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{section}' must be a table, got {value!r}")
    try:
        return StamenConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as a TOML literal, else as a string.

    ``section={...}`` (an inline table) replaces a whole section, e.g. to switch
    ``strategy`` to one that does not take the file's plugin options.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if any(not p for p in path) or (len(path) < 2 and not isinstance(value, dict)):
        raise ConfigError(f"override key {key!r} must look like section.key (or section={{...}} to replace a section)")
    return path, value


#: sections whose extra keys belong to the plugin a selector key chooses (``strategy.name``,
#: ``compression.codec``); the section's own fields are the keys every plugin shares
PLUGIN_SELECTORS = {"strategy": "name", "compression": "codec"}


def apply_overrides(data: dict[str, Any], overrides: list, *, dropped: list[str] | None = None) -> dict[str, Any]:
    """Apply overrides to a nested config dict (a copy); the one rule behind ``--set``, section
    replacement, ``flwr run --run-config`` keys and study points.

    Each override is ``"section.key=value"`` (parsed by :func:`parse_override`) or a
    ``(path, value)`` pair. Semantics:

    - ``section.key=value`` sets one key; ``section={...}`` replaces the whole section;
    - switching a plugin — ``strategy.name`` or ``compression.codec`` to a different value —
      drops the options of the previous plugin that came from the file (or an earlier layer),
      keeping the keys every plugin shares (``strategy.aggregator`` …) and every key given in
      the same batch of overrides, whatever its position. So
      ``stamen run fedprox.toml --set strategy.name=fedavg`` works (``strategy.proximal_mu`` is
      dropped) and ``--set strategy.proximal_mu=0.1 --set strategy.name=fedprox`` keeps μ.
      The dropped keys are appended to ``dropped`` (the CLI prints them).
    """
    data = json.loads(json.dumps(data))  # deep copy of plain data
    items = [parse_override(o) if isinstance(o, str) else (list(o[0]), o[1]) for o in overrides]
    given = {tuple(path) for path, _ in items}
    for path, value in items:  # plugin switches first: the batch's own plugin options survive them
        if len(path) == 2 and PLUGIN_SELECTORS.get(path[0]) == path[1]:
            model = StamenConfig.model_fields[path[0]].annotation
            section = data.get(path[0])
            if isinstance(section, dict) and section.get(path[1], model.model_fields[path[1]].default) != value:
                for key in [k for k in section if k not in model.model_fields and (path[0], k) not in given]:
                    del section[key]
                    if dropped is not None:
                        dropped.append(f"{path[0]}.{key}")
    for path, value in items:
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(path)}: '{p}' is not a section")
        node[path[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from None


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         dropped: list[str] | None = None) -> StamenConfig:
    """Load a config: defaults, then the TOML file (if any), then ``--set`` overrides (:func:`apply_overrides`)."""
    data = read_toml(path) if path else {}
    return validate(apply_overrides(data, overrides or [], dropped=dropped))


# -- Flower run_config <-> StamenConfig ---------------------------------------------
def to_flat(cfg: StamenConfig) -> dict[str, Any]:
    """Flatten to ``{"section.key": value}`` (Flower's run_config form)."""
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items() if v is not None}


def from_flat(flat: dict[str, Any]) -> StamenConfig:
    """Build a config from Flower's run_config.

    ``config-file`` (if set) names a TOML file loaded first; ``overrides`` holds
    ``;``-separated ``section.key=value`` items; any other ``section.key`` entry is an
    override too, with Flower's typed value. Empty-string entries are ignored. All of them go
    through :func:`apply_overrides`, as ``--set`` does.
    """
    base: dict[str, Any] = read_toml(flat["config-file"]) if flat.get("config-file") else {}
    items: list = [i.strip() for i in str(flat.get("overrides", "")).split(";") if i.strip()]
    items += [(key.split("."), value) for key, value in flat.items()
              if key not in ("config-file", "overrides") and value != ""]
    return validate(apply_overrides(base, items))


def dump_toml(data: dict[str, Any]) -> str:
    return tomli_w.dumps(data)
