"""Ctrl-C for the command line: stop at the next round boundary, or within seconds, and leave
nothing behind.

:class:`Interrupt` replaces the SIGINT handler while a command runs. The first Ctrl-C asks the
work to stop cleanly (``on_first``, e.g. the federation loop stops before its next round, the
last complete round checkpointed) and starts a grace timer; when the timer runs out, or on a
second Ctrl-C, it prints the resume hint, kills every process this one started (Ray's raylet,
GCS and workers, sweep workers, SuperLink/SuperNodes — found through ``/proc``), and exits with
130, the shell's code for SIGINT. Files are safe either way: every result file and checkpoint is
written to a temporary file and renamed (``server/results.py``), so a kill leaves the previous
complete version.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

GRACE_S = 3.0
EXIT_CODE = 130


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant of ``pid`` (default: this process), children before grandchildren."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the command name may contain spaces
        children.setdefault(ppid, []).append(int(entry.name))
    out, frontier = [], [root]
    while frontier:
        nxt = [c for p in frontier for c in children.get(p, [])]
        out.extend(nxt)
        frontier = nxt
    return out


def kill_descendants(also: list[int] | None = None) -> None:
    """SIGKILL every process this one started, deepest first (they cannot respawn what is gone), and
    ``also`` — descendants seen earlier that a dying parent may have left to init meanwhile."""
    for pid in reversed(list(dict.fromkeys([*(also or []), *descendants()]))):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Interrupt:
    """``with Interrupt(hint, on_first):`` — see the module docstring. ``interrupted`` tells the
    caller, after the block, that the work stopped because of Ctrl-C (then exit with 130)."""

    def __init__(self, hint: str, on_first: Callable[[], None] | None = None, grace_s: float = GRACE_S):
        self.hint, self.on_first, self.grace_s = hint, on_first, grace_s
        self.interrupted = False
        self.family: list[int] = []  # descendants when Ctrl-C came (some get reparented while stopping)
        self._timer: threading.Timer | None = None
        self._previous = None

    def __enter__(self) -> "Interrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.interrupted:
            self.force()
        self.interrupted = True
        self.family = descendants()
        print(f"interrupted: stopping (Ctrl-C again to stop at once); {self.hint}", file=sys.stderr, flush=True)
        if self.on_first is not None:
            self.on_first()
        self._timer = threading.Timer(self.grace_s, self.force)
        self._timer.daemon = True
        self._timer.start()

    def force(self) -> None:
        print(f"stopped: {self.hint}", file=sys.stderr, flush=True)
        kill_descendants(self.family)
        os._exit(EXIT_CODE)
