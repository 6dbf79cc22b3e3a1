"""A Grid of one virtual node per client over a few simulated SuperNodes (carriers).

Flower's simulation engine serves every message with a Ray task and scans every node in
0.1 s polling loops, so one SuperNode per client costs ~10 ms per client update beyond the
training itself (RESULTS.md, issue 11), and grows with the number of clients N.
With ``federation.virtual_clients`` (the default of ``stamen run``) the simulation starts K
carrier SuperNodes instead (``federation.sim_nodes``; 0 = twice the actors Ray runs at once).
:class:`VirtualGrid` shows the server loop and the strategies N virtual nodes, one per
partition, exactly as one SuperNode per client would; per call it packs the messages for
the clients hosted by one carrier (``{p : p mod K = k}``) into one Flower message
(stamen/schema/pack.py), and unpacks the carriers' reply packs into one reply per client.
Strategies therefore send, receive, validate and aggregate every client's own message, and
``uplink_bytes`` / ``downlink_bytes`` count every client's own message as a one-node-per-client
deployment would carry it (a pack carries a broadcast's records once per carrier, so the
simulation moves fewer bytes than it accounts).

Timing semantics: a ``timeout`` passed to :meth:`send_and_receive` is a per-client deadline
applied to each client's own time on its carrier (client/virtual.py), as the in-process grid
does; the wait for the carriers themselves is ``federation.round_timeout_s``. A carrier that
fails turns into an error reply for each of its clients; a carrier that does not answer in
time leaves its clients missing.
"""

from __future__ import annotations

import time
from collections import defaultdict

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from stamen.schema import pack as P

#: virtual node ids: far from Flower's random 64-bit SuperNode ids in practice, and recognisable
VIRTUAL_NODE_BASE = 1 << 40


class VirtualGrid:
    def __init__(self, grid, cfg, carriers: int, *, pull_interval_s: float = 0.005):
        self._grid, self.cfg = grid, cfg
        self.num_carriers = int(carriers)
        self.wait_s = cfg.federation.round_timeout_s
        self._carriers: list[int] | None = None
        n = cfg.federation.clients
        self.node_of = {p: VIRTUAL_NODE_BASE + p for p in range(n)}
        self.partition_of = {v: p for p, v in self.node_of.items()}
        if hasattr(grid, "pull_interval"):  # Flower's in-memory grid sleeps this long between polls
            grid.pull_interval = min(grid.pull_interval, pull_interval_s)

    # -- what the server loop and strategies see ----------------------------------------
    def get_node_ids(self) -> list[int]:
        return list(self.node_of.values()) if self._carriers_ready() else []

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        carriers = self._require_carriers()
        groups: dict[tuple[int, str], list[Message]] = defaultdict(list)
        for msg in messages:
            pid = self.partition_of.get(msg.metadata.dst_node_id)
            if pid is None:
                raise ValueError(f"message for unknown node {msg.metadata.dst_node_id}: a VirtualGrid has nodes "
                                 f"{VIRTUAL_NODE_BASE}..{VIRTUAL_NODE_BASE + len(self.node_of) - 1}")
            kind = msg.metadata.message_type.split(".")[0]
            groups[(carriers[pid % len(carriers)], kind)].append(msg)
        packs, members = [], {}
        for (carrier, kind), group in groups.items():
            content = P.pack_messages(group, [self.partition_of[m.metadata.dst_node_id] for m in group], timeout)
            pack = Message(content=content, dst_node_id=carrier, message_type=f"{kind}.{P.PACK_ACTION}")
            packs.append(pack)
            members[id(pack)] = group
        wait = max(self.wait_s, timeout or 0.0)
        replies = list(self._grid.send_and_receive(packs, timeout=wait))
        by_id = {pack.metadata.message_id: members[id(pack)] for pack in packs}  # ids were set when pushed
        out: list[Message] = []
        for reply in replies:
            group = by_id.get(reply.metadata.reply_to_message_id)
            if group is None:
                continue  # not one of ours (cannot happen with Flower's grids)
            out.extend(self._unpack(reply, group))
        return out

    # -- internals ------------------------------------------------------------------------
    @staticmethod
    def _unpack(reply: Message, group: list[Message]) -> list[Message]:
        if reply.has_error():
            reason = f"carrier node {reply.metadata.src_node_id} failed: {reply.error.reason}"
            return [Message(Error(code=reply.error.code, reason=reason), reply_to=m) for m in group]
        try:
            items = P.unpack_replies(reply.content)
            if len(items) != len(group):
                raise ValueError(f"reply pack has {len(items)} replies for {len(group)} messages")
        except ValueError as err:
            return [Message(Error(code=ErrorCode.UNKNOWN, reason=str(err)), reply_to=m) for m in group]
        out = []
        for msg, item in zip(group, items):
            if item is None:
                continue  # the client missed its deadline
            if isinstance(item, tuple):
                out.append(Message(Error(code=item[0], reason=item[1]), reply_to=msg))
            else:
                out.append(Message(content=item, reply_to=msg))
        return out

    def _carriers_ready(self) -> bool:
        if self._carriers is None:
            ids = sorted(self._grid.get_node_ids())
            if len(ids) < self.num_carriers:
                return False
            if len(ids) > self.num_carriers:
                raise RuntimeError(f"the simulation has {len(ids)} SuperNodes, expected {self.num_carriers} carriers")
            self._carriers = ids
        return True

    def _require_carriers(self) -> list[int]:
        deadline = time.monotonic() + self.wait_s
        while not self._carriers_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(list(self._grid.get_node_ids()))} of {self.num_carriers} carrier "
                                   f"nodes connected within {self.wait_s:.0f} s")
            time.sleep(0.05)
        return self._carriers  # type: ignore[return-value]

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
