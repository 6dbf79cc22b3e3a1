"""An in-process Grid: every node's ClientApp handler runs in this process, one after the other.

For studies and quick experiments that want the real server loop, strategies and client
handlers without Ray's start-up cost (``run_federation(InProcessGrid(cfg), cfg, out)``).
It is exact: the same seeds give the same metrics as a Ray simulation of the same config,
because every random draw in Stamen is derived from (seed, round, node), not from
scheduling. Nothing is parallel, so it is meant for small federations on a few cores.

(The tests keep their own ``tests/_localgrid.py``, which also injects reply failures.)
"""

from __future__ import annotations

from flwr.app import Message

from stamen.client.virtual import run_client, virtual_context


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
    rounds, as a SuperNode does. Nodes run one after the other; a deadline applies to each
    node's own time, as if all had started together.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        n = cfg.federation.clients
        self.node_ids = [1000 + 7 * i for i in range(n)]
        self.contexts = {nid: virtual_context(1, nid, i, n) for i, nid in enumerate(self.node_ids)}
        _ensure_task_identity()

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = [run_client(self.cfg, msg, self.contexts[msg.metadata.dst_node_id], timeout) for msg in messages]
        return [r for r in replies if r is not None]
