"""Many clients in one process: virtual nodes, each with its own partition and state.

A *virtual node* is one federated client (one partition) whose ClientApp handlers run in a
process that serves many clients. Two places host them:

- the in-process grid (server/inprocess_grid.py) hosts every client in the server process;
- in a Ray simulation with ``federation.virtual_clients`` (the default), each simulated
  SuperNode is a *carrier* hosting the clients ``{p : p mod K = k}``. The server's
  :class:`~stamen.server.virtual_grid.VirtualGrid` packs a round's messages for one carrier
  into one Flower message; :func:`handle_pack` runs them (their training as one vectorised
  computation, :func:`run_clients`) and packs the replies (stamen/schema/pack.py describes the
  pack). The server still sends, receives, validates and accounts every client's own message.

Each client keeps its own ``context.state`` across rounds, as a SuperNode does; on a carrier
it lives in the carrier's state under the prefix ``v<partition>/``, so it travels with the
carrier's context wherever Ray runs the next pack. A per-client deadline applies to each
client's own time (as if every client had started together, which is what a parallel
federation would see), and a client whose handler raises gets an error reply, as Flower's
runtime gives one.
"""

from __future__ import annotations

import time

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.common.constant import ErrorCode

from stamen.schema import pack as P
from stamen.client.app import (finish_train, handle_evaluate, handle_query, handle_train, prepare_train,
                               train_many)
from stamen.client.cohort import vectorise_enabled
from stamen.config import StamenConfig

HANDLERS = {"train": handle_train, "evaluate": handle_evaluate, "query": handle_query}


def virtual_context(parent_run_id: int, node_id: int, partition: int, num_partitions: int,
                    state: RecordDict | None = None, run_config=None) -> Context:
    return Context(run_id=parent_run_id, node_id=node_id,
                   node_config={"partition-id": partition, "num-partitions": num_partitions},
                   state=state if state is not None else RecordDict(), run_config=dict(run_config or {}))


def _error_reply(msg: Message, err: Exception) -> Message:
    """As Flower's runtime does: the ClientApp's exception becomes an error reply."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                   reply_to=msg)


def run_client(cfg: StamenConfig, msg: Message, context: Context, deadline_s: float | None, *,
               vectorise: bool | None = None) -> Message | None:
    """One client's handler: its reply, an error reply if it raised, or None if it missed the deadline."""
    kind = msg.metadata.message_type.split(".")[0]
    start = time.perf_counter()
    try:
        if kind not in HANDLERS:
            raise ValueError(f"no client handler for message type {msg.metadata.message_type!r}")
        if kind == "train":
            reply = handle_train(cfg, msg, context, vectorise=vectorise)
        else:
            reply = HANDLERS[kind](cfg, msg, context)
    except Exception as err:
        return _error_reply(msg, err)
    if deadline_s is not None and time.perf_counter() - start > deadline_s:
        return None
    return reply


def run_clients(cfg: StamenConfig, items: list[tuple[Message, Context]], deadline_s: float | None, *,
                vectorise: bool | None = None) -> list[Message | None]:
    """Every client's handler for ``(message, its context)`` items; replies in order (None: late).

    Train messages go through the client pipeline's stages with only the training batched: each
    client's instruction check, downlink and faults (:func:`~stamen.client.app.prepare_train`),
    then all of them train as one vectorised computation (:func:`~stamen.client.app.train_many`),
    then each client's Δ, privacy, codec and reply (:func:`~stamen.client.app.finish_train`). A
    client's own time, which its deadline applies to, is its stages plus its share of the joint
    training (the stack's time in proportion to its steps): what it would have spent alone, up to
    the speed-up. ``vectorise=False`` (or ``STAMEN_VECTORISE=0``) runs each client's whole handler
    in turn instead, as before.
    """
    on = vectorise_enabled(cfg) if vectorise is None else vectorise
    if not on:
        return [run_client(cfg, msg, ctx, deadline_s, vectorise=False) for msg, ctx in items]
    out: list[Message | None] = [None] * len(items)
    requests, spent = {}, {}
    for i, (msg, ctx) in enumerate(items):
        if msg.metadata.message_type.split(".")[0] != "train":
            out[i] = run_client(cfg, msg, ctx, deadline_s)
            continue
        start = time.perf_counter()
        try:
            requests[i] = prepare_train(cfg, msg, ctx)
        except Exception as err:
            out[i] = _error_reply(msg, err)
            continue
        spent[i] = time.perf_counter() - start
    order = list(requests)
    outcomes = train_many(cfg, [requests[i] for i in order], vectorise=True)
    for i, outcome in zip(order, outcomes):
        msg = items[i][0]
        if isinstance(outcome, Exception):
            out[i] = _error_reply(msg, outcome)
            continue
        start = time.perf_counter()
        try:
            reply = finish_train(requests[i], outcome)
        except Exception as err:
            out[i] = _error_reply(msg, err)
            continue
        own = spent[i] + outcome.cost_s + time.perf_counter() - start
        out[i] = None if deadline_s is not None and own > deadline_s else reply
    return out


# -- carriers (Ray simulation) ---------------------------------------------------------------

def _state_key(partition: int, name: str) -> str:
    return f"v{partition}/{name}"


def _client_states(state: RecordDict) -> dict[int, RecordDict]:
    out: dict[int, RecordDict] = {}
    for key, record in state.items():
        if key.startswith("v") and "/" in key:
            pid, name = key[1:].split("/", 1)
            out.setdefault(int(pid), RecordDict())[name] = record
    return out


def handle_pack(cfg: StamenConfig, msg: Message, context: Context) -> Message:
    """Run every client message of a pack on this carrier; reply with one pack of their replies."""
    entries, deadline_s = P.unpack_messages(msg.content)
    states = _client_states(context.state)
    meta = msg.metadata
    items: list[tuple[Message, Context]] = []
    for e in entries:
        pid = int(e["partition"])
        own = Message(content=e["content"], metadata=Metadata(
            run_id=meta.run_id, message_id=meta.message_id, src_node_id=meta.src_node_id, dst_node_id=int(e["node"]),
            reply_to_message_id="", group_id=meta.group_id, created_at=meta.created_at, ttl=meta.ttl,
            message_type=str(e["type"]), src_task_id=meta.src_task_id, dst_task_id=meta.dst_task_id))
        items.append((own, virtual_context(context.run_id, int(e["node"]), pid, cfg.federation.clients,
                                           states.get(pid), context.run_config)))
    held = {pid: list(state.keys()) for pid, state in states.items()}  # before the handlers grow them
    replies = run_clients(cfg, items, deadline_s)
    for _, ctx in items:
        pid = int(ctx.node_config["partition-id"])
        for name in held.get(pid, ()):  # the carrier's copy of what this client held; its new state follows
            del context.state[_state_key(pid, name)]
        for name, record in ctx.state.items():
            context.state[_state_key(pid, name)] = record
    return Message(content=P.pack_replies(replies), reply_to=msg)
