"""One system's run of the ``sim_throughput`` workload, in its own process.

    python -m stamen.benchmarks._sim_workers {bare|flower|stamen} --workload W.npz --report R.jsonl --rounds 20

``sim_throughput`` starts this (and ``_pfl_worker.py`` for pfl) in a fresh process per run
and reads the report: one JSON line when the worker is ready to train, one per finished round
(wall-clock time, clients, samples, test accuracy), one at the end.

- ``bare``: the floor — a plain PyTorch loop in this process: sample the round's clients,
  train each in turn from the global weights, average (weighted by samples), evaluate.
- ``flower``: vanilla Flower 1.39, written as Flower's docs show a newcomer: a Message-API
  ``ClientApp`` (``@app.train()``) and ``ServerApp`` (``@app.main()``) running
  ``flwr.serverapp.strategy.FedAvg.start`` under ``flwr.simulation.run_simulation`` on Ray with
  ``num_cpus=1`` per client (2 actors on 2 cores). FedAvg samples clients itself (``random``,
  seeded here), so its cohorts differ from the other systems'; each client trains with the
  same local loop and batch order rule. Round end = ``evaluate_fn`` (central evaluation,
  called by ``start`` after every round).
- ``stamen``: ``stamen.experiment.simulate`` with the config the harness built
  (``--overrides``); round end = its ``on_round`` callback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

T_START = time.time()  # before the heavy imports: start-up includes them

import torch  # noqa: E402

from stamen.benchmarks import _sim_workload as W  # noqa: E402


def run_bare(wl: W.Workload, rounds: int, rep: W.Report) -> None:
    m = wl.meta
    model = wl.new_model()
    global_w = {k: v.copy() for k, v in wl.init.items()}
    rep.event("ready")
    for rnd in range(1, rounds + 1):
        pids = W.cohort(m["seed"], rnd, wl.num_clients, m["fraction"])
        sizes = [wl.size(p) for p in pids]
        total_n = sum(sizes)
        agg = None
        for pid, n in zip(pids, sizes):
            model.load_state_dict({k: torch.from_numpy(v) for k, v in global_w.items()})
            X, y = wl.client(pid)
            W.local_train(model, X, y, W.batch_order(m["seed"], rnd, pid, n), m["batch_size"], m["lr"])
            agg = W.fedavg_accumulate(agg, {k: v.detach().numpy() for k, v in model.state_dict().items()},
                                      n / total_n)
        global_w = agg
        model.load_state_dict({k: torch.from_numpy(v) for k, v in global_w.items()})
        loss, acc = W.evaluate(model, wl.test_X, wl.test_y)
        rep.round_end(rnd, clients=len(pids), samples=total_n, test_accuracy=acc, test_loss=loss)


# --------------------------------------------------------------------------- flower ----
_CLIENT_CACHE: dict[str, object] = {}


def _client_state(path: str):
    """The workload and a model, loaded once per Ray actor process."""
    if path not in _CLIENT_CACHE:
        torch.set_num_threads(1)
        wl = W.load_workload(path)
        _CLIENT_CACHE.clear()
        _CLIENT_CACHE[path] = (wl, wl.new_model())
    return _CLIENT_CACHE[path]


def make_flower_apps(workload_path: str, wl: W.Workload, rounds: int, rep: W.Report):
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    m = wl.meta
    seed, batch_size, lr = m["seed"], m["batch_size"], m["lr"]
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        data, model = _client_state(workload_path)
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        X, y = data.client(pid)
        loss = W.local_train(model, X, y, W.batch_order(seed, server_round, pid, len(y)), batch_size, lr)
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)})})
        return Message(content=content, reply_to=msg)

    class CountingFedAvg(FedAvg):
        """FedAvg that remembers how many clients and samples its last round aggregated."""

        last_clients, last_samples = 0, 0

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            ok = [r for r in replies if not r.has_error()]
            self.last_clients = len(ok)
            self.last_samples = int(sum(r.content["metrics"]["num-examples"] for r in ok))
            return super().aggregate_train(server_round, replies)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(seed)  # FedAvg samples nodes with the global `random` module
        torch.set_num_threads(1)
        model = wl.new_model()
        n = wl.num_clients
        strategy = CountingFedAvg(fraction_train=m["fraction"], fraction_evaluate=0.0, min_available_nodes=n,
                                  min_train_nodes=W.cohort_size(m["fraction"], n))

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = W.evaluate(model, wl.test_X, wl.test_y)
            if server_round >= 1:
                rep.round_end(server_round, clients=strategy.last_clients, samples=strategy.last_samples,
                              test_accuracy=acc, test_loss=loss)
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                       evaluate_fn=evaluate_fn)

    return server_app, client_app


def run_flower(workload_path: str, wl: W.Workload, rounds: int, rep: W.Report) -> None:
    from flwr.simulation import run_simulation

    server_app, client_app = make_flower_apps(workload_path, wl, rounds, rep)
    rep.event("ready")
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=wl.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


# --------------------------------------------------------------------------- stamen ----
def run_stamen(workload_path: str, overrides: list[str], rounds: int, out_dir: str, rep: W.Report) -> None:
    from stamen.config import load
    from stamen.experiment import simulate

    meta, offsets = W.load_meta(workload_path)
    cfg = load(None, overrides + [f"run.rounds={rounds}"])
    sizes = offsets[1:] - offsets[:-1]

    def on_round(row: dict) -> None:
        rnd = int(row["round"])
        samples = int(sum(sizes[p] for p in W.cohort(meta["seed"], rnd, len(sizes), meta["fraction"])))
        rep.round_end(rnd, clients=int(row["clients"]), samples=samples, test_accuracy=row.get("test_accuracy"),
                      test_loss=row.get("test_loss"))

    rep.event("ready")
    simulate(cfg, out_dir, on_round=on_round)


def main(argv=None, t_start: float | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("system", choices=["bare", "flower", "stamen"])
    ap.add_argument("--workload", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--overrides", default="[]", help="stamen: JSON list of section.key=value")
    ap.add_argument("--out", default="", help="stamen: run directory (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rep = W.Report(args.report)
    rep.event("start", t_process=t_start or T_START, pid=os.getpid(), system=args.system)
    if args.system == "stamen":
        with tempfile.TemporaryDirectory() as tmp:
            run_stamen(args.workload, json.loads(args.overrides), args.rounds, args.out or os.path.join(tmp, "run"),
                       rep)
    else:
        wl = W.load_workload(args.workload)
        if args.system == "bare":
            run_bare(wl, args.rounds, rep)
        else:
            run_flower(args.workload, wl, args.rounds, rep)
    rep.event("end")
    rep.close()
    sys.stdout.flush()


if __name__ == "__main__":
    # run the functions from the importable module, not from __main__, so that Ray pickles the
    # ClientApp's handler by reference to them
    from stamen.benchmarks._sim_workers import main as _main

    _main(t_start=T_START)
