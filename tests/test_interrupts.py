"""Ctrl-C: ``stamen run`` and ``stamen sweep`` end within 5 s with exit code 130, leave no process
behind, keep the last checkpoint intact, say how to continue — and continuing works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stamen.interrupt import descendants
from stamen.server.results import RunDirectory

STAMEN = [sys.executable, "-m", "stamen.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 240) -> tuple[int, float, list[int], str]:
    """Send SIGINT once ``ready()``; return (exit code, seconds to exit, its descendants then, stderr)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the command never got going"
        time.sleep(0.2)
    family = descendants(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, time.monotonic() - t0, family, proc.stderr.read()


@pytest.mark.slow
def test_ctrl_c_ends_stamen_run_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([*STAMEN, "run", "--out", str(out), "--set", "run.rounds=40", "--set",
                             "federation.clients=6"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = out / "metrics.jsonl"
    code, seconds, family, err = _interrupt_when(
        proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
    assert code == 130 and seconds <= 5.0, (code, seconds, err)
    assert family and not [p for p in family if _alive(p)]  # Ray's processes too
    assert f"stamen run --resume {out}" in err
    done = RunDirectory(out).load_checkpoint()["round"]
    assert done == len(RunDirectory(out).read_metrics()) >= 2
    resumed = subprocess.run([*STAMEN, "run", "--resume", str(out), "--set", "run.rounds=" + str(done + 1)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["round"] for r in RunDirectory(out).read_metrics()] == list(range(1, done + 2))


@pytest.mark.slow
def test_ctrl_c_ends_a_sweep_and_rerunning_finishes_it(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text(f'name = "s"\nbase = "{ROOT / "stamen/configs/default.toml"}"\nseeds = [0, 1, 2]\n'
                     '[fixed]\n"run.rounds" = 30\n"federation.clients" = 4\n"task.hidden" = 16\n')
    out = tmp_path / "out"
    proc = subprocess.Popen([*STAMEN, "sweep", str(study), "--out", str(out), "--engine", "inprocess"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def started() -> bool:
        return any(len(p.read_text().splitlines()) >= 2 for p in out.glob("runs/*/metrics.jsonl"))

    code, seconds, family, err = _interrupt_when(proc, started)
    assert code == 130 and seconds <= 5.0, (code, seconds, err)
    assert not [p for p in family if _alive(p)]
    assert "rerun the same command" in err
    again = subprocess.run([*STAMEN, "sweep", str(study), "--out", str(out), "--engine", "inprocess"], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sum(1 for _ in (out / "results.csv").read_text().splitlines()) == 1 + 3
    assert json.loads((out / "study.json").read_text())
