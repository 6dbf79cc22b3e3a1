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


class RecordingGrid(LocalGrid):
    """Keeps every train reply that carries an update (what the server received)."""

    def __init__(self, cfg, fail=None):
        super().__init__(cfg, fail)
        self.replies = []
        self.messages = []

    def send_and_receive(self, messages, *, timeout=None):
        self.messages.extend(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        self.replies.extend(r for r in replies if "update" in r.content.array_records)
        return replies


def run_capturing_strategy(cfg, out, *, resume=False, grid=None):
    """Run ``cfg`` on the in-process grid; return (run directory, the round pipeline the loop built, the grid)."""
    from unittest import mock

    from stamen.server import loop
    from stamen.server.results import RunDirectory
    from stamen.strategies.preflight import build_pipeline

    grid = grid or LocalGrid(cfg)
    made = []

    def capture(c, **kw):
        made.append(build_pipeline(c, **kw))
        return made[-1]

    with mock.patch.object(loop, "build_pipeline", capture):
        loop.run_federation(grid, cfg, out, resume=resume)
    return RunDirectory(out), made[0], grid
