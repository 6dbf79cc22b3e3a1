"""Fuzzing the trust boundaries (DESIGN.md, "Trust boundaries") with hypothesis.

Three targets, each with its own oracle:

1. **Acceptance** — thousands of malformed replies, mixed with valid ones, against bound round
   pipelines (fedavg with seven codecs, ferret, sketched_dp with and without clipping). Every
   malformed reply carries exactly one defect, so the reason code the acceptance stage must give
   is known in advance; the valid replies go to a second pipeline too (same seed, same run),
   and the model and metrics of the fuzzed pipeline must equal that oracle's bit for bit.
2. **Codec decoders** — arbitrary payload dicts (derived from valid payloads by random
   mutations, or drawn from scratch): ``PayloadError`` / ``ValueError`` naming the defect, or a
   finite fp32 vector of length d. Hostile sizes are refused before anything of that size is
   allocated (``tracemalloc``; numpy registers its buffers with it).
3. **Checkpoint loader** — arbitrary bytes, byte-level mutations of a valid checkpoint and
   hand-built archives with valid checksums but hostile trees: ``CheckpointError`` with a
   message, or (for a harmless mutation) exactly the tree that was written; a pickle is never
   unpickled (its payload would leave a marker file).

Each target has its own fixed seed (the same cases on every run); ``STAMEN_FUZZ_SCALE=k`` runs
k times as many, ``STAMEN_FUZZ_RANDOM=1`` draws new ones. The case counts are printed (``-s``) and,
with ``STAMEN_FUZZ_REPORT=FILE``, written as JSON.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import string
import time
import tracemalloc
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from _fakes import BOUND, LAYOUT, NODES, bound_strategy, configure, global_weights, reply_to
from stamen import schema as P
from stamen.core import Layout
from stamen.schema import train as T
from stamen.server import checkpoint as ck
from stamen.server.checkpoint import read_checkpoint, write_checkpoint
from stamen.server.results import CheckpointError
from stamen.sketching.codec import CODECS, CodecContext, PayloadError, make_codec
from stamen.strategies.pipeline import ForeignClientError

SCALE = float(os.environ.get("STAMEN_FUZZ_SCALE", "1"))
COUNTS: dict[str, dict] = {}  # target -> counts, printed at the end of the module


RANDOM = os.environ.get("STAMEN_FUZZ_RANDOM") == "1"


def fuzz(examples: int, name: str):
    """hypothesis settings for ``examples`` cases, seeded by ``name`` (each target explores its own
    cases, the same on every run) unless STAMEN_FUZZ_RANDOM=1."""
    def wrap(test):
        test = settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None, print_blob=True,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                               HealthCheck.filter_too_much])(test)
        return test if RANDOM else seed(zlib.crc32(name.encode()))(test)
    return wrap


@pytest.fixture(scope="module", autouse=True)
def flower_identity_and_report():
    """Flower stamps messages with the run and node of the current process: fake one (as _fakes
    does, module-wide here because hypothesis runs many examples per test); print the counts."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    loggers = {name: logging.getLogger(name) for name in ("stamen", "flwr")}
    levels = {name: lg.level for name, lg in loggers.items()}
    for lg in loggers.values():  # thousands of rejections: their log lines would dominate the run time
        lg.setLevel(logging.ERROR)
    yield
    for name, lg in loggers.items():
        lg.setLevel(levels[name])
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old
    if COUNTS:
        print("\nfuzz case counts:\n" + json.dumps(COUNTS, indent=1, sort_keys=True))
        if os.environ.get("STAMEN_FUZZ_REPORT"):
            Path(os.environ["STAMEN_FUZZ_REPORT"]).write_text(json.dumps(COUNTS, indent=1, sort_keys=True) + "\n")


# =============================================================================================
# 1. acceptance
# =============================================================================================

PIPELINES = {
    "fedavg/dense": ("fedavg", "dense", ()),
    "fedavg/fp16": ("fedavg", "fp16", ()),
    "fedavg/int8": ("fedavg", "int8", ()),
    "fedavg/topk": ("fedavg", "topk", ("compression.ratio=0.5",)),
    "fedavg/countsketch": ("fedavg", "countsketch", ("compression.ratio=0.5",)),
    "fedavg/srht": ("fedavg", "srht", ("compression.ratio=0.5",)),
    "fedavg/gaussian": ("fedavg", "gaussian", ("compression.ratio=0.5",)),
    "ferret": ("ferret", "ferret", ("strategy.K=8",)),
    "sketched_dp/srht": ("sketched_dp", "srht", ("compression.ratio=0.5",)),
    "sketched_dp/countsketch+clip": ("sketched_dp", "countsketch", (
        "compression.ratio=0.5", "privacy.clip=1.0", "privacy.site='sketch'", "privacy.sampling='none'")),
}
CODES = ("client-error", "not-stamen", "schema", "wrong-run", "wrong-round", "unknown-instruction", "wrong-node",
         "wrong-partition", "duplicate", "metrics", "num-examples", "codec", "payload")
INT64 = (-2**63, 2**63 - 1)
#: values a ConfigRecord can carry (what a forged ``meta`` entry may hold)
CONFIG_VALUES = st.one_of(st.integers(*INT64), st.floats(), st.text(max_size=24), st.binary(max_size=12),
                          st.booleans(), st.lists(st.integers(-3, 3), max_size=3),
                          st.lists(st.text(max_size=3), min_size=1, max_size=2))


def same(value, expected) -> bool:
    return type(value) is type(expected) and value == expected


def other_than(expected):
    """A value that is not ``expected`` — near misses first (other type, ±1, text), then anything."""
    near = [expected + 1, expected - 1, float(expected), str(expected), bool(expected), [expected]] \
        if type(expected) is int else [expected + "x", expected[:-1], expected.upper(), expected.encode(), 0]
    return st.one_of(st.sampled_from(near), CONFIG_VALUES).filter(lambda v: not same(v, expected))


def pick(data, options):
    return data.draw(st.sampled_from(list(options)))


def pid_of(msg) -> int:
    return msg.content.config_records[P.CONFIG][P.PARTITION_ID]


class Harness:
    """A fuzzed pipeline and its oracle (bound alike; the oracle sees only the valid replies)."""

    def __init__(self, key: str):
        name, codec, extra = PIPELINES[key]
        self.key, self.codec_name, self.strategy = key, codec, name
        self.s = bound_strategy(name, *extra, codec=codec)
        self.o = bound_strategy(name, *extra, codec=codec)
        self.wire = self.s.wire_codec
        privacy = self.s.privacy
        self.required = tuple(privacy.required_metrics) if privacy is not None else ()
        self.stats: Counter = Counter()
        self.reasons: Counter = Counter()
        codec_obj = self.s.run.codec
        self.n_blocks = len(codec_obj.blocks(LAYOUT)) if codec == "ferret" else 0
        self.K = getattr(codec_obj, "K", 0)
        # round 1, honest, on both: its replies are the first replays (the stash is never empty, so that
        # what hypothesis draws never depends on state left by earlier examples)
        self.round = 1
        for pipeline in (self.o, self.s):
            replies = [self.good_reply(m, self.encode(np.full(LAYOUT.d, 0.1, np.float32), 1, pid_of(m)), 10)
                       for m in configure(pipeline, 1)]
            pipeline.aggregate_train(1, replies)
            assert pipeline.last_rejected == []
        self.stash: list[Message] = replies  # the fuzzed pipeline's own

    def encode(self, delta: np.ndarray, rnd: int, pid: int) -> dict[str, np.ndarray]:
        return self.s.run.codec.encode(torch.from_numpy(delta), CodecContext(0, rnd, LAYOUT, node=pid))

    def good_reply(self, msg, payload, n):
        return reply_to(msg, None, n, codec=self.wire, payload=payload, metrics={k: 1.0 for k in self.required})


_HARNESSES: dict[str, Harness] = {}


# -- payload defects (each makes the payload invalid for this pipeline, whatever was drawn) ---------
BAD_DTYPES = [np.dtype(t) for t in ("float64", "float32", "float16", "int8", "int16", "int32", "int64", "uint8",
                                    "uint16", "bool", "complex64", ">f4")]


def allowed_dtypes(h: Harness, key: str, arr: np.ndarray) -> set:
    if h.strategy == "fedavg" and h.codec_name == "topk" and key == "indices":
        return {np.dtype(np.int32), np.dtype(np.int64)}
    return {arr.dtype}


def npy_bytes(arr: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


class Touch:
    """Unpickling this creates ``path``: the marker that a payload or checkpoint was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"stamen-fuzz-unpickled-{os.getpid()}"
MARKER.unlink(missing_ok=True)


def payload_defect(data, h: Harness, payload: dict[str, np.ndarray]):
    """(kind, payload dict) or (kind, a replacement for the whole ``update`` record)."""
    kinds = ["drop-key", "extra-key", "resize", "dtype", "nonfinite", "ndim", "empty", "lying-header",
             "short-data", "pickled", "stype", "no-update", "update-not-arrays"]
    specific = {("fedavg", "topk"): ["index-range", "index-duplicate"],
                ("fedavg", "int8"): ["q-below-range", "negative-scale"],
                ("ferret", "ferret"): ["block-range", "seed-range", "repeat-pair", "huge-coefficients"]}.get(
                    (h.strategy, h.codec_name), [])
    kind = pick(data, specific if specific and data.draw(st.booleans(), label="codec-specific") else kinds)
    p = {k: np.array(v, copy=True) for k, v in payload.items()}
    keys = sorted(p)
    key = data.draw(st.sampled_from(keys), label="key")
    arr = p[key]
    if kind == "drop-key":
        del p[key]
    elif kind == "extra-key":
        name = data.draw(st.text(string.ascii_letters + "-_.", min_size=1, max_size=10).filter(lambda k: k not in p))
        p[name] = np.zeros(data.draw(st.integers(0, 5)), dtype=np.float32)
    elif kind == "resize":
        size = arr.size
        new = data.draw(st.one_of(st.integers(0, max(0, size - 1)), st.integers(size + 1, size + 40),
                                  st.just(size * 50 + 1)).filter(lambda n: n != size), label="length")
        flat = np.resize(arr.reshape(-1), new) if new else arr.reshape(-1)[:0]
        p[key] = flat.reshape(arr.shape[0], -1) if arr.ndim == 2 and new % arr.shape[0] == 0 and new else flat
    elif kind == "dtype":
        bad = [t for t in BAD_DTYPES if t not in allowed_dtypes(h, key, arr)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p[key] = arr.astype(data.draw(st.sampled_from(bad), label="dtype"))
    elif kind == "nonfinite":
        key = data.draw(st.sampled_from([k for k in keys if p[k].dtype.kind == "f" and p[k].size]), label="float key")
        flat = p[key].reshape(-1)
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "ndim":
        p[key] = arr.reshape((1, *arr.shape))
    elif kind == "empty":
        p = {}
    elif kind in ("lying-header", "short-data", "pickled", "stype"):
        record = P.to_array_record(p)
        if kind == "lying-header":  # a few bytes declaring a huge array (numpy would allocate it)
            buf = io.BytesIO()
            shape = (data.draw(st.integers(2**20, 2**50), label="declared length"),)
            np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
            record[key] = Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=buf.getvalue() + b"\0" * 16)
        elif kind == "short-data":  # the right header, the data cut short or padded
            raw = npy_bytes(arr)
            cut = data.draw(st.one_of(st.integers(1, max(1, arr.nbytes)), st.integers(-64, -1)), label="cut")
            raw = raw[:-cut] if cut > 0 else raw + b"\0" * -cut
            record[key] = Array(dtype=str(arr.dtype), shape=arr.shape, stype="numpy.ndarray", data=raw)
        elif kind == "pickled":
            obj = np.array([Touch(MARKER)], dtype=object)
            record[key] = Array(dtype="object", shape=(1,), stype="numpy.ndarray",
                                data=npy_bytes(obj, allow_pickle=True))
        else:
            record[key] = Array(dtype=str(arr.dtype), shape=arr.shape, stype="torch.Tensor", data=npy_bytes(arr))
        return kind, record
    elif kind == "no-update":
        return kind, None
    elif kind == "update-not-arrays":
        return kind, ConfigRecord({k: v.tobytes() for k, v in p.items()})
    elif kind == "index-range":
        idx = p["indices"]
        idx[data.draw(st.integers(0, idx.size - 1))] = data.draw(
            st.one_of(st.integers(LAYOUT.d, 2**31 - 1), st.integers(-2**31, -1)), label="index")
    elif kind == "index-duplicate":
        idx = p["indices"]
        assert idx.size >= 2
        idx[1] = idx[0]
    elif kind == "q-below-range":
        p["q"][data.draw(st.integers(0, p["q"].size - 1))] = -128
    elif kind == "negative-scale":
        p["scales"][data.draw(st.integers(0, p["scales"].size - 1))] = -data.draw(st.floats(1e-30, 1e30))
    elif kind in ("block-range", "seed-range"):
        name, limit = ("block", h.n_blocks) if kind == "block-range" else ("seed", h.K)
        top = np.iinfo(p[name].dtype).max
        p[name][data.draw(st.integers(0, p[name].size - 1))] = data.draw(
            st.one_of(st.integers(limit, top), st.integers(-top, -1)), label=name)
    elif kind == "repeat-pair":
        assert p["block"].size >= 2
        p["block"][1], p["seed"][1] = p["block"][0], p["seed"][0]
    elif kind == "huge-coefficients":  # finite, but the reconstruction would overflow fp32
        p["value"][:] = np.float32(3.0e38) * np.sign(p["value"] + 0.5)
    return kind, p


def defective_reply(data, h: Harness, rnd: int, msg, msgs: dict, payload, n, code=None):
    """One reply to ``msg`` with exactly one defect (of reason ``code``, or any); returns (reply,
    expected reason code, defect)."""
    code = code or pick(data, [c for c in CODES if c != "duplicate"])
    pid = pid_of(msg)
    meta_of = lambda r: r.content.config_records[P.META]  # noqa: E731
    good = lambda: h.good_reply(msg, payload, n)  # noqa: E731
    kind = code
    if code == "client-error":
        reply = Message(error=Error(code=data.draw(st.integers(0, 10)), reason=data.draw(st.text(max_size=20))),
                        reply_to=msg)
    elif code == "not-stamen":
        kind = pick(data, ["no-meta", "meta-without-schema", "meta-not-config", "plain-flower"])
        reply = good()
        if kind == "no-meta":
            del reply.content[P.META]
        elif kind == "meta-without-schema":
            del meta_of(reply)[P.SCHEMA]
        elif kind == "meta-not-config":
            reply.content[P.META] = MetricRecord({P.SCHEMA: P.SCHEMA_VERSION})
        else:  # a plain Flower ClientApp's reply: its weights and num-examples
            reply = Message(content=RecordDict({P.ARRAYS: P.to_array_record(global_weights()),
                                                P.METRICS: MetricRecord({P.NUM_EXAMPLES: n})}), reply_to=msg)
    elif code in ("schema", "wrong-run", "wrong-round", "wrong-partition", "codec", "unknown-instruction"):
        field, expected = {"schema": (P.SCHEMA, P.SCHEMA_VERSION), "wrong-run": (P.RUN_ID, "test-run"),
                           "wrong-round": (P.SERVER_ROUND, rnd), "wrong-partition": (P.PARTITION_ID, pid),
                           "codec": (T.CODEC, h.wire),
                           "unknown-instruction": (P.NONCE, meta_of(good())[P.NONCE])}[code]
        reply = good()
        how = pick(data, {"wrong-round": ["value", "missing", "replay"],
                          "unknown-instruction": ["value", "missing", "replay"],
                          "wrong-partition": ["value", "missing", "other-partition"]}.get(code, ["value", "missing"]))
        kind = f"{code}:{how}"
        if how == "missing" and code != "schema":
            del meta_of(reply)[field]
        elif how == "replay" and code == "wrong-round":  # a genuine reply of an earlier round
            reply = h.stash[data.draw(st.integers(0, 7), label="replayed") % len(h.stash)]
        elif how == "replay" and code == "unknown-instruction":  # an old nonce, the round patched
            meta_of(reply)[P.NONCE] = meta_of(h.stash[data.draw(st.integers(0, 7)) % len(h.stash)])[P.NONCE]
        elif how == "other-partition" and code == "wrong-partition":  # forge another partition
            meta_of(reply)[P.PARTITION_ID] = data.draw(st.sampled_from([q for q in NODES if q != pid]))
        else:  # a wrong value (also for "missing schema", which would be "not-stamen")
            kind = f"{code}:value"
            meta_of(reply)[field] = data.draw(other_than(expected), label=field)
    elif code == "wrong-node":
        reply = good()
        kind = "wrong-node:" + pick(data, ["from-another-node", "another-nodes-nonce"])
        if kind.endswith("another-nodes-nonce"):  # it answers the instruction another node got
            other = data.draw(st.sampled_from([m for q, m in sorted(msgs.items()) if q != pid]))
            meta_of(reply)[P.NONCE] = other.content.config_records[P.CONFIG][P.NONCE]
        else:
            reply.metadata._src_node_id = data.draw(st.one_of(
                st.sampled_from([nid for q, nid in NODES.items() if q != pid]),
                st.integers(0, 2**63 - 1).filter(lambda x: x != NODES[pid])), label="src node")
    elif code == "metrics":
        kind = pick(data, ["no-record", "record-not-metrics", "nonfinite", "list", "no-num-examples"]
                    + (["no-required"] if h.required else []))
        reply = good()
        metrics = reply.content.metric_records[P.METRICS]
        if kind == "no-record":
            del reply.content[P.METRICS]
        elif kind == "record-not-metrics":
            reply.content[P.METRICS] = ConfigRecord({P.NUM_EXAMPLES: str(n), "train_loss": "1.0"})
        elif kind == "nonfinite":
            metrics[data.draw(st.sampled_from(sorted(metrics)))] = data.draw(st.sampled_from([math.nan, math.inf,
                                                                                              -math.inf]))
        elif kind == "list":
            metrics[data.draw(st.sampled_from(sorted(metrics)))] = [float(n), 1.0]
        elif kind == "no-num-examples":
            del metrics[P.NUM_EXAMPLES]
        else:
            del metrics[data.draw(st.sampled_from(h.required))]
    elif code == "num-examples":
        bad_n = data.draw(st.one_of(
            st.integers(INT64[0], 0), st.integers(BOUND + 1, INT64[1]), st.just(1e12), st.just(-0.0),
            st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
            st.floats(min_value=BOUND, exclude_min=True, allow_nan=False, allow_infinity=False)), label="num-examples")
        reply = h.good_reply(msg, payload, bad_n)
    else:  # payload
        kind, bad = payload_defect(data, h, payload)
        kind = f"payload:{kind}"
        reply = good()
        if isinstance(bad, dict):
            reply = h.good_reply(msg, bad, n)
        elif bad is None:
            del reply.content[P.UPDATE]
        else:
            reply.content[P.UPDATE] = bad
    return reply, code, kind


def fuzz_round(data, h: Harness, forced: str) -> None:
    """One round: one partition's reply has a defect of reason ``forced``; the others are valid,
    absent or defective at random, with duplicates and copies from other nodes."""
    h.round += 1
    rnd = h.round
    forced_pid = data.draw(st.sampled_from(sorted(NODES)), label="forced partition")
    msgs = {pid_of(m): m for m in configure(h.s, rnd)}
    oracle_msgs = {pid_of(m): m for m in configure(h.o, rnd)}
    assert sorted(msgs) == sorted(oracle_msgs) == sorted(NODES)
    replies, expected, oracle_replies, genuine, valid_pids = [], [], [], [], []
    for pid, msg in sorted(msgs.items()):
        fate = "valid" if pid == forced_pid and forced == "duplicate" else "defect" if pid == forced_pid else \
            pick(data, ["valid", "valid", "absent", "defect", "defect", "defect"])
        if fate == "absent":
            continue
        scale = data.draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="delta seed"))
        delta = (rng.standard_normal(LAYOUT.d) * scale).astype(np.float32)
        n = data.draw(st.one_of(st.integers(1, BOUND), st.floats(1e-3, BOUND)), label="num-examples")
        payload = h.encode(delta, rnd, pid)
        if fate == "valid":
            reply = h.good_reply(msg, payload, n)
            replies.append(reply)
            genuine.append(reply)
            oracle_replies.append(h.good_reply(oracle_msgs[pid], payload, n))
            valid_pids.append(pid)
            h.stats["valid"] += 1
            copies = 1 if pid == forced_pid else pick(data, [0, 0, 0, 1, 1, 2])
            for _ in range(copies):  # duplicates / a copy from another node
                if pid == forced_pid or data.draw(st.booleans()):
                    replies.append(reply)
                    expected.append("duplicate")
                    h.stats["defect:duplicate"] += 1
                else:
                    stolen = h.good_reply(msg, payload, n)
                    stolen.metadata._src_node_id = data.draw(st.sampled_from(
                        [nid for q, nid in NODES.items() if q != pid]))
                    replies.append(stolen)
                    expected.append("wrong-node")
                    h.stats["defect:wrong-node:stolen"] += 1
        else:
            reply, code, kind = defective_reply(data, h, rnd, msg, msgs, payload, n,
                                                code=forced if pid == forced_pid else None)
            replies.append(reply)
            expected.append(code)
            h.stats[f"defect:{kind}"] += 1
    replies = data.draw(st.permutations(replies), label="arrival order")
    h.stats["replies"] += len(replies)
    h.stats["rounds"] += 1

    if replies and all(code == "not-stamen" for code in expected) and len(expected) == len(replies):
        with pytest.raises(ForeignClientError, match=f"0 of {len(replies)} replies were Stamen replies"):
            h.s.aggregate_train(rnd, replies)  # the documented exception: nothing in the round speaks Stamen
        h.stats["rounds:foreign-client-error"] += 1
        h.reasons.update(expected)
        return
    arrays, metrics = h.s.aggregate_train(rnd, replies)  # never raises
    want_arrays, want_metrics = h.o.aggregate_train(rnd, oracle_replies)

    got_codes = Counter(code for _, code, _ in h.s.last_rejected)
    assert got_codes == Counter(expected), (got_codes, expected, h.s.last_rejected)
    assert all(isinstance(msg, str) and msg for _, _, msg in h.s.last_rejected)
    assert h.s.last_participants == h.o.last_participants == valid_pids  # partition order
    assert h.o.last_rejected == []
    h.reasons.update(expected)
    assert not MARKER.exists(), "a payload was unpickled"
    assert (arrays is None) == (want_arrays is None)
    if arrays is not None:
        got, want = P.from_array_record(arrays), P.from_array_record(want_arrays)
        assert sorted(got) == sorted(want)
        for k in got:
            assert np.isfinite(got[k]).all()
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    assert (metrics is None) == (want_metrics is None)
    if metrics is not None:
        assert dict(metrics) == dict(want_metrics)
    if genuine:
        h.stash = genuine


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("key", list(PIPELINES))
def test_acceptance_rejects_every_malformed_reply_and_aggregates_only_the_valid_ones(key, code, one_torch_thread):
    """Every round has a reply rejected for ``code`` (so each reason is exercised for each pipeline,
    however hypothesis spreads its draws), among random valid, absent and defective replies."""
    h = _HARNESSES.get(key) or _HARNESSES.setdefault(key, Harness(key))
    before = h.reasons[code]

    @fuzz(20 if code == "payload" else 7, f"{key} {code}")  # payload defects come in ~17 kinds
    @given(st.data())
    def run(data):
        fuzz_round(data, h, code)

    t0 = time.process_time()
    run()
    c = COUNTS.setdefault(f"acceptance {key}", {"cpu_s": 0.0})
    c.update({"cpu_s": round(c["cpu_s"] + time.process_time() - t0, 2), "rounds": h.stats["rounds"],
              "replies": h.stats["replies"], "valid": h.stats["valid"], "rejected": dict(sorted(h.reasons.items())),
              "foreign-client-error rounds": h.stats["rounds:foreign-client-error"],
              "defects": {k[7:]: v for k, v in sorted(h.stats.items()) if k.startswith("defect:")}})
    assert h.reasons[code] > before


@pytest.mark.parametrize("key", ["fedavg/dense", "ferret"])
def test_a_round_of_only_foreign_replies_raises_foreign_client_error_and_one_stamen_reply_does_not(key):
    """The one documented exception: every reply of the round is not a Stamen reply. One Stamen
    reply among them — even a rejected one — and the round goes on."""
    h = _HARNESSES.get(key) or _HARNESSES.setdefault(key, Harness(key))
    stats = Counter()

    @fuzz(25, f"foreign {key}")
    @given(st.data())
    def run(data):
        h.round += 1
        msgs = {pid_of(m): m for m in configure(h.s, h.round)}
        replies = []
        for pid in data.draw(st.lists(st.sampled_from(sorted(msgs)), min_size=1, max_size=6), label="senders"):
            payload = h.encode(np.ones(LAYOUT.d, np.float32), h.round, pid)
            reply, code, _ = defective_reply(data, h, h.round, msgs[pid], msgs, payload, 5, code="not-stamen")
            assert code == "not-stamen"
            replies.append(reply)
        one_stamen = data.draw(st.booleans(), label="one Stamen reply")
        if one_stamen:
            pid = data.draw(st.sampled_from(sorted(msgs)))
            payload = h.encode(np.ones(LAYOUT.d, np.float32), h.round, pid)
            replies.insert(data.draw(st.integers(0, len(replies))), defective_reply(
                data, h, h.round, msgs[pid], msgs, payload, 5, code=data.draw(st.sampled_from(
                    ["client-error", "wrong-round", "payload", "metrics"])))[0] if data.draw(st.booleans())
                else h.good_reply(msgs[pid], payload, 5))
            h.s.aggregate_train(h.round, replies)  # no exception
            assert h.s.last_reasons.get("not-stamen") == len(replies) - 1
            stats["mixed rounds"] += 1
        else:
            with pytest.raises(ForeignClientError, match=f"0 of {len(replies)} replies were Stamen replies"):
                h.s.aggregate_train(h.round, replies)
            stats["ForeignClientError rounds"] += 1

    run()
    COUNTS[f"acceptance foreign replies {key}"] = dict(stats)
    assert stats["ForeignClientError rounds"] and stats["mixed rounds"]


# -- plain regressions found by the fuzzer ----------------------------------------------------------
def _one_round_with(defect):
    h = Harness("fedavg/dense")
    msgs = {pid_of(m): m for m in configure(h.s, 1)}
    replies = [h.good_reply(m, {"values": np.ones(LAYOUT.d, np.float32)}, 5) for pid, m in sorted(msgs.items())]
    defect(replies[0])
    arrays, _ = h.s.aggregate_train(1, replies)
    return h.s, arrays


def test_payload_whose_npy_header_declares_a_petabyte_is_rejected_without_allocating_it():
    """Found by the fuzzer: ``Array.numpy()`` (np.load) allocates the size the header declares
    before reading; 144 bytes declaring 2**47 float64 raised MemoryError out of aggregate_train."""
    def lie(reply):
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (2**47,)})
        reply.content[P.UPDATE] = ArrayRecord({"values": Array(dtype="float64", shape=(2**47,),
                                                               stype="numpy.ndarray", data=buf.getvalue() + bytes(16))})

    tracemalloc.start()
    try:
        s, arrays = _one_round_with(lie)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s.last_reasons == {"payload": 1} and "declares shape (140737488355328,)" in s.last_rejected[0][2]
    assert arrays is not None and peak < 64 << 20


@pytest.mark.parametrize("field, retyped, code", [
    (P.SCHEMA, bool, "schema"), (P.SCHEMA, float, "schema"),
    (P.SERVER_ROUND, float, "wrong-round"), (P.SERVER_ROUND, bool, "wrong-round"),
    (P.PARTITION_ID, float, "wrong-partition"),
])
def test_identity_entries_must_have_the_types_the_server_issued(field, retyped, code):
    """Found by the fuzzer: ``True``/``1.0`` compared equal to the int the server issued (schema 1,
    round 1; a partition id as a float)."""
    def retype(reply):
        meta = reply.content.config_records[P.META]
        assert retyped(meta[field]) == meta[field]  # the same value, another type
        meta[field] = retyped(meta[field])

    s, _ = _one_round_with(retype)
    assert s.last_reasons == {code: 1}


def test_ferret_coefficients_that_would_overflow_fp32_are_rejected_at_acceptance():
    """Found by the fuzzer: finite coefficients (3e38) passed acceptance and their reconstruction
    overflowed to inf (FerretCodec.decode returned a non-finite vector)."""
    codec = make_codec("ferret", K=8)
    layout = Layout(("w",), ((4,),))
    ctx = CodecContext(0, 1, layout)
    payload = {"block": np.zeros(2, np.int16), "seed": np.array([0, 1], np.int16),
               "value": np.full(2, 3.0e38, np.float32)}
    with pytest.raises(PayloadError, match="too large"):
        codec.decode(payload, ctx)
    ok = dict(payload, value=np.full(2, 1.0e37, np.float32))
    assert torch.isfinite(codec.decode(ok, ctx)).all()


def test_one_huge_sketch_does_not_crash_the_sketched_dp_round():
    """One client's finite but huge sketch (3e38 entries) overflows the de-sketched mean: the round fails
    cleanly (model unchanged), as an overflowing update does; the run goes on."""
    layout = Layout(("w",), ((1024,),))
    s = bound_strategy("sketched_dp", "compression.ratio=0.5", codec="srht", layout=layout)
    msgs = list(s.configure_train(1, P.to_array_record({"w": np.zeros(1024, np.float32)}), ConfigRecord(), None))
    replies = []
    for i, m in enumerate(msgs):
        payload = s.run.codec.encode(torch.full((1024,), 0.01), CodecContext(0, 1, layout, node=pid_of(m)))
        if i == 0:
            payload = {k: np.full_like(v, 3.0e38) for k, v in payload.items()}
        replies.append(reply_to(m, None, 5, codec=s.wire_codec, payload=payload))
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is None and len(s.last_participants) == len(msgs)


# =============================================================================================
# 2. codec decoders
# =============================================================================================

DLAYOUT = Layout(("w", "b", "v"), ((6, 5), (5,), (12,)))  # d = 47 (not a power of two: SRHT pads)
RATIO_CODECS = {"topk", "gaussian", "rademacher", "srht", "sparsejl", "countsketch"}


def general_codecs() -> list[str]:
    make_codec("dense")  # loads the codec plugins
    return sorted(name for name, cls in CODECS.items() if cls.general_purpose)


def codec_for(name: str):
    return make_codec(name, **({"ratio": 0.3} if name in RATIO_CODECS else {"K": 16} if name == "ferret" else {}))


ANY_DTYPE = st.sampled_from([np.dtype(t) for t in (
    "float32", "float64", "float16", ">f4", "int8", "int16", "int32", "int64", "uint8", "uint32", "bool",
    "complex64", "U3", "S2", "datetime64[s]")] + [np.dtype([("x", "<i2"), ("y", ">f4")])])


def hostile_array(draw_dtype=ANY_DTYPE):
    return hnp.arrays(draw_dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))


def mutate_payload(data, payload: dict[str, np.ndarray], d: int) -> dict:
    p = {k: np.array(v, copy=True) for k, v in payload.items()}
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        what = data.draw(st.sampled_from(["value", "special", "dtype", "shape", "drop", "add", "replace", "huge"]))
        keys = sorted(p)
        key = data.draw(st.sampled_from(keys)) if keys else None
        if what == "add" or key is None:
            p[data.draw(st.sampled_from(["values", "q", "indices", "sketch", "table", "block", "seed", "value",
                                         "scales", "extra"]))] = data.draw(hostile_array())
        elif what == "drop":
            del p[key]
        elif what == "replace":
            p[key] = data.draw(hostile_array(st.just(p[key].dtype)) if data.draw(st.booleans()) else hostile_array())
        elif what == "dtype":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    p[key] = p[key].astype(data.draw(ANY_DTYPE))
                except (TypeError, ValueError):
                    pass
        elif what == "shape":
            flat = p[key].reshape(-1)
            n = data.draw(st.sampled_from([0, 1, max(0, flat.size - 1), flat.size + 1, 3 * d, 2 * flat.size]))
            p[key] = np.resize(flat, n) if n and flat.size else flat[:0]
            if data.draw(st.booleans()) and p[key].size:
                p[key] = p[key].reshape(1, -1)
        elif p[key].size:
            flat = p[key].reshape(-1)
            i = data.draw(st.integers(0, flat.size - 1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if what == "special" and flat.dtype.kind in "fc":
                    flat[i] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.0, 6.0e4, 3.0e38, -3.0e38, 1e-45]))
                elif what == "huge" and flat.dtype.kind in "fc":
                    flat[:] = np.finfo(flat.dtype).max * data.draw(st.sampled_from([1.0, -1.0, 0.5]))
                elif flat.dtype.kind in "iu":
                    info = np.iinfo(flat.dtype)
                    flat[i] = data.draw(st.sampled_from([v for v in (info.min, info.max, -1, 0, d, d - 1, d + 1)
                                                         if info.min <= v <= info.max]))
                elif flat.dtype.kind == "f":
                    flat[i] = data.draw(st.floats(width=min(64, 8 * flat.dtype.itemsize)))
    return p


@pytest.mark.parametrize("name", general_codecs())
def test_decoders_reject_malformed_payloads_or_return_a_finite_vector_of_length_d(name, one_torch_thread):
    codec = codec_for(name)
    d = DLAYOUT.d
    stats = Counter()

    @fuzz(150, f"decode {name}")
    @given(st.data())
    def run(data):
        ctx = CodecContext(data.draw(st.integers(0, 3)), data.draw(st.integers(1, 3)), DLAYOUT,
                           node=data.draw(st.integers(-1, 3)))
        if data.draw(st.integers(0, 9), label="from scratch") == 0:
            payload = data.draw(st.dictionaries(st.text(max_size=8), hostile_array(), max_size=4))
        else:
            rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
            valid = codec.encode(torch.from_numpy((rng.standard_normal(d) * 10.0 ** rng.integers(-3, 3))
                                                  .astype(np.float32)), ctx)
            payload = mutate_payload(data, valid, d)
        try:
            out = codec.decode(payload, ctx)
        except ValueError as err:  # PayloadError is a ValueError
            assert str(err), "an error must name the defect"
            stats["rejected:" + type(err).__name__] += 1
            return
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (d,)
        assert bool(torch.isfinite(out).all())
        stats["decoded"] += 1

    t0 = time.process_time()
    run()
    COUNTS[f"decode {name}"] = {"cpu_s": round(time.process_time() - t0, 2), **stats}
    assert stats["decoded"] > 0 and sum(v for k, v in stats.items() if k.startswith("rejected")) > 0


@pytest.mark.parametrize("name", general_codecs())
def test_decoders_refuse_hostile_sizes_before_allocating_them(name):
    """A payload far larger than any valid one (arrays 2000× too long) costs the decoder at most a
    small multiple of max(model, largest valid payload) — not of what the attacker sent."""
    codec = codec_for(name)
    ctx = CodecContext(0, 1, DLAYOUT)
    d = DLAYOUT.d
    valid = codec.encode(torch.randn(d), ctx)
    if name == "ferret":  # variable length: the largest valid payload has blocks × K entries
        valid_bytes = len(codec.blocks(DLAYOUT)) * codec.K * sum(v.itemsize for v in valid.values())
    else:
        valid_bytes = sum(v.nbytes for v in valid.values())
    budget = 16 * max(4 * d, valid_bytes) + (256 << 10)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        codec.decode(valid, ctx)
        used_valid = tracemalloc.get_traced_memory()[1] - base
        results = {}
        for grow in sorted(valid):
            hostile = {k: np.array(v, copy=True) for k, v in valid.items()}
            flat = valid[grow].reshape(-1)
            rows = valid[grow].shape[0] if valid[grow].ndim == 2 else 1
            length = -(-64 * budget // (flat.itemsize * rows)) * rows  # 64 budgets' worth of one array
            big = np.resize(flat, length)
            hostile[grow] = big.reshape(rows, -1) if valid[grow].ndim == 2 else big
            if name == "ferret":  # all three arrays as long (else their length mismatch is caught first)
                hostile = {k: np.resize(v, length) for k, v in valid.items()}
            sent = sum(v.nbytes for v in hostile.values())
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            with pytest.raises(ValueError):
                codec.decode(hostile, ctx)
            results[grow] = (sent, tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()
    COUNTS[f"decode memory {name}"] = {"budget": budget, "valid payload peak": used_valid,
                                       "hostile (sent, peak)": results}
    for grow, (sent, peak) in results.items():
        assert sent > 50 * budget  # the hostile payload is far beyond the budget …
        assert peak <= budget, f"decoding a {sent}-byte hostile payload ({grow!r} too long) allocated {peak} bytes"


# =============================================================================================
# 3. checkpoints
# =============================================================================================

def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


DATA_TYPES = (type(None), bool, int, float, str, bytes, list, tuple, dict, np.ndarray, torch.Tensor)


def _only_data(tree) -> bool:
    """Whether ``tree`` holds plain data only (iterative: a loaded tree may be deeply nested)."""
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, np.generic):
            if x.dtype.hasobject:
                return False
            continue
        if type(x) not in DATA_TYPES or (isinstance(x, np.ndarray) and x.dtype.hasobject):
            return False
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return True


def _valid_tree():
    return {"round": 3, "fingerprint": "f" * 64,
            "arrays": {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3, np.float32)},
            "strategy": {"method": {"server": {"m_t": [np.ones(2)], "t": (1, 2.5, None)}},
                         "privacy": {"acc": b"\x00\x01", 7: math.inf, "x": torch.arange(3)}}}


CK_LAYOUT = {"w": (3, 4), "b": (3,)}


REFUSED = object()


def _read(path: Path, layout=None):
    """read_checkpoint: a tree of plain data, or CheckpointError naming the file (-> REFUSED); nothing else."""
    try:
        tree = read_checkpoint(path, layout=layout)
    except CheckpointError as err:
        assert str(err) and (str(path) in str(err) or "checkpoint" in str(err)), str(err)
        return REFUSED
    assert _only_data(tree)
    return tree


def _write_archive(path: Path, members: dict[str, np.ndarray], *, allow_pickle=False, compress=False):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, arr in members.items():
            z.writestr(name + ".npy", npy_bytes(arr, allow_pickle=allow_pickle))


def _archive(tree_text: str, arrays: dict[str, np.ndarray], header: dict | str | None = None) -> dict:
    """The members of a checkpoint holding ``tree_text`` and ``arrays`` with a correct checksum."""
    members = {"tree": np.frombuffer(tree_text.encode("utf-8", "surrogatepass"), np.uint8), **arrays}
    n = sum(1 for k in arrays if k.startswith("a"))
    if header is None:
        header = {"format": ck.FORMAT, "version": ck.VERSION, "arrays": n,
                  "sha256": ck._digest(members, n) if all(f"a{i}" in members for i in range(n)) else "0"}
    text = header if isinstance(header, str) else json.dumps(header)
    members["header"] = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
    return members


TAGS = ["float", "tuple", "dict", "bytes", "ndarray", "npscalar", "tensor", "set", "object", ""]
TORCH_DTYPES = ["torch.float32", "torch.bfloat16", "torch.int64", "torch.bool", "torch.qint8", "torch.complex64",
                "torch.float8_e4m3fn", "torch.uint16", "float32", "torch.Tensor"]


def _json_trees():
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False,
                       allow_infinity=False), st.text(max_size=6))
    ref = st.one_of(st.sampled_from(["a0", "a1", "a2", "a3", "a00", "a9", "tree", "header", ""]), st.text(max_size=4))

    def tagged(children):
        return st.one_of(
            st.fixed_dictionaries({"$": st.sampled_from(TAGS)}, optional={
                "v": st.one_of(children, st.lists(st.lists(children, max_size=3), max_size=3),
                               st.sampled_from(["nan", "inf", "-inf", "NaN", "AAEC", "%%"])),
                "ref": ref, "dtype": st.sampled_from(TORCH_DTYPES),
                "shape": st.lists(st.one_of(st.integers(-2, 6), st.just(2**62), st.just(10**30), st.text(max_size=1)),
                                  max_size=3),
                "raw": st.one_of(st.booleans(), st.integers(0, 1))}),
            st.dictionaries(st.text(max_size=3), children, max_size=2))

    return st.recursive(scalar, lambda children: st.one_of(st.lists(children, max_size=3), tagged(children)),
                        max_leaves=12)


def _member_arrays():
    dtypes = st.sampled_from([np.dtype(t) for t in (
        "float32", "float64", "uint8", "int64", "bool", "complex64", ">i4", "U2", "S3", "datetime64[ms]",
        "float16")] + [np.dtype([("x", "<i2"), ("y", ">f8")])])
    return st.dictionaries(st.sampled_from(["a0", "a1", "a2", "a3", "a9", "extra"]),
                           hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4)),
                           max_size=4)


def test_checkpoint_loader_refuses_arbitrary_bytes_and_never_unpickles(tmp_path):
    path = tmp_path / "checkpoint.npz"
    evil = pickle.dumps({"format": 1, "x": Touch(MARKER)})
    stats = Counter()

    @fuzz(100, "checkpoint bytes")
    @given(st.one_of(st.binary(max_size=600), st.sampled_from([b"", b"PK\x03\x04", evil, b"\x93NUMPY" + evil]),
                     st.builds(lambda a, b: b"PK\x03\x04" + a + evil + b, st.binary(max_size=40), st.binary(max_size=40))))
    def run(raw):
        path.write_bytes(raw)
        assert _read(path) is REFUSED, "random bytes are not a checkpoint"
        assert not MARKER.exists()
        stats["refused"] += 1

    t0 = time.process_time()
    run()
    COUNTS["checkpoint arbitrary bytes"] = {"cpu_s": round(time.process_time() - t0, 2), **stats}


def test_mutated_checkpoints_are_refused_or_read_back_exactly(tmp_path):
    """Byte flips, cuts, insertions and appended bytes: CheckpointError, or (a harmless change, e.g.
    a zip timestamp) the very tree that was written — never a silently different one."""
    src = tmp_path / "valid.npz"
    tree = _valid_tree()
    write_checkpoint(src, tree)
    assert _same_tree(read_checkpoint(src, layout=CK_LAYOUT), tree)
    clean = src.read_bytes()
    path = tmp_path / "checkpoint.npz"
    stats = Counter()

    @fuzz(150, "checkpoint mutations")
    @given(st.data())
    def run(data):
        raw = bytearray(clean)
        for _ in range(data.draw(st.integers(1, 4), label="mutations")):
            what = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "append", "delete"]))
            i = data.draw(st.integers(0, max(0, len(raw) - 1)), label="position")
            if what == "flip" and raw:
                raw[i] ^= 1 << data.draw(st.integers(0, 7))
            elif what == "set" and raw:
                raw[i] = data.draw(st.integers(0, 255))
            elif what == "cut":
                raw = raw[:i]
            elif what == "insert":
                raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
            elif what == "append":
                raw += data.draw(st.binary(min_size=1, max_size=64))
            elif raw:
                del raw[i:i + data.draw(st.integers(1, 32))]
        path.write_bytes(bytes(raw))
        got = _read(path, layout=CK_LAYOUT if data.draw(st.booleans()) else None)
        if got is REFUSED:
            stats["refused"] += 1
        else:
            assert _same_tree(got, tree), "a mutated checkpoint read back as a different tree"
            stats["read back unchanged"] += 1

    t0 = time.process_time()
    run()
    COUNTS["checkpoint byte mutations"] = {"cpu_s": round(time.process_time() - t0, 2), **stats}
    assert stats["refused"] > 0


def test_hand_built_archives_with_valid_checksums_are_refused_or_hold_only_data(tmp_path):
    """Hostile trees past the checksum (tags, references, tensor metadata, keys), members of any
    dtype, pickled members, extra or missing members, compressed members, odd headers."""
    path = tmp_path / "checkpoint.npz"
    stats = Counter()

    @fuzz(200, "checkpoint archives")
    @given(st.data())
    def run(data):
        arrays = data.draw(_member_arrays(), label="members")
        tree_text = json.dumps(data.draw(_json_trees(), label="tree"))
        twist = data.draw(st.sampled_from(["none", "none", "none", "pickled-member", "compressed", "header",
                                           "tree-not-utf8", "deep-tree", "deep-header"]))
        header = None
        if twist == "header":
            header = data.draw(st.one_of(
                st.fixed_dictionaries({"format": st.sampled_from([ck.FORMAT, "x"]),
                                       "version": st.sampled_from([2, 1, 3, 2.0, True]),
                                       "arrays": st.one_of(st.integers(-1, 5), st.just(True), st.just(2**70)),
                                       "sha256": st.text(max_size=4)}),
                st.text(max_size=20)))
        elif twist == "deep-header":
            header = "[" * 50000 + "]" * 50000
        elif twist == "deep-tree":  # past json's recursion limit, or only past the decoder's
            depth = data.draw(st.sampled_from([300, 700, 30000]))
            tree_text = '{"$": "tuple", "v": [' * depth + "1" + "]}" * depth
        elif twist == "tree-not-utf8":
            tree_text = "\udcff" + tree_text
        members = _archive(tree_text, arrays, header)
        if twist == "pickled-member":
            members[data.draw(st.sampled_from(["a0", "tree", "extra"]))] = np.array([Touch(MARKER)], dtype=object)
        _write_archive(path, members, allow_pickle=twist == "pickled-member", compress=twist == "compressed")
        got = _read(path, layout=CK_LAYOUT if data.draw(st.booleans()) else None)
        assert not MARKER.exists(), "a checkpoint member was unpickled"
        stats["refused" if got is REFUSED else "read (plain data)"] += 1
        stats[f"twist:{twist}"] += 1

    t0 = time.process_time()
    run()
    COUNTS["checkpoint hand-built archives"] = {"cpu_s": round(time.process_time() - t0, 2), **stats}
    assert stats["refused"] > 0 and stats["read (plain data)"] > 0


def test_checkpoint_regressions_found_by_the_fuzzer(tmp_path):
    """A deeply nested header raised RecursionError; a structured (void) numpy scalar as a dict key
    raised TypeError (unhashable) — both out of read_checkpoint instead of CheckpointError."""
    path = tmp_path / "checkpoint.npz"
    np.savez(path, **_archive("null", {}, "[" * 100000 + "]" * 100000))
    with pytest.raises(CheckpointError, match="header is not JSON"):
        read_checkpoint(path)
    key = {"$": "npscalar", "ref": "a0"}
    np.savez(path, **_archive(json.dumps({"$": "dict", "v": [[key, 1]]}),
                              {"a0": np.zeros((), dtype=[("x", "<i4")])}))
    with pytest.raises(CheckpointError, match="dict key of type void"):
        read_checkpoint(path)
    # and an object member is refused without being unpickled
    header = {"format": ck.FORMAT, "version": ck.VERSION, "arrays": 1, "sha256": "0"}
    _write_archive(path, _archive("null", {"a0": np.array([Touch(MARKER)], dtype=object)}, header), allow_pickle=True)
    with pytest.raises(CheckpointError, match="pickled"):
        read_checkpoint(path)
    assert not MARKER.exists()
