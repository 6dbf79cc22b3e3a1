"""Does curriculum learning help more when clients are more non-IID? (Vahidian et al., ICCV 2023)

    python -m stamen.benchmarks.curriculum_study --out runs/curriculum_study
    python -m stamen.benchmarks.curriculum_study --out /tmp/cs --rounds 3 --seeds 0 --splits iid   # smoke

Grid: data ordering ∈ {curriculum, anti, random, vanilla} × client selection ∈ {off, on} ×
split ∈ {digits Dirichlet α = 0.05, 0.2, 1.0, IID} × seeds. Every run is strategy ``curriculum``
with the reference pacing (data: linear a = 0.8, b = 0.2; clients: linear a = 0.2, b = 0.4),
scorer G (the global model), full client scoring (a scoring round once per pass over the clients):

- client selection *off*: seeded uniform sampling (``client_curriculum = false``); with ordering
  ``vanilla`` this is exactly FedAvg — the baseline every gain is measured against;
- client selection *on*: clients ordered the same way as the data (curriculum / anti / random);
  for ``vanilla`` data, curriculum client selection alone ("client curriculum only").

Gain = final test accuracy − that of vanilla/off with the same split and seed (paired), in points.

Federation: digits, 10 clients (20 clients cannot be split at α = 0.05 with flwr-datasets'
Dirichlet partitioner's minimum partition size), fraction 0.3 (3 clients per round), MLP with
64 hidden units, 2 local epochs of batch 16, lr 0.05, 20 rounds. Runs go through the real server
loop with the in-process grid, one thread; finished runs under ``OUT/runs/`` are reused. Writes
``OUT/curriculum_study.json``, ``OUT/curriculum_study.md`` and ``OUT/curriculum_gain_vs_alpha.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

SPLITS = {
    "a0.05": ["task.partition=dirichlet", "task.alpha=0.05"],
    "a0.2": ["task.partition=dirichlet", "task.alpha=0.2"],
    "a1.0": ["task.partition=dirichlet", "task.alpha=1.0"],
    "iid": ["task.partition=iid"],
}
SPLIT_ALPHA = {"a0.05": 0.05, "a0.2": 0.2, "a1.0": 1.0, "iid": math.inf}
ORDERINGS = ("curriculum", "anti", "random", "vanilla")
COMMON = ["task.dataset=digits", "federation.clients=10", "federation.fraction_train=0.3", "task.model=mlp",
          "task.hidden=64", "task.local_epochs=2", "task.batch_size=16", "task.lr=0.05",
          "strategy.name=curriculum", "strategy.pacing=linear", "strategy.a=0.8", "strategy.b=0.2",
          "strategy.client_pacing=linear", "strategy.client_a=0.2", "strategy.client_b=0.4",
          "strategy.scorer=G", "strategy.client_scoring=full"]


def arm_overrides(ordering: str, clients: bool) -> list[str]:
    opts = [f"strategy.ordering={ordering}", f"strategy.data_curriculum={str(ordering != 'vanilla').lower()}",
            f"strategy.client_curriculum={str(clients).lower()}"]
    if clients:
        opts.append(f"strategy.client_ordering={ordering if ordering != 'vanilla' else 'curriculum'}")
    return opts


def arm_label(ordering: str, clients: bool) -> str:
    if ordering == "vanilla":
        return "vanilla + client curriculum" if clients else "vanilla (FedAvg)"
    return f"{ordering} + client {ordering}" if clients else ordering


def run_one(out: Path, overrides: list[str]) -> dict:
    """One run through the server loop and the in-process grid; reuses a finished run directory."""
    from stamen.config import load
    from stamen.server.inprocess_grid import InProcessGrid
    from stamen.server.loop import run_federation
    from stamen.server.results import RunDirectory

    rd = RunDirectory(out)
    cfg = load(overrides=overrides)
    if rd.summary_path.exists() and (out / "config.toml").read_text() == cfg.to_toml():
        summary = rd.read_summary()
    else:
        if out.exists():
            import shutil

            shutil.rmtree(out)
        summary = run_federation(InProcessGrid(cfg), cfg, out)
    rows = rd.read_metrics()
    summary["last3_test_accuracy"] = statistics.fmean(r["test_accuracy"] for r in rows[-3:])
    summary["scoring_evaluations"] = sum(r.get("scoring_evaluations", 0) for r in rows)
    return summary


def study(out: Path, rounds: int, seeds: list[int], splits: list[str]) -> dict:
    results: dict = {"rounds": rounds, "seeds": seeds, "common": COMMON, "runs": []}
    for split in splits:
        for seed in seeds:
            for clients in (False, True):
                for ordering in ORDERINGS:
                    name = f"{split}-{ordering}-{'cs' if clients else 'nocs'}-s{seed}"
                    overrides = COMMON + SPLITS[split] + arm_overrides(ordering, clients) + [
                        f"run.name={name}", f"run.seed={seed}", f"run.rounds={rounds}"]
                    t0 = time.perf_counter()
                    s = run_one(out / "runs" / name, overrides)
                    print(f"{name}: final {s['final_test_accuracy']:.3f} last3 {s['last3_test_accuracy']:.3f} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
                    alpha = None if split == "iid" else SPLIT_ALPHA[split]
                    results["runs"].append({"split": split, "alpha": alpha, "ordering": ordering,
                                            "client_selection": clients, "seed": seed, "overrides": overrides,
                                            "final": s["final_test_accuracy"], "last3": s["last3_test_accuracy"],
                                            "scoring_evaluations": s["scoring_evaluations"], "wall_s": s["wall_s"]})
    return results


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gains(results: dict, metric: str = "final") -> dict:
    """{(split, ordering, clients): [paired gain per seed, in points]} against vanilla/off."""
    base = {(r["split"], r["seed"]): r[metric] for r in results["runs"]
            if r["ordering"] == "vanilla" and not r["client_selection"]}
    out: dict = {}
    for r in results["runs"]:
        key = (r["split"], r["ordering"], r["client_selection"])
        out.setdefault(key, []).append(100 * (r[metric] - base[(r["split"], r["seed"])]))
    return out


def tables(results: dict) -> str:
    splits = list(dict.fromkeys(r["split"] for r in results["runs"]))
    arms = [(o, c) for c in (False, True) for o in ORDERINGS]
    head = "| arm | " + " | ".join(f"α={SPLIT_ALPHA[s]:g}" if s != "iid" else "IID" for s in splits) + " |"
    sep = "|---|" + "---|" * len(splits)
    lines = [f"Digits, 10 clients, 3 per round, {results['rounds']} rounds, seeds {results['seeds']}.", "",
             "Final test accuracy (%, mean ± std over seeds):", "", head, sep]
    for o, c in arms:
        cells = []
        for s in splits:
            vals = [100 * r["final"] for r in results["runs"]
                    if r["split"] == s and r["ordering"] == o and r["client_selection"] == c]
            m, sd = _stats(vals)
            cells.append(f"{m:.1f} ± {sd:.1f}")
        lines.append(f"| {arm_label(o, c)} | " + " | ".join(cells) + " |")
    for metric, title in (("final", "final accuracy"), ("last3", "mean accuracy of the last 3 rounds")):
        g = gains(results, metric)
        lines += ["", f"Gain over vanilla FedAvg in {title} (points, paired by seed, mean ± std):", "", head, sep]
        for o, c in arms:
            if o == "vanilla" and not c:
                continue
            cells = []
            for s in splits:
                m, sd = _stats(g[(s, o, c)])
                cells.append(f"{m:+.1f} ± {sd:.1f}")
            lines.append(f"| {arm_label(o, c)} | " + " | ".join(cells) + " |")
    cost = [r for r in results["runs"] if r["client_selection"]]
    if cost:
        lines += ["", f"Client selection cost: {statistics.fmean(r['scoring_evaluations'] for r in cost):.0f} extra "
                  f"client evaluations per run (scoring rounds), vs "
                  f"{results['rounds'] * 3} client updates per run."]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted(dict.fromkeys(r["split"] for r in results["runs"]), key=lambda s: SPLIT_ALPHA[s])
    xs = list(range(len(splits)))
    g = gains(results, "final")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {"curriculum": "tab:green", "anti": "tab:red", "random": "tab:blue", "vanilla": "tab:gray"}
    for o in ORDERINGS:
        for c in (False, True):
            if o == "vanilla" and not c:
                continue
            stats = [_stats(g[(s, o, c)]) for s in splits]
            ax.errorbar([x + (0.06 if c else -0.06) for x in xs], [m for m, _ in stats], yerr=[sd for _, sd in stats],
                        color=colors[o], linestyle="--" if c else "-", marker="o" if c else "s", capsize=3,
                        label=arm_label(o, c))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(xs, [f"α={SPLIT_ALPHA[s]:g}" if s != "iid" else "IID" for s in splits])
    ax.set(xlabel="client split (more non-IID ←)", ylabel="gain over FedAvg (accuracy points)",
           title=f"Curriculum gain vs non-IIDness (digits, {results['rounds']} rounds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/curriculum_study"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("stamen").setLevel(logging.ERROR)
    results = study(args.out, args.rounds, args.seeds, args.splits)
    args.out.mkdir(parents=True, exist_ok=True)
    md = tables(results)
    (args.out / "curriculum_study.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "curriculum_study.md").write_text(md + "\n")
    plot(results, args.out / "curriculum_gain_vs_alpha.png")
    print(md)


if __name__ == "__main__":
    main()
