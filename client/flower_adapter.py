"""Run a plain Flower ClientApp under Stamen's ServerApp: :func:`adapt`.

A plain Flower ClientApp (as in Flower's quickstarts) receives the global weights in
``arrays`` and ``server-round`` in ``config`` and replies with its trained weights and a
``num-examples`` metric. Stamen's ServerApp speaks another schema (ARCHITECTURE.md, "Message
schema"): every instruction names its run, round, partition and a nonce, and every reply is a
codec-encoded *update* Δ = w_local − w_global with the instruction's identity echoed. Without
an adapter the two refuse each other loudly (Stamen's server stops: "0 of N replies were Stamen
replies"; Stamen's client replies with an error naming the missing schema entries).

:func:`adapt` wraps the plain app into a Stamen ClientApp. For a train instruction it checks
the instruction against the schema, hands the plain app a Flower-style message (the global
weights; ``server-round`` and FedProx's ``proximal-mu`` in the config), computes Δ from the
weights it returns, applies Stamen's client privacy hook (clipping; local noise from OS
entropy), encodes Δ with the codec the instruction names and replies in Stamen's schema. So a
plain app works with every strategy whose clients send updates with a dense downlink and no
trainer of their own (fedavg, fedprox, fedadam, fedavgm, the robust aggregators, with any
codec and DP); an instruction that needs more (a catch-up downlink, Stamen's adversarial,
curriculum, guided or zeroth-order trainer) is refused with a message saying so.

Node discovery needs the size of the node's data (the bound on its later ``num-examples``
claims): pass ``num_examples`` or set the node config ``num-examples``. Sketch codecs draw
their operator from the run seed: pass ``seed`` (or set the run config ``run.seed``) equal to
the ServerApp's ``run.seed``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.clientapp import ClientApp

from stamen import schema as S
from stamen.client.privacy_hooks import apply_client_privacy, apply_payload_privacy
from stamen.core import Layout
from stamen.privacy.noise import noise_source
from stamen.schema import SchemaError
from stamen.schema import evaluate as E
from stamen.schema import query as Q
from stamen.schema import train as T
from stamen.sketching.codec import CodecContext, make_codec

#: config entries of a Stamen instruction that a plain Flower ClientApp understands
FLOWER_ENTRIES = (S.SERVER_ROUND, T.PROXIMAL_MU)
_STATE = "flower-adapter-codec-state"
_LOSS_NAMES = ("eval_loss", "loss")
_ACCURACY_NAMES = ("eval_accuracy", "eval_acc", "accuracy", "acc")


def adapt(plain: ClientApp, *, num_examples: int | None = None, seed: int | None = None) -> ClientApp:
    """A Stamen ClientApp around ``plain`` (module docstring)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = _partition_id(context)
        config = dict(msg.content.config_records.get(S.CONFIG, {}))
        T.check_instruction(config, partition_id=pid)
        _refuse_what_needs_stamens_client(config)
        global_arrays = S.from_array_record(msg.content.array_records[S.ARRAYS])
        reply = _call(plain, msg, config, MessageType.TRAIN, context)
        weights, metrics = _weights_and_metrics(reply)
        layout = Layout.from_arrays(global_arrays)
        delta = layout.flatten(weights) - layout.flatten(global_arrays)
        run_seed = _seed(seed, context)
        noise = noise_source(bool(config.get(T.DP_REPRODUCIBLE, False)), run_seed)
        extra: dict[str, float] = {}
        delta = apply_client_privacy(delta, config, noise.generator(config[S.SERVER_ROUND], "dp-local", pid),
                                     layout.numels, extra)
        codec = make_codec(str(config.get(T.CODEC, "dense")), **_codec_options(config))
        state = S.from_array_record(context.state.array_records[_STATE]) if _STATE in context.state.array_records \
            else {}
        ctx = CodecContext(run_seed, int(config.get(T.CODEC_ROUND, config[S.SERVER_ROUND])), layout, node=pid)
        payload = codec.encode(delta, ctx, state)
        payload = apply_payload_privacy(payload, config, noise.generator(config[S.SERVER_ROUND], "dp-local", pid),
                                        extra)
        if state:
            context.state[_STATE] = S.to_array_record({k: np.asarray(v) for k, v in state.items()})
        out = {S.NUM_EXAMPLES: metrics[S.NUM_EXAMPLES], **{k: v for k, v in metrics.items() if k != S.NUM_EXAMPLES},
               **extra}
        return Message(content=T.train_reply(payload, out, codec.name, config), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = _partition_id(context)
        config = dict(msg.content.config_records.get(S.CONFIG, {}))
        _check_identity(config, pid)
        reply = _call(plain, msg, config, MessageType.EVALUATE, context)
        metrics = _metrics(reply)
        out = {S.NUM_EXAMPLES: metrics[S.NUM_EXAMPLES], E.EVAL_LOSS: _first(metrics, _LOSS_NAMES),
               E.EVAL_ACCURACY: _first(metrics, _ACCURACY_NAMES)}
        return Message(content=RecordDict({S.METRICS: MetricRecord(out), S.META: _meta(config, pid)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = _partition_id(context)
        config = dict(msg.content.config_records.get(S.CONFIG, {}))
        if config.get(Q.QUERY):
            raise SchemaError(f"query {config[Q.QUERY]!r} needs Stamen's own ClientApp (the adapter answers "
                              f"node discovery only)")
        if config.get(S.SCHEMA) != S.SCHEMA_VERSION:
            raise SchemaError(f"discovery query of schema {config.get(S.SCHEMA)!r}; this adapter speaks "
                              f"{S.SCHEMA_VERSION}")
        size = num_examples if num_examples is not None else context.node_config.get("num-examples")
        if not isinstance(size, int) or size <= 0:
            raise SchemaError("the adapter needs the size of this node's data for discovery: adapt(app, "
                              "num_examples=N) or the node config 'num-examples=N'")
        return Message(content=RecordDict({S.META: ConfigRecord({S.PARTITION_ID: pid, S.SCHEMA: S.SCHEMA_VERSION}),
                                           S.METRICS: MetricRecord({S.NUM_EXAMPLES: size})}), reply_to=msg)

    return app


def _refuse_what_needs_stamens_client(config: dict[str, Any]) -> None:
    downlink, trainer = config.get(T.DOWNLINK, "dense"), config.get(T.TRAINER, "sgd")
    if downlink != "dense":
        raise SchemaError(f"this strategy sends a compressed downlink ({T.DOWNLINK}={downlink!r}) that only Stamen's "
                          f"ClientApp rebuilds; set strategy.downlink='dense' or run Stamen's ClientApp")
    if trainer != "sgd":
        raise SchemaError(f"this strategy asks for Stamen's {trainer!r} trainer, which a plain Flower ClientApp does "
                          f"not have; run Stamen's ClientApp")


def _call(plain: ClientApp, msg: Message, config: dict[str, Any], kind: str, context: Context) -> Message:
    """The plain app's reply to a Flower-style copy of ``msg`` (same metadata, Flower's entries only)."""
    inner = ConfigRecord({k: config[k] for k in FLOWER_ENTRIES if k in config})
    meta = msg.metadata
    message = Message(content=RecordDict({S.ARRAYS: msg.content.array_records[S.ARRAYS], S.CONFIG: inner}),
                      metadata=Metadata(run_id=meta.run_id, message_id=meta.message_id, src_node_id=meta.src_node_id,
                                        dst_node_id=meta.dst_node_id, reply_to_message_id="", group_id=meta.group_id,
                                        created_at=meta.created_at, ttl=meta.ttl, message_type=kind,
                                        src_task_id=meta.src_task_id, dst_task_id=meta.dst_task_id))
    reply = plain(message, context)
    if reply.has_error():
        raise RuntimeError(f"the wrapped Flower ClientApp failed: {reply.error.reason}")
    return reply


def _metrics(reply: Message) -> dict[str, float]:
    records = list(reply.content.metric_records.values())
    if len(records) != 1 or S.NUM_EXAMPLES not in records[0]:
        raise SchemaError(f"the wrapped ClientApp must reply with one MetricRecord holding {S.NUM_EXAMPLES!r}")
    return dict(records[0])


def _weights_and_metrics(reply: Message) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    arrays = list(reply.content.array_records.values())
    if len(arrays) != 1:
        raise SchemaError(f"the wrapped ClientApp must reply with one ArrayRecord of weights, got {len(arrays)}")
    return S.from_array_record(arrays[0]), _metrics(reply)


def _first(metrics: dict[str, float], names: tuple[str, ...]) -> float:
    for name in names:
        if name in metrics:
            return float(metrics[name])
    raise SchemaError(f"the wrapped ClientApp's evaluate reply has none of the metrics {list(names)}")


def _partition_id(context: Context) -> int:
    pid = context.node_config.get("partition-id")
    if not isinstance(pid, int):
        raise SchemaError("this node has no integer 'partition-id' in its node config")
    return pid


def _check_identity(config: dict[str, Any], pid: int) -> None:
    if config.get(S.SCHEMA) != S.SCHEMA_VERSION or any(k not in config for k in T.IDENTITY):
        raise SchemaError(f"this message is not in Stamen's schema {S.SCHEMA_VERSION}")
    if config[S.PARTITION_ID] != pid:
        raise SchemaError(f"message is for partition-id {config[S.PARTITION_ID]}, this node holds {pid}")


def _meta(config: dict[str, Any], pid: int) -> ConfigRecord:
    return ConfigRecord({**{k: config[k] for k in T.IDENTITY}, S.SCHEMA: S.SCHEMA_VERSION, S.PARTITION_ID: pid})


def _codec_options(config: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(config[T.CODEC_OPTIONS]) if T.CODEC_OPTIONS in config else {}


def _seed(seed: int | None, context: Context) -> int:
    if seed is not None:
        return int(seed)
    return int(context.run_config.get("run.seed", 0))
