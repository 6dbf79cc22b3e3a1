"""The server's round loop: the round pipeline each round, then evaluate, record, checkpoint.

Flower's ``Strategy.start`` runs rounds too, but it has no hook for checkpoints, byte
accounting or resuming; this loop calls the same four methods of the round pipeline
(``strategies/pipeline.py``: ``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``) in the same order and adds those. Before the first round it learns
which node holds which partition, and how many examples each partition has: the bound the
acceptance stage holds every later ``num-examples`` claim to.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from stamen import schema as P
from stamen.config import StamenConfig
from stamen.server.results import CheckpointError, RunDirectory, atomic_write, write_plots
from stamen.strategies.preflight import build_pipeline
from stamen.server.faults import with_transport_faults
from stamen.server.evaluation import central_evaluation, evaluation_summary
from stamen.tasks.task import Task, load_task, set_weights

log = logging.getLogger("stamen.server")

#: set by :func:`request_stop` (the CLI's Ctrl-C handler): the loop stops before its next round, the
#: last complete round's checkpoint intact. A process-wide flag, as the signal it answers is.
_STOP = threading.Event()


def request_stop() -> None:
    """Ask every running federation loop of this process to stop before its next round."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


#: config keys that may differ between a run and its resumption
RESUMABLE_CHANGES = {("run", "rounds"), ("run", "name"), ("run", "out_dir")}


def resume_fingerprint(cfg: StamenConfig) -> str:
    import hashlib

    d = cfg.to_dict()
    for section, key in RESUMABLE_CHANGES:
        d[section].pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


#: the longest the server waits for the run's nodes to join and answer discovery, whatever the round timeout
JOIN_TIMEOUT_S = 300.0


def discover_nodes(grid, expected: int, timeout: float, *, join_timeout: float = JOIN_TIMEOUT_S,
                   warn_every: float = 30.0) -> tuple[dict[int, int], dict[int, int]]:
    """Wait for ``expected`` nodes, ask each its partition-id and size; return
    ({partition-id: node-id}, {partition-id: number of examples it reported}).

    The wait is bounded by ``min(timeout, join_timeout)`` (5 minutes by default, whatever the
    round timeout): fewer nodes than the run expects is a configuration error, reported with
    what to fix — a warning after 10 s and every ``warn_every`` seconds while waiting (in a
    deployment they show in ``flwr log``), then a TimeoutError.
    A grid that hosts clients on a few SuperNodes says how many of those have joined
    (``join_status()``, server/app.py); the in-process grid, which holds every partition in the
    server's own process, answers in one call (``describe_partitions()``).
    """
    describe = getattr(grid, "describe_partitions", None)
    if callable(describe):  # the in-process grid hosts every partition itself: one call, not N queries
        return describe()
    wait = min(timeout, join_timeout)
    start = time.monotonic()
    next_warning = start + min(10.0, warn_every)  # the first one early: a missing node is likely a mistake

    def shortfall(connected: int) -> str:
        status = getattr(grid, "join_status", None)
        if callable(status):
            return status()
        return (f"{connected} of federation.clients={expected} nodes connected (one SuperNode per client): start "
                f"the missing SuperNodes (node config partition-id=0..{expected - 1}), or set "
                f"federation.clients={connected}")

    while len(ids := list(grid.get_node_ids())) < expected:
        now = time.monotonic()
        if now - start > wait:
            raise TimeoutError(f"the run did not start: after {wait:.0f} s, {shortfall(len(ids))}")
        if now >= next_warning:
            log.warning("waiting for nodes (%.0f of at most %.0f s): %s", now - start, wait, shortfall(len(ids)))
            next_warning = now + warn_every
        time.sleep(0.2)
    msgs = [Message(content=RecordDict({P.CONFIG: ConfigRecord({P.SCHEMA: P.SCHEMA_VERSION})}),
                    message_type=MessageType.QUERY, dst_node_id=nid) for nid in ids]
    nodes: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=max(1.0, wait - (time.monotonic() - start))):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} did not answer Stamen's discovery query ({reply.error.reason}): is it "
                               f"a Stamen ClientApp? (ARCHITECTURE.md, 'Message schema')")
        try:
            meta = reply.content.config_records[P.META]
            if meta.get(P.SCHEMA) != P.SCHEMA_VERSION:
                raise ValueError(f"schema version {meta.get(P.SCHEMA)!r}, this server speaks {P.SCHEMA_VERSION}")
            pid = meta[P.PARTITION_ID]
            size = reply.content.metric_records[P.METRICS][P.NUM_EXAMPLES]
            if not isinstance(pid, int) or isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
                raise ValueError(f"partition-id {pid!r}, {P.NUM_EXAMPLES} {size!r}")
        except (KeyError, ValueError) as err:
            raise RuntimeError(f"node {node} answered the discovery query outside Stamen's schema ({err}): is it a "
                               f"Stamen ClientApp of the same version?") from None
        if pid in nodes:
            raise RuntimeError(f"two nodes ({nodes[pid]}, {node}) claim partition-id {pid}")
        nodes[pid], sizes[pid] = node, int(size)
    missing = sorted(set(range(expected)) - set(nodes))
    if missing:
        raise RuntimeError(f"no node reported partition-ids {missing[:10]} (federation.clients={expected}): "
                           + (f"{len(ids) - len(nodes)} node(s) did not answer the discovery query within the wait"
                              if len(nodes) < len(ids) else "start each SuperNode with its own partition-id"))
    return nodes, sizes


def example_bounds(sizes: dict[int, int], cap: int) -> dict[int, float]:
    """The largest ``num-examples`` each partition may claim: its reported size, capped by
    ``federation.max_examples_per_client`` (0: no cap)."""
    return {pid: float(min(n, cap) if cap > 0 else n) for pid, n in sizes.items()}


def count_bytes(messages: list[Message]) -> int:
    """Serialized size of the messages' contents. A RecordDict's size is the sum of its records'
    (protobuf concatenation), so a record shared by many messages (a broadcast's weights) is
    serialized once. (Caching by ``id`` is safe only while the records are alive: within this call.)
    """
    sizes: dict[tuple[str, int], int] = {}
    total = 0
    for m in messages:
        if m.has_error():
            continue
        for name, record in m.content.items():
            key = (name, id(record))
            if key not in sizes:
                sizes[key] = P.content_bytes(RecordDict({name: record}))
            total += sizes[key]
    return total


def versions() -> dict[str, str]:
    import flwr
    import torch

    from importlib.metadata import version

    return {"stamen": version("stamen"), "flwr": flwr.__version__ if hasattr(flwr, "__version__") else version("flwr"),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


def run_federation(grid, cfg: StamenConfig, out_dir: str | Path, *, resume: bool = False,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid``; write the run directory; return the summary."""
    run = RunDirectory(out_dir)
    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    pipeline = build_pipeline(cfg)
    model = task.new_model()

    start, rows, arrays = 1, [], task.initial_weights()
    if resume:
        start, rows, arrays, strategy_state = _load_resume_state(run, cfg, task)
    else:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_metrics([])
        strategy_state = None
    atomic_write(run.config_path, cfg.to_toml())  # on resume too: run.rounds may have been extended

    timeout = cfg.federation.round_timeout_s
    nodes, sizes = discover_nodes(grid, cfg.federation.clients, timeout)
    grid = with_transport_faults(grid, cfg)
    round_timeout = cfg.faults.round_deadline_s or timeout
    pipeline.bind(seed=cfg.run.seed, nodes=nodes, layout=task.layout, fraction_train=cfg.federation.fraction_train,
                  fraction_evaluate=cfg.federation.fraction_evaluate, rounds=cfg.run.rounds, timeout=timeout,
                  bounds=example_bounds(sizes, cfg.federation.max_examples_per_client),
                  min_replies=cfg.faults.min_replies)
    if strategy_state is not None:
        pipeline.load_state_dict(strategy_state)

    current = P.to_array_record(arrays)
    stopped = None
    for rnd in range(start, cfg.run.rounds + 1):
        if _STOP.is_set():
            stopped = f"interrupted before round {rnd}: rounds 1..{rnd - 1} are complete and checkpointed"
            log.warning("stopping: %s", stopped)
            break
        stopped = pipeline.stop_reason(rnd)
        if stopped:
            log.warning("stopping before round %d: %s", rnd, stopped)
            break
        t0 = time.perf_counter()
        messages = list(pipeline.configure_train(rnd, current, ConfigRecord(), grid))
        down = count_bytes(messages)
        replies = list(grid.send_and_receive(messages, timeout=round_timeout))
        up = count_bytes(replies)
        new, train_metrics = pipeline.aggregate_train(rnd, replies)
        if new is not None:
            current = new
        row: dict[str, Any] = {
            "round": rnd,
            "clients": len(pipeline.last_participants),
            "rejected": len(pipeline.last_rejected),
            "missing": max(0, len(messages) - len(replies)),
            "failed": new is None,
            "uplink_bytes": up,
            "downlink_bytes": down,
            "train_loss": _metric(train_metrics, "train_loss"),
        }
        row.update(pipeline.round_metrics(rnd))
        row.update(_federated_evaluation(pipeline, rnd, current, grid, timeout))
        if rnd % cfg.eval.every == 0 or rnd == cfg.run.rounds:
            set_weights(model, P.from_array_record(current))
            row.update(central_evaluation(model, task, cfg, rnd, pipeline.method))
        else:
            row.update(test_loss=None, test_accuracy=None)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        run.write_metrics(rows)
        run.save_checkpoint({"round": rnd, "arrays": P.from_array_record(current),
                             "strategy": pipeline.state_dict(), "fingerprint": resume_fingerprint(cfg)})
        if on_round:
            on_round(row)

    run.write_model(P.from_array_record(current), {"format": "stamen-model/1", "round": len(rows),
                                                    "dataset": cfg.task.dataset, "model": cfg.task.model,
                                                    "config": cfg.to_json()})
    summary = _summary(cfg, rows, task)
    summary.update(evaluation_summary(cfg, task, pipeline.method, rows))
    summary.update(pipeline.summary_metrics())
    if stopped:
        summary["stopped"] = stopped
    run.write_summary(summary)
    if not _STOP.is_set():  # an interrupted run's plots come with its resumption (they take seconds)
        write_plots(run)
    return summary


def _load_resume_state(run: RunDirectory, cfg: StamenConfig, task: Task):
    ck = run.load_checkpoint(layout=task.layout)
    if ck.get("fingerprint") != resume_fingerprint(cfg):
        raise CheckpointError(f"checkpoint {run.checkpoint_path} was written by a different config "
                              f"(only {sorted('.'.join(k) for k in RESUMABLE_CHANGES)} may change on resume)")
    done = int(ck["round"])
    rows = [r for r in run.read_metrics() if r["round"] <= done]
    if [r["round"] for r in rows] != list(range(1, done + 1)):
        raise CheckpointError(f"{run.metrics_path} lacks rounds up to the checkpoint's round {done}")
    return done + 1, rows, ck["arrays"], ck["strategy"]


def _federated_evaluation(strategy, rnd, current, grid, timeout) -> dict[str, Any]:
    messages = list(strategy.configure_evaluate(rnd, current, ConfigRecord(), grid))
    if not messages:
        return {}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    metrics = strategy.aggregate_evaluate(rnd, replies)
    return {"eval_downlink_bytes": count_bytes(messages), "eval_uplink_bytes": count_bytes(replies),
            "federated_eval_loss": _metric(metrics, "eval_loss"),
            "federated_eval_accuracy": _metric(metrics, "eval_accuracy")}


def _metric(record, key: str):
    if record is None or key not in record:
        return None
    v = float(record[key])
    return v if math.isfinite(v) else None


def _summary(cfg: StamenConfig, rows: list[dict[str, Any]], task: Task) -> dict[str, Any]:
    evaluated = [r for r in rows if r.get("test_accuracy") is not None]
    final = evaluated[-1] if evaluated else {}
    return {
        "name": cfg.run.name,
        "seed": cfg.run.seed,
        "rounds": len(rows),
        "strategy": cfg.strategy.name,
        "codec": cfg.compression.codec,
        "dataset": task.data.name,
        "model": cfg.task.model,
        "parameters": task.layout.d,
        "final_test_accuracy": final.get("test_accuracy"),
        "final_test_loss": final.get("test_loss"),
        "best_test_accuracy": max((r["test_accuracy"] for r in evaluated), default=None),
        "total_uplink_bytes": sum(r["uplink_bytes"] for r in rows),
        "total_downlink_bytes": sum(r["downlink_bytes"] for r in rows),
        "total_rejected": sum(r["rejected"] for r in rows),
        "failed_rounds": sum(1 for r in rows if r.get("failed")),
        "wall_s": sum(r["wall_s"] for r in rows),
        "versions": versions(),
    }
