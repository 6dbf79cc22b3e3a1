"""Secure aggregation (strategies/secagg.py, client/secagg.py, privacy/distributed.py).

Oracles: the clients' own quantised vectors (recorded as they are made) summed in numpy; a χ²
test against the uniform distribution on the field; the discrete Gaussian's exact pmf; the
Gaussian/zCDP identity checked through dp-accounting's own ``ZCDpEvent``; Theorem 1 of Kairouz,
Liu, Steinke (2021) evaluated term by term.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import MessageType
from scipy import stats

from stamen.config import load
from stamen.privacy import distributed as D
from stamen.schema import secagg as A
from stamen.strategies.preflight import CombinationError, build_pipeline

from _localgrid import LocalGrid, RecordingGrid, run_capturing_strategy


def _cfg(*extra, clients=10):
    return load(None, [f"federation.clients={clients}", "run.rounds=1", "task.local_epochs=1",
                       "federation.fraction_evaluate=0", "secagg.enabled=true", *extra])


@pytest.fixture
def recorded(monkeypatch):
    """Every integer vector a client makes (rounded payload, noise share), and every unmasked sum."""
    from stamen.client import secagg as client
    from stamen.strategies.secagg import SecureAggregation

    log = {"rounded": [], "noise": [], "sums": []}
    rnd, dg, unmask = client.stochastic_round, client.discrete_gaussian, SecureAggregation.unmask_integers

    def rounding(y, rng):
        out = rnd(y, rng)
        log["rounded"].append(out.copy())
        return out

    def noise(shape, sigma, rng):
        out = dg(shape, sigma, rng)
        log["noise"].append(out.copy())
        return out

    def unmasking(self, server_round, accepted):
        out = unmask(self, server_round, accepted)
        log["sums"].append(None if out is None else out[0].copy())
        return out

    monkeypatch.setattr(client, "stochastic_round", rounding)
    monkeypatch.setattr(client, "discrete_gaussian", noise)
    monkeypatch.setattr(SecureAggregation, "unmask_integers", unmasking)
    return log


def _lose_train_of(pids):
    """A grid failure: the train messages of these partitions never arrive (after the key exchange)."""
    from stamen.server.inprocess_grid import NODE_BASE, NODE_STRIDE

    nodes = {NODE_BASE + NODE_STRIDE * p for p in pids}
    return lambda m: m.metadata.message_type == MessageType.TRAIN and m.metadata.dst_node_id in nodes


@pytest.mark.parametrize("extra, lost", [
    ((), ()),
    (("secagg.degree=4",), ()),
    (("secagg.degree=4",), (1, 4, 7)),  # 30 % of the cohort drops after sharing its keys
    (("privacy.clip=2.0", "privacy.noise_multiplier=0.8", "privacy.site=distributed", "privacy.sampling=none"),
     (2, 5, 9)),
])
def test_the_unmasked_sum_is_exactly_the_sum_of_the_survivors_quantised_vectors(tmp_path, recorded, extra, lost):
    cfg = _cfg(*(extra if any(e.startswith("privacy.clip") for e in extra) else ("secagg.clip=3.0", *extra)))
    run, pipeline, _ = run_capturing_strategy(cfg, tmp_path / "run", grid=LocalGrid(cfg, fail=_lose_train_of(lost)))
    assert len(recorded["rounded"]) == cfg.federation.clients - len(lost)  # only survivors quantised anything
    expected = np.sum(recorded["rounded"], axis=0) + (np.sum(recorded["noise"], axis=0) if recorded["noise"] else 0)
    (total,) = recorded["sums"]
    assert total.dtype == np.int64 and np.array_equal(total, expected)
    line = run.read_metrics()[0]
    assert not line["failed"] and line["secagg_dropped"] == len(lost) and line["clients"] == 10 - len(lost)
    if "privacy.site=distributed" in extra:  # each share has σ_c = zΔ₂/√t
        t = line["secagg_threshold"]
        sigma_c = 0.8 * pipeline.secagg.sensitivity / math.sqrt(t)
        assert line["secagg_noise_std"] == pytest.approx(sigma_c)
        shares = np.concatenate(recorded["noise"]).astype(float)
        assert shares.std() == pytest.approx(sigma_c, rel=0.02)


def test_the_model_moves_by_the_mean_of_the_clipped_payloads(tmp_path, recorded):
    """Without DP the new model is w + (Σ rounded)/(γ·n): the unmasked mean, decoded (dense: itself)."""
    from stamen import schema as S

    cfg = _cfg("secagg.clip=3.0")
    grid = RecordingGrid(cfg)
    run, pipeline, _ = run_capturing_strategy(cfg, tmp_path / "run", grid=grid)
    layout = pipeline.run.layout
    train = next(m for m in grid.messages if m.metadata.message_type == MessageType.TRAIN)
    start = layout.flatten(S.from_array_record(train.content.array_records[S.ARRAYS])).numpy()
    final = layout.flatten(run.read_model()[0]).numpy()
    mean = np.sum(recorded["rounded"], axis=0) / pipeline.secagg.scale / len(recorded["rounded"])
    np.testing.assert_allclose(final - start, mean, atol=1e-6)
    assert 0 < np.linalg.norm(mean) <= 3.0 + math.sqrt(layout.d) / pipeline.secagg.scale


def test_one_clients_masked_payload_is_uniform_on_the_field(tmp_path, recorded):
    """What the server holds of one client is uniform on Z_2^b (χ² over all its values); the client's
    quantised vector itself is far from uniform, so the test can fail."""
    from stamen import schema as S

    cfg = _cfg("secagg.clip=1.0", "secagg.scale=20.0")  # a small field for 10 clients
    grid = RecordingGrid(cfg)
    run_capturing_strategy(cfg, tmp_path / "run", grid=grid)
    bits = int(next(m for m in grid.messages if m.metadata.message_type == MessageType.TRAIN)
               .content.config_records[S.CONFIG][A.BITS])
    assert bits <= 10
    masked = np.asarray(grid.replies[0].content.array_records[S.UPDATE][A.MASKED].numpy())
    counts = np.bincount(masked.astype(np.int64), minlength=1 << bits)
    assert stats.chisquare(counts).pvalue > 1e-4
    plain = np.bincount(D.to_field(recorded["rounded"][0], bits).astype(np.int64), minlength=1 << bits)
    assert stats.chisquare(plain).pvalue < 1e-10


def test_below_the_threshold_the_round_fails_and_the_model_stays(tmp_path, recorded):
    cfg = _cfg("secagg.clip=3.0", "secagg.threshold=1.0", clients=6)  # t = 6: no client may drop
    run, _, _ = run_capturing_strategy(cfg, tmp_path / "run", grid=LocalGrid(cfg, fail=_lose_train_of([3])))
    line = run.read_metrics()[0]
    assert line["failed"] and recorded["sums"] == [None]


def test_discrete_gaussian_matches_its_pmf_and_shares_add_up():
    rng = np.random.default_rng(7)
    sigma = 2.5
    x = D.discrete_gaussian(200_000, sigma, rng)
    support = np.arange(-12, 13)
    pmf = np.exp(-support ** 2 / (2 * sigma ** 2))
    pmf /= np.exp(-np.arange(-60, 61) ** 2 / (2 * sigma ** 2)).sum()
    observed = np.array([(x == k).sum() for k in support])
    inside = observed.sum()
    assert stats.chisquare(observed, pmf / pmf.sum() * inside).pvalue > 1e-4
    # n shares of σ_c² sum to variance nσ_c² (the noise of an unmasked sum)
    n = 8
    total = sum(D.discrete_gaussian(50_000, sigma, rng) for _ in range(n))
    assert total.var() == pytest.approx(n * sigma ** 2, rel=0.03)
    assert D.discrete_gaussian(5, 0.0, rng).tolist() == [0] * 5


def test_stochastic_rounding_is_unbiased_and_moves_each_coordinate_by_less_than_one():
    rng = np.random.default_rng(3)
    y = np.full(100_000, 0.3)
    r = D.stochastic_round(y, rng)
    assert set(np.unique(r)) <= {0, 1} and r.mean() == pytest.approx(0.3, abs=0.005)
    z = rng.normal(size=1000) * 50
    assert np.abs(D.stochastic_round(z, rng) - z).max() < 1


def test_ddg_epsilon_is_theorem_1_and_the_round_bound_covers_every_cohort():
    # Theorem 1 of Kairouz et al. 2021, written out independently
    def theorem(delta2, sigma, n, d):
        tau = 10 * sum(math.exp(-2 * math.pi ** 2 * sigma ** 2 * k / (k + 1)) for k in range(1, n))
        return min(math.sqrt(delta2 ** 2 / (n * sigma ** 2) + tau * d / 2), delta2 / (math.sqrt(n) * sigma)
                   + tau * math.sqrt(d))

    for delta2, sigma, n, d in [(10.0, 0.4, 5, 100), (100.0, 3.0, 50, 10_000), (5.0, 0.2, 3, 10)]:
        assert D.ddg_epsilon(delta2, sigma, n, d) == pytest.approx(theorem(delta2, sigma, n, d), rel=1e-12)
    # small σ_c: τ matters, the bound is above 1/z; it covers every t ≤ n ≤ N
    z, delta2, d, N = 1.0, 1.0, 50, 8
    bound = D.round_epsilon_bound(z, delta2, d, N)
    assert bound > 1 / z
    for t in range(2, N + 1):
        for n in range(t, N + 1):
            assert D.ddg_epsilon(delta2, z * delta2 / math.sqrt(t), n, d) <= bound + 1e-12
    # large σ_c (the defaults: γC = 2^16): exactly the Gaussian's 1/z
    assert D.round_epsilon_bound(0.7, 65_536.0, 10_000, 1000) == pytest.approx(1 / 0.7, rel=1e-12)


def test_the_runs_epsilon_is_dp_accountings_zcdp_composition(tmp_path):
    import dp_accounting
    from dp_accounting import rdp

    cfg = _cfg("privacy.clip=1.0", "privacy.noise_multiplier=1.3", "privacy.site=distributed", "run.rounds=2",
               clients=6)
    run, pipeline, _ = run_capturing_strategy(cfg, tmp_path / "run")
    eps_round = D.round_epsilon_bound(1.3, pipeline.secagg.sensitivity, pipeline.secagg.size, 6)
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.ZCDpEvent(2 * eps_round ** 2 / 2))
    summary = run.read_summary()
    assert summary["epsilon"] == pytest.approx(acc.get_epsilon(cfg.privacy.delta), rel=1e-9)
    assert summary["privacy"]["site"] == "distributed" and summary["privacy"]["epsilon_is_guarantee"]


def test_the_field_holds_the_worst_sum_and_one_bit_less_wraps():
    n, clip, scale, sigma_c = 10, 1.0, 1000.0, 40.0
    bits = D.field_bits(n, clip, scale, sigma_c)
    rng = np.random.default_rng(0)
    worst = np.full(4, scale * clip + 1, np.int64)  # each client's coordinate at its largest after rounding
    vectors = [worst + np.full(4, int(12 * sigma_c * math.sqrt(n) / n) + 1) for _ in range(n)]
    exact = np.sum(vectors, axis=0)
    masks = [rng.integers(0, 1 << bits, 4, dtype=np.uint64) for _ in range(n)]
    summed = sum(D.to_field(v, bits) + m for v, m in zip(vectors, masks)) - sum(masks)
    assert np.array_equal(D.from_field(summed & np.uint64((1 << bits) - 1), bits), exact)
    small = bits - 2
    wrapped = sum(D.to_field(v, small) for v in vectors) & np.uint64((1 << small) - 1)
    assert not np.array_equal(D.from_field(wrapped, small), exact)
    with pytest.raises(ValueError, match="lower secagg.scale"):
        D.field_bits(10**6, 1.0, 2.0 ** 40, 0.0)


@pytest.mark.parametrize("extra, needle", [
    (("compression.codec=topk",), "compression.codec='topk' is not linear"),
    (("strategy.aggregator=median",), "strategy.aggregator='median' needs every client's update"),
    (("strategy.name=ferret",), "does not aggregate a sum of payload vectors"),
    (("strategy.name=curriculum", "strategy.client_curriculum=true"), "selects clients from what they report"),
    (("strategy.name=fedlex",), "in the clear, outside secure aggregation"),
    (("privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.site=local"), "privacy.site='distributed'"),
    (("privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.site=distributed", "privacy.accountant=pld"),
     "use privacy.accountant='rdp'"),
    (("privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.adaptive_clip=true"), "privacy.adaptive_clip"),
    (("privacy.clip=1.0", "secagg.clip=2.0"), "secagg.clip=2.0 differs from privacy.clip=1.0"),
])
def test_combinations_secure_aggregation_cannot_serve_are_refused_naming_the_keys(extra, needle):
    cfg = _cfg("secagg.clip=1.0" if not any("clip" in e for e in extra) else "run.seed=0", *extra)
    with pytest.raises(CombinationError) as err:
        build_pipeline(cfg, calibrate=False)
    assert needle in str(err.value)


def test_a_clip_norm_is_required_and_distributed_needs_secure_aggregation():
    with pytest.raises(CombinationError, match="set secagg.clip"):
        build_pipeline(_cfg(), calibrate=False)
    cfg = load(None, ["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.site=distributed"])
    with pytest.raises(CombinationError, match="set secagg.enabled=true"):
        build_pipeline(cfg, calibrate=False)


def test_a_client_reveals_its_shares_once_and_never_both_secrets_of_one_neighbour():
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from stamen import schema as S
    from stamen.client import secagg as client
    from stamen.schema import SchemaError

    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    context.state[client.STATE] = ConfigRecord({"round": 1, "c_sk": b"", "s_seed": b"", "neighbours": [1, 2],
                                                "cipher_keys": [b"", b""], "pk_s": [b"", b""], "own_b": b"b", "own_sk": b"s",
                                                "senders": [], "ciphertexts": []})

    def ask(survivors, dropped):
        config = ConfigRecord({S.PARTITION_ID: 0, S.SERVER_ROUND: 1, A.SURVIVORS: survivors, A.DROPPED: dropped})
        return Message(content=RecordDict({S.CONFIG: config}), dst_node_id=5, message_type=MessageType.QUERY)

    with pytest.raises(SchemaError, match="both surviving and dropped"):
        client.handle_unmask(None, ask([0, 1], [1]), context)
    context.state[client.STATE] = ConfigRecord({**dict(context.state[client.STATE]), "unmasked": True})
    with pytest.raises(SchemaError, match="already revealed"):  # a second query could ask for the other secret
        client.handle_unmask(None, ask([0], []), context)



def test_the_mask_key_is_a_function_of_its_seed_and_agrees_with_its_peer():
    """A dropped client's pairwise masks are rebuilt from the shared seed: the key derived from the
    seed is the same key (same public key), and ECDH agrees both ways (Flower's key agreement)."""
    import secrets as secrets_

    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key

    seed_u, seed_v = secrets_.token_bytes(32), secrets_.token_bytes(32)
    u, v = A.mask_key(seed_u), A.mask_key(seed_v)
    rebuilt = A.mask_key(combine_shares(create_shares(seed_u, 3, 5)[1:4]))
    assert rebuilt.private_numbers().private_value == u.private_numbers().private_value
    assert generate_shared_key(rebuilt, v.public_key()) == generate_shared_key(v, u.public_key())
    assert u.private_numbers().private_value != v.private_numbers().private_value
    with pytest.raises(ValueError, match="32 bytes"):
        A.mask_key(b"short")
