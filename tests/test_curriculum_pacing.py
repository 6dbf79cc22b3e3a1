"""Curriculum pacing, ordering, scoring, paced batches and client selection, against hand-computed values."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from stamen.tasks.curriculum import (
    MIN_EXAMPLES,
    PACING,
    ClientCurriculum,
    clip_count,
    client_score,
    example_losses,
    get_pacing,
    misclassification_scores,
    order_examples,
    paced_batches,
    pacing_exp,
    pacing_linear,
    pacing_log,
    pacing_quad,
    pacing_root,
    pacing_schedule,
    pacing_step,
    score_examples,
    total_local_steps,
)

# --------------------------------------------------------------------------- pacing values by hand
#
# N = 1000, T = 100, a = 0.8, b = 0.2  →  aT = 80, N·b = 200, N(1−b) = 800, x = t/80.
# e^5 = 148.4131591, e^9 = 8103.0839275, e^10 = 22026.4657948, e^-10 = 0.0000453999.

N, T, A, B = 1000, 100, 0.8, 0.2

HAND_VALUES = {
    # t:      0      8      20     40     72     79     80     100
    "linear": {0: 200,  # 200 + 800·0
               20: 400,  # 200 + 800·20/80 = 200 + 200
               40: 600,  # 200 + 800·0.5
               72: 920,  # 200 + 800·0.9
               80: 1000,  # 200 + 800·1
               100: 1000},  # 200 + 800·1.25 = 1200 → clipped to N
    "quad": {0: 200,
             20: 250,  # 200 + 800·0.25² = 200 + 50
             40: 400,  # 200 + 800·0.25
             72: 848,  # 200 + 800·0.81 = 848
             80: 1000,
             100: 1000},  # 200 + 800·1.5625 = 1450 → N
    "root": {0: 200,
             20: 600,  # 200 + 800·√0.25 = 200 + 400
             40: 765,  # 200 + 800·0.7071068 = 765.685 → 765
             80: 1000,
             100: 1000},  # 200 + 800·1.118 = 1094.4 → N
    "exp": {0: 200,  # 200 + 800·(e^0 − 1)/(e^10 − 1) = 200
            40: 205,  # 200 + 800·(148.4131591 − 1)/22025.4657948 = 200 + 800·0.0066929 = 205.35
            72: 494,  # 200 + 800·(8103.0839275 − 1)/22025.4657948 = 200 + 800·0.3678511 = 494.28
            80: 1000,  # 200 + 800·1
            100: 1000},
    "log": {0: 200,  # 200 + 800·(1 + ln(e^-10)/10) = 200 + 800·0
            8: 815,  # 200 + 800·(1 + ln(0.1000454)/10) = 200 + 800·(1 − 0.2302131) = 815.83
            40: 944,  # 200 + 800·(1 + ln(0.5000454)/10) = 200 + 800·(1 − 0.0693056) = 944.56
            80: 1000,  # 200 + 800·(1 + ln(1.0000454)/10) = 1000.0036 → N
            100: 1000},
    "step": {0: 200,  # 200 + 1000·⌊0⌋
             40: 200,  # 200 + 1000·⌊0.5⌋
             79: 200,  # 200 + 1000·⌊0.9875⌋
             80: 1000,  # 200 + 1000·⌊1⌋ = 1200 → N
             100: 1000},
}


@pytest.mark.parametrize("name,t,expected",
                         [(name, t, v) for name, table in HAND_VALUES.items() for t, v in table.items()])
def test_pacing_matches_hand_computed_values(name, t, expected):
    assert PACING[name](t, T, N, A, B) == expected


def test_pacing_functions_are_the_named_ones():
    assert PACING == {"linear": pacing_linear, "quad": pacing_quad, "root": pacing_root,
                      "exp": pacing_exp, "log": pacing_log, "step": pacing_step}


def test_minimum_of_32_examples():
    # N = 1000, b = 0.01: N·b = 10 < 32 → 32; at t = 8: 10 + 990·8/80 = 109 is above the minimum
    assert pacing_linear(0, 100, 1000, 0.8, 0.01) == 32
    assert pacing_linear(8, 100, 1000, 0.8, 0.01) == 109
    assert MIN_EXAMPLES == 32


def test_fewer_than_32_examples_means_all_of_them():
    # N = 20, b = 0.1: N·b = 2, but a client with fewer than 32 examples trains on all 20
    for name in PACING:
        assert PACING[name](0, 100, 20, 0.8, 0.1) == 20


def test_clipping_to_one_and_to_n():
    # with the minimum lowered to 1: N·b = 1000·0.0004 = 0.4 → int 0 → clipped up to 1
    assert pacing_linear(0, 100, 1000, 0.8, 0.0004, min_count=1) == 1
    assert clip_count(-3.7, 50, min_count=1) == 1
    assert clip_count(1e9, 50) == 50
    assert clip_count(40.9, 50) == 40  # cast to int truncates


def test_counts_that_are_integers_on_paper_survive_binary_rounding():
    # 100 · 0.29 = 28.999999999999996 in floating point; the spec's count is 29
    assert pacing_linear(0, 10, 100, 1.0, 0.29, min_count=1) == 29
    # a·T = 0.7·100 = 70.00000000000001: at t = 70 all data is in, for step pacing too
    assert pacing_step(70, 100, 1000, 0.7, 0.2) == 1000
    assert pacing_step(69, 100, 1000, 0.7, 0.2) == 200


def test_step_with_a_and_b_one_is_all_data_from_the_start():
    assert all(pacing_step(t, 50, 777, 1.0, 1.0) == 777 for t in range(0, 60))


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(PACING)), n=st.integers(1, 5000), total=st.integers(1, 500),
       a=st.floats(0.05, 1.0), b=st.floats(0.01, 1.0))
def test_pacing_is_monotone_bounded_and_reaches_all_data_at_aT(name, n, total, a, b):
    values = [PACING[name](t, total, n, a, b) for t in range(0, total + 1)]
    assert all(min(32, n) <= v <= n for v in values)
    assert all(u <= v for u, v in zip(values, values[1:]))
    assert PACING[name](math.ceil(a * total), total, n, a, b) == n


@pytest.mark.parametrize("args,match", [
    ((0, 100, 1000, 0.0, 0.2), "a "),
    ((0, 100, 1000, 1.5, 0.2), "a "),
    ((0, 100, 1000, 0.8, 0.0), "b "),
    ((0, 100, 1000, 0.8, 1.2), "b "),
    ((-1, 100, 1000, 0.8, 0.2), "step t"),
    ((0, 0, 1000, 0.8, 0.2), "total steps"),
    ((0, 100, 0, 0.8, 0.2), "N >= 1"),
])
def test_pacing_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        pacing_linear(*args)


def test_unknown_pacing_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'cubic'.*\['exp', 'linear', 'log', 'quad', 'root', 'step'\]"):
        get_pacing("cubic")


def test_pacing_schedule_binds_arguments_and_validates_early():
    g = pacing_schedule("linear", total_steps=100, n=1000, a=0.8, b=0.2)
    assert [g(0), g(40), g(80)] == [200, 600, 1000]
    with pytest.raises(ValueError, match="b "):
        pacing_schedule("linear", total_steps=100, n=1000, a=0.8, b=0.0)


def test_total_local_steps():
    assert total_local_steps(100, 32, 2) == 8  # 2 · ⌈100/32⌉ = 2 · 4


# --------------------------------------------------------------------------- ordering


SCORES = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])


def test_curriculum_ordering_is_ascending_with_stable_ties():
    assert order_examples(SCORES, "curriculum").tolist() == [1, 3, 4, 0, 2]


def test_anti_ordering_is_descending_with_stable_ties():
    assert order_examples(SCORES, "anti").tolist() == [2, 0, 4, 1, 3]


def test_vanilla_ordering_is_identity():
    assert order_examples(SCORES, "vanilla").tolist() == [0, 1, 2, 3, 4]


def test_random_ordering_is_a_permutation_from_the_generator():
    rng_before = torch.get_rng_state()
    first = order_examples(torch.zeros(50), "random", torch.Generator().manual_seed(3))
    again = order_examples(torch.zeros(50), "random", torch.Generator().manual_seed(3))
    other = order_examples(torch.zeros(50), "random", torch.Generator().manual_seed(4))
    assert sorted(first.tolist()) == list(range(50))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), rng_before)
    with pytest.raises(ValueError, match="Generator"):
        order_examples(SCORES, "random")


def test_unknown_ordering_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'easy'.*curriculum.*anti.*random.*vanilla"):
        order_examples(SCORES, "easy")


# --------------------------------------------------------------------------- scoring


def _model(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _data(n: int = 40):
    g = torch.Generator().manual_seed(0)
    return torch.randn((n, 6), generator=g), torch.randint(0, 3, (n,), generator=g)


def test_example_losses_are_per_example_cross_entropy():
    model, (X, Y) = _model(0), _data()
    model.train()
    losses = example_losses(model, X, Y, batch_size=7)
    manual = torch.stack([F.cross_entropy(model(X[i:i + 1]), Y[i:i + 1]) for i in range(len(Y))]).detach()
    assert torch.allclose(losses, manual, atol=1e-6)
    assert model.training  # mode restored


def test_misclassification_scores_are_zero_one():
    model, (X, Y) = _model(0), _data()
    scores = misclassification_scores(model, X, Y, batch_size=16)
    assert torch.equal(scores, (model(X).argmax(1) != Y).float())


def test_score_kinds():
    glob, local, expert, (X, Y) = _model(0), _model(1), _model(2), _data()
    g, l, e = (example_losses(m, X, Y) for m in (glob, local, expert))
    assert torch.equal(score_examples("G", glob, local, None, X, Y), g)
    assert torch.equal(score_examples("L", glob, local, None, X, Y), l)
    assert torch.equal(score_examples("L", glob, None, None, X, Y), g)  # falls back to G
    assert torch.allclose(score_examples("LG", glob, local, None, X, Y), g + l)
    assert torch.allclose(score_examples("LG", glob, None, None, X, Y), 2 * g)  # L falls back to G
    assert torch.equal(score_examples("E", glob, local, expert, X, Y), e)
    assert torch.equal(score_examples("G", glob, None, None, X, Y, scorer="misclassification"),
                       misclassification_scores(glob, X, Y))
    assert client_score(g) == pytest.approx(float(g.mean()))
    with pytest.raises(ValueError, match="expert"):
        score_examples("E", glob, local, None, X, Y)
    with pytest.raises(ValueError, match=r"'X'.*'G', 'L', 'LG', 'E'"):
        score_examples("X", glob, local, None, X, Y)
    with pytest.raises(ValueError, match="scorer"):
        score_examples("G", glob, local, None, X, Y, scorer="margin")


# --------------------------------------------------------------------------- paced batches


def _expected_passes(g, total_steps: int, batch_size: int):
    """Independent model of the documented schedule: (first step, prefix size) of each pass."""
    passes, step = [], 0
    while step < total_steps:
        n = g(step)
        passes.append((step, n))
        step += math.ceil(n / batch_size)
    return passes


def test_paced_batches_draw_only_from_the_allowed_prefix():
    n, total, bs = 200, 60, 16
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    g = pacing_schedule("linear", total_steps=total, n=n, a=0.8, b=0.2)
    batches = list(paced_batches(order, g, total, bs, torch.Generator().manual_seed(2)))
    assert len(batches) == total

    passes = _expected_passes(g, total, bs)
    assert passes[0] == (0, 40) and passes[-1][1] == n  # starts at N·b = 40, ends with all data
    for i, (first, size) in enumerate(passes):
        last = passes[i + 1][0] if i + 1 < len(passes) else total
        pass_batches = batches[first:last]
        allowed = set(order[:size].tolist())
        drawn = [idx for b in pass_batches for idx in b.tolist()]
        assert set(drawn) <= allowed
        assert len(drawn) == len(set(drawn))  # no example twice within a pass
        if last - first == math.ceil(size / bs):  # a complete pass uses the whole prefix
            assert set(drawn) == allowed
    for t, batch in enumerate(batches):  # and so, at every step t, only order[:g(t)]
        assert set(batch.tolist()) <= set(order[:g(t)].tolist())


def test_paced_batches_with_vanilla_pacing_are_shuffled_epochs():
    n, bs = 50, 10
    order = torch.arange(n)
    vanilla = pacing_schedule("step", total_steps=20, n=n, a=1.0, b=1.0)
    batches = list(paced_batches(order, vanilla, 10, bs, torch.Generator().manual_seed(0)))
    first_epoch = torch.cat(batches[:5])
    assert sorted(first_epoch.tolist()) == list(range(n))
    assert first_epoch.tolist() != list(range(n))  # shuffled
    assert sorted(torch.cat(batches[5:]).tolist()) == list(range(n))


def test_paced_batches_are_reproducible_and_leave_the_global_rng_alone():
    order = torch.arange(100)
    g = pacing_schedule("quad", total_steps=30, n=100, a=0.5, b=0.4)
    rng_before = torch.get_rng_state()
    one = list(paced_batches(order, g, 30, 8, torch.Generator().manual_seed(5)))
    two = list(paced_batches(order, g, 30, 8, torch.Generator().manual_seed(5)))
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_paced_batches_reject_a_pacing_outside_the_data():
    with pytest.raises(ValueError, match="pacing returned 0"):
        list(paced_batches(torch.arange(10), lambda t: 0, 5, 4, torch.Generator()))


# --------------------------------------------------------------------------- client selection


def _ranked_scores(n: int) -> dict[int, float]:
    """Client i has score i/10, so in curriculum order client i is at rank i (ids double as ranks)."""
    return {cid: cid / 10 for cid in reversed(range(n))}  # insertion order must not matter


def test_full_pool_covers_every_client_in_one_pass():
    n, k = 10, 3
    sel = ClientCurriculum(_ranked_scores(n), pacing="linear", a=0.5, b=1.0, total_updates=40 * k,
                           clients_per_round=k)
    gen = torch.Generator().manual_seed(0)
    rounds = [sel.select(r, gen) for r in range(1, 41)]
    assert all(len(c) == k and len(set(c)) == k for c in rounds)
    first_pass = {cid for chosen in rounds[:math.ceil(n / k)] for cid in chosen}  # ⌈10/3⌉ = 4 rounds
    assert first_pass == set(range(n))
    counts = Counter()
    for chosen in rounds:
        counts.update(chosen)
        assert max(counts[c] for c in range(n)) - min(counts[c] for c in range(n)) <= 1


@pytest.mark.parametrize("n,k", [(7, 7), (12, 4), (13, 5), (100, 10)])
def test_full_pool_coverage_for_several_sizes(n, k):
    sel = ClientCurriculum(_ranked_scores(n), pacing="step", a=1.0, b=1.0, total_updates=10 * k,
                           clients_per_round=k)
    gen = torch.Generator().manual_seed(1)
    covered = {cid for r in range(1, math.ceil(n / k) + 1) for cid in sel.select(r, gen)}
    assert covered == set(range(n))


def test_client_pool_grows_with_the_pacing():
    # N = 50 clients, K = 5 per round, 20 rounds → T = 100 updates; linear, a = 0.5, b = 0.2:
    # pool(r) = 10 + 40·(5(r−1))/50  → r=1: 10, r=2: 14, r=6: 30, r=11: 50 (then all)
    sel = ClientCurriculum(_ranked_scores(50), pacing="linear", a=0.5, b=0.2, total_updates=100,
                           clients_per_round=5)
    assert [sel.pool_size(r) for r in (1, 2, 6, 11, 20)] == [10, 14, 30, 50, 50]
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for r in range(1, 21):
        chosen = sel.select(r, gen)
        size = sel.pool_size(r)
        sizes.append(size)
        assert all(cid < size for cid in chosen)  # only the `size` easiest clients are eligible
        assert sel.pool(r) == list(range(size))
    assert sizes == sorted(sizes)


def test_client_pool_minimum_is_clients_per_round():
    # N·b = 50·0.2 = 10 eligible clients, fewer than K = 12: the pool is raised to 12
    sel = ClientCurriculum(_ranked_scores(50), pacing="linear", a=0.5, b=0.2, total_updates=240,
                           clients_per_round=12)
    assert sel.pool_size(1) == 12
    assert sorted(sel.select(1, torch.Generator().manual_seed(0))) == list(range(12))


def test_anti_ordering_starts_with_the_hardest_clients():
    sel = ClientCurriculum(_ranked_scores(20), ordering="anti", pacing="step", a=0.5, b=0.25,
                           total_updates=40, clients_per_round=5)
    assert sel.pool(1) == [19, 18, 17, 16, 15]
    assert sorted(sel.select(1, torch.Generator().manual_seed(0))) == [15, 16, 17, 18, 19]


def test_newcomers_join_the_current_pass():
    # pool 10 → 14 at round 2: the 4 newcomers must be chosen before any client repeats
    sel = ClientCurriculum(_ranked_scores(50), pacing="linear", a=0.5, b=0.2, total_updates=100,
                           clients_per_round=5)
    gen = torch.Generator().manual_seed(3)
    chosen = sel.select(1, gen) + sel.select(2, gen)
    assert len(set(chosen)) == 10 and set(chosen) <= set(range(14))


def test_stale_score_updates_reorder_and_are_counted():
    sel = ClientCurriculum({0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, pacing="step", a=1.0, b=0.5,
                           total_updates=8, clients_per_round=2)
    assert sel.pool(1) == [0, 1] and sel.score_reports == 4
    sel.update_scores({0: 0.9, 1: 0.8})  # the two that trained report fresh (now high) scores
    assert sel.pool(1) == [2, 3] and sel.score_reports == 6
    assert sel.scores == {0: 0.9, 1: 0.8, 2: 0.3, 3: 0.4}
    assert sorted(sel.select(1, torch.Generator().manual_seed(0))) == [2, 3]


def test_client_selection_is_reproducible():
    def run(seed):
        sel = ClientCurriculum(_ranked_scores(30), ordering="random", pacing="root", a=0.6, b=0.3,
                               total_updates=60, clients_per_round=4)
        gen = torch.Generator().manual_seed(seed)
        return [sel.select(r, gen) for r in range(1, 16)]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_client_curriculum_rejects_bad_settings():
    scores = _ranked_scores(5)
    with pytest.raises(ValueError, match="exceeds"):
        ClientCurriculum(scores, total_updates=10, clients_per_round=6)
    with pytest.raises(ValueError, match=r"unknown client ordering 'hard'.*curriculum"):
        ClientCurriculum(scores, ordering="hard", total_updates=10, clients_per_round=2)
    with pytest.raises(ValueError, match=r"unknown pacing function 'fast'.*linear"):
        ClientCurriculum(scores, pacing="fast", total_updates=10, clients_per_round=2)
    with pytest.raises(ValueError, match="b "):
        ClientCurriculum(scores, b=0.0, total_updates=10, clients_per_round=2)
    with pytest.raises(ValueError, match="non-finite"):
        ClientCurriculum({**scores, 9: float("nan")}, total_updates=10, clients_per_round=2)
    with pytest.raises(ValueError, match="rounds count from 1"):
        ClientCurriculum(scores, total_updates=10, clients_per_round=2).pool_size(0)
