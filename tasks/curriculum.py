"""Curriculum learning for federated clients: score, order, pace (Vahidian et al., "When Do Curricula Work in Federated
Learning?", ICCV 2023).

Pure functions and one small stateful class, no Flower:

- **scoring** — how hard each example is: per-example cross-entropy (or a 0/1
  misclassification score) under the global (G), local (L), both (LG) or an expert (E) model;
- **ordering** — curriculum (easy first), anti (hard first), random (still paced), vanilla
  (identity order, used with no pacing);
- **pacing** — g(t), how many of the ordered examples are available at local step t;
  :func:`paced_batches` turns (order, g) into the index batches a trainer consumes;
- **client curriculum** — :class:`ClientCurriculum` applies the same pacing to *clients*
  ordered by their mean score, for the server's selection of who trains each round.

Pacing formulas (N examples, T total steps, b starting fraction, a = fraction of T after
which all data is in, x = t/(aT)):

=======  ===========================================
linear   N·b + N(1−b)·x
quad     N·b + N(1−b)·x²
root     N·b + N(1−b)·√x
exp      N·b + N(1−b)·(e^{10x} − 1)/(e^{10} − 1)
log      N·b + N(1−b)·(1 + ln(x + e^{−10})/10)
step     N·b + N·⌊x⌋          (a = b = 1: all data from step 0, i.e. vanilla)
=======  ===========================================

Every value goes through :func:`clip_count`: cast to int, clipped to [1, N], and at least
``min_count`` (32 examples, or N if N < 32) so a batch is never drawn from a handful of points.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

MIN_EXAMPLES = 32
"""The smallest data subset a curriculum trains on (or all of it, when a client has fewer)."""

# Floors are taken with this relative slack so that a count that is an integer on paper is not
# lost to binary rounding: 100 · 0.29 is 28.999999999999996 in floating point, but 29 examples.
_FLOOR_SLACK = 1e-9

PacingFn = Callable[..., int]
ClientId = Hashable


# --------------------------------------------------------------------------- pacing


def _floor(value: float) -> int:
    return math.floor(value + _FLOOR_SLACK * max(1.0, abs(value)))


def clip_count(value: float, n: int, min_count: int = MIN_EXAMPLES) -> int:
    """Cast a pacing value to a usable count: int, clipped to [1, n], at least min(min_count, n).

    The one place where the spec's "cast to int, clip to [1, N], at least 32 (or N)" lives;
    client selection calls it with ``min_count = clients_per_round`` instead of 32.
    """
    if n < 1:
        raise ValueError(f"pacing needs N >= 1 items, got {n}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    lower = max(1, min(min_count, n))
    return min(n, max(lower, _floor(value)))


def _check_pacing_args(t: int, T: int, N: int, a: float, b: float) -> float:
    """Validate the arguments shared by all pacing functions; return the progress x = t/(aT)."""
    if t < 0:
        raise ValueError(f"pacing step t must be >= 0, got {t}")
    if T < 1:
        raise ValueError(f"pacing total steps T must be >= 1, got {T}")
    if N < 1:
        raise ValueError(f"pacing needs N >= 1 items, got {N}")
    if not 0.0 < a <= 1.0:
        raise ValueError(f"pacing a (fraction of T after which all data is in) must be in (0, 1], got {a}")
    if not 0.0 < b <= 1.0:
        raise ValueError(f"pacing b (starting fraction of the data) must be in (0, 1], got {b}")
    return t / (a * T)


def pacing_linear(t: int, T: int, N: int, a: float, b: float, *, min_count: int = MIN_EXAMPLES) -> int:
    """N·b + N(1−b)·t/(aT): the data grows at a constant rate."""
    x = _check_pacing_args(t, T, N, a, b)
    return clip_count(N * b + N * (1 - b) * x, N, min_count)


def pacing_quad(t: int, T: int, N: int, a: float, b: float, *, min_count: int = MIN_EXAMPLES) -> int:
    """N·b + N(1−b)·(t/(aT))²: lingers on the easy start, adds the hard tail late."""
    x = _check_pacing_args(t, T, N, a, b)
    return clip_count(N * b + N * (1 - b) * x**2, N, min_count)


def pacing_root(t: int, T: int, N: int, a: float, b: float, *, min_count: int = MIN_EXAMPLES) -> int:
    """N·b + N(1−b)·(t/(aT))^½: adds most data early."""
    x = _check_pacing_args(t, T, N, a, b)
    return clip_count(N * b + N * (1 - b) * math.sqrt(x), N, min_count)


def pacing_exp(t: int, T: int, N: int, a: float, b: float, *, min_count: int = MIN_EXAMPLES) -> int:
    """N·b + N(1−b)·(e^{10t/(aT)} − 1)/(e^{10} − 1): almost flat, then all data near t = aT."""
    x = _check_pacing_args(t, T, N, a, b)
    # past x ≈ 70 the exponential overflows; the value is then far above N and clips to N anyway
    growth = math.expm1(min(10.0 * x, 700.0)) / math.expm1(10.0)
    return clip_count(N * b + N * (1 - b) * growth, N, min_count)


def pacing_log(t: int, T: int, N: int, a: float, b: float, *, min_count: int = MIN_EXAMPLES) -> int:
    """N·b + N(1−b)·(1 + ln(t/(aT) + e^{−10})/10): a jump right after the start, then slow growth."""
    x = _check_pacing_args(t, T, N, a, b)
    return clip_count(N * b + N * (1 - b) * (1.0 + math.log(x + math.exp(-10.0)) / 10.0), N, min_count)


def pacing_step(t: int, T: int, N: int, a: float, b: float, *, min_count: int = MIN_EXAMPLES) -> int:
    """N·b + N·⌊t/(aT)⌋: the starting subset until t = aT, then everything."""
    x = _check_pacing_args(t, T, N, a, b)
    return clip_count(N * b + N * _floor(x), N, min_count)


PACING: dict[str, PacingFn] = {
    "linear": pacing_linear,
    "quad": pacing_quad,
    "root": pacing_root,
    "exp": pacing_exp,
    "log": pacing_log,
    "step": pacing_step,
}


def get_pacing(name: str) -> PacingFn:
    """The pacing function called ``name``; a ValueError lists the valid names."""
    if name not in PACING:
        raise ValueError(f"unknown pacing function {name!r}; choose one of {sorted(PACING)}")
    return PACING[name]


def pacing_schedule(name: str, *, total_steps: int, n: int, a: float, b: float,
                    min_count: int = MIN_EXAMPLES) -> Callable[[int], int]:
    """g(t) for one training run: the named pacing with T, N, a, b (and the minimum) bound.

    Arguments are validated here, once, so a bad setting fails before training starts.
    Vanilla training (all data from the start) is ``pacing_schedule("step", ..., a=1, b=1)``.
    """
    fn = get_pacing(name)
    fn(0, total_steps, n, a, b, min_count=min_count)  # validate eagerly

    def schedule(t: int) -> int:
        return fn(t, total_steps, n, a, b, min_count=min_count)

    schedule.__name__ = f"pacing_{name}(T={total_steps}, N={n}, a={a}, b={b})"
    return schedule


def total_local_steps(n: int, batch_size: int, epochs: int) -> int:
    """T for data pacing when a client trains ``epochs`` passes over its n examples: epochs·⌈n/batch⌉."""
    if n < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"need n, batch_size, epochs >= 1, got n={n}, batch_size={batch_size}, epochs={epochs}")
    return epochs * math.ceil(n / batch_size)


# --------------------------------------------------------------------------- ordering

ORDERINGS = ("curriculum", "anti", "random", "vanilla")


def order_examples(scores: Tensor | np.ndarray | Sequence[float], ordering: str,
                   generator: torch.Generator | None = None) -> Tensor:
    """Indices of the examples in training order (a LongTensor, a permutation of range(len(scores))).

    - ``curriculum``: ascending score (easy first); ties keep their original order (stable sort);
    - ``anti``: descending score (hard first), ties in original order;
    - ``random``: a permutation drawn from ``generator`` (required; the global RNG is never used);
    - ``vanilla``: the identity order — meant for training without pacing.
    """
    scores = torch.as_tensor(scores).detach().flatten().cpu()
    if ordering == "curriculum":
        return torch.sort(scores, stable=True).indices
    if ordering == "anti":
        return torch.sort(scores, descending=True, stable=True).indices
    if ordering == "random":
        if generator is None:
            raise ValueError("ordering 'random' needs a torch.Generator (the global RNG is never used)")
        return torch.randperm(len(scores), generator=generator, device=generator.device).cpu()
    if ordering == "vanilla":
        return torch.arange(len(scores))
    raise ValueError(f"unknown ordering {ordering!r}; choose one of {list(ORDERINGS)}")


# --------------------------------------------------------------------------- scoring

SCORE_KINDS = ("G", "L", "LG", "E")
SCORERS = ("loss", "misclassification")


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def _per_example(model: nn.Module, X, Y, batch_size: int,
                 measure: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Apply ``measure(logits, y)`` batch by batch in eval mode; the model's mode is restored after."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    X, Y = torch.as_tensor(X), torch.as_tensor(Y)
    if len(X) != len(Y):
        raise ValueError(f"X and Y differ in length: {len(X)} inputs, {len(Y)} labels")
    device = _model_device(model)
    was_training = model.training
    model.eval()  # scores must not depend on dropout noise, nor move BatchNorm statistics
    try:
        parts = [measure(model(X[i:i + batch_size].to(device)), Y[i:i + batch_size].to(device)).float().cpu()
                 for i in range(0, len(Y), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0)


def example_losses(model: nn.Module, X, Y, batch_size: int = 256) -> Tensor:
    """Per-example cross-entropy (fp32, CPU): the paper's difficulty score."""
    return _per_example(model, X, Y, batch_size, lambda logits, y: F.cross_entropy(logits, y, reduction="none"))


def misclassification_scores(model: nn.Module, X, Y, batch_size: int = 256) -> Tensor:
    """1.0 where the model's prediction is wrong, 0.0 where right: a cheaper, coarser difficulty score."""
    return _per_example(model, X, Y, batch_size, lambda logits, y: (logits.argmax(dim=1) != y))


def score_examples(kind: str, global_model: nn.Module, local_model: nn.Module | None,
                   expert_model: nn.Module | None, X, Y, *, batch_size: int = 256,
                   scorer: str = "loss") -> Tensor:
    """Difficulty of each example under the scoring model(s) of ``kind``.

    - ``G``: the current global model (the default);
    - ``L``: the client's model from its last participation; falls back to G when there is none;
    - ``LG``: G + L, where L falls back to G — so a client that never trained scores 2·G, on the
      same scale as the others (this matters when client scores are compared for selection);
    - ``E``: an expert model trained centrally (an oracle for studies; ``expert_model`` required).

    ``scorer`` is ``"loss"`` (per-example cross-entropy) or ``"misclassification"`` (0/1).
    """
    if scorer == "loss":
        measure = example_losses
    elif scorer == "misclassification":
        measure = misclassification_scores
    else:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {list(SCORERS)}")

    def score(model: nn.Module) -> Tensor:
        return measure(model, X, Y, batch_size)

    if kind == "G":
        return score(global_model)
    if kind == "L":
        return score(local_model if local_model is not None else global_model)
    if kind == "LG":
        g = score(global_model)
        return g + (score(local_model) if local_model is not None else g)
    if kind == "E":
        if expert_model is None:
            raise ValueError("score kind 'E' needs an expert model (trained centrally); none was given")
        return score(expert_model)
    raise ValueError(f"unknown score kind {kind!r}; choose one of {list(SCORE_KINDS)}")


def client_score(example_scores: Tensor) -> float:
    """A client's difficulty for client selection: the mean of its example scores."""
    if example_scores.numel() == 0:
        raise ValueError("a client with no examples has no score")
    return float(example_scores.float().mean())


# --------------------------------------------------------------------------- paced batches


def paced_batches(order: Tensor, pacing_fn: Callable[[int], int], total_steps: int, batch_size: int,
                  generator: torch.Generator) -> Iterator[Tensor]:
    """Yield ``total_steps`` batches of example indices that follow the pacing schedule.

    ``pacing_fn`` maps a local step t (0-based count of batches already yielded) to the
    prefix size g(t), e.g. :func:`pacing_schedule`. Exactly:

    1. at the start of a pass, at step t, the available subset is ``order[:g(t)]``;
    2. that subset is permuted with ``generator`` and cut into consecutive batches of
       ``batch_size`` (the last one smaller when it does not divide), each yielded in turn;
    3. when the pass is over, the prefix is refreshed with g at the new step count and the
       next pass begins; iteration stops after ``total_steps`` batches, possibly mid-pass.

    So within a pass every available example is used exactly once, and the subset only
    changes between passes (the reference implementation's DataLoader-per-pass behaviour).
    """
    order = torch.as_tensor(order).flatten()
    n = len(order)
    if n == 0:
        raise ValueError("paced_batches needs a non-empty order")
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step = 0
    while step < total_steps:
        available = pacing_fn(step)
        if not 1 <= available <= n:
            raise ValueError(f"pacing returned {available} at step {step}; it must lie in [1, {n}]")
        subset = order[:available]
        shuffled = subset[torch.randperm(available, generator=generator, device=generator.device).cpu()]
        for start in range(0, available, batch_size):
            if step >= total_steps:
                return
            yield shuffled[start:start + batch_size]
            step += 1


# --------------------------------------------------------------------------- client curriculum


def _sorted_ids(ids) -> list:
    """Client ids in a deterministic order (reply arrival order must not matter)."""
    try:
        return sorted(ids)
    except TypeError:
        return sorted(ids, key=repr)


def _shuffled(items: list, generator: torch.Generator) -> list:
    perm = torch.randperm(len(items), generator=generator, device=generator.device).tolist()
    return [items[i] for i in perm]


class ClientCurriculum:
    """Curriculum client selection: pace the pool of eligible clients, ordered by their mean score.

    With N = number of clients, K = ``clients_per_round`` and T = ``total_updates`` (rounds × K),
    the pool at round r is ``ordered[:g((r − 1)·K)]``: g is the named pacing over the count of
    client updates so far, with N clients and a minimum pool of K (instead of the 32 examples
    of data pacing) so a round can always be filled.

    Selection within the pool works in *passes*: the pool is shuffled into a queue and each
    round takes the next K clients; when the queue runs out mid-round the pool is reshuffled
    into a new queue and the round is filled from it (skipping clients already chosen this
    round, who stay queued for later in the new pass). Clients that enter the pool mid-pass
    join the remaining queue (reshuffled); clients that leave it are dropped. Hence with a
    full pool (b = 1) every client is chosen once in the first ⌈N/K⌉ rounds, and at any time
    the selection counts of any two clients differ by at most one.

    ``ordering`` "random" draws the client order from the generator once per score update
    (not per round), so the pool is a stable random subset that grows with the pacing.
    Scores are refreshed with :meth:`update_scores`: all of them (a scoring round) or only
    those of the clients that just reported (stale-score mode); ``score_reports`` counts the
    client evaluations spent on scoring, for the metrics.
    """

    def __init__(self, scores: Mapping[ClientId, float], *, ordering: str = "curriculum",
                 pacing: str = "linear", a: float = 0.2, b: float = 0.4, total_updates: int,
                 clients_per_round: int):
        if ordering not in ORDERINGS:
            raise ValueError(f"unknown client ordering {ordering!r}; choose one of {list(ORDERINGS)}")
        self._pacing = get_pacing(pacing)
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if total_updates < 1:
            raise ValueError(f"total_updates (rounds × clients_per_round) must be >= 1, got {total_updates}")
        self.ordering, self.pacing_name, self.a, self.b = ordering, pacing, a, b
        self.total_updates, self.clients_per_round = total_updates, clients_per_round
        self._scores: dict[ClientId, float] = {}
        self._order: list[ClientId] | None = None  # recomputed lazily after a score change
        self._queue: list[ClientId] = []  # clients still to be chosen in the current pass
        self._taken: set[ClientId] = set()  # clients already chosen in the current pass
        self.score_reports = 0
        self.update_scores(scores)
        self._pacing(0, total_updates, len(self._scores), a, b, min_count=clients_per_round)  # validate a, b now

    @property
    def num_clients(self) -> int:
        return len(self._scores)

    @property
    def scores(self) -> dict[ClientId, float]:
        return dict(self._scores)

    def update_scores(self, new_scores: Mapping[ClientId, float]) -> None:
        """Merge fresh client scores (all clients, or only those that just reported); new ids join."""
        for cid, value in new_scores.items():
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"client {cid!r} reported a non-finite score {value}")
            self._scores[cid] = value
        if len(self._scores) < self.clients_per_round:
            raise ValueError(f"clients_per_round={self.clients_per_round} exceeds the number of scored clients "
                             f"({len(self._scores)})")
        self.score_reports += len(new_scores)
        self._order = None

    def ordered_clients(self, generator: torch.Generator | None = None) -> list[ClientId]:
        """All clients in curriculum order (easy first for "curriculum")."""
        if self._order is None:
            ids = _sorted_ids(self._scores)
            idx = order_examples([self._scores[c] for c in ids], self.ordering, generator)
            self._order = [ids[i] for i in idx.tolist()]
        return list(self._order)

    def pool_size(self, server_round: int) -> int:
        """How many clients are eligible at ``server_round`` (1-based): g(updates so far)."""
        if server_round < 1:
            raise ValueError(f"server rounds count from 1, got {server_round}")
        updates_so_far = (server_round - 1) * self.clients_per_round
        return self._pacing(updates_so_far, self.total_updates, self.num_clients, self.a, self.b,
                            min_count=self.clients_per_round)

    def pool(self, server_round: int, generator: torch.Generator | None = None) -> list[ClientId]:
        """The eligible clients at ``server_round``: the first g(updates so far) in curriculum order."""
        return self.ordered_clients(generator)[:self.pool_size(server_round)]

    def select(self, server_round: int, generator: torch.Generator) -> list[ClientId]:
        """The ``clients_per_round`` distinct clients that train in ``server_round``."""
        pool = self.pool(server_round, generator)
        self._sync_queue(pool, generator)
        chosen: list[ClientId] = []
        while len(chosen) < self.clients_per_round:
            if not self._queue:
                self._queue, self._taken = _shuffled(pool, generator), set()
            pick = next(i for i, cid in enumerate(self._queue) if cid not in chosen)
            cid = self._queue.pop(pick)
            self._taken.add(cid)
            chosen.append(cid)
        return chosen

    def state_dict(self) -> dict:
        """The selection state (scores, order, the current pass) as plain data, for checkpoints."""
        return {"scores": dict(self._scores), "order": None if self._order is None else list(self._order),
                "queue": list(self._queue), "taken": sorted(self._taken), "score_reports": int(self.score_reports)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the pacing horizon (``total_updates``) stays this object's own."""
        self._scores = {cid: float(v) for cid, v in state["scores"].items()}
        self._order = None if state["order"] is None else list(state["order"])
        self._queue, self._taken = list(state["queue"]), set(state["taken"])
        self.score_reports = int(state["score_reports"])

    def _sync_queue(self, pool: list[ClientId], generator: torch.Generator) -> None:
        """Bring the current pass in line with the pool: drop leavers, shuffle newcomers into the queue."""
        in_pool = set(pool)
        self._taken &= in_pool
        queue = [cid for cid in self._queue if cid in in_pool]
        queued = set(queue)
        newcomers = [cid for cid in pool if cid not in queued and cid not in self._taken]
        if newcomers and (queue or self._taken):  # mid-pass: they join what is left of it
            queue = _shuffled(queue + newcomers, generator)
        self._queue = queue
