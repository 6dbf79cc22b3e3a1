"""Client-level privacy accounting over Google ``dp-accounting`` (RDP and PLD).

One :class:`Accountant` per run. Every round of DP-FedAvg is the same privacy
event — a Gaussian query with noise multiplier ``z`` on the clipped updates of a
sampled cohort — so the whole history is "that event, composed ``T`` times",
written in dp-accounting's event language as
``SelfComposedDpEvent(<sampling>(GaussianDpEvent(z)), T)``.

Sampling schemes (the unit of privacy is one *client*):

``poisson``  each client joins a round independently with probability ``q``
             (``PoissonSampledDpEvent``; add-or-remove-one neighbours).
``fixed``    a cohort of exactly ``m`` out of ``N`` clients, without replacement
             (``SampledWithoutReplacementDpEvent``; replace-one neighbours, which
             is the relation that amplification theorem is proved for).
``none``     every client every round: plain Gaussian composed ``T`` times
             (``GaussianDpEvent``; add-or-remove-one neighbours).

Why ``fixed`` halves ``z`` in the event: under replace-one, swapping one
client's clipped update for another moves the sum by up to ``2C`` (not ``C``),
and dp-accounting's without-replacement bound (Wang, Balle, Kasiviswanathan
2019, Thm. 27) takes the noise std divided by *that* sensitivity. Flower 1.39's
``RdpAccountant`` passes ``z`` through unchanged, which under-counts by that
factor; Stamen records ``event_noise_multiplier`` in :meth:`Accountant.describe`.

Conversions to (ε, δ):

``rdp``  RDP at a grid of orders (dp-accounting's defaults unless given),
         converted with the bound of Balle et al. 2020 (arXiv 2004.00010,
         Prop. 12; also Canonne, Kamath, Steinke 2020) minimised over orders.
         Upper bound; slightly loose.
``pld``  privacy-loss distribution with pessimistic discretisation
         (``value_discretization_interval``), ε read off the hockey-stick
         divergence at δ. Tighter; does not support ``fixed`` sampling.
         The interval is coarsened (by powers of two) when ``T`` rounds would
         not fit a fixed memory bound; see :func:`pld_round`.

:func:`calibrate_noise_multiplier` inverts either accountant: the smallest ``z``
whose ``T`` rounds stay within a target ε at δ (``privacy.target_epsilon``).

Pure numerical code: numpy and dp-accounting only; no Flower import. The
``flower_*`` fields of :meth:`Accountant.describe` use the string values of
Flower's ``SamplingMethod`` / ``NeighboringRelation`` enums so the glue can build
Flower's types from them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from numbers import Real
from typing import Any, Callable, Sequence

import dp_accounting
import numpy as np
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
from dp_accounting.pld import common as dp_pld_common
from dp_accounting.pld import privacy_loss_mechanism as dp_pld_loss

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed", "none")

_RELATION = {
    "poisson": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "fixed": dp_accounting.NeighboringRelation.REPLACE_ONE,
    "none": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
}
# Flower 1.39 enum values (flwr.serverapp.SamplingMethod / NeighboringRelation).
_FLOWER_SAMPLING = {"poisson": "poisson", "fixed": "without-replacement", "none": "no-amplification"}
_FLOWER_RELATION = {"poisson": "add-or-remove-one", "fixed": "replace-one", "none": "add-or-remove-one"}
# Replace-one doubles the L2 sensitivity of a sum of updates clipped to C.
_SENSITIVITY_FACTOR = {"poisson": 1.0, "fixed": 2.0, "none": 1.0}

_CONVERSION = {
    "rdp": "RDP over orders -> (eps, delta) by Balle et al. 2020 (arXiv 2004.00010, Prop. 12), "
           "minimised over orders (dp_accounting.rdp.compute_epsilon)",
    "pld": "privacy loss distribution (pessimistic discretisation) -> eps at delta via the "
           "hockey-stick divergence (dp_accounting.pld.PLDAccountant.get_epsilon)",
}

_PLD_GAUSSIAN_CONVERSION = ("T unsampled Gaussian rounds = one Gaussian with multiplier z/sqrt(T); exact eps at delta "
                            "(analytic Gaussian, Balle & Wang 2018; dp_accounting.get_epsilon_gaussian)")

DEFAULT_PLD_DISCRETIZATION = 1e-4  # dp-accounting's own default
DEFAULT_MAX_ROUNDS = 10**7
DEFAULT_MAX_NOISE_MULTIPLIER = 1e3

# Bounds on one PLD evaluation (see :func:`pld_round`). One round's grid costs time to build (~13 µs
# a point, so 2**18 points ~3 s); the T-fold composition is an FFT whose peak is some 40 bytes a
# point (complex spectrum and its power, the real result and its rolled copy, for the REMOVE and
# then the ADD direction). Measured: ≤ 0.7 GB peak RSS, interpreter included, at these bounds.
PLD_MAX_ROUND_BINS = 2**18
PLD_MAX_COMPOSED_BINS = 2**23
_PLD_TAIL_MASS = 1e-15  # PrivacyLossDistribution.self_compose's default tail truncation
# Past this interval dp-accounting's grid overflows (expm1 of it); a z that needs it has ε far beyond
# any budget (z = 1e-3: an interval of 3.3 for 100 rounds, ε ≈ 1.2·10⁷), reported as ∞.
_PLD_MAX_INTERVAL = 100.0

# Calibration: the smallest z searched, and how much coarser than the final grid the PLD
# bracketing search runs.
_MIN_NOISE_MULTIPLIER = 1e-2
_PLD_SEARCH_COARSENING = 10.0


@contextlib.contextmanager
def _quiet_rdp_orders():
    """Silence dp-accounting's per-order "failed to converge ... Excluding this order" warnings.

    For large q and small orders the RDP series does not converge; dp-accounting drops those
    orders (the bound stays valid, the optimum is at larger orders) and logs one absl warning
    per order and per query, which would flood a run's log.
    """
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


class PrivacyBudgetExceeded(RuntimeError):
    """Raised when running more rounds would push ε past the configured budget."""


# -- validation ----------------------------------------------------------------------------

def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _nonnegative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_delta(delta: Any) -> float:
    if isinstance(delta, bool) or not isinstance(delta, Real) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_noise_multiplier(z: Any) -> float:
    if isinstance(z, bool) or not isinstance(z, Real) or not math.isfinite(z) or z < 0:
        raise ValueError(f"noise_multiplier (z) must be non-negative and finite, got {z!r}")
    return float(z)


def _check_epsilon_budget(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, Real) or math.isnan(eps) or eps <= 0:
        raise ValueError(f"eps_budget must be positive, got {eps!r}")
    return float(eps)


def resolve_sampling(sampling: str, sampling_probability: float | None = None, cohort_size: int | None = None,
                     population_size: int | None = None) -> tuple[float, int | None, int | None]:
    """Validate a sampling scheme's parameters and return ``(q, m, N)``.

    ``poisson`` takes ``q`` directly or as ``m/N``; ``fixed`` needs ``m`` and ``N``
    (``q = m/N`` is reported); ``none`` means ``q = 1``.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    m = None if cohort_size is None else _positive_int("cohort_size", cohort_size)
    n = None if population_size is None else _positive_int("population_size", population_size)
    if m is not None and n is not None and m > n:
        raise ValueError(f"cohort_size ({m}) must not exceed population_size ({n})")
    if sampling == "none":
        return 1.0, m, n
    if sampling == "fixed":
        if m is None or n is None:
            raise ValueError("sampling='fixed' needs cohort_size (m) and population_size (N)")
        if sampling_probability is not None and not math.isclose(sampling_probability, m / n):
            raise ValueError(f"sampling_probability={sampling_probability} contradicts cohort_size/population_size "
                             f"= {m}/{n}; give one or the other")
        return m / n, m, n
    if sampling_probability is None:
        if m is None or n is None:
            raise ValueError("sampling='poisson' needs sampling_probability (q) or cohort_size and population_size")
        return m / n, m, n
    q = sampling_probability
    if isinstance(q, bool) or not isinstance(q, Real) or not 0.0 < float(q) <= 1.0:
        raise ValueError(f"sampling_probability (q) must be in (0, 1], got {q!r}")
    return float(q), m, n


# -- events --------------------------------------------------------------------------------

def round_event(noise_multiplier: float, sampling: str, q: float, cohort_size: int | None = None,
                population_size: int | None = None) -> dp_accounting.DpEvent:
    """The dp-accounting event of one round: the sampled Gaussian query on clipped updates."""
    z = _check_noise_multiplier(noise_multiplier)
    if z == 0:
        return dp_accounting.NonPrivateDpEvent()
    gaussian = dp_accounting.GaussianDpEvent(z / _SENSITIVITY_FACTOR[sampling])
    if sampling == "none":
        return gaussian
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(q, gaussian)
    return dp_accounting.SampledWithoutReplacementDpEvent(population_size, cohort_size, gaussian)


def composed_event(event: dp_accounting.DpEvent, rounds: int) -> dp_accounting.DpEvent:
    """``rounds`` identical rounds as one event (``NoOpDpEvent`` for zero rounds)."""
    rounds = _nonnegative_int("rounds", rounds)
    if rounds == 0:
        return dp_accounting.NoOpDpEvent()
    return dp_accounting.SelfComposedDpEvent(event, rounds)


# -- the PLD grid --------------------------------------------------------------------------

def _one_round_loss_width(noise_multiplier: float, q: float) -> float:
    """Width of one round's privacy-loss support, the larger of the REMOVE and ADD directions.

    dp-accounting's connect-the-dots grid spans exactly ``[epsilon_lower, epsilon_upper]`` of
    ``connect_dots_bounds`` (the losses at its tail-truncation points), so this gives the length of
    the one-round PMF at any interval *before* building it. It grows like ``1/z²`` as ``z → 0``,
    which is what made small ``z`` exhaust memory at dp-accounting's fixed 1e-4.
    """
    width = 0.0
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # tiny z: inf, handled by the caller
        for adjacency in (dp_pld_loss.AdjacencyType.REMOVE, dp_pld_loss.AdjacencyType.ADD):
            bounds = dp_pld_loss.GaussianPrivacyLoss(noise_multiplier, sampling_prob=q,
                                                     adjacency_type=adjacency).connect_dots_bounds()
            width = max(width, bounds.epsilon_upper - bounds.epsilon_lower)
    return float(width)


def _composed_bins(pld: Any, rounds: int) -> int:
    """Length of the FFT that ``pld.self_compose(rounds)`` is about to allocate.

    This is dp-accounting's own Chernoff bound (``compute_self_convolve_bounds``, the call
    ``self_compose`` makes) on each direction's one-round PMF, so the prediction is exact rather
    than the ``rounds × length`` worst case, which would coarsen harmless cases a hundredfold.
    dp-accounting 0.6 has no public accessor for a PLD's two PMFs; this reads them (the version
    is pinned, and the tests compare the result with ``PLDAccountant``).
    """
    pmfs = (pld._pmf_remove,) if pld._symmetric else (pld._pmf_remove, pld._pmf_add)  # noqa: SLF001
    bins = 0
    for pmf in pmfs:
        probs = pmf.to_dense_pmf()._probs  # noqa: SLF001
        bins = max(bins, probs.size)
        if rounds > 1:
            low, high = dp_pld_common.compute_self_convolve_bounds(probs, rounds, _PLD_TAIL_MASS)
            bins = max(bins, high - low + 1)
    return int(bins)


def pld_round(noise_multiplier: float, sampling_probability: float, rounds: int,
              finest_interval: float = DEFAULT_PLD_DISCRETIZATION,
              cache: dict[float, Any] | None = None) -> tuple[float, Any]:
    """One Poisson-sampled Gaussian round's PLD on the finest grid whose ``rounds``-fold composition fits.

    Returns ``(interval, pld)``: ``interval = finest_interval · 2**k`` with the smallest ``k ≥ 0``
    such that one round has at most :data:`PLD_MAX_ROUND_BINS` points and its ``rounds``-fold
    self-composition at most :data:`PLD_MAX_COMPOSED_BINS` (predicted exactly, before composing).
    ``pld`` is built as ``PLDAccountant`` builds it, so ``PLDAccountant(…, interval)`` on the same
    event gives the same ε. ``(inf, None)`` when the grid would need an interval above
    ``_PLD_MAX_INTERVAL`` or the loss support is not even finite: ``z`` so small that ε = ∞ is
    the useful answer (and still an upper bound).

    Why this is safe: the discretisation is pessimistic (connect-the-dots rounds losses *up*), so
    every interval gives an upper bound on the true ε; a coarser one only loosens it. Powers of two
    keep the grids nested; measured, ε then grows monotonically with the interval (by ~Δ²: doubling
    1e-4 five times moves ε = 7.43 at T = 1000 by 0.002), so ε does not drop when the grid
    coarsens as rounds accumulate.

    Why not a fixed interval derived from ``T``: the memory is set by the composed support, which
    grows like ``1/z²`` as ``z`` shrinks, not by ``T`` alone; a ``T``-only rule either leaves small
    ``z`` unbounded or coarsens every long run. The exact prediction coarsens only where needed.

    What it costs: nothing where ε is of a useful size. With δ = 1e-5, q ∈ [0.01, 0.1] and ε ≤ 8
    the 1,000-round composition needs at most ~3.5·10⁵ points at 1e-4, far below the bound, so the
    interval stays at ``finest_interval``. The bound bites for small ``z``, where ε is in the
    hundreds or more (dp-accounting's fixed 1e-4 needed 1.4 GB at z = 0.2, q = 0.1, T = 1000 and
    more below; here 4e-4, 0.45 GB, the same ε to 1e-4), and for very long runs. The one-round
    bound can also coarsen a tiny ``z`` at few rounds (a support wider than 26 at 1e-4). If even a
    grid of a few points per round exceeds the bound (more than ~4·10⁶ rounds), it stops there and
    the FFT has ~2·rounds points.
    """
    width = _one_round_loss_width(noise_multiplier, sampling_probability)
    if not math.isfinite(width):
        return math.inf, None
    k = 0
    if width > finest_interval * (PLD_MAX_ROUND_BINS - 3):  # the grid holds width/interval + 3 points at most
        k = math.ceil(math.log2(width / (finest_interval * (PLD_MAX_ROUND_BINS - 3))))
    cache = {} if cache is None else cache
    while True:
        interval = finest_interval * 2.0**k
        if interval > max(_PLD_MAX_INTERVAL, finest_interval):
            return math.inf, None
        if interval not in cache:
            cache[interval] = dp_pld.privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=noise_multiplier, value_discretization_interval=interval,
                sampling_prob=sampling_probability,
                neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        bins = _composed_bins(cache[interval], rounds)
        if bins <= PLD_MAX_COMPOSED_BINS or interval >= width:
            return interval, cache[interval]
        k += max(1, math.ceil(math.log2(bins / PLD_MAX_COMPOSED_BINS)))


# -- the accountant ------------------------------------------------------------------------

class Accountant:
    """ε spent by ``T`` rounds of a sampled Gaussian mechanism, at a fixed δ.

    Parameters
    ----------
    noise_multiplier
        ``z``: noise std divided by the clip norm, for the *sum* of clipped
        updates (``zC`` on the sum, ``zC/m`` on the mean, see :mod:`.noise`).
        ``z = 0`` is allowed and reports ε = ∞ after any round.
    delta
        δ in (0, 1) at which ε is reported.
    accountant
        ``'rdp'`` or ``'pld'``.
    sampling
        ``'poisson'``, ``'fixed'`` or ``'none'`` (see the module docstring).
    sampling_probability, cohort_size, population_size
        ``q``, or ``m`` and ``N`` (``fixed`` needs ``m`` and ``N``).
    orders
        RDP orders; dp-accounting's defaults when omitted.
    pld_discretization
        The finest PLD ``value_discretization_interval`` (smaller = tighter and slower);
        a coarser one is used where ``T`` rounds would not fit memory (:func:`pld_round`),
        and :meth:`describe` reports the one used.
    """

    def __init__(self, noise_multiplier: float, delta: float, accountant: str = "rdp", sampling: str = "poisson",
                 sampling_probability: float | None = None, cohort_size: int | None = None,
                 population_size: int | None = None, orders: Sequence[float] | None = None,
                 pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> None:
        self.noise_multiplier = _check_noise_multiplier(noise_multiplier)
        self.delta = _check_delta(delta)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.kind = accountant
        self.sampling = sampling
        self.q, self.cohort_size, self.population_size = resolve_sampling(
            sampling, sampling_probability, cohort_size, population_size)
        if accountant == "pld" and sampling == "fixed":
            raise ValueError("accountant='pld' does not support sampling='fixed' (dp-accounting's PLD has no "
                             "without-replacement amplification); use accountant='rdp' or sampling='poisson'")
        if orders is not None:
            orders = tuple(float(a) for a in orders)
            if not orders or any(not math.isfinite(a) or a <= 1 for a in orders):
                raise ValueError(f"orders must be a non-empty list of finite numbers > 1, got {orders!r}")
        self.orders = orders
        if not math.isfinite(pld_discretization) or pld_discretization <= 0:
            raise ValueError(f"pld_discretization must be positive, got {pld_discretization!r}")
        self.pld_discretization = float(pld_discretization)
        self.event = round_event(self.noise_multiplier, sampling, self.q, self.cohort_size, self.population_size)
        self.rounds = 0
        self._one_round_rdp: np.ndarray | None = None
        self._rdp_orders: np.ndarray | None = None
        self._pld_rounds: dict[float, Any] = {}  # one-round PLD per grid interval
        self._pld_intervals: dict[int, float] = {}  # rounds -> the interval its ε was computed on
        self._epsilon_cache: dict[int, float] = {}

    # -- state ------------------------------------------------------------------------
    def step(self, n: int = 1) -> float:
        """Compose ``n`` more rounds; returns ε after them."""
        self.rounds += _nonnegative_int("n", n)
        return self.epsilon()

    def epsilon(self) -> float:
        """ε at ``delta`` after the rounds composed so far."""
        return self.epsilon_after(self.rounds)

    # -- pure queries ----------------------------------------------------------------
    def epsilon_after(self, rounds: int) -> float:
        """ε at ``delta`` after ``rounds`` rounds in total (does not change the accountant)."""
        rounds = _nonnegative_int("rounds", rounds)
        if rounds not in self._epsilon_cache:
            self._epsilon_cache[rounds] = self._compute_epsilon(rounds)
        return self._epsilon_cache[rounds]

    def would_exceed(self, eps_budget: float, n: int = 1) -> bool:
        """Whether running ``n`` more rounds would take ε above ``eps_budget``."""
        budget = _check_epsilon_budget(eps_budget)
        return self.epsilon_after(self.rounds + _nonnegative_int("n", n)) > budget

    def check_budget(self, eps_budget: float, n: int = 1) -> None:
        """Raise :class:`PrivacyBudgetExceeded` before a round that would overspend the budget."""
        if self.would_exceed(eps_budget, n):
            after = self.epsilon_after(self.rounds + n)
            raise PrivacyBudgetExceeded(
                f"running {n} more round(s) would raise epsilon from {self.epsilon():.4g} to {after:.4g} "
                f"(delta={self.delta:g}, {self.kind}, {self.sampling} sampling), above the budget {eps_budget:g}")

    def rounds_within_budget(self, eps_budget: float, max_rounds: int = DEFAULT_MAX_ROUNDS) -> int:
        """The largest total number of rounds ``T`` with ``epsilon_after(T) ≤ eps_budget``.

        ε grows with ``T``, so an exponential then binary search is exact.
        Returns ``max_rounds`` when even that many rounds fit.
        """
        budget = _check_epsilon_budget(eps_budget)
        max_rounds = _positive_int("max_rounds", max_rounds)
        if self.epsilon_after(1) > budget:
            return 0
        low, high = 1, 2
        while high <= max_rounds and self.epsilon_after(high) <= budget:
            low, high = high, high * 2
        if high > max_rounds:
            if self.epsilon_after(max_rounds) <= budget:
                return max_rounds
            high = max_rounds
        while high - low > 1:  # invariant: eps(low) <= budget < eps(high)
            mid = (low + high) // 2
            if self.epsilon_after(mid) <= budget:
                low = mid
            else:
                high = mid
        return low

    def rdp_at(self, order: float, rounds: int | None = None) -> float:
        """RDP ε(α) of ``rounds`` rounds (default: those composed) at one order, from dp-accounting."""
        rounds = self.rounds if rounds is None else _nonnegative_int("rounds", rounds)
        order = float(order)
        if not math.isfinite(order) or order <= 1:
            raise ValueError(f"order must be finite and > 1, got {order!r}")
        backend = dp_rdp.RdpAccountant(orders=[order], neighboring_relation=_RELATION[self.sampling])
        with _quiet_rdp_orders():
            backend.compose(composed_event(self.event, rounds))
        return float(backend.rdp[0])

    def describe(self) -> dict[str, Any]:
        """Everything needed to interpret an ε: accountant, conversion, sampling, q, z, δ, rounds, ε."""
        epsilon = self.epsilon()  # first: it records the PLD interval used
        return {
            "accountant": self.kind,
            "conversion": _PLD_GAUSSIAN_CONVERSION if (self.kind, self.sampling) == ("pld", "none")
            else _CONVERSION[self.kind],
            "sampling": self.sampling,
            "neighboring_relation": _FLOWER_RELATION[self.sampling],
            "flower_sampling_method": _FLOWER_SAMPLING[self.sampling],
            "sampling_probability": self.q,
            "cohort_size": self.cohort_size,
            "population_size": self.population_size,
            "noise_multiplier": self.noise_multiplier,
            "event_noise_multiplier": self.noise_multiplier / _SENSITIVITY_FACTOR[self.sampling],
            "delta": self.delta,
            "orders": "dp-accounting default" if self.orders is None else list(self.orders),
            "pld_discretization": self.pld_discretization if self.kind == "pld" else None,
            "pld_discretization_used": self._pld_intervals.get(self.rounds) if self.kind == "pld" else None,
            "rounds": self.rounds,
            "epsilon": epsilon,
            "library": f"dp-accounting {_dp_accounting_version()}",
        }

    def state_dict(self) -> dict[str, Any]:
        """The accountant's state for a checkpoint: its settings and the number of rounds."""
        return {"settings": self._settings(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``rounds`` from :meth:`state_dict`; refuses state from different settings."""
        if state.get("settings") != self._settings():
            raise ValueError(f"accountant state was saved with settings {state.get('settings')}, "
                             f"this accountant has {self._settings()}")
        self.rounds = _nonnegative_int("rounds", state.get("rounds"))

    # -- internals ---------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {"accountant": self.kind, "sampling": self.sampling, "q": self.q, "cohort_size": self.cohort_size,
                "population_size": self.population_size, "noise_multiplier": self.noise_multiplier,
                "delta": self.delta, "orders": None if self.orders is None else list(self.orders),
                "pld_discretization": self.pld_discretization}

    def _compute_epsilon(self, rounds: int) -> float:
        if rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        if self.kind == "rdp":
            return self._rdp_epsilon(rounds)
        return self._pld_epsilon(rounds)

    def _rdp_epsilon(self, rounds: int) -> float:
        """RDP composes additively, so ``T`` rounds are ``T ×`` one round's RDP vector.

        Computing that vector once makes budget searches cheap; the conversion is
        dp-accounting's own ``compute_epsilon`` (what ``RdpAccountant.get_epsilon`` calls).
        """
        if self._one_round_rdp is None:
            backend = dp_rdp.RdpAccountant(orders=self.orders, neighboring_relation=_RELATION[self.sampling])
            with _quiet_rdp_orders():
                backend.compose(self.event)
            self._one_round_rdp, self._rdp_orders = backend.rdp, backend.orders
        eps, _ = dp_rdp.compute_epsilon(self._rdp_orders, rounds * self._one_round_rdp, self.delta)
        return float(eps)

    def _pld_epsilon(self, rounds: int) -> float:
        """ε from the privacy loss distribution of ``rounds`` rounds.

        Building one subsampled-Gaussian PLD is the expensive part (~0.4 s at the
        default discretisation), so it is built once per grid, exactly as
        ``PLDAccountant`` builds it, and self-composed per query (FFT, ~0.2 s). The
        grid is the finest that keeps ``rounds`` rounds within the memory bounds
        (:func:`pld_round`): ``pld_discretization`` wherever ε is of a useful size.
        Without sampling, ``T`` Gaussian rounds *are* one Gaussian with
        multiplier ``z/√T``, whose exact ε (Balle & Wang 2018's analytic
        Gaussian) is what the discretised PLD approximates from above; it is
        used directly (``PLDAccountant`` needs seconds when ε is large).
        """
        if self.sampling == "none":
            return float(dp_accounting.get_epsilon_gaussian(self.noise_multiplier / math.sqrt(rounds), self.delta))
        interval, pld = pld_round(self.noise_multiplier, self.q, rounds, self.pld_discretization, self._pld_rounds)
        self._pld_intervals[rounds] = interval
        if pld is None:
            return math.inf
        return float(pld.self_compose(rounds).get_epsilon_for_delta(self.delta))


def _dp_accounting_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dp-accounting")
    except PackageNotFoundError:  # pragma: no cover - vendored copy
        return "unknown"


# -- one-shot helpers ----------------------------------------------------------------------

def dp_sgd_epsilon(num_examples: int, batch_size: int, noise_multiplier: float, epochs: float, delta: float,
                   accountant: str = "rdp", orders: Sequence[float] | None = None) -> float:
    """ε of DP-SGD with Poisson sampling ``q = batch/n`` for ``ceil(epochs·n/batch)`` steps.

    The example-level setting of Abadi et al. 2016 (and TF-Privacy's
    ``compute_dp_sgd_privacy``); used to check the accountant against the
    published values of the accounting libraries.
    """
    n = _positive_int("num_examples", num_examples)
    b = _positive_int("batch_size", batch_size)
    if b > n:
        raise ValueError(f"batch_size ({b}) must not exceed num_examples ({n})")
    if not math.isfinite(epochs) or epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs!r}")
    steps = int(math.ceil(epochs * n / b))
    acc = Accountant(noise_multiplier, delta, accountant, "poisson", sampling_probability=b / n, orders=orders)
    return acc.epsilon_after(steps)


def _check_positive_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def calibrate_noise_multiplier(target_epsilon: float, rounds: int, delta: float, accountant: str = "rdp",
                               sampling: str = "poisson", sampling_probability: float | None = None,
                               cohort_size: int | None = None, population_size: int | None = None,
                               tol: float = 1e-3, max_noise_multiplier: float = DEFAULT_MAX_NOISE_MULTIPLIER,
                               orders: Sequence[float] | None = None,
                               pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> float:
    """The smallest ``z`` (to a relative ``tol``) whose ``rounds`` rounds stay within ``target_epsilon`` at ``delta``.

    So a run can be configured by its budget (``privacy.target_epsilon``) instead of by ``z``.
    The arguments are those of :class:`Accountant`, and the contract is stated in its terms:
    ``Accountant(z, delta, accountant, sampling, …).epsilon_after(rounds) ≤ target_epsilon``
    for the returned ``z``, and ``> target_epsilon`` for ``z·(1 - tol)``.

    The root is found by ``dp_accounting.calibrate_dp_mechanism`` on the events :class:`Accountant`
    composes (:func:`round_event` / :func:`composed_event`, so ``fixed`` carries the replace-one
    factor), inside a bracket found first: stepping out from a guess keeps every PLD evaluation near
    the answer, where ε is moderate and the PLD small. (Searching from ``z = 0.01`` up, as this
    function once did, composed PLDs of ε in the thousands: that is what exhausted memory.)

    ``pld``: the bracket and a first root come from a grid ``10 × pld_discretization`` (a few times
    faster; its ε differs by < 0.002 at 1,000 rounds), then the root is refined on the grid the
    accountant itself uses, in a narrow bracket around the first one. Each evaluation is bounded
    in memory by :func:`pld_round`. Without sampling the accountant's ε is the analytic Gaussian of
    ``z/√T``, inverted by ``dp_accounting.get_sigma_gaussian``.

    Raises ``ValueError`` naming the parameter for bad inputs, when even ``max_noise_multiplier``
    does not reach the target (RDP cannot go below ~0.02 at δ = 1e-5 with its default orders),
    and when the target is met by any ``z`` down to 0.01 (the budget does not constrain ``z``).
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, Real) or not math.isfinite(target_epsilon) \
            or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon!r}")
    target = float(target_epsilon)
    rounds = _positive_int("rounds", rounds)
    tol = _check_positive_finite("tol", tol)
    if tol >= 0.5:
        raise ValueError(f"tol is relative and must be below 0.5, got {tol!r}")
    ceiling = _check_positive_finite("max_noise_multiplier", max_noise_multiplier)
    if ceiling <= _MIN_NOISE_MULTIPLIER:
        raise ValueError(f"max_noise_multiplier must exceed {_MIN_NOISE_MULTIPLIER}, got {max_noise_multiplier!r}")
    pld_discretization = _check_positive_finite("pld_discretization", pld_discretization)
    # An Accountant validates delta, the accountant, the sampling scheme and the orders exactly as a run will.
    probe = Accountant(1.0, delta, accountant, sampling, sampling_probability, cohort_size, population_size,
                       orders, pld_discretization)

    def accountant_epsilon(z: float) -> float:
        return Accountant(z, probe.delta, accountant, sampling, probe.q, probe.cohort_size, probe.population_size,
                          probe.orders, pld_discretization).epsilon_after(rounds)

    if (accountant, sampling) == ("pld", "none"):
        z = _calibrate_unsampled_gaussian(target, rounds, probe.delta, ceiling)
    elif accountant == "rdp":
        z = _calibrate_rdp(target, rounds, probe, tol, ceiling)
    else:
        z = _calibrate_pld(target, rounds, probe, tol, ceiling)
    # calibrate_dp_mechanism met the target for the ε it searched. The accountant computes the same ε
    # another way (RDP: T × one round's vector; PLD: without PLDAccountant's identity composition,
    # ~1e-12 apart; unsampled PLD: brentq's root may sit a hair above) or, where pld_round coarsened
    # the grid inside the bracket, on another grid. One evaluation (and a nudge) keeps the contract.
    for _ in range(16):
        if accountant_epsilon(z) <= target:
            return z
        z *= 1 + tol / 16
    raise RuntimeError(  # pragma: no cover - a grid mismatch beyond tol; never seen
        f"calibrated z={z:g} does not meet target_epsilon={target:g} in the accountant")


def _bracket(epsilon: Callable[[float], float], target: float, guess: float, ceiling: float) -> tuple[float, float]:
    """``(low, high)`` with ``epsilon(low) > target ≥ epsilon(high)``, stepping out from ``guess``.

    ε falls as ``z`` grows. Upwards ``z`` doubles up to ``ceiling``; downwards it shrinks by 20 %
    first (the guess is usually close) and halves after that, down to ``_MIN_NOISE_MULTIPLIER``.
    """
    guess = min(max(guess, _MIN_NOISE_MULTIPLIER), ceiling)
    if epsilon(guess) > target:
        low = guess
        while True:
            if low >= ceiling:
                raise ValueError(f"target_epsilon={target:g} is not reached even with max_noise_multiplier="
                                 f"{ceiling:g}; raise max_noise_multiplier, or the target (or delta)")
            high = min(2 * low, ceiling)
            if epsilon(high) <= target:
                return low, high
            low = high
    high, factor = guess, 0.8
    while True:
        if high <= _MIN_NOISE_MULTIPLIER:
            raise ValueError(f"target_epsilon={target:g} is met by every noise multiplier down to "
                             f"{_MIN_NOISE_MULTIPLIER:g}: the budget does not constrain z; set noise_multiplier")
        low = max(high * factor, _MIN_NOISE_MULTIPLIER)
        if epsilon(low) > target:
            return low, high
        high, factor = low, 0.5


def _root(make_accountant: Callable[[], dp_accounting.PrivacyAccountant],
          make_event: Callable[[float], dp_accounting.DpEvent], target: float, delta: float,
          bracket: tuple[float, float], tol: float) -> float:
    """``calibrate_dp_mechanism`` in an explicit bracket, to a relative ``tol``.

    Its ``tol`` is absolute; ``tol·low/2`` makes the returned ``z`` (which meets the target, and
    is within that of the root) satisfy ``z·(1 - tol) < root``.
    """
    low, high = bracket
    return float(dp_accounting.calibrate_dp_mechanism(
        make_accountant, make_event, target, delta, dp_accounting.ExplicitBracketInterval(low, high),
        tol=tol * low / 2))


def _event_maker(probe: Accountant, rounds: int) -> Callable[[float], dp_accounting.DpEvent]:
    def make_event(z: float) -> dp_accounting.DpEvent:
        return composed_event(round_event(z, probe.sampling, probe.q, probe.cohort_size, probe.population_size),
                              rounds)
    return make_event


def _calibrate_rdp(target: float, rounds: int, probe: Accountant, tol: float, ceiling: float) -> float:
    def make_accountant() -> dp_accounting.PrivacyAccountant:
        return dp_rdp.RdpAccountant(orders=probe.orders, neighboring_relation=_RELATION[probe.sampling])

    make_event = _event_maker(probe, rounds)

    def epsilon(z: float) -> float:
        return make_accountant().compose(make_event(z)).get_epsilon(probe.delta)

    with _quiet_rdp_orders():
        return _root(make_accountant, make_event, target, probe.delta, _bracket(epsilon, target, 1.0, ceiling), tol)


def _calibrate_pld(target: float, rounds: int, probe: Accountant, tol: float, ceiling: float) -> float:
    make_event = _event_maker(probe, rounds)
    relation = _RELATION[probe.sampling]
    intervals: dict[tuple[float, float], float] = {}  # (finest, z) -> the interval pld_round chose

    def epsilon_on(finest: float) -> Callable[[float], float]:
        def epsilon(z: float) -> float:
            interval, pld = pld_round(z, probe.q, rounds, finest)
            intervals[finest, z] = interval
            return math.inf if pld is None else float(pld.self_compose(rounds).get_epsilon_for_delta(probe.delta))
        return epsilon

    def root_on(finest: float, bracket: tuple[float, float]) -> float:
        # The grid at the bracket's low end is the coarsest one inside it (the loss support shrinks as
        # z grows); it is `finest` itself unless pld_round had to coarsen there.
        interval = intervals[finest, bracket[0]]
        if not math.isfinite(interval):  # ε there is ∞ (no bounded grid): only a target of ~10⁶ gets here
            raise ValueError(f"target_epsilon={target:g} is too large for the PLD accountant to resolve z "
                             f"(near z={bracket[0]:g} its grid would exceed {_PLD_MAX_INTERVAL:g}); "
                             "use accountant='rdp'")
        return _root(lambda: dp_pld.PLDAccountant(relation, value_discretization_interval=interval),
                     make_event, target, probe.delta, bracket, tol)

    try:  # RDP is an upper bound that PLD usually improves on by 5-20 % in z: a good, cheap first guess
        guess = _calibrate_rdp(target, rounds, probe, tol=0.05, ceiling=ceiling)
    except ValueError:
        guess = 1.0
    fine = probe.pld_discretization
    coarse = fine * _PLD_SEARCH_COARSENING
    z_coarse = root_on(coarse, _bracket(epsilon_on(coarse), target, guess, ceiling))
    return root_on(fine, _narrow_bracket(epsilon_on(fine), target, z_coarse, 4 * tol, ceiling))


def _narrow_bracket(epsilon: Callable[[float], float], target: float, z: float, width: float,
                    ceiling: float) -> tuple[float, float]:
    """A bracket ``[z·(1 - w), z]`` around a root from a coarser grid, widened (×4) until it brackets.

    The coarser grid is pessimistic, so the fine root lies at or just below ``z`` (< 0.2 % at
    1,000 rounds): the first bracket usually holds, and the search needs few fine evaluations.
    """
    high = z
    while epsilon(high) > target:  # only if the grids disagree the other way round
        if high >= ceiling:
            raise ValueError(f"target_epsilon={target:g} is not reached even with max_noise_multiplier="
                             f"{ceiling:g}; raise max_noise_multiplier, or the target (or delta)")
        high, width = min(high * (1 + width), ceiling), min(4 * width, 0.5)
    while True:
        low = max(high * (1 - width), _MIN_NOISE_MULTIPLIER)
        if epsilon(low) > target:
            return low, high
        if low <= _MIN_NOISE_MULTIPLIER:
            raise ValueError(f"target_epsilon={target:g} is met by every noise multiplier down to "
                             f"{_MIN_NOISE_MULTIPLIER:g}: the budget does not constrain z; set noise_multiplier")
        high, width = low, min(4 * width, 0.5)


def _calibrate_unsampled_gaussian(target: float, rounds: int, delta: float, ceiling: float) -> float:
    """``pld`` without sampling: ε is the analytic Gaussian of ``z/√T``, so invert that (to 1e-12 in σ)."""
    z = math.sqrt(rounds) * float(dp_accounting.get_sigma_gaussian(target, delta))
    if z > ceiling:
        raise ValueError(f"target_epsilon={target:g} needs z={z:.4g}, above max_noise_multiplier={ceiling:g}")
    if z < _MIN_NOISE_MULTIPLIER:
        raise ValueError(f"target_epsilon={target:g} is met by every noise multiplier down to "
                         f"{_MIN_NOISE_MULTIPLIER:g}: the budget does not constrain z; set noise_multiplier")
    return z
