"""Secure aggregation's costs: codec × SecAgg × DP site, and the cohort sweep.

    python -m stamen.benchmarks.secagg_costs --part table  --rounds 10 --seeds 0 1 2 --out secagg_table.json
    python -m stamen.benchmarks.secagg_costs --part cohort --rounds 3 --out secagg_cohort.json
    python -m stamen.benchmarks.secagg_costs --show secagg_table.json

**Table.** The default digits job (20 clients, Dirichlet 0.5, MLP, every client every round) for
each uplink codec (dense; SRHT and sparse JL sketches at ratio 0.25 — linear codecs; the dense
Gaussian sketch is linear too but regenerates a 2,402 × 9,610 matrix per client and round, ≈ 6 s a
round here, whatever SecAgg does) with and
without secure aggregation (``secagg.enabled``), without DP, with central DP (the server adds
Gaussian noise, z = 1, C = 1) and with distributed DP (``privacy.site = "distributed"``: each
client adds discrete Gaussian shares before masking, the same z and C). Every client every round
and ``privacy.sampling = "none"`` so that the ε columns compare the noise alone (no sampling
credit). Without DP, secure aggregation clips at ``secagg.clip = 10`` (the field must bound every
payload). Reported per point (mean ± sd over
seeds): final accuracy, ε at δ = 1e-5, uplink bytes per client per round (the payload the server
receives: masked field elements under SecAgg), the protocol's own bytes and messages per round
(keys, shares, unmasking), median round time.

**Cohort.** Dense FedAvg on digits with 10, 50 and 100 clients, all in every round, with and
without SecAgg (complete graph and a k = 8-regular one): the same columns, one seed. The
protocol is O(n·k) messages and shares per round; the complete graph is k = n − 1.

The in-process engine (the same server loop, client code and bytes as a Ray simulation or a
deployment; run times exclude Ray). Secure aggregation averages uniformly (the server cannot
weight what it cannot see), so its "without SecAgg" baseline is FedAvg weighted by examples:
the accuracy difference includes that change of weighting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "stamen" / "configs" / "default.toml"

CODECS = {"dense": [], "srht": ["compression.codec='srht'", "compression.ratio=0.25"],
          "sparsejl": ["compression.codec='sparsejl'", "compression.ratio=0.25"]}
DP = {"none": [],
      "central": ["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.sampling='none'",
                  "privacy.site='central'"],
      "distributed": ["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.sampling='none'",
                      "privacy.site='distributed'"]}


def run_point(overrides: list[str]) -> dict:
    from stamen.api import run_experiment

    with tempfile.TemporaryDirectory(prefix="secagg-costs-") as out:
        start = time.perf_counter()
        result = run_experiment(DEFAULT_CONFIG, ["eval.every=1", *overrides], out, engine="inprocess")
        elapsed = time.perf_counter() - start
    rows, summary = result.rows, result.summary
    if summary.get("failed"):
        raise RuntimeError(f"run failed: {overrides}: {summary.get('failure')}")
    uplink = [r["uplink_bytes"] / max(1, r["clients"]) for r in rows]
    return {"accuracy": rows[-1].get("test_accuracy"), "epsilon": rows[-1].get("epsilon"),
            "uplink_per_client": statistics.mean(uplink),
            "protocol_bytes": statistics.mean(r.get("secagg_protocol_bytes", 0) for r in rows),
            "protocol_messages": statistics.mean(r.get("secagg_protocol_messages", 0) for r in rows),
            "field_bits": rows[-1].get("secagg_bits"), "round_s": statistics.median(r["wall_s"] for r in rows),
            "run_s": elapsed}


def table(rounds: int, seeds: list[int]) -> list[dict]:
    points = []
    for codec, codec_over in CODECS.items():
        for dp, dp_over in DP.items():
            for secagg in (False, True):
                if dp == "distributed" and not secagg:
                    continue  # distributed DP is defined under secure aggregation only
                over = [f"run.rounds={rounds}", *codec_over, *dp_over]
                if secagg:
                    over += ["secagg.enabled=true"] + (["secagg.clip=10.0"] if dp == "none" else [])
                runs = []
                for seed in seeds:
                    runs.append(run_point(over + [f"run.seed={seed}"]))
                    print(f"{codec:8s} secagg={secagg!s:5s} dp={dp:11s} seed {seed}: "
                          f"acc {runs[-1]['accuracy']:.4f} round {runs[-1]['round_s']:.3f} s", flush=True)
                points.append({"codec": codec, "secagg": secagg, "dp": dp, "overrides": over, "runs": runs})
    return points


def cohort(rounds: int, sizes: list[int], seed: int = 0) -> list[dict]:
    points = []
    for n in sizes:
        for secagg, degree in ((False, None), (True, 0), (True, 8)):
            if secagg and degree and degree >= n - 1:
                continue
            over = [f"run.rounds={rounds}", f"federation.clients={n}", f"run.seed={seed}"]
            if secagg:
                over += ["secagg.enabled=true", "secagg.clip=10.0", f"secagg.degree={degree}"]
            r = run_point(over)
            print(f"n={n:4d} secagg={secagg!s:5s} degree={degree}: round {r['round_s']:.3f} s, "
                  f"protocol {r['protocol_bytes'] / 1e3:.0f} kB / {r['protocol_messages']:.0f} msgs", flush=True)
            points.append({"clients": n, "secagg": secagg, "degree": degree, "overrides": over, "runs": [r]})
    return points


def _ms(values, fmt="{:.4f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def render(data: dict) -> str:
    out = []
    if data.get("table"):
        out += ["| codec | SecAgg | DP | accuracy | ε (δ=1e-5) | uplink B/client/round | protocol B/round | "
                "protocol msgs/round | field bits | round s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for p in data["table"]:
            rs = p["runs"]
            out.append(f"| {p['codec']} | {'yes' if p['secagg'] else 'no'} | {p['dp']} | "
                       f"{_ms([r['accuracy'] for r in rs])} | {_ms([r['epsilon'] for r in rs], '{:.2f}')} | "
                       f"{statistics.mean(r['uplink_per_client'] for r in rs):,.0f} | "
                       f"{statistics.mean(r['protocol_bytes'] for r in rs):,.0f} | "
                       f"{statistics.mean(r['protocol_messages'] for r in rs):.0f} | "
                       f"{rs[0]['field_bits'] or '—'} | {statistics.median(r['round_s'] for r in rs):.3f} |")
    if data.get("cohort"):
        out += ["", "| clients | SecAgg | degree | accuracy | uplink B/client/round | protocol B/round | "
                "protocol B/client/round | protocol msgs/round | round s |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for p in data["cohort"]:
            r = p["runs"][0]
            deg = "—" if p["degree"] is None else ("n−1" if p["degree"] == 0 else str(p["degree"]))
            out.append(f"| {p['clients']} | {'yes' if p['secagg'] else 'no'} | {deg} | {r['accuracy']:.4f} | "
                       f"{r['uplink_per_client']:,.0f} | {r['protocol_bytes']:,.0f} | "
                       f"{r['protocol_bytes'] / p['clients']:,.0f} | {r['protocol_messages']:.0f} | {r['round_s']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["table", "cohort", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--out", type=Path, default=None, help="write the raw results as JSON")
    ap.add_argument("--show", type=Path, default=None, help="print the tables of a JSON written by --out")
    args = ap.parse_args(argv)
    if args.show:
        print(render(json.loads(args.show.read_text())))
        return
    data = {}
    if args.part in ("table", "both"):
        data["table"] = table(args.rounds, args.seeds)
    if args.part in ("cohort", "both"):
        data["cohort"] = cohort(args.rounds if args.part == "cohort" else 3, args.sizes)
    if args.out:
        args.out.write_text(json.dumps(data, indent=1))
    print(render(data))


if __name__ == "__main__":
    main()
