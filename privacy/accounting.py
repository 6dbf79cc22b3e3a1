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
from typing import Any, Sequence

import dp_accounting
import numpy as np
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

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
        PLD ``value_discretization_interval`` (smaller = tighter and slower).
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
        self._one_round_pld: Any = None
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
            "rounds": self.rounds,
            "epsilon": self.epsilon(),
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
        default discretisation), so it is built once, exactly as
        ``PLDAccountant`` builds it, and self-composed per query (FFT, ~0.2 s).
        Without sampling, ``T`` Gaussian rounds *are* one Gaussian with
        multiplier ``z/√T``, whose exact ε (Balle & Wang 2018's analytic
        Gaussian) is what the discretised PLD approximates from above; it is
        used directly (``PLDAccountant`` needs seconds when ε is large).
        """
        if self.sampling == "none":
            return float(dp_accounting.get_epsilon_gaussian(self.noise_multiplier / math.sqrt(rounds), self.delta))
        if self._one_round_pld is None:
            self._one_round_pld = dp_pld.privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=self.noise_multiplier,
                value_discretization_interval=self.pld_discretization,
                sampling_prob=self.q,
                neighboring_relation=_RELATION[self.sampling])
        return float(self._one_round_pld.self_compose(rounds).get_epsilon_for_delta(self.delta))


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


def calibrate_noise_multiplier(eps_budget: float, rounds: int, delta: float, accountant: str = "rdp",
                               sampling: str = "poisson", sampling_probability: float | None = None,
                               cohort_size: int | None = None, population_size: int | None = None,
                               tol: float = 1e-3) -> float:
    """The smallest ``z`` (to ``tol``) whose ``rounds`` rounds stay within ``eps_budget`` at ``delta``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (a bracketed root search), so a
    run can be configured by its budget instead of by ``z``.
    """
    budget = _check_epsilon_budget(eps_budget)
    rounds = _positive_int("rounds", rounds)
    delta = _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    q, m, n = resolve_sampling(sampling, sampling_probability, cohort_size, population_size)

    def make_accountant() -> dp_accounting.PrivacyAccountant:
        if accountant == "rdp":
            return dp_rdp.RdpAccountant(neighboring_relation=_RELATION[sampling])
        return dp_pld.PLDAccountant(_RELATION[sampling])

    def make_event(z: float) -> dp_accounting.DpEvent:
        return composed_event(round_event(z, sampling, q, m, n), rounds)

    return float(dp_accounting.calibrate_dp_mechanism(
        make_accountant, make_event, budget, delta,
        dp_accounting.LowerEndpointAndGuess(1e-2, 1.0), tol=tol))
