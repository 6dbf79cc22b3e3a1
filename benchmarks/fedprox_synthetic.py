"""FedProx vs FedAvg on FedProx's Synthetic(1,1) (Li et al., MLSys 2020, §5).

Runs ``stamen/configs/fedprox_synthetic.toml`` (30 devices, 10 per round, logistic regression,
20 local epochs of SGD lr 0.01, batch 10) with ``strategy.name`` = fedavg and fedprox (μ = 1) over
several seeds, in one process (the in-process grid: identical numbers to a Ray simulation of the
same config, see tests/test_simulation.py), and prints a markdown table of final test accuracy,
mean test accuracy over the last 10 rounds, final test loss and final training loss.

    python -m stamen.benchmarks.fedprox_synthetic --rounds 60 --seeds 0 1 2 --out fedprox.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from stamen.config import load
from stamen.server.inprocess_grid import InProcessGrid
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory

CONFIG = Path(__file__).resolve().parents[1] / "stamen" / "configs" / "fedprox_synthetic.toml"
VARIANTS = {"fedavg": ['strategy={name="fedavg"}'], "fedprox mu=1": ['strategy={name="fedprox", proximal_mu=1.0}']}


def run_one(overrides: list[str], rounds: int, seed: int, out: Path) -> dict:
    cfg = load(CONFIG, overrides + [f"run.rounds={rounds}", f"run.seed={seed}"])
    run_federation(InProcessGrid(cfg), cfg, out)
    rows = RunDirectory(out).read_metrics()
    return {"final_acc": rows[-1]["test_accuracy"],
            "last10_acc": statistics.mean(r["test_accuracy"] for r in rows[-10:]),
            "final_test_loss": rows[-1]["test_loss"], "final_train_loss": rows[-1]["train_loss"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            results[name] = [run_one(overrides, args.rounds, s, Path(tmp) / f"{name}-{s}".replace(" ", "_"))
                             for s in args.seeds]
    keys = ["final_acc", "last10_acc", "final_test_loss", "final_train_loss"]
    print(f"Synthetic(1,1), {args.rounds} rounds, seeds {args.seeds} (mean ± std)\n")
    print("| strategy | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, runs in results.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in runs]
            cells.append(f"{statistics.mean(vals):.4f} ± {statistics.pstdev(vals):.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"rounds": args.rounds, "seeds": args.seeds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
