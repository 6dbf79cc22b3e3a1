"""Start Flower processes and stop every one of them again, grandchildren included.

Flower's SuperLink and SuperNodes spawn a SuperExec in a *new session*, which spawns the
ServerApp / ClientApp processes; killing a process group therefore misses them, and they
outlive their parents for a while. Each process started here carries two environment
variables (inherited by everything it spawns): the group's unique tag and its own name.
Stopping a name signals its root first (so a SuperNode can sign off), then kills whatever
still carries the tag — found by PID in ``/proc/<pid>/environ``, never by process name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

TAG_VAR = "STAMEN_DEPLOY_TAG"
NAME_VAR = "STAMEN_DEPLOY_PROC"


@dataclass
class Started:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    log: Path


def _environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours
        return None
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def tagged_pids(tag: str, name: str | None = None) -> list[int]:
    """PIDs of live processes whose environment carries ``tag`` (and ``name``, if given)."""
    if not Path("/proc").is_dir():
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        env = _environ(int(entry.name))
        if env and env.get(TAG_VAR) == tag and (name is None or env.get(NAME_VAR) == name):
            if not _is_zombie(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ProcessGroup:
    """The processes of one deployment; :meth:`shutdown` leaves none behind."""

    def __init__(self, logdir: str | Path, tag: str | None = None, env: dict[str, str] | None = None):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.tag = tag or f"stamen-{uuid.uuid4().hex[:16]}"
        self.env = dict(env or {})
        self.started: dict[str, Started] = {}

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              netns: str | None = None, cwd: str | Path | None = None) -> Started:
        """Start ``argv`` (in network namespace ``netns`` if given), output to ``logdir/name.log``."""
        if name in self.started and self.started[name].popen.poll() is None:
            raise RuntimeError(f"process {name!r} is already running")
        full_env = {**os.environ, **self.env, **(env or {}), TAG_VAR: self.tag, NAME_VAR: name}
        # the Flower / Ray / stamen commands of this Python environment first, also for the processes
        # they spawn by name (flower-superlink starts `flower-superexec`), even if it is not activated
        full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full_env.get("PATH", "")])
        cmd = [*(["ip", "netns", "exec", netns] if netns else []), *argv]
        log = self.logdir / f"{name}.log"
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=full_env, cwd=cwd, start_new_session=True)
        self.started[name] = Started(name, list(cmd), popen, log)
        return self.started[name]

    def alive(self, name: str) -> bool:
        s = self.started.get(name)
        return s is not None and s.popen.poll() is None

    def log_tail(self, name: str, lines: int = 30) -> str:
        s = self.started.get(name)
        if s is None or not s.log.exists():
            return ""
        return "\n".join(s.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, name: str, *, sig: int = signal.SIGTERM, grace: float = 10.0) -> int | None:
        """Stop process ``name`` and everything it spawned; return its exit code."""
        s = self.started.get(name)
        if s is None:
            return None
        if s.popen.poll() is None:
            _signal(s.popen.pid, sig)
            try:
                s.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal(s.popen.pid, signal.SIGKILL)
                s.popen.wait(timeout=10)
        self._kill_tagged(name)
        return s.popen.returncode

    def kill(self, name: str) -> int | None:
        """SIGKILL ``name`` and its descendants at once (a crash, not a shutdown)."""
        self._kill_tagged(name)
        return self.stop(name, sig=signal.SIGKILL, grace=5.0)

    def _kill_tagged(self, name: str | None, rounds: int = 3) -> None:
        for _ in range(rounds):
            pids = tagged_pids(self.tag, name)
            if not pids:
                return
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.2)

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop every process in reverse start order, then kill anything still tagged."""
        for name in reversed(list(self.started)):
            try:
                self.stop(name, grace=grace)
            except Exception:  # keep going: the point is to leave nothing behind
                pass
        self._kill_tagged(None, rounds=5)

    def leftovers(self) -> list[int]:
        return tagged_pids(self.tag)

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
