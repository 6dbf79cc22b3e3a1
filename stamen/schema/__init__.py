"""The message schema both apps share (version :data:`SCHEMA_VERSION`).

Every Stamen message is a Flower ``RecordDict`` of named records. This package holds the
names, one module per message type, imported by the ServerApp and the ClientApp alike:

- :mod:`stamen.schema.train` — train instructions (``config`` entries) and train replies;
- :mod:`stamen.schema.evaluate` — federated evaluation;
- :mod:`stamen.schema.query` — node discovery and plugin queries (curriculum scores);
- :mod:`stamen.schema.pack` — many clients' messages in one Flower message (simulation).

The envelope (this module): an instruction carries ``arrays`` (ArrayRecord: the global
weights or a strategy's compressed downlink) and ``config`` (ConfigRecord); a reply carries
``update`` (ArrayRecord: the codec payload), ``metrics`` (MetricRecord) and ``meta``
(ConfigRecord). Every instruction names the schema version, the run, the round, the
partition it is for and a fresh nonce; every reply echoes them in ``meta``, and the server
accepts a reply only if they match what it issued (``strategies/accept.py``).
Docs: ``ARCHITECTURE.md`` ("Message schema").

Bytes are the protobuf-serialized size of the RecordDict a message carries, counted the
same way in simulation and deployment.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

#: bumped whenever a key's meaning or type changes; both apps refuse another version
SCHEMA_VERSION = 1

# records
ARRAYS = "arrays"
CONFIG = "config"
UPDATE = "update"
METRICS = "metrics"
META = "meta"

# entries every Stamen instruction carries (config) and every reply echoes (meta)
SCHEMA = "stamen-schema"
RUN_ID = "stamen-run"
NONCE = "stamen-nonce"
SERVER_ROUND = "server-round"
PARTITION_ID = "partition-id"

# reply metrics every reply carries
NUM_EXAMPLES = "num-examples"


class SchemaError(ValueError):
    """A message that is not in Stamen's schema (wrong version, missing or mistyped entries)."""


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def content_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content (what travels, before transport framing)."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())


def message_bytes(message: Message) -> int:
    if message.has_error():
        return 0
    return content_bytes(message.content)


def binding(meta_or_config) -> dict:
    """The identity entries of an instruction (run, round, partition, nonce, schema version)."""
    return {k: meta_or_config.get(k) for k in (SCHEMA, RUN_ID, SERVER_ROUND, PARTITION_ID, NONCE)}
