"""Secure aggregation messages and the protocol arithmetic both sides must share.

The protocol (server: ``strategies/secagg.py``; client: ``client/secagg.py``) is SecAgg+ (Bell,
Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020) on Stamen's Message API, one round at a time:

1. ``secagg-keys`` (query): each sampled client makes two elliptic-curve key pairs (one to encrypt
   shares, one to agree pairwise masks) and answers with the public keys;
2. ``secagg-shares`` (query): each client learns its neighbours' public keys (a k-regular graph
   over the cohort, :func:`neighbour_graph`), draws a self-mask seed b_u, Shamir-shares b_u and
   the seed of its mask-agreement private key (:func:`mask_key`) among its neighbourhood (threshold t) and answers with one
   share pair per neighbour, encrypted for that neighbour (the server routes, cannot read);
3. the **train** instruction carries each client's incoming encrypted shares; the client trains,
   encodes, quantises into Z_{2^bits} (``privacy/distributed.py``, with its share of discrete
   Gaussian noise under distributed DP) and adds masks: PRG(b_u) + Σ_v ±PRG(s_uv) for its
   neighbours v (+ when u < v); the reply carries only the masked vector;
4. ``secagg-unmask`` (query) to the survivors: each returns, from the shares it holds, b_v for
   every surviving neighbour and the mask key of every neighbour that dropped after step 2; the
   server rebuilds them (≥ t shares each), removes the self-masks of the survivors and the
   pairwise masks survivors added for dropped clients, and learns only Σ_survivors x_u.

Cryptography: ECDH on SECP384R1 + HKDF-SHA256 + Fernet (Flower's
``flwr.common.secure_aggregation.crypto``, over ``cryptography``), Shamir over GF(2^128)
(Flower's, over pycryptodome). Masks are expanded from a 32-byte secret with Philox-4×64
keyed by SHA-256(secret ‖ purpose) (:func:`mask`): Flower's ``pseudo_rand_gen`` reduces its seed
to 32 bits, which a server could enumerate, so it is not used for masks.
"""

from __future__ import annotations

import hashlib

import numpy as np

# queries
KEYS_QUERY, SHARES_QUERY, UNMASK_QUERY = "secagg-keys", "secagg-shares", "secagg-unmask"
RECORD = "secagg"  # the ConfigRecord a secagg reply carries its protocol values in

# config entries (instructions and queries)
BITS = "secagg-bits"  # the field is Z_{2^bits}
SCALE = "secagg-scale"  # γ: payload units → integers
CLIP = "secagg-clip"  # C: L2 bound of a client's payload vector before quantisation
NOISE_STD = "secagg-noise-std"  # σ_c of the client's discrete Gaussian share (0: none)
THRESHOLD = "secagg-threshold"  # t: shares needed to rebuild a secret
NEIGHBOURS = "secagg-neighbours"  # partition ids of the client's neighbours (in order)
PK_C, PK_S = "secagg-pk-c", "secagg-pk-s"  # their public keys (bytes, same order)
SENDERS = "secagg-senders"  # train: who sent the encrypted shares that follow (partition ids)
CIPHERTEXTS = "secagg-ciphertexts"  # train: the shares, encrypted for this client
SURVIVORS, DROPPED = "secagg-survivors", "secagg-dropped"  # unmask: neighbours whose b / mask key is wanted
B_SHARES, SK_SHARES = "secagg-b-shares", "secagg-sk-shares"  # unmask replies (same order as asked)
MASKED = "masked"  # the reply payload array

INSTRUCTION_KEYS: dict[str, tuple[type, ...]] = {
    BITS: (int,), SCALE: (float, int), CLIP: (float, int), NOISE_STD: (float, int), THRESHOLD: (int,),
    NEIGHBOURS: (list,), PK_C: (list,), PK_S: (list,), SENDERS: (list,), CIPHERTEXTS: (list,),
}


def neighbour_graph(seed: int, server_round: int, pids: list[int], degree: int) -> dict[int, list[int]]:
    """A k-regular undirected graph over the cohort (public randomness): the cohort in a seeded random
    order, each client linked to the ⌈k/2⌉ next and ⌊k/2⌋ previous in that ring (Harary). ``degree``
    0, or ≥ n − 1: the complete graph."""
    from stamen.core import derive_seed

    n = len(pids)
    if degree <= 0 or degree >= n - 1:
        return {p: [q for q in sorted(pids) if q != p] for p in pids}
    order = [pids[i] for i in np.random.default_rng(derive_seed(seed, server_round, "secagg-graph")).permutation(n)]
    out: dict[int, set[int]] = {p: set() for p in pids}
    for i, p in enumerate(order):
        for step in range(1, (degree + 1) // 2 + 1):
            q = order[(i + step) % n]
            out[p].add(q)
            out[q].add(p)
    return {p: sorted(v) for p, v in out.items()}


def mask(secret: bytes, purpose: bytes, size: int, bits: int) -> np.ndarray:
    """``size`` uniform elements of Z_{2^bits} (uint64) expanded from a 32-byte secret."""
    key = int.from_bytes(hashlib.sha256(secret + b"|" + purpose).digest()[:16], "little")
    return np.random.Generator(np.random.Philox(key=key)).integers(0, 1 << bits, size=size, dtype=np.uint64)


def pair_purpose(u: int, v: int, server_round: int) -> bytes:
    """The PRG purpose of the pairwise mask of u and v (the same on both ends)."""
    a, b = sorted((int(u), int(v)))
    return f"pair/{server_round}/{a}/{b}".encode()


def self_purpose(u: int, server_round: int) -> bytes:
    return f"self/{server_round}/{int(u)}".encode()


def wire_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned dtype a field element travels as."""
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def mask_key(seed: bytes):
    """The mask-agreement private key (SECP384R1) of a 32-byte secret seed: the scalar is
    HKDF-SHA256(seed) (64 bytes, 128 bits more than the group order, so the reduction's bias is
    2⁻¹²⁸) reduced into [1, n − 1]. Clients Shamir-share this seed rather than the serialised key
    (32 bytes against 306: three GF(2¹²⁸) chunks to split and combine instead of twenty)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(seed) != 32:
        raise ValueError(f"a mask-key seed is 32 bytes, got {len(seed)}")
    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
    material = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=b"stamen-secagg-mask-key").derive(seed)
    return ec.derive_private_key(int.from_bytes(material, "big") % (order - 1) + 1, ec.SECP384R1())
