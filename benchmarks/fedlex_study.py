"""FedLEx vs its base strategy on strongly non-IID splits, with SGD and with Adam.

Settings (all: 20 clients (15 for Dirichlet), 25% sampled per round, MLP with 64 hidden units, 2 local epochs,
batch 16, in one process on the in-process grid — the same numbers as a Ray simulation):

* ``digits-path2``: scikit-learn digits, pathological split, 2 classes per client;
* ``digits-dir0.1``: digits, Dirichlet(0.1) label split;
* ``synthetic(1,1)``: FedProx Synthetic(α = 1, β = 1), one device per client.

Local optimizers: SGD lr 0.05, Adam lr 0.003 (``task.optimizer`` / ``task.lr``; FedLEx explores
and trains with the same optimizer as its base). FedLEx: 20% of the clients explore for up
to 20 epochs (patience 5, monitored on training loss), G = mean of per-tensor min-max
normalized displacements, one global G, base = FedAvg (``--base`` to change). With SGD also the
ablation ``strategy.rescale = "unit_mean"`` (G divided by its mean per tensor: the same pattern
and zeros at the base's average step size; not in the paper), which separates the effect of
G's per-coordinate pattern from the plain step-size shrinkage of mean(G) ≪ 1.

Reported per setting and method, mean ± std over the seeds: rounds to reach the setting's target
test accuracy (a run that never reaches it counts as "—"; the cell says how many seeds did),
final test accuracy, mean test accuracy over the last 5 rounds, and FedLEx's costs (exploration
epochs summed over explorers, exploration + guidance bytes as a share of the run's training
traffic, mean G and share of exact zeros in G). The targets were fixed from FedAvg-SGD's seed-0
curves (roughly the accuracy it reaches around round 15) before any FedLEx-SGD run.

    python -m stamen.benchmarks.fedlex_study --seeds 0 1 2 --rounds 30 --out fedlex_study.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stamen.config import load
from stamen.server.inprocess_grid import InProcessGrid
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory

COMMON = ["federation.clients=20", "federation.fraction_train=0.25", "task.model=mlp", "task.hidden=64",
          "task.local_epochs=2", "task.batch_size=16"]
SETTINGS = {
    "digits-path2": ["task.dataset=digits", "task.partition=pathological", "task.classes_per_client=2"],
    # 15 clients: with 20, flwr-datasets' Dirichlet(0.1) partitioner finds no split giving every
    # client >= 10 of digits' 1,437 training images for seed 0 (it gives up after 10 draws)
    "digits-dir0.1": ["task.dataset=digits", "task.partition=dirichlet", "task.alpha=0.1", "federation.clients=15"],
    "synthetic(1,1)": ["task.dataset=synthetic", "task.synthetic_alpha=1.0", "task.synthetic_beta=1.0"],
}
OPTIMIZERS = {"sgd": ["task.optimizer=sgd", "task.lr=0.05"], "adam": ["task.optimizer=adam", "task.lr=0.003"]}
TARGETS = {"digits-path2": 0.5, "digits-dir0.1": 0.5, "synthetic(1,1)": 0.7}
FEDLEX = ["strategy.explorer_fraction=0.2", "strategy.exploration_epochs=20", "strategy.patience=5"]


METHODS = ("base", "fedlex", "fedlex-unit")


def method_overrides(method: str, base: str) -> list[str]:
    if method == "base":
        return [f"strategy.name={base}"]
    rescale = ["strategy.rescale=unit_mean"] if method == "fedlex-unit" else []
    return ["strategy.name=fedlex", f"strategy.base={base}", *FEDLEX, *rescale]


def label(method: str, base: str) -> str:
    return {"base": base, "fedlex": f"fedlex({base})", "fedlex-unit": f"fedlex({base}), G/mean(G)"}[method]


def run_one(overrides: list[str], target: float, out: Path) -> dict:
    cfg = load(overrides=overrides)
    t0 = time.perf_counter()
    summary = run_federation(InProcessGrid(cfg), cfg, out)
    rows = RunDirectory(out).read_metrics()
    acc = [r["test_accuracy"] for r in rows]
    reached = next((r["round"] for r in rows if r["test_accuracy"] >= target), None)
    train_bytes = summary["total_uplink_bytes"] + summary["total_downlink_bytes"]
    res = {"rounds_to_target": reached, "final_acc": acc[-1], "last5_acc": statistics.mean(acc[-5:]),
           "best_acc": max(acc), "accuracy": acc, "wall_s": time.perf_counter() - t0, "train_bytes": train_bytes}
    if "exploration" in summary:
        extra = summary["exploration_uplink_bytes"] + summary["exploration_downlink_bytes"]
        res.update(exploration_epochs=sum(summary["exploration"]["epochs_run"]),
                   exploration_s=summary["exploration"]["wall_s"],
                   extra_bytes_share=(extra + summary["total_guidance_downlink_bytes"]) / train_bytes,
                   guidance_mean=rows[0].get("guidance_mean"), guidance_zeros=rows[0].get("guidance_zero_fraction"))
    return res


def _ms(vals, fmt="{:.3f}") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    return (fmt + " ± " + fmt).format(statistics.mean(vals), statistics.pstdev(vals))


def table(results: dict, seeds: list[int]) -> str:
    lines = ["| setting | optimizer | method | target | rounds to target | final acc | last-5 acc | "
             "exploration epochs | extra bytes | mean G / zeros |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, runs in results.items():
        setting, opt, method = key.split("|")
        reached = [r["rounds_to_target"] for r in runs if r["rounds_to_target"] is not None]
        rtt = (_ms(reached, "{:.1f}") + f" ({len(reached)}/{len(runs)})") if reached else f"— (0/{len(runs)})"
        fl = method.startswith("fedlex")
        lines.append("| " + " | ".join([
            setting, opt, method, f"{TARGETS[setting]:.2f}", rtt,
            _ms([r["final_acc"] for r in runs]), _ms([r["last5_acc"] for r in runs]),
            _ms([r["exploration_epochs"] for r in runs], "{:.0f}") if fl else "",
            f"{100 * statistics.mean(r['extra_bytes_share'] for r in runs):.1f}%" if fl else "",
            (f"{statistics.mean(r['guidance_mean'] for r in runs):.3f} / "
             f"{statistics.mean(r['guidance_zeros'] for r in runs):.3f}") if fl else "",
        ]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--base", default="fedavg", help="the base strategy FedLEx guides (and is compared with)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", type=Path, default=None, help="write every run's numbers as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            for opt in args.optimizers:
                for method in args.methods:
                    if method == "fedlex-unit" and opt == "adam":
                        continue  # Adam normalizes per coordinate: a per-tensor constant factor cancels (up to ε)
                    key = f"{setting}|{opt}|{label(method, args.base)}"
                    results[key] = []
                    for seed in args.seeds:
                        overrides = [*COMMON, *SETTINGS[setting], *OPTIMIZERS[opt], *method_overrides(method, args.base),
                                     f"run.rounds={args.rounds}", f"run.seed={seed}"]
                        out = Path(tmp) / f"{setting}-{opt}-{method}-{seed}"
                        r = run_one(overrides, TARGETS[setting], out)
                        results[key].append({"seed": seed, **r})
                        print(f"{key} seed {seed}: final {r['final_acc']:.3f}, to target {r['rounds_to_target']}, "
                              f"{r['wall_s']:.1f} s", flush=True)
    print(f"\nFedLEx vs {args.base}: {args.rounds} rounds, seeds {args.seeds} (mean ± std over seeds)\n")
    print(table(results, args.seeds))
    if args.out:
        args.out.write_text(json.dumps({"rounds": args.rounds, "seeds": args.seeds, "base": args.base,
                                        "common": COMMON, "settings": SETTINGS, "optimizers": OPTIMIZERS,
                                        "fedlex": FEDLEX, "targets": TARGETS, "results": results}, indent=1))


if __name__ == "__main__":
    main()
