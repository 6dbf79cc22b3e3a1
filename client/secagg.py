"""Client side of secure aggregation (the protocol: ``stamen/schema/secagg.py``).

Three query handlers (registered in the ClientApp's ``QUERIES``) and :func:`mask_payload`, the
last stage of the client's train pipeline when the instruction carries ``secagg-*`` entries. The
node keeps the round's secrets in its ``context.state`` (record ``secagg``): its two private
keys, its self-mask seed b_u, the keys it shares with each neighbour (share encryption), the
neighbours' mask-agreement public keys and the encrypted shares it received;
they are overwritten next round. Every secret (keys, b_u, the stochastic rounding, the noise
share) comes from OS entropy.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from stamen import schema as S
from stamen.privacy.distributed import discrete_gaussian, stochastic_round, to_field
from stamen.privacy.noise import SecretNoise
from stamen.schema import SchemaError
from stamen.schema import secagg as A

STATE = "secagg"


def _state(context: Context) -> ConfigRecord:
    if STATE not in context.state.config_records:
        raise SchemaError("secure aggregation: this node has no keys for this round (it missed the key exchange)")
    return context.state.config_records[STATE]


def _round_config(msg: Message) -> dict[str, Any]:
    return dict(msg.content.config_records[S.CONFIG])


def _size(context: Context, cfg) -> int:
    from stamen.client.app import _partition_id, _worker

    return _worker(cfg).task.data.size(_partition_id(context))


def handle_keys(cfg, msg: Message, context: Context) -> RecordDict:
    """Step 1: two key pairs (the mask-agreement one from a secret seed); answer with the public keys."""
    config = _round_config(msg)
    c_sk, c_pk = generate_key_pairs()
    s_seed = secrets.token_bytes(32)
    s_pk = A.mask_key(s_seed).public_key()
    context.state[STATE] = ConfigRecord({"round": int(config[S.SERVER_ROUND]), "c_sk": private_key_to_bytes(c_sk),
                                         "s_seed": s_seed})
    return RecordDict({S.METRICS: MetricRecord({S.NUM_EXAMPLES: _size(context, cfg)}),
                       A.RECORD: ConfigRecord({A.PK_C: public_key_to_bytes(c_pk), A.PK_S: public_key_to_bytes(s_pk)})})


def handle_shares(cfg, msg: Message, context: Context) -> RecordDict:
    """Step 2: share b_u and the mask key among the neighbourhood; encrypt each pair for its holder."""
    config, state = _round_config(msg), _state(context)
    me = int(config[S.PARTITION_ID])
    if int(state["round"]) != int(config[S.SERVER_ROUND]):
        raise SchemaError("secure aggregation: shares asked for another round than this node's keys")
    neighbours = [int(v) for v in config[A.NEIGHBOURS]]
    threshold = int(config[A.THRESHOLD])
    b_u = secrets.token_bytes(32)
    holders = [me, *neighbours]  # share i goes to holders[i]; the node keeps its own
    b_shares = create_shares(b_u, threshold, len(holders))
    sk_shares = create_shares(bytes(state["s_seed"]), threshold, len(holders))
    c_sk = bytes_to_private_key(bytes(state["c_sk"]))
    ciphertexts, cipher_keys = [], []  # the pairwise share-encryption keys, kept to decrypt at step 4
    for i, (v, pk) in enumerate(zip(neighbours, config[A.PK_C]), start=1):
        cipher_keys.append(generate_shared_key(c_sk, bytes_to_public_key(bytes(pk))))
        ciphertexts.append(encrypt(cipher_keys[-1], share_keys_plaintext_concat(me, v, b_shares[i], sk_shares[i])))
    context.state[STATE] = ConfigRecord({**dict(state), "b_u": b_u, "neighbours": neighbours,
                                         "cipher_keys": cipher_keys, "pk_s": list(config[A.PK_S]),
                                         "own_b": b_shares[0], "own_sk": sk_shares[0]})
    return RecordDict({S.METRICS: MetricRecord({S.NUM_EXAMPLES: _size(context, cfg)}),
                       A.RECORD: ConfigRecord({A.CIPHERTEXTS: ciphertexts, A.NEIGHBOURS: neighbours})})


def mask_payload(payload: dict[str, np.ndarray], config: dict[str, Any], context: Context) -> dict[str, np.ndarray]:
    """Step 3 (after encoding): clip the payload vector, quantise, add the noise share, mask; keep the
    encrypted shares this node received for step 4."""
    state = _state(context)
    me, rnd = int(config[S.PARTITION_ID]), int(config[S.SERVER_ROUND])
    if int(state["round"]) != rnd:
        raise SchemaError("secure aggregation: the train instruction is for another round than this node's keys")
    bits, scale, clip = int(config[A.BITS]), float(config[A.SCALE]), float(config[A.CLIP])
    keys = sorted(payload)
    vector = np.concatenate([np.asarray(payload[k], np.float64).reshape(-1) for k in keys])
    norm = float(np.linalg.norm(vector))
    if norm > clip:
        vector = vector * (clip / norm)
    rng = SecretNoise().numpy_generator()
    values = stochastic_round(scale * vector, rng)
    values += discrete_gaussian(values.shape, float(config.get(A.NOISE_STD, 0.0)), rng)
    masked = to_field(values, bits)
    masked += A.mask(bytes(state["b_u"]), A.self_purpose(me, rnd), masked.size, bits)
    s_sk = A.mask_key(bytes(state["s_seed"]))
    for v, pk in zip(state["neighbours"], state["pk_s"]):
        pair = A.mask(generate_shared_key(s_sk, bytes_to_public_key(bytes(pk))), A.pair_purpose(me, v, rnd),
                      masked.size, bits)
        masked = masked + pair if me < int(v) else masked - pair  # uint64: wraps modulo 2^64, a multiple of m
    masked &= np.uint64((1 << bits) - 1)
    context.state[STATE] = ConfigRecord({**dict(state), "senders": list(config.get(A.SENDERS, [])),
                                         "ciphertexts": list(config.get(A.CIPHERTEXTS, []))})
    return {A.MASKED: masked.astype(A.wire_dtype(bits))}


def handle_unmask(cfg, msg: Message, context: Context) -> RecordDict:
    """Step 4: the shares of b for surviving neighbours and of the mask key for dropped ones."""
    config, state = _round_config(msg), _state(context)
    me = int(config[S.PARTITION_ID])
    survivors, dropped = [int(v) for v in config[A.SURVIVORS]], [int(v) for v in config[A.DROPPED]]
    if set(survivors) & set(dropped):  # both secrets of one client would unmask its own vector
        raise SchemaError("secure aggregation: the unmask query names a client both surviving and dropped")
    if bool(state.get("unmasked", False)):
        raise SchemaError("secure aggregation: this round's shares were already revealed once")
    context.state[STATE] = ConfigRecord({**dict(state), "unmasked": True})
    key_of = dict(zip((int(v) for v in state["neighbours"]), state["cipher_keys"]))
    held: dict[int, tuple[bytes, bytes]] = {me: (bytes(state["own_b"]), bytes(state["own_sk"]))}
    for sender, ciphertext in zip(state["senders"], state["ciphertexts"]):
        sender = int(sender)
        if sender not in key_of:
            raise SchemaError(f"secure aggregation: a share from {sender}, who is not a neighbour")
        src, dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(bytes(key_of[sender]), bytes(ciphertext)))
        if (src, dst) != (sender, me):
            raise SchemaError("secure aggregation: a share addressed to another pair of nodes")
        held[sender] = (b_share, sk_share)
    missing = [v for v in survivors + dropped if v not in held]
    if missing:
        raise SchemaError(f"secure aggregation: no share held for {missing}")
    return RecordDict({S.METRICS: MetricRecord({S.NUM_EXAMPLES: _size(context, cfg)}),
                       A.RECORD: ConfigRecord({A.B_SHARES: [held[v][0] for v in survivors],
                                               A.SK_SHARES: [held[v][1] for v in dropped]})})


def _register() -> None:
    from stamen.client.app import QUERIES

    QUERIES[A.KEYS_QUERY] = handle_keys
    QUERIES[A.SHARES_QUERY] = handle_shares
    QUERIES[A.UNMASK_QUERY] = handle_unmask


_register()
