"""The vectorised cohort against the per-client loop and the throughput baselines, paired, in one run.

    python -m stamen.benchmarks.cohort_throughput --sizes 100,1000,10000,1000000 --out cohort.json

The workload is ``sim_throughput``'s (FedProx Synthetic(1,1), MLP 60-64-10, 10 % of the clients
per round, 1 epoch of SGD, batch 10, lr 0.05, central evaluation every round); every system runs
in a fresh process tree, one after the other, interleaved per repeat, with the same process-tree
memory sampling (``sim_throughput.TreeMonitor``). Systems:

- ``bare``: the bare PyTorch loop, one process, one core (the floor; ``sim_throughput``'s);
- ``stamen`` / ``stamen-loop``: ``stamen.experiment.simulate`` on Ray (2 actors, carriers), each
  carrier's clients trained as one vectorised computation / one by one (``STAMEN_VECTORISE=0``);
- ``inprocess`` / ``inprocess-loop``: the same server loop and client pipeline on the in-process
  grid, vectorised (the whole cohort in one stack) / one by one, one process;
- ``flower``, ``pfl``, ``pfl2``: ``sim_throughput``'s other baselines (``--baselines``).

Up to ``--ondemand-from`` clients (default 100,000) the data are ``sim_throughput``'s workload file
(the sequential generator, as in RESULTS.md's throughput table); from there on the federation is
too large to generate and hold, and every system uses ``task.dataset = synthetic_ondemand``
(clients made from the seed when they train; ``bare-ondemand`` is then the floor), a cohort of
``--big-cohort`` clients per round (100: the cohort of N = 1000), ``--big-rounds`` rounds, the server's discovery in one call (``--fast-discovery``, see ``_cohort_workers``) and no
Ray system (its start-up queries every virtual node).

The table gives per system the start-up (process start to the end of round 1), the median round
over rounds 2..R and its ratio to the floor, the peak summed RSS of the process tree, and the paired
ratios vectorised / loop from the same invocation. Timing on a shared machine is noisy: compare
within one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stamen.benchmarks import sim_throughput as S

HERE = Path(__file__).resolve().parent
STAMEN_SYSTEMS = ("stamen", "stamen-loop", "inprocess", "inprocess-loop")
BASELINES = ("flower", "pfl", "pfl2")
SYSTEMS = ("bare", "bare-ondemand", *STAMEN_SYSTEMS, *BASELINES)
LABELS = {"bare": "bare PyTorch loop (1 proc)", "bare-ondemand": "bare PyTorch loop, on-demand data (1 proc)",
          "stamen": "Stamen on Ray, vectorised", "stamen-loop": "Stamen on Ray, per-client loop",
          "inprocess": "Stamen in-process, vectorised", "inprocess-loop": "Stamen in-process, per-client loop",
          "flower": "Flower 1.39 on Ray (2 actors)", "pfl": "pfl 0.6 (1 proc)", "pfl2": "pfl 0.6 (2 workers)"}
PAIRS = (("stamen", "stamen-loop"), ("inprocess", "inprocess-loop"))


def ondemand_overrides(clients: int, rounds: int, seed: int, cohort: int = 100) -> list[str]:
    """The workload on on-demand data, with a cohort of ``cohort`` clients per round (as at N = 1000)."""
    out = []
    for o in S.stamen_overrides(clients, rounds, seed):
        if o.startswith("task.dataset="):
            o = "task.dataset=synthetic_ondemand"
        elif o.startswith("federation.fraction_train="):
            o = f"federation.fraction_train={cohort / clients!r}"
        out.append(o)
    return out


def command(system: str, overrides: list[str], workload: Path | None, report: Path, rounds: int,
            pfl_py: str | None, fast_discovery: bool) -> list[str]:
    if system in ("bare", *BASELINES):
        return S.command(system, workload, report, rounds, pfl_py)
    cmd = [sys.executable, "-m", "stamen.benchmarks._cohort_workers", system, "--overrides", json.dumps(overrides),
           "--report", str(report), "--rounds", str(rounds)]
    if workload is not None:
        cmd += ["--workload", str(workload)]
    if fast_discovery:
        cmd.append("--fast-discovery")
    return cmd


def run_once(system: str, clients: int, cmd: list[str], rounds: int, work: Path, tag: str,
             timeout_s: float) -> dict[str, Any]:
    """``sim_throughput.run_once`` with this benchmark's command and environment."""
    report, log = work / f"{tag}.jsonl", work / f"{tag}.log"
    report.unlink(missing_ok=True)
    cmd = [*cmd[:cmd.index("--report") + 1], str(report), *cmd[cmd.index("--report") + 2:]]
    env = S.child_env()
    env["STAMEN_VECTORISE"] = "0" if system.endswith("-loop") else "1"
    with open(log, "w") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=str(HERE.parent))
        mon = S.TreeMonitor(proc.pid)
        mon.start()
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f} s"
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        t_exit = time.time()
        leftover = S._end_tree(proc.pid)
        mon.stop.set()
        mon.join()
    events = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    rounds_ev = [e for e in events if e["event"] == "round"]
    if status == "ok" and len(rounds_ev) != rounds:
        status = f"failed ({len(rounds_ev)} of {rounds} rounds reported)"
    ready = next((e["t"] for e in events if e["event"] == "ready"), None)
    res: dict[str, Any] = {
        "system": system, "clients": clients, "rounds": rounds, "status": status, "command": shlex.join(cmd),
        "vectorise_env": env["STAMEN_VECTORISE"], "ready_s": None if ready is None else ready - t0,
        "total_s": t_exit - t0, "peak_rss_mib": mon.peak_rss_kib / 1024, "peak_pss_mib": mon.peak_pss_kib / 1024,
        "peak_processes": mon.peak_procs, "leftover_processes_ended": leftover,
        "round_end_s": [e["t"] - t0 for e in rounds_ev], "round_clients": [e["clients"] for e in rounds_ev],
        "round_samples": [e["samples"] for e in rounds_ev],
        "round_test_accuracy": [e["test_accuracy"] for e in rounds_ev],
        "round_test_loss": [e["test_loss"] for e in rounds_ev]}
    if status != "ok":
        res["log_tail"] = log.read_text(errors="replace")[-3000:]
    res.update(S.derived_metrics(res))
    return res


METRICS = ("startup_s", "median_round_s", "updates_per_s", "final_test_accuracy", "peak_rss_mib", "peak_pss_mib",
           "peak_processes")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The throughput benchmark's summary (medians, × the bare loop), plus vectorised ÷ loop per pair."""
    rows = S.summarize(runs, SYSTEMS, METRICS, floors=("bare", "bare-ondemand"))
    for n in sorted({r["clients"] for r in rows}):
        mine = {r["system"]: r for r in rows if r["clients"] == n}
        for vec, loop in PAIRS:
            if vec in mine and loop in mine and mine[vec]["median_round_s"] and mine[loop]["median_round_s"]:
                mine[vec]["round_vs_loop"] = mine[vec]["median_round_s"] / mine[loop]["median_round_s"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = ["| N | system | procs | start-up s | median round s | × bare | vectorised ÷ loop | updates/s "
             "| final acc | peak RSS MiB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = LABELS[r["system"]] + (f", {r['rounds']} rounds" if r.get("capped") else "")
        if r["ok_runs"] == 0:
            lines.append(f"| {r['clients']} | {name} | {r.get('status', '')} |" + " |" * 7)
            continue
        lines.append(
            f"| {r['clients']} | {name} | {f(r['peak_processes'], 'd')} | {f(r['startup_s'], '.1f')} "
            f"| {f(r['median_round_s'], '.3f')} | {f(r['round_vs_bare'], '.2f')} | {f(r.get('round_vs_loop'), '.2f')} "
            f"| {f(r['updates_per_s'], '.0f')} | {f(r['final_test_accuracy'], '.4f')} | {f(r['peak_rss_mib'], '.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000", help="client counts N, comma-separated (1e6 allowed)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--big-rounds", type=int, default=5, help="rounds for N >= --ondemand-from")
    ap.add_argument("--ondemand-from", type=float, default=1e5)
    ap.add_argument("--big-cohort", type=int, default=100, help="clients per round for N >= --ondemand-from")
    ap.add_argument("--systems", default="bare,bare-ondemand," + ",".join(STAMEN_SYSTEMS))
    ap.add_argument("--baselines", default="", help=f"any of {','.join(BASELINES)} (from sim_throughput)")
    ap.add_argument("--skip", action="append", default=[], metavar="SYSTEM@N")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=Path("cohort_throughput.json"))
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--pfl-venv", type=Path, default=S.default_pfl_venv())
    ap.add_argument("--show", type=Path, default=None, metavar="JSON", help="print the table of a saved run")
    args = ap.parse_args(argv)
    if args.show:
        results = json.loads(args.show.read_text())
        print(f"$ {results['command']}\n")
        print(table(summarize(results["runs"])))
        return 0
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    systems = [s for s in (args.systems + "," + args.baselines).split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not sizes or args.rounds < 2 or args.big_rounds < 2:
        ap.error(f"need sizes, rounds >= 2 and systems from {SYSTEMS} (unknown: {unknown})")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="cohort-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    pfl_py, skipped = None, {}
    if {"pfl", "pfl2"} & set(systems):
        pfl_py, note = S.pfl_python(args.pfl_venv, work / "pfl-venv.log")
        if pfl_py is None:
            systems = [s for s in systems if s not in ("pfl", "pfl2")]
            skipped["pfl"] = note
    results: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "-m", "stamen.benchmarks.cohort_throughput",
                               *(argv if argv is not None else sys.argv[1:])]),
        "environment": S.environment(None), "settings": vars(args) | {"systems": systems, "skipped": skipped},
        "workloads": {}, "runs": []}
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in results["settings"].items()}

    def save() -> None:
        results["summary"] = summarize(results["runs"])
        results["environment"]["loadavg_at_end"] = os.getloadavg()
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(args.out)

    try:
        for n in sizes:
            big = n >= args.ondemand_from
            rounds = args.big_rounds if big else args.rounds
            wpath = None
            if big:
                overrides = ondemand_overrides(n, rounds, args.seed, args.big_cohort)
                mine = [s for s in systems if s in ("bare-ondemand", "inprocess", "inprocess-loop")]
                for s in systems:
                    if s not in mine:
                        results["settings"]["skipped"][f"{s}@{n}"] = "not run on on-demand data"
            else:
                wpath = work / f"workload-{n}.npz"
                results["workloads"][str(n)] = S.make_workload(wpath, n, rounds, args.seed)
                overrides = S.stamen_overrides(n, rounds, args.seed)
                mine = [s for s in systems if s != "bare-ondemand"]
            for rep in range(args.repeats):
                for system in mine:
                    if f"{system}@{n}" in args.skip:
                        continue
                    cmd = command(system, overrides, wpath, work / "report.jsonl", rounds, pfl_py, big)
                    res = run_once(system, n, cmd, rounds, work, f"{system}-{n}-{rep}", args.timeout)
                    res["repeat"] = rep
                    results["runs"].append(res)
                    save()
                    mr = res["median_round_s"]
                    print(f"  {system:>14} N={n} #{rep}: {res['status']}, start-up {res['startup_s'] or 0:.1f} s, "
                          f"median round {mr if mr is not None else float('nan'):.3f} s, "
                          f"acc {res['final_test_accuracy'] or float('nan'):.4f}, "
                          f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
            if wpath is not None:
                wpath.unlink()
    finally:
        save()
        if args.work_dir is None and all(r["status"] == "ok" for r in results["runs"]):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}")
    print(f"\n$ {results['command']}\n")
    print(table(results["summary"]))
    print(f"\n{args.out}")
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
