"""Simulation on an existing Ray cluster (``federation.ray_address``), as on a multi-machine cluster:
a private single-node Ray head started with ``ray start --head``, then ``stamen run`` joins it.

The head gets its own temp dir (``RAY_TMPDIR``: no shared /tmp/ray/ray_current_cluster), its own
ports, and is stopped by PID (every process it spawned carries the test's tag) — never with
``ray stop``, which would stop every Ray instance on the machine.
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


@pytest.fixture
def ray_head(tmp_path):
    if shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists():
        pytest.skip("the `ray` command is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {"RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    group = ProcessGroup(tmp_path / "logs", env=env)
    port = free_port()
    ports = {flag: str(free_port()) for flag in (
        "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")}
    argv = ["ray", "start", "--head", "--block", "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
            "--node-ip-address", "127.0.0.1", "--temp-dir", str(tmp / "ray"), "--include-dashboard", "false",
            "--disable-usage-stats", *[x for kv in ports.items() for x in kv]]
    head = group.start("ray-head", argv)
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in head.log.read_text(errors="replace"):
            if head.popen.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray start failed:\n{group.log_tail('ray-head', 40)}")
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "env": env, "group": group}
    finally:
        group.shutdown(grace=15)
        leftovers = group.leftovers()
        shutil.rmtree(tmp, ignore_errors=True)
        assert leftovers == [], f"Ray processes outlived the test: {leftovers}"


def test_simulation_joins_an_existing_ray_cluster(ray_head, tmp_path):
    out = tmp_path / "run"
    group: ProcessGroup = ray_head["group"]
    # a subprocess, as on a cluster's head node; it inherits the private RAY_TMPDIR and the tag
    run = group.start("stamen-run", [
        "stamen", "run", "--out", str(out),
        "--set", "federation.clients=3", "--set", "run.rounds=2", "--set", "task.partition='iid'",
        "--set", "task.local_epochs=1", "--set", f"federation.ray_address='{ray_head['address']}'"])
    rc = run.popen.wait(timeout=900)
    assert rc == 0, group.log_tail("stamen-run", 60)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 3 for r in rows)
    assert (out / "summary.json").exists()
    # the run used the cluster we started (its session logs name a driver), not a fresh local Ray
    sessions = list(Path(ray_head["env"]["RAY_TMPDIR"]).glob("ray/session_*/logs"))
    assert sessions and any(p.name.startswith("python-core-driver") for s in sessions for p in s.iterdir())
