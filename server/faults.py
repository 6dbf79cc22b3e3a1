"""Transport fault injection for simulations: replies lost or delivered twice.

:class:`FaultyTransport` wraps a Grid; each reply of each ``send_and_receive`` call is dropped
with probability ``faults.drop_reply`` or duplicated with probability
``faults.duplicate_reply``, from a private generator seeded by (run seed, call number), so a
faulty run is reproducible. The strategy must cope: lost replies shrink the round, duplicates
are rejected by the acceptance stage (``strategies/accept.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stamen.core import derive_seed


class FaultyTransport:
    def __init__(self, grid, faults, seed: int):
        self._grid, self._faults, self._seed, self._calls = grid, faults, seed, 0

    def send_and_receive(self, messages, *, timeout: float | None = None):
        self._calls += 1
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        rng = np.random.default_rng(derive_seed(self._seed, self._calls, "transport"))
        out = []
        for reply in replies:
            drop, dup = rng.random(2)
            if reply.metadata.message_type.startswith("query"):
                out.append(reply)  # node discovery is not subject to faults
                continue
            if drop < self._faults.drop_reply:
                continue
            out.append(reply)
            if dup < self._faults.duplicate_reply:
                out.append(reply)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def with_transport_faults(grid, cfg):
    f = cfg.faults
    return FaultyTransport(grid, f, cfg.run.seed) if (f.drop_reply > 0 or f.duplicate_reply > 0) else grid
