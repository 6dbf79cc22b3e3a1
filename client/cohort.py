"""The cohort trained as one vectorised computation.

The per-client loop (:func:`stamen.client.trainers.run_local_steps`) trains one client at a
time: for a small model every optimizer step is a handful of tiny kernels and the time goes
to Python and dispatch, not arithmetic. Here the clients of a round (a carrier's pack, or the
whole cohort on the in-process grid) train *together*: their parameters are stacked along a
leading client axis and every step is one batched forward/backward for all of them. Each
client still has

- its own parameters, starting from its own downlink's weights;
- its own optimizer state (SGD momentum buffers, Adam moments) and step count;
- its own batches: the same index batches the loop would draw from its own generator
  (run seed, round, partition), in the same order;
- its own number of steps: clients are ordered by how many steps they take (most first), so
  the clients still training at step t are a prefix of the stack and every update acts on a
  view of that prefix. A client that is done is not computed at all (masking by exclusion,
  no fake data); inside a step, a last short batch is padded to the batch size with rows of
  weight 0, which contribute exactly nothing.

The result equals the loop's up to float rounding (``tests/test_cohort.py`` compares both for
SGD, momentum, Adam, weight decay, FedProx's proximal term and the adversarial trainer). For
the batched-matmul models (mlp, logreg) the computation of one client does not depend on which
other clients share its stack: every kernel acts on each client's slice with the same shapes,
so a carrier that trains 3 of a round's clients, a SuperNode that trains one, and the
in-process grid that trains all of them give the same floats. (Grouped convolutions, the cnn,
may round differently with the stack's size: within the loop's tolerance, not bit for bit.)

Two forward paths:

- models that are a chain of known layers (``nn.Sequential`` trees and Stamen's ``mlp``,
  ``logreg``, ``cnn``; Linear, Conv2d, pooling, Flatten, element-wise activations) run as
  batched matmuls (``baddbmm``) and grouped convolutions on the stacked parameters;
- any other model without buffers or random layers runs through ``torch.func``
  (``vmap`` over ``functional_call``).

The gradient is that of the sum of the clients' losses (clients are independent, so each slice
of it is that client's own): written out by hand for chains of Linear / ReLU / Flatten under
plain cross-entropy (softmax − one-hot, then the chain rule: half the time of autograd's tape
for small stacks), ordinary autograd otherwise. The optimizer is the same arithmetic as
``torch.optim.SGD`` / ``Adam`` on the stacked tensors.

What is not vectorised falls back to the loop, and says so once per process in the log: a
trainer without a vectorised form (:data:`VECTORISED`; today ``sgd`` and ``adversarial`` have
one; curriculum, FedLEx's explore/guided, Ferret's steps and FedKSeed do not), a model that
declares ``vectorisable = False``, has buffers (BatchNorm) or random layers (dropout), or any
error inside the vectorised run (the clients' generators are rewound first, so the loop draws
the same batches). ``STAMEN_VECTORISE=0`` (or
``federation.vectorise = false`` where the config has it) turns the whole thing off.

Memory: a stack holds, per client, its parameters, their gradients, the optimizer state and
(FedProx) the starting point, plus one batch of activations; clients are trained in chunks of
at most :data:`CHUNK_BYTES` of such state (``STAMEN_VECTORISE_CHUNK_MB``), which changes
nothing in the result.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stamen.client.trainers import TrainJob, TrainSettings, shuffled_epochs

log = logging.getLogger("stamen.client")

#: environment switch: "0" / "false" / "off" trains every client with the per-client loop
ENV_SWITCH = "STAMEN_VECTORISE"
#: environment override of the chunk budget, in MiB of per-client training state
ENV_CHUNK_MB = "STAMEN_VECTORISE_CHUNK_MB"
CHUNK_BYTES = 256 << 20


def vectorise_enabled(cfg=None) -> bool:
    """Whether clients train as one computation: on unless ``STAMEN_VECTORISE`` says off, or the
    config has a ``federation.vectorise`` entry that is false."""
    env = os.environ.get(ENV_SWITCH, "").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    federation = getattr(cfg, "federation", None)
    return bool(getattr(federation, "vectorise", True))


class NotVectorisable(Exception):
    """This model or trainer cannot train as one stacked computation (the message says why)."""


_NOTED: set[str] = set()


def note_fallback(reason: str, *, error: bool = False) -> None:
    """Log, once per process and reason, that some clients train one by one: INFO when a trainer or
    model declares it (expected), WARNING when the vectorised path failed (unexpected)."""
    if reason not in _NOTED:
        _NOTED.add(reason)
        log.log(logging.WARNING if error else logging.INFO,
                "vectorised cohort training off: %s; those clients train one by one", reason)


# ---------------------------------------------------------------------------------------------
# The stacked model: parameters with a leading client axis, inputs shaped (clients, batch, ...)
# ---------------------------------------------------------------------------------------------

_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Identity)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.MaxPool1d, nn.AvgPool1d)
_RANDOM = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _chain_of(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model as (parameter-name prefix, module) pieces applied one after the other, for models
    whose forward is known to be exactly that; None for any other model."""
    if type(model) is nn.Sequential:
        return [("", model)]
    from stamen.tasks import models as M

    if type(model) is M.MLP:
        return [("net.", model.net)]
    if type(model) is M.LogisticRegression:
        return [("", nn.Flatten()), ("linear.", model.linear)]
    if type(model) is M.SmallCNN:
        return [("features.", model.features), ("head.", model.head)]
    return None


def _leaves(prefix: str, module: nn.Module):
    if type(module) is nn.Sequential:
        for name, child in module.named_children():
            yield from _leaves(f"{prefix}{name}.", child)
    else:
        yield prefix, module


class StackedForward:
    """``forward(params, x)``: the logits of every client at once, params ``{name: (k, ...)}``,
    x ``(k, batch, ...)`` → ``(k, batch, ...)``."""

    def __init__(self, model: nn.Module):
        if getattr(model, "vectorisable", True) is False:
            raise NotVectorisable(f"model {type(model).__name__} declares vectorisable = False")
        buffers = [n for n, _ in model.named_buffers()]
        if buffers:
            raise NotVectorisable(f"model {type(model).__name__} has buffers {buffers[:3]} (per-client running "
                                  "statistics are not stacked)")
        for m in model.modules():
            if isinstance(m, _RANDOM) and m.p > 0:
                raise NotVectorisable(f"model {type(model).__name__} has random layers ({type(m).__name__}, "
                                      f"p={m.p}): the loop's draws from the global RNG cannot be reproduced")
            if isinstance(m, nn.modules.batchnorm._NormBase):
                raise NotVectorisable(f"model {type(model).__name__} has {type(m).__name__}")
        self.names = [n for n, _ in model.named_parameters()]
        chain = _chain_of(model)
        self.ops = None if chain is None else self._compile(chain)
        # chains of Linear / ReLU / Flatten have their cross-entropy gradient written out (no autograd tape)
        self.by_hand = self.ops is not None and all(
            op[0] in ("linear", "flatten") or (op[0] == "apply" and type(op[1]) in (nn.ReLU, nn.Identity))
            for op in self.ops)
        if self.ops is None:
            from torch.func import functional_call, vmap

            self._vmapped = vmap(lambda p, xb: functional_call(model, p, (xb,)))

    @property
    def path(self) -> str:
        return "batched matmuls" if self.ops is not None else "torch.func vmap"

    def _compile(self, chain):
        ops: list[tuple] = []
        for prefix, piece in chain:
            for name, m in _leaves(prefix, piece):
                if isinstance(m, nn.Linear):
                    ops.append(("linear", name + "weight", name + "bias" if m.bias is not None else None))
                elif isinstance(m, nn.Conv2d):
                    if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                        return None
                    ops.append(("conv2d", name + "weight", name + "bias" if m.bias is not None else None,
                                m.stride, m.padding, m.dilation))
                elif isinstance(m, nn.Flatten):
                    ops.append(("flatten", m.start_dim, m.end_dim))
                elif isinstance(m, _ELEMENTWISE) or (isinstance(m, _RANDOM) and m.p == 0):
                    ops.append(("apply", m))
                elif isinstance(m, _POOLS):
                    ops.append(("per_example", m))
                else:
                    return None  # an unknown layer: let torch.func handle the whole model
        return ops

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor, tape: list | None = None) -> torch.Tensor:
        """Logits (k, batch, …) of the k stacked clients. ``tape``: a list that receives what the
        hand-written backward of :meth:`cross_entropy_grads` needs (inputs of Linear layers, shapes
        before Flatten, ReLU outputs)."""
        if self.ops is None:
            return self._vmapped(params, x)
        k, b = x.shape[0], x.shape[1]
        for op in self.ops:
            kind = op[0]
            if kind == "linear":
                w = params[op[1]]
                shape = x.shape
                x3 = x.reshape(k, -1, shape[-1])
                if op[2] is None:
                    y = torch.bmm(x3, w.transpose(1, 2))
                else:
                    y = torch.baddbmm(params[op[2]].unsqueeze(1), x3, w.transpose(1, 2))
                if tape is not None:
                    tape.append((op, x3, shape))
                x = y.reshape(*shape[:-1], w.shape[1])
            elif kind == "conv2d":
                w = params[op[1]]
                cin, h, wd = x.shape[2], x.shape[3], x.shape[4]
                xg = x.transpose(0, 1).reshape(b, k * cin, h, wd)
                bias = None if op[2] is None else params[op[2]].reshape(-1)
                y = F.conv2d(xg, w.reshape(-1, *w.shape[2:]), bias, stride=op[3], padding=op[4], dilation=op[5],
                             groups=k)
                x = y.reshape(b, k, w.shape[1], y.shape[2], y.shape[3]).transpose(0, 1)
            elif kind == "flatten":
                if tape is not None:
                    tape.append((op, x.shape))
                start, end = op[1], op[2]
                x = x.flatten(start + 1 if start >= 0 else start, end + 1 if end >= 0 else end)
            elif kind == "apply":
                x = op[1](x)
                if tape is not None and type(op[1]) is nn.ReLU:
                    tape.append((op, x))
            else:  # per_example: a layer that treats dim 0 as the batch
                y = op[1](x.reshape(k * b, *x.shape[2:]))
                x = y.reshape(k, b, *y.shape[1:])
        return x


    @torch.no_grad()
    def cross_entropy_grads(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                            weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """(Σ_b weight·CE per client (k,), its gradient per parameter) by hand, for ``by_hand`` chains;
        None if the logits are not (k, batch, classes). Same arithmetic as autograd's backward of
        ``baddbmm`` / ``relu`` / ``cross_entropy``: softmax − one-hot, then the chain rule per layer."""
        k = x.shape[0]
        tape: list = []
        x = self(params, x, tape)  # the same forward, recording what the backward below needs
        if x.dim() != 3:
            return None
        logp = torch.log_softmax(x, -1)
        target = y.unsqueeze(-1)
        per_client = (-logp.gather(-1, target).squeeze(-1) * weight).sum(1)
        g = logp.exp()
        g.scatter_add_(-1, target, torch.full(target.shape, -1.0, dtype=g.dtype, device=g.device))
        g.mul_(weight.unsqueeze(-1))
        grads: dict[str, torch.Tensor] = {}
        for entry in reversed(tape):
            op = entry[0]
            if op[0] == "linear":
                _, x3, shape = entry
                w = params[op[1]]
                g3 = g.reshape(k, -1, w.shape[1])
                grads[op[1]] = torch.bmm(g3.transpose(1, 2), x3)
                if op[2] is not None:
                    grads[op[2]] = g3.sum(1)
                g = torch.bmm(g3, w).reshape(shape)
            elif op[0] == "flatten":
                g = g.reshape(entry[1])
            else:  # relu: its output remembers where it passed the gradient
                g = g * (entry[1] > 0)
        return per_client, {n: grads[n] for n in self.names}


_FORWARDS: dict[int, tuple[nn.Module, StackedForward | NotVectorisable]] = {}


def stacked_forward(model: nn.Module) -> StackedForward:
    """The stacked forward of ``model`` (built once per model object); raises NotVectorisable."""
    hit = _FORWARDS.get(id(model))
    if hit is None or hit[0] is not model:
        try:
            made: StackedForward | NotVectorisable = StackedForward(model)
        except NotVectorisable as err:
            made = err
        _FORWARDS.clear()
        _FORWARDS[id(model)] = hit = (model, made)
    if isinstance(hit[1], NotVectorisable):
        raise hit[1]
    return hit[1]


# ---------------------------------------------------------------------------------------------
# Jobs and losses
# ---------------------------------------------------------------------------------------------

@dataclass
class LocalJob:
    """What the training stage needs of one client (the other stages stay per client)."""

    weights: dict[str, np.ndarray]  # the weights it starts from (its downlink's global weights)
    X: np.ndarray
    y: np.ndarray
    settings: TrainSettings
    generator: torch.Generator  # its batch generator (run seed, round, partition)
    job: TrainJob
    trainer: str


@dataclass
class LocalOutcome:
    weights: dict[str, np.ndarray]  # the trained weights
    train_loss: float
    steps: int
    cost_s: float = 0.0  # this client's share of the training time (steps / all steps of its stack)
    vectorised: bool = False
    flat: torch.Tensor | None = None  # the trained weights as one fp32 CPU vector in parameter order, if at hand


class StackedLoss:
    """Per-example training losses of a stack: ``(forward, params, x, y, rows, members) -> (k, batch)``;
    ``rows`` are the active clients' real batch sizes, ``members`` their jobs (in stack order)."""

    #: the loss is exactly the mean cross-entropy of the batch (a by-hand gradient applies)
    plain_cross_entropy = False

    def key(self, job: LocalJob) -> Any:
        """What must be equal for two clients to share a stack (beyond the train settings)."""
        return None

    def batches(self, job: LocalJob) -> list[torch.Tensor]:
        """The client's index batches, in order, drawn from its generator: by default the loop's
        (``shuffled_epochs``: ``epochs`` shuffled passes of ``batch_size``). A trainer that orders or
        paces its data differently overrides this with its own loop's batches."""
        return list(shuffled_epochs(len(job.y), job.settings, job.generator))

    def prepare(self, jobs: Sequence[LocalJob]) -> None:
        """Per-stack state (e.g. per-client generators), jobs in stack order."""

    def __call__(self, forward, params, x, y, rows, members) -> torch.Tensor:
        raise NotImplementedError


def _per_example_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example, (k, batch); an example with extra target dims (a sequence)
    gets the mean over them, so that the batch mean equals the loop's ``F.cross_entropy``."""
    k, b = y.shape[0], y.shape[1]
    ce = F.cross_entropy(logits.reshape(k * b, *logits.shape[2:]), y.reshape(k * b, *y.shape[2:]), reduction="none")
    if ce.dim() > 1:
        ce = ce.flatten(1).mean(1)
    return ce.reshape(k, b)


class CrossEntropy(StackedLoss):
    """The ``sgd`` trainer's loss."""

    plain_cross_entropy = True

    def __call__(self, forward, params, x, y, rows, members) -> torch.Tensor:
        return _per_example_ce(forward(params, x), y)


class Adversarial(StackedLoss):
    """The ``adversarial`` trainer's loss (client/trainers_adversarial.py): each step attacks its
    batch with PGD against the client's current parameters, random starts drawn from the client's
    own PGD generator in the loop's order and shapes."""

    def key(self, job: LocalJob) -> Any:
        from stamen.client.trainers_adversarial import attack_from_options, input_clip

        attack, mix = attack_from_options(job.job.options)
        return attack, mix, input_clip(job.job.task)

    def prepare(self, jobs: Sequence[LocalJob]) -> None:
        from stamen.core import derive_seed

        self.attack, self.mix, self.clip = self.key(jobs[0])
        # ε = 0 or mix = 0: the clean loss itself, computed as sgd's is (the loop's promise: the same floats)
        self.plain_cross_entropy = self.attack.eps == 0 or self.mix == 0
        self.gens = {id(j): torch.Generator().manual_seed(derive_seed(j.job.seed, j.job.server_round, "pgd",
                                                                      j.job.partition_id)) for j in jobs}

    def __call__(self, forward, params, x, y, rows, members) -> torch.Tensor:
        from stamen.tasks.attacks import _into_ball_and_range, _steepest_ascent_direction, uniform_in_ball

        attack, mix = self.attack, self.mix
        clean = _per_example_ce(forward(params, x), y) if (attack.eps == 0 or mix < 1) else None
        if attack.eps == 0 or mix == 0:
            return clean
        k, b = x.shape[0], x.shape[1]
        frozen = {n: p.detach() for n, p in params.items()}
        flat = x.detach().reshape(k * b, *x.shape[2:])
        eps, norm = attack.eps, attack.norm
        if attack.kind == "fgsm":
            adv = flat + eps * _steepest_ascent_direction(self._input_grad(forward, frozen, flat, y), norm)
            adv = _into_ball_and_range(flat, adv, eps, norm, self.clip)
        else:
            adv = flat.clone()
            if attack.random_start:
                start = torch.zeros_like(x)
                for i, (job, n) in enumerate(zip(members, rows)):
                    if n:
                        start[i, :n] = uniform_in_ball(x[i, :n], eps, norm, self.gens[id(job)])
                adv = _into_ball_and_range(flat, flat + start.reshape_as(flat), eps, norm, self.clip)
            step = attack.resolved_step_size
            for _ in range(attack.steps):
                grad = self._input_grad(forward, frozen, adv, y)
                adv = _into_ball_and_range(flat, adv + step * _steepest_ascent_direction(grad, norm), eps, norm,
                                           self.clip)
        adv_loss = _per_example_ce(forward(params, adv.detach().reshape_as(x)), y)
        if mix == 1:
            return adv_loss
        return (1 - mix) * clean + mix * adv_loss

    @staticmethod
    def _input_grad(forward, frozen, flat, y):
        k, b = y.shape[0], y.shape[1]
        xv = flat.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = forward(frozen, xv.reshape(k, b, *flat.shape[1:]))
            loss = F.cross_entropy(logits.reshape(k * b, *logits.shape[2:]), y.reshape(k * b, *y.shape[2:]),
                                   reduction="sum")
            (grad,) = torch.autograd.grad(loss, xv)
        return grad


#: trainers with a vectorised form, by the trainer function's qualified name → its stacked loss (the
#: batches are always the loop's). A trainer may instead carry its own as ``fn.stacked_loss``. Keyed by
#: the function, not the registry name: a trainer registered over ``sgd`` is not ``train_sgd``.
VECTORISED: dict[str, Callable[[], StackedLoss]] = {
    "stamen.client.trainers.train_sgd": CrossEntropy,
    "stamen.client.trainers_adversarial.train_adversarial": Adversarial,
}


def stacked_loss_for(trainer: str) -> Callable[[], StackedLoss] | None:
    """The vectorised form of the trainer registered as ``trainer``, or None (raises for an unknown name)."""
    from stamen.client.trainers import get_trainer

    fn = get_trainer(trainer)
    return getattr(fn, "stacked_loss", None) or VECTORISED.get(f"{fn.__module__}.{fn.__qualname__}")


# ---------------------------------------------------------------------------------------------
# The stacked optimizer loop
# ---------------------------------------------------------------------------------------------

def _plan(batches: list[torch.Tensor], offset: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (steps, width) into the stack's concatenated data, real rows per step (steps,)): the
    client's batches, each padded to ``width`` with its first row (the padding weighs 0)."""
    rows = torch.tensor([len(b) for b in batches], dtype=torch.long)
    idx = torch.zeros(len(batches), width, dtype=torch.long)
    if batches:
        idx[torch.arange(width).view(1, -1) < rows.view(-1, 1)] = torch.cat(batches).long()
    return idx + offset, rows


class _Optimizer:
    """``torch.optim.SGD`` / ``Adam`` (single-tensor arithmetic, same order) on stacked tensors;
    every client in the active prefix has taken the same number of steps."""

    def __init__(self, stack: dict[str, torch.Tensor], s: TrainSettings):
        if s.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown task.optimizer {s.optimizer!r}; choose 'sgd' or 'adam'")
        self.s, self.stack = s, stack
        zeros = lambda: {n: torch.zeros_like(p) for n, p in stack.items()}  # noqa: E731
        self.buf = zeros() if s.optimizer == "sgd" and s.momentum != 0 else None
        self.m, self.v = (zeros(), zeros()) if s.optimizer == "adam" else (None, None)

    @torch.no_grad()
    def step(self, t: int, k: int, grads: dict[str, torch.Tensor]) -> None:
        s = self.s
        for n, g in grads.items():
            p = self.stack[n][:k]
            if s.weight_decay != 0:
                g = g.add(p, alpha=s.weight_decay)
            if s.optimizer == "sgd":
                if self.buf is not None:
                    buf = self.buf[n][:k]
                    if t == 0:
                        buf.copy_(g)
                    else:
                        buf.mul_(s.momentum).add_(g)
                    g = buf
                p.add_(g, alpha=-s.lr)
            else:
                beta1, beta2, eps = 0.9, 0.999, 1e-8
                m, v = self.m[n][:k], self.v[n][:k]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step = t + 1
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                p.addcdiv_(m, denom, value=-(s.lr / bias_correction1))


def _train_stack(forward: StackedForward, jobs: list[LocalJob], loss: StackedLoss) -> list[LocalOutcome]:
    """Train ``jobs`` (same settings and loss key) as one stack; outcomes in the jobs' order."""
    start = time.perf_counter()
    s = jobs[0].settings
    device = torch.device(s.device)
    offsets = np.cumsum([0] + [len(j.y) for j in jobs])
    drawn = [loss.batches(j) for j in jobs]
    bsz = max([s.batch_size] + [len(b) for batches in drawn for b in batches])
    plans = [_plan(batches, int(o), bsz) for batches, o in zip(drawn, offsets)]
    steps = [len(rows) for _, rows in plans]
    order = sorted(range(len(jobs)), key=lambda i: -steps[i])  # most steps first: the active set is a prefix
    members = [jobs[i] for i in order]
    c, horizon = len(jobs), max(steps)
    idx = torch.zeros(horizon, c, bsz, dtype=torch.long)
    rows = torch.zeros(horizon, c, dtype=torch.long)
    for r, i in enumerate(order):
        idx[:steps[i], r] = plans[i][0]
        rows[:steps[i], r] = plans[i][1]
        idx[steps[i]:, r] = int(offsets[i])
    active = [sum(1 for i in order if steps[i] > t) for t in range(horizon)]
    real = torch.arange(bsz).view(1, 1, bsz) < rows.unsqueeze(-1)  # (T, C, B)
    weight = real / rows.clamp_min(1).unsqueeze(-1)
    rows_list = rows.tolist()

    X = torch.as_tensor(np.concatenate([np.asarray(j.X) for j in jobs])).to(device)
    Y = torch.as_tensor(np.concatenate([np.asarray(j.y) for j in jobs])).to(device)
    idx, weight, rows_dev = idx.to(device), weight.to(device=device, dtype=torch.float32), rows.to(device)
    names = forward.names
    stack = {}
    for n in names:
        first = members[0].weights[n]
        if all(j.weights is members[0].weights for j in members):  # a broadcast: one copy per client
            one = torch.as_tensor(np.asarray(first), dtype=torch.float32).to(device)
            stack[n] = one.unsqueeze(0).repeat(c, *([1] * one.dim()))  # a new tensor: never the caller's
        else:
            stack[n] = torch.stack([torch.as_tensor(np.asarray(j.weights[n]), dtype=torch.float32)
                                    for j in members]).to(device)
    anchor = {n: p.clone() for n, p in stack.items()} if s.proximal_mu > 0 else None
    opt = _Optimizer(stack, s)
    loss.prepare(members)
    total = torch.zeros(c, dtype=torch.float64, device=device)
    by_hand = forward.by_hand and loss.plain_cross_entropy
    for t in range(horizon):
        k = active[t]
        batch = idx[t, :k]
        done = forward.cross_entropy_grads({n: stack[n][:k] for n in names}, X[batch], Y[batch],
                                           weight[t, :k]) if by_hand else None
        if done is not None:
            per_client, grads = done
            params = {n: stack[n][:k] for n in names}
        else:
            params = {n: stack[n][:k].detach().requires_grad_(True) for n in names}
            per_example = loss(forward, params, X[batch], Y[batch], rows_list[t][:k], members[:k])
            per_client = (per_example * weight[t, :k]).sum(1)
            grads = dict(zip(names, torch.autograd.grad(per_client.sum(), [params[n] for n in names])))
        total[:k] += per_client.detach().double() * rows_dev[t, :k]
        if anchor is not None:
            grads = {n: g + s.proximal_mu * (params[n].detach() - anchor[n][:k]) for n, g in grads.items()}
        opt.step(t, k, grads)
    totals = total.cpu().tolist()
    cost = time.perf_counter() - start
    all_steps = max(1, sum(steps))
    out: list[LocalOutcome | None] = [None] * c
    # one new (clients, d) matrix: every client's weights are views of its row, aliasing nothing else
    flat = torch.cat([stack[n].detach().reshape(c, -1) for n in names], dim=1).to("cpu", torch.float32)
    shapes = [stack[n].shape[1:] for n in names]
    seen = rows.sum(0).tolist()
    for r, i in enumerate(order):
        row, parts, start = flat[r], {}, 0
        for n, shape in zip(names, shapes):
            size = math.prod(shape)
            parts[n] = row[start:start + size].reshape(shape).numpy()
            start += size
        out[i] = LocalOutcome(weights=parts, train_loss=totals[r] / max(1, seen[r]), steps=steps[i],
                              cost_s=cost * steps[i] / all_steps, vectorised=True, flat=row)
    return out  # type: ignore[return-value]


def _client_bytes(forward: StackedForward, job: LocalJob) -> int:
    """Rough per-client bytes of a stack: parameters ×(stack, grads, 2 optimizer states, anchor, copy
    out) + data + one batch of activations (a few times the input rows)."""
    d = sum(int(np.prod(np.shape(job.weights[n]))) for n in forward.names)
    data = np.asarray(job.X).nbytes + np.asarray(job.y).nbytes
    batch = job.settings.batch_size * int(np.prod(np.shape(job.X)[1:]) or 1) * 4 * 8
    return 6 * 4 * d + data + batch


def _chunk_budget() -> int:
    try:
        return int(float(os.environ[ENV_CHUNK_MB]) * (1 << 20))
    except (KeyError, ValueError):
        return CHUNK_BYTES


def _settings_key(s: TrainSettings) -> tuple:
    return (s.epochs, s.batch_size, s.lr, s.optimizer, s.momentum, s.weight_decay, s.proximal_mu, s.device)


# ---------------------------------------------------------------------------------------------
# The training stage of a set of clients
# ---------------------------------------------------------------------------------------------

def train_clients(model: nn.Module, jobs: Sequence[LocalJob], loop: Callable[[LocalJob], LocalOutcome], *,
                  vectorise: bool = True) -> list[LocalOutcome | Exception]:
    """Train every job: vectorised stacks where trainer and model allow, else ``loop(job)`` one by
    one. Returns, per job in order, its outcome or the exception its training raised."""
    out: list[LocalOutcome | Exception | None] = [None] * len(jobs)

    def one_by_one(indices):
        for i in indices:
            t0 = time.perf_counter()
            try:
                res = loop(jobs[i])
                res.cost_s = time.perf_counter() - t0
                out[i] = res
            except Exception as err:  # the client's own failure: its reply becomes an error
                out[i] = err

    if not vectorise or not jobs:
        one_by_one(range(len(jobs)))
        return out  # type: ignore[return-value]
    try:
        forward = stacked_forward(model)
    except NotVectorisable as err:
        note_fallback(str(err))
        one_by_one(range(len(jobs)))
        return out  # type: ignore[return-value]

    groups: dict[Any, list[int]] = {}
    loose: list[int] = []
    kinds: dict[Any, Callable[[], StackedLoss]] = {}
    for i, job in enumerate(jobs):
        try:
            make = stacked_loss_for(job.trainer)
            if make is None:
                note_fallback(f"trainer {job.trainer!r} has no vectorised form")
                loose.append(i)
                continue
            key = (job.trainer, _settings_key(job.settings), make().key(job))
            hash(key)
        except Exception:  # unknown trainer, bad options: the loop raises the trainer's own error for this client
            loose.append(i)
            continue
        groups.setdefault(key, []).append(i)
        kinds[key] = make
    one_by_one(loose)

    budget = _chunk_budget()
    for key, members in groups.items():
        per_client = max(1, _client_bytes(forward, jobs[members[0]]))
        size = max(1, budget // per_client)
        members = sorted(members, key=lambda i: -len(jobs[i].y))  # similar step counts share a chunk
        for a in range(0, len(members), size):
            chunk = members[a:a + size]
            states = [jobs[i].generator.get_state() for i in chunk]
            try:
                results = _train_stack(forward, [jobs[i] for i in chunk], kinds[key]())
            except Exception as err:  # anything the stacked path cannot do: the loop, from the same batches
                note_fallback(f"{type(err).__name__} in the vectorised {forward.path} path for model "
                              f"{type(model).__name__}: {err}", error=True)
                for i, st in zip(chunk, states):
                    jobs[i].generator.set_state(st)
                one_by_one(chunk)
                continue
            for i, res in zip(chunk, results):
                out[i] = res
    return out  # type: ignore[return-value]
