"""Gradient inversion: reconstruct a client's input from the gradient (or sketch) it sent.

Two attacks from the literature, for privacy studies (how much does a raw,
sketched or noised update leak?):

- **DLG** (Zhu, Liu, Han 2019, "Deep Leakage from Gradients"): optimise a dummy
  input (and, unless the label is known, a soft label) so that its gradient
  matches the observed one in squared L2 distance, with L-BFGS. **iDLG** (Zhao
  et al. 2020) first reads a single sample's label off the last layer's
  gradient: with softmax cross-entropy, ``∂L/∂b_i = p_i - y_i`` is negative only
  at the true class (and so is the weight row's sum when the layer's inputs are
  non-negative), which makes the rest of the problem much better posed.
- **Inverting Gradients** (Geiping, Bauermeister, Dröge, Moeller 2020): minimise
  ``1 - cos(∇̂, g) + λ·TV(x)`` with Adam (lr 0.1, step decay ×0.1 at 3/8, 5/8, 7/8
  of the run, signed gradients) and project ``x`` onto the data range after every
  step. Cosine ignores the update's scale (learning rate, averaging), which is
  why it is the stronger attack on real updates.

Both attack a *known linear observation*: pass ``project`` (e.g. a sketch's
``apply``, ``R·v``) and the attacker matches ``project(∇̂)`` with the received
sketch; the shared-seed sketch is known to every party, hence to an
honest-but-curious server. For label inference under a projection the attacker
uses ``Rᵀ·sketch`` (the adjoint, obtained by autograd from ``project``), an
unbiased estimate of the gradient when ``E[RᵀR] = I``.

Batch size 1 is the standard DLG setting and the default; larger batches work
with given labels or (for iDLG inference) distinct labels, and the
reconstructions are matched to the originals before scoring.

The observed ``target`` is the gradient of the *mean* cross-entropy loss over
the batch with respect to ``model.parameters()`` (those requiring grad),
flattened in that order. A one-step update ``Δ = -η·g`` is the same up to scale:
pass ``-Δ/η`` to DLG; IG needs no rescaling.

Pure tensor code (torch); every random draw uses the caller's ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Projection = Callable[[Tensor], Tensor]

# PSNR is capped at 120 dB (an fp32-exact reconstruction) so averages stay finite.
_MSE_FLOOR = 1e-12


@dataclass
class AttackResult:
    """A reconstruction: inputs in the data range, predicted labels, final matching loss."""

    inputs: Tensor
    labels: Tensor
    loss: float
    iterations: int


# -- gradients of the model ----------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy for hard (int) labels or soft (probability) labels."""
    if labels.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, labels.long())
    return torch.mean(torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1))


def model_gradient(model: nn.Module, inputs: Tensor, labels: Tensor, create_graph: bool = False) -> Tensor:
    """Flat gradient of the mean loss at ``(inputs, labels)``: what a client with one local step reveals."""
    params = trainable_parameters(model)
    loss = cross_entropy(model(inputs), labels)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return torch.cat([g.reshape(-1) for g in grads])


def linear_adjoint(project: Projection, observed: Tensor, d: int) -> Tensor:
    """``Rᵀ·y`` for a linear ``project = R·``, by one vector-Jacobian product (no matrix needed)."""
    probe = torch.zeros(d, dtype=observed.dtype, device=observed.device, requires_grad=True)
    (adjoint,) = torch.autograd.grad(project(probe), probe, grad_outputs=observed)
    return adjoint.detach()


def last_layer_gradients(model: nn.Module, gradient: Tensor) -> tuple[Tensor, Tensor | None]:
    """The output layer's weight gradient (classes × features) and bias gradient, sliced from a flat gradient.

    The output layer is taken to be the last 2-D parameter, optionally followed
    by its 1-D bias, as in every ``nn.Linear`` head.
    """
    params = trainable_parameters(model)
    sizes = [p.numel() for p in params]
    if sum(sizes) != gradient.numel():
        raise ValueError(f"gradient has {gradient.numel()} entries but the model has {sum(sizes)} trainable parameters")
    pieces = list(torch.split(gradient, sizes))
    weight_index = max((i for i, p in enumerate(params) if p.dim() == 2), default=None)
    if weight_index is None:
        raise ValueError("model has no 2-D (linear) output layer to read labels from")
    weight = pieces[weight_index].reshape(params[weight_index].shape)
    bias = None
    if weight_index + 1 < len(params) and params[weight_index + 1].dim() == 1 \
            and params[weight_index + 1].numel() == weight.shape[0]:
        bias = pieces[weight_index + 1]
    return weight, bias


def infer_labels(model: nn.Module, gradient: Tensor, batch_size: int = 1) -> Tensor:
    """iDLG label inference: the classes whose output-layer gradient is most negative.

    Exact for one sample (only the true class has ``p - y < 0``); for a batch it
    returns ``batch_size`` distinct classes, right when the labels are distinct.
    Uses the bias gradient when there is one, else the weight rows' sums (which
    have the bias's sign when the layer's inputs are non-negative).
    """
    weight, bias = last_layer_gradients(model, gradient)
    score = bias if bias is not None else weight.sum(dim=1)
    if batch_size > score.numel():
        raise ValueError(f"batch_size {batch_size} exceeds the number of classes {score.numel()}")
    return torch.argsort(score)[:batch_size].sort().values


# -- image priors and metrics --------------------------------------------------------------

def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference between neighbouring pixels (last two dims); 0 for flat inputs."""
    if x.dim() < 3:
        return x.new_zeros(())
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return dh + dw


def mse(reference: Tensor, reconstruction: Tensor) -> float:
    return float(torch.mean((reference.detach().double() - reconstruction.detach().double()) ** 2))


def psnr(reference: Tensor, reconstruction: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10·log10(range² / MSE)``, in dB, averaged per sample of a batch."""
    values = []
    for ref, rec in zip(reference, reconstruction):
        err = max(mse(ref, rec), _MSE_FLOOR * data_range ** 2)
        values.append(10.0 * math.log10(data_range ** 2 / err))
    return float(sum(values) / len(values))


def label_accuracy(true_labels: Tensor, predicted_labels: Tensor) -> float:
    return float((true_labels.reshape(-1).cpu() == predicted_labels.reshape(-1).cpu()).double().mean())


def match_reconstructions(reference: Tensor, reconstruction: Tensor) -> list[int]:
    """For each reference sample, the index of its reconstruction (greedy by MSE).

    Gradients are permutation-invariant within a batch, so a batch attack
    recovers the samples in arbitrary order.
    """
    b = reference.shape[0]
    cost = torch.cdist(reference.reshape(b, -1).double(), reconstruction.reshape(b, -1).double())
    order, used = [-1] * b, set()
    for flat in torch.argsort(cost.reshape(-1)).tolist():
        i, j = divmod(flat, b)
        if order[i] < 0 and j not in used:
            order[i] = j
            used.add(j)
    return order


# -- the attacks ---------------------------------------------------------------------------

def _check_attack_args(target: Tensor, input_shape: Sequence[int], num_classes: int, data_range: tuple[float, float],
                       iterations: int, batch_size: int, generator: torch.Generator) -> None:
    if not isinstance(target, Tensor) or target.dim() != 1:
        raise ValueError("target must be the observed gradient (or its projection) as a flat 1-D tensor")
    if not input_shape or any(int(s) <= 0 for s in input_shape):
        raise ValueError(f"input_shape must be the shape of one input, got {tuple(input_shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not data_range[0] < data_range[1]:
        raise ValueError(f"data_range must be (low, high) with low < high, got {data_range}")
    if iterations <= 0 or batch_size <= 0:
        raise ValueError(f"iterations and batch_size must be positive, got {iterations}, {batch_size}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator seeded by the caller")


def _resolve_labels(model: nn.Module, target: Tensor, project: Projection | None, labels: Tensor | None,
                    batch_size: int, infer: bool) -> Tensor | None:
    """Known labels, or iDLG's inferred ones (from ``Rᵀ·sketch`` under a projection), or None (soft labels)."""
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).long()
        if labels.numel() != batch_size:
            raise ValueError(f"labels has {labels.numel()} entries for a batch of {batch_size}")
        return labels
    if not infer:
        return None
    d = sum(p.numel() for p in trainable_parameters(model))
    gradient = target if project is None else linear_adjoint(project, target, d)
    return infer_labels(model, gradient, batch_size)


def _observe(model: nn.Module, x: Tensor, labels: Tensor, project: Projection | None) -> Tensor:
    grad = model_gradient(model, x, labels, create_graph=True)
    return grad if project is None else project(grad)


def dlg_attack(model: nn.Module, target: Tensor, input_shape: Sequence[int], num_classes: int, *,
               generator: torch.Generator, project: Projection | None = None, batch_size: int = 1,
               data_range: tuple[float, float] = (0.0, 1.0), iterations: int = 300, labels: Tensor | None = None,
               infer_label: bool = True) -> AttackResult:
    """DLG / iDLG: L-BFGS on ``||project(∇̂) - target||²`` over a dummy input (and soft label).

    ``infer_label=True`` (iDLG) fixes the label from the gradient; ``False`` is
    the original DLG, which also optimises soft-label logits. ``iterations``
    bounds the L-BFGS iterations (strong-Wolfe line search keeps it from
    diverging, the usual failure of the original lr-1 step). The result is
    clamped to ``data_range``, which the attacker knows.
    """
    _check_attack_args(target, input_shape, num_classes, data_range, iterations, batch_size, generator)
    target = target.detach().to(torch.float32)
    fixed_labels = _resolve_labels(model, target, project, labels, batch_size, infer_label)
    dummy = torch.randn((batch_size, *input_shape), generator=generator).requires_grad_(True)
    variables = [dummy]
    label_logits = None
    if fixed_labels is None:
        label_logits = torch.randn((batch_size, num_classes), generator=generator).requires_grad_(True)
        variables.append(label_logits)
    optimizer = torch.optim.LBFGS(variables, lr=1.0, max_iter=iterations, max_eval=int(iterations * 1.25),
                                  history_size=100, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        y = fixed_labels if label_logits is None else F.softmax(label_logits, dim=-1)
        loss = torch.sum((_observe(model, dummy, y, project) - target) ** 2)
        loss.backward()
        return loss

    optimizer.step(closure)
    predicted = fixed_labels if label_logits is None else label_logits.detach().argmax(dim=-1)
    y = fixed_labels if label_logits is None else F.softmax(label_logits.detach(), dim=-1)
    final = torch.sum((_observe(model, dummy.detach(), y, project).detach() - target) ** 2)
    # L-BFGS can blow up on an ill-posed target (e.g. heavy noise): report that as a failed reconstruction.
    reconstruction = torch.nan_to_num(dummy.detach(), nan=0.0, posinf=0.0, neginf=0.0).clamp(*data_range)
    n_iter = int(optimizer.state[dummy].get("n_iter", 0))
    return AttackResult(reconstruction, predicted, float(final), n_iter)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 - cos(a, b)`` over whole flat vectors (Geiping et al. use the full-gradient cosine)."""
    return 1.0 - torch.dot(a, b) / (a.norm() * b.norm() + 1e-12)


def inverting_gradients_attack(model: nn.Module, target: Tensor, input_shape: Sequence[int], num_classes: int, *,
                               generator: torch.Generator, project: Projection | None = None, batch_size: int = 1,
                               data_range: tuple[float, float] = (0.0, 1.0), iterations: int = 300,
                               labels: Tensor | None = None, lr: float = 0.1, tv_weight: float = 1e-4,
                               signed: bool = True) -> AttackResult:
    """Inverting Gradients: Adam on cosine distance + TV, projected onto the data range.

    Labels are given or inferred (iDLG), as in the paper. ``signed`` uses the
    sign of the input gradient, the authors' choice for stable steps.
    """
    _check_attack_args(target, input_shape, num_classes, data_range, iterations, batch_size, generator)
    target = target.detach().to(torch.float32)
    fixed_labels = _resolve_labels(model, target, project, labels, batch_size, True)
    low, high = data_range
    dummy = (torch.rand((batch_size, *input_shape), generator=generator) * (high - low) + low).requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    loss = torch.tensor(math.inf)
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = cosine_distance(_observe(model, dummy, fixed_labels, project), target) \
            + tv_weight * total_variation(dummy)
        loss.backward()
        if signed:
            dummy.grad.sign_()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            dummy.clamp_(low, high)
    return AttackResult(dummy.detach().clone(), fixed_labels, float(loss.detach()), iterations)


ATTACKS: dict[str, Callable[..., AttackResult]] = {"dlg": dlg_attack, "ig": inverting_gradients_attack}


# -- trials --------------------------------------------------------------------------------

def observed_update(model: nn.Module, inputs: Tensor, labels: Tensor, *, project: Projection | None = None,
                    clip_norm: float | None = None, noise_std: float = 0.0, noise_site: str = "gradient",
                    generator: torch.Generator | None = None) -> Tensor:
    """What the attacker receives: the gradient, optionally clipped, noised and projected.

    ``noise_site='gradient'`` noises before the projection (clip-and-noise Δ,
    then sketch); ``'observed'`` noises the projection itself (sketch-space DP).
    """
    if noise_site not in ("gradient", "observed"):
        raise ValueError(f"noise_site must be 'gradient' or 'observed', got {noise_site!r}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    if noise_std > 0 and generator is None:
        raise ValueError("noise_std > 0 needs a private torch.Generator")
    with torch.enable_grad():
        grad = model_gradient(model, inputs, labels).detach()
    if clip_norm is not None:
        grad = grad * min(1.0, clip_norm / max(float(grad.norm()), 1e-30))
    if noise_std > 0 and noise_site == "gradient":
        grad = grad + noise_std * torch.randn(grad.shape, generator=generator)
    observed = grad if project is None else project(grad).detach()
    if noise_std > 0 and noise_site == "observed":
        observed = observed + noise_std * torch.randn(observed.shape, generator=generator)
    return observed


def run_attack_trials(model: nn.Module, inputs: Tensor, labels: Tensor, *, attack: str = "dlg",
                      seeds: Sequence[int] = (0,), batch_size: int = 1, project: Projection | None = None,
                      clip_norm: float | None = None, noise_std: float = 0.0, noise_site: str = "gradient",
                      num_classes: int | None = None, data_range: tuple[float, float] = (0.0, 1.0),
                      iterations: int = 300, **attack_options) -> dict:
    """Attack each batch of ``inputs`` once per seed and average MSE, PSNR and label accuracy.

    ``inputs`` has shape ``(n, *input_shape)``, split into ``n // batch_size``
    batches. The noise on the observed update and the attacker's initialisation
    draw from separate generators seeded by ``seed``, so trials are reproducible.
    Reconstructions are matched to the originals (:func:`match_reconstructions`)
    before MSE/PSNR; labels are compared as multisets (a batch has no order).

    On a tiny model, ``torch.set_num_threads(1)`` is usually faster: OpenMP
    threads only add contention at these sizes.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {sorted(ATTACKS)}, got {attack!r}")
    if inputs.shape[0] < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} inputs, got {inputs.shape[0]}")
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model(inputs[:1]).shape[-1])
    input_shape = tuple(inputs.shape[1:])
    trials = []
    for start in range(0, inputs.shape[0] - batch_size + 1, batch_size):
        x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
        for seed in seeds:
            noise_gen = torch.Generator().manual_seed(10_000 + int(seed) * 7919 + start)
            observed = observed_update(model, x, y, project=project, clip_norm=clip_norm, noise_std=noise_std,
                                       noise_site=noise_site, generator=noise_gen)
            result = ATTACKS[attack](model, observed, input_shape, num_classes,
                                     generator=torch.Generator().manual_seed(int(seed)), project=project,
                                     batch_size=batch_size, data_range=data_range, iterations=iterations,
                                     **attack_options)
            order = match_reconstructions(x, result.inputs)
            rec = result.inputs[order]
            span = data_range[1] - data_range[0]
            trials.append({"start": start, "seed": int(seed), "mse": mse(x, rec), "psnr": psnr(x, rec, span),
                           "label_accuracy": label_accuracy(y.sort().values, result.labels.sort().values),
                           "loss": result.loss})
    psnrs = torch.tensor([t["psnr"] for t in trials], dtype=torch.float64)
    return {
        "attack": attack, "trials": len(trials), "batch_size": batch_size, "iterations": iterations,
        "projected": project is not None, "clip_norm": clip_norm, "noise_std": noise_std, "noise_site": noise_site,
        "mse": float(sum(t["mse"] for t in trials) / len(trials)),
        "psnr": float(psnrs.mean()), "psnr_std": float(psnrs.std()) if len(trials) > 1 else 0.0,
        "psnr_min": float(psnrs.min()), "psnr_max": float(psnrs.max()),
        "label_accuracy": float(sum(t["label_accuracy"] for t in trials) / len(trials)),
        "per_trial": trials,
    }


# -- command line: a quick leakage study on 8×8 digits ----------------------------------------

def _digits(n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` scikit-learn 8×8 digits scaled to [0, 1] (bundled with sklearn, no download)."""
    from sklearn.datasets import load_digits  # only the CLI needs it

    digits = load_digits()
    images = torch.tensor(digits.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target[:n], dtype=torch.int64)


def sigmoid_mlp(input_shape: Sequence[int], num_classes: int, hidden: int, seed: int) -> nn.Module:
    """A small twice-differentiable MLP (sigmoid, as in DLG) with weights from a private generator."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.Sigmoid(),
                          nn.Linear(hidden, num_classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def gaussian_projection(d: int, s: int, seed: int) -> Projection:
    """A dense seeded Gaussian sketch ``v ↦ R v`` with entries N(0, 1/s) (so E[RᵀR] = I)."""
    matrix = torch.randn((s, d), generator=torch.Generator().manual_seed(seed)) / math.sqrt(s)
    return lambda v: matrix @ v


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m stamen.privacy.attacks.gradient_inversion --attack ig --sketch-dim 300 --noise-multiplier 0.1``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Gradient inversion against raw, sketched or noised gradients "
                                                 "of a small MLP on 8x8 digits.")
    parser.add_argument("--attack", choices=sorted(ATTACKS), default="dlg")
    parser.add_argument("--inputs", type=int, default=4, help="digits attacked (batches of --batch-size)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--sketch-dim", type=int, default=0, help="s of a known Gaussian sketch; 0 = raw gradient")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--noise-multiplier", type=float, default=0.0, help="z: noise std = z * clip-norm")
    parser.add_argument("--noise-site", choices=["gradient", "observed"], default="gradient")
    parser.add_argument("--per-trial", action="store_true", help="also print every trial")
    args = parser.parse_args(argv)

    inputs, labels = _digits(args.inputs)
    model = sigmoid_mlp(inputs.shape[1:], 10, args.hidden, args.model_seed)
    d = sum(p.numel() for p in trainable_parameters(model))
    project = gaussian_projection(d, args.sketch_dim, args.model_seed + 1) if args.sketch_dim else None
    report = run_attack_trials(model, inputs, labels, attack=args.attack, seeds=args.seeds,
                               batch_size=args.batch_size, project=project, clip_norm=args.clip_norm,
                               noise_std=args.noise_multiplier * args.clip_norm, noise_site=args.noise_site,
                               iterations=args.iterations)
    report.update(d=d, sketch_dim=args.sketch_dim, noise_multiplier=args.noise_multiplier)
    if not args.per_trial:
        report.pop("per_trial")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
