"""Acceptance: the one place where a client's reply is checked before it may touch the model.

Every strategy, every message type (train, evaluate, plugin queries) goes through
:func:`accept_replies`. The server remembers what it issued in an :class:`Issued` — for each
instruction the node it went to, the partition it was for and a fresh nonce — and a reply is
accepted only if

1. it is a Stamen reply of this schema version (``meta`` with ``stamen-schema``);
2. it belongs to this run and this round (``stamen-run``, ``server-round`` echoed);
3. it answers an instruction the server issued (its nonce), **from the node that
   instruction went to** (Flower's ``src_node_id``; with node authentication in deployment
   a node cannot choose it), for **the partition the server assigned** to that node;
4. it is the first reply to that instruction (duplicates and replays are rejected);
5. its metrics are finite numbers and ``num-examples`` lies in (0, bound], the bound being
   what the server knows of that partition (the size the node reported when it joined,
   capped by ``federation.max_examples_per_client``);
6. its codec is the one the run uses, every payload array carries exactly the bytes its
   ``.npy`` header declares (numpy would allocate the declared size first), and the payload
   decodes (keys, dtypes, shapes, finiteness) — the ``decode`` callable given by the pipeline
   raises otherwise.

Identity entries must equal what the server issued *with the same type* (``1.0`` or ``True``
is not round or partition 1).

A reply that fails is rejected with a reason code and a message, logged, and counted in the
round's ``rejected`` / ``rejected_reasons``; it never reaches aggregation. Replies are
processed in partition order, so float sums do not depend on arrival order.
"""

from __future__ import annotations

import io
import logging
import math
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, Message

from stamen import schema as S
from stamen.schema.train import CODEC

log = logging.getLogger("stamen.accept")


@dataclass(frozen=True)
class Instruction:
    """One message the server sent: to ``node``, for partition ``pid``, identified by ``nonce``."""

    node: int
    pid: int
    nonce: str


@dataclass
class Issued:
    """What the server sent in one round for one message kind, to check the replies against."""

    run_id: str
    round: int
    kind: str  # "train", "evaluate", or a query name
    by_nonce: dict[str, Instruction] = field(default_factory=dict)

    def issue(self, node: int, pid: int) -> dict[str, Any]:
        """Record an instruction to ``node`` for ``pid``; return the identity entries it must carry."""
        nonce = secrets.token_hex(16)  # secret: a node cannot forge another node's instruction
        self.by_nonce[nonce] = Instruction(int(node), int(pid), nonce)
        return {S.SCHEMA: S.SCHEMA_VERSION, S.RUN_ID: self.run_id, S.SERVER_ROUND: int(self.round),
                S.PARTITION_ID: int(pid), S.NONCE: nonce}

    def partition_of(self, msg: Message) -> int:
        """The partition the server sent this reply's instruction for (sort key; -1 if unknown)."""
        try:
            return self.by_nonce[str(msg.content.config_records[S.META][S.NONCE])].pid
        except Exception:  # noqa: BLE001 — any malformed reply sorts last and is rejected in order
            return -1


class Rejected(Exception):
    """A reply that fails acceptance: ``code`` (counted per round) and a message naming the defect."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Reply:
    """An accepted reply: its partition, node, payload arrays (train), metrics and weight."""

    pid: int
    node: int
    payload: dict[str, Any]
    metrics: dict[str, float]
    contribution: Any = None  # what ``decode`` made of it (e.g. the update Δ)
    message: Message | None = None  # the reply as it arrived (e.g. to count its bytes)

    @property
    def weight(self) -> float:
        return float(self.metrics[S.NUM_EXAMPLES])


@dataclass
class Verdict:
    """The outcome of one acceptance pass."""

    accepted: list[Reply] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (node, code, message)

    @property
    def reasons(self) -> dict[str, int]:
        return dict(Counter(code for _, code, _ in self.rejected))

    @property
    def foreign(self) -> int:
        """Replies that were not Stamen replies at all (e.g. a plain Flower ClientApp)."""
        return sum(1 for _, code, _ in self.rejected if code == "not-stamen")


def accept_replies(replies: list[Message], issued: Issued, *, bounds: dict[int, float],
                   codec: str | None = None, decode: Callable[[Reply], Any] | None = None,
                   required_metrics: tuple[str, ...] = ()) -> Verdict:
    """Check every reply against ``issued`` (module docstring); decode the accepted ones.

    ``bounds``: the largest ``num-examples`` each partition may claim. ``codec``: the codec
    name train replies must carry (None: replies carry no payload). ``decode(reply)`` returns
    the reply's contribution or raises ``ValueError`` (``PayloadError``) naming the defect.
    """
    verdict, seen = Verdict(), set()
    for msg in sorted(replies, key=lambda m: (issued.partition_of(m), m.metadata.src_node_id)):
        node = msg.metadata.src_node_id
        try:
            reply = _check(msg, issued, seen, bounds, codec, required_metrics)
            if decode is not None:
                reply.contribution = decode(reply)
        except Rejected as err:
            _reject(verdict, issued, node, err.code, str(err))
            continue
        except (ValueError, KeyError, TypeError) as err:  # the decoder's verdict on the payload
            _reject(verdict, issued, node, "payload", f"{type(err).__name__}: {err}")
            continue
        seen.add(str(msg.content.config_records[S.META][S.NONCE]))
        verdict.accepted.append(reply)
    return verdict


def _reject(verdict: Verdict, issued: Issued, node: int, code: str, message: str) -> None:
    log.warning("round %d (%s): rejected reply from node %s [%s]: %s", issued.round, issued.kind, node, code, message)
    verdict.rejected.append((node, code, message))


def _check(msg: Message, issued: Issued, seen: set[str], bounds: dict[int, float], codec: str | None,
           required_metrics: tuple[str, ...]) -> Reply:
    if msg.has_error():
        raise Rejected("client-error", f"client error: {msg.error.reason}")
    content = msg.content
    meta = content.config_records.get(S.META)
    if meta is None or S.SCHEMA not in meta:
        raise Rejected("not-stamen", "not a Stamen reply (no 'meta' record with the schema version): is the ClientApp "
                                     "a Stamen app? (ARCHITECTURE.md, 'Message schema')")
    if not _same(meta.get(S.SCHEMA), S.SCHEMA_VERSION):
        raise Rejected("schema", f"reply has schema version {meta.get(S.SCHEMA)!r}, this server speaks "
                                 f"{S.SCHEMA_VERSION}")
    if not _same(meta.get(S.RUN_ID), issued.run_id):
        raise Rejected("wrong-run", f"reply belongs to run {meta.get(S.RUN_ID)!r}, not this run")
    if not _same(meta.get(S.SERVER_ROUND), int(issued.round)):  # issue() sent int(round)
        raise Rejected("wrong-round", f"reply is for round {meta.get(S.SERVER_ROUND)!r}, this is round {issued.round} "
                                      f"(a replay or a late reply)")
    nonce = meta.get(S.NONCE)
    instruction = issued.by_nonce.get(str(nonce)) if isinstance(nonce, str) else None
    if instruction is None:
        raise Rejected("unknown-instruction", "reply answers no instruction the server issued (unknown nonce)")
    if msg.metadata.src_node_id != instruction.node:
        raise Rejected("wrong-node", f"reply to the instruction sent to node {instruction.node} came from node "
                                     f"{msg.metadata.src_node_id}")
    if not _same(meta.get(S.PARTITION_ID), instruction.pid):
        raise Rejected("wrong-partition", f"reply names partition-id {meta.get(S.PARTITION_ID)!r}, but the "
                                          f"instruction was for partition {instruction.pid}")
    if nonce in seen:
        raise Rejected("duplicate", f"duplicate reply for partition-id {instruction.pid}")
    metrics = _check_metrics(content, instruction.pid, bounds, required_metrics)
    payload: dict[str, Any] = {}
    if codec is not None:
        if meta.get(CODEC) != codec:
            raise Rejected("codec", f"reply encoded with codec {meta.get(CODEC)!r}, expected {codec!r}")
        if S.UPDATE not in content.array_records:
            raise Rejected("payload", f"reply lacks the {S.UPDATE!r} record")
        payload = _payload_arrays(content.array_records[S.UPDATE])
    return Reply(instruction.pid, instruction.node, payload, metrics, message=msg)


def _same(value: Any, expected: Any) -> bool:
    """An echoed identity entry equals what the server issued, with the same type (``1.0`` and ``True``
    are not round or partition 1: the schema's identity entries are ints and strings)."""
    return type(value) is type(expected) and value == expected


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _payload_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The payload arrays of a reply, refusing any whose ``.npy`` header declares another amount of data
    than the array carries (or Python objects): numpy allocates the *declared* size before it reads the
    data, so a few bytes declaring a petabyte would otherwise raise MemoryError — or allocate it."""
    out = {}
    for key, array in record.items():
        if array.stype != "numpy.ndarray":
            raise Rejected("payload", f"payload array {key!r} is serialized as {array.stype!r}, not as a numpy array")
        data = array.data
        stream = io.BytesIO(data)
        try:
            shape, _, dtype = _NPY_HEADERS[np.lib.format.read_magic(stream)](stream)
        except Exception as err:  # noqa: BLE001 — any unreadable header is the sender's defect
            raise Rejected("payload", f"payload array {key!r} is not a .npy array of format 1.0/2.0 "
                                      f"({type(err).__name__}: {err})") from None
        if dtype.hasobject:
            raise Rejected("payload", f"payload array {key!r} holds Python objects ({dtype})")
        declared, carried = math.prod(shape) * dtype.itemsize, len(data) - stream.tell()
        if declared != carried:
            raise Rejected("payload", f"payload array {key!r} declares shape {shape} of {dtype} ({declared} bytes) "
                                      f"but carries {carried} bytes")
        out[key] = array.numpy()
    return out


def _check_metrics(content, pid: int, bounds: dict[int, float], required: tuple[str, ...]) -> dict[str, float]:
    if S.METRICS not in content.metric_records:
        raise Rejected("metrics", f"reply lacks the {S.METRICS!r} record")
    clean = {}
    for key, value in content.metric_records[S.METRICS].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Rejected("metrics", f"reply metric {key!r} is not a finite number: {value!r}")
        clean[key] = value
    for key in (S.NUM_EXAMPLES, *required):
        if key not in clean:
            raise Rejected("metrics", f"reply lacks the metric {key!r}")
    n, bound = clean[S.NUM_EXAMPLES], bounds.get(pid, math.inf)
    if not 0 < n <= bound:
        raise Rejected("num-examples", f"reply claims {S.NUM_EXAMPLES}={n!r} for partition {pid}; the server allows "
                                       f"(0, {bound:g}] (the partition's size)")
    return clean
