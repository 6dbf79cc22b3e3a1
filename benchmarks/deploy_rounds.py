"""Deployment vs simulation: seconds per round and to the first round, same job, same machine.

    python -m stamen.benchmarks.deploy_rounds                       # sim + warm deployment, 10 rounds
    python -m stamen.benchmarks.deploy_rounds --modes sim warm flower --flower-rounds 2 --json out.json

The job is the default one (digits MLP, 20 clients, FedAvg) with ``run.rounds`` = ``--rounds``.
Each mode runs the real command as a subprocess and is timed from that process's start:

- ``sim``: ``stamen run`` (Flower's simulation engine on Ray, carriers as configured);
- ``warm``: ``stamen deploy local`` — SuperLink + ``--nodes`` SuperNodes on loopback, TLS and node
  authentication, Stamen's paced SuperNodes with one warm ClientApp process each;
- ``flower``: the same deployment with Flower's own SuperNodes (``--flower-clientapps``: a new
  ClientApp process per message, 3 s polls) — what deployment cost before.

Reported per mode: the time until the first round's row is in ``metrics.jsonl``, each round's
``wall_s`` (the ServerApp's own clock: configure → replies → aggregate → evaluate), and their
median over rounds 2..R. For deployments the processes' logs are followed while they run (each
line stamped when it appears) to profile a round: when each SuperNode received its message,
how long it spent pulling it, in its ClientApp runner (pull / worker / app / push), pushing the
reply, and what is left for the ServerApp. Wall times on a shared machine are upper bounds;
the CPU seconds of the whole command tree are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROUND_RE = re.compile(r"served by ClientApp worker (\d+) in ([\d.]+) s \(pull ([\d.]+) s for (\d+) objects, "
                      r"worker ([\d.]+) s of which app ([\d.]+) s \(CPU ([\d.]+) s\), push ([\d.]+) s\)")


def _stamen() -> str:
    exe = Path(sys.executable).parent / "stamen"
    return str(exe) if exe.exists() else "stamen"


class LogFollower(threading.Thread):
    """Stamps every new line of every ``*.log`` under a directory with the time it appeared."""

    def __init__(self, logdir: Path, t0: float):
        super().__init__(daemon=True)
        self.logdir, self.t0 = logdir, t0
        self.lines: list[tuple[float, str, str]] = []
        self._halt = threading.Event()
        self._pos: dict[Path, int] = {}

    def run(self) -> None:
        while not self._halt.is_set():
            self.scan()
            time.sleep(0.01)
        self.scan()

    def scan(self) -> None:
        for f in sorted(self.logdir.glob("*.log")):
            pos = self._pos.get(f, 0)
            try:
                with open(f, "rb") as fh:
                    fh.seek(pos)
                    data = fh.read()
            except OSError:
                continue
            cut = data.rfind(b"\n")
            if cut < 0:
                continue
            self._pos[f] = pos + cut + 1
            t = time.time() - self.t0
            for line in data[:cut].decode(errors="replace").splitlines():
                self.lines.append((t, f.stem, re.sub(r"\x1b\[[0-9;]*m", "", line)))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def _role(cmdline: str) -> str:
    for needle, role in (("stamen.deploy.clientapp zygote", "ClientApp zygote + workers"),
                         ("flwr-clientapp", "ClientApps"),
                         ("stamen.deploy.supernode", "SuperNodes"), ("flower-supernode", "SuperNodes"),
                         ("flwr-serverapp", "ServerApp"), ("flower-superlink", "SuperLink"),
                         ("flower-superexec", "SuperExecs"), ("flwr run", "flwr run CLI")):
        if needle in cmdline:
            return role
    return "other"


def deployment_cpu(workdir: Path) -> dict[str, float]:
    """CPU seconds so far of the live processes working in ``workdir`` (every process of a local
    deployment runs there), by role."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/cwd") != str(workdir):
                continue
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = _role(cmd)
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _rows_with_times(metrics: Path, seen: list[tuple[float, dict]], t0: float) -> None:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return
    for line in lines[len(seen):]:
        if line.strip():
            seen.append((time.time() - t0, json.loads(line)))


def run_mode(mode: str, rounds: int, nodes: int, clients: int, work: Path, extra: list[str]) -> dict[str, Any]:
    out = work / f"{mode}-run"
    sets = ["--set", f"run.rounds={rounds}", "--set", f"federation.clients={clients}", *extra]
    if mode == "sim":
        cmd = [_stamen(), "run", *sets, "--out", str(out)]
    else:
        cmd = [_stamen(), "deploy", "local", "--nodes", str(nodes), *sets, "--out", str(out), "--timeout", "3600"]
        if mode == "flower":
            cmd.append("--flower-clientapps")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows: list[tuple[float, dict]] = []
    follower: LogFollower | None = None
    output: list[str] = []

    def read_output() -> None:
        nonlocal follower
        for line in p.stdout:
            output.append(line)
            m = re.search(r"work dir (\S+)", line)
            if m and follower is None:
                follower = LogFollower(Path(m.group(1)) / "logs", t0)
                follower.start()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    cpu_at_row: list[dict[str, float]] = []
    while p.poll() is None:
        n = len(rows)
        _rows_with_times(out / "metrics.jsonl", rows, t0)
        if len(rows) > n and follower is not None:
            cpu = deployment_cpu(follower.logdir.parent)
            cpu_at_row.extend([cpu] * (len(rows) - n))
        time.sleep(0.05)
    reader.join(timeout=10)
    _rows_with_times(out / "metrics.jsonl", rows, t0)
    total = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if follower is not None:
        follower.stop()
    if p.returncode != 0:
        raise RuntimeError(f"{mode}: {' '.join(cmd)} exited {p.returncode}:\n{''.join(output)[-3000:]}")
    walls = [r["wall_s"] for _, r in rows]
    res: dict[str, Any] = {
        "mode": mode, "command": " ".join(cmd), "rounds": len(rows), "total_s": total,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "first_round_done_s": rows[0][0] if rows else None, "round_wall_s": walls,
        "median_round_s": statistics.median(walls[1:]) if len(walls) > 1 else (walls[0] if walls else None),
        "final_test_accuracy": rows[-1][1].get("test_accuracy") if rows else None,
    }
    if follower is not None:
        res["profile"] = profile(follower.lines, rows, nodes)
        res["events_file"] = str(work / f"{mode}-events.txt")
        with open(res["events_file"], "w") as fh:  # every log line of the deployment, stamped (seconds from start)
            fh.writelines(f"{t:9.3f} {name:16s} {line}\n" for t, name, line in follower.lines)
        # CPU per round (rounds 2..R), by role, from the samples taken as each row appeared
        per_round = []
        for a, b in zip(cpu_at_row, cpu_at_row[1:]):
            per_round.append({k: b.get(k, 0.0) - a.get(k, 0.0) for k in b})
        if cpu_at_row:
            res["cpu_to_first_round_s"] = cpu_at_row[0]  # live processes only (per-message ClientApps are gone)
        if per_round:
            roles = sorted({k for d in per_round for k in d})
            res["cpu_per_round_s"] = {k: statistics.median(d.get(k, 0.0) for d in per_round) for k in roles}
    return res


def profile(lines: list[tuple[float, str, str]], rows: list[tuple[float, dict]], nodes: int) -> dict[str, Any]:
    """Where a deployed round's seconds go, for the median round (by wall_s) after round 1."""
    if len(rows) < 2:
        return {}
    later = sorted(range(1, len(rows)), key=lambda i: rows[i][1]["wall_s"])
    i = later[len(later) // 2]
    end = rows[i][0]
    start = end - rows[i][1]["wall_s"]
    per_node = []
    for k in range(nodes):
        name = f"supernode-{k}"
        ev = [(t, line) for t, n, line in lines if n == name and start - 0.05 <= t <= end + 0.05]

        def first(pattern: str, after: float = -1e9):
            return next((t for t, line in ev if pattern in line and t >= after), None)

        recv = first("Receiving: train")
        got = first("Received successfully", recv or -1e9)
        sending = first("Sending: train", got or -1e9)
        sent = first("Sent successfully", sending or -1e9)
        served = next((ROUND_RE.search(line) for t, line in ev if "served by ClientApp worker" in line
                       and "train" in line), None)
        entry = {"node": k, "message_arrived_after_s": None if recv is None else recv - start,
                 "pull_from_superlink_s": None if None in (recv, got) else got - recv,
                 "push_to_superlink_s": None if None in (sending, sent) else sent - sending,
                 "reply_sent_before_round_end_s": None if sent is None else end - sent}
        if served:
            entry.update(runner_total_s=float(served.group(2)), runner_pull_s=float(served.group(3)),
                         objects=int(served.group(4)), worker_s=float(served.group(5)), app_s=float(served.group(6)),
                         app_cpu_s=float(served.group(7)), runner_push_s=float(served.group(8)))
        per_node.append(entry)
    rnd = rows[i][1]["round"]
    server = next((line.split("[stamen] ", 1)[1] for t, n, line in lines
                   if n.startswith("flwr-run") and f"[stamen] round {rnd}/" in line), None)
    return {"round": rnd, "wall_s": rows[i][1]["wall_s"], "supernodes": per_node, "serverapp": server,
            "note": "times in seconds from the round's start (its row's time minus wall_s); log lines are stamped "
                    "when seen (10 ms polling), so values carry ~0.02 s of jitter"}


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def superlink_cost(nodes: int, seconds: float, fast: float, work: Path) -> dict[str, Any]:
    """CPU the SuperLink spends per SuperNode poll (``PullMessages``, TLS + node authentication).

    Two idle federations of ``nodes`` SuperNodes: one polling every ``fast`` s, one every 3 s
    (Flower's interval); the SuperLink's CPU over ``seconds`` in each, the difference divided by
    the difference in polls (each poll: the sleep plus its round trip, measured from the nodes'
    side as ``seconds / polls``).
    """
    from stamen.deploy.local import LocalFederation

    out = {}
    for label, interval in (("fast", fast), ("flower", 3.0)):
        with LocalFederation(nodes, work / f"cost-{label}", supernode_poll=(interval, interval)) as fed:
            time.sleep(5.0)  # past start-up
            pid = fed.procs.started["superlink"].popen.pid
            c0, t0 = _cpu_of(pid), time.time()
            time.sleep(seconds)
            out[label] = {"interval_s": interval, "superlink_cpu_s": _cpu_of(pid) - c0, "window_s": time.time() - t0}
    rtt = 0.004  # a poll's own round trip on loopback, added to the sleep (measured ~3-5 ms here)
    polls = {k: nodes * v["window_s"] / (v["interval_s"] + rtt) for k, v in out.items()}
    per_poll = (out["fast"]["superlink_cpu_s"] - out["flower"]["superlink_cpu_s"]) / (polls["fast"] - polls["flower"])
    return {"nodes": nodes, "runs": out, "polls": polls, "superlink_cpu_per_poll_s": per_poll}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--flower-rounds", type=int, default=2, help="rounds for the slow 'flower' mode")
    ap.add_argument("--nodes", type=int, default=4, help="SuperNodes of the deployments")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--modes", nargs="*", default=["sim", "warm"], choices=["sim", "warm", "flower"])
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more --set overrides for every mode")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--superlink-cost", action="store_true",
                    help="also measure the SuperLink's CPU per SuperNode poll (two idle federations)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="deploy-rounds-"))
    extra = [x for e in args.extra for x in ("--set", e)]
    results = []
    for mode in args.modes:
        r = run_mode(mode, args.flower_rounds if mode == "flower" else args.rounds, args.nodes, args.clients,
                     work, extra)
        results.append(r)
        print(f"{mode:7s} first round done {r['first_round_done_s']:.1f} s after start, median round "
              f"{r['median_round_s']:.2f} s, rounds {[round(w, 2) for w in r['round_wall_s']]}, "
              f"total {r['total_s']:.1f} s, CPU {r['cpu_s']:.1f} s, final acc {r['final_test_accuracy']}",
              flush=True)
    cost = superlink_cost(args.nodes, 30.0, 0.05, work) if args.superlink_cost else None
    if cost:
        from stamen.deploy.pacing import Backoff, SUPERNODE_POLL_FACTOR, SUPERNODE_POLL_MAX_S, SUPERNODE_POLL_MIN_S

        c = cost["superlink_cpu_per_poll_s"]
        b = Backoff(SUPERNODE_POLL_MIN_S, SUPERNODE_POLL_MAX_S, SUPERNODE_POLL_FACTOR)
        print(f"\nSuperLink CPU per SuperNode poll (PullMessages, TLS + node auth): {c * 1000:.2f} ms "
              f"(from {cost['runs']})")
        for gap in (1.0, 3.0, 10.0):
            n = b.polls_within(gap)
            print(f"  1,000 nodes, {gap:.0f} s between a node's reply and its next message: {n} polls per node "
                  f"(Flower: {max(1, round(gap / 3))}) = {1000 * n * c:.1f} CPU-s per round at the SuperLink "
                  f"(Flower: {1000 * max(1, round(gap / 3)) * c:.1f}); idle: {1000 / 3 * c:.2f} CPU-s per s, "
                  "as with Flower")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    doc = {"rounds": args.rounds, "nodes": args.nodes, "clients": args.clients, "cpus": os.cpu_count(),
           "loadavg_at_end": load, "results": results, "superlink_cost": cost}
    text = json.dumps(doc, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print("\n| mode | first round done after start | median round (2..R) | rounds | CPU s (all processes) |")
    print("| --- | ---: | ---: | --- | ---: |")
    for r in results:
        print(f"| {r['mode']} | {r['first_round_done_s']:.1f} s | {r['median_round_s']:.2f} s | "
              f"{', '.join(f'{w:.2f}' for w in r['round_wall_s'])} | {r['cpu_s']:.0f} |")
    for r in results:
        if r.get("profile"):
            print(f"\nprofile of {r['mode']} round {r['profile']['round']} ({r['profile']['wall_s']:.2f} s):")
            print(f"  ServerApp: {r['profile'].get('serverapp')}")
            if r.get("cpu_to_first_round_s"):
                cpu = r["cpu_to_first_round_s"]
                print(f"  CPU until round 1 was recorded (all processes {sum(cpu.values()):.1f} s): "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])))
            if r.get("cpu_per_round_s"):
                cpu = r["cpu_per_round_s"]
                print(f"  CPU per round (median, all processes {sum(cpu.values()):.2f} s): "
                      + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])))
            for e in r["profile"]["supernodes"]:
                print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items()))


if __name__ == "__main__":
    main()
