"""Adversarial examples for any classifier: FGSM, PGD (ℓ∞ and ℓ2), robust accuracy, adversarial loss.

One implementation serves both sides of federated adversarial training (Madry, Makelov,
Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018; Li, Song, Yang, "Federated Adversarial Learning", ICML 2023): clients call
:func:`adversarial_loss` in their local steps, the server calls :func:`robust_accuracy` with a stronger attack for central
evaluation. Keeping the attack here, in ``tasks/``, means both sides attack the same way.

A *model* is any ``nn.Module`` mapping a batch ``x`` to logits. Every attack takes the
task's declared input range ``clip = (lo, hi)`` (floats, or tensors broadcastable to one
example, e.g. per-feature bounds of standardized tabular data) and always returns inputs
inside it: an adversarial example outside the data's domain is not a threat model.

Side effects the attacks avoid, because the caller is usually in the middle of training:

- gradients are taken with :func:`torch.autograd.grad` with respect to the *input only*, and
  the parameters are frozen meanwhile, so nothing accumulates in ``param.grad`` and the
  attack does not build graphs through the weights;
- the attack runs the model in eval mode (no dropout noise in the gradient, no
  BatchNorm running statistics polluted by adversarial batches) and restores the caller's
  train/eval mode and every parameter's ``requires_grad`` afterwards, also on error;
- random starts draw from the ``torch.Generator`` passed in, never from the global RNG, so
  runs are reproducible and other code's random streams are not shifted.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

Bound = float | Tensor
Clip = tuple[Bound, Bound]

NORMS = ("linf", "l2")
ATTACK_KINDS = ("pgd", "fgsm")

# Below this ℓ2 norm a gradient or perturbation is treated as zero (avoids 0/0 in normalization).
_TINY_NORM = 1e-12


# --------------------------------------------------------------------------- validation


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown attack norm {norm!r}; choose one of {list(NORMS)}")


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"attack eps must be a finite number >= 0, got {eps!r}")


def _check_clip(clip: Clip) -> None:
    if not (isinstance(clip, Sequence) and len(clip) == 2):
        raise ValueError(f"clip must be a pair (lo, hi) giving the valid input range, got {clip!r}")
    lo, hi = (torch.as_tensor(b, dtype=torch.float64) for b in clip)
    if not bool(torch.all(lo <= hi)):
        raise ValueError(f"clip (lo, hi) needs lo <= hi everywhere, got {clip!r}")


# --------------------------------------------------------------------------- small tensor helpers


def _bound_like(bound: Bound, x: Tensor) -> Bound:
    """A float stays a float; a tensor bound moves to ``x``'s device and dtype (it broadcasts over the batch)."""
    return bound.to(device=x.device, dtype=x.dtype) if isinstance(bound, Tensor) else float(bound)


def clamp_to_range(x: Tensor, clip: Clip) -> Tensor:
    """Clamp ``x`` into the valid input range ``clip = (lo, hi)`` (floats or per-feature tensors)."""
    lo, hi = (_bound_like(b, x) for b in clip)
    return torch.clamp(x, min=lo, max=hi)


def _per_example_norm(t: Tensor) -> Tensor:
    """ℓ2 norm of each example, shaped to broadcast back over ``t`` (batch, 1, 1, ...)."""
    return t.flatten(1).norm(dim=1).clamp_min(_TINY_NORM).view(-1, *([1] * (t.dim() - 1)))


def project_linf(delta: Tensor, eps: float) -> Tensor:
    """Closest point of the ℓ∞ ball of radius ``eps``: clamp every coordinate."""
    return delta.clamp(-eps, eps)


def project_l2(delta: Tensor, eps: float) -> Tensor:
    """Closest point of each example's ℓ2 ball of radius ``eps``: rescale only the examples outside it."""
    norms = _per_example_norm(delta)
    return delta * torch.clamp(eps / norms, max=1.0)


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    return project_linf(delta, eps) if norm == "linf" else project_l2(delta, eps)


def _steepest_ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """Unit-norm direction of steepest loss increase: sign(g) for ℓ∞, g/‖g‖₂ per example for ℓ2."""
    return grad.sign() if norm == "linf" else grad / _per_example_norm(grad)


def _into_ball_and_range(x: Tensor, x_adv: Tensor, eps: float, norm: str, clip: Clip) -> Tensor:
    """Project ``x_adv`` to the ε-ball around ``x``, then clamp it to the valid range.

    Clamping after projecting keeps both properties: ``x`` lies in the range, so clamping only
    moves each coordinate of the perturbation towards 0, which cannot leave an ℓ∞ or ℓ2 ball.
    """
    return clamp_to_range(x + _project(x_adv - x, eps, norm), clip)


def uniform_in_ball(x: Tensor, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    """A perturbation drawn uniformly from the ε-ball (ℓ∞ cube or ℓ2 ball), one per example.

    Uniform in the ℓ2 ball: a Gaussian direction normalized to the sphere, radius ε·U^(1/d)
    with d the number of input features (the volume of a d-ball grows as r^d).
    Draws happen on the generator's device in fp32 and are then moved to ``x``, so the same
    seed gives the same start whatever device the model runs on.
    """
    _check_norm(norm)
    draw = {"generator": generator, "device": generator.device, "dtype": torch.float32}
    if norm == "linf":
        delta = (torch.rand(x.shape, **draw) * 2.0 - 1.0) * eps
    else:
        batch, dim = x.shape[0], x[0].numel()
        direction = torch.randn((batch, dim), **draw)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(_TINY_NORM)
        radius = eps * torch.rand((batch, 1), **draw) ** (1.0 / dim)
        delta = (direction * radius).view(x.shape)
    return delta.to(device=x.device, dtype=x.dtype)


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with frozen parameters for the duration of an attack; the caller's state comes back after.

    Restores the top-level train/eval flag *and* each submodule's own flag (a caller may keep,
    say, a frozen BatchNorm in eval inside a training model), and each parameter's
    ``requires_grad``.
    """
    module_modes = [(m, m.training) for m in model.modules()]
    param_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in param_flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in module_modes:
            m.training = mode
        for p, flag in param_flags:
            p.requires_grad_(flag)


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """∇ₓ of the summed cross-entropy; summed (not mean) so each example's gradient is independent of batch size."""
    x_var = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x_var), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_var)
    return grad


# --------------------------------------------------------------------------- attacks


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: str = "linf", clip: Clip) -> Tensor:
    """Fast gradient (sign) method: one step of length ε along the steepest-ascent direction.

    ℓ∞: x + ε·sign(∇ₓL) (Goodfellow et al. 2015); ℓ2: x + ε·∇ₓL/‖∇ₓL‖₂ (the fast gradient
    method). A cheap check next to PGD; returns a detached tensor inside the ε-ball and ``clip``.
    ``eps = 0`` returns an exact copy of ``x``.
    """
    _check_norm(norm)
    _check_eps(eps)
    _check_clip(clip)
    x = x.detach()
    if eps == 0:
        return x.clone()
    with attack_mode(model):
        grad = _input_gradient(model, x, y)
    return _into_ball_and_range(x, x + eps * _steepest_ascent_direction(grad, norm), eps, norm, clip)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, step_size: float, *,
        norm: str = "linf", random_start: bool = True, clip: Clip,
        generator: torch.Generator | None = None) -> Tensor:
    """Projected gradient descent on the loss (Madry et al. 2018), the inner maximization of adversarial training.

    Each step moves ``step_size`` along sign(∇ₓL) (ℓ∞) or the per-example normalized gradient
    (ℓ2), then projects back onto the ε-ball around ``x`` and into ``clip``. With
    ``random_start`` the walk starts from a uniform point of the ε-ball drawn from
    ``generator`` (required then: the global RNG is never used). Returns the last iterate,
    detached. ``eps = 0`` returns an exact copy of ``x``.
    """
    _check_norm(norm)
    _check_eps(eps)
    _check_clip(clip)
    if not (isinstance(steps, numbers.Integral) and steps >= 0):
        raise ValueError(f"pgd steps must be an int >= 0, got {steps!r}")
    if not (math.isfinite(step_size) and step_size >= 0):
        raise ValueError(f"pgd step_size must be a finite number >= 0, got {step_size!r}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    if random_start and generator is None:
        raise ValueError("pgd with random_start=True needs a torch.Generator (the global RNG is never used); "
                         "pass generator=... or random_start=False")
    x_adv = x.clone()
    if random_start:
        x_adv = _into_ball_and_range(x, x + uniform_in_ball(x, eps, norm, generator), eps, norm, clip)
    with attack_mode(model):
        for _ in range(steps):
            grad = _input_gradient(model, x_adv, y)
            x_adv = _into_ball_and_range(x, x_adv + step_size * _steepest_ascent_direction(grad, norm),
                                         eps, norm, clip)
    return x_adv.detach()


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """One attack, as a value that travels in run configs and metrics.

    ``step_size=None`` resolves to 2.5·ε/steps, the rule of thumb of Madry et al. that lets
    PGD cross the whole ball from any start. Defaults for [0, 1] images (MNIST-like,
    the Madry challenge): ``AttackConfig(eps=0.3, steps=40, step_size=0.01)``; CIFAR-10:
    ``AttackConfig(eps=8/255, steps=10, step_size=2/255)``.
    """

    kind: str = "pgd"
    norm: str = "linf"
    eps: float
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"unknown attack kind {self.kind!r}; choose one of {list(ATTACK_KINDS)}")
        _check_norm(self.norm)
        _check_eps(self.eps)
        if not (isinstance(self.steps, numbers.Integral) and self.steps >= 1):
            raise ValueError(f"attack steps must be an int >= 1, got {self.steps!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size >= 0):
            raise ValueError(f"attack step_size must be a finite number >= 0 (or None for 2.5·eps/steps), "
                             f"got {self.step_size!r}")

    @property
    def resolved_step_size(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def run(self, model: nn.Module, x: Tensor, y: Tensor, clip: Clip,
            generator: torch.Generator | None = None) -> Tensor:
        """Adversarial examples for the batch ``(x, y)`` under this attack."""
        if self.kind == "fgsm":
            return fgsm(model, x, y, self.eps, norm=self.norm, clip=clip)
        return pgd(model, x, y, self.eps, self.steps, self.resolved_step_size, norm=self.norm,
                   random_start=self.random_start, clip=clip, generator=generator)

    def describe(self) -> dict[str, Any]:
        """Flat, JSON- and ConfigRecord-friendly record of the attack (step size resolved), for metrics files."""
        record = asdict(self)
        record["step_size"] = self.resolved_step_size
        if self.kind == "fgsm":  # one step of length eps: steps/step size/random start do not apply
            record.update(steps=1, step_size=self.eps, random_start=False)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "AttackConfig":
        """Inverse of :meth:`describe` (and the way a client rebuilds the attack from a message's config)."""
        known = {"kind", "norm", "eps", "steps", "step_size", "random_start"}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"unknown attack setting(s) {unknown}; valid keys are {sorted(known)}")
        if "eps" not in record:
            raise ValueError("attack setting 'eps' is required")
        kwargs = dict(record)
        kwargs["eps"] = float(kwargs["eps"])
        if "steps" in kwargs:
            kwargs["steps"] = int(kwargs["steps"])
        if kwargs.get("step_size") is not None:
            kwargs["step_size"] = float(kwargs["step_size"])
        if "random_start" in kwargs:
            kwargs["random_start"] = bool(kwargs["random_start"])
        return cls(**kwargs)


# --------------------------------------------------------------------------- evaluation and training


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


def robust_accuracy(model: nn.Module, X: Tensor | np.ndarray, Y: Tensor | np.ndarray,
                    attack_cfg: AttackConfig, clip: Clip, batch_size: int = 256,
                    generator: torch.Generator | None = None) -> float:
    """Accuracy on adversarial examples made batch by batch against ``model`` itself (white-box).

    With ``eps = 0`` this is the clean accuracy. Batches are moved to the model's device;
    the model's modes are restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    X, Y = torch.as_tensor(X), torch.as_tensor(Y)
    if len(X) != len(Y):
        raise ValueError(f"X and Y differ in length: {len(X)} inputs, {len(Y)} labels")
    if len(Y) == 0:
        raise ValueError("robust_accuracy needs at least one example")
    device = _model_device(model, X.device)
    correct = 0
    for start in range(0, len(Y), batch_size):
        xb = X[start:start + batch_size].to(device)
        yb = Y[start:start + batch_size].to(device)
        x_adv = attack_cfg.run(model, xb, yb, clip, generator)
        with attack_mode(model), torch.no_grad():
            correct += int((model(x_adv).argmax(dim=1) == yb).sum())
    return correct / len(Y)


def adversarial_loss(model: nn.Module, x: Tensor, y: Tensor, attack_cfg: AttackConfig, clip: Clip,
                     mix: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Training loss (1 − mix)·CE(clean) + mix·CE(adversarial), differentiable in the model's parameters.

    The adversarial batch is made with the current model (the inner maximization), then the
    loss is computed in the caller's mode (the outer minimization). ``mix = 1`` is pure
    adversarial training (Madry); ``mix = 0`` or ``eps = 0`` returns exactly the clean loss,
    same value and same gradient, so federated adversarial training with ε = 0 is FedAvg.
    """
    if not (isinstance(mix, numbers.Real) and 0.0 <= mix <= 1.0):
        raise ValueError(f"adversarial mix must be in [0, 1], got {mix!r}")
    if attack_cfg.eps == 0 or mix == 0:
        return F.cross_entropy(model(x), y)
    x_adv = attack_cfg.run(model, x, y, clip, generator)
    adv_loss = F.cross_entropy(model(x_adv), y)
    if mix == 1:
        return adv_loss
    return (1.0 - mix) * F.cross_entropy(model(x), y) + mix * adv_loss
