"""Privacy / communication / accuracy / leakage table on ``digits`` (one command).

    python -m stamen.benchmarks.privacy_table            # 8 runs + attacks, ~5 min on 2 busy cores

For every noise multiplier z ∈ {0, 0.5, 1, 2} and uplink codec ∈ {dense, CountSketch with
d/10 floats per payload} it runs a real federation (server loop, strategies, client handlers
in one process: ``server/inprocess_grid.py``) on digits (20 clients, Dirichlet 0.5, the
default MLP) and reports:

- final test accuracy;
- ε at δ = 1e-5 after the run (RDP accountant, the configured sampling; ∞ for z = 0);
- total uplink bytes (serialized train replies, protobuf size as ``stamen.schema.content_bytes``);
- gradient-inversion PSNR (IG by default) on the *corresponding observed update*: one
  client's single-example, one-step update of the round-1 global model, observed raw (dense),
  sketched with the run's own round-1 CountSketch (the attacker knows R), clipped to C in the
  space that is sent, and noised with N(0, (zC)²) — the noise one client's contribution
  carries in the released sum (see ``privacy/attacks/study.py``).

Mechanisms: dense = ``fedavg`` + central DP-FedAvg (``privacy.site = central``; clip Δ to C,
server noise zC/D on the mean); CountSketch = ``sketched_dp`` (``privacy.site = sketch``; clip
the sketch to C, server noise zC/D on the mean sketch, de-sketch once). Same C, z and sampling
→ the same ε for both codecs. All rows clip at C (z = 0 is clipping only), so the z = 0 row
isolates the effect of noise. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "stamen" / "configs" / "default.toml"


def run_config(codec: str, z: float, args) -> list[str]:
    common = [f"run.rounds={args.rounds}", f"run.seed={args.seed}", f"federation.clients={args.clients}",
              f"task.alpha={args.alpha}", "task.partition='dirichlet'", "task.dataset='digits'",
              f"federation.fraction_train={args.fraction}", f"privacy.clip={args.clip}",
              f"privacy.noise_multiplier={z}", f"privacy.sampling='{args.sampling}'", f"privacy.delta={args.delta}",
              f"eval.every={args.eval_every}", "run.name='privacy-table'"]
    if codec == "dense":
        return common + ["strategy.name='fedavg'", "compression.codec='dense'", "privacy.site='central'"]
    return common + ["strategy.name='sketched_dp'", "compression.codec='countsketch'", f"compression.rows={args.rows}",
                     f"compression.ratio={args.ratio / args.rows}", "privacy.site='sketch'"]


def leakage(cfg, codec: str, z: float, args) -> dict:
    """IG/DLG on one client's single-example update of the round-1 global model, observed as the run sends it."""
    from stamen.privacy.attacks.study import attack_observations, codec_projection
    from stamen.tasks.task import load_task, set_weights

    task = load_task(cfg.task, cfg.federation.clients, cfg.run.seed)
    model = task.new_model()
    set_weights(model, task.initial_weights())
    X, y = task.data.client(0)
    inputs, labels = torch.as_tensor(X[:args.attack_inputs]), torch.as_tensor(y[:args.attack_inputs])
    project = None
    if codec != "dense":
        project, _ = codec_projection("countsketch", task.layout.d, ratio=args.ratio / args.rows, seed=cfg.run.seed,
                                      round=1, rows=args.rows)
    # Δ = -η·g for one step on one example; the attacker knows η, so it attacks g with clip C/η, noise z·C/η.
    clip_g = args.clip / cfg.task.lr
    report = attack_observations(model, inputs, labels, attack=args.attack, project=project, clip=clip_g,
                                 noise_multiplier=z, seeds=args.attack_seeds, iterations=args.attack_iterations,
                                 data_range=task.data.input_range)
    report.pop("per_trial")
    return report


def counting_grid(cfg):
    """The in-process grid, also summing the serialized size of every train reply.

    The loop's own ``uplink_bytes`` caches sizes by ``id(content)`` across rounds, and Python
    reuses the ids of freed objects, so a reply is sometimes charged the size of an earlier,
    larger message; this count does not cache (reported to the lead).
    """
    from stamen import schema as P
    from stamen.server.inprocess_grid import InProcessGrid

    class CountingGrid(InProcessGrid):
        uplink_bytes = 0

        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            if messages and messages[0].metadata.message_type == "train":
                self.uplink_bytes += sum(P.content_bytes(r.content) for r in replies if not r.has_error())
            return replies

    return CountingGrid(cfg)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--codecs", nargs="+", default=["dense", "countsketch"], choices=["dense", "countsketch"])
    parser.add_argument("--ratio", type=float, default=0.1, help="CountSketch payload floats / d (all rows together)")
    parser.add_argument("--rows", type=int, default=1, help="CountSketch rows")
    parser.add_argument("--clip", type=float, default=0.5, help="C (the median round-1 update norm is ~0.76)")
    parser.add_argument("--fraction", type=float, default=1.0, help="federation.fraction_train (= q for poisson)")
    parser.add_argument("--sampling", default="none", choices=["poisson", "fixed", "none"])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--attack", default="ig", choices=["ig", "dlg"])
    parser.add_argument("--attack-inputs", type=int, default=4)
    parser.add_argument("--attack-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--attack-iterations", type=int, default=200)
    parser.add_argument("--attack-curve", type=float, nargs="*", default=[0.001, 0.003, 0.01, 0.03],
                        help="extra noise multipliers for the attack alone (where leakage stops); none to skip")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_table.json"))
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep run directories here (default: temporary)")
    args = parser.parse_args(argv)
    if args.rounds > 30:
        parser.error("--rounds is capped at 30 to keep the table CPU-cheap")
    torch.set_num_threads(1)

    from stamen.config import load
    from stamen.server.loop import run_federation

    runs_root = args.runs_dir or Path(tempfile.mkdtemp(prefix="stamen-privacy-table-"))
    rows = []
    for codec in args.codecs:
        for z in args.noise:
            cfg = load(DEFAULT_CONFIG, run_config(codec, z, args))
            t0 = time.perf_counter()
            grid = counting_grid(cfg)
            summary = run_federation(grid, cfg, runs_root / f"{codec}-z{z:g}")
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            attack = leakage(cfg, codec, z, args)
            row = {"codec": codec, "noise_multiplier": z, "clip": args.clip,
                   "final_test_accuracy": summary["final_test_accuracy"],
                   "epsilon": summary.get("epsilon"), "delta": summary.get("delta"), "rounds": summary["rounds"],
                   "total_uplink_bytes": grid.uplink_bytes, "loop_total_uplink_bytes": summary["total_uplink_bytes"],
                   "attack": args.attack,
                   "attack_psnr": attack["psnr"], "attack_psnr_std": attack["psnr_std"],
                   "attack_label_accuracy": attack["label_accuracy"], "train_s": train_s,
                   "attack_s": time.perf_counter() - t0, "privacy": summary.get("privacy")}
            rows.append(row)
            eps = "∞" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
            print(f"{codec:12s} z={z:<4g} acc={row['final_test_accuracy']:.4f} eps={eps} "
                  f"uplink={row['total_uplink_bytes']} psnr={row['attack_psnr']:.1f} "
                  f"({train_s:.0f}+{row['attack_s']:.0f} s)", flush=True)

    curve = []
    for codec in args.codecs:  # the attack alone at small z: where does the leakage stop?
        cfg = load(DEFAULT_CONFIG, run_config(codec, 0.0, args))
        for z in args.attack_curve:
            report = leakage(cfg, codec, z, args)
            curve.append({"codec": codec, "noise_multiplier": z, "attack_psnr": report["psnr"],
                          "attack_psnr_std": report["psnr_std"], "attack_label_accuracy": report["label_accuracy"]})
            print(f"attack only: {codec:12s} z={z:<6g} psnr={report['psnr']:.1f}", flush=True)

    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print()
    print(markdown(rows, args))
    if curve:
        print()
        print(curve_markdown(rows, curve, args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "rows": rows, "attack_curve": curve}, indent=2) + "\n")
    print(f"\nJSON → {args.out}")
    return {"setup": setup, "rows": rows, "attack_curve": curve}


def curve_markdown(rows: list[dict], curve: list[dict], args) -> str:
    """Attack PSNR against z for both codecs (training rows and attack-only points together)."""
    points = {(r["codec"], r["noise_multiplier"]): r["attack_psnr"] for r in [*rows, *curve]}
    zs = sorted({z for _, z in points})
    lines = [f"{args.attack.upper()} PSNR (dB) of one client's single-example update against z "
             f"(noise std z·C on what the client sends):", "",
             "| codec | " + " | ".join(f"z={z:g}" for z in zs) + " |", "|---|" + "---:|" * len(zs)]
    for codec in args.codecs:
        cells = [f"{points[(codec, z)]:.1f}" if (codec, z) in points else "" for z in zs]
        lines.append(f"| {codec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict], args) -> str:
    sketch = f"countsketch ({args.rows} row{'s' if args.rows > 1 else ''}, {args.ratio:g}·d floats)"
    lines = [f"digits, {args.clients} clients, Dirichlet {args.alpha}, {args.rounds} rounds, C = {args.clip}, "
             f"sampling {args.sampling} (q = {args.fraction}), δ = {args.delta:g}, attack {args.attack.upper()} "
             f"on one single-example update ({args.attack_inputs} inputs × {len(args.attack_seeds)} seeds)", "",
             "| codec | z | final accuracy | ε (δ=1e-5) | total uplink | attack PSNR (dB) | label acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        name = "dense" if r["codec"] == "dense" else sketch
        lines.append(f"| {name} | {r['noise_multiplier']:g} | {r['final_test_accuracy']:.3f} | {eps} | "
                     f"{_mib(r['total_uplink_bytes'])} | {r['attack_psnr']:.1f} ± {r['attack_psnr_std']:.1f} | "
                     f"{r['attack_label_accuracy']:.2f} |")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


if __name__ == "__main__":
    main()
