"""Fault injection, duplicates, Byzantine clients, kill-and-resume, fuzzed configs."""

import os
import signal
import subprocess
import sys
import time

import pytest
from _localgrid import LocalGrid
from hypothesis import given, settings
from hypothesis import strategies as st

from stamen import config as C
from stamen.client.faults import byzantine_partitions, draw_client_fault
from stamen.server.loop import run_federation
from stamen.server.results import RunDirectory

BASE = ["federation.clients=6", "run.rounds=3", "task.local_epochs=1", "task.hidden=16"]


def run(tmp_path, name, *overrides):
    cfg = C.load(overrides=BASE + list(overrides))
    summary = run_federation(LocalGrid(cfg), cfg, tmp_path / name)
    return RunDirectory(tmp_path / name).read_metrics(), summary


def test_client_failures_are_rejected_and_rounds_go_on(tmp_path):
    rows, summary = run(tmp_path, "f", "faults.client_failure=0.3", "run.rounds=6")
    fails = [sum(draw_client_fault(C.load(overrides=["faults.client_failure=0.3"]).faults, 0, r, p).fail
                 for p in range(6)) for r in range(1, 7)]
    assert [r["rejected"] for r in rows] == fails and sum(fails) > 0
    assert all(r["clients"] == 6 - f for r, f in zip(rows, fails))
    assert summary["rounds"] == 6


def test_too_few_replies_fail_the_round_cleanly(tmp_path):
    rows, summary = run(tmp_path, "f", "faults.client_failure=1.0")
    clean, _ = run(tmp_path, "clean", "run.rounds=1")
    assert all(r["failed"] and r["clients"] == 0 for r in rows)
    assert summary["failed_rounds"] == 3
    # the model never moved: every round evaluates the initial weights
    assert len({r["test_accuracy"] for r in rows}) == 1 and rows[0]["test_accuracy"] != clean[0]["test_accuracy"]


def test_duplicated_replies_are_rejected_without_changing_the_result(tmp_path):
    clean, _ = run(tmp_path, "clean")
    dup, _ = run(tmp_path, "dup", "faults.duplicate_reply=1.0")
    assert [r["rejected"] for r in dup] == [6, 6, 6]
    assert [r["test_accuracy"] for r in dup] == [r["test_accuracy"] for r in clean]


def test_dropped_replies_shrink_the_round(tmp_path):
    rows, _ = run(tmp_path, "drop", "faults.drop_reply=0.5", "faults.min_replies=1", "run.rounds=4")
    assert all(r["clients"] + r["missing"] == 6 for r in rows) and sum(r["missing"] for r in rows) > 0


def test_byzantine_set_is_fixed_and_sized():
    s = byzantine_partitions(0, 20, 0.2)
    assert len(s) == 4 and s == byzantine_partitions(0, 20, 0.2) and s != byzantine_partitions(1, 20, 0.2)


@pytest.mark.slow
def test_robust_aggregation_resists_sign_flipping_clients(tmp_path):
    common = ["federation.clients=10", "run.rounds=8", "task.local_epochs=1", "task.alpha=100"]
    attack = ["faults.byzantine_fraction=0.2", "faults.byzantine_attack=sign_flip", "faults.byzantine_scale=4"]

    def final(*o):
        cfg = C.load(overrides=common + list(o))
        return run_federation(LocalGrid(cfg), cfg, tmp_path / str(hash(o)))["final_test_accuracy"]

    clean = final()
    fedavg = final(*attack)
    median = final(*attack, "strategy.name=fedmedian")
    krum = final(*attack, "strategy.name=krum", "strategy.num_malicious_nodes=2")
    assert fedavg < clean - 0.3
    assert median > clean - 0.1 and krum > clean - 0.15
    # the same rules as an option of another update-sending strategy: FedAvgM's momentum step
    fedavgm = final(*attack, "strategy.name=fedavgm")
    fedavgm_median = final(*attack, "strategy.name=fedavgm", "strategy.aggregator=median")
    assert fedavgm < clean - 0.3 and fedavgm_median > clean - 0.1


KILL_SCRIPT = """
import sys
from stamen.config import load
from stamen.server.inprocess_grid import InProcessGrid
from stamen.server.loop import run_federation
cfg = load(sys.argv[1]) if sys.argv[2] == "resume" else load(overrides=sys.argv[3:])
run_federation(InProcessGrid(cfg), cfg, sys.argv[1].rsplit('/', 1)[0] if sys.argv[2] == "resume" else sys.argv[1],
               resume=sys.argv[2] == "resume")
"""


def test_sigkill_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    overrides = BASE + ["run.rounds=6", "strategy.name=fedavgm"]
    full = tmp_path / "full"
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(full), "new", *overrides], check=True)
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(part), "new", *overrides])
    metrics = part / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it mid-run, after at least two rounds landed
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = RunDirectory(part).read_metrics()
    assert 2 <= len(done) < 6, "the run should have been killed mid-way"
    for f in ("metrics.jsonl", "checkpoint.npz", "config.toml"):  # whole files, never half-written
        assert (part / f).exists()
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(part / "config.toml"), "resume"], check=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert strip(RunDirectory(part).read_metrics()) == strip(RunDirectory(full).read_metrics())


config_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                          st.text(max_size=8), st.lists(st.integers(), max_size=3))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(list(C.SECTIONS) + ["bogus"]),
                       st.one_of(st.dictionaries(st.text(max_size=12) | st.sampled_from(
                           ["seed", "rounds", "clients", "alpha", "lr", "codec", "name", "fraction_train", "clip"]),
                           config_values, max_size=4), config_values), max_size=4))
def test_config_loader_fuzz_gives_clean_errors(data):
    try:
        C.validate(data)
    except C.ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_override_parser_fuzz(item):
    try:
        C.apply_overrides({}, [item])
    except C.ConfigError:
        pass
