"""Ferret vs FedKSeed vs dense FedAvg on the embedded stdlib language-modelling task.

One command, everything in one process on the in-process grid (the same numbers as a Ray
simulation of the same config), one torch thread:

    python -m stamen.benchmarks.ferret_study --out ferret_study.json

Setting (defaults): the byte-level GPT of ``tasks/lm.py`` (2 layers, 208 wide, context 64:
1,110,720 parameters) starting from its cached central pretraining (``task.pretrained``; built
on first use, a few CPU minutes); 8 clients = 8 groups of standard-library packages (natural,
non-IID), 8 KB of source each (126 windows of 64 tokens), half of them sampled per round, the
same seeded sample for every method; every client runs one epoch of Adam (lr 1e-3, batch 12:
11 steps) per round under FedAvg and Ferret. FedKSeed's clients instead take ``--zo-steps``
zeroth-order steps (two forward passes each) with its own lr. Test set: 8 KB of held-out files
from every group (126 windows); loss = mean next-byte cross-entropy in nats (perplexity = e^loss).

Reported per method, for the same number of rounds: final test loss (and perplexity), the
share of FedAvg's improvement over the pretrained model it achieves, rounds-to-target and
bytes-to-target (uplink + downlink until the first evaluated round at or below a target loss;
the targets are fixed up front as improvements over the pretrained model, ``--gains``, default
0.025, 0.05 and 0.1 nat),
uplink bytes per client per round, downlink bytes per round, wall time. The bar of the issue —
Ferret's final test loss within 10 % of FedAvg's after the same rounds while its uplink per
client per round is at least 100× smaller — is checked and printed as it comes out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import stamen.client.trainers_ferret  # noqa: F401  (registers DOWNLINKS['ferret'] before the first message)
from stamen.config import load
from stamen.server.inprocess_grid import InProcessGrid
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory

TASK = ["task.dataset=stdlib", "task.model=gpt", "task.context=64", "task.max_bytes_per_client=8192",
        "task.max_test_bytes=8192", "task.local_epochs=1", "task.batch_size=12", "task.optimizer=adam",
        "task.lr=0.001", "federation.clients=8", "federation.fraction_train=0.5"]


def methods(args) -> dict[str, list[str]]:
    return {
        "fedavg": ["strategy.name=fedavg"],
        "ferret": ["strategy.name=ferret", f"strategy.K={args.K}", f"strategy.server_lr={args.server_lr}",
                   f"strategy.pool_scope={args.pool_scope}", f"strategy.value_dtype={args.value_dtype}"],
        "fedkseed": ["strategy.name=fedkseed", f"strategy.K={args.zo_K}", f"strategy.local_steps={args.zo_steps}",
                     f"strategy.lr={args.zo_lr}", "strategy.eps=5e-4"],
    }


def initial_test_loss(overrides: list[str]) -> float:
    from stamen.tasks.task import evaluate, load_task

    cfg = load(overrides=overrides)
    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    return evaluate(task.new_model(), *task.data.test, cfg.eval.batch_size)[0]


def run_one(overrides: list[str], targets: list[float], out: Path) -> dict:
    cfg = load(overrides=overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = run_federation(InProcessGrid(cfg), cfg, out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = RunDirectory(out).read_metrics()
    evaluated = [r for r in rows if r["test_loss"] is not None]
    cum, cumulative, reached = 0, [], {}
    for r in rows:
        cum += r["uplink_bytes"] + r["downlink_bytes"]
        cumulative.append(cum)
        for t in targets:
            if t not in reached and r["test_loss"] is not None and r["test_loss"] <= t:
                reached[t] = (r["round"], cum)
    uplink_pc = [r["uplink_bytes"] / r["clients"] for r in rows if r["clients"]]
    return {
        "final_test_loss": summary["final_test_loss"], "final_perplexity": math.exp(summary["final_test_loss"]),
        "test_loss": [(r["round"], r["test_loss"]) for r in evaluated], "cumulative_bytes": cumulative,
        "to_target": {f"{t:.4f}": {"rounds": reached[t][0] if t in reached else None,
                                   "bytes": reached[t][1] if t in reached else None} for t in targets},
        "uplink_per_client_round": statistics.mean(uplink_pc),
        "downlink_per_round": statistics.mean(r["downlink_bytes"] for r in rows),
        "total_bytes": summary["total_uplink_bytes"] + summary["total_downlink_bytes"],
        "rejected": summary["total_rejected"], "wall_s": wall, "cpu_s": cpu, "parameters": summary["parameters"],
    }


def _fmt_bytes(b) -> str:
    if b is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1024 or unit == "GB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1024


def table(results: dict, initial: float, targets: list[float]) -> str:
    base = results.get("fedavg")
    lines = [f"{'method':10s} {'final loss':>10s} {'ppl':>6s} {'of FedAvg gain':>14s} "
             f"{'uplink/client/rd':>16s} {'downlink/rd':>11s} {'CPU':>6s} {'wall':>6s}"]
    for name, r in results.items():
        gain = "—"
        if base and initial - base["final_test_loss"] > 0:
            gain = f"{(initial - r['final_test_loss']) / (initial - base['final_test_loss']):.0%}"
        lines.append(f"{name:10s} {r['final_test_loss']:10.4f} {r['final_perplexity']:6.2f} {gain:>14s} "
                     f"{_fmt_bytes(r['uplink_per_client_round']):>16s} {_fmt_bytes(r['downlink_per_round']):>11s} "
                     f"{r['cpu_s']:5.0f}s {r['wall_s']:5.0f}s")
    lines += ["", f"{'rounds / bytes (up + down) to reach test loss':46s}"]
    lines.append(f"{'method':10s} " + " ".join(f"{'≤ %.4f (−%.3f)' % (t, initial - t):>26s}" for t in targets))
    for name, r in results.items():
        cells = []
        for t in targets:
            hit = r["to_target"][f"{t:.4f}"]
            cells.append(f"{hit['rounds']} rounds / {_fmt_bytes(hit['bytes'])}" if hit["rounds"] else "not reached")
        lines.append(f"{name:10s} " + " ".join(f"{c:>26s}" for c in cells))
    return "\n".join(lines)


def verdict(results: dict) -> dict:
    if "fedavg" not in results or "ferret" not in results:
        return {}
    f, a = results["ferret"], results["fedavg"]
    ratio = f["final_test_loss"] / a["final_test_loss"]
    shrink = a["uplink_per_client_round"] / f["uplink_per_client_round"]
    return {"loss_ratio": ratio, "uplink_reduction": shrink, "loss_within_10pct": ratio <= 1.10,
            "uplink_100x_smaller": shrink >= 100, "bar_met": ratio <= 1.10 and shrink >= 100}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["fedavg", "ferret", "fedkseed"],
                    choices=["fedavg", "ferret", "fedkseed"])
    ap.add_argument("--K", type=int, default=256, help="Ferret: seed pool size (max directions per block)")
    ap.add_argument("--server-lr", type=float, default=0.1, help="Ferret: server learning rate")
    ap.add_argument("--pool-scope", default="round", choices=["run", "round"])
    ap.add_argument("--value-dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--zo-K", type=int, default=4096, help="FedKSeed: seed pool size")
    ap.add_argument("--zo-steps", type=int, default=20, help="FedKSeed: zeroth-order steps per client and round")
    ap.add_argument("--zo-lr", type=float, default=1e-3, help="FedKSeed: client learning rate")
    ap.add_argument("--gains", type=float, nargs="+", default=[0.025, 0.05, 0.1],
                    help="targets: test loss = pretrained loss minus each of these (nats)")
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    common = TASK + [f"run.rounds={args.rounds}", f"run.seed={args.seed}", f"eval.every={args.eval_every}",
                     *args.extra]
    t0, c0 = time.perf_counter(), time.process_time()
    initial = initial_test_loss(common)
    targets = [initial - g for g in args.gains]
    print(f"pretrained model: test loss {initial:.4f} (perplexity {math.exp(initial):.2f}); targets "
          f"{', '.join(f'{t:.4f}' for t in targets)}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            results[name] = run_one(common + methods(args)[name], targets, Path(tmp) / name)
            print(f"{name}: final test loss {results[name]['final_test_loss']:.4f} "
                  f"(CPU {results[name]['cpu_s']:.0f} s, wall {results[name]['wall_s']:.0f} s)", flush=True)
    print()
    print(table(results, initial, targets))
    v = verdict(results)
    if v:
        print(f"\nFerret / FedAvg final test loss: {v['loss_ratio']:.3f} (bar: ≤ 1.10 → "
              f"{'holds' if v['loss_within_10pct'] else 'does NOT hold'}); uplink per client per round "
              f"{v['uplink_reduction']:.0f}× smaller (bar: ≥ 100× → "
              f"{'holds' if v['uplink_100x_smaller'] else 'does NOT hold'})")
    print(f"total: CPU {time.process_time() - c0:.0f} s, wall {time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "overrides": common,
                                        "initial_test_loss": initial, "targets": targets, "results": results,
                                        "verdict": v}, indent=1, default=str))


if __name__ == "__main__":
    main()
