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


def run_capturing_strategy(cfg, out, *, resume=False, grid=None):
    """Run ``cfg`` on the in-process grid; return (run directory, the strategy object the loop built, the grid)."""
    from unittest import mock

    from stamen.server import loop
    from stamen.server.results import RunDirectory
    from stamen.strategies.registry import build_strategy

    grid = grid or LocalGrid(cfg)
    made = []

    def capture(c):
        made.append(build_strategy(c))
        return made[-1]

    with mock.patch.object(loop, "build_strategy", capture):
        loop.run_federation(grid, cfg, out, resume=resume)
    return RunDirectory(out), made[0], grid
