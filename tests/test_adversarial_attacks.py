"""FGSM / PGD: ε-ball and valid range, exact ε = 0, strength on a trained model, no side effects."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

from stamen.tasks.attacks import AttackConfig, adversarial_loss, fgsm, pgd, robust_accuracy

CLIP = (0.0, 1.0)
TOL = 1e-6  # float32 rounding of x + δ − x


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp(generator: torch.Generator, hidden: int = 32) -> nn.Module:
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="module")
def digits():
    """load_digits scaled to [0, 1], split 75/25, with an MLP trained on it (well under a second)."""
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    Xtr, Xte = torch.tensor(Xtr, dtype=torch.float32), torch.tensor(Xte, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    model = _mlp(torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(Xtr), ytr).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, Xte, yte


def _batch(n: int = 16, d: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, d), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _linf(a, b):
    return (a - b).abs().flatten(1).max(dim=1).values


def _l2(a, b):
    return (a - b).flatten(1).norm(dim=1)


# --------------------------------------------------------------------------- ε-ball and range


@pytest.mark.parametrize("eps", [0.05, 0.3, 2.0])
def test_fgsm_linf_inside_ball_and_range(eps):
    model = _mlp(torch.Generator().manual_seed(2))
    x, y = _batch()
    x_adv = fgsm(model, x, y, eps, clip=CLIP)
    assert torch.all(_linf(x_adv, x) <= eps + TOL)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("eps", [0.1, 1.0, 5.0])
def test_fgsm_l2_inside_ball_and_range(eps):
    model = _mlp(torch.Generator().manual_seed(2))
    x, y = _batch()
    x_adv = fgsm(model, x, y, eps, norm="l2", clip=CLIP)
    assert torch.all(_l2(x_adv, x) <= eps * (1 + 1e-5))
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.03), ("linf", 0.5, 0.2), ("l2", 0.5, 0.2), ("l2", 3.0, 1.0)])
def test_pgd_inside_ball_and_range(norm, eps, step):
    model = _mlp(torch.Generator().manual_seed(3))
    x, y = _batch()
    x_adv = pgd(model, x, y, eps, 7, step, norm=norm, clip=CLIP, generator=torch.Generator().manual_seed(0))
    dist = _linf(x_adv, x) if norm == "linf" else _l2(x_adv, x)
    assert torch.all(dist <= eps * (1 + 1e-5) + TOL)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not torch.equal(x_adv, x)


def test_pgd_respects_per_feature_range():
    """Standardized tabular data declares one (lo, hi) per feature; every coordinate must respect its own."""
    model = _mlp(torch.Generator().manual_seed(4))
    x, y = _batch()
    lo = torch.linspace(-0.5, 0.2, 64)
    hi = lo + 1.0
    x = torch.maximum(torch.minimum(x - 0.3, hi), lo)
    x_adv = pgd(model, x, y, 0.4, 5, 0.2, clip=(lo, hi), generator=torch.Generator().manual_seed(0))
    assert torch.all(x_adv >= lo) and torch.all(x_adv <= hi)
    assert torch.all(_linf(x_adv, x) <= 0.4 + TOL)


def test_random_start_uses_the_generator_only():
    model = _mlp(torch.Generator().manual_seed(5))
    x, y = _batch()
    run = lambda seed: pgd(model, x, y, 0.2, 0, 0.05, clip=CLIP, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    with pytest.raises(ValueError, match="Generator"):
        pgd(model, x, y, 0.2, 3, 0.05, clip=CLIP)


def test_l2_random_start_fills_the_ball():
    """Uniform in a d-ball: P(‖δ‖ ≤ r·ε) = r^d; with d = 2 the median radius is ε/√2."""
    model = nn.Linear(2, 3)
    x = torch.full((4000, 2), 0.5)
    y = torch.zeros(4000, dtype=torch.long)
    x_adv = pgd(model, x, y, 0.4, 0, 0.1, norm="l2", clip=CLIP, generator=torch.Generator().manual_seed(0))
    radii = _l2(x_adv, x)
    assert radii.max() <= 0.4 + TOL
    assert abs(float(radii.median()) - 0.4 / 2**0.5) < 0.01


# --------------------------------------------------------------------------- ε = 0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_returns_x_exactly(norm):
    model = _mlp(torch.Generator().manual_seed(6))
    x, y = _batch()
    assert torch.equal(fgsm(model, x, y, 0.0, norm=norm, clip=CLIP), x)
    assert torch.equal(pgd(model, x, y, 0.0, 10, 0.1, norm=norm, clip=CLIP,
                           generator=torch.Generator().manual_seed(0)), x)
    cfg = AttackConfig(eps=0.0, norm=norm, steps=5)
    assert torch.equal(cfg.run(model, x, y, CLIP, torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_adversarial_loss_eps_zero_is_clean_loss_exactly(mix):
    model = _mlp(torch.Generator().manual_seed(7))
    x, y = _batch()
    clean = F.cross_entropy(model(x), y)
    clean_grads = torch.autograd.grad(clean, list(model.parameters()))
    loss = adversarial_loss(model, x, y, AttackConfig(eps=0.0), CLIP, mix=mix,
                            generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.item() == clean.item()
    assert all(torch.equal(a, b) for a, b in zip(grads, clean_grads))


def test_adversarial_loss_mixes_clean_and_adversarial():
    model = _mlp(torch.Generator().manual_seed(8))
    x, y = _batch()
    cfg = AttackConfig(eps=0.2, steps=5)
    x_adv = cfg.run(model, x, y, CLIP, torch.Generator().manual_seed(3))
    expected = 0.7 * F.cross_entropy(model(x), y) + 0.3 * F.cross_entropy(model(x_adv), y)
    loss = adversarial_loss(model, x, y, cfg, CLIP, mix=0.3, generator=torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    pure = adversarial_loss(model, x, y, cfg, CLIP, mix=1.0, generator=torch.Generator().manual_seed(3))
    assert pure.item() == pytest.approx(F.cross_entropy(model(x_adv), y).item(), rel=1e-6)
    assert pure.item() > F.cross_entropy(model(x), y).item()


# --------------------------------------------------------------------------- strength


def test_pgd_lowers_accuracy_of_a_trained_model(digits, capsys):
    model, X, Y = digits
    clean = robust_accuracy(model, X, Y, AttackConfig(eps=0.0), CLIP, batch_size=128)
    fgsm_acc = robust_accuracy(model, X, Y, AttackConfig(kind="fgsm", eps=0.3), CLIP, batch_size=128)
    pgd_acc = robust_accuracy(model, X, Y, AttackConfig(eps=0.3, steps=20, step_size=0.03), CLIP,
                              batch_size=128, generator=torch.Generator().manual_seed(0))
    with capsys.disabled():
        print(f"\n[digits MLP] clean {clean:.3f}  FGSM(0.3) {fgsm_acc:.3f}  PGD-20(0.3) {pgd_acc:.3f}")
    assert clean > 0.9
    assert pgd_acc < clean - 0.5
    assert pgd_acc <= fgsm_acc


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_pgd_at_least_as_strong_as_fgsm_at_moderate_eps(digits, norm, eps):
    """At ε = 0.3 both attacks break the model; at smaller ε the iterated attack must still win."""
    model, X, Y = digits
    clean = robust_accuracy(model, X, Y, AttackConfig(eps=0.0), CLIP)
    fgsm_acc = robust_accuracy(model, X, Y, AttackConfig(kind="fgsm", norm=norm, eps=eps), CLIP)
    pgd_acc = robust_accuracy(model, X, Y, AttackConfig(norm=norm, eps=eps, steps=20), CLIP,
                              generator=torch.Generator().manual_seed(0))
    assert pgd_acc <= fgsm_acc < clean
    assert pgd_acc < clean - 0.3


# --------------------------------------------------------------------------- no side effects


def test_attacks_leave_model_and_global_rng_untouched():
    model = _mlp(torch.Generator().manual_seed(9))
    model.train()
    model[2].requires_grad_(False)  # a caller's frozen layer must stay frozen
    model[0].eval()  # and a submodule's own mode must come back as it was
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng_before = torch.get_rng_state()

    fgsm(model, x, y, 0.1, clip=CLIP)
    pgd(model, x, y, 0.1, 5, 0.03, clip=CLIP, generator=torch.Generator().manual_seed(0))
    pgd(model, x, y, 0.5, 5, 0.2, norm="l2", clip=CLIP, generator=torch.Generator().manual_seed(0))
    robust_accuracy(model, x, y, AttackConfig(eps=0.1, steps=3), CLIP, generator=torch.Generator().manual_seed(0))

    assert torch.equal(torch.get_rng_state(), rng_before)
    assert model.training and model[2].training and not model[0].training
    assert model[0].weight.requires_grad and not model[2].weight.requires_grad
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n])
        if grads_before[n] is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, grads_before[n])


def test_attack_inside_no_grad_context():
    """Server evaluation often runs under torch.no_grad(); the attack still needs its input gradient."""
    model = _mlp(torch.Generator().manual_seed(10))
    x, y = _batch()
    with torch.no_grad():
        x_adv = pgd(model, x, y, 0.1, 3, 0.05, clip=CLIP, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(x_adv, x)


def test_mode_restored_after_an_error():
    model = _mlp(torch.Generator().manual_seed(11))
    model.train()
    x, _ = _batch()
    with pytest.raises(Exception):
        fgsm(model, x, torch.full((16,), 99), 0.1, clip=CLIP)  # label out of range
    assert model.training and all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- configuration and errors


def test_attack_config_describe_round_trips():
    cfg = AttackConfig(eps=0.3, steps=40, step_size=0.01)
    assert cfg.describe() == {"kind": "pgd", "norm": "linf", "eps": 0.3, "steps": 40, "step_size": 0.01,
                              "random_start": True}
    assert AttackConfig.from_dict(cfg.describe()) == cfg
    assert AttackConfig(eps=0.2, steps=10).describe()["step_size"] == pytest.approx(0.05)  # 2.5·ε/steps
    fgsm_cfg = AttackConfig(kind="fgsm", norm="l2", eps=1.0)
    assert fgsm_cfg.describe()["steps"] == 1 and fgsm_cfg.describe()["random_start"] is False
    assert AttackConfig.from_dict(fgsm_cfg.describe()).describe() == fgsm_cfg.describe()


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "cw", "eps": 0.1}, "pgd"),
    ({"norm": "l1", "eps": 0.1}, "linf"),
    ({"eps": -0.1}, "eps"),
    ({"eps": 0.1, "steps": 0}, "steps"),
    ({"eps": 0.1, "step_size": -1.0}, "step_size"),
])
def test_attack_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)


def test_bad_arguments_raise_clear_errors():
    model = _mlp(torch.Generator().manual_seed(12))
    x, y = _batch()
    with pytest.raises(ValueError, match="lo <= hi"):
        fgsm(model, x, y, 0.1, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="mix"):
        adversarial_loss(model, x, y, AttackConfig(eps=0.1), CLIP, mix=1.5)
    with pytest.raises(ValueError, match="unknown attack setting"):
        AttackConfig.from_dict({"eps": 0.1, "radius": 2})
