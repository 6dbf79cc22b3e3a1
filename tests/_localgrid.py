"""An in-process stand-in for Flower's Grid: every node's ClientApp handler runs in this
process, one after the other. It exercises the real server loop, strategies and client
handlers without Ray's start-up cost; the real-simulation tests cover the engine itself."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from stamen.client.app import handle_evaluate, handle_query, handle_train


class LocalGrid:
    def __init__(self, cfg, node_ids=None, fail=None):
        self.cfg = cfg
        n = cfg.federation.clients
        self.node_ids = list(node_ids or [1000 + 7 * i for i in range(n)])
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": n},
                                      state=RecordDict(), run_config={})
                         for i, nid in enumerate(self.node_ids)}
        self.fail = fail  # optional callable(message) -> bool: drop this node's reply
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        handlers = {"train": handle_train, "evaluate": handle_evaluate, "query": handle_query}
        replies = []
        for msg in messages:
            if self.fail and self.fail(msg):
                continue
            handler = handlers[msg.metadata.message_type.split(".")[0]]
            replies.append(handler(self.cfg, msg, self.contexts[msg.metadata.dst_node_id]))
        return replies
