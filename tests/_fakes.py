"""Hand-made Flower messages for strategy unit tests (no grid, no Ray)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message

from stamen import protocol as P
from stamen.config import load
from stamen.sketching.codec import Layout, make_codec
from stamen.strategies.registry import build_strategy

@pytest.fixture(autouse=True)
def flower_identity():
    """Flower stamps messages with the run and node of the current process; fake one."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old


LAYOUT = Layout(("w", "b"), ((3, 2), (2,)))
NODES = {0: 1001, 1: 1002, 2: 1003, 3: 1004}


class FakeGrid:
    def get_node_ids(self):
        return list(NODES.values())


def bound_strategy(name="fedavg", *extra, codec="dense", layout=None, **opts):
    cfg = load(overrides=[f"strategy.name={name}"] + [f"strategy.{k}={v}" for k, v in opts.items()] + list(extra))
    s = build_strategy(cfg)
    s.bind(seed=0, nodes=NODES, layout=layout or LAYOUT, codec=make_codec(codec, **cfg.compression.options()),
           fraction_train=1.0, fraction_evaluate=0.0)
    return s


def global_weights():
    return {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.array([1.0, -1.0], dtype=np.float32)}


def reply_to(msg, delta, n, *, codec="dense", pid=None, payload=None):
    pid = next(p for p, nid in NODES.items() if nid == msg.metadata.dst_node_id) if pid is None else pid
    payload = {"values": np.asarray(delta, dtype=np.float32)} if payload is None else payload
    content = P.train_reply(payload, {P.NUM_EXAMPLES: n, "train_loss": 1.0}, codec, pid)
    return Message(content=content, reply_to=msg)


def configure(s, rnd=1):
    return list(s.configure_train(rnd, P.to_array_record(global_weights()), ConfigRecord(), FakeGrid()))


