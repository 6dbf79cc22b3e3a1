"""The Codec contract: how a model update becomes a payload and back.

A codec sees an update as one flat fp32 vector of length ``d`` (the model's
parameters concatenated in ``Layout`` order). ``encode`` turns it into a payload,
a ``dict[str, numpy.ndarray]`` that travels in a Flower ``ArrayRecord``;
``decode`` turns a payload back into a flat fp32 vector. A codec is ``linear``
when the payloads of several clients may be summed (scaled) *before* decoding
and decoding commutes with that sum (sketches are; top-k and int8 are not).

Everything random that a codec needs is derived from ``CodecContext``
(run seed, round, node), so that all parties regenerate the same operators and
nothing random travels. Client-side state a codec keeps between rounds (error
feedback, for instance) lives in the ``state`` dict it is handed, which the
ClientApp persists in the node's ``context.state``.

This module is pure tensor code: no Flower imports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from stamen.core import Layout, derive_seed  # noqa: F401  (codec contexts are built from them)


class PayloadError(ValueError):
    """A payload that cannot be decoded: wrong codec, keys, shapes, dtypes or values."""


@dataclass(frozen=True)
class CodecContext:
    """What every party knows when encoding or decoding one update."""

    seed: int
    round: int
    layout: Layout
    node: int = -1  # partition id of the sending client; -1 on the server / downlink
    device: str = "cpu"

    @property
    def d(self) -> int:
        return self.layout.d

    def generator(self, purpose: str, *, node: bool = False, device: str = "cpu") -> torch.Generator:
        """A private torch generator seeded from (seed, round, purpose[, node]).

        Shared operators use ``node=False`` so that every party gets the same stream;
        private randomness (stochastic rounding, local noise) uses ``node=True``.
        """
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(self.seed, self.round, purpose, self.node if node else None))
        return g


class Codec(ABC):
    """Turns a flat fp32 update into a payload and back. See the module docstring."""

    name: ClassVar[str]
    linear: ClassVar[bool] = False
    #: False for a strategy's private wire format (e.g. ``fedkseed``, which sends what one trainer
    #: accumulated and cannot encode an arbitrary update): registered so that clients can find it by
    #: name, but not a ``compression.codec`` choice and not covered by the generic codec tests
    general_purpose: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        if options:
            raise ValueError(f"codec {self.name!r} takes no options, got {sorted(options)}")

    @abstractmethod
    def encode(self, update: torch.Tensor, ctx: CodecContext, state: dict | None = None) -> dict[str, np.ndarray]:
        """Encode a flat fp32 update of length ``ctx.d``."""

    @abstractmethod
    def decode(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
        """Decode a payload into a flat fp32 vector of length ``ctx.d``; raise PayloadError if malformed."""

    # -- payloads as vectors (sketch-space aggregation, secure aggregation) ----------------------
    def template(self, ctx: "CodecContext") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Keys (sorted), shapes and dtypes of this codec's payloads for ``ctx.layout`` (a zero update encoded once)."""
        zero = self.encode(torch.zeros(ctx.d), ctx, {})
        return {k: (tuple(np.asarray(v).shape), np.asarray(v).dtype) for k, v in sorted(zero.items())}

    @classmethod
    def flatten_payload(cls, payload: dict[str, np.ndarray], template: dict[str, tuple[tuple[int, ...], np.dtype]]
                        ) -> np.ndarray:
        """The payload's arrays concatenated in the template's order (fp32), after checking keys, dtypes, shapes."""
        cls.expect_keys(payload, set(template))
        parts = [cls.expect(payload, k, dtype=dtype, shape=shape).reshape(-1) for k, (shape, dtype) in template.items()]
        return np.concatenate(parts).astype(np.float32, copy=True)

    @staticmethod
    def unflatten_payload(vector: np.ndarray, template: dict[str, tuple[tuple[int, ...], np.dtype]]
                          ) -> dict[str, np.ndarray]:
        """Inverse of :meth:`flatten_payload` (arrays in the template's dtypes)."""
        out, start = {}, 0
        for key, (shape, dtype) in template.items():
            size = int(np.prod(shape))
            out[key] = np.asarray(vector[start:start + size]).reshape(shape).astype(dtype, copy=True)
            start += size
        return out

    @staticmethod
    def payload_bytes(payload: dict[str, np.ndarray]) -> int:
        """Bytes of the array data in a payload (the message adds its own framing)."""
        return int(sum(np.asarray(a).nbytes for a in payload.values()))

    # -- helpers for decoders -------------------------------------------------------
    @staticmethod
    def expect(payload: dict[str, np.ndarray], key: str, *, dtype: Any = None, shape: tuple | None = None,
               finite: bool = True) -> np.ndarray:
        """Fetch ``payload[key]`` and check dtype, shape and finiteness, naming what was wrong."""
        if not isinstance(payload, dict) or key not in payload:
            have = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
            raise PayloadError(f"payload lacks array {key!r} (has {have})")
        arr = np.asarray(payload[key])
        if dtype is not None and arr.dtype != np.dtype(dtype):
            raise PayloadError(f"payload array {key!r} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise PayloadError(f"payload array {key!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise PayloadError(f"payload array {key!r} contains NaN or infinite values")
        return arr

    @staticmethod
    def flat_update(update: torch.Tensor, ctx: "CodecContext", codec: str) -> torch.Tensor:
        """The update as a detached 1-D fp32 tensor of length ``ctx.d`` (on its own device)."""
        if not isinstance(update, torch.Tensor):
            update = torch.as_tensor(np.asarray(update))
        if update.dim() != 1 or update.shape[0] != ctx.d:
            raise ValueError(f"codec {codec!r} encodes a flat vector of length d={ctx.d}, got shape {tuple(update.shape)}")
        return update.detach().to(torch.float32)

    @staticmethod
    def expect_finite_result(vec: torch.Tensor, codec: str) -> torch.Tensor:
        """Reject a decoded vector that overflowed (finite payload values can still be too large)."""
        # numpy's isfinite makes one bool temporary; torch's also makes a float |vec| copy
        finite = np.isfinite(vec.numpy()).all() if vec.device.type == "cpu" else torch.isfinite(vec).all()
        if not bool(finite):
            raise PayloadError(f"codec {codec!r}: decoding produced NaN or infinite values (payload values too large)")
        return vec

    @staticmethod
    def expect_keys(payload: dict[str, np.ndarray], keys: set[str] | frozenset[str]) -> None:
        """Require ``payload`` to be a dict with exactly ``keys``, naming what is missing or extra."""
        if not isinstance(payload, dict):
            raise PayloadError(f"payload must be a dict of arrays, got {type(payload).__name__}")
        missing = sorted(k for k in keys if k not in payload)
        extra = sorted(repr(k) for k in payload if k not in keys)
        if missing or extra:
            raise PayloadError(f"payload keys do not match: missing {missing}, unexpected [{', '.join(extra)}]; "
                               f"expected exactly {sorted(keys)}")


class DenseCodec(Codec):
    """The update as it is, fp32: the uncompressed baseline."""

    name = "dense"
    linear = True

    def encode(self, update: torch.Tensor, ctx: CodecContext, state: dict | None = None) -> dict[str, np.ndarray]:
        return {"values": update.detach().to("cpu", torch.float32).numpy().copy()}

    def decode(self, payload: dict[str, np.ndarray], ctx: CodecContext) -> torch.Tensor:
        self.expect_keys(payload, {"values"})
        values = self.expect(payload, "values", dtype=np.float32, shape=(ctx.d,))
        return torch.from_numpy(np.array(values, copy=True))


CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make a codec selectable as ``compression.codec = <cls.name>``."""
    CODECS[cls.name] = cls
    return cls


register_codec(DenseCodec)


def make_codec(name: str, **options: Any) -> Codec:
    """Instantiate a registered codec by name with its ``compression.*`` options."""
    _load_builtin_codecs()
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    return CODECS[name](**options)


def _load_builtin_codecs() -> None:
    """Import the codec plugins (the ``stamen.codecs`` entry points, :mod:`stamen.plugins`)."""
    from stamen.plugins import load_plugins

    load_plugins("stamen.codecs")
