"""Packs: many clients' messages in one Flower message (simulation, ``federation.virtual_clients``).

A pack carries the messages for several virtual nodes hosted by one simulated SuperNode (a
carrier, client/virtual.py). Its content holds every distinct record of those messages once
(a broadcast's global weights travel once per carrier, not once per client) under keys
``r<i>``, and an index (ConfigRecord ``pack``, JSON) saying for each message its virtual
node, partition, message type and which record each of its keys is. A reply pack holds, in
the same order, each client's reply records, or its error, or that it missed the deadline.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Message, RecordDict

PACK = "pack"
PACK_ACTION = "stamen_pack"  # message type of a pack: "<train|evaluate|query>.stamen_pack"


def pack_messages(messages: list[Message], partitions: list[int], deadline_s: float | None) -> RecordDict:
    records: dict[str, object] = {}
    keys: dict[int, str] = {}
    entries = []
    for msg, pid in zip(messages, partitions, strict=True):
        names = {}
        for name, record in msg.content.items():
            key = keys.get(id(record))
            if key is None:
                key = keys[id(record)] = f"r{len(keys)}"
                records[key] = record
            names[name] = key
        entries.append({"node": int(msg.metadata.dst_node_id), "partition": int(pid),
                        "type": msg.metadata.message_type, "records": names})
    index = json.dumps({"entries": entries, "deadline_s": deadline_s})
    return RecordDict({**records, PACK: ConfigRecord({"index": index})})


def unpack_messages(content: RecordDict) -> tuple[list[dict], float | None]:
    """The entries of a pack (``node``, ``partition``, ``type``, ``content``) and its per-client deadline."""
    try:
        index = json.loads(str(content.config_records[PACK]["index"]))
        entries = index["entries"]
        for e in entries:
            e["content"] = RecordDict({name: content[key] for name, key in e.pop("records").items()})
        return entries, index["deadline_s"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed pack message: {type(err).__name__}: {err}") from None


def pack_replies(replies: list[Message | None]) -> RecordDict:
    """One reply pack for a carrier's replies (None: the client missed the deadline)."""
    records: dict[str, object] = {}
    index = []
    for reply in replies:
        if reply is None:
            index.append({"late": True})
        elif reply.has_error():
            index.append({"error": [int(reply.error.code), str(reply.error.reason)]})
        else:
            names = {}
            for name, record in reply.content.items():
                names[name] = key = f"r{len(records)}"
                records[key] = record
            index.append({"records": names})
    return RecordDict({**records, PACK: ConfigRecord({"index": json.dumps(index)})})


def unpack_replies(content: RecordDict) -> list[RecordDict | tuple[int, str] | None]:
    """Per client, in pack order: its reply content, or ``(error code, reason)``, or None (late)."""
    try:
        out: list[RecordDict | tuple[int, str] | None] = []
        for e in json.loads(str(content.config_records[PACK]["index"])):
            if e.get("late"):
                out.append(None)
            elif "error" in e:
                out.append((int(e["error"][0]), str(e["error"][1])))
            else:
                out.append(RecordDict({name: content[key] for name, key in e["records"].items()}))
        return out
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"malformed reply pack: {type(err).__name__}: {err}") from None
