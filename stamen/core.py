"""Core types every layer shares: the parameter layout, seed derivation, capabilities.

``sketching/``, ``privacy/``, ``tasks/``, ``strategies/``, ``client/`` and ``server/`` all
import this module and nothing here imports them back; it depends on numpy and torch only.

- :class:`Layout` — names and shapes of a model's parameter tensors, and the flat fp32
  vector every update, sketch and noise draw lives in.
- :func:`derive_seed` — the one rule for *public, reproducible* randomness: a seed from
  (run seed, round, purpose, node …). Everything that protects nothing (partitions, data
  order, model init, non-private sampling, sketch operators, Ferret bases) is drawn from
  it, so the same config gives the same run. Secret randomness (DP noise, DP sampling,
  nonces) must *not* come from here: ``run.seed`` is public. See
  :mod:`stamen.privacy.noise` for the secret source.
- :class:`Capabilities` — what a strategy plugin declares about itself; the preflight
  (``strategies/preflight.py``) checks a whole run config against it before anything starts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch


class LayoutError(ValueError):
    """Arrays that do not match a model's parameter layout (names, shapes, sizes)."""


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the parameter tensors, in the order they are flattened."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def d(self) -> int:
        return int(sum(self.numels))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Layout":
        return cls(tuple(arrays), tuple(tuple(a.shape) for a in arrays.values()))

    def flatten(self, arrays: dict[str, np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors (in layout order) into one fp32 vector."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            if name not in arrays:
                raise LayoutError(f"missing tensor {name!r}; expected {list(self.names)}")
            t = torch.as_tensor(np.asarray(arrays[name]) if not isinstance(arrays[name], torch.Tensor) else arrays[name])
            if tuple(t.shape) != tuple(shape):
                raise LayoutError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
            parts.append(t.reshape(-1).to(torch.float32))
        return torch.cat(parts) if parts else torch.zeros(0)

    def unflatten(self, flat: torch.Tensor) -> dict[str, np.ndarray]:
        """Split a flat vector back into named fp32 numpy arrays."""
        if flat.numel() != self.d:
            raise LayoutError(f"flat vector has {flat.numel()} entries, layout needs {self.d}")
        out, start = {}, 0
        flat = flat.detach().to("cpu", torch.float32)
        for name, shape, n in zip(self.names, self.shapes, self.numels):
            out[name] = flat[start : start + n].reshape(shape).numpy().copy()
            start += n
        return out

    def check(self, arrays: dict[str, np.ndarray], what: str = "arrays") -> None:
        """Raise :class:`LayoutError` unless ``arrays`` has exactly this layout's names and shapes."""
        missing = [n for n in self.names if n not in arrays]
        extra = [n for n in arrays if n not in self.names]
        if missing or extra:
            raise LayoutError(f"{what} do not match the model: missing {missing}, unexpected {extra}")
        for name, shape in zip(self.names, self.shapes):
            got = tuple(np.shape(arrays[name]))
            if got != tuple(shape):
                raise LayoutError(f"{what}: tensor {name!r} has shape {got}, the model's is {tuple(shape)}")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of printable parts (stable across processes and machines).

    Public randomness only: anyone who knows the parts can regenerate the stream.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# -- capabilities ----------------------------------------------------------------------------

Space = Literal["update", "payload", "own"]


@dataclass(frozen=True)
class Capabilities:
    """What a strategy plugin is and needs, declared once, checked before a run starts.

    ``aggregation`` — what the server combines: ``update`` (each reply decoded into the update
    Δ in parameter space; any ``compression.codec``; robust rules and parameter-space DP
    apply), ``payload`` (the payloads themselves, as vectors, before one decode: sketch-space
    strategies; DP in sketch space applies), ``own`` (a representation only the plugin
    understands, e.g. Ferret's per-seed coefficients).

    ``codecs`` — the ``compression.codec`` values it accepts: ``None`` any codec, an empty
    tuple: it brings its own wire format (``compression.*`` must stay at the default).

    ``privacy_sites`` — the ``privacy.site`` values it can honour (empty: no DP mechanism).

    ``robust`` — whether ``strategy.aggregator`` may replace its mean (needs individual
    decoded updates in parameter space).

    ``selection`` — ``sampled``: the pipeline samples clients (seeded, or Poisson/fixed from
    OS entropy under DP); ``data_dependent``: the plugin chooses clients from what clients
    report (a release of client data that DP must account or refuse).

    ``extra_releases`` — data-dependent releases beyond the train uploads (exploration
    uploads, selection scores, …): named so that a DP run can refuse them by name.

    ``trainer`` — the client trainer the plugin asks for (``sgd`` = none of its own); a
    plugin that wraps another (FedLEx) needs one that asks for none.

    ``linear`` — the server's aggregate is a (weighted) sum of the contributions: required by
    central DP noise calibrated to a sum and by secure aggregation.
    """

    aggregation: Space = "update"
    codecs: tuple[str, ...] | None = None
    privacy_sites: frozenset[str] = frozenset({"central", "local"})
    robust: bool = True
    selection: Literal["sampled", "data_dependent"] = "sampled"
    extra_releases: tuple[str, ...] = ()
    trainer: str = "sgd"
    linear: bool = True
    resumable: bool = True
    vectorisable: bool = False
    notes: dict[str, str] = field(default_factory=dict)  # why a capability is off, quoted in refusals

    def describe(self) -> dict[str, Any]:
        return {"aggregation": self.aggregation,
                "codecs": "any" if self.codecs is None else (list(self.codecs) or "own"),
                "privacy_sites": sorted(self.privacy_sites), "robust": self.robust, "selection": self.selection,
                "extra_releases": list(self.extra_releases), "trainer": self.trainer, "linear": self.linear,
                "resumable": self.resumable, "vectorisable": self.vectorisable}
