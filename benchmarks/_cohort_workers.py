"""One system's run for ``cohort_throughput``, in its own process (report format of ``_sim_workload``).

    python -m stamen.benchmarks._cohort_workers SYSTEM --overrides JSON --report R.jsonl --rounds 20 [--workload W.npz]

- ``stamen`` / ``stamen-loop``: ``stamen.experiment.simulate`` (Ray, carriers), the clients of a
  carrier's pack trained as one vectorised computation / one by one (``STAMEN_VECTORISE=0``, set
  by the harness in this process's environment, which Ray's workers inherit);
- ``inprocess`` / ``inprocess-loop``: the same server loop on the in-process grid
  (``InProcessGrid(cfg, vectorise=True / False)``): every client of a round in one stack / one by one;
- ``bare-ondemand``: the bare PyTorch loop of ``_sim_workers`` (the floor: one process, one
  core) over on-demand partitions (``task.dataset = synthetic_ondemand``), for federations too
  large for a workload file.

``--fast-discovery``: the server learns the partitions' sizes from the in-process grid in one call
(``InProcessGrid.describe_partitions``) instead of one query message per node — the change to the
server loop's ``discover_nodes`` that a million clients need (RESULTS.md, "Vectorised cohort");
emulated here by replacing that function, so that the rounds themselves can be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

T_START = time.time()  # before the heavy imports: start-up includes them

import torch  # noqa: E402

from stamen.benchmarks import _sim_workload as W  # noqa: E402

SYSTEMS = ("stamen", "stamen-loop", "inprocess", "inprocess-loop", "bare-ondemand")


def _sizes(cfg, workload: str | None):
    """Per-partition training sizes (for the report's sample counts) without loading the data twice."""
    if workload:
        _, offsets = W.load_meta(workload)
        return offsets[1:] - offsets[:-1]
    from stamen.tasks.task import load_task

    data = load_task(cfg.task, cfg.federation.clients, cfg.run.seed).data
    sizes = getattr(data.clients, "sizes", None)  # on-demand partitions: without building them
    return sizes if sizes is not None else [data.size(p) for p in range(data.num_clients)]


def run_stamen(cfg, workload: str | None, rounds: int, out_dir: str, rep: W.Report, system: str,
               fast_discovery: bool) -> None:
    sizes = _sizes(cfg, workload)
    seed, fraction, n = cfg.run.seed, cfg.federation.fraction_train, cfg.federation.clients

    def on_round(row: dict) -> None:
        rnd = int(row["round"])
        samples = int(sum(int(sizes[p]) for p in W.cohort(seed, rnd, n, fraction)))
        rep.round_end(rnd, clients=int(row["clients"]), samples=samples, test_accuracy=row.get("test_accuracy"),
                      test_loss=row.get("test_loss"))

    rep.event("ready")
    if system.startswith("stamen"):
        from stamen.experiment import simulate

        simulate(cfg, out_dir, on_round=on_round)
        return
    from stamen.server import loop
    from stamen.server.inprocess_grid import InProcessGrid

    grid = InProcessGrid(cfg, vectorise=system == "inprocess")
    if fast_discovery:
        loop.discover_nodes = lambda g, *args, **kwargs: g.describe_partitions()
    loop.run_federation(grid, cfg, out_dir, on_round=on_round)


def run_bare_ondemand(cfg, rounds: int, rep: W.Report) -> None:
    """``_sim_workers.run_bare`` with the clients made on demand by Stamen's task (same rules)."""
    from stamen.tasks.task import load_task

    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    data = task.data
    init = task.initial_weights()
    model = W.MLP(data.input_shape[0], cfg.task.hidden, data.num_classes)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in init.items()})
    global_w = {k: v.copy() for k, v in init.items()}
    seed, fraction, n, bsz, lr = (cfg.run.seed, cfg.federation.fraction_train, cfg.federation.clients,
                                  cfg.task.batch_size, cfg.task.lr)
    test_X, test_y = data.test
    rep.event("ready")
    for rnd in range(1, rounds + 1):
        pids = W.cohort(seed, rnd, n, fraction)
        sizes = [data.size(p) for p in pids]
        total_n = sum(sizes)
        agg = None
        for pid, size in zip(pids, sizes):
            model.load_state_dict({k: torch.from_numpy(v) for k, v in global_w.items()})
            X, y = data.client(pid)
            W.local_train(model, X, y, W.batch_order(seed, rnd, pid, size), bsz, lr)
            agg = W.fedavg_accumulate(agg, {k: v.detach().numpy() for k, v in model.state_dict().items()},
                                      size / total_n)
        global_w = agg
        model.load_state_dict({k: torch.from_numpy(v) for k, v in global_w.items()})
        loss, acc = W.evaluate(model, test_X, test_y)
        rep.round_end(rnd, clients=len(pids), samples=total_n, test_accuracy=acc, test_loss=loss)


def main(argv=None, t_start: float | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("system", choices=SYSTEMS)
    ap.add_argument("--overrides", required=True, help="JSON list of section.key=value")
    ap.add_argument("--report", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--workload", default="", help="the workload file (its offsets give the sample counts)")
    ap.add_argument("--fast-discovery", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from stamen.config import load

    cfg = load(None, json.loads(args.overrides) + [f"run.rounds={args.rounds}"])
    rep = W.Report(args.report)
    rep.event("start", t_process=t_start or T_START, pid=os.getpid(), system=args.system,
              vectorise_env=os.environ.get("STAMEN_VECTORISE"))
    if args.system == "bare-ondemand":
        run_bare_ondemand(cfg, args.rounds, rep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run_stamen(cfg, args.workload or None, args.rounds, os.path.join(tmp, "run"), rep, args.system,
                       args.fast_discovery)
    rep.event("end")
    rep.close()
    sys.stdout.flush()


if __name__ == "__main__":
    from stamen.benchmarks._cohort_workers import main as _main

    _main(t_start=T_START)
