"""What a run leaves for its user: the final model (safetensors) and its TorchScript / ONNX exports,
tracker logs, config.toml kept current on resume, a dry run that starts nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stamen
from stamen.cli import app
from stamen.config import load
from stamen.server.results import RunDirectory
from stamen.tasks.task import load_task, set_weights

TINY = ["federation.clients=4", "run.rounds=2", "task.local_epochs=1", "task.hidden=16"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    stamen.run_experiment(None, TINY, out, engine="inprocess")
    return out


def test_the_final_model_is_a_safetensors_state_dict(finished):
    weights, meta = RunDirectory(finished).read_model()
    ck = RunDirectory(finished).load_checkpoint()["arrays"]
    assert sorted(weights) == sorted(ck) and all(np.array_equal(weights[k], ck[k]) for k in ck)
    assert meta["round"] == "2" and meta["dataset"] == "digits" and meta["model"] == "mlp"
    from safetensors.torch import load_file  # a user loads it into their own model

    cfg = load(RunDirectory(finished).config_path)
    model = load_task(cfg.task, 4, 0).new_model()
    model.load_state_dict(load_file(str(RunDirectory(finished).model_path)))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_runs_outside_stamen_and_agrees_with_pytorch(finished, tmp_path, fmt):
    result = CliRunner().invoke(app, ["export", str(finished), "--format", fmt, "--out", str(tmp_path / f"m.{fmt}")])
    assert result.exit_code == 0, result.output
    cfg = load(RunDirectory(finished).config_path)
    task = load_task(cfg.task, 4, 0)
    model = task.new_model()
    set_weights(model, RunDirectory(finished).read_model()[0])
    x = torch.as_tensor(task.data.test[0][:5])
    expected = model(x).detach().numpy()
    if fmt == "torchscript":
        got = torch.jit.load(str(tmp_path / "m.torchscript"))(x).detach().numpy()
    else:
        from onnx.reference import ReferenceEvaluator

        ev = ReferenceEvaluator(str(tmp_path / "m.onnx"))
        got = ev.run(None, {ev.input_names[0]: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    bad = CliRunner().invoke(app, ["export", str(finished), "--format", "pickle"])
    assert bad.exit_code == 2 and "torchscript, onnx" in bad.output


def test_tensorboard_tracker_writes_each_round(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stamen.trackers import TrackerError, make_tracker

    tracker = make_tracker("tensorboard", tmp_path, "run-a")
    for r in (1, 2, 3):
        tracker.log_round({"round": r, "test_accuracy": 0.1 * r, "uplink_bytes": 100 * r, "clients": 4})
    tracker.finish({"strategy.name": "fedavg", "run.seed": 0}, {"final_test_accuracy": 0.3})
    events = EventAccumulator(str(tmp_path / "run-a")).Reload()
    assert [e.value for e in events.Scalars("test_accuracy")] == pytest.approx([0.1, 0.2, 0.3])
    assert [e.step for e in events.Scalars("uplink_bytes")] == [1, 2, 3]
    with pytest.raises(TrackerError, match="--log must be one of"):
        make_tracker("csv", tmp_path, "x")


def test_resume_that_extends_the_rounds_updates_config_toml(tmp_path):
    stamen.run_experiment(None, TINY, tmp_path / "r", engine="inprocess")
    cfg = load(RunDirectory(tmp_path / "r").config_path, ["run.rounds=3"])
    stamen.run_experiment(cfg, [], tmp_path / "r", engine="inprocess", resume=True)
    assert load(RunDirectory(tmp_path / "r").config_path).run.rounds == 3
    assert len(RunDirectory(tmp_path / "r").read_metrics()) == 3


def test_dry_run_checks_everything_and_starts_nothing(tmp_path):
    ok = CliRunner().invoke(app, ["run", "--dry-run", "--out", str(tmp_path / "x"), "--set", "run.rounds=1"])
    assert ok.exit_code == 0 and "the preflight passed" in ok.output and not (tmp_path / "x").exists()
    refused = CliRunner().invoke(app, ["run", "--dry-run", "--set", "strategy.name=ferret", "--set",
                                       "privacy.clip=1", "--set", "privacy.noise_multiplier=1"])
    assert refused.exit_code == 2 and "cannot be made private" in refused.output
