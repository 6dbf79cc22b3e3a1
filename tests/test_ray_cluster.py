"""Simulation on an existing Ray cluster (``federation.ray_address``), as on a multi-machine cluster:
a private Ray head started with ``ray start --head``, then a second Ray node joined to it with
``ray start --address``, and ``stamen run`` on top.

Each Ray node gets its own temp dir (``--temp-dir``: no shared /tmp/ray/ray_current_cluster, and
each node's session logs stay apart), its own ports, and is stopped by PID (every process it
spawned carries the test's tag) — never with ``ray stop``, which would stop every Ray instance on
the machine. Each node offers 1 CPU, so the simulation's two actors (1 CPU each) can only run one
per node.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from stamen.deploy.local import free_port
from stamen.deploy.procs import ProcessGroup

pytestmark = pytest.mark.slow

#: ports every Ray node needs of its own on a shared machine (besides the head's GCS port)
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
                   "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")


def _node_argv(tmp: Path, *, head_port: int, head: bool) -> list[str]:
    ports = {flag: str(free_port()) for flag in NODE_PORT_FLAGS}
    lo = free_port()
    argv = ["ray", "start", "--block", "--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
            "--temp-dir", str(tmp), "--disable-usage-stats", *[x for kv in ports.items() for x in kv]]
    if head:
        return [*argv, "--head", "--port", str(head_port), "--include-dashboard", "false",
                "--ray-client-server-port", str(free_port())]
    # a worker node's own range of worker ports, away from the head's defaults
    return [*argv, "--address", f"127.0.0.1:{head_port}", "--min-worker-port", str(20000 + lo % 20000),
            "--max-worker-port", str(20000 + lo % 20000 + 99)]


def _wait_started(group: ProcessGroup, name: str, timeout: float = 240.0) -> None:
    started = group.started[name]
    deadline = time.time() + timeout
    while "Ray runtime started" not in started.log.read_text(errors="replace"):
        if started.popen.poll() is not None or time.time() > deadline:
            pytest.fail(f"{name} did not start:\n{group.log_tail(name, 40)}")
        time.sleep(0.5)


@pytest.fixture
def ray_head(tmp_path):
    if shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists():
        pytest.skip("the `ray` command is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {"RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    group = ProcessGroup(tmp_path / "logs", env=env)
    port = free_port()
    group.start("ray-head", _node_argv(tmp / "head", head_port=port, head=True))
    try:
        _wait_started(group, "ray-head")
        yield {"address": f"127.0.0.1:{port}", "port": port, "tmp": tmp, "env": env, "group": group}
    finally:
        group.shutdown(grace=15)
        leftovers = group.leftovers()
        shutil.rmtree(tmp, ignore_errors=True)
        assert leftovers == [], f"Ray processes outlived the test: {leftovers}"


def _run(group: ProcessGroup, name: str, address: str, out: Path) -> list[dict]:
    # a subprocess, as on a cluster's head node; it inherits the private RAY_TMPDIR and the tag
    run = group.start(name, [
        "stamen", "run", "--out", str(out), "--set", "federation.clients=4", "--set", "run.rounds=2",
        "--set", "task.partition='iid'", "--set", "task.local_epochs=1", "--set", "federation.client_cpus=1",
        "--set", f"federation.ray_address='{address}'"])
    rc = run.popen.wait(timeout=900)
    assert rc == 0, group.log_tail(name, 60)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 4 for r in rows)
    assert (out / "summary.json").exists()
    return rows


def _actor_workers(node_tmp: Path) -> int:
    """Worker processes that hosted Flower's ClientApp actors on the Ray node with this temp dir
    (each node writes its workers' logs into its own session directory)."""
    n = 0
    for f in node_tmp.glob("session_*/logs/worker-*"):
        if f.suffix in (".out", ".err") and "ClientAppActor" in f.read_text(errors="replace"):
            n += 1
    return n


def test_simulation_runs_on_one_and_on_two_ray_nodes_with_the_same_metrics(ray_head, tmp_path):
    group: ProcessGroup = ray_head["group"]
    one = _run(group, "stamen-run-1", ray_head["address"], tmp_path / "one-node")
    # the run used the cluster we started (its session logs name a driver), not a fresh local Ray
    sessions = list((ray_head["tmp"] / "head").glob("session_*/logs"))
    assert sessions and any(p.name.startswith("python-core-driver") for s in sessions for p in s.iterdir())
    assert _actor_workers(ray_head["tmp"] / "head") >= 1

    # a second Ray node joins the head: its own temp dir and ports, on this machine
    group.start("ray-worker", _node_argv(ray_head["tmp"] / "worker", head_port=ray_head["port"], head=False))
    _wait_started(group, "ray-worker")
    head_before = _actor_workers(ray_head["tmp"] / "head")
    two = _run(group, "stamen-run-2", ray_head["address"], tmp_path / "two-nodes")
    on_head, on_worker = _actor_workers(ray_head["tmp"] / "head") - head_before, _actor_workers(ray_head["tmp"] / "worker")
    print(f"\nClientApp actor processes: {on_head} on the head, {on_worker} on the second node")
    assert on_head >= 1 and on_worker >= 1  # actors on both nodes
    keys = ("round", "clients", "test_accuracy", "test_loss", "train_loss", "uplink_bytes", "downlink_bytes")
    assert [{k: r[k] for k in keys} for r in two] == [{k: r[k] for k in keys} for r in one]
