"""Noise-multiplier calibration (``privacy.target_epsilon``): wall time and peak memory per accountant.

    python -m stamen.benchmarks.privacy_calibration                       # 24 calibrations, ~5 min on 2 busy cores
    python -m stamen.benchmarks.privacy_calibration --rounds 1000 --accountants pld --out cal.json

For every accountant (RDP, PLD), sampling rate q, round count T and target ε it runs
``calibrate_noise_multiplier(ε, T, δ, accountant, "poisson", q)`` once and reports:

* ``z``: the calibrated noise multiplier, and ``ε(z)``, what ``Accountant`` then reports after
  T rounds (≤ the target by the function's contract);
* ``time``: wall time of the calibration alone (imports excluded);
* ``peak``: the peak resident memory of a fresh process that imports Stamen and calibrates once
  (the kernel's ``VmHWM``, interpreter and libraries included); ``base`` is the resident size
  after the imports, so ``peak - base`` is what the calibration held at most.

Each calibration runs in its own child process (this module with a hidden ``--child`` flag), so
one row's PLD buffers cannot hide in another row's peak, and a row that blew up would fail alone.
The goal the table is checked against: PLD within 2 GB and 60 s for 1,000 rounds. Times depend
on the machine and its load; memory does not, much.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def _status_kib() -> dict[str, int]:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux); empty elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return {line.split(":")[0]: int(line.split()[1]) for line in f
                    if line.startswith(("VmRSS:", "VmHWM:"))}
    except OSError:
        return {}


def calibrate_once(accountant: str, q: float, rounds: int, target: float, delta: float) -> dict:
    """Child mode: one calibration in this (fresh) process, timed and measured."""
    from stamen.privacy.accounting import Accountant, calibrate_noise_multiplier

    base = _status_kib().get("VmRSS")
    start = time.perf_counter()
    z = calibrate_noise_multiplier(target, rounds, delta, accountant, "poisson", sampling_probability=q)
    seconds = time.perf_counter() - start
    peak = _status_kib().get("VmHWM")
    if peak is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS; only a fallback)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    epsilon = Accountant(z, delta, accountant, "poisson", sampling_probability=q).epsilon_after(rounds)
    return {"accountant": accountant, "q": q, "rounds": rounds, "target_epsilon": target, "delta": delta,
            "noise_multiplier": z, "epsilon": epsilon, "seconds": seconds, "base_kib": base, "peak_kib": peak}


def run_in_child(accountant: str, q: float, rounds: int, target: float, delta: float) -> dict:
    cmd = [sys.executable, "-m", "stamen.benchmarks.privacy_calibration", "--child",
           json.dumps([accountant, q, rounds, target, delta])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"accountant": accountant, "q": q, "rounds": rounds, "target_epsilon": target, "delta": delta,
                "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- output ----------------------------------------------------------------------------------
HEADER = (f"| {'accountant':<10} | {'q':>5} | {'T':>5} | {'target ε':>8} | {'z':>8} | {'ε(z)':>7} | "
          f"{'time (s)':>8} | {'peak (MiB)':>10} | {'base (MiB)':>10} |")
RULE = "|" + "|".join("-" * (len(cell) - 1) + ":" if i else "-" * len(cell)
                      for i, cell in enumerate(HEADER.strip("|").split("|"))) + "|"


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f}"


def format_row(row: dict) -> str:
    head = f"| {row['accountant']:<10} | {row['q']:>5g} | {row['rounds']:>5} | {row['target_epsilon']:>8g} |"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    return (f"{head} {row['noise_multiplier']:>8.4f} | {row['epsilon']:>7.5f} | {row['seconds']:>8.2f} | "
            f"{_mib(row['peak_kib']):>10} | {_mib(row['base_kib']):>10} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accountants", nargs="+", default=["rdp", "pld"], choices=["rdp", "pld"])
    parser.add_argument("--q", type=float, nargs="+", default=[0.1, 0.01], help="Poisson sampling rates")
    parser.add_argument("--rounds", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: one calibration, JSON out
    args = parser.parse_args(argv)
    if args.child:
        row = calibrate_once(*json.loads(args.child))
        print(json.dumps(row))
        return row

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"Poisson sampling, δ = {args.delta:g}; one fresh process per row")
    print(HEADER)
    print(RULE)
    rows = []
    for accountant in args.accountants:
        for q in args.q:
            for rounds in args.rounds:
                for target in args.targets:
                    row = run_in_child(accountant, q, rounds, target, args.delta)
                    rows.append(row)
                    print(format_row(row), flush=True)
    results = {"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.out)  # nothing half-written
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
