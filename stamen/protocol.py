"""The message schema both apps share: record keys, reply packing, byte counting.

Server → client (train): ``arrays`` (ArrayRecord: the global weights, or a strategy's
compressed downlink) and ``config`` (ConfigRecord: ``server-round`` plus what the
strategy asks of the client, e.g. ``proximal-mu``).

Client → server (train): ``update`` (ArrayRecord: the codec's payload for the update
Δ = w_local − w_global), ``metrics`` (MetricRecord: ``num-examples``, ``train_loss``) and
``meta`` (ConfigRecord: ``codec`` and ``partition-id``).

Bytes are the protobuf-serialized size of the RecordDict a message carries, counted the
same way in simulation and deployment.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

ARRAYS = "arrays"
CONFIG = "config"
UPDATE = "update"
METRICS = "metrics"
META = "meta"
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
CODEC = "codec"
QUERY_PARTITION = "query"  # message type the server uses to learn each node's partition-id


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def train_reply(payload: dict[str, np.ndarray], metrics: dict[str, float], codec: str, partition_id: int,
                extra_meta: dict | None = None) -> RecordDict:
    meta = {CODEC: codec, PARTITION_ID: int(partition_id), **(extra_meta or {})}
    return RecordDict({UPDATE: to_array_record(payload), METRICS: MetricRecord(metrics), META: ConfigRecord(meta)})


def content_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content (what travels, before transport framing)."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())


def message_bytes(message: Message) -> int:
    if message.has_error():
        return 0
    return content_bytes(message.content)
