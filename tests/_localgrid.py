"""The in-process grid for tests, with optional lost replies (``fail``)."""

from __future__ import annotations

from stamen.server.inprocess_grid import InProcessGrid


class LocalGrid(InProcessGrid):
    def __init__(self, cfg, fail=None):
        super().__init__(cfg)
        self.fail = fail  # optional callable(message) -> bool: this node's reply is lost

    def send_and_receive(self, messages, *, timeout=None):
        kept = [m for m in messages if not (self.fail and self.fail(m))]
        return super().send_and_receive(kept, timeout=timeout)
