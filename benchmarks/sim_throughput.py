"""Simulation throughput: one FL workload run by a bare PyTorch loop, vanilla Flower, Stamen and pfl.

    python -m stamen.benchmarks.sim_throughput --sizes 100,1000,10000 --rounds 20 --repeats 3 --out sim.json

The workload: FedProx's Synthetic(1,1) with N clients (sizes ⌊lognormal(4, 2)⌋ + 50, at most
500 samples; each client's samples shuffled once and its last 10 % pooled into the test set),
generated once per N by Stamen's own generator (``task.dataset = "synthetic"``), an MLP
60-64-10 with Stamen's deterministic initial weights, FedAvg with 10 % of the clients per
round, 1 local epoch of plain SGD (batch 10, lr 0.05), central evaluation of the global model on
the pooled test set after every round, ``--rounds`` rounds. The same arrays and initial weights
go to every system, which runs in a fresh process (tree) of its own:

- ``bare``: a plain PyTorch loop, one process, one core: the floor;
- ``flower``: vanilla Flower 1.39 (Message-API ClientApp/ServerApp, ``FedAvg.start``,
  ``run_simulation`` on Ray, ``num_cpus=1`` per client: 2 actors on 2 cores);
- ``stamen``: ``stamen.experiment.simulate`` (Ray, ``federation.client_cpus = 1``);
- ``pfl`` / ``pfl2``: Apple's pfl 0.6 in one process / two workers under ``torchrun``, from a
  side virtualenv (``--pfl-venv``, created on first use with ``pfl==0.6.0 torch==2.13.0``;
  if that fails, pfl is skipped and the reason recorded).

Bare, Stamen and pfl train the same clients each round (Stamen's seeded sampling) on the same
batches, so their accuracies agree up to float rounding; vanilla Flower's FedAvg samples its own
clients (seeded ``random``), so its accuracy agrees only statistically. Every process uses one
torch thread (``OMP_NUM_THREADS=1``).

Per system and N (medians over ``--repeats`` runs): start-up (process start to the end of round
1, imports, data and Ray start-up included), the median round time over rounds 2..R and its
ratio to ``bare``'s, client updates and training samples per second over rounds 2..R, the final
test accuracy, the peak summed RSS and PSS of the whole process tree (every process in the run's
session or below it: Ray's GCS, raylet and workers included; RSS sampled from /proc every 0.25 s,
PSS every 1 s, so short peaks can be missed; summed RSS counts shared pages once per process,
PSS splits them) and the most processes alive at once. Wall times on a shared
machine are noisy: compare systems within one invocation (runs are interleaved), not across.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from stamen.benchmarks import _sim_workload as W

HERE = Path(__file__).resolve().parent
SYSTEMS = ("bare", "flower", "stamen", "pfl", "pfl2")
PFL_PINS = ("pfl==0.6.0", "torch==2.13.0")
SAMPLE_EVERY_S = 0.25
PSS_EVERY = 4  # samples


# ------------------------------------------------------------------------- workload ----
def stamen_overrides(clients: int, rounds: int, seed: int) -> list[str]:
    """The Stamen config of the workload (``stamen run --set`` items)."""
    return ["task.dataset=synthetic", "task.partition=natural", "task.synthetic_alpha=1.0",
            "task.synthetic_beta=1.0", "task.max_client_samples=500", "task.model=mlp", "task.hidden=64",
            "task.local_epochs=1", "task.batch_size=10", "task.lr=0.05", "task.optimizer=sgd",
            f"federation.clients={clients}", "federation.fraction_train=0.1", "federation.client_cpus=1",
            "eval.every=1", f"run.seed={seed}", f"run.rounds={rounds}", "run.device=cpu", "run.name=sim-throughput"]


def make_workload(path: Path, clients: int, rounds: int, seed: int) -> dict[str, Any]:
    """Generate the data with Stamen's task code and write the workload file; return its description."""
    from stamen.config import load
    from stamen.tasks.task import load_task

    overrides = stamen_overrides(clients, rounds, seed)
    cfg = load(None, overrides)
    task = load_task(cfg.task, clients, seed)
    data = task.data
    meta = {"seed": seed, "fraction": cfg.federation.fraction_train, "lr": cfg.task.lr,
            "batch_size": cfg.task.batch_size, "hidden": cfg.task.hidden, "inputs": data.input_shape[0],
            "classes": data.num_classes, "dataset": data.name, "stamen_overrides": overrides}
    W.save_workload(str(path), data.clients, data.test, task.initial_weights(), meta)
    sizes = [len(y) for _, y in data.clients]
    per_round = [sum(sizes[p] for p in W.cohort(seed, r, clients, meta["fraction"])) for r in range(1, rounds + 1)]
    return {"clients": clients, "dataset": data.name, "train_samples": sum(sizes), "test_samples": len(data.test[1]),
            "client_train_samples": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes),
                                     "mean": sum(sizes) / len(sizes)},
            "clients_per_round": W.cohort_size(meta["fraction"], clients),
            "train_samples_per_round_mean": sum(per_round) / len(per_round),
            "parameters": sum(int(v.size) for v in task.initial_weights().values()),
            "file_bytes": path.stat().st_size}


# ------------------------------------------------------------------------ pfl venv ----
def default_pfl_venv() -> Path:
    """Beside Stamen's other caches: ``$STAMEN_CACHE_DIR`` or ``~/.cache/stamen``."""
    return Path(os.environ.get("STAMEN_CACHE_DIR") or Path.home() / ".cache" / "stamen") / "pfl-0.6.0-venv"


def pfl_python(venv: Path, log: Path) -> tuple[str | None, str]:
    """The Python of a virtualenv with pfl 0.6.0 (created if missing), or None and why not."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import pfl, torch; from pfl.model.pytorch import PyTorchModel; "
             "import importlib.metadata as m; print(m.version('pfl'), torch.__version__)"]

    def works() -> str | None:
        if not py.exists():
            return None
        r = subprocess.run(probe, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.startswith("0.6.0 ") else None

    if works():
        return str(py), f"pfl/torch {works()} in {venv}"
    print(f"creating the pfl virtualenv {venv} ({' '.join(PFL_PINS)}) …", flush=True)
    with open(log, "a") as f:
        steps = [[sys.executable, "-m", "venv", str(venv)], [str(venv / "bin" / "pip"), "install", *PFL_PINS]]
        for step in steps:
            r = subprocess.run(step, stdout=f, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                return None, f"`{' '.join(step)}` failed (exit {r.returncode}); see {log}"
    version = works()
    if not version:
        return None, f"pfl installed in {venv} but `import pfl` fails; see {log}"
    return str(py), f"pfl/torch {version} in {venv}"


# --------------------------------------------------------------- process-tree memory ----
def _proc_table() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, session id)} of every process (Linux /proc)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(name)] = (int(fields[1]), int(fields[3]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def tree_pids(root: int) -> set[int]:
    """``root``, everything below it, and everything in its session (Ray daemons included)."""
    table = _proc_table()
    pids = {p for p, (_, sid) in table.items() if sid == root}
    children: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        children.setdefault(pp, []).append(p)
    stack = [root]
    while stack:
        p = stack.pop()
        if p in table:
            pids.add(p)
        stack.extend(children.get(p, []))
    return pids


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMonitor(threading.Thread):
    """Samples the summed RSS / PSS and the number of processes of a process tree."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.stop = root, threading.Event()
        self.peak_rss_kib = self.peak_pss_kib = self.peak_procs = 0
        self.seen: set[int] = set()
        self.cpu_s = 0.0  # the sampler's own CPU time (it shares the machine with the run)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            pids = tree_pids(self.root)
            self.seen |= pids
            rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            if i % PSS_EVERY == 0:  # smaps_rollup walks the page tables: costlier, read less often
                pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
                self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.cpu_s = time.thread_time()
            i += 1
            self.stop.wait(SAMPLE_EVERY_S)


def _end_tree(root: int, grace_s: float = 10.0) -> list[int]:
    """Wait up to ``grace_s`` for the run's processes to exit, then end the rest by id; return those."""
    deadline = time.monotonic() + grace_s
    while (left := tree_pids(root) - {os.getpid()}) and time.monotonic() < deadline:
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in sorted(left):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
        left = tree_pids(root) - {os.getpid()}
        if not left:
            break
    return sorted(left)


# ----------------------------------------------------------------------- one run ----
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.pop("RAY_ADDRESS", None)  # each Ray run starts its own local cluster
    return env


def command(system: str, workload: Path, report: Path, rounds: int, pfl_py: str | None) -> list[str]:
    common = ["--workload", str(workload), "--report", str(report), "--rounds", str(rounds)]
    if system in ("bare", "flower", "stamen"):
        cmd = [sys.executable, "-m", "stamen.benchmarks._sim_workers", system, *common]
        if system == "stamen":
            meta, _ = W.load_meta(str(workload))
            cmd += ["--overrides", json.dumps(meta["stamen_overrides"])]
        return cmd
    worker = str(HERE / "_pfl_worker.py")
    if system == "pfl":
        return [pfl_py, worker, *common]
    return [pfl_py, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2", worker,
            *common]


def run_once(system: str, clients: int, workload: Path, rounds: int, work: Path, tag: str, timeout_s: float,
             pfl_py: str | None) -> dict[str, Any]:
    report, log = work / f"{tag}.jsonl", work / f"{tag}.log"
    report.unlink(missing_ok=True)
    cmd = command(system, workload, report, rounds, pfl_py)
    with open(log, "w") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True,
                                cwd=str(HERE.parent))
        mon = TreeMonitor(proc.pid)
        mon.start()
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            rc, status = None, f"timed out after {timeout_s:.0f} s"
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        t_exit = time.time()
        leftover = _end_tree(proc.pid)
        mon.stop.set()
        mon.join()
    events = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    rounds_ev = [e for e in events if e["event"] == "round"]
    if status == "ok" and len(rounds_ev) != rounds:
        status = f"failed ({len(rounds_ev)} of {rounds} rounds reported)"
    ready = next((e["t"] for e in events if e["event"] == "ready"), None)
    res: dict[str, Any] = {
        "system": system, "clients": clients, "rounds": rounds, "status": status, "command": shlex.join(cmd),
        "ready_s": None if ready is None else ready - t0, "total_s": t_exit - t0,
        "peak_rss_mib": mon.peak_rss_kib / 1024, "peak_pss_mib": mon.peak_pss_kib / 1024,
        "peak_processes": mon.peak_procs, "processes_seen": len(mon.seen), "monitor_cpu_s": mon.cpu_s,
        "leftover_processes_ended": leftover,
        "round_end_s": [e["t"] - t0 for e in rounds_ev],
        "round_clients": [e["clients"] for e in rounds_ev], "round_samples": [e["samples"] for e in rounds_ev],
        "round_test_accuracy": [e["test_accuracy"] for e in rounds_ev],
        "round_test_loss": [e["test_loss"] for e in rounds_ev],
    }
    if status != "ok":
        res["log_tail"] = log.read_text(errors="replace")[-3000:]
    res.update(derived_metrics(res))
    return res


def derived_metrics(res: dict[str, Any]) -> dict[str, Any]:
    ends = res["round_end_s"]
    out: dict[str, Any] = {"startup_s": ends[0] if ends else None, "median_round_s": None, "updates_per_s": None,
                           "samples_per_s": None, "final_test_accuracy": None}
    if len(ends) >= 2:
        span = ends[-1] - ends[0]
        out["median_round_s"] = statistics.median(b - a for a, b in zip(ends, ends[1:]))
        out["updates_per_s"] = sum(res["round_clients"][1:]) / span
        out["samples_per_s"] = sum(res["round_samples"][1:]) / span
    if res["status"] == "ok" and res["round_test_accuracy"]:
        out["final_test_accuracy"] = res["round_test_accuracy"][-1]
    return out


# ------------------------------------------------------------------------ summary ----
METRICS = ("startup_s", "median_round_s", "updates_per_s", "samples_per_s", "final_test_accuracy", "peak_rss_mib",
           "peak_pss_mib", "peak_processes", "total_s")


def summarize(runs: list[dict[str, Any]], systems=None, metrics=None,
              floors: tuple[str, ...] = ("bare",)) -> list[dict[str, Any]]:
    """Medians per (N, system) over the ok runs (max for the process count), and each row's round
    time relative to the first of ``floors`` that ran at that N (``round_vs_bare``)."""
    systems, metrics = systems or SYSTEMS, metrics or METRICS
    rows = []
    for n in sorted({r["clients"] for r in runs}):
        for system in systems:
            mine = [r for r in runs if r["clients"] == n and r["system"] == system]
            if not mine:
                continue
            ok = [r for r in mine if r["status"] == "ok"]
            row: dict[str, Any] = {"clients": n, "system": system, "runs": len(mine), "ok_runs": len(ok),
                                   "rounds": mine[0]["rounds"]}
            for key in metrics:
                vals = [r[key] for r in ok if r.get(key) is not None]
                row[key] = (max if key == "peak_processes" else statistics.median)(vals) if vals else None
            if not ok:
                row["status"] = mine[-1]["status"]
            rows.append(row)
        bare = next((r for f in floors for r in rows if r["clients"] == n and r["system"] == f), None)
        for row in rows:
            if row["clients"] == n:
                base = bare and bare["median_round_s"]
                row["round_vs_bare"] = (row["median_round_s"] / base if base and row["median_round_s"] else None)
    return rows


LABELS = {"bare": "bare PyTorch (1 proc)", "flower": "Flower 1.39 on Ray (2 actors)",
          "stamen": "Stamen on Ray (2 actors)", "pfl": "pfl 0.6 (1 proc)", "pfl2": "pfl 0.6 (2 workers)"}


def table(rows: list[dict[str, Any]]) -> str:
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = ["| N | system | procs | start-up s | median round s | × bare | updates/s | samples/s | final acc "
             "| peak RSS MiB | peak PSS MiB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = LABELS[r["system"]] + (f", {r['rounds']} rounds" if r.get("capped") else "")
        if r["ok_runs"] == 0:
            lines.append(f"| {r['clients']} | {name} | {r['status']} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['clients']} | {name} | {f(r['peak_processes'], 'd')} | {f(r['startup_s'], '.1f')} "
            f"| {f(r['median_round_s'], '.3f')} | {f(r['round_vs_bare'], '.2f')} | {f(r['updates_per_s'], '.0f')} "
            f"| {f(r['samples_per_s'], '.0f')} | {f(r['final_test_accuracy'], '.4f')} | {f(r['peak_rss_mib'], '.0f')} "
            f"| {f(r['peak_pss_mib'], '.0f')} |")
    return "\n".join(lines)


def print_report(results: dict[str, Any], path: Path) -> None:
    e, st = results["environment"], results["settings"]
    print(f"\nSynthetic(1,1), MLP 60-64-10, 10 % of clients per round, 1 epoch, batch 10, lr 0.05, "
          f"{st['rounds']} rounds; medians of {st['repeats']} run(s); {e['cpu_count']} CPUs, torch {e['torch']}, "
          f"flwr {e['flwr']}{', ' + e['pfl'] if e.get('pfl') else ''}\n")
    print(table(results["summary"]))
    for what, why in st["skipped"].items():
        print(f"\n{what}: skipped — {why}")
    for row in results["summary"]:
        if row["ok_runs"] < row["runs"]:
            print(f"\n{row['system']} at N={row['clients']}: {row['ok_runs']} of {row['runs']} runs ok "
                  f"(failed runs are left out of the medians; see the JSON)")
    print(f"\n{path}")


def environment(pfl_note: str | None) -> dict[str, Any]:
    from importlib.metadata import version

    import numpy
    import torch

    env = {"cpu_count": os.cpu_count(), "machine": platform.platform(), "processor": platform.processor(),
           "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "flwr": version("flwr"), "ray": version("ray"), "stamen": version("stamen"),
           "loadavg_at_start": os.getloadavg()}
    import stamen

    src = Path(stamen.__file__).resolve().parents[1]
    env["stamen_source"] = str(src)
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    git = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.splitlines()
        env["stamen_git"] = {"commit": git.stdout.strip(), "modified_files": len(dirty)}
    if pfl_note:
        env["pfl"] = pfl_note
    return env


def parse_caps(items: list[str]) -> dict[tuple[str, int], int]:
    caps = {}
    for item in items:
        try:
            key, rounds = item.split("=")
            system, n = key.split("@")
            if system not in SYSTEMS:
                raise ValueError
            caps[(system, int(n))] = int(rounds)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--round-cap takes SYSTEM@N=ROUNDS (e.g. flower@10000=5), got {item!r}")
    return caps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000", help="client counts N, comma-separated")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--repeats", type=int, default=1, help="runs per system and N (medians are reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("sim_throughput.json"), help="JSON file with every measurement")
    ap.add_argument("--round-cap", action="append", default=[], metavar="SYSTEM@N=ROUNDS",
                    help="run SYSTEM at N for fewer rounds (repeatable), e.g. flower@10000=5")
    ap.add_argument("--skip", action="append", default=[], metavar="SYSTEM@N", help="do not run SYSTEM at N")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is ended")
    ap.add_argument("--pfl-venv", type=Path, default=default_pfl_venv(),
                    help="virtualenv with pfl 0.6.0 (created on first use)")
    ap.add_argument("--work-dir", type=Path, default=None, help="workload files and logs (default: a temporary folder)")
    ap.add_argument("--show", type=Path, default=None, metavar="JSON", help="print the table of a saved run; run nothing")
    args = ap.parse_args(argv)
    if args.show:
        results = json.loads(args.show.read_text())
        results["summary"] = summarize(results["runs"])
        for row in results["summary"]:
            row["capped"] = f"{row['system']}@{row['clients']}" in results["settings"]["round_caps"]
        print(f"$ {results['command']}")
        print_report(results, args.show)
        return 0
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems or not sizes or min(sizes) < 1 or args.rounds < 2 or args.repeats < 1:
        ap.error(f"need sizes ≥ 1, rounds ≥ 2, repeats ≥ 1 and systems from {SYSTEMS} (unknown: {unknown})")
    caps = parse_caps(args.round_cap)
    skips = set(args.skip)
    if not sys.platform.startswith("linux"):
        ap.error("the process-tree memory sampling reads /proc: Linux only")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sim-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    pfl_py, pfl_note, skipped = None, None, {}
    if {"pfl", "pfl2"} & set(systems):
        pfl_py, pfl_note = pfl_python(args.pfl_venv, work / "pfl-venv.log")
        if pfl_py is None:
            print(f"skipping pfl: {pfl_note}", flush=True)
            for s in ("pfl", "pfl2"):
                if s in systems:
                    systems.remove(s)
                    skipped[s] = pfl_note
    results: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "-m", "stamen.benchmarks.sim_throughput",
                               *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(pfl_note),
        "settings": {"sizes": sizes, "rounds": args.rounds, "systems": systems, "repeats": args.repeats,
                     "seed": args.seed, "round_caps": {f"{s}@{n}": r for (s, n), r in caps.items()},
                     "skipped": {**skipped, **{k: "--skip" for k in skips}}, "timeout_s": args.timeout,
                     "torch_threads_per_process": 1, "rss_sample_interval_s": SAMPLE_EVERY_S,
                     "pss_sample_interval_s": SAMPLE_EVERY_S * PSS_EVERY},
        "workloads": {}, "runs": [], "summary": []}

    def save() -> None:
        results["summary"] = summarize(results["runs"])
        for row in results["summary"]:
            row["capped"] = (row["system"], row["clients"]) in caps
        results["environment"]["loadavg_at_end"] = os.getloadavg()
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(args.out)

    try:
        for n in sizes:
            wpath = work / f"workload-{n}.npz"
            t = time.perf_counter()
            results["workloads"][str(n)] = desc = make_workload(wpath, n, args.rounds, args.seed)
            desc["generate_s"] = time.perf_counter() - t
            print(f"N={n}: {desc['train_samples']} train / {desc['test_samples']} test samples, "
                  f"{desc['clients_per_round']} clients per round ({desc['generate_s']:.1f} s to generate)", flush=True)
            for rep in range(args.repeats):
                for system in systems:
                    if f"{system}@{n}" in skips:
                        continue
                    if system == "pfl2" and desc["clients_per_round"] < 2:
                        # pfl fails when a worker gets no user in a cohort
                        results["settings"]["skipped"][f"pfl2@{n}"] = "a cohort of 1 client leaves a worker idle"
                        continue
                    rounds = min(args.rounds, caps.get((system, n), args.rounds))
                    res = run_once(system, n, wpath, rounds, work, f"{system}-{n}-{rep}", args.timeout, pfl_py)
                    res["repeat"] = rep
                    results["runs"].append(res)
                    save()
                    mr = res["median_round_s"]
                    acc = res["final_test_accuracy"]
                    print(f"  {system:>6} N={n} #{rep}: {res['status']}, start-up {res['startup_s'] or 0:.1f} s, "
                          f"median round {mr if mr is not None else float('nan'):.3f} s, "
                          f"acc {acc if acc is not None else float('nan'):.4f}, "
                          f"peak RSS {res['peak_rss_mib']:.0f} MiB in ≤{res['peak_processes']} processes", flush=True)
            wpath.unlink()
    finally:
        save()
        if args.work_dir is None and all(r["status"] == "ok" for r in results["runs"]):
            shutil.rmtree(work, ignore_errors=True)
        elif results["runs"]:
            print(f"logs kept in {work}")
    print_report(results, args.out)
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
