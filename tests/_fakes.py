"""Hand-made Flower messages for round-pipeline unit tests (no grid, no Ray)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message

from stamen import schema as P
from stamen.config import load
from stamen.core import Layout
from stamen.schema import train as T
from stamen.strategies.preflight import build_pipeline


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
BOUND = 100  # the example count each fake partition reported when it joined


class FakeGrid:
    def get_node_ids(self):
        return list(NODES.values())


def bound_strategy(name="fedavg", *extra, codec="dense", layout=None, fraction=1.0, **opts):
    """A round pipeline for ``strategy.name=name`` bound to four fake nodes."""
    cfg = load(overrides=[f"strategy.name={name}", f"compression.codec={codec}", "federation.clients=4"]
               + [f"strategy.{k}={v}" for k, v in opts.items()] + list(extra))
    s = build_pipeline(cfg)
    s.bind(seed=0, nodes=NODES, layout=layout or LAYOUT, fraction_train=fraction, fraction_evaluate=0.0, rounds=5,
           timeout=10.0, bounds={p: BOUND for p in NODES}, run_id="test-run")
    return s


def global_weights():
    return {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.array([1.0, -1.0], dtype=np.float32)}


def reply_to(msg, delta, n, *, codec="dense", pid=None, payload=None, metrics=None, meta=None):
    """A client's reply to ``msg``, echoing its identity entries (override any with ``meta``)."""
    config = dict(msg.content.config_records[P.CONFIG])
    if pid is not None:
        config[P.PARTITION_ID] = pid
    payload = {"values": np.asarray(delta, dtype=np.float32)} if payload is None else payload
    content = T.train_reply(payload, {P.NUM_EXAMPLES: n, "train_loss": 1.0, **(metrics or {})}, codec, config)
    for k, v in (meta or {}).items():
        content.config_records[P.META][k] = v
    return Message(content=content, reply_to=msg)


def configure(s, rnd=1):
    return list(s.configure_train(rnd, P.to_array_record(global_weights()), ConfigRecord(), FakeGrid()))
