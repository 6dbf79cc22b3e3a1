"""Sealed messages: a message's whole content as one Flower object, between Stamen's ServerApp and
Stamen's ClientApp runner in a deployment.

Flower 1.39 moves a message as a tree of objects — the message, its RecordDict, every record,
every array — and each object is its own RPC on every hop (ServerApp → SuperLink → SuperNode →
ClientApp and back; over the Fleet API each one signed by the node's key and verified by the
SuperLink). A carrier's reply pack holds 3–4 records per client (payload, metrics, identity),
≈ 40 objects for 5 clients; measured on loopback, moving them cost ~4 CPU seconds per round
across the processes, 20× the training. Sealed, a content is one ``ArrayRecord`` holding one
array of bytes — the RecordDict serialized by Flower's own protobuf serde — so a message is 4
objects (more only when Flower chunks arrays above 5 MB).

Who seals what (both ends are Stamen's; anything else sees plain Flower messages):

- the ServerApp (``server/app.py``, :class:`~stamen.server.app.ReplyPolling`) adds the small
  record :data:`WANTS_SEALED` to every message it sends (asking for a sealed reply) and, once a
  node has answered sealed (so its runner unseals), sends it sealed contents too — unless
  contents share records (a broadcast's weights, which Flower uploads once for all nodes)
  and sealing them would re-upload more than :data:`MAX_DUPLICATED_BYTES` (a few carriers
  sharing a small model: sealed; 1,000 nodes or a large model: the shared records stay
  Flower objects, the rest of each content travels as usual);
- the runner's worker (``deploy/clientapp.py``) unseals what it receives and removes
  :data:`WANTS_SEALED` before the ClientApp sees the message, and seals the reply when asked.

A ClientApp run by Flower's own ``flwr-clientapp`` gets the extra :data:`WANTS_SEALED` record
and answers plainly; the ServerApp then never seals to that node. Byte accounting
(``metrics.jsonl``) counts the plain contents, as in simulation. An unsealed content goes
through the same checks as any other: a blob that does not parse is a malformed reply.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.app import Array

SEALED = "stamen.sealed"  #: the record holding a sealed content
#: a send seals contents that share records (a broadcast) only while that re-uploads at most this many bytes
MAX_DUPLICATED_BYTES = 4 << 20
WANTS_SEALED = "stamen.seal-replies"  #: the record asking a Stamen runner for a sealed reply
_KEY, _STYPE = "content", "stamen.recorddict-proto"


class SealError(ValueError):
    """A sealed content that does not unseal (malformed bytes, wrong layout)."""


def is_sealed(content: RecordDict) -> bool:
    return SEALED in content


def wants_sealed(content: RecordDict) -> bool:
    return WANTS_SEALED in content


def seal_request() -> ConfigRecord:
    return ConfigRecord({"v": 1})


def seal(content: RecordDict) -> RecordDict:
    """``content`` as one record of one byte array (Flower's protobuf of the RecordDict)."""
    from flwr.common.serde import recorddict_to_proto

    blob = recorddict_to_proto(content).SerializeToString()
    return RecordDict({SEALED: ArrayRecord({_KEY: Array(dtype="uint8", shape=(len(blob),), stype=_STYPE,
                                                        data=blob)})})


def unseal(content: RecordDict) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

    try:
        if set(content.keys()) != {SEALED}:
            raise SealError(f"a sealed content holds only {SEALED!r}, not {sorted(content.keys())}")
        record = content[SEALED]
        if not isinstance(record, ArrayRecord) or list(record.keys()) != [_KEY] or record[_KEY].stype != _STYPE:
            raise SealError("the sealed record is not one byte array")
        return recorddict_from_proto(ProtoRecordDict.FromString(record[_KEY].data))
    except SealError:
        raise
    except Exception as err:  # protobuf DecodeError, bad record types, …
        raise SealError(f"sealed content does not parse: {type(err).__name__}: {err}") from None


def without_request(content: RecordDict) -> RecordDict:
    """``content`` without :data:`WANTS_SEALED` (a new RecordDict; the records are shared)."""
    return RecordDict({k: v for k, v in content.items() if k != WANTS_SEALED})
