"""A byte-counting TCP proxy: what really crosses the wire between SuperNodes and the SuperLink.

Start it in front of the SuperLink's Fleet API and point the SuperNodes at it. It forwards
bytes unchanged (with TLS it sees ciphertext, so counts include TLS records, HTTP/2 frames,
gRPC headers and Flower's own polling) and records every chunk with a timestamp and a
direction, so the bytes of any time window — a round — can be summed afterwards:

- ``up``: client → server (SuperNode → SuperLink: replies, i.e. model updates, and polls);
- ``down``: server → client (SuperLink → SuperNode: instructions, i.e. global models).

Loopback by default; it binds only the address it is given.
"""

from __future__ import annotations

import socket
import threading
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

UP, DOWN = "up", "down"


@dataclass
class _Log:
    times: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    cumulative: list[int] = field(default_factory=list)

    def add(self, t: float, n: int) -> None:
        self.times.append(t)
        self.sizes.append(n)
        self.cumulative.append((self.cumulative[-1] if self.cumulative else 0) + n)

    def between(self, t0: float, t1: float) -> int:
        i, j = bisect_left(self.times, t0), bisect_right(self.times, t1)
        if j <= i:
            return 0
        return self.cumulative[j - 1] - (self.cumulative[i - 1] if i > 0 else 0)


@dataclass
class Burst:
    """Consecutive chunks on one connection with no pause longer than the grouping gap."""

    connection: int
    start: float
    end: float
    up: int = 0
    down: int = 0
    events: list[tuple[float, int, str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.up + self.down


def bursts(events: list[tuple[float, int, str, int]], gap: float = 1.0) -> list[Burst]:
    """Group chunks into bursts per connection (a pause longer than ``gap`` seconds ends a burst).

    Flower 1.39 SuperNodes poll every 3 s while idle (one small request/response, ~0.8 kB with TLS
    and node-auth metadata) and not at all while their ClientApp runs; a message delivery or a
    reply upload is a burst of object pulls/pushes. Bursts separate the two.
    """
    out: list[Burst] = []
    current: dict[int, Burst] = {}
    for e in sorted(events):
        t, conn, direction, n = e
        b = current.get(conn)
        if b is None or t - b.end > gap:
            b = current[conn] = Burst(conn, t, t)
            out.append(b)
        b.end = t
        setattr(b, direction, getattr(b, direction) + n)
        b.events.append(e)
    return sorted(out, key=lambda b: b.start)


def split_traffic(events: list[tuple[float, int, str, int]], windows: list[tuple[float, float]],
                  gap: float = 1.0, min_transfer: int = 3000) -> list[dict[str, int]]:
    """Bytes per window and direction, split into transfers (bursts ≥ ``min_transfer`` bytes:
    messages and replies with their gRPC/HTTP2/TLS framing) and the rest (polls, heartbeats, pings)."""
    label: dict[tuple[float, int, str, int], bool] = {}
    for b in bursts(events, gap):
        for e in b.events:
            label[e] = b.total >= min_transfer
    rows = []
    for t0, t1 in windows:
        row = {f"{kind}_{d}": 0 for kind in ("wire", "transfer", "polling") for d in (UP, DOWN)}
        for e in events:
            if t0 <= e[0] <= t1:
                row[f"wire_{e[2]}"] += e[3]
                row[f"{'transfer' if label.get(e) else 'polling'}_{e[2]}"] += e[3]
        rows.append(row)
    return rows


class ByteCountingProxy:
    """Forward ``listen`` → ``upstream`` and count bytes per direction over time."""

    def __init__(self, upstream: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0), chunk: int = 65536):
        self.upstream = upstream
        self.chunk = chunk
        self._lock = threading.Lock()
        self._logs = {UP: _Log(), DOWN: _Log()}
        self._events: list[tuple[float, int, str, int]] = []  # (time, connection, direction, bytes)
        self.connections = 0
        self._closing = threading.Event()
        self._socks: set[socket.socket] = set()
        self._server = socket.create_server(listen, reuse_port=False)
        self._server.settimeout(0.2)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name="byte-proxy", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.address[1]

    # -- counting ----------------------------------------------------------------------
    def _record(self, conn: int, direction: str, n: int) -> None:
        t = time.time()
        with self._lock:
            self._logs[direction].add(t, n)
            self._events.append((t, conn, direction, n))

    def events(self, t0: float = 0.0, t1: float = float("inf")) -> list[tuple[float, int, str, int]]:
        """Every forwarded chunk as (time, connection number, direction, bytes), in time order."""
        with self._lock:
            return [e for e in self._events if t0 <= e[0] <= t1]

    def total(self, direction: str) -> int:
        with self._lock:
            c = self._logs[direction].cumulative
            return c[-1] if c else 0

    def between(self, direction: str, t0: float, t1: float) -> int:
        """Bytes in ``direction`` whose chunk arrived in the wall-clock window [t0, t1]."""
        with self._lock:
            return self._logs[direction].between(t0, t1)

    def snapshot(self) -> dict[str, int]:
        return {UP: self.total(UP), DOWN: self.total(DOWN), "connections": self.connections}

    # -- forwarding --------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                conn = self.connections
                self._socks.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, conn, UP), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, conn, DOWN), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, conn: int, direction: str) -> None:
        try:
            while True:
                data = src.recv(self.chunk)
                if not data:
                    break
                self._record(conn, direction, len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def close(self) -> None:
        self._closing.set()
        try:
            self._server.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        self._thread.join(timeout=2)

    def __enter__(self) -> "ByteCountingProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
