"""strategy.aggregator: robust combination of client models under any update-sending strategy."""

import numpy as np
import pytest
from _fakes import NODES, bound_strategy, configure, flower_identity, global_weights, reply_to  # noqa: F401
from _localgrid import LocalGrid
from scipy import stats

from stamen import config as C
from stamen import schema as P
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
from stamen.strategies.preflight import build_pipeline

# four clients' updates Δ (d = 8: w is 3×2, b is 2); client 3 is an outlier
DELTAS = np.array([[0.1, 0.2, -0.1, 0.0, 0.3, 0.1, 0.0, 0.2],
                   [0.2, 0.1, -0.2, 0.1, 0.2, 0.0, 0.1, 0.1],
                   [0.0, 0.3, -0.1, 0.1, 0.4, 0.2, 0.1, 0.3],
                   [-9.0, 7.0, 5.0, -8.0, 9.0, -6.0, 4.0, -5.0]], dtype=np.float32)
EXAMPLES = [10, 20, 30, 40]


def flat_global():
    g = global_weights()
    return np.concatenate([g["w"].ravel(), g["b"].ravel()])


def aggregate(strategy):
    msgs = configure(strategy)
    replies = [reply_to(m, DELTAS[i], EXAMPLES[i]) for i, m in enumerate(msgs)]
    for i, r in enumerate(replies):
        r.content.metric_records[P.METRICS]["train_loss"] = float(i + 1)
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = P.from_array_record(arrays)
    return np.concatenate([out["w"].ravel(), out["b"].ravel()]), metrics


def models():
    return flat_global()[None, :] + DELTAS


def test_median_under_fedavg_is_the_coordinatewise_median():
    got, metrics = aggregate(bound_strategy("fedavg", "strategy.aggregator=median"))
    np.testing.assert_allclose(got, np.median(models(), axis=0), rtol=0, atol=1e-6)
    # train metrics still cover every reply (weighted by examples), not just the rule's pick
    assert metrics["train_loss"] == pytest.approx(np.dot(EXAMPLES, [1, 2, 3, 4]) / sum(EXAMPLES))


def test_fedavgm_steps_towards_the_median_with_its_server_learning_rate():
    s = bound_strategy("fedavgm", "strategy.aggregator=median", server_learning_rate=0.5, server_momentum=0.0)
    got, _ = aggregate(s)
    w = flat_global()
    np.testing.assert_allclose(got, w + 0.5 * (np.median(models(), axis=0) - w), rtol=0, atol=1e-6)


def test_trimmed_mean_matches_scipy():
    got, _ = aggregate(bound_strategy("fedavg", "strategy.aggregator=trimmed_mean", "strategy.trim_beta=0.25"))
    np.testing.assert_allclose(got, stats.trim_mean(models(), 0.25, axis=0), rtol=0, atol=1e-6)


def test_fedtrimmedavg_name_is_fedavg_with_the_trimmed_mean():
    a, _ = aggregate(bound_strategy("fedtrimmedavg", "strategy.trim_beta=0.25"))
    b, _ = aggregate(bound_strategy("fedavg", "strategy.aggregator=trimmed_mean", "strategy.trim_beta=0.25"))
    np.testing.assert_array_equal(a, b)


def test_krum_picks_the_model_with_the_smallest_neighbour_score():
    m = models()
    scores = krum_scores(m, 0)
    got, metrics = aggregate(bound_strategy("fedavg", "strategy.aggregator=krum"))
    assert metrics["train_loss"] == pytest.approx(3.0)  # every reply's loss, though Krum kept one model
    np.testing.assert_allclose(got, m[int(np.argmin(scores))], rtol=0, atol=1e-6)
    assert int(np.argmin(scores)) != 3


def krum_scores(m, f):
    """Brute-force Krum (Blanchard et al.): Σ of the n − f − 2 smallest squared distances to the others."""
    d2 = ((m[:, None, :].astype(np.float64) - m[None, :, :]) ** 2).sum(-1)
    return np.array([np.sort(np.delete(d2[i], i))[: len(m) - f - 2].sum() for i in range(len(m))])


def weighted_mean(rows):
    w = np.array([EXAMPLES[i] for i in rows], dtype=np.float64)
    return (models()[rows] * w[:, None]).sum(0) / w.sum()


def test_multikrum_averages_the_m_best_scores_by_examples():
    got, _ = aggregate(bound_strategy("fedavg", "strategy.aggregator=multikrum", "strategy.num_nodes_to_select=3"))
    best = sorted(np.argsort(krum_scores(models(), 0))[:3])
    assert 3 not in best
    np.testing.assert_allclose(got, weighted_mean(best), rtol=0, atol=1e-5)
    # m = 0 selects n − f = all four replies: the weighted mean
    got, _ = aggregate(bound_strategy("fedavg", "strategy.aggregator=multikrum"))
    np.testing.assert_allclose(got, weighted_mean([0, 1, 2, 3]), rtol=0, atol=1e-5)


def test_bulyan_with_fewer_replies_than_4f_plus_3_fails_the_round_cleanly():
    s = bound_strategy("fedavg", "strategy.aggregator=bulyan", "strategy.num_malicious_nodes=1",
                       "federation.clients=7")
    msgs = configure(s)  # the fake federation has 4 nodes: fewer than 4f + 3 = 7
    arrays, metrics = s.aggregate_train(1, [reply_to(m, DELTAS[i], EXAMPLES[i]) for i, m in enumerate(msgs)])
    assert arrays is None and len(s.last_participants) == 4  # the replies were valid; the rule is undefined


@pytest.mark.parametrize("overrides, match", [
    (["strategy.name=ferret", "strategy.aggregator=median"], "coefficients"),
    (["strategy.name=fedkseed", "strategy.aggregator=krum"], "coefficients"),
    (["strategy.name=sketched_fedavg", "compression.codec=srht", "strategy.aggregator=median"], "sketch space"),
    (["strategy.name=fetchsgd", "compression.codec=countsketch", "strategy.aggregator=trimmed_mean"], "sketch space"),
    (["strategy.name=fedmedian", "strategy.aggregator=krum"], "contradicts"),
    (["strategy.num_malicious_nodes=2"], "num_malicious_nodes"),
    (["strategy.trim_beta=0.1", "strategy.aggregator=median"], "trim_beta"),
    (["strategy.aggregator=krum", "strategy.num_malicious_nodes=3", "federation.clients=8"], "needs at least 9"),
    (["strategy.aggregator=bulyan", "strategy.num_malicious_nodes=1", "federation.fraction_train=0.3"],
     "needs at least 7"),
])
def test_refused_combinations_name_the_reason(overrides, match):
    with pytest.raises(C.ConfigError, match=match):
        build_pipeline(C.load(overrides=overrides))


def test_aggregator_works_under_plugins_built_on_fedavg():
    for name in ("fat", "curriculum", "fedprox", "fedadam"):
        s = build_pipeline(C.load(overrides=[f"strategy.name={name}", "strategy.aggregator=median"]))
        assert s.combiner.name == "median"
    s = build_pipeline(C.load(overrides=["strategy.name=fedlex", "strategy.base=fedmedian"]))
    assert s.combiner.name == "median" and type(s.method).__name__ == "FedLEx"


def test_resume_with_a_robust_aggregator_equals_the_uninterrupted_run(tmp_path):
    common = ["federation.clients=6", "task.local_epochs=1", "task.hidden=16", "strategy.name=fedadam",
              "strategy.aggregator=krum", "strategy.num_malicious_nodes=1"]

    def go(name, cfg, resume=False):
        run_federation(LocalGrid(cfg), cfg, tmp_path / name, resume=resume)
        return [{k: v for k, v in r.items() if "wall" not in k} for r in RunDirectory(tmp_path / name).read_metrics()]

    full = go("full", C.load(overrides=common + ["run.rounds=4"]))
    go("part", C.load(overrides=common + ["run.rounds=2"]))
    resumed = go("part", C.load(RunDirectory(tmp_path / "part").config_path, ["run.rounds=4"]), resume=True)
    assert resumed == full and len(full) == 4
