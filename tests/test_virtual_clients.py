"""Virtual clients on carrier nodes (server/virtual_grid.py, client/virtual.py) without Ray:
a fake Flower grid delivers each pack to ``handle_pack`` with the carrier's own context."""

import uuid

import numpy as np
import pytest
from _fakes import flower_identity  # noqa: F401
from _localgrid import LocalGrid
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from stamen import config as C
from stamen import schema as P
from stamen.schema import pack as PK
from stamen.client.virtual import handle_pack
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory
from stamen.server.virtual_grid import VIRTUAL_NODE_BASE, VirtualGrid


class CarrierGrid:
    """Flower's grid as the server sees it in simulation, with K carrier SuperNodes served in this process."""

    def __init__(self, cfg, k, *, fail_carrier=None, corrupt=False):
        self.cfg, self.ids = cfg, [50 + 3 * i for i in range(k)]
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": k},
                                      state=RecordDict(), run_config={}) for i, nid in enumerate(self.ids)}
        self.fail_carrier, self.corrupt, self.packs = fail_carrier, corrupt, []

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's push does
            self.packs.append(msg)
            node = msg.metadata.dst_node_id
            if node == self.fail_carrier:
                out.append(Message(Error(code=3, reason="actor died"),
                                   reply_to=msg))
                continue
            reply = handle_pack(self.cfg, msg, self.contexts[node])
            if self.corrupt:
                reply = Message(content=RecordDict({PK.PACK: ConfigRecord({"index": "[not json"})}), reply_to=msg)
            out.append(reply)
        return out


BASE = ["federation.clients=7", "run.rounds=3", "task.local_epochs=1", "task.hidden=16"]


def metrics(path):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in RunDirectory(path).read_metrics()]


def compare(tmp_path, k, *overrides):
    cfg = C.load(overrides=BASE + list(overrides))
    run_federation(LocalGrid(cfg), cfg, tmp_path / "one-per-client")
    inner = CarrierGrid(cfg, k)
    run_federation(VirtualGrid(inner, cfg, k), cfg, tmp_path / "carriers")
    return metrics(tmp_path / "one-per-client"), metrics(tmp_path / "carriers"), inner


def test_carriers_give_the_same_run_as_one_node_per_client(tmp_path):
    # error-feedback top-k keeps per-client state across rounds; 30 % failures give error replies
    a, b, inner = compare(tmp_path, 3, "federation.fraction_train=0.6", "compression.codec=topk",
                          "faults.client_failure=0.3")
    assert a == b and sum(r["rejected"] for r in a) > 0
    # one pack per carrier per call: discovery + 3 train rounds, 3 carriers
    assert len(inner.packs) <= 4 * 3
    # every carrier hosts {p : p mod 3 = k} and keeps their state under its own context
    for i, nid in enumerate(inner.ids):
        hosted = {int(key[1:].split("/")[0]) for key in inner.contexts[nid].state.keys()}
        assert hosted and all(p % 3 == i for p in hosted)


def test_a_broadcast_travels_once_per_carrier_but_is_accounted_per_client(tmp_path):
    a, b, inner = compare(tmp_path, 2)
    train_packs = [m for m in inner.packs if m.metadata.message_type.startswith("train")]
    assert all(r["downlink_bytes"] == a[0]["downlink_bytes"] for r in b)  # what 7 clients' messages weigh
    per_round = sum(P.content_bytes(m.content) for m in train_packs[:2])
    assert per_round < 0.4 * b[0]["downlink_bytes"]  # 2 copies of the weights instead of 7


def test_virtual_node_ids_and_unknown_destinations():
    cfg = C.load(overrides=BASE)
    grid = VirtualGrid(CarrierGrid(cfg, 2), cfg, 2)
    assert grid.get_node_ids() == [VIRTUAL_NODE_BASE + p for p in range(7)]
    bad = Message(content=RecordDict({P.CONFIG: ConfigRecord({})}), dst_node_id=12345, message_type="query")
    with pytest.raises(ValueError, match="unknown node 12345"):
        grid.send_and_receive([bad])


def test_more_supernodes_than_carriers_is_an_error():
    cfg = C.load(overrides=BASE)
    with pytest.raises(RuntimeError, match="expected 2 carriers"):
        VirtualGrid(CarrierGrid(cfg, 3), cfg, 2).get_node_ids()


def query_all(grid):
    return grid.send_and_receive([Message(content=RecordDict({P.CONFIG: ConfigRecord({P.SCHEMA: P.SCHEMA_VERSION})}),
                                          dst_node_id=n,
                                          message_type="query") for n in grid.get_node_ids()])


def test_a_failed_carrier_becomes_an_error_reply_for_each_of_its_clients():
    cfg = C.load(overrides=BASE)
    inner = CarrierGrid(cfg, 2, fail_carrier=50)
    replies = query_all(VirtualGrid(inner, cfg, 2))
    errors = [r for r in replies if r.has_error()]
    assert len(replies) == 7 and len(errors) == 4  # partitions 0, 2, 4, 6 live on the first carrier
    assert all("actor died" in r.error.reason and r.metadata.src_node_id - VIRTUAL_NODE_BASE in (0, 2, 4, 6)
               for r in errors)
    ok = sorted(int(r.content.config_records[P.META][P.PARTITION_ID]) for r in replies if not r.has_error())
    assert ok == [1, 3, 5]


def test_a_malformed_reply_pack_is_an_error_for_its_clients_not_a_crash():
    cfg = C.load(overrides=BASE)
    replies = query_all(VirtualGrid(CarrierGrid(cfg, 2, corrupt=True), cfg, 2))
    assert len(replies) == 7 and all(r.has_error() and "malformed reply pack" in r.error.reason for r in replies)


def test_the_deadline_applies_to_each_clients_own_time(tmp_path):
    slow = ["faults.straggler_fraction=0.5", "faults.straggler_delay_s=0.2", "faults.round_deadline_s=0.15",
            "run.rounds=2"]
    a, b, _ = compare(tmp_path, 2, *slow)
    assert [r["clients"] for r in a] == [r["clients"] for r in b]
    assert sum(r["missing"] for r in b) > 0


def test_pack_round_trip_keeps_shared_records_once():
    shared = P.to_array_record({"w": np.ones((3, 2), dtype=np.float32)})
    msgs = [Message(content=RecordDict({P.ARRAYS: shared, P.CONFIG: ConfigRecord({"i": i})}),
                    dst_node_id=VIRTUAL_NODE_BASE + i, message_type="train") for i in range(3)]
    content = PK.pack_messages(msgs, [0, 1, 2], 1.5)
    assert len(content.array_records) == 1 and len(content.config_records) == 4  # 3 configs + the index
    entries, deadline = PK.unpack_messages(content)
    assert deadline == 1.5 and [e["partition"] for e in entries] == [0, 1, 2]
    assert [e["content"].config_records[P.CONFIG]["i"] for e in entries] == [0, 1, 2]
    with pytest.raises(ValueError, match="malformed pack"):
        PK.unpack_messages(RecordDict({PK.PACK: ConfigRecord({"index": "{}"})}))
