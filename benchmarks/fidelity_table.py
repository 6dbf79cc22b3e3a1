"""Summarise a method-fidelity sweep (``studies/fidelity_*.toml``) as a markdown table, mean ± sd over seeds.

    STAMEN_VECTORISE=0 stamen sweep studies/fidelity_ferret.toml --engine inprocess --out sweeps/fidelity_ferret
    python -m stamen.benchmarks.fidelity_table sweeps/fidelity_ferret

One row per point of the study (every column of ``results.csv`` that varies between points names it),
with the seeds it ran, final test accuracy and final test loss (from each run's ``metrics.jsonl``),
best test accuracy, and total uplink bytes (the mean over seeds, in MB). The standard deviation is
the sample one (n − 1), over the seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

FIXED = {"point_id", "seed", "run.seed", "final_test_accuracy", "best_test_accuracy", "total_uplink_bytes",
         "total_downlink_bytes", "rounds", "wall_s", "run_dir"}


def mean_sd(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def final_loss(run_dir: Path) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r.get("test_loss") for r in rows if r.get("test_loss") is not None]
    return float(losses[-1]) if losses else None


def table(study: Path) -> str:
    rows = list(csv.DictReader(open(study / "results.csv")))
    varying = [k for k in rows[0] if k not in FIXED and len({r[k] for r in rows}) > 1]
    points: dict[tuple, list[dict]] = {}
    for r in rows:  # a point = its settings (point ids also name the seed)
        points.setdefault((tuple(r[k] for k in varying), r["rounds"]), []).append(r)
    out = ["| point | rounds | seeds | final acc | best acc | final test loss | uplink MB |",
           "|---|---|---|---|---|---|---|"]
    for runs in points.values():
        label = ", ".join(f"{k}={runs[0][k]}" for k in varying if runs[0][k] != "") or "base config"
        acc = [float(r["final_test_accuracy"]) for r in runs]
        best = [float(r["best_test_accuracy"]) for r in runs]
        loss = [x for x in (final_loss(study / r["run_dir"]) for r in runs) if x is not None]
        up = statistics.mean(float(r["total_uplink_bytes"]) for r in runs) / 1e6
        out.append(f"| {label} | {runs[0]['rounds']} | {len(runs)} | {mean_sd(acc)} | {mean_sd(best)} | "
                   f"{mean_sd(loss)} | {up:.2f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", type=Path, nargs="+", help="sweep output directories (with results.csv)")
    args = ap.parse_args(argv)
    for study in args.studies:
        print(f"## {study.name}\n\n{table(study)}\n")


if __name__ == "__main__":
    main()
