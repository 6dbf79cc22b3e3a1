"""Differential privacy that holds: what an adversary with the run seed recovers, and runs by target ε.

    python -m stamen.benchmarks.dp_soundness                 # both parts, ~10 min on 2 cores
    python -m stamen.benchmarks.dp_soundness --part noise    # the adversary only (seconds)

**Part 1 — the noise-removal attack.** A local-DP run (``privacy.site = local``, z = 1, C = 0.5,
every client a known constant update) in-process, recording every reply the server receives.
The adversary knows ``run.seed``, the config and every message; it regenerates each client's
noise the ways Stamen derived it (``derive_seed(seed, round, "dp-local", partition)``, the old
rule, and the reproducible-debugging rule) and subtracts it. Reported: the error of the
recovered update against the clipped one, relative to σ√d — ≈ 0 when the noise is predictable,
≈ √2 (two independent Gaussians) when it is not. The central-noise attack on the released
model is reported the same way. Run with ``privacy.reproducible_noise = true`` (what every run
did before this change) and with the default.

**Part 2 — ``privacy.target_epsilon`` on digits.** The default digits job (20 clients, Dirichlet
0.5, MLP, 20 rounds) with central DP-FedAvg, C = 1, Poisson sampling q = 0.5, δ = 1e-5, for
target ε ∈ {1, 3, 8} and 3 seeds: the noise multiplier chosen, the final ε, the final accuracy
(mean ± sd). The in-process engine (identical metrics to a Ray simulation).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "stamen" / "configs" / "default.toml"


def _run(overrides: list[str], grid_cls=None):
    from stamen.config import load
    from stamen.server.inprocess_grid import InProcessGrid
    from stamen.server.loop import run_federation

    cfg = load(DEFAULT_CONFIG, overrides)
    grid = (grid_cls or InProcessGrid)(cfg)
    out = tempfile.mkdtemp(prefix="dp-soundness-")
    return cfg, run_federation(grid, cfg, out), out, grid


def noise_attack(reproducible: bool) -> dict:
    """Relative error of the adversary's recovered updates (local DP) and of the released mean (central)."""
    from stamen import schema as S
    from stamen.client import trainers
    from stamen.core import derive_seed
    from stamen.privacy.noise import SeededNoise
    from stamen.server.inprocess_grid import InProcessGrid
    from stamen.server.results import RunDirectory
    from stamen.tasks.task import load_task

    def constant(model, X, y, settings, generator, job):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3)
        return 0.5, 1

    class Recording(InProcessGrid):
        replies: list = []

        def send_and_receive(self, messages, *, timeout=None):
            out = super().send_and_receive(messages, timeout=timeout)
            type(self).replies.extend(r for r in out if S.UPDATE in r.content.array_records)
            return out

    saved, trainers.TRAINERS["sgd"] = trainers.TRAINERS["sgd"], constant
    try:
        base = ["federation.clients=6", "run.rounds=1", "task.local_epochs=1", "privacy.clip=0.5",
                "privacy.noise_multiplier=1.0", "privacy.sampling='none'", "eval.every=1000",
                f"privacy.reproducible_noise={'true' if reproducible else 'false'}"]
        Recording.replies = []
        cfg, _, _, grid = _run(base + ["privacy.site='local'"], Recording)
        layout = load_task(cfg.task, cfg.federation.clients, cfg.run.seed).layout
        d, sigma = layout.d, 0.5
        clipped = torch.full((d,), 0.3).mul_(min(1.0, 0.5 / (0.3 * math.sqrt(d))))
        local = []
        for reply in grid.replies:
            meta = reply.content.config_records[S.META]
            pid, rnd = int(meta[S.PARTITION_ID]), int(meta[S.SERVER_ROUND])
            sent = torch.from_numpy(S.from_array_record(reply.content.array_records[S.UPDATE])["values"])
            guesses = [SeededNoise(cfg.run.seed).generator(rnd, "dp-local", pid),
                       torch.Generator().manual_seed(derive_seed(cfg.run.seed, rnd, "dp-local", pid))]
            local.append(min(float((sent - torch.randn(d, generator=g) * sigma - clipped).norm()) for g in guesses)
                         / (sigma * math.sqrt(d)))
        cfg, _, out, _ = _run(base)
        task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
        released = task.layout.flatten(RunDirectory(out).load_checkpoint()["arrays"]) - task.layout.flatten(
            task.initial_weights())
        std = 0.5 / cfg.federation.clients
        central = min(float((released - torch.randn(d, generator=g) * std - clipped).norm()) / (std * math.sqrt(d))
                      for g in (SeededNoise(cfg.run.seed).generator(1, "dp-central-noise"),
                                torch.Generator().manual_seed(derive_seed(cfg.run.seed, 1, "dp-central-noise"))))
    finally:
        trainers.TRAINERS["sgd"] = saved
    return {"reproducible_noise": reproducible, "local_error_over_sigma_sqrt_d": [round(e, 6) for e in local],
            "central_error_over_std_sqrt_d": round(central, 6)}


def target_table(targets, seeds, rounds: int) -> list[dict]:
    rows = []
    for target in targets:
        runs = []
        for seed in seeds:
            _, summary, _, _ = _run([f"run.seed={seed}", f"run.rounds={rounds}", "privacy.clip=1.0",
                                     f"privacy.target_epsilon={target}", "federation.fraction_train=0.5",
                                     "privacy.delta=1e-5", "eval.every=1000"])
            runs.append(summary)
        accs = [r["final_test_accuracy"] for r in runs]
        rows.append({"target_epsilon": target, "z": runs[0]["privacy"]["calibrated_noise_multiplier"],
                     "final_epsilon": max(r["epsilon"] for r in runs), "accuracy_mean": statistics.mean(accs),
                     "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0, "seeds": list(seeds)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["noise", "target", "all"], default="all")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict = {}
    if args.part in ("noise", "all"):
        result["attack"] = [noise_attack(True), noise_attack(False)]
        print("| noise source | local DP: error / (σ√d), per client | central: error / (std·√d) |")
        print("|---|---|---|")
        for r in result["attack"]:
            source = "seeded from run.seed (before)" if r["reproducible_noise"] else "OS entropy (now)"
            local = ", ".join(f"{e:.3g}" for e in r["local_error_over_sigma_sqrt_d"])
            print(f"| {source} | {local} | {r['central_error_over_std_sqrt_d']:.3g} |")
    if args.part in ("target", "all"):
        result["target"] = target_table(args.targets, args.seeds, args.rounds)
        print("| target ε | chosen z | final ε (max over seeds) | accuracy (mean ± sd, 3 seeds) |")
        print("|---|---|---|---|")
        for r in result["target"]:
            print(f"| {r['target_epsilon']:g} | {r['z']:.4f} | {r['final_epsilon']:.4f} | "
                  f"{r['accuracy_mean']:.4f} ± {r['accuracy_sd']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
