"""DP that holds: noise and DP sampling nobody can regenerate from the public run seed, reproducible
noise only when asked (and then every output says ε is no guarantee), target ε, and every unsound
combination refused before anything starts."""

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from _localgrid import LocalGrid, RecordingGrid
from dp_accounting import rdp as dp_rdp

from stamen import schema as P
from stamen.client import trainers
from stamen.config import ConfigError, load
from stamen.core import derive_seed
from stamen.privacy.accounting import Accountant
from stamen.privacy.noise import NOT_A_GUARANTEE, SeededNoise
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
from stamen.strategies.preflight import CombinationError, build_pipeline
from stamen.tasks.task import load_task

BASE = ["federation.clients=6", "run.rounds=1", "task.local_epochs=1", "task.hidden=64", "eval.every=1000"]
LOCAL = ["privacy.clip=0.5", "privacy.noise_multiplier=1.0", "privacy.site='local'", "privacy.sampling='none'"]
CENTRAL = ["privacy.clip=0.5", "privacy.noise_multiplier=1.0", "privacy.sampling='none'"]


@pytest.fixture
def constant_updates(monkeypatch):
    """Every client's update is Δ = value in every coordinate (known to the test, not to the adversary)."""

    def train(model, X, y, settings, generator, job):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3)
        return 0.5, 1

    monkeypatch.setitem(trainers.TRAINERS, "sgd", train)


def go(tmp_path, name, *overrides, grid_cls=LocalGrid):
    cfg = load(overrides=BASE + list(overrides))
    grid = grid_cls(cfg)
    summary = run_federation(grid, cfg, tmp_path / name)
    return cfg, RunDirectory(tmp_path / name), summary, grid


def model(rd):
    return np.concatenate([a.ravel() for a in rd.load_checkpoint()["arrays"].values()])


def test_same_seed_dp_runs_release_different_models_and_nothing_else_changes(tmp_path):
    """Real training: the cohorts (every client) and data order are seeded; only the noise differs."""
    _, a, _, _ = go(tmp_path, "a", *CENTRAL, "run.rounds=2")
    _, b, _, _ = go(tmp_path, "b", *CENTRAL, "run.rounds=2")
    assert not np.allclose(model(a), model(b))
    keep = ("clients", "rejected", "uplink_bytes", "downlink_bytes", "epsilon", "dp_noise_std", "dp_cohort")
    assert [{k: r[k] for k in keep} for r in a.read_metrics()] == [{k: r[k] for k in keep} for r in b.read_metrics()]
    # clipping alone (no noise) is deterministic: the same seed gives the same model
    _, c, _, _ = go(tmp_path, "c", "privacy.clip=0.5", "privacy.sampling='none'")
    _, d, _, _ = go(tmp_path, "d", "privacy.clip=0.5", "privacy.sampling='none'")
    assert np.array_equal(model(c), model(d))


def _adversary_errors(cfg, grid):
    """An adversary with run.seed, the config and every message regenerates each client's local
    noise the ways Stamen ever derived it and subtracts it from the payload; the rest should be the
    clipped update. Returns ‖recovered − clipped‖ per client and (σ, d)."""
    layout = load_task(cfg.task, cfg.federation.clients, cfg.run.seed).layout
    d, C, z = layout.d, float(cfg.privacy.clip), float(cfg.privacy.noise_multiplier)
    clipped = torch.full((d,), 0.3).mul_(min(1.0, C / (0.3 * math.sqrt(d))))
    sigma = z * C
    errors = []
    for reply in grid.replies:
        meta = reply.content.config_records[P.META]
        pid, rnd = int(meta[P.PARTITION_ID]), int(meta[P.SERVER_ROUND])
        sent = torch.from_numpy(P.from_array_record(reply.content.array_records[P.UPDATE])["values"])
        guesses = [SeededNoise(cfg.run.seed).generator(rnd, "dp-local", pid),  # the debugging derivation
                   torch.Generator().manual_seed(derive_seed(cfg.run.seed, rnd, "dp-local", pid))]  # the old one
        errors.append(min(float((sent - torch.randn(d, generator=g) * sigma - clipped).norm()) for g in guesses))
    return errors, sigma, d


def test_an_adversary_holding_the_seed_cannot_remove_local_noise(tmp_path, constant_updates):
    cfg, _, _, grid = go(tmp_path, "a", *LOCAL, grid_cls=RecordingGrid)
    errors, sigma, d = _adversary_errors(cfg, grid)
    assert len(errors) == 6 and min(errors) >= 0.9 * sigma * math.sqrt(d)
    # with reproducible (debugging) noise the same adversary recovers the update to float precision
    cfg, _, summary, grid = go(tmp_path, "b", *LOCAL, "privacy.reproducible_noise=true", grid_cls=RecordingGrid)
    errors, sigma, d = _adversary_errors(cfg, grid)
    assert max(errors) < 1e-4 * sigma * math.sqrt(d)


def test_an_adversary_holding_the_seed_cannot_remove_central_noise(tmp_path, constant_updates):
    cfg, rd, _, _ = go(tmp_path, "a", *CENTRAL)
    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    d, std = task.layout.d, 0.5 * 1.0 / 6  # z·C/D with D = N (no sampling)
    released = torch.from_numpy(model(rd)) - task.layout.flatten(task.initial_weights())
    mean = torch.full((d,), 0.3).mul_(min(1.0, 0.5 / (0.3 * math.sqrt(d))))
    for g in (SeededNoise(cfg.run.seed).generator(1, "dp-central-noise"),
              torch.Generator().manual_seed(derive_seed(cfg.run.seed, 1, "dp-central-noise"))):
        assert float((released - torch.randn(d, generator=g) * std - mean).norm()) >= 0.9 * std * math.sqrt(d)


def test_reproducible_noise_says_epsilon_is_no_guarantee_everywhere(tmp_path, constant_updates):
    _, rd, summary, _ = go(tmp_path, "a", *CENTRAL, "run.rounds=2", "privacy.reproducible_noise=true")
    assert summary["privacy"]["epsilon_is_guarantee"] is False and summary["privacy"]["note"] == NOT_A_GUARANTEE
    assert all(r["epsilon_is_guarantee"] is False for r in rd.read_metrics())
    from stamen.cli import summary_lines

    assert any("NOT a privacy guarantee" in line for line in summary_lines(summary))
    _, rd, summary, _ = go(tmp_path, "b", *CENTRAL)
    assert summary["privacy"]["epsilon_is_guarantee"] is True
    assert "epsilon_is_guarantee" not in rd.read_metrics()[0]
    assert not any("NOT a privacy guarantee" in line for line in summary_lines(summary))


def test_summary_says_what_epsilon_covers_and_train_metrics_are_withheld(tmp_path, constant_updates):
    _, rd, summary, _ = go(tmp_path, "a", *CENTRAL, "privacy.adaptive_clip=true", "privacy.adaptive_count_noise=1.0")
    covers = " ".join(summary["privacy"]["covers"])
    assert "model updates" in covers and "adaptive clipping" in covers
    assert rd.read_metrics()[0]["train_loss"] is None
    assert summary["privacy"]["outside_the_guarantee"]


def test_target_epsilon_chooses_z_and_ends_within_it(tmp_path, constant_updates):
    target, q, rounds = 3.0, 0.5, 4
    cfg, rd, summary, _ = go(tmp_path, "a", "privacy.clip=0.5", f"privacy.target_epsilon={target}",
                             f"federation.fraction_train={q}", f"run.rounds={rounds}")
    z = summary["privacy"]["calibrated_noise_multiplier"]
    assert summary["privacy"]["noise_multiplier"] == z and summary["epsilon"] <= target
    # an independent oracle: dp-accounting's RDP accountant on the same event, T Poisson-sampled Gaussians
    def eps(mult):
        acc = dp_rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(mult)), rounds)
        return acc.get_epsilon(cfg.privacy.delta)

    assert eps(z) <= target + 1e-9 and eps(z * 0.99) > target
    assert [r["epsilon"] for r in rd.read_metrics()][-1] == pytest.approx(eps(z), rel=1e-9)


REFUSALS = [
    (["privacy.clip=inf"], "privacy.clip"),
    (["privacy.clip=0"], "privacy.clip"),
    (["privacy.noise_multiplier=1.0"], "privacy.clip"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.delta=0.2"], "1/federation.clients"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "strategy.name=sketched_fedavg", "compression.codec=srht"],
     "privacy.site='central' is not available for strategy 'sketched_fedavg'"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "strategy.name=ferret"], "cannot be made private"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "strategy.aggregator=krum"], "strategy.aggregator='mean'"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "strategy.name=curriculum", "strategy.client_curriculum=true"],
     "client_curriculum=false"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "strategy.name=fedlex"], "exploration uploads"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "federation.fraction_evaluate=0.5"], "fraction_evaluate"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=0.3", "privacy.epsilon_budget=0.5"], "one round's epsilon"),
    (["privacy.clip=1.0", "privacy.target_epsilon=2", "privacy.noise_multiplier=1.0"], "give one"),
]


@pytest.mark.parametrize("overrides, match", REFUSALS)
def test_unsound_combinations_are_refused_before_anything_starts(overrides, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("'", "'").replace(".", r"\.")):
        build_pipeline(load(overrides=BASE + overrides))


def test_every_problem_is_named_in_one_message():
    with pytest.raises(CombinationError) as err:
        build_pipeline(load(overrides=BASE + ["privacy.clip=1.0", "privacy.noise_multiplier=1.0",
                                              "strategy.name=curriculum", "strategy.client_curriculum=true",
                                              "federation.fraction_evaluate=0.5",
                                              "privacy.delta=0.5"]))
    assert len(err.value.problems) == 3 and "3 problems" in str(err.value)


def test_curriculum_without_client_selection_may_be_private(tmp_path, constant_updates):
    _, rd, summary, _ = go(tmp_path, "a", *CENTRAL, "strategy.name=curriculum", "strategy.client_curriculum=false")
    assert summary["epsilon"] is not None and rd.read_metrics()[0]["clients"] == 6


def test_cli_refuses_with_exit_code_2_and_the_message(tmp_path):
    from typer.testing import CliRunner

    from stamen.cli import app

    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r"), "--set", "privacy.clip=1.0",
                                      "--set", "privacy.noise_multiplier=1.0", "--set", "strategy.name=curriculum",
                                      "--set", "strategy.client_curriculum=true"])
    assert result.exit_code == 2 and "client_curriculum" in result.output
    assert not (tmp_path / "r").exists()
