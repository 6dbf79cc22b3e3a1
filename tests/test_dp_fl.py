"""Differential privacy wired into the platform: clipping, central/local/sketch noise, sampling,
accounting in metrics.jsonl, budget stop, resume. In-process grid (LocalGrid): fast and exact.

Most runs replace the "sgd" trainer with a *constant* trainer, so every client's update Δ is
known in advance; the server's released aggregate minus the known mean of the clipped
updates is then exactly the noise the mechanism added, which is checked against its formula.
"""

import math

import dp_accounting
import numpy as np
import pytest
import torch
from _localgrid import LocalGrid, RecordingGrid
from dp_accounting import rdp as dp_rdp

from stamen.client import trainers
from stamen.client.privacy_hooks import apply_client_privacy, apply_payload_privacy
from stamen.config import ConfigError, load
from stamen.privacy.accounting import Accountant
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
from stamen.core import Layout
from stamen.sketching.codec import CodecContext, make_codec
from stamen.strategies.preflight import CombinationError, build_pipeline
from stamen.tasks.task import load_task

BASE = ["federation.clients=6", "run.rounds=1", "task.local_epochs=1", "task.hidden=64", "eval.every=1000"]


def constant_trainer(value_of):
    """A trainer whose update is Δ = value_of(partition) in every coordinate."""

    def train(model, X, y, settings, generator, job):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(value_of(job.partition_id)))
        return 0.5, 1

    return train


@pytest.fixture
def constant_updates(monkeypatch):
    def use(value_of):
        monkeypatch.setitem(trainers.TRAINERS, "sgd", constant_trainer(value_of))

    return use


def run(tmp_path, name, *overrides, resume=False, cfg=None, grid=None):
    cfg = cfg or load(overrides=BASE + list(overrides))
    out = tmp_path / name
    summary = run_federation(grid or LocalGrid(cfg), cfg, out, resume=resume)
    return cfg, RunDirectory(out), summary


def flat(cfg, arrays):
    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    return task.layout.flatten(arrays).double(), task


def released_update(cfg, rd):
    """The global model's change over the run (one round): what the server released."""
    final, task = flat(cfg, rd.load_checkpoint()["arrays"])
    start, _ = flat(cfg, task.initial_weights())
    return final - start, task.layout.d


def strip_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


# -- noise at the server -------------------------------------------------------------------

@pytest.mark.parametrize("sampling, fraction", [("fixed", 0.5), ("poisson", 0.5), ("none", 1.0)])
def test_central_noise_std_is_zC_over_D(tmp_path, constant_updates, sampling, fraction):
    z, C, value = 2.0, 0.5, 1.0
    constant_updates(lambda pid: value)
    cfg, rd, _ = run(tmp_path, "a", f"privacy.clip={C}", f"privacy.noise_multiplier={z}",
                     f"privacy.sampling='{sampling}'", f"federation.fraction_train={fraction}")
    row = rd.read_metrics()[0]
    change, d = released_update(cfg, rd)
    clipped = value * C / math.sqrt(d)  # every coordinate of every client's clipped Δ
    n = cfg.federation.clients
    m = row["clients"]
    denominator = fraction * n if sampling == "poisson" else m  # fixed denominator D (strategies/dp.py)
    noise = change - clipped * m / denominator
    expected = z * C / denominator
    assert row["dp_noise_std"] == pytest.approx(expected)
    # std of d ≈ 4810 Gaussian draws: relative standard error 1/sqrt(2d) ≈ 1 %
    assert float(noise.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(d)
    excess_kurtosis = float(((noise - noise.mean()) ** 4).mean() / noise.var() ** 2) - 3
    assert abs(excess_kurtosis) < 0.3  # Gaussian, not e.g. uniform (-1.2)


def test_local_noise_is_zC_per_client(tmp_path, constant_updates):
    z, C = 1.0, 0.5
    constant_updates(lambda pid: 1.0)
    cfg, rd, summary = run(tmp_path, "a", f"privacy.clip={C}", f"privacy.noise_multiplier={z}",
                           "privacy.site='local'", "privacy.sampling='none'")
    change, d = released_update(cfg, rd)
    m = cfg.federation.clients
    noise = change - C / math.sqrt(d)
    # the mean of m independent N(0, (zC)²) draws
    assert float(noise.std()) == pytest.approx(z * C / math.sqrt(m), rel=0.05)
    assert rd.read_metrics()[0]["dp_noise_std"] == 0.0  # the server adds nothing
    oracle = dp_rdp.RdpAccountant()  # one release, replace-one: std zC, sensitivity 2C
    oracle.compose(dp_accounting.GaussianDpEvent(z / 2))
    assert summary["privacy"]["local_epsilon"] == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-9)
    # RDP is an upper bound on the exact (analytic Gaussian) epsilon
    assert summary["privacy"]["local_epsilon"] >= dp_accounting.get_epsilon_gaussian(z / 2, 1e-5)


def test_sketch_space_noise_std(tmp_path, constant_updates):
    """sketched_dp with the identity 'sketch' (dense): the noise on the mean sketch is zC/D."""
    z, C = 1.5, 0.5
    constant_updates(lambda pid: 1.0)
    cfg, rd, _ = run(tmp_path, "a", "strategy.name=sketched_dp", "compression.codec=dense", f"privacy.clip={C}",
                     f"privacy.noise_multiplier={z}", "privacy.site='sketch'", "privacy.sampling='fixed'",
                     "federation.fraction_train=0.5")
    change, d = released_update(cfg, rd)
    m = rd.read_metrics()[0]["clients"]
    assert m == 3
    noise = change - C / math.sqrt(d)
    assert float(noise.std()) == pytest.approx(z * C / m, rel=0.05)


# -- clipping ------------------------------------------------------------------------------

def test_client_hook_clips_and_is_inert_without_privacy():
    g = torch.Generator().manual_seed(0)
    delta = torch.arange(1.0, 11.0)
    assert apply_client_privacy(delta, {"server-round": 1}, g) is delta
    payload = {"sketch": np.ones(4, np.float32)}
    assert apply_payload_privacy(payload, {"server-round": 1}, g) is payload
    metrics = {}
    out = apply_client_privacy(delta, {"dp-clip": 2.0}, g, metrics=metrics)
    assert float(out.norm()) == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(out / out.norm(), delta / delta.norm())
    assert metrics["dp-unclipped"] == 0.0
    small = torch.full((10,), 0.01)
    assert torch.equal(apply_client_privacy(small, {"dp-clip": 2.0}, g, metrics=metrics), small)
    assert metrics["dp-unclipped"] == 1.0
    per_layer = apply_client_privacy(delta, {"dp-clip": 2.0, "dp-per-layer": True}, g, [4, 6])
    assert float(per_layer[:4].norm()) <= 2.0 / math.sqrt(2) + 1e-6
    assert float(per_layer[4:].norm()) <= 2.0 / math.sqrt(2) + 1e-6
    table = {"table": np.full((2, 3), 5.0, np.float32)}
    clipped = apply_payload_privacy(table, {"dp-clip": 1.0, "dp-space": "payload"}, g)
    assert clipped["table"].shape == (2, 3) and np.linalg.norm(clipped["table"]) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="dp-clip"):
        apply_client_privacy(delta, {"dp-clip": -1.0}, g)
    with pytest.raises(ValueError, match="dp-local-noise-std"):
        apply_client_privacy(delta, {"dp-local-noise-std": 1.0}, g)


def test_clipping_bounds_each_clients_contribution(tmp_path, constant_updates, monkeypatch):
    """Clients with updates of wildly different sizes, one of which skips its clipping: the released
    mean moves by at most C/m per client, because the server re-clips every decoded update."""
    C = 0.25
    constant_updates(lambda pid: 10.0 ** pid)  # ‖Δ‖ from 70 to 7e6
    import stamen.client.privacy_hooks as hooks

    original = hooks.apply_client_privacy

    def cheat(delta, config, generator, layer_sizes=None, metrics=None):
        out = original(delta, config, generator, layer_sizes, metrics)
        return delta if float(delta[0]) > 1e4 else out  # partitions 5..: send the raw update anyway

    monkeypatch.setattr(hooks, "apply_client_privacy", cheat)
    cfg, rd, _ = run(tmp_path, "a", f"privacy.clip={C}", "privacy.sampling='none'")
    change, d = released_update(cfg, rd)
    m = cfg.federation.clients
    # every client's clipped update is C·(1,…,1)/√d, so the mean is exactly that
    assert torch.allclose(change, torch.full((d,), C / math.sqrt(d), dtype=torch.float64), atol=1e-6)
    assert float(change.norm()) <= C * (1 + 1e-5)
    assert rd.read_metrics()[0]["clients"] == m


# -- accounting ------------------------------------------------------------------------------

def test_epsilon_per_round_matches_dp_accounting(tmp_path, constant_updates):
    z, q, delta = 1.3, 0.5, 1e-5
    constant_updates(lambda pid: 0.01)
    _, rd, summary = run(tmp_path, "a", "privacy.clip=1.0", f"privacy.noise_multiplier={z}",
                         f"federation.fraction_train={q}", "run.rounds=4", f"privacy.delta={delta}")
    for row in rd.read_metrics():
        oracle = dp_rdp.RdpAccountant()  # dp-accounting directly: T Poisson-sampled Gaussian rounds
        oracle.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), row["round"])
        assert row["epsilon"] == pytest.approx(oracle.get_epsilon(delta), rel=1e-9)
    assert summary["epsilon"] == rd.read_metrics()[-1]["epsilon"]
    assert summary["delta"] == delta
    p = summary["privacy"]
    assert (p["accountant"], p["sampling"], p["sampling_probability"], p["noise_multiplier"]) == ("rdp", "poisson", q, z)
    assert "Balle" in p["conversion"]


def test_fixed_sampling_epsilon_matches_accountant(tmp_path, constant_updates):
    constant_updates(lambda pid: 0.01)
    _, rd, summary = run(tmp_path, "a", "privacy.clip=1.0", "privacy.noise_multiplier=2.0",
                         "privacy.sampling='fixed'", "federation.fraction_train=0.5", "run.rounds=3")
    acc = Accountant(2.0, 1e-5, "rdp", "fixed", cohort_size=3, population_size=6)
    assert [r["epsilon"] for r in rd.read_metrics()] == pytest.approx([acc.epsilon_after(t) for t in (1, 2, 3)])
    assert summary["privacy"]["neighboring_relation"] == "replace-one"


def test_budget_stops_before_it_is_exceeded(tmp_path, constant_updates):
    z, q = 1.0, 0.5
    constant_updates(lambda pid: 0.01)
    acc = Accountant(z, 1e-5, "rdp", "poisson", sampling_probability=q)
    budget = (acc.epsilon_after(2) + acc.epsilon_after(3)) / 2
    _, rd, summary = run(tmp_path, "a", "privacy.clip=1.0", f"privacy.noise_multiplier={z}",
                         f"federation.fraction_train={q}", "run.rounds=6", f"privacy.epsilon_budget={budget}")
    rows = rd.read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["epsilon"] <= budget for r in rows)
    assert "epsilon_budget" in summary["stopped"] and f"{acc.epsilon_after(3):.4g}" in summary["stopped"]
    assert summary["rounds"] == 2 and summary["epsilon"] == pytest.approx(acc.epsilon_after(2))
    ck = rd.load_checkpoint()
    assert ck["round"] == 2 and ck["strategy"]["privacy"]["accountant"]["rounds"] == 2


def test_resume_continues_the_epsilon_sequence(tmp_path, constant_updates):
    """With reproducible (debugging) noise a resumed run repeats the uninterrupted one exactly."""
    constant_updates(lambda pid: 0.01 * (pid + 1))
    opts = ["privacy.clip=0.05", "privacy.noise_multiplier=1.0", "federation.fraction_train=0.5", "eval.every=1",
            "privacy.reproducible_noise=true"]
    _, full, _ = run(tmp_path, "full", *opts, "run.rounds=4")
    _, part, _ = run(tmp_path, "part", *opts, "run.rounds=2")
    _, _, summary = run(tmp_path, "part", resume=True, cfg=load(part.config_path, ["run.rounds=4"]))
    assert strip_wall(part.read_metrics()) == strip_wall(full.read_metrics())  # same ε, noise and cohorts
    eps = [r["epsilon"] for r in part.read_metrics()]
    assert eps == sorted(eps) and len(set(eps)) == 4
    acc = Accountant(1.0, 1e-5, "rdp", "poisson", sampling_probability=0.5)
    assert summary["epsilon"] == pytest.approx(acc.epsilon_after(4))


# -- sampling --------------------------------------------------------------------------------

def bound(cfg):
    pipeline = build_pipeline(cfg)
    n = cfg.federation.clients
    pipeline.bind(seed=cfg.run.seed, nodes={i: 100 + i for i in range(n)}, layout=Layout(("w",), ((3,),)),
                  fraction_train=cfg.federation.fraction_train, fraction_evaluate=0.0, rounds=5, timeout=10.0)
    return pipeline


def cohort(pipeline, rnd):
    return pipeline.privacy.sample(rnd, sorted(pipeline.nodes))


def test_sampling_schemes():
    common = ["federation.clients=20", "privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.delta=1e-3"]
    poisson = bound(load(overrides=common + ["federation.fraction_train=0.3"]))
    sizes, hits = [], np.zeros(20)
    for rnd in range(1, 401):
        chosen = cohort(poisson, rnd)
        sizes.append(len(chosen))
        hits[chosen] += 1
    # Binomial(20, 0.3) cohort sizes: mean 6, std ≈ 2.05; every client joins w.p. 0.3
    assert len(set(sizes)) > 5
    assert np.mean(sizes) == pytest.approx(6.0, abs=4 * 2.05 / math.sqrt(400))
    assert np.std(sizes) == pytest.approx(math.sqrt(20 * 0.3 * 0.7), rel=0.15)
    assert np.all(np.abs(hits / 400 - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 400))
    fixed = bound(load(overrides=common + ["federation.fraction_train=0.3", "privacy.sampling='fixed'"]))
    cohorts = [cohort(fixed, rnd) for rnd in range(1, 51)]
    assert {len(c) for c in cohorts} == {6} and all(len(set(c)) == 6 for c in cohorts)
    everyone = bound(load(overrides=common + ["privacy.sampling='none'"]))
    assert cohort(everyone, 3) == list(range(20))


def test_dp_samples_are_secret_unless_reproducible_noise_is_asked_for():
    common = ["federation.clients=40", "privacy.clip=1.0", "privacy.noise_multiplier=1.0",
              "federation.fraction_train=0.5", "privacy.delta=1e-3"]
    a, b = (bound(load(overrides=common)) for _ in range(2))
    # same seed, same round: independent draws (P[equal] = 2^-40 per round)
    assert [cohort(a, r) for r in range(1, 6)] != [cohort(b, r) for r in range(1, 6)]
    assert cohort(a, 7) != cohort(a, 7)
    c, d = (bound(load(overrides=common + ["privacy.reproducible_noise=true"])) for _ in range(2))
    assert [cohort(c, r) for r in range(1, 6)] == [cohort(d, r) for r in range(1, 6)]


def test_poisson_cohort_sizes_fit_the_binomial_and_do_not_repeat():
    """Goodness of fit of 2,000 secret Poisson cohort sizes to Binomial(N, q): Pearson's chi-square
    over bins of expected count >= 5 (scipy for the p-value); and two same-seed runs differ."""
    from scipy import stats

    n, q, rounds = 30, 0.2, 2000
    pipeline = bound(load(overrides=[f"federation.clients={n}", "privacy.clip=1.0", "privacy.noise_multiplier=1.0",
                                     f"federation.fraction_train={q}", "privacy.delta=1e-3"]))
    sizes = np.array([len(cohort(pipeline, r)) for r in range(1, rounds + 1)])
    pmf = stats.binom.pmf(np.arange(n + 1), n, q)
    lo, hi = int(np.argmax(pmf * rounds >= 5)), int(n - np.argmax(pmf[::-1] * rounds >= 5))
    observed = [np.sum(sizes <= lo)] + [np.sum(sizes == k) for k in range(lo + 1, hi)] + [np.sum(sizes >= hi)]
    expected = np.array([pmf[:lo + 1].sum()] + list(pmf[lo + 1:hi]) + [pmf[hi:].sum()]) * rounds
    chi2, p = stats.chisquare(observed, expected)
    assert p > 1e-4, (chi2, p)
    again = bound(load(overrides=[f"federation.clients={n}", "privacy.clip=1.0", "privacy.noise_multiplier=1.0",
                                  f"federation.fraction_train={q}", "privacy.delta=1e-3"]))
    assert [cohort(again, r) for r in range(1, 21)] != [cohort(pipeline, r) for r in range(1, 21)]


def test_poisson_cohorts_vary_in_a_run(tmp_path, constant_updates):
    constant_updates(lambda pid: 0.01)
    _, rd, _ = run(tmp_path, "a", "federation.clients=10", "privacy.clip=1.0", "privacy.noise_multiplier=1.0",
                   "federation.fraction_train=0.5", "run.rounds=5")
    assert len({r["clients"] for r in rd.read_metrics()}) > 1
    _, rd, _ = run(tmp_path, "b", "federation.clients=10", "privacy.clip=1.0", "privacy.noise_multiplier=1.0",
                   "federation.fraction_train=0.5", "run.rounds=5", "privacy.sampling='fixed'")
    assert {r["clients"] for r in rd.read_metrics()} == {5}


# -- sketched_dp -------------------------------------------------------------------------------

@pytest.mark.parametrize("codec, options", [("countsketch", ["compression.rows=3"]), ("gaussian", [])])
def test_sketched_dp_without_noise_is_plain_sketched_averaging(tmp_path, codec, options):
    overrides = BASE + ["task.hidden=16", "strategy.name=sketched_dp", f"compression.codec={codec}", *options]
    private = load(overrides=overrides + ["privacy.clip=1e9", "privacy.noise_multiplier=0", "privacy.site='sketch'",
                                          "privacy.sampling='fixed'"])
    grid = RecordingGrid(private)
    _, rd, _ = run(tmp_path, "dp", cfg=private, grid=grid)
    # the oracle: decode(mean of the client payloads), computed here from the recorded replies
    from stamen import schema as P

    task = load_task(private.task, private.federation.clients, private.run.seed)
    coder = make_codec(codec, **private.compression.options())
    payloads = [P.from_array_record(r.content.array_records["update"]) for r in grid.replies]
    assert len(payloads) == private.federation.clients
    key = next(iter(payloads[0]))
    mean = {key: np.mean([p[key] for p in payloads], axis=0).astype(np.float32)}
    expected = task.layout.flatten(task.initial_weights()) + coder.decode(mean, CodecContext(0, 1, task.layout))
    assert torch.allclose(task.layout.flatten(rd.load_checkpoint()["arrays"]), expected, atol=1e-5)
    # and privacy off entirely gives the same model
    plain = load(overrides=overrides)
    _, rd2, _ = run(tmp_path, "plain", cfg=plain)
    assert torch.allclose(task.layout.flatten(rd2.load_checkpoint()["arrays"]), expected, atol=1e-5)


def test_sketched_dp_clips_the_sketch(tmp_path, constant_updates):
    """Every client's table is clipped to C in sketch space: the mean table has norm <= C."""
    C = 0.3
    constant_updates(lambda pid: 5.0)
    cfg = load(overrides=BASE + ["strategy.name=sketched_dp", "compression.codec=countsketch", "compression.rows=3",
                                 f"privacy.clip={C}", "privacy.site='sketch'", "privacy.sampling='none'"])
    grid = RecordingGrid(cfg)
    run(tmp_path, "a", cfg=cfg, grid=grid)
    from stamen import schema as P

    norms = [np.linalg.norm(P.from_array_record(r.content.array_records["update"])["table"]) for r in grid.replies]
    assert norms == pytest.approx([C] * cfg.federation.clients, rel=1e-5)
    assert all(r.content.metric_records["metrics"]["dp-unclipped"] == 0.0 for r in grid.replies)


# -- configuration ------------------------------------------------------------------------------

def test_privacy_off_changes_nothing():
    cfg = load(overrides=BASE)
    assert build_pipeline(cfg).privacy is None and not cfg.privacy.enabled


@pytest.mark.parametrize("overrides, match", [
    (["privacy.noise_multiplier=1.0"], "privacy.clip"),
    (["privacy.clip=1.0", "privacy.site='sketch'"], "sketched_dp"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "strategy.name=krum"], "krum"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "strategy.name=fedmedian"], "median"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "strategy.name=fedadam", "strategy.aggregator=trimmed_mean"],
     "trimmed_mean"),
    (["privacy.clip=1.0", "privacy.sampling='fixed'", "privacy.accountant='pld'"], "privacy.accountant"),
    (["privacy.clip=1.0", "privacy.sampling='none'", "federation.fraction_train=0.5"], "fraction_train"),
    (["privacy.clip=1.0", "strategy.name=sketched_dp", "compression.codec=int8", "privacy.site='sketch'"],
     "compression.codec"),
    (["privacy.clip=1.0", "strategy.name=sketched_dp", "compression.codec=countsketch"], "privacy.site"),
    (["privacy.clip=1.0", "privacy.epsilon_budget=2.0"], "privacy.epsilon_budget"),
    (["privacy.clip=1.0", "privacy.noise_multiplier=2.0", "privacy.adaptive_clip=true",
      "privacy.adaptive_count_noise=0.5"], "privacy.adaptive_count_noise"),
    (["privacy.foo=1"], "privacy.foo"),
])
def test_bad_privacy_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_pipeline(load(overrides=BASE + overrides))


def test_adaptive_clip_follows_the_quantile(tmp_path, constant_updates):
    """All updates are larger than C, so with no count noise C grows by exp(η·γ) per round."""
    constant_updates(lambda pid: 1.0)
    _, rd, _ = run(tmp_path, "a", "privacy.clip=0.1", "privacy.adaptive_clip=true", "privacy.adaptive_count_noise=0",
                   "privacy.sampling='none'", "run.rounds=3")
    clips = [r["dp_clip"] for r in rd.read_metrics()]
    assert clips == pytest.approx([0.1 * math.exp(0.2 * 0.5 * t) for t in (1, 2, 3)])
    assert [r["dp_unclipped_fraction"] for r in rd.read_metrics()] == [0.0, 0.0, 0.0]


# -- leakage study and the `stamen attack` command ----------------------------------------------

def test_attack_observation_is_what_the_codec_sends():
    from stamen.privacy.attacks.study import codec_projection, observe

    d = 500
    project, size = codec_projection("countsketch", d, ratio=0.1, seed=3, round=2, rows=2)
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    codec = make_codec("countsketch", ratio=0.1, rows=2)
    sent = codec.encode(v, CodecContext(3, 2, Layout(("w",), ((d,),))))["table"]
    assert size == sent.size and torch.allclose(project(v), torch.from_numpy(sent).reshape(-1))
    observed = observe(v, project=project, clip=0.5)  # clipped in the sent (sketch) space
    assert float(observed.norm()) == pytest.approx(0.5, rel=1e-6)
    noisy = observe(v, clip=0.5, noise_std=2.0, generator=torch.Generator().manual_seed(0))
    assert float((noisy - observe(v, clip=0.5)).std()) == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError, match="srht"):
        codec_projection("srht", d, ratio=0.1)


def test_attack_command_prints_and_writes(tmp_path):
    import json

    from typer.testing import CliRunner

    from stamen.cli import app

    out = tmp_path / "attack.json"
    result = CliRunner().invoke(app, ["attack", "--attack", "ig", "--sketch", "countsketch", "--sketch-ratio", "0",
                                      "--sketch-ratio", "0.2", "--noise-multiplier", "0", "--noise-multiplier", "1",
                                      "--inputs", "1", "--iterations", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.output and "countsketch" in result.output
    rows = json.loads(out.read_text())
    assert [(r["sketch_ratio"], r["noise_multiplier"]) for r in rows] == [(0.0, 0.0), (0.0, 1.0), (0.2, 0.0), (0.2, 1.0)]
    assert all(math.isfinite(r["psnr"]) and r["noise_std"] == r["noise_multiplier"] * r["clip"] for r in rows)
    bad = CliRunner().invoke(app, ["attack", "--sketch", "srht", "--sketch-ratio", "0.1", "--inputs", "1"])
    assert bad.exit_code == 2 and "srht" in bad.output
