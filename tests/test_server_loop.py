"""The server loop with an in-process grid: results, resume, bad input — fast and exact."""

import numpy as np
import pytest
from _localgrid import LocalGrid

from stamen.config import load
from stamen.server.loop import run_federation
from stamen.server.results import CheckpointError, RunDirectory
from stamen.tasks.task import load_task

BASE = ["federation.clients=5", "run.rounds=3", "task.local_epochs=1", "task.hidden=16"]


def run(tmp_path, name, *overrides, resume=False, cfg=None):
    cfg = cfg or load(overrides=BASE + list(overrides))
    out = tmp_path / name
    summary = run_federation(LocalGrid(cfg), cfg, out, resume=resume)
    return cfg, RunDirectory(out), summary


def strip_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_metrics_rows_and_exact_dense_bytes(tmp_path):
    from stamen import schema as P
    from stamen.schema.train import train_reply

    cfg, rd, summary = run(tmp_path, "a", "federation.fraction_train=0.6")
    rows = rd.read_metrics()
    assert [r["clients"] for r in rows] == [3, 3, 3]
    d = load_task(cfg.task, 5, 0).layout.d
    # oracle: the protobuf size of a dense payload of d fp32 numbers with its records
    # and the identity entries every reply echoes (a 16-hex-digit run id, a 32-hex-digit nonce)
    identity = {P.SCHEMA: P.SCHEMA_VERSION, P.RUN_ID: "0" * 16, P.NONCE: "0" * 32, P.SERVER_ROUND: 1,
                P.PARTITION_ID: 0}
    reply = train_reply({"values": np.zeros(d, np.float32)},
                        {P.NUM_EXAMPLES: 1, "train_loss": 0.5, "local_steps": 1}, "dense", identity)
    one = P.content_bytes(reply)
    for r in rows:
        assert abs(r["uplink_bytes"] - 3 * one) <= 3 * 16  # varints of counts differ by a few bytes
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]


def test_reproducible_and_seed_sensitive(tmp_path):
    _, a, _ = run(tmp_path, "a", "federation.fraction_train=0.6")
    _, b, _ = run(tmp_path, "b", "federation.fraction_train=0.6")
    _, c, _ = run(tmp_path, "c", "federation.fraction_train=0.6", "run.seed=3")
    assert strip_wall(a.read_metrics()) == strip_wall(b.read_metrics()) != strip_wall(c.read_metrics())


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm", "fedavg", "fedprox", "fedmedian", "krum", "fedtrimmedavg"])
def test_resume_equals_uninterrupted(tmp_path, strategy):
    opts = [f"strategy.name={strategy}", "federation.fraction_train=0.6"]
    _, full, _ = run(tmp_path, "full", *opts, "run.rounds=4")
    cfg, part, _ = run(tmp_path, "part", *opts, "run.rounds=2")
    run(tmp_path, "part", resume=True, cfg=load(part.config_path, ["run.rounds=4"]))
    assert strip_wall(part.read_metrics()) == strip_wall(full.read_metrics())


def test_resume_refuses_other_config_and_missing_checkpoint(tmp_path):
    cfg, rd, _ = run(tmp_path, "a", "run.rounds=1")
    with pytest.raises(CheckpointError, match="different config"):
        run(tmp_path, "a", resume=True, cfg=load(rd.config_path, ["run.seed=9"]))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(tmp_path, "empty", resume=True, cfg=cfg)


def _retamper(path, change):
    """Rewrite the checkpoint's members by hand (numpy, no Stamen code): ``change`` edits the dict."""
    with np.load(path, allow_pickle=False) as z:
        members = {n: z[n] for n in z.files}
    change(members)
    with open(path, "wb") as f:
        np.savez(f, **members)


def _nudge_first_array(members):
    a = members["a0"].copy()
    a.flat[0] = a.flat[0] + 1
    members["a0"] = a


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"not a checkpoint"), "not a readable .npz"),  # the old test's "not a pickle"
    (lambda p: p.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))),
     "not a readable .npz"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
    (lambda p: _retamper(p, _nudge_first_array), "checksum does not match"),
], ids=["not-npz", "random-bytes", "truncated", "wrong-checksum"])
def test_resume_refuses_a_damaged_checkpoint_and_changes_nothing(tmp_path, damage, message):
    _, rd, _ = run(tmp_path, "a", "run.rounds=2")
    damage(rd.checkpoint_path)
    before = {p.name: p.read_bytes() for p in rd.path.iterdir()}
    with pytest.raises(CheckpointError) as err:
        run(tmp_path, "a", resume=True, cfg=load(rd.config_path, ["run.rounds=3"]))
    assert message in str(err.value) and str(rd.checkpoint_path) in str(err.value)
    assert {p.name: p.read_bytes() for p in rd.path.iterdir()} == before


def test_checkpoint_arrays_are_checked_against_the_model_layout(tmp_path):
    cfg, rd, _ = run(tmp_path, "a", "run.rounds=1")
    layout = load_task(cfg.task, 5, 0).layout
    state = rd.load_checkpoint(layout=layout)  # the run's own checkpoint fits its model
    assert list(state["arrays"]) == list(layout.names)
    first, second = layout.names[0], layout.names[1]
    wrong = dict(state["arrays"])
    wrong[first] = np.zeros((7, 7), np.float32)
    del wrong[second]
    rd.save_checkpoint({**state, "arrays": wrong})  # a valid file: only the layout can tell
    with pytest.raises(CheckpointError) as err:
        rd.load_checkpoint(layout=layout)
    msg = str(err.value)
    assert str(rd.checkpoint_path) in msg and f"missing tensors [{second!r}]" in msg
    assert f"{first!r} has shape (7, 7), the model expects {tuple(layout.shapes[0])}" in msg


def test_a_pickle_checkpoint_is_refused_then_resumes_once_converted(tmp_path):
    import pickle

    from stamen.server.checkpoint import LegacyCheckpointError, convert_legacy_checkpoint

    _, full, _ = run(tmp_path, "full", "run.rounds=3")
    _, rd, _ = run(tmp_path, "part", "run.rounds=2")
    state = rd.load_checkpoint()
    rd.legacy_checkpoint_path.write_bytes(pickle.dumps({"format": 1, **state}))  # what Stamen < 2 wrote
    rd.checkpoint_path.unlink()
    with pytest.raises(LegacyCheckpointError, match="pickle written by an older Stamen.*convert-checkpoint"):
        run(tmp_path, "part", resume=True, cfg=load(rd.config_path, ["run.rounds=3"]))
    assert not rd.checkpoint_path.exists()
    convert_legacy_checkpoint(rd.path)
    run(tmp_path, "part", resume=True, cfg=load(rd.config_path, ["run.rounds=3"]))
    assert strip_wall(rd.read_metrics()) == strip_wall(full.read_metrics())


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_resume_completes(tmp_path, monkeypatch):
    import errno
    import os

    _, full, _ = run(tmp_path, "full", "run.rounds=3")
    real_savez, calls = np.savez, []

    def savez_on_a_filling_disk(f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # round 2's checkpoint: some bytes land, then the disk is full
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_savez(f, *args, **kwargs)

    monkeypatch.setattr(np, "savez", savez_on_a_filling_disk)
    cfg = load(overrides=BASE + ["run.rounds=3"])
    with pytest.raises(CheckpointError, match="no space left on device; the previous checkpoint is intact"):
        run(tmp_path, "part", cfg=cfg)
    monkeypatch.undo()
    rd = RunDirectory(tmp_path / "part")
    assert not [p.name for p in rd.path.iterdir() if p.name.startswith(".")]  # no temp file left
    assert rd.load_checkpoint()["round"] == 1
    run(tmp_path, "part", resume=True, cfg=cfg)
    assert strip_wall(rd.read_metrics()) == strip_wall(full.read_metrics())


def test_resume_with_a_damaged_metrics_line_names_it_and_changes_nothing(tmp_path):
    _, rd, _ = run(tmp_path, "a", "run.rounds=2")
    lines = rd.metrics_path.read_text().splitlines(keepends=True)
    rd.metrics_path.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # round 2's line cut short
    before = {p.name: p.read_bytes() for p in rd.path.iterdir()}
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl, line 2: not a JSON object"):
        run(tmp_path, "a", resume=True, cfg=load(rd.config_path, ["run.rounds=3"]))
    assert {p.name: p.read_bytes() for p in rd.path.iterdir()} == before


def test_lost_replies_are_survived(tmp_path):
    cfg = load(overrides=BASE)
    grid = LocalGrid(cfg, fail=lambda m: m.metadata.message_type == "train" and m.metadata.dst_node_id == 1000)
    run_federation(grid, cfg, tmp_path / "x")
    rows = RunDirectory(tmp_path / "x").read_metrics()
    assert [r["clients"] for r in rows] == [4, 4, 4]


def test_federated_evaluation_is_recorded(tmp_path):
    _, rd, _ = run(tmp_path, "a", "federation.fraction_evaluate=1.0")
    rows = rd.read_metrics()
    assert all(0 <= r["federated_eval_accuracy"] <= 1 and r["eval_uplink_bytes"] > 0 for r in rows)


def test_proximal_term_keeps_weights_near_the_anchor():
    import torch

    from stamen.client.trainers import TrainSettings, train_sgd
    from stamen.tasks.task import get_weights

    task = load_task(load(overrides=BASE).task, 5, 0)
    X, y = task.data.client(0)
    dist = []
    for mu in (0.0, 1.0, 100.0):
        model = task.new_model()
        w0 = task.layout.flatten(get_weights(model))
        train_sgd(model, X, y, TrainSettings(epochs=3, batch_size=8, lr=0.005, proximal_mu=mu),
                  torch.Generator().manual_seed(0))
        dist.append(float((task.layout.flatten(get_weights(model)) - w0).norm()))
    assert dist[0] > dist[1] > dist[2]
