"""An in-process Grid: every node's ClientApp handler runs in this process, one after the other.

For studies and quick experiments that want the real server loop, strategies and client
handlers without Ray's start-up cost (``run_federation(InProcessGrid(cfg), cfg, out)``).
It is exact: the same seeds give the same metrics as a Ray simulation of the same config,
because every random draw in Stamen is derived from (seed, round, node), not from
scheduling. Nothing is parallel, so it is meant for small federations on a few cores.

(The tests keep their own ``tests/_localgrid.py``, which also injects reply failures.)
"""

from __future__ import annotations

import time

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from stamen.client.app import handle_evaluate, handle_query, handle_train


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
    """The subset of Flower's ``Grid`` the server loop uses, with one in-process node per partition.

    Node ids are ``1000 + 7·partition``; each node keeps its own ``context.state`` across
    rounds, as a SuperNode does.
    """

    HANDLERS = {"train": handle_train, "evaluate": handle_evaluate, "query": handle_query}

    def __init__(self, cfg):
        self.cfg = cfg
        n = cfg.federation.clients
        self.node_ids = [1000 + 7 * i for i in range(n)]
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": n},
                                      state=RecordDict(), run_config={})
                         for i, nid in enumerate(self.node_ids)}
        _ensure_task_identity()

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            kind = msg.metadata.message_type.split(".")[0]
            if kind not in self.HANDLERS:
                raise ValueError(f"in-process grid cannot deliver message type {msg.metadata.message_type!r}")
            start = time.perf_counter()
            try:
                reply = self.HANDLERS[kind](self.cfg, msg, self.contexts[msg.metadata.dst_node_id])
                # nodes run one after the other here; a deadline applies to each node's own time,
                # as if all had started together (what a parallel federation would see)
                if timeout is not None and time.perf_counter() - start > timeout:
                    continue
                replies.append(reply)
            except Exception as err:  # as Flower's runtime does: the ClientApp's exception becomes an error reply
                reason = f"{type(err).__name__}: {err}"
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg))
        return replies
