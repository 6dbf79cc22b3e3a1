"""GPU path: a CNN workload with fractional-GPU Ray actors, against a bare CUDA loop.

    python -m stamen.benchmarks.gpu_throughput --clients 50 --rounds 10 --out gpu.json

Runs wherever a CUDA device is visible and exits cleanly (status "skipped", with the reason,
in the JSON) elsewhere. Workload: the embedded ``digits`` task (8×8 images, Dirichlet 0.5),
``task.model = cnn``, ``--clients`` clients, ``--fraction`` of them per round, ``--epochs`` local
epochs of SGD (batch 16, lr 0.05), central evaluation every round. Each system runs in a fresh
process (``--worker``), one after the other:

- ``bare_cuda``: a plain PyTorch loop in one process on the GPU: the same clients per round
  (Stamen's seeded sampling), the same data, initial weights and batch order, FedAvg by examples;
- ``stamen_gpu_0.25``: ``stamen.experiment.simulate`` with ``federation.client_gpus = 0.25`` (four
  actors share the GPU), virtual clients on four carrier SuperNodes;
- ``stamen_gpu_1``: one whole GPU per actor (one actor);
- ``stamen_gpu_0.25_one_node_per_client``: as ``stamen_gpu_0.25`` with
  ``federation.virtual_clients = false`` (one SuperNode per client: Flower's classic layout);
- ``stamen_cpu``: the same simulation on CPU actors (``run.device = cpu``, one core each).

Reported per system: start-up (process start to the end of round 1), median round time over
rounds 2..R and its ratio to ``bare_cuda``, client updates per second, final test accuracy and the
peak GPU memory in use on the device (``nvidia-smi``, sampled every 0.2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SYSTEMS = {
    "bare_cuda": None,
    "stamen_gpu_0.25": ["federation.client_gpus=0.25", "run.device=cuda"],
    "stamen_gpu_1": ["federation.client_gpus=1.0", "run.device=cuda"],
    "stamen_gpu_0.25_one_node_per_client": ["federation.client_gpus=0.25", "run.device=cuda",
                                             "federation.virtual_clients=false"],
    "stamen_cpu": ["federation.client_gpus=0", "run.device=cpu"],
}


def workload(args) -> list[str]:
    return ["task.dataset=digits", "task.model=cnn", f"federation.clients={args.clients}",
            f"federation.fraction_train={args.fraction}", f"task.local_epochs={args.epochs}", "task.batch_size=16",
            "task.lr=0.05", f"run.rounds={args.rounds}", f"run.seed={args.seed}", "federation.client_cpus=1"]


# -- workers (one fresh process per system) -------------------------------------------------

def bare_loop(overrides: list[str], device: str = "cuda") -> list[dict]:
    """FedAvg over the sampled clients, one process, on ``device``; the same data, sampling and batches."""
    import numpy as np
    import torch

    from stamen.client.trainers import TrainSettings, train_sgd
    from stamen.config import load
    from stamen.core import derive_seed
    from stamen.strategies.sampling import sample_count
    from stamen.tasks.task import evaluate, get_weights, load_task, set_weights

    cfg = load(overrides=overrides)
    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    model = task.new_model().to(device)
    settings = TrainSettings.from_task(cfg.task, device, proximal_mu=0.0)
    global_w = task.initial_weights()
    rows = []
    for rnd in range(1, cfg.run.rounds + 1):
        t0 = time.perf_counter()
        n_clients = cfg.federation.clients
        rng = np.random.default_rng(derive_seed(cfg.run.seed, rnd, "sample", "train"))
        pids = sorted(int(p) for p in rng.choice(n_clients, size=sample_count(cfg.federation.fraction_train,
                                                                             n_clients), replace=False))
        acc_w, total = None, 0
        for pid in pids:
            X, y = task.data.client(pid)
            set_weights(model, global_w)
            gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, rnd, "batches", pid))
            train_sgd(model, X, y, settings, gen)
            w = get_weights(model)
            acc_w = {k: v * len(y) for k, v in w.items()} if acc_w is None else {
                k: acc_w[k] + v * len(y) for k, v in w.items()}
            total += len(y)
        global_w = {k: (v / total).astype(np.float32) for k, v in acc_w.items()}
        set_weights(model, global_w)
        _, acc = evaluate(model, *task.data.test, cfg.eval.batch_size, device)
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append({"round": rnd, "wall_s": time.perf_counter() - t0, "t": time.time(), "clients": len(pids),
                     "test_accuracy": acc})
    return rows


def stamen_sim(overrides: list[str]) -> list[dict]:
    import logging

    from stamen.config import load
    from stamen.experiment import simulate

    logging.getLogger("flwr").setLevel(logging.ERROR)
    rows: list[dict] = []
    out = tempfile.mkdtemp(prefix="stamen-gpu-")
    try:
        simulate(load(overrides=overrides), out, on_round=lambda r: rows.append(
            {"round": r["round"], "wall_s": r["wall_s"], "t": time.time(), "clients": r["clients"],
             "test_accuracy": r["test_accuracy"]}))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return rows


def worker(system: str, overrides: list[str], start: float, report: Path) -> None:
    rows = bare_loop(overrides) if SYSTEMS[system] is None else stamen_sim(overrides + SYSTEMS[system])
    report.write_text(json.dumps({"start": start, "rows": rows}))


# -- driver ---------------------------------------------------------------------------------

class GpuMemory(threading.Thread):
    """Peak memory in use on GPU 0 (MiB), from nvidia-smi."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.peak = max(self.peak, int(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self.stop.wait(0.2)


def summarize(system: str, report: dict, gpu_peak: int) -> dict:
    rows = report["rows"]
    later = rows[1:] or rows
    median = statistics.median(r["wall_s"] for r in later)
    return {"system": system, "status": "ok", "startup_s": rows[0]["t"] - report["start"],
            "median_round_s": median, "client_updates_per_s": statistics.mean(r["clients"] for r in later) / median,
            "final_test_accuracy": rows[-1]["test_accuracy"], "peak_gpu_mib": gpu_peak, "rounds": len(rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per system before it is stopped")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, workload(args), args.start, args.report)
        return 0

    import torch

    result: dict = {"command": " ".join([sys.executable, "-m", "stamen.benchmarks.gpu_throughput", *(argv or sys.argv[1:])]),
                    "workload": workload(args), "systems": []}
    if not torch.cuda.is_available():
        result.update(status="skipped", reason="no CUDA device is visible (torch.cuda.is_available() is False)")
        print(f"gpu_throughput: skipped: {result['reason']}")
    else:
        result.update(status="ok", device=torch.cuda.get_device_name(0), cpus=os.cpu_count(),
                      torch=torch.__version__)
        for system in args.systems.split(","):
            if system not in SYSTEMS:
                raise SystemExit(f"unknown system {system!r}; choose from {list(SYSTEMS)}")
            with tempfile.TemporaryDirectory() as tmp:
                report = Path(tmp) / "report.json"
                mem = GpuMemory()
                mem.start()
                start = time.time()
                cmd = [sys.executable, "-m", "stamen.benchmarks.gpu_throughput", "--worker", system, "--report",
                       str(report), "--start", str(start), "--clients", str(args.clients), "--fraction",
                       str(args.fraction), "--epochs", str(args.epochs), "--rounds", str(args.rounds),
                       "--seed", str(args.seed)]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                try:
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                    ok = proc.returncode == 0 and report.exists()
                    entry = (summarize(system, json.loads(report.read_text()), mem.peak) if ok else
                             {"system": system, "status": "failed", "reason": proc.stderr[-2000:]})
                except subprocess.TimeoutExpired:
                    entry = {"system": system, "status": "failed", "reason": f"timeout after {args.timeout:.0f} s"}
                mem.stop.set()
                result["systems"].append(entry)
                print(json.dumps(entry), flush=True)
        bare = next((e for e in result["systems"] if e["system"] == "bare_cuda" and e["status"] == "ok"), None)
        print(f"\n| system | start-up s | median round s | ratio to bare_cuda | updates/s | final acc | peak GPU MiB |")
        print("|---|---|---|---|---|---|---|")
        for e in result["systems"]:
            if e["status"] != "ok":
                print(f"| {e['system']} | failed: {e['reason'].strip().splitlines()[-1][:80] if e['reason'] else ''} |")
                continue
            if bare:
                e["ratio_to_bare"] = e["median_round_s"] / bare["median_round_s"]
            print(f"| {e['system']} | {e['startup_s']:.1f} | {e['median_round_s']:.3f} | "
                  f"{e.get('ratio_to_bare', float('nan')):.2f} | {e['client_updates_per_s']:.1f} | "
                  f"{e['final_test_accuracy']:.4f} | {e['peak_gpu_mib']} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
