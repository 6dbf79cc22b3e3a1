"""Checkpoints are data, never code: round trip, refusals, tampering, legacy pickles, full disks, damaged metrics.

Oracles: the tree that was saved (compared with exact types), hand-made defective files, a
pickle whose unpickling would leave a marker file behind, and the checksum recomputed here
from the format's description (not from the module's code).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stamen.server import checkpoint as ck
from stamen.server.checkpoint import LegacyCheckpointError, read_checkpoint, write_checkpoint
from stamen.server.results import CheckpointError, OutputDirError, RunDirectory, ensure_writable_dir


def assert_same(a, b, path="<root>"):
    """Equal values *and* equal types, all the way down (nan equals nan, -0.0 is not 0.0)."""
    if isinstance(a, torch.Tensor):
        assert type(b) is torch.Tensor, path
        assert a.dtype == b.dtype and a.shape == b.shape and b.device.type == "cpu", path
        assert torch.equal(a.detach().cpu().float() if a.dtype == torch.bfloat16 else a.detach().cpu(),
                           b.float() if b.dtype == torch.bfloat16 else b), path
        return
    assert type(a) is type(b), f"{path}: {type(a).__name__} came back as {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes(order="C") == b.tobytes(order="C"), path
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} came back as {list(b)}"
        for (ka, va), kb in zip(a.items(), b):
            assert_same(ka, kb, f"{path} key {ka!r}")
            assert_same(va, b[kb], f"{path}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def rich_tree():
    shared = np.arange(3, dtype=np.float32)
    return {
        "round": 7,
        "fingerprint": "abc",
        "arrays": {"fc.weight": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
                   "fc.bias": np.zeros(3, np.float32)},
        "scalars": [0, -3, 10**40, 1.5, -0.0, math.inf, -math.inf, math.nan, 1e-310, True, False, None,
                    "", "ünïcode ∂", "1", b"", b"\x00\xffbytes"],
        "keys": {1: "int", "1": "str", 2.5: "float", None: "none", (1, "a", (2.0,)): "tuple", b"k": "bytes",
                 np.int64(4): "numpy int", -7: {"nested": {0: [1, (2, [3, {"deep": ()}])]}}},
        "empty": [[], (), {}, np.zeros((0, 3), np.float64)],
        "numpy": [np.float32(1.25), np.float64(-2.5), np.int8(-8), np.uint64(2**63), np.bool_(True),
                  np.complex64(1 + 2j), np.str_("s"), np.datetime64("2024-01-02T03:04")],
        "ndarrays": (np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
                     np.array([[1, -2]], dtype=">i4"), np.array([True, False]), np.array(3.5),
                     np.array(["ab", "c"]), np.array([1 + 1j], np.complex128),
                     np.zeros(2, dtype=[("x", "<i2"), ("y", ">f8")]), np.arange(10, dtype=np.uint16)[::3],
                     np.array([np.nan, np.inf], np.float16)),
        "tensors": [torch.tensor([1.5, -2.0], dtype=torch.bfloat16), torch.arange(6).reshape(2, 3).T,
                    torch.tensor(3.0), torch.tensor([True, False]), torch.zeros(0, 2, dtype=torch.float16),
                    torch.nn.Parameter(torch.ones(2)), torch.tensor([1 + 2j], dtype=torch.complex64)],
        "same array twice": [shared, shared],
    }


def test_rich_tree_round_trips_with_exact_types(tmp_path):
    tree = rich_tree()
    write_checkpoint(tmp_path / "c.npz", tree)
    back = read_checkpoint(tmp_path / "c.npz")
    assert_same(tree, back)
    assert 1 in back["keys"] and "1" in back["keys"] and back["keys"][1] != back["keys"]["1"]
    back["same array twice"][0][0] = 99  # two entries, two arrays: no hidden aliasing
    assert back["same array twice"][1][0] == 0
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_run_state_round_trips_through_the_run_directory(tmp_path):
    rd = RunDirectory(tmp_path)
    state = {"round": 2, "arrays": {"w": np.ones((2, 2), np.float32)}, "strategy": {"m": {"w": np.zeros(4)}},
             "fingerprint": "f" * 64}
    rd.save_checkpoint(state)
    assert rd.checkpoint_path == tmp_path / "checkpoint.npz" and zipfile.is_zipfile(rd.checkpoint_path)
    assert_same(state, rd.load_checkpoint(layout={"w": (2, 2)}))
    rd.save_checkpoint({k: v for k, v in state.items() if k != "round"})
    with pytest.raises(CheckpointError, match="'round' is missing"):
        rd.load_checkpoint()


def test_the_checksum_is_the_documented_one(tmp_path):
    """Recompute sha256 from the module docstring's description; it must equal the header's."""
    write_checkpoint(tmp_path / "c.npz", {"a": np.arange(4, dtype=np.int32).reshape(2, 2), "t": torch.ones(1)})
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        header = json.loads(z["header"].tobytes())
        h = hashlib.sha256()
        for name in ["tree"] + [f"a{i}" for i in range(header["arrays"])]:
            a = z[name]
            for part in (name, a.dtype.str, str(a.dtype), json.dumps(list(a.shape))):
                h.update(part.encode() + b"\0")
            h.update(np.ascontiguousarray(a).tobytes())
    assert header == {"format": "stamen-checkpoint", "version": 2, "arrays": 2, "sha256": h.hexdigest()}


class ClientCurriculum:  # stands in for a strategy object that is not a tree
    pass


@pytest.mark.parametrize("tree, where", [
    ({"strategy": {"selector": ClientCurriculum()}}, "strategy.selector: cannot store object of type ClientCurriculum"),
    ({"strategy": {"history": [1, 2, {3, 4}]}}, "strategy.history[2]: cannot store object of type set"),
    ({"strategy": {5: (1, ClientCurriculum)}}, "strategy[5][1]: cannot store object of type type"),
    ({"counts": defaultdict(int)}, "counts: cannot store object of type defaultdict"),
    ({"a": {"b-c": np.array([object()], dtype=object)}}, "a['b-c']: cannot store a numpy array of dtype object"),
    ({"x": {frozenset(): 1}}, "x: cannot store a dict key of type frozenset"),
    ({"m": np.ma.masked_array([1.0])}, "m: cannot store object of type MaskedArray"),
    ({"r": range(3)}, "r: cannot store object of type range"),
    ({"g": torch.Generator()}, "g: cannot store object of type Generator"),
])
def test_a_non_tree_object_is_named_by_its_path(tmp_path, tree, where):
    with pytest.raises(CheckpointError) as err:
        write_checkpoint(tmp_path / "c.npz", tree)
    assert str(err.value).startswith(where)
    assert not any(tmp_path.iterdir())  # nothing written, no temp file


def test_a_cycle_is_refused(tmp_path):
    loop = [1]
    loop.append(loop)
    with pytest.raises(CheckpointError, match=r"^\[1\]: cannot store a list that contains itself"):
        write_checkpoint(tmp_path / "c.npz", loop)


def _rewrite(path: Path, change) -> None:
    """Rewrite the archive's members (a dict name -> array) through ``change``, as numpy would."""
    with np.load(path, allow_pickle=False) as z:
        members = {n: z[n] for n in z.files}
    change(members)
    with open(path, "wb") as f:
        np.savez(f, **members)


def _set_header(members, **fields):
    header = json.loads(members["header"].tobytes())
    header.update(fields)
    members["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)


def _flip_weight(members):
    a = members["a0"].copy()
    a.flat[0] += 1
    members["a0"] = a


@pytest.mark.parametrize("damage, message", [
    (lambda p: _rewrite(p, _flip_weight), "checksum does not match"),
    (lambda p: _rewrite(p, lambda m: m.__setitem__("a0", m["a0"].astype(np.float64))), "checksum does not match"),
    (lambda p: _rewrite(p, lambda m: m.__setitem__("tree", np.frombuffer(
        m["tree"].tobytes().replace(b'"w"', b'"v"'), np.uint8))), "checksum does not match"),
    (lambda p: _rewrite(p, lambda m: _set_header(m, version=3)), "format version 3; this Stamen reads version 2"),
    (lambda p: _rewrite(p, lambda m: _set_header(m, format="other")), "not a Stamen checkpoint"),
    (lambda p: _rewrite(p, lambda m: _set_header(m, arrays=0)), "do not match its header"),
    (lambda p: _rewrite(p, lambda m: m.pop("header")), "no 'header' member"),
    (lambda p: _rewrite(p, lambda m: m.__setitem__("extra", np.zeros(1))), "do not match its header"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "not a readable .npz"),
    (lambda p: p.write_bytes(b""), "not a readable .npz"),
    (lambda p: p.write_bytes(pickle.dumps({"round": 1})), "not a readable .npz"),
], ids=["value", "dtype", "tree", "version", "format", "count", "no-header", "extra-member", "truncated", "garbage",
        "empty", "pickle"])
def test_a_damaged_checkpoint_is_refused_with_its_name(tmp_path, damage, message):
    p = tmp_path / "checkpoint.npz"
    write_checkpoint(p, {"w": np.arange(4, dtype=np.float32), "round": 1})
    damage(p)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(p)
    assert message in str(err.value) and str(p) in str(err.value)


def test_flipped_bytes_anywhere_never_escape_as_a_raw_exception(tmp_path):
    p = tmp_path / "checkpoint.npz"
    write_checkpoint(p, {"w": np.arange(64, dtype=np.float32), "s": "text", "t": torch.ones(3)})
    good = p.read_bytes()
    rng = np.random.default_rng(0)
    refused = 0
    for pos in rng.choice(len(good), size=60, replace=False):
        bad = bytearray(good)
        bad[pos] ^= 0xFF
        p.write_bytes(bytes(bad))
        try:
            read_checkpoint(p)  # a flip in zip bookkeeping (dates, CRCs) may go unnoticed; data may not
        except CheckpointError as err:
            assert str(p) in str(err)
            refused += 1
    assert refused >= 30


class _Boom:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_np_load_never_allows_pickle_and_object_arrays_are_refused(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    p = tmp_path / "checkpoint.npz"
    write_checkpoint(p, {"w": np.zeros(2, np.float32)})
    _rewrite(p, lambda m: None)  # sanity: rewriting by hand keeps it valid
    read_checkpoint(p)
    # the same members, but a0 is an object array holding the payload (np.savez pickles it)
    _rewrite(p, lambda m: m.__setitem__("a0", np.array([_Boom(marker)], dtype=object)))

    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle", "default"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    with pytest.raises(CheckpointError, match="pickled"):
        read_checkpoint(p)
    assert calls and all(c is False for c in calls)
    assert not marker.exists()
    real_load(p, allow_pickle=True)["a0"]  # the oracle: loading it with pickle does run the payload
    assert marker.exists()


def test_layout_mismatches_are_all_named(tmp_path):
    p = tmp_path / "checkpoint.npz"
    write_checkpoint(p, {"arrays": {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float64),
                                    "extra": np.zeros(1, np.float32)}})
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(p, layout={"a": (3, 2), "b": (4,), "c": (1,)})
    msg = str(err.value)
    assert str(p) in msg and "missing tensors ['c']" in msg and "unexpected tensors ['extra']" in msg
    assert "'a' has shape (2, 3), the model expects (3, 2)" in msg and "'b' has dtype float64" in msg
    write_checkpoint(p, {"arrays": {"a": np.zeros((2, 3), np.float32)}})
    from stamen.core import Layout

    assert read_checkpoint(p, layout=Layout(("a",), ((2, 3),)))["arrays"]["a"].shape == (2, 3)


# -- legacy pickles and `stamen convert-checkpoint` -------------------------------------------

def legacy_state():
    return {"round": 2, "arrays": {"fc.weight": np.ones((2, 3), np.float32)},
            "strategy": {"momentum": {"fc.weight": np.full((2, 3), 0.5, np.float32)}, "t": np.int64(2),
                         "moments": torch.arange(4, dtype=torch.float32), 3: ("x", 1.5)},
            "fingerprint": "feed"}


def write_legacy(run_dir: Path, state) -> Path:
    """What Stamen before format 2 wrote: ``pickle.dumps({"format": 1, **state})``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    p = run_dir / "checkpoint.pkl"
    p.write_bytes(pickle.dumps({"format": 1, **state}))
    return p


def cli(*args, input=None):
    from stamen.cli import app

    result = CliRunner().invoke(app, list(args), input=input)
    return result, " ".join(result.output.split())


def test_a_pickle_only_directory_is_refused_with_the_convert_hint(tmp_path):
    write_legacy(tmp_path, legacy_state())
    with pytest.raises(LegacyCheckpointError) as err:
        RunDirectory(tmp_path).load_checkpoint()
    msg = str(err.value)
    assert "pickle" in msg and "older Stamen" in msg and "run arbitrary code" in msg
    assert f"stamen convert-checkpoint {tmp_path}" in msg


def test_convert_checkpoint_asks_first_and_keeps_the_old_file(tmp_path):
    legacy = write_legacy(tmp_path, legacy_state())
    before = legacy.read_bytes()
    result, out = cli("convert-checkpoint", str(tmp_path), input="n\n")
    assert result.exit_code == 1 and "arbitrary code" in out and "nothing was changed" in out
    assert legacy.read_bytes() == before and not (tmp_path / "checkpoint.npz").exists()

    result, out = cli("convert-checkpoint", str(tmp_path), input="y\n")
    assert result.exit_code == 0, out
    assert not legacy.exists() and (tmp_path / "checkpoint.pkl.converted").read_bytes() == before
    assert_same(legacy_state(), RunDirectory(tmp_path).load_checkpoint())

    result, out = cli("convert-checkpoint", str(tmp_path), "--trust")  # nothing left to convert
    assert result.exit_code == 2 and "no checkpoint.pkl" in out


def test_convert_checkpoint_with_trust_does_not_ask(tmp_path):
    write_legacy(tmp_path, legacy_state())
    result, out = cli("convert-checkpoint", str(tmp_path), "--trust")  # no input: a prompt would abort
    assert result.exit_code == 0, out
    assert "trust this file" not in out
    assert_same(legacy_state(), RunDirectory(tmp_path).load_checkpoint())


def test_convert_refuses_a_pickle_that_would_run_code_even_when_trusted(tmp_path):
    marker = tmp_path / "code-ran"
    legacy = write_legacy(tmp_path, {**legacy_state(), "strategy": {"x": _Boom(marker)}})
    result, out = cli("convert-checkpoint", str(tmp_path), "--trust")
    assert result.exit_code == 2 and "pathlib" in out and "not converted" in out
    assert not marker.exists() and legacy.exists() and not (tmp_path / "checkpoint.npz").exists()
    pickle.loads(legacy.read_bytes())  # the oracle: plain pickle runs it
    assert marker.exists()


def test_convert_refuses_a_state_that_is_not_a_tree(tmp_path):
    legacy = write_legacy(tmp_path, {**legacy_state(), "strategy": {"seen": {1, 2}}})
    with pytest.raises(CheckpointError, match=r"strategy\.seen: cannot store object of type set"):
        ck.convert_legacy_checkpoint(tmp_path)
    assert legacy.exists() and not (tmp_path / "checkpoint.npz").exists()


def test_convert_does_not_overwrite_a_new_checkpoint(tmp_path):
    write_legacy(tmp_path, legacy_state())
    RunDirectory(tmp_path).save_checkpoint({**legacy_state(), "round": 5})
    result, out = cli("convert-checkpoint", str(tmp_path))  # no prompt: it refuses at once
    assert result.exit_code == 2 and "already holds checkpoint.npz" in out
    assert RunDirectory(tmp_path).load_checkpoint()["round"] == 5


# -- full disk, damaged metrics, unwritable --out -------------------------------------------------

def _state(rnd):
    return {"round": rnd, "arrays": {"w": np.full(1000, rnd, np.float32)}, "strategy": {}, "fingerprint": "f"}


class _FillsUp:
    """A file that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, where):
    rd = RunDirectory(tmp_path)
    rd.save_checkpoint(_state(1))
    before = rd.checkpoint_path.read_bytes()
    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FillsUp(real_fdopen(fd, *a, **k), 1500))
    else:
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError) as err:
        rd.save_checkpoint(_state(2))
    assert str(err.value).startswith(f"could not write checkpoint {rd.checkpoint_path}: no space left on device; "
                                     "the previous checkpoint is intact")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]  # no temp file left
    assert rd.checkpoint_path.read_bytes() == before and rd.load_checkpoint()["round"] == 1


def test_a_full_disk_on_the_first_checkpoint_says_none_was_written(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match="no space left on device; no checkpoint was written"):
        RunDirectory(tmp_path).save_checkpoint(_state(1))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("damage, line", [
    (lambda text: text[: text.rindex("}")], 3),  # the last line cut short
    (lambda text: text.replace('"round": 2', '"round": 2,,', 1), 2),
    (lambda text: text.replace("\n", "\n[1, 2]\n", 1), 2),
    (lambda text: text + '{"no round": 1}\n', 4),
])
def test_a_damaged_metrics_line_is_named_and_nothing_is_changed(tmp_path, damage, line):
    rd = RunDirectory(tmp_path)
    rd.write_metrics([{"round": r, "test_accuracy": 0.5} for r in (1, 2, 3)])
    rd.metrics_path.write_text(damage(rd.metrics_path.read_text()))
    before = rd.metrics_path.read_bytes()
    with pytest.raises(CheckpointError, match=rf"metrics\.jsonl, line {line}: .*the file is damaged"):
        rd.read_metrics()
    assert rd.metrics_path.read_bytes() == before


def test_metrics_that_are_not_utf8_are_named_by_line(tmp_path):
    rd = RunDirectory(tmp_path)
    rd.metrics_path.write_bytes(b'{"round": 1}\n{"round": 2, "x": "\xff"}\n')
    with pytest.raises(CheckpointError, match=r"line 2: not UTF-8"):
        rd.read_metrics()


def test_ensure_writable_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match=f"{blocker} exists and is not a directory"):
        ensure_writable_dir(blocker / "sub" / "run")
    with pytest.raises(OutputDirError, match="not a directory"):
        ensure_writable_dir(blocker)
    new = tmp_path / "x" / "y" / "z"
    assert ensure_writable_dir(new) == new
    assert not (tmp_path / "x").exists()  # the check leaves nothing behind
    (tmp_path / "kept").mkdir()
    ensure_writable_dir(tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []


def test_run_with_an_unwritable_out_exits_2_before_anything_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result, out = cli("run", "--out", str(blocker / "run"), "--set", "run.rounds=1")
    assert result.exit_code == 2 and "error:" in out and "is not a directory" in out
    assert "Traceback" not in out and blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
