"""The GPU benchmark's bare loop is the same computation as Stamen's FedAvg; it skips cleanly without CUDA."""

import json
import logging

import pytest
import torch

from stamen.benchmarks import gpu_throughput as G
from stamen.config import load
from stamen.server.inprocess_grid import InProcessGrid
from stamen.server.loop import run_federation


def test_bare_loop_matches_stamen_fedavg_on_cpu(tmp_path):
    class Args:
        clients, fraction, epochs, rounds, seed = 10, 0.5, 1, 3, 0

    overrides = G.workload(Args) + ["task.hidden=16"]
    bare = G.bare_loop(overrides, device="cpu")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    cfg = load(overrides=overrides + ["run.device=cpu"])
    rows = []
    run_federation(InProcessGrid(cfg), cfg, tmp_path / "s", on_round=rows.append)
    assert [r["clients"] for r in bare] == [r["clients"] for r in rows] == [5, 5, 5]
    # same clients, data, initial weights and batches: the same model up to float summation order
    for b, s in zip(bare, rows):
        assert b["test_accuracy"] == pytest.approx(s["test_accuracy"], abs=1.5 / 360)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_skips_cleanly_without_cuda(tmp_path, capsys):
    assert G.main(["--out", str(tmp_path / "g.json")]) == 0
    out = json.loads((tmp_path / "g.json").read_text())
    assert out["status"] == "skipped" and "CUDA" in out["reason"] and out["systems"] == []
    assert "skipped" in capsys.readouterr().out
