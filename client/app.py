"""The Stamen ClientApp: decode the downlink, train locally, encode the update.

One ClientApp serves simulation and deployment. Its run config comes either by closure
(:func:`make_client_app`, used by ``stamen run``) or, under ``flwr run`` / SuperNodes,
from Flower's ``context.run_config`` (flattened ``section.key`` entries). The partition a
node trains on is its ``partition-id`` node config. Each worker process builds the task
and the model once and reuses them across messages.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from stamen import protocol as P
from stamen.client.faults import before_training, byzantine_partitions, corrupt_update, flip_labels
from stamen.client.trainers import TrainJob, TrainSettings, get_trainer, load_client_plugins
from stamen.config import StamenConfig, from_flat
from stamen.sketching.codec import Codec, CodecContext, derive_seed, make_codec
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
_LAST_WORKER: list[_Worker | None] = [None]


def resolve_device(requested: str) -> str:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device='cuda' but no CUDA device is visible to this client")
        return "cuda"
    return "cpu"


def _worker(cfg: StamenConfig) -> _Worker:
    last = _LAST_WORKER[0]
    if last is not None and last.cfg is cfg:  # the same config object as the previous message: no re-keying
        return last
    key = cfg.to_json()
    if key not in _WORKERS:
        threads = max(1, int(cfg.federation.client_cpus))
        torch.set_num_threads(threads)
        task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
        device = resolve_device(cfg.run.device)
        _WORKERS.clear()
        _WORKERS[key] = _Worker(cfg, task, task.new_model().to(device), device)
    _LAST_WORKER[0] = _WORKERS[key]
    return _WORKERS[key]


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, ValueError, TypeError):
        raise ValueError("this node has no integer 'partition-id' in its node config "
                         "(start SuperNodes with --node-config 'partition-id=<i> num-partitions=<n>')") from None


_DECODED: list = [None, None]  # (ArrayRecord, its arrays): a pack's clients share one global-weights record


def dense_downlink(content: RecordDict, job: TrainJob) -> dict[str, np.ndarray]:
    """The default downlink: the global weights as they are (decoded once per record object; callers
    must not modify them)."""
    record = content.array_records[P.ARRAYS]
    if _DECODED[0] is not record:
        _DECODED[:] = [record, P.from_array_record(record)]
    return _DECODED[1]


#: how a client turns a train message into global weights, by the config entry ``downlink``
DOWNLINKS: dict[str, Callable[[RecordDict, TrainJob], dict[str, np.ndarray]]] = {"dense": dense_downlink}

#: extra ``query`` handlers by the config entry ``query`` (default: report the partition-id)
QUERIES: dict[str, Callable[[StamenConfig, Message, Context], RecordDict]] = {}


def handle_train(cfg: StamenConfig, msg: Message, context: Context) -> Message:
    w = _worker(cfg)
    pid = _partition_id(context)
    X, y = w.task.data.client(pid)
    config = dict(msg.content.config_records[P.CONFIG])
    if cfg.task.curriculum != "vanilla" and "trainer" not in config:  # task.curriculum: data ordering, any strategy
        from stamen.client.trainers_curriculum import task_curriculum_options
        config.update(task_curriculum_options(cfg.task))
    server_round = int(config["server-round"])
    job = TrainJob(options=config, state=context.state, task=w.task, partition_id=pid,
                   server_round=server_round, seed=cfg.run.seed)
    load_client_plugins()  # trainer modules also register downlinks and queries
    downlink = config.get("downlink", "dense")
    if downlink not in DOWNLINKS:
        raise ValueError(f"unknown downlink {downlink!r}; known: {sorted(DOWNLINKS)}")
    global_weights = DOWNLINKS[downlink](msg.content, job)
    set_weights(w.model, global_weights)

    faults = cfg.faults
    faults_on = faults != type(faults)()
    byzantine = faults_on and pid in byzantine_partitions(cfg.run.seed, cfg.federation.clients,
                                                          faults.byzantine_fraction)
    if faults_on:
        before_training(faults, cfg.run.seed, server_round, pid)
    if byzantine and faults.byzantine_attack == "label_flip":
        y = flip_labels(y, w.task.data.num_classes)

    settings = TrainSettings.from_task(cfg.task, w.device, proximal_mu=float(config.get("proximal-mu", 0.0)))
    gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, server_round, "batches", pid))
    trainer = get_trainer(str(config.get("trainer", "sgd")))
    train_loss, steps = trainer(w.model, X, y, settings, gen, job)

    layout = w.task.layout
    delta = layout.flatten(get_weights(w.model)) - layout.flatten(global_weights)
    if byzantine:
        delta = corrupt_update(delta, faults.byzantine_attack, faults.byzantine_scale,
                               torch.Generator().manual_seed(derive_seed(cfg.run.seed, server_round, "byzantine", pid)))
    from stamen.client.privacy_hooks import apply_client_privacy, apply_payload_privacy  # dp-* config entries

    dp_gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, server_round, "dp-local", pid))
    delta = apply_client_privacy(delta, config, dp_gen, layout.numels, job.metrics)
    codec = _codec(cfg, config)
    state = _codec_state(context)
    payload = codec.encode(delta, CodecContext(cfg.run.seed, int(config.get("codec-round", server_round)), layout, node=pid), state)
    payload = apply_payload_privacy(payload, config, dp_gen, job.metrics)
    _store_codec_state(context, state)
    metrics = {P.NUM_EXAMPLES: len(y), "train_loss": train_loss, "local_steps": steps, **job.metrics}
    return Message(content=P.train_reply(payload, metrics, codec.name, pid), reply_to=msg)


def handle_evaluate(cfg: StamenConfig, msg: Message, context: Context) -> Message:
    w = _worker(cfg)
    X, y = w.task.data.client(_partition_id(context))
    set_weights(w.model, P.from_array_record(msg.content.array_records[P.ARRAYS]))
    loss, acc = evaluate(w.model, X, y, cfg.eval.batch_size, w.device)
    metrics = MetricRecord({P.NUM_EXAMPLES: len(y), "eval_loss": loss, "eval_accuracy": acc})
    return Message(content=RecordDict({P.METRICS: metrics}), reply_to=msg)


def handle_query(cfg: StamenConfig, msg: Message, context: Context) -> Message:
    kind = msg.content.config_records[P.CONFIG].get("query", "") if P.CONFIG in msg.content.config_records else ""
    if kind:
        load_client_plugins()  # trainers_* modules may register query handlers
        if kind not in QUERIES:
            raise ValueError(f"unknown query {kind!r}; known: {sorted(QUERIES)}")
        return Message(content=QUERIES[kind](cfg, msg, context), reply_to=msg)
    pid = _partition_id(context)
    return Message(content=RecordDict({P.META: ConfigRecord({P.PARTITION_ID: pid})}), reply_to=msg)


_CODECS: dict[str, Codec] = {}


def _codec(cfg: StamenConfig, config: dict) -> Codec:
    """The codec the strategy asked for (``codec`` / ``codec-options`` entries), cached per process."""
    name = str(config.get(P.CODEC, cfg.compression.codec))
    options = json.loads(config["codec-options"]) if "codec-options" in config else cfg.compression.options()
    key = json.dumps([name, options], sort_keys=True)
    if key not in _CODECS:
        _CODECS.clear()
        _CODECS[key] = make_codec(name, **options)
    return _CODECS[key]


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

    def pack(msg: Message, context: Context) -> Message:  # many clients' messages (client/virtual.py)
        from stamen.client.virtual import handle_pack

        return handle_pack(resolve(context), msg, context)

    for register in (app.train, app.evaluate, app.query):
        register(P.PACK_ACTION)(pack)

    return app


app = make_client_app()
