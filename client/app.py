"""The Stamen ClientApp: one handler pipeline for every strategy.

A train message goes through the same stages whatever the strategy:

    check the instruction → decode the downlink → train → privatize → encode → reply

1. the instruction must be in Stamen's schema (``stamen/schema/train.py``: version, identity
   entries, known keys with their types) and for this node's partition, else the handler
   raises and Flower returns an error reply naming the defect;
2. the downlink handler named by ``downlink`` (dense weights, or a strategy's catch-up) gives
   the global weights;
3. the trainer named by ``trainer`` trains the worker's model in place;
4. the privacy hook clips (and, for local DP, noises) Δ as the ``dp-*`` entries say — local
   noise from this process's OS entropy, which the server never sees;
5. the codec named by ``codec`` encodes Δ (payload-space privacy after it);
6. the reply echoes the instruction's identity entries, so the server can bind it to what it sent.

The stages are three functions so that a process hosting many clients (client/virtual.py,
server/inprocess_grid.py) can batch only the training: :func:`prepare_train` (1, 2 and the
client's faults: injected failure, straggler delay, flipped labels), the training stage
(:func:`train_local` for one client, :func:`train_many` for several: one vectorised
computation, client/cohort.py) and :func:`finish_train` (Δ and a Byzantine client's corruption,
4, 5, 6). Every stage but training stays per client and unchanged.

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

from stamen import schema as S
from stamen.client.faults import before_training, byzantine_partitions, corrupt_update, flip_labels
from stamen.client.privacy_hooks import apply_client_privacy, apply_payload_privacy
from stamen.schema.secagg import BITS as SECAGG_BITS
from stamen.client.cohort import LocalJob, LocalOutcome, train_clients, vectorise_enabled
from stamen.client.trainers import TrainJob, TrainSettings, get_trainer, load_client_plugins
from stamen.config import StamenConfig, from_flat
from stamen.core import derive_seed
from stamen.privacy.noise import noise_source
from stamen.schema import SchemaError
from stamen.schema import evaluate as E
from stamen.schema import query as Q
from stamen.schema import train as T
from stamen.schema.pack import PACK_ACTION
from stamen.sketching.codec import Codec, CodecContext, make_codec
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
    record = content.array_records[S.ARRAYS]
    if _DECODED[0] is not record:
        _DECODED[:] = [record, S.from_array_record(record)]
    return _DECODED[1]


#: how a client turns a train message into global weights, by the config entry ``downlink``
DOWNLINKS: dict[str, Callable[[RecordDict, TrainJob], dict[str, np.ndarray]]] = {"dense": dense_downlink}

#: extra ``query`` handlers by the config entry ``query`` (default: report the partition-id)
QUERIES: dict[str, Callable[[StamenConfig, Message, Context], RecordDict]] = {}


def handle_train(cfg: StamenConfig, msg: Message, context: Context, *, vectorise: bool | None = None) -> Message:
    """The client pipeline for a train message (module docstring). Even one client trains through
    the vectorised stage (a stack of one) unless vectorisation is off, so that a client's floats
    are the same whether its SuperNode serves it alone or a carrier trains it with others."""
    request = prepare_train(cfg, msg, context)
    (outcome,) = train_many(cfg, [request], vectorise=vectorise)
    if isinstance(outcome, Exception):
        raise outcome
    return finish_train(request, outcome)


@dataclass
class TrainRequest:
    """One client's train message between the per-client stages and the training stage."""

    cfg: StamenConfig
    msg: Message
    context: Context
    worker: _Worker
    config: dict
    byzantine: bool
    local: LocalJob  # what the training stage needs (client/cohort.py trains many of these at once)

    @property
    def job(self) -> TrainJob:
        return self.local.job


def prepare_train(cfg: StamenConfig, msg: Message, context: Context) -> TrainRequest:
    """The stages before training: check the instruction, decode the downlink, then the client's
    faults (an injected failure raises, a straggler sleeps, a label-flipping client's labels flip)."""
    w = _worker(cfg)
    pid = _partition_id(context)
    config = _instruction(msg, pid)
    if cfg.task.curriculum != "vanilla" and T.TRAINER not in config:  # task.curriculum: data ordering, any strategy
        from stamen.client.trainers_curriculum import task_curriculum_options
        config.update(task_curriculum_options(cfg.task))
    server_round = int(config[S.SERVER_ROUND])
    job = TrainJob(options=config, state=context.state, task=w.task, partition_id=pid,
                   server_round=server_round, seed=cfg.run.seed)
    global_weights = _downlink(msg.content, config, job)
    X, y = w.task.data.client(pid)
    faults = cfg.faults
    faults_on = faults != type(faults)()
    byzantine = faults_on and pid in byzantine_partitions(cfg.run.seed, cfg.federation.clients,
                                                          faults.byzantine_fraction)
    if faults_on:
        before_training(faults, cfg.run.seed, server_round, pid)
    if byzantine and faults.byzantine_attack == "label_flip":
        y = flip_labels(y, w.task.data.num_classes)
    settings = TrainSettings.from_task(cfg.task, w.device, proximal_mu=float(config.get(T.PROXIMAL_MU, 0.0)))
    gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, server_round, "batches", pid))
    local = LocalJob(weights=global_weights, X=X, y=y, settings=settings, generator=gen, job=job,
                     trainer=str(config.get(T.TRAINER, "sgd")))
    return TrainRequest(cfg, msg, context, w, config, bool(byzantine), local)


def train_local(model: torch.nn.Module, local: LocalJob) -> LocalOutcome:
    """The training stage of one client: the per-client loop, on ``model`` (the worker's)."""
    set_weights(model, local.weights)
    train_loss, steps = get_trainer(local.trainer)(model, local.X, local.y, local.settings, local.generator, local.job)
    return LocalOutcome(get_weights(model), train_loss, steps)


def finish_train(request: TrainRequest, outcome: LocalOutcome) -> Message:
    """The stages after training: Δ (a Byzantine client's corruption), privacy, encode, reply."""
    cfg, config, job = request.cfg, request.config, request.job
    layout = job.task.layout
    trained = outcome.flat if outcome.flat is not None and list(outcome.weights) == list(layout.names) else None
    delta = (layout.flatten(outcome.weights) if trained is None else trained) - _flat_start(layout, request.local)
    if request.byzantine:
        faults = cfg.faults
        delta = corrupt_update(delta, faults.byzantine_attack, faults.byzantine_scale,
                               torch.Generator().manual_seed(derive_seed(cfg.run.seed, job.server_round, "byzantine",
                                                                         job.partition_id)))
    delta = apply_client_privacy(delta, config, _privacy_generator(cfg, config, job), _numels(layout), job.metrics)
    codec, payload = _encode(cfg, config, request.context, delta, job)
    metrics = {S.NUM_EXAMPLES: len(request.local.y), "train_loss": outcome.train_loss, "local_steps": outcome.steps,
               **job.metrics}
    if SECAGG_BITS in config:  # secure aggregation: the payload travels masked, only the example count in the clear
        from stamen.client.secagg import mask_payload

        payload = mask_payload(payload, config, request.context)
        metrics = {S.NUM_EXAMPLES: len(request.local.y)}
    return Message(content=T.train_reply(payload, metrics, codec.name, config), reply_to=request.msg)


_FLAT_START: list = [None, None]  # (weights dict, its flat vector): a pack's clients share one broadcast


def _flat_start(layout, local: LocalJob) -> torch.Tensor:
    """The flat weights a client started from (flattened once per shared downlink dict; not modified)."""
    if _FLAT_START[0] is not local.weights:
        _FLAT_START[:] = [local.weights, layout.flatten(local.weights)]
    return _FLAT_START[1]


_NUMELS: dict = {}


def _numels(layout) -> tuple[int, ...]:
    if layout not in _NUMELS:
        _NUMELS.clear()
        _NUMELS[layout] = layout.numels
    return _NUMELS[layout]


def train_many(cfg: StamenConfig, requests: list[TrainRequest], *, vectorise: bool | None = None
               ) -> list[LocalOutcome | Exception]:
    """The training stage of several clients of one worker: one vectorised computation where the
    trainer and model allow (client/cohort.py), the loop otherwise."""
    if not requests:
        return []
    on = vectorise_enabled(cfg) if vectorise is None else vectorise
    model = requests[0].worker.model
    return train_clients(model, [r.local for r in requests], lambda local: train_local(model, local), vectorise=on)


def _instruction(msg: Message, pid: int) -> dict:
    """The train instruction's config, checked against the schema and this node's partition."""
    record = msg.content.get(S.CONFIG)
    if not isinstance(record, ConfigRecord):
        raise SchemaError("train message has no 'config' record: not a Stamen instruction")
    config = dict(record)
    T.check_instruction(config, partition_id=pid)
    return config


def _downlink(content: RecordDict, config: dict, job: TrainJob) -> dict[str, np.ndarray]:
    load_client_plugins()  # trainer modules also register downlinks and queries
    downlink = config.get(T.DOWNLINK, "dense")
    if downlink not in DOWNLINKS:
        raise ValueError(f"unknown downlink {downlink!r}; known: {sorted(DOWNLINKS)}")
    return DOWNLINKS[downlink](content, job)


def _privacy_generator(cfg: StamenConfig, config: dict, job: TrainJob) -> torch.Generator:
    """The generator of this client's local DP noise: OS entropy (the server never sees the seed),
    or the public run seed when the strategy asked for reproducible (debugging) noise."""
    source = noise_source(bool(config.get(T.DP_REPRODUCIBLE, False)), cfg.run.seed)
    return source.generator(job.server_round, "dp-local", job.partition_id)


def _encode(cfg: StamenConfig, config: dict, context: Context, delta: torch.Tensor, job: TrainJob):
    codec = _codec(cfg, config)
    state = _codec_state(context)
    ctx = CodecContext(cfg.run.seed, int(config.get(T.CODEC_ROUND, job.server_round)), job.task.layout,
                       node=job.partition_id)
    payload = codec.encode(delta, ctx, state)
    payload = apply_payload_privacy(payload, config, _privacy_generator(cfg, config, job), job.metrics)
    _store_codec_state(context, state)
    return codec, payload


def reply_meta(config: dict, pid: int) -> ConfigRecord:
    """``meta`` of a reply to any Stamen message: the instruction's identity entries echoed."""
    return ConfigRecord({**{k: config[k] for k in T.IDENTITY if k in config}, S.SCHEMA: S.SCHEMA_VERSION,
                         S.PARTITION_ID: pid})


def handle_evaluate(cfg: StamenConfig, msg: Message, context: Context) -> Message:
    w = _worker(cfg)
    pid = _partition_id(context)
    config = dict(msg.content.config_records[S.CONFIG]) if S.CONFIG in msg.content.config_records else {}
    _check_identity(config, pid, "evaluate")
    X, y = w.task.data.client(pid)
    set_weights(w.model, S.from_array_record(msg.content.array_records[S.ARRAYS]))
    loss, acc = evaluate(w.model, X, y, cfg.eval.batch_size, w.device)
    metrics = MetricRecord({S.NUM_EXAMPLES: len(y), E.EVAL_LOSS: loss, E.EVAL_ACCURACY: acc})
    return Message(content=RecordDict({S.METRICS: metrics, S.META: reply_meta(config, pid)}), reply_to=msg)


def _check_identity(config: dict, pid: int, kind: str) -> None:
    if config.get(S.SCHEMA) != S.SCHEMA_VERSION or any(k not in config for k in T.IDENTITY):
        raise SchemaError(f"this {kind} message is not in Stamen's schema {S.SCHEMA_VERSION}")
    if config[S.PARTITION_ID] != pid:
        raise SchemaError(f"{kind} message is for partition-id {config[S.PARTITION_ID]}, this node holds {pid}")


def handle_query(cfg: StamenConfig, msg: Message, context: Context) -> Message:
    config = dict(msg.content.config_records[S.CONFIG]) if S.CONFIG in msg.content.config_records else {}
    kind = config.get(Q.QUERY, "")
    pid = _partition_id(context)
    if kind:
        _check_identity(config, pid, f"{kind!r} query")
        load_client_plugins()  # trainers_* modules may register query handlers
        if kind not in QUERIES:
            raise ValueError(f"unknown query {kind!r}; known: {sorted(QUERIES)}")
        content = QUERIES[kind](cfg, msg, context)
        content[S.META] = reply_meta(config, pid)
        return Message(content=content, reply_to=msg)
    if config.get(S.SCHEMA) != S.SCHEMA_VERSION:
        raise SchemaError(f"discovery query of schema {config.get(S.SCHEMA)!r}; this ClientApp speaks "
                          f"{S.SCHEMA_VERSION}: is the ServerApp a Stamen app of the same version?")
    size = _worker(cfg).task.data.size(pid)  # on-demand partitions know their sizes without building the data
    return Message(content=RecordDict({S.META: ConfigRecord({S.PARTITION_ID: pid, S.SCHEMA: S.SCHEMA_VERSION}),
                                       S.METRICS: MetricRecord({S.NUM_EXAMPLES: size})}), reply_to=msg)


_CODECS: dict[str, Codec] = {}


def _codec(cfg: StamenConfig, config: dict) -> Codec:
    """The codec the strategy asked for (``codec`` / ``codec-options`` entries), cached per process."""
    name = str(config.get(T.CODEC, cfg.compression.codec))
    options = json.loads(config[T.CODEC_OPTIONS]) if T.CODEC_OPTIONS in config else cfg.compression.options()
    key = json.dumps([name, options], sort_keys=True)
    if key not in _CODECS:
        _CODECS.clear()
        _CODECS[key] = make_codec(name, **options)
    return _CODECS[key]


_CODEC_STATE = "codec-state"


def _codec_state(context: Context) -> dict:
    rec = context.state.array_records.get(_CODEC_STATE)
    return {} if rec is None else S.from_array_record(rec)


def _store_codec_state(context: Context, state: dict) -> None:
    if state:
        context.state[_CODEC_STATE] = S.to_array_record({k: np.asarray(v) for k, v in state.items()})


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
        register(PACK_ACTION)(pack)

    return app


app = make_client_app()
