"""The composition matrix, generated from the registries: every registered strategy × its relevant
codecs × privacy site × aggregator (× transport fault) either runs two rounds in-process with the
invariants below, or is refused by the preflight before anything starts. There is no third outcome.

Invariants of a run: the model stays finite; every partition is counted at most once per round and
the injected faults are exactly what acceptance rejects or misses; the uplink bytes are the
serialized size of the replies the server received; ε is reported iff the run adds DP noise.
A new plugin (strategy or codec) registered through the entry points joins the matrix without
editing this file.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from _localgrid import LocalGrid

from stamen import schema as S
from stamen.config import load
from stamen.sketching.codec import CODECS, make_codec
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
from stamen.strategies.preflight import build_pipeline
from stamen.strategies.registry import STRATEGIES, load_strategy_plugins

TINY = ["task.dataset=synthetic", "task.max_client_samples=24", "task.model=logreg", "federation.clients=5",
        "run.rounds=2", "task.local_epochs=1", "task.batch_size=8", "eval.every=2", "privacy.delta=1e-3"]
#: options that keep each plugin's own extra phases small (exploration, PGD, zeroth-order steps)
FAST = {"fedlex": ["strategy.exploration_epochs=2", "strategy.patience=1"], "fat": ["strategy.steps=2"],
        "fedkseed": ["strategy.local_steps=3", "strategy.K=64"], "ferret": ["strategy.K=8"],
        "fetchsgd": ["strategy.k=20"]}
SITES = {"off": [], "central": ["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.sampling='none'"],
         "local": ["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.site='local'",
                   "privacy.sampling='none'"],
         "sketch": ["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.site='sketch'",
                    "privacy.sampling='none'"]}
AGGREGATORS = {"mean": [], "median": ["strategy.aggregator=median"], "krum": ["strategy.aggregator=krum"]}
FAULTS = ("none", "duplicate", "drop")


def _registered() -> list[str]:
    load_strategy_plugins()
    make_codec("dense")  # loads the codec plugins
    return sorted(STRATEGIES)


def relevant_codecs(name: str) -> list[str]:
    """The codecs a strategy accepts, cut to a few representative ones (plus one it refuses)."""
    caps = STRATEGIES[name].capabilities
    general = sorted(n for n, c in CODECS.items() if c.general_purpose)
    if caps.codecs == ():
        return ["dense", "topk"]  # its own wire format: the default, and a codec it must refuse
    accepted = [c for c in general if caps.codecs is None or c in caps.codecs]
    refused = [c for c in general if c not in accepted][:1]
    linear = [c for c in accepted if CODECS[c].linear]
    other = [c for c in accepted if not CODECS[c].linear]
    return sorted(set(accepted[:1] + linear[:1] + other[:1] + refused))


def matrix():
    """strategy × codec × site × aggregator without faults, and strategy × fault on the plain setting."""
    cases = []
    for name in _registered():
        for codec, site, agg in itertools.product(relevant_codecs(name), SITES, AGGREGATORS):
            cases.append((name, codec, site, agg, "none"))
        for fault in FAULTS[1:]:
            cases.append((name, relevant_codecs(name)[0], "off", "mean", fault))
    return cases


class FaultyGrid(LocalGrid):
    """Drops the reply to the first train instruction of every round, or delivers it twice."""

    def __init__(self, cfg, fault):
        super().__init__(cfg)
        self.fault, self.injected, self.received = fault, 0, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        train = [m for m in messages if m.metadata.message_type == "train"
                 and int(m.content.config_records[S.CONFIG][S.SERVER_ROUND]) >= 1]
        if train and self.fault != "none" and replies:
            first = replies[0]
            if self.fault == "drop":
                replies = replies[1:]
            else:
                replies = [first, *replies]
            self.injected += 1
        if train:
            self.received.append(replies)
        return replies


def _overrides(name, codec, site, agg):
    return [*TINY, f"strategy.name={name}", f"compression.codec={codec}", *FAST.get(name, []), *SITES[site],
            *AGGREGATORS[agg]]


@pytest.fixture
def no_plots(monkeypatch):
    """Plots are not what this matrix checks (and matplotlib dominates a two-round run's time)."""
    from stamen.server import loop

    monkeypatch.setattr(loop, "write_plots", lambda run: None)


@pytest.mark.parametrize("name, codec, site, agg, fault", matrix())
def test_every_combination_runs_correctly_or_is_refused_before_it_starts(tmp_path, one_torch_thread, no_plots, name,
                                                                         codec, site, agg, fault):
    try:
        cfg = load(overrides=_overrides(name, codec, site, agg))
        build_pipeline(cfg, calibrate=False)
    except ValueError as refusal:  # ConfigError, StrategyConfigError, CombinationError: named, before start
        assert str(refusal)
        return
    grid = FaultyGrid(cfg, fault)
    summary = run_federation(grid, cfg, tmp_path / "run")
    rd = RunDirectory(tmp_path / "run")
    rows = rd.read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    arrays = rd.load_checkpoint()["arrays"]
    assert all(np.isfinite(a).all() for a in arrays.values())
    for row, received in zip(rows, grid.received):
        assert row["uplink_bytes"] == sum(S.message_bytes(r) for r in received)  # the replies as received
        rejected = row["rejected_reasons"]
        assert sum(rejected.values()) == row["rejected"]
        if fault == "duplicate":
            assert rejected.get("duplicate") == 1
        else:
            assert "duplicate" not in rejected
        if fault == "drop":
            assert row["missing"] == 1
        assert row["clients"] + row["rejected"] + row["missing"] == len(received) + row["missing"]
    noised = site != "off"
    assert (summary.get("epsilon") is not None) == noised
    assert all((r.get("epsilon") is not None) == noised for r in rows)
    if noised:
        assert math.isfinite(summary["epsilon"]) and all(r["train_loss"] is None for r in rows)
