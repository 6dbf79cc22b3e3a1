"""Reliability table: Byzantine clients vs robust aggregation, client failures, stragglers.

digits, 20 clients (Dirichlet 0.5), MLP, 20 rounds, in-process engine (a round deadline applies
to each client's own time, as if all clients ran in parallel). Prints a markdown table of final
accuracy and the rejected / missing / failed-round counts, and writes JSON.

    python -m stamen.benchmarks.faults_table --rounds 20 --out faults.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from stamen.config import load
from stamen.server.inprocess_grid import InProcessGrid
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory

BYZ = ["faults.byzantine_fraction=0.2", "faults.byzantine_attack=sign_flip", "faults.byzantine_scale=4"]
SCENARIOS = {
    "clean, fedavg": [],
    "20% sign-flip (×4), fedavg": BYZ,
    "20% sign-flip (×4), fedmedian": BYZ + ["strategy.name=fedmedian"],
    "20% sign-flip (×4), krum f=4": BYZ + ["strategy.name=krum", "strategy.num_malicious_nodes=4"],
    "20% sign-flip (×4), trimmed mean β=0.25": BYZ + ["strategy.name=fedtrimmedavg", "strategy.trim_beta=0.25"],
    "20% sign-flip (×4), fedavgm + aggregator median": BYZ + ["strategy.name=fedavgm", "strategy.aggregator=median"],
    "20% sign-flip (×4), fedavgm (mean)": BYZ + ["strategy.name=fedavgm"],
    "20% sign-flip (×4), fedprox μ=0.01 + aggregator bulyan f=4": BYZ + ["strategy.name=fedprox",
                                                                       "strategy.aggregator=bulyan",
                                                                       "strategy.num_malicious_nodes=4"],
    "20% sign-flip (×4), fedadam + aggregator trimmed_mean β=0.25": BYZ + [
        "strategy.name=fedadam", "strategy.aggregator=trimmed_mean", "strategy.trim_beta=0.25"],
    "30% client failures, fedavg": ["faults.client_failure=0.3"],
    "50% stragglers (mean delay 1 s, deadline 0.75 s), fedavg": [
        "faults.straggler_fraction=0.5", "faults.straggler_delay_s=1.0", "faults.round_deadline_s=0.75"],
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--match", default="", help="run only the scenarios whose name contains this text")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(SCENARIOS.items()):
            if args.match not in name:
                continue
            cfg = load(overrides=[f"run.rounds={args.rounds}", f"run.seed={args.seed}", *overrides])
            summary = run_federation(InProcessGrid(cfg), cfg, Path(tmp) / str(i))
            rows = RunDirectory(Path(tmp) / str(i)).read_metrics()
            results[name] = {"final_test_accuracy": summary["final_test_accuracy"],
                             "rejected": sum(r["rejected"] for r in rows),
                             "missing": sum(r["missing"] for r in rows),
                             "failed_rounds": summary["failed_rounds"],
                             "client_updates": sum(r["clients"] for r in rows)}
            print(name, results[name], flush=True)
    print(f"\n| scenario ({args.rounds} rounds, seed {args.seed}) | final acc | accepted updates | rejected | missing | failed rounds |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['final_test_accuracy']:.4f} | {r['client_updates']} | {r['rejected']} | "
              f"{r['missing']} | {r['failed_rounds']} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
