"""Train messages: the instruction's ``config`` entries and the reply's records.

**Instruction** (server → client, message type ``train``): ``arrays`` — the global weights, or
a strategy's compressed downlink (catch-up payloads); ``config`` — the entries below. The
identity entries (:data:`stamen.schema.SCHEMA`, ``RUN_ID``, ``SERVER_ROUND``, ``PARTITION_ID``,
``NONCE``) are always present; the rest only when a strategy or the privacy stage asks for
them. :data:`INSTRUCTION_KEYS` lists every entry with its type; the client refuses an
instruction with an unknown entry, a missing identity entry or a mistyped value
(:func:`check_instruction`), so a version mismatch fails loudly instead of training wrong.

**Reply** (client → server): ``update`` — the codec's payload for Δ = w_local − w_global;
``metrics`` — ``num-examples``, ``train_loss`` and what a trainer or the privacy hook adds;
``meta`` — the codec's name and the instruction's identity entries, echoed
(:func:`train_reply`).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from stamen.schema import (
    META,
    METRICS,
    NONCE,
    PARTITION_ID,
    RUN_ID,
    SCHEMA,
    SCHEMA_VERSION,
    SERVER_ROUND,
    UPDATE,
    SchemaError,
    to_array_record,
)
from stamen.schema.secagg import INSTRUCTION_KEYS as SECAGG_KEYS

# -- the client pipeline's own entries --------------------------------------------------------
CODEC = "codec"  # the codec the reply must be encoded with
CODEC_OPTIONS = "codec-options"  # JSON of the codec's options
CODEC_ROUND = "codec-round"  # a fixed operator round (FetchSGD's one sketch for the run)
TRAINER = "trainer"  # the client trainer (client/trainers.py registry); default "sgd"
DOWNLINK = "downlink"  # how the client gets the global weights (client DOWNLINKS registry); default "dense"
PROXIMAL_MU = "proximal-mu"  # FedProx (set by Flower's FedProx)

# -- privacy (client/privacy_hooks.py; strategies/dp.py) --------------------------------------
DP_CLIP = "dp-clip"  # C: the L2 bound of what the client sends
DP_SPACE = "dp-space"  # "update": clip Δ before encoding; "payload": clip the codec payload (sketch space)
DP_LOCAL_NOISE_STD = "dp-local-noise-std"  # σ the client adds itself (local DP)
DP_PER_LAYER = "dp-per-layer"  # clip each tensor to C/√L
DP_REPRODUCIBLE = "dp-reproducible"  # debugging only: local noise from the run seed (no guarantee)
DP_UNCLIPPED = "dp-unclipped"  # reply metric: 1.0 if the clipped quantity already fit inside C

# -- catch-up downlinks (strategies/catchup.py, client/catchup.py) -----------------------------
CATCHUP_PREFIXES = ("ferret", "sketched", "fetchsgd")
FERRET_SERVER_LR = "ferret-server-lr"
SKETCHED_SERVER_LR = "sketched-server-lr"
LOCAL_STEPS = "local-steps"  # trainer "steps": exactly this many optimizer steps

# -- FedKSeed (trainer "fedkseed") -------------------------------------------------------------
ZO_STEPS, ZO_EPS, ZO_LR = "zo-steps", "zo-eps", "zo-lr"

# -- FedLEx (trainers "explore" and "guided") ---------------------------------------------------
EXPLORATION_EPOCHS = "exploration-epochs"
EXPLORATION_PATIENCE = "exploration-patience"
EXPLORATION_HOLDOUT = "exploration-holdout"
GUIDANCE = "fedlex-guidance"  # raw little-endian fp32 G in layout order
GUIDANCE_VERSION = "fedlex-guidance-version"

# -- curriculum (trainer "curriculum") ----------------------------------------------------------
CURRICULUM_ORDERING = "curriculum-ordering"
CURRICULUM_PACING = "curriculum-pacing"
CURRICULUM_A, CURRICULUM_B = "curriculum-a", "curriculum-b"
CURRICULUM_SCORER = "curriculum-scorer"
CURRICULUM_SCORE = "curriculum-score"
CURRICULUM_EXPERT_EPOCHS = "curriculum-expert-epochs"
CURRICULUM_REPORT_SCORE = "curriculum-report-score"
CLIENT_SCORE = "client-score"  # reply metric: the client's mean example score

# -- federated adversarial training (trainer "adversarial") ------------------------------------
ATTACK_EPS, ATTACK_STEPS, ATTACK_STEP_SIZE = "attack-eps", "attack-steps", "attack-step-size"
ATTACK_NORM, ATTACK_MIX, ATTACK_RANDOM_START = "attack-norm", "attack-mix", "attack-random-start"


class CatchUpKeys:
    """The entries of one catch-up downlink, ``<prefix>-…`` (the same strings on both sides)."""

    def __init__(self, prefix: str):
        if prefix not in CATCHUP_PREFIXES:
            raise ValueError(f"unknown catch-up downlink {prefix!r}; add it to CATCHUP_PREFIXES in stamen/schema/train.py")
        self.prefix = prefix
        self.downlink = prefix  # the value of DOWNLINK, the client's DOWNLINKS entry
        self.sync = f"{prefix}-sync"  # "dense" | "catch-up"
        self.global_round = f"{prefix}-round"  # the round whose global weights the client trains from (t − 1)
        self.base_round = f"{prefix}-base-round"  # catch-up: the round the server believes the node holds
        self.rounds = f"{prefix}-rounds"  # catch-up: the rounds whose payloads the message carries, in order
        self.check_sum = f"{prefix}-sum"  # fp64 Σw of the server's weights
        self.check_norm = f"{prefix}-norm"  # fp64 ‖w‖ of the server's weights

    def entries(self) -> dict[str, tuple[type, ...]]:
        return {self.sync: (str,), self.global_round: (int,), self.base_round: (int,), self.rounds: (list,),
                self.check_sum: (float, int), self.check_norm: (float, int)}


_NUM = (int, float)
#: every entry an instruction's ``config`` may carry, with the types it may have
INSTRUCTION_KEYS: dict[str, tuple[type, ...]] = {
    SCHEMA: (int,), RUN_ID: (str,), NONCE: (str,), SERVER_ROUND: (int,), PARTITION_ID: (int,),
    CODEC: (str,), CODEC_OPTIONS: (str,), CODEC_ROUND: (int,), TRAINER: (str,), DOWNLINK: (str,), PROXIMAL_MU: _NUM,
    DP_CLIP: _NUM, DP_SPACE: (str,), DP_LOCAL_NOISE_STD: _NUM, DP_PER_LAYER: (bool,), DP_REPRODUCIBLE: (bool,),
    FERRET_SERVER_LR: _NUM, SKETCHED_SERVER_LR: _NUM, LOCAL_STEPS: (int,),
    ZO_STEPS: (int,), ZO_EPS: _NUM, ZO_LR: _NUM,
    EXPLORATION_EPOCHS: (int,), EXPLORATION_PATIENCE: (int,), EXPLORATION_HOLDOUT: _NUM,
    GUIDANCE: (bytes,), GUIDANCE_VERSION: (str,),
    CURRICULUM_ORDERING: (str,), CURRICULUM_PACING: (str,), CURRICULUM_A: _NUM, CURRICULUM_B: _NUM,
    CURRICULUM_SCORER: (str,), CURRICULUM_SCORE: (str,), CURRICULUM_EXPERT_EPOCHS: (int,),
    CURRICULUM_REPORT_SCORE: (bool,),
    ATTACK_EPS: _NUM, ATTACK_STEPS: (int,), ATTACK_STEP_SIZE: _NUM, ATTACK_NORM: (str,), ATTACK_MIX: _NUM,
    ATTACK_RANDOM_START: (bool,),
}
for _prefix in CATCHUP_PREFIXES:
    INSTRUCTION_KEYS.update(CatchUpKeys(_prefix).entries())

INSTRUCTION_KEYS.update(SECAGG_KEYS)  # secure aggregation's entries (stamen/schema/secagg.py)

IDENTITY = (SCHEMA, RUN_ID, NONCE, SERVER_ROUND, PARTITION_ID)


def check_instruction(config: dict[str, Any], *, partition_id: int | None = None) -> None:
    """Refuse a train instruction that is not in this schema (raises :class:`SchemaError`)."""
    version = config.get(SCHEMA)
    if version != SCHEMA_VERSION:
        raise SchemaError(f"this is not a Stamen train instruction of schema {SCHEMA_VERSION} ({SCHEMA}={version!r}); "
                          f"is the ServerApp a Stamen app of the same version?")
    missing = [k for k in IDENTITY if k not in config]
    if missing:
        raise SchemaError(f"train instruction lacks {missing}")
    for key, value in config.items():
        kinds = INSTRUCTION_KEYS.get(key)
        if kinds is None:
            raise SchemaError(f"train instruction has unknown entry {key!r} (schema {SCHEMA_VERSION})")
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise SchemaError(f"train instruction entry {key!r} must be {'/'.join(k.__name__ for k in kinds)}, "
                              f"got {type(value).__name__}")
    if partition_id is not None and config[PARTITION_ID] != partition_id:
        raise SchemaError(f"instruction is for partition-id {config[PARTITION_ID]}, this node holds {partition_id}")


def train_reply(payload: dict, metrics: dict[str, float], codec: str, instruction: dict[str, Any],
                extra_meta: dict | None = None) -> RecordDict:
    """A reply: the payload, the metrics, and ``meta`` with the codec and the instruction's identity echoed."""
    meta = {CODEC: codec, **{k: instruction[k] for k in IDENTITY}, **(extra_meta or {})}
    return RecordDict({UPDATE: to_array_record(payload), METRICS: MetricRecord(metrics), META: ConfigRecord(meta)})

