"""Secure aggregation as a stage of the round pipeline (``secagg.enabled``; protocol:
``stamen/schema/secagg.py``, client: ``client/secagg.py``).

The stage replaces the server's view of individual replies by their masked sum:

- **setup** (in ``configure_train``, after sampling): the key exchange and the share
  distribution, two extra query exchanges through the pipeline's acceptance; each train
  instruction then carries the client's field parameters, its neighbours and the encrypted
  shares addressed to it;
- **read** (acceptance's decode): a reply's payload must be one masked vector of the run's field
  (its size and dtype, values below 2^bits) — all that can be checked on masked data;
- **unmask** (instead of decode → privatize → combine): the survivors answer the unmask query;
  the server rebuilds b_u of every survivor and the mask key of every client that dropped after
  sharing, removes their masks and obtains Σ_survivors q_u in Z_{2^bits}, the exact sum of the
  clients' quantised vectors (plus their noise shares under distributed DP), which it maps back
  to real numbers (÷ γ) and divides by the number of survivors.

What can combine with it (the preflight refuses the rest, naming why): strategies that aggregate
a linear function of their replies — payload vectors (sketch space: ``sketched_dp``,
``sketched_fedavg``, ``fetchsgd``) or decoded updates with a *linear* codec (``dense``,
``gaussian``, ``srht``, ``sparsejl``, ``rademacher``: the mean of payloads decodes to the mean
update). Not: robust aggregators or anything else that needs individual updates, non-linear
codecs (``topk``, ``int8``, ``fp16``, CountSketch's median decode under update-space strategies),
Ferret/FedKSeed's sparse coefficient lists. Clients weigh the same (a weighted mean would reveal
each client's weight).

Privacy (``privacy.site``): ``distributed`` — each client adds N_Z(0, σ²/t) to its integer vector
before masking (σ = zΔ₂, Δ₂ = γC + √d, t the threshold: any unmasked sum has variance ≥ σ²), and
each round composes ``ZCDpEvent(ρ)`` with ρ from ``privacy/distributed.py`` (Kairouz, Liu, Steinke
2021); ``central`` — the server adds N(0, (zC)²) to the unmasked sum (the trusted-server model,
clipping done by the clients); ``local`` is refused (noise before masking is the distributed site).

Dropouts: a round unmasks if at least t of each dropped-or-surviving client's neighbourhood
answers the unmask query with its shares; otherwise it fails cleanly (model unchanged).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from stamen import schema as S
from stamen.config import ConfigError
from stamen.privacy.distributed import field_bits, from_field, l2_sensitivity
from stamen.schema import secagg as A
from stamen.schema.query import QUERY
from stamen.sketching.codec import Codec, PayloadError

log = logging.getLogger("stamen.secagg")


class SecureAggregation:
    """The stage (module docstring). ``noise_multiplier``: z of the distributed site (0: the clients add no noise)."""

    def __init__(self, *, degree: int, threshold: float, clip: float, scale: float, noise_multiplier: float = 0.0):
        self.degree, self.threshold_fraction = int(degree), float(threshold)
        self.clip, self.scale, self.z = float(clip), float(scale), float(noise_multiplier)
        self._round: dict[str, Any] = {}

    # -- wiring -------------------------------------------------------------------------------
    def bind(self, run) -> None:
        """The run's codec fixes the payload vector (keys, shapes); run.exchange sends the protocol's queries."""
        self.run, self.exchange = run, run.exchange
        self.template = run.codec.template(run.ctx(1))
        self.size = int(sum(int(np.prod(shape)) for shape, _ in self.template.values()))
        self.sensitivity = l2_sensitivity(self.clip, self.scale, self.size)
        try:  # the largest cohort and the smallest threshold must fit the field before any round starts
            field_bits(len(run.nodes), self.clip, self.scale, self.sigma_client(2))
        except ValueError as err:
            raise ConfigError(f"secagg: {err}") from None

    def threshold(self, neighbourhood: int) -> int:
        """t for a neighbourhood of ``neighbourhood`` clients (the client itself included): at least 2."""
        return max(2, min(neighbourhood, math.ceil(self.threshold_fraction * neighbourhood)))

    def sigma_client(self, t: int) -> float:
        """σ_c of each client's discrete Gaussian share: σ²/t with σ = zΔ₂ (any t shares sum to σ² or more)."""
        return self.z * self.sensitivity / math.sqrt(t)

    def sum_noise_std(self, survivors: int) -> float:
        """Std of the noise in the unmasked sum of ``survivors`` vectors, in payload units."""
        return math.sqrt(survivors) * self._round.get("sigma", 0.0) / self.scale

    @property
    def real_sensitivity(self) -> float:
        """Δ₂ in payload units (C + √d/γ): what server-side (central) noise on the unmasked sum is scaled to."""
        return self.sensitivity / self.scale

    # -- setup (steps 1 and 2) -------------------------------------------------------------------
    def setup(self, server_round: int, pids: list[int]) -> dict[int, dict[str, Any]] | None:
        """Key exchange and share distribution for the cohort; per-partition train entries (None: failed)."""
        graph = A.neighbour_graph(self.run.seed, server_round, pids, self.degree)
        degree = min(len(v) for v in graph.values()) if graph else 0
        t = self.threshold(degree + 1)
        sigma = self.sigma_client(t)
        bits = field_bits(len(pids), self.clip, self.scale, sigma)
        params = {A.BITS: bits, A.SCALE: self.scale, A.CLIP: self.clip, A.NOISE_STD: sigma}
        self._round = {"graph": graph, "t": t, "bits": bits, "sigma": sigma, "bytes": 0, "messages": 0}
        keys = self._query(server_round, A.KEYS_QUERY, pids, lambda pid: {})
        pk = {r.pid: (bytes(r.message.content.config_records[A.RECORD][A.PK_C]),
                      bytes(r.message.content.config_records[A.RECORD][A.PK_S])) for r in keys}
        joined = sorted(pk)
        graph = {p: [v for v in graph[p] if v in pk] for p in joined}

        def share_request(pid: int) -> dict[str, Any]:
            return {A.NEIGHBOURS: graph[pid], A.PK_C: [pk[v][0] for v in graph[pid]],
                    A.PK_S: [pk[v][1] for v in graph[pid]], A.THRESHOLD: t}

        shares = self._query(server_round, A.SHARES_QUERY, joined, share_request)
        routed: dict[int, list[tuple[int, bytes]]] = {p: [] for p in joined}
        for r in shares:
            record = r.message.content.config_records[A.RECORD]
            if [int(v) for v in record[A.NEIGHBOURS]] != graph[r.pid]:
                continue  # shares for other neighbours than asked: drop this client
            for v, ciphertext in zip(graph[r.pid], record[A.CIPHERTEXTS]):
                routed[v].append((r.pid, bytes(ciphertext)))
        self._round.update(pk=pk, graph=graph, shared=sorted(r.pid for r in shares))
        if len(self._round["shared"]) < t:
            log.warning("round %d: only %d clients completed the key exchange, fewer than the threshold %d",
                        server_round, len(self._round["shared"]), t)
            return None
        entries = {}  # the client kept its neighbours and their keys at step 2: only the field and its shares
        for pid in self._round["shared"]:
            incoming = [(s, c) for s, c in routed[pid] if s in self._round["shared"]]
            entries[pid] = {**params, A.SENDERS: [s for s, _ in incoming], A.CIPHERTEXTS: [c for _, c in incoming]}
        return entries

    def _query(self, server_round: int, kind: str, pids: list[int], extra) -> list:
        done = self.exchange(
            kind, server_round, pids,
            lambda identity, pid_extra=extra: RecordDict({S.CONFIG: ConfigRecord(
                {QUERY: kind, **pid_extra(identity[S.PARTITION_ID]), **identity})}),
            MessageType.QUERY)
        self._round["bytes"] += done.downlink_bytes + done.uplink_bytes
        self._round["messages"] += 2 * done.messages
        return [r for r in done.verdict.accepted if A.RECORD in r.message.content.config_records]

    # -- replies (step 3) -------------------------------------------------------------------------
    def read_masked(self, payload: dict[str, np.ndarray]) -> np.ndarray:
        """The reply's masked vector, after the checks masked data allows (keys, dtype, size, range)."""
        bits = self._round["bits"]
        Codec.expect_keys(payload, {A.MASKED})
        masked = Codec.expect(payload, A.MASKED, dtype=A.wire_dtype(bits), shape=(self.size,))
        if masked.size and int(masked.max()) >= 1 << bits:
            raise PayloadError(f"masked values outside the field Z_2^{bits}")
        return masked.astype(np.uint64)

    # -- unmask (step 4) ----------------------------------------------------------------------------
    def unmask(self, server_round: int, accepted: list) -> tuple[np.ndarray, int] | None:
        """(Σ_survivors x_u as fp32 in payload units, number of survivors), or None when the round cannot unmask."""
        out = self.unmask_integers(server_round, accepted)
        if out is None:
            return None
        return (out[0].astype(np.float64) / self.scale).astype(np.float32), out[1]

    def unmask_integers(self, server_round: int, accepted: list) -> tuple[np.ndarray, int] | None:
        """(Σ_survivors of the clients' integer vectors (int64), number of survivors), or None."""
        r = self._round
        bits, graph, t = r["bits"], r["graph"], r["t"]
        survivors = sorted(rep.pid for rep in accepted)
        dropped = sorted(set(r["shared"]) - set(survivors))
        if len(survivors) < t:
            log.warning("round %d: %d survivors, fewer than the threshold %d: cannot unmask", server_round,
                        len(survivors), t)
            return None

        def ask(pid: int) -> dict[str, Any]:
            return {A.SURVIVORS: [v for v in [pid, *graph[pid]] if v in survivors],
                    A.DROPPED: [v for v in graph[pid] if v in dropped]}

        answers = self._query(server_round, A.UNMASK_QUERY, survivors, ask)
        b_shares: dict[int, list[bytes]] = {v: [] for v in survivors}
        sk_shares: dict[int, list[bytes]] = {v: [] for v in dropped}
        for ans in answers:
            record, asked = ans.message.content.config_records[A.RECORD], ask(ans.pid)
            if len(record[A.B_SHARES]) != len(asked[A.SURVIVORS]) or len(record[A.SK_SHARES]) != len(asked[A.DROPPED]):
                continue
            for v, share in zip(asked[A.SURVIVORS], record[A.B_SHARES]):
                b_shares[v].append(bytes(share))
            for v, share in zip(asked[A.DROPPED], record[A.SK_SHARES]):
                sk_shares[v].append(bytes(share))
        short = [v for v, shares in {**b_shares, **sk_shares}.items() if len(shares) < t]
        if short:
            log.warning("round %d: fewer than t=%d shares for %s: cannot unmask", server_round, t, short)
            return None
        total = np.zeros(self.size, np.uint64)
        for rep in accepted:
            total += rep.contribution
        try:
            for v in survivors:
                total -= A.mask(combine_shares(b_shares[v][:t]), A.self_purpose(v, server_round), self.size, bits)
            for v in dropped:  # survivors added ±PRG(s_uv) for v: remove them with v's rebuilt mask key
                s_sk = A.mask_key(combine_shares(sk_shares[v][:t]))
                for u in graph[v]:
                    if u in survivors:
                        pair = A.mask(generate_shared_key(s_sk, bytes_to_public_key(r["pk"][u][1])),
                                      A.pair_purpose(u, v, server_round), self.size, bits)
                        total = total - pair if u < v else total + pair
        except ValueError as err:  # shares that do not combine: a client lied about its shares
            log.warning("round %d: secret shares do not combine (%s): cannot unmask", server_round, err)
            return None
        total &= np.uint64((1 << bits) - 1)
        r.update(survivors=len(survivors), dropped=len(dropped))
        return from_field(total, bits), len(survivors)

    def payload(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """A payload vector (e.g. the mean of the survivors') as the codec's payload dict."""
        return Codec.unflatten_payload(vector, self.template)

    # -- records ---------------------------------------------------------------------------------
    def round_metrics(self) -> dict[str, Any]:
        r = self._round
        out = {"secagg_bits": r.get("bits"), "secagg_threshold": r.get("t"), "secagg_dropped": r.get("dropped", 0),
               "secagg_protocol_bytes": r.get("bytes", 0), "secagg_protocol_messages": r.get("messages", 0)}
        if self.sigma_client(2) > 0:
            out["secagg_noise_std"] = r.get("sigma")
        return out

    def summary(self) -> dict[str, Any]:
        return {"secagg": {"protocol": "SecAgg+ (Bell et al. 2020)", "degree": self.degree,
                           "threshold": self.threshold_fraction, "clip": self.clip, "scale": self.scale,
                           "payload_size": self.size, "l2_sensitivity_integer": self.sensitivity,
                           "noise": ("distributed discrete Gaussian shares (privacy.site='distributed')"
                                     if self.sigma_client(2) > 0 else "none from the clients")}}
