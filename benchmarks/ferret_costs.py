"""What one round costs under Ferret, FedKSeed and dense FedAvg: time, memory and bytes, phase by phase.

    python -m stamen.benchmarks.ferret_costs --out ferret_costs.json

Two tasks: the stdlib language model (the byte-level GPT of ``tasks/lm.py``, 1,110,720
parameters, pretrained start, context 64, batch 12, 8 KB per client: one epoch = 11 Adam steps)
and ``digits`` (MLP with 128 hidden units, 9,610 parameters, one epoch of SGD). For each method
the real strategy and client code run one round for ``--clients`` clients (of 8, half sampled),
then a second round in which the clients of round 1 catch up on round 1 from coefficients:

- ``local training``: the trainer the strategy asks for (``train_sgd`` / ``steps`` / FedKSeed's
  zeroth-order ``fedkseed``), per client;
- ``projection``: encoding the update Δ (Ferret: the projections onto K_l bases per block; FedKSeed:
  packing the accumulated scalars; FedAvg: copying Δ), per client;
- ``server round``: ``aggregate_train`` — validation, aggregation in coefficient space and one
  reconstruction (FedAvg: decoding and averaging dense updates);
- ``reconstruction``: the client-side downlink of round 2 (Ferret/FedKSeed: rebuilding the global
  weights from round 1's aggregated coefficients and checking them; FedAvg: reading the dense
  weights), per client;
- bytes: uplink = the serialized reply per client; downlink = the serialized train message per
  client, dense (first participation, and FedAvg always) and as a one-round catch-up.

Times are CPU seconds of the measuring thread (``time.thread_time``; torch runs with one thread
in it), which is what the work costs whatever else runs on the machine; wall seconds are in the
JSON. Memory: ``tracemalloc`` does not see torch's tensor allocations, so memory is the peak
resident set size during the phase minus the RSS when it started, sampled every 2 ms from
``/proc/self/statm`` by a helper thread (Linux) — a lower bound on what the phase needed
(memory the allocator kept from earlier phases is reused without growing RSS), in MB, largest
over the clients.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, RecordDict

import stamen.client.trainers_ferret  # noqa: F401  (registers DOWNLINKS["ferret"], the trainers)
from stamen import schema as P
from stamen.schema import train as T
from stamen.client.app import DOWNLINKS
from stamen.client.trainers import TrainJob, TrainSettings, get_trainer
from stamen.config import load
from stamen.server.inprocess_grid import _ensure_task_identity
from stamen.core import derive_seed
from stamen.sketching.codec import CodecContext, make_codec
from stamen.strategies.preflight import build_pipeline
from stamen.tasks.task import get_weights, load_task, set_weights

TASKS = {
    "lm": ["task.dataset=stdlib", "task.model=gpt", "task.context=64", "task.max_bytes_per_client=8192",
           "task.max_test_bytes=8192", "task.local_epochs=1", "task.batch_size=12", "task.optimizer=adam",
           "task.lr=0.001"],
    "digits": ["task.dataset=digits", "task.model=mlp", "task.hidden=128", "task.local_epochs=1",
               "task.batch_size=16", "task.lr=0.05"],
}


def method_overrides(args) -> dict[str, list[str]]:
    return {
        "fedavg": ["strategy.name=fedavg"],
        "ferret": ["strategy.name=ferret", f"strategy.K={args.K}", f"strategy.server_lr={args.server_lr}",
                   "strategy.pool_scope=round"],
        "fedkseed": ["strategy.name=fedkseed", f"strategy.K={args.zo_K}", f"strategy.local_steps={args.zo_steps}"],
    }


# -- measuring -------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: no sampling (memory reported as 0)
        return 0


@contextmanager
def phase(record: dict, name: str):
    """Time (thread CPU, wall) and peak RSS growth of the block, appended to record[name]."""
    start_rss, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    c0, t0 = time.thread_time(), time.perf_counter()
    try:
        yield
    finally:
        cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _rss())
        record.setdefault(name, []).append({"cpu_s": cpu, "wall_s": wall,
                                            "peak_mb": max(0, peak[0] - start_rss) / 2**20})


def _summarize(record: dict) -> dict:
    out = {}
    for name, runs in record.items():
        out[name] = {"cpu_s": statistics.mean(r["cpu_s"] for r in runs),
                     "wall_s": statistics.mean(r["wall_s"] for r in runs),
                     "peak_mb": max(r["peak_mb"] for r in runs), "n": len(runs)}
    return out


# -- one method on one task --------------------------------------------------------------------------
def measure(task_name: str, method: str, overrides: list[str], clients: int, seed: int) -> dict:
    cfg = load(overrides=TASKS[task_name] + overrides + ["federation.clients=8", "federation.fraction_train=0.5",
                                                         f"run.seed={seed}"])
    task = load_task(cfg.task, 8, seed)
    layout = task.layout
    strategy = build_pipeline(cfg)
    nodes = {pid: 100 + pid for pid in range(8)}
    strategy.bind(seed=seed, nodes=nodes, layout=layout, fraction_train=0.5, fraction_evaluate=0.0,
                  rounds=2, timeout=600.0)
    model = task.new_model()
    states = {n: RecordDict() for n in nodes.values()}
    pid_of = {n: p for p, n in nodes.items()}
    rec: dict = {}
    down_dense, down_catchup, uplink = [], [], []

    arrays = P.to_array_record(task.initial_weights())
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), None))[:clients]
    replies = []
    for msg in msgs:
        node, config = msg.metadata.dst_node_id, dict(msg.content.config_records[P.CONFIG])
        pid = pid_of[node]
        down_dense.append(P.content_bytes(msg.content))
        job = TrainJob(options=config, state=states[node], task=task, partition_id=pid, server_round=1, seed=seed)
        global_weights = DOWNLINKS[config.get("downlink", "dense")](msg.content, job)
        set_weights(model, global_weights)
        X, y = task.data.client(pid)
        settings = TrainSettings.from_task(cfg.task, "cpu")
        gen = torch.Generator().manual_seed(derive_seed(seed, 1, "batches", pid))
        with phase(rec, "local training"):
            loss, steps = get_trainer(str(config.get("trainer", "sgd")))(model, X, y, settings, gen, job)
        delta = layout.flatten(get_weights(model)) - layout.flatten(global_weights)
        codec = make_codec(config.get(T.CODEC, "dense"), **json.loads(config.get(T.CODEC_OPTIONS, "{}")))
        record = job.state.array_records.get("codec-state")
        codec_state = {} if record is None else P.from_array_record(record)
        with phase(rec, "projection"):
            payload = codec.encode(delta, CodecContext(seed, 1, layout, node=pid), codec_state)
        reply = Message(content=T.train_reply(payload, {P.NUM_EXAMPLES: len(y), "train_loss": loss,
                                                        "local_steps": steps}, codec.name, config), reply_to=msg)
        uplink.append(P.content_bytes(reply.content))
        replies.append(reply)

    with phase(rec, "server round"):
        new_arrays, _ = strategy.aggregate_train(1, replies)
    assert new_arrays is not None and not strategy.last_rejected, strategy.last_rejected

    # round 2: every node; the clients of round 1 catch up on it (Ferret, FedKSeed), the others get dense weights
    strategy.run.fraction_train = 1.0
    for msg in strategy.configure_train(2, new_arrays, ConfigRecord(), None):
        node, config = msg.metadata.dst_node_id, dict(msg.content.config_records[P.CONFIG])
        if node not in {m.metadata.dst_node_id for m in msgs}:
            continue
        size = P.content_bytes(msg.content)
        (down_catchup if config.get("ferret-sync") == "catch-up" else down_dense).append(size)
        job = TrainJob(options=config, state=states[node], task=task, partition_id=pid_of[node], server_round=2,
                       seed=seed)
        with phase(rec, "reconstruction"):
            weights = DOWNLINKS[config.get("downlink", "dense")](msg.content, job)
        assert torch.equal(layout.flatten(weights), layout.flatten(P.from_array_record(new_arrays)))
    return {"parameters": layout.d, "clients": clients, "phases": _summarize(rec),
            "uplink_bytes_per_client": statistics.mean(uplink),
            "downlink_dense_bytes_per_client": statistics.mean(down_dense),
            "downlink_catchup_bytes_per_client": statistics.mean(down_catchup) if down_catchup else None}


def warm_up() -> None:
    """Pay one-time costs (the optimizers' lazy imports, first kernels) before anything is timed."""
    w = torch.nn.Linear(4, 2)
    for make in (torch.optim.SGD, torch.optim.Adam):
        opt = make(w.parameters(), lr=0.1)
        torch.nn.functional.cross_entropy(w(torch.zeros(3, 4)), torch.zeros(3, dtype=torch.long)).backward()
        opt.step()


def table(results: dict) -> str:
    names = ("local training", "projection", "server round", "reconstruction")
    head = (f"{'task':7s} {'method':9s} " + " ".join(f"{n:>22s}" for n in names) +
            f" {'uplink/client':>14s} {'down dense':>11s} {'down 1-rd':>10s}")
    lines = [head, f"{'':17s}" + " ".join(f"{'CPU s  (peak MB)':>22s}" for _ in names)]
    for task_name, per in results.items():
        for method, r in per.items():
            cells = []
            for n in names:
                p = r["phases"].get(n)
                cells.append(f"{p['cpu_s']:10.3f} ({p['peak_mb']:7.1f})" if p else f"{'—':>22s}")
            catchup = r["downlink_catchup_bytes_per_client"]
            lines.append(f"{task_name:7s} {method:9s} " + " ".join(f"{c:>22s}" for c in cells) +
                         f" {r['uplink_bytes_per_client']:14,.0f} {r['downlink_dense_bytes_per_client']:11,.0f} "
                         f"{(f'{catchup:,.0f}' if catchup else '—'):>10s}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=["fedavg", "ferret", "fedkseed"],
                    choices=["fedavg", "ferret", "fedkseed"])
    ap.add_argument("--clients", type=int, default=4, help="clients per round (of 8)")
    ap.add_argument("--K", type=int, default=256, help="Ferret: seed pool size")
    ap.add_argument("--server-lr", type=float, default=0.1)
    ap.add_argument("--zo-K", type=int, default=4096, help="FedKSeed: seed pool size")
    ap.add_argument("--zo-steps", type=int, default=20, help="FedKSeed: zeroth-order steps per client")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _ensure_task_identity()
    warm_up()
    results: dict = {}
    for task_name in args.tasks:
        for method in args.methods:
            results.setdefault(task_name, {})[method] = measure(task_name, method, method_overrides(args)[method],
                                                                args.clients, args.seed)
            print(f"{task_name}/{method} done", flush=True)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=1))


if __name__ == "__main__":
    main()
