"""The Stamen ClientApp: decode the downlink, train locally, encode the update.

One ClientApp serves simulation and deployment. Its run config comes either by closure
(:func:`make_client_app`, used by ``stamen run``) or, under ``flwr run`` / SuperNodes,
from Flower's ``context.run_config`` (flattened ``section.key`` entries). The partition a
node trains on is its ``partition-id`` node config. Each worker process builds the task
and the model once and reuses them across messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from stamen import protocol as P
from stamen.client.trainers import TRAINERS, TrainSettings
from stamen.config import StamenConfig, from_flat
from stamen.sketching.codec import CodecContext, derive_seed, make_codec
from stamen.tasks.task import Task, evaluate, get_weights, load_task, set_weights

log = logging.getLogger("stamen.client")


@dataclass
class _Worker:
    """What a worker process keeps between messages: config, task, model, codec."""

    cfg: StamenConfig
    task: Task
    model: torch.nn.Module
    device: str


_WORKERS: dict[str, _Worker] = {}


def resolve_device(requested: str) -> str:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device='cuda' but no CUDA device is visible to this client")
        return "cuda"
    return "cpu"


def _worker(cfg: StamenConfig) -> _Worker:
    key = cfg.to_json()
    if key not in _WORKERS:
        threads = max(1, int(cfg.federation.client_cpus))
        torch.set_num_threads(threads)
        task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
        device = resolve_device(cfg.run.device)
        _WORKERS.clear()
        _WORKERS[key] = _Worker(cfg, task, task.new_model().to(device), device)
    return _WORKERS[key]


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, ValueError, TypeError):
        raise ValueError("this node has no integer 'partition-id' in its node config "
                         "(start SuperNodes with --node-config 'partition-id=<i> num-partitions=<n>')") from None


def handle_train(cfg: StamenConfig, msg: Message, context: Context) -> Message:
    w = _worker(cfg)
    pid = _partition_id(context)
    X, y = w.task.data.client(pid)
    config = msg.content.config_records[P.CONFIG]
    server_round = int(config["server-round"])
    global_weights = P.from_array_record(msg.content.array_records[P.ARRAYS])
    set_weights(w.model, global_weights)

    settings = TrainSettings.from_task(cfg.task, w.device, proximal_mu=float(config.get("proximal-mu", 0.0)))
    gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, server_round, "batches", pid))
    train_loss, steps = TRAINERS["sgd"](w.model, X, y, settings, gen)

    layout = w.task.layout
    delta = layout.flatten(get_weights(w.model)) - layout.flatten(global_weights)
    codec = make_codec(cfg.compression.codec, **cfg.compression.options())
    state = _codec_state(context)
    payload = codec.encode(delta, CodecContext(cfg.run.seed, server_round, layout, node=pid), state)
    _store_codec_state(context, state)
    metrics = {P.NUM_EXAMPLES: len(y), "train_loss": train_loss, "local_steps": steps}
    return Message(content=P.train_reply(payload, metrics, codec.name, pid), reply_to=msg)


def handle_evaluate(cfg: StamenConfig, msg: Message, context: Context) -> Message:
    w = _worker(cfg)
    X, y = w.task.data.client(_partition_id(context))
    set_weights(w.model, P.from_array_record(msg.content.array_records[P.ARRAYS]))
    loss, acc = evaluate(w.model, X, y, cfg.eval.batch_size, w.device)
    metrics = MetricRecord({P.NUM_EXAMPLES: len(y), "eval_loss": loss, "eval_accuracy": acc})
    return Message(content=RecordDict({P.METRICS: metrics}), reply_to=msg)


def handle_query(cfg: StamenConfig, msg: Message, context: Context) -> Message:
    pid = _partition_id(context)
    return Message(content=RecordDict({P.META: ConfigRecord({P.PARTITION_ID: pid})}), reply_to=msg)


_CODEC_STATE = "codec-state"


def _codec_state(context: Context) -> dict:
    rec = context.state.array_records.get(_CODEC_STATE)
    return {} if rec is None else P.from_array_record(rec)


def _store_codec_state(context: Context, state: dict) -> None:
    if state:
        context.state[_CODEC_STATE] = P.to_array_record({k: np.asarray(v) for k, v in state.items()})


def make_client_app(cfg: StamenConfig | None = None) -> ClientApp:
    """A ClientApp bound to ``cfg`` (simulation), or reading ``context.run_config`` (deployment)."""
    app = ClientApp()

    def resolve(context: Context) -> StamenConfig:
        return cfg if cfg is not None else from_flat(dict(context.run_config))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(resolve(context), msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(resolve(context), msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(resolve(context), msg, context)

    return app


app = make_client_app()
