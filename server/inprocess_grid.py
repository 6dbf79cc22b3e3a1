"""An in-process Grid: every node's ClientApp handler runs in this process, one after the other.

For studies and quick experiments that want the real server loop, strategies and client
handlers without Ray's start-up cost (``run_federation(InProcessGrid(cfg), cfg, out)``).
It is exact: the same seeds give the same metrics as a Ray simulation of the same config,
because every random draw in Stamen is derived from (seed, round, node), not from
scheduling. Nothing runs in other processes; since the cohort trains as one computation it is
also the fastest engine on one machine (RESULTS.md, "Vectorised cohort").

A call's train messages train as one vectorised computation (client/cohort.py; the other
stages stay per client, client/virtual.py ``run_clients``). A node's context exists only while
it holds state (codec memory, a catch-up copy, …): an empty one is made when a message needs it
and dropped after, so a federation of a million nodes costs nothing per idle node.

(The tests keep their own ``tests/_localgrid.py``, which also injects reply failures.)
"""

from __future__ import annotations

from flwr.app import Context, Message

from stamen.client.virtual import run_clients, virtual_context


def _ensure_task_identity() -> None:
    """Flower stamps every message with the current process's run/task/node; outside a
    Flower runtime nothing set them, so give them placeholder values (only if unset)."""
    from flwr.supercore.task_identity import TaskIdentity

    if getattr(TaskIdentity, "_task_id", None) is None:
        TaskIdentity.task_id = 1
    if getattr(TaskIdentity, "_run_id", None) is None:
        TaskIdentity.run_id = 1
    if getattr(TaskIdentity, "_node_id", None) is None:
        TaskIdentity.node_id = 0


class InProcessGrid:
    """The subset of Flower's ``Grid`` the server loop uses, with one in-process virtual node per
    partition (client/virtual.py).

    Node ids are ``1000 + 7·partition``; each node keeps its own ``context.state`` across
    rounds, as a SuperNode does. A deadline applies to each node's own time, as if all had
    started together. ``vectorise``: None follows ``STAMEN_VECTORISE`` / the config, False
    runs each node's handler in turn.
    """

    def __init__(self, cfg, *, vectorise: bool | None = None):
        self.cfg = cfg
        self.vectorise = vectorise
        self.num_nodes = n = cfg.federation.clients
        self.contexts = _NodeContexts(n)
        _ensure_task_identity()

    @property
    def node_ids(self) -> range:
        return range(NODE_BASE, NODE_BASE + NODE_STRIDE * self.num_nodes, NODE_STRIDE)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def describe_partitions(self) -> tuple[dict[int, int], dict[int, int]]:
        """What the server loop's discovery learns by querying every node — ({partition: node id},
        {partition: examples}) — in one call, from the partitions' sizes (made on demand ones are not
        built). For a server that would otherwise send one message per node (RESULTS.md, "Vectorised
        cohort": the change a million clients need)."""
        from stamen.client.app import _worker

        data = _worker(self.cfg).task.data
        sizes = getattr(data.clients, "sizes", None)
        if sizes is None:
            sizes = [data.size(p) for p in range(self.num_nodes)]
        nodes = dict(zip(range(self.num_nodes), self.node_ids))
        return nodes, dict(zip(range(self.num_nodes), map(int, sizes)))

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        items = [(msg, self.contexts[msg.metadata.dst_node_id]) for msg in messages]
        replies = run_clients(self.cfg, items, timeout, vectorise=self.vectorise)
        self.contexts.drop_empty([ctx for _, ctx in items])
        return [r for r in replies if r is not None]


NODE_BASE, NODE_STRIDE = 1000, 7


class _NodeContexts(dict):
    """{node id: its Context}, made on first use; contexts without state are dropped after a call."""

    def __init__(self, num_nodes: int):
        super().__init__()
        self.num_nodes = num_nodes

    def __missing__(self, node_id: int) -> Context:
        pid, rest = divmod(node_id - NODE_BASE, NODE_STRIDE)
        if rest or not 0 <= pid < self.num_nodes:
            raise KeyError(node_id)
        ctx = self[node_id] = virtual_context(1, node_id, pid, self.num_nodes)
        return ctx

    def drop_empty(self, contexts) -> None:
        for ctx in contexts:
            if not len(ctx.state) and self.get(ctx.node_id) is ctx:
                del self[ctx.node_id]
