"""Several "hosts" on one Linux machine: the SuperLink and each SuperNode in its own network
namespace, joined by veth pairs (needs root and ``ip netns``).

Topology (node i gets its own point-to-point link; nothing touches this machine's own network)::

    [ns <p>-sl]  veth<i> 10.200.<i>.1/24  <====>  eth0 10.200.<i>.2/24  [ns <p>-n<i>]

The SuperLink binds its Fleet API on 0.0.0.0 inside its namespace; SuperNode i dials
10.200.<i>.1, so every update crosses a real (virtual) link between network stacks. The
server certificate lists all 10.200.<i>.1 addresses as SANs.

That 0.0.0.0 is a deliberate, namespace-internal bind, not a default: Flower's Fleet API takes
one address and the SuperLink's namespace has one veth per SuperNode, so it must listen on all of
them; the namespace has nothing but ``lo`` and those veths (no route to this machine's networks),
and the federation runs TLS with node authentication (``superlink_args`` refuses it otherwise).
The Control API stays on the namespace's loopback, where the ``flwr`` CLI runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field

from stamen.deploy.local import Placement

SUBNET = "10.200"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable_reason() -> str | None:
    """None if network namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"stmprobe-{uuid.uuid4().hex[:6]}"
    try:
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"`ip netns add` failed: {r.stderr.strip()}"
        r = _ip("link", "add", "p0", "netns", probe, "type", "veth", "peer", "name", "p1", "netns", probe, check=False)
        if r.returncode != 0:
            return f"cannot create veth pairs: {r.stderr.strip()}"
        return None
    finally:
        _ip("netns", "del", probe, check=False)


@dataclass
class NetnsTopology:
    """Namespaces for 1 SuperLink + ``nodes`` SuperNodes; use as a context manager."""

    nodes: int
    prefix: str = field(default_factory=lambda: f"stm{uuid.uuid4().hex[:6]}")
    created: list[str] = field(default_factory=list)

    @property
    def superlink_ns(self) -> str:
        return f"{self.prefix}-sl"

    def node_ns(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    @staticmethod
    def superlink_ip(i: int) -> str:
        return f"{SUBNET}.{i}.1"

    @staticmethod
    def node_ip(i: int) -> str:
        return f"{SUBNET}.{i}.2"

    def create(self) -> "NetnsTopology":
        if self.nodes > 250:
            raise ValueError("at most 250 SuperNodes (one /24 each under 10.200.0.0/16)")
        for ns in [self.superlink_ns, *(self.node_ns(i) for i in range(self.nodes))]:
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        sl = self.superlink_ns
        for i in range(self.nodes):
            ns = self.node_ns(i)
            _ip("link", "add", f"veth{i}", "netns", sl, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sl, "addr", "add", f"{self.superlink_ip(i)}/24", "dev", f"veth{i}")
            _ip("-n", ns, "addr", "add", f"{self.node_ip(i)}/24", "dev", "eth0")
            _ip("-n", sl, "link", "set", f"veth{i}", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
        return self

    def placement(self) -> Placement:
        return Placement(superlink_ns=self.superlink_ns, fleet_bind="0.0.0.0",
                         node_ns=[self.node_ns(i) for i in range(self.nodes)],
                         node_dial=[self.superlink_ip(i) for i in range(self.nodes)],
                         cert_ips=[self.superlink_ip(i) for i in range(self.nodes)])

    def destroy(self) -> None:
        """Delete the namespaces (their veth pairs go with them). Stop their processes first."""
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)
        self.created.clear()

    def __enter__(self) -> "NetnsTopology":
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc) -> None:
        self.destroy()
