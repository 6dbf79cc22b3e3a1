"""FedAvg vs federated adversarial training (``fat``): clean and robust accuracy, several seeds.

    python -m stamen.benchmarks.fat_study --out runs/fat_study            # the full study
    python -m stamen.benchmarks.fat_study --out /tmp/fs --rounds 3 --seeds 0   # a smoke run

Tasks: ``digits`` (20 clients, Dirichlet α = 0.5, pixels in [0, 1], MLP) and ``synthetic``
(FedProx Synthetic(1, 1), 20 clients, natural split, MLP). Both strategies are attacked the
same way at the end of the run: the task's default threat model
(``stamen.server.evaluation.DEFAULT_THREATS``: digits ℓ∞ ε = 0.2, synthetic ℓ∞ ε = 0.3),
PGD-20 with step 2.5·ε/20 from a random start, and FGSM. ``fat`` trains with its defaults
(the same ε, PGD-10, mix 1, η_g = 1).

Every run goes through the real server loop with the in-process grid
(:class:`stamen.server.inprocess_grid.InProcessGrid`), one thread; each run's directory is kept
under ``OUT/runs/`` and reused when the study is run again (delete it to recompute). Writes
``OUT/fat_study.json`` and ``OUT/fat_study.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

TASKS = {
    "digits": ["task.dataset=digits", "task.partition=dirichlet", "task.alpha=0.5"],
    "synthetic": ["task.dataset=synthetic", "task.synthetic_alpha=1.0", "task.synthetic_beta=1.0"],
}
STRATEGIES = {"fedavg": ["strategy.name=fedavg"], "fat": ["strategy.name=fat"]}
COMMON = ["federation.clients=20", "federation.fraction_train=1.0", "task.model=mlp", "task.hidden=128",
          "task.local_epochs=2", "task.batch_size=16", "task.lr=0.1", "eval.robust=true", "eval.attack_steps=20",
          "eval.fgsm=true"]


def run_one(out: Path, overrides: list[str]) -> dict:
    """One run through the server loop and the in-process grid; reuses a finished run directory."""
    from stamen.config import load
    from stamen.server.inprocess_grid import InProcessGrid
    from stamen.server.loop import run_federation
    from stamen.server.results import RunDirectory

    rd = RunDirectory(out)
    cfg = load(overrides=overrides)
    if rd.summary_path.exists() and (out / "config.toml").read_text() == cfg.to_toml():
        return rd.read_summary()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    return run_federation(InProcessGrid(cfg), cfg, out)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    m, s = _mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def study(out: Path, rounds: int, seeds: list[int], tasks: list[str]) -> dict:
    results: dict = {"rounds": rounds, "seeds": seeds, "common": COMMON, "runs": []}
    for task in tasks:
        for strategy in STRATEGIES:
            for seed in seeds:
                name = f"{task}-{strategy}-s{seed}"
                overrides = COMMON + TASKS[task] + STRATEGIES[strategy] + [
                    f"run.name={name}", f"run.seed={seed}", f"run.rounds={rounds}", f"eval.robust_every={rounds}"]
                t0 = time.perf_counter()
                summary = run_one(out / "runs" / name, overrides)
                print(f"{name}: clean {summary['final_test_accuracy']:.3f} "
                      f"robust {summary['final_robust_accuracy']:.3f} "
                      f"fgsm {summary['final_fgsm_accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
                results["runs"].append({
                    "task": task, "strategy": strategy, "seed": seed, "overrides": overrides,
                    "clean": summary["final_test_accuracy"], "robust": summary["final_robust_accuracy"],
                    "fgsm": summary["final_fgsm_accuracy"], "wall_s": summary["wall_s"],
                    "eval_attack": summary["robust_eval"]["pgd"], "train_attack": summary.get("train_attack")})
    return results


def table(results: dict) -> str:
    lines = [f"FedAvg vs FAT, {results['rounds']} rounds, seeds {results['seeds']} (mean ± std, %); "
             "robust = PGD-20 at the task's default ε, white-box, on the central test set.", "",
             "| task | eval attack | strategy | training | clean acc | PGD-20 robust acc | FGSM acc | wall s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in results["runs"]):
        for strategy in STRATEGIES:
            runs = [r for r in results["runs"] if r["task"] == task and r["strategy"] == strategy]
            if not runs:
                continue
            a = runs[0]["eval_attack"]
            attack = f"{a['norm']} ε={a['eps']:g}"
            t = runs[0]["train_attack"]
            training = (f"PGD-{t['steps']} {t['norm']} ε={t['eps']:g}, mix {t['mix']:g}, η_g {t['server_lr']:g}"
                        if t else "clean SGD")
            lines.append(f"| {task} | {attack} | {strategy} | {training} | {_fmt([r['clean'] for r in runs])} | "
                         f"{_fmt([r['robust'] for r in runs])} | {_fmt([r['fgsm'] for r in runs])} | "
                         f"{statistics.fmean(r['wall_s'] for r in runs):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/fat_study"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("stamen").setLevel(logging.ERROR)
    results = study(args.out, args.rounds, args.seeds, args.tasks)
    md = table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fat_study.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "fat_study.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
