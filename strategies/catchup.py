"""The catch-up downlink: sampled clients rebuild the global model from compact per-round updates.

Used by ``ferret`` / ``fedkseed`` (the aggregated coefficients Γ_t), ``sketched_fedavg`` (the mean
sketch ȳ_t) and ``fetchsgd`` (the k unsketched coordinates). Each of them moves the global model
by a compact update U_t per round, w_t = step(w_{t−1}, U_t), with a step that the clients can
repeat (``sketching/downlink.py``, ``strategies.ferret.apply_update``). The client half is
``client/catchup.py``; the two sides share only the message entries below.

**Server duty** (:class:`CatchUpStrategy`, a mixin in front of ``StamenStrategy``):

- keep ``history`` {t: U_t} and ``synced`` {node id: the round whose global weights it holds}.
  A node holds round t − 1 once its round-t reply is accepted (it trained from those weights);
  a lost or rejected reply makes its copy unknown (dropped from ``synced``);
- a node sampled in round t that holds round s gets, if it is known and the payloads of rounds
  s+1 … t−1 in ``history`` are smaller than the dense weights (4·d bytes), a *catch-up*:
  ``<p>-sync = "catch-up"``, ``<p>-base-round = s``, ``<p>-rounds = [s+1, …]`` and the arrays
  ``"{r}.{part}"`` of each of those U_r; otherwise — first participation, after a lost reply,
  after a resume (nodes restart with empty state), or when catching up costs more — the dense
  weights (``<p>-sync = "dense"``). Rounds that failed (no new global model) have no U_r and need
  nothing. Every train message of the compressed downlink carries ``downlink = <p>`` (the
  client's ``DOWNLINKS`` entry), ``<p>-round = t − 1`` and the fp64 ``<p>-sum`` / ``<p>-norm`` of
  the server's weights, which the client checks its rebuilt copy against before training;
- prune ``history`` each round: newest first while the kept rounds stay below the dense size,
  and nothing older than the oldest round a synced node holds; a node that would need a dropped
  round gets dense weights next time. So ``history`` never outgrows one dense model;
- ``history`` and ``synced`` are checkpointed; on resume ``synced`` is cleared.

With the compressed downlink off the mixin broadcasts the dense weights (one shared message
content) and keeps nothing. ``<p>`` is the strategy's :attr:`CatchUpStrategy.catchup` prefix
(``ferret``, ``sketched``, ``fetchsgd``); the per-round metrics are ``<p>_dense_nodes``,
``<p>_catchup_nodes``, ``<p>_catchup_rounds`` (rounds carried per catch-up message),
``<p>_history_rounds`` and ``<p>_history_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from stamen import protocol as P
from stamen.sketching.downlink import weights_check
from stamen.strategies.base import StamenStrategy

DOWNLINK = "downlink"  # config entry naming the client's DOWNLINKS handler (client/app.py)


@dataclass(frozen=True)
class CatchUpKeys:
    """The message config entries of one strategy's catch-up downlink (the same on the client side)."""

    prefix: str

    @property
    def downlink(self) -> str:  # the client's DOWNLINKS entry
        return self.prefix

    @property
    def sync(self) -> str:  # "dense" | "catch-up"
        return f"{self.prefix}-sync"

    @property
    def global_round(self) -> str:  # the round whose global weights the client trains from (t − 1)
        return f"{self.prefix}-round"

    @property
    def base_round(self) -> str:  # catch-up: the round the server believes the node holds
        return f"{self.prefix}-base-round"

    @property
    def rounds(self) -> str:  # catch-up: the rounds whose updates the message carries, in order
        return f"{self.prefix}-rounds"

    @property
    def check_sum(self) -> str:
        return f"{self.prefix}-sum"

    @property
    def check_norm(self) -> str:
        return f"{self.prefix}-norm"


def payload_key(server_round: int, part: str) -> str:
    """Array name of one part of round ``server_round``'s update in a catch-up message."""
    return f"{server_round}.{part}"


def payload_nbytes(payload: dict[str, np.ndarray]) -> int:
    return int(sum(int(np.asarray(a).nbytes) for a in payload.values()))


class CatchUpStrategy(StamenStrategy):
    """Mixin: the catch-up downlink (see the module docstring). Place before a Flower strategy.

    Subclasses set :attr:`catchup`, say whether the compressed downlink is on
    (:meth:`catchup_enabled`), put what their client step needs into ``client_instructions``,
    and after each aggregation call :meth:`end_catchup_round` with the round's compact update.
    """

    _transient = StamenStrategy._transient + ("_downlink",)
    #: the message entries (and metric prefix) of this strategy's catch-up downlink
    catchup: ClassVar[CatchUpKeys]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.history: dict[int, dict[str, np.ndarray]] = {}  # round -> its compact update U_t
        self.synced: dict[int, int] = {}  # node id -> the round whose global weights it holds
        self._downlink: dict[str, Any] = {}  # this round's downlink bookkeeping (not checkpointed)

    def catchup_enabled(self) -> bool:
        """Whether train messages use the catch-up downlink (else: dense weights, nothing kept)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.synced = {}  # a resumed run talks to nodes with fresh state: they get dense weights first

    # -- what is sent ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        pids = self.sample_partitions(server_round, self.stamen_fraction_train)
        self._global = P.from_array_record(arrays)
        base = {**dict(config), **self.client_instructions(server_round), "server-round": server_round}
        return self.downlink_messages(server_round, arrays, base, [self.nodes[p] for p in pids])

    def downlink_messages(self, server_round: int, arrays: ArrayRecord, base: dict[str, Any],
                          targets: list[int]) -> list[Message]:
        """One train message per target node: dense weights, or the updates of the rounds it missed."""
        self._downlink = {"sent": list(targets), "dense": 0, "catchup": 0, "catchup_rounds": []}
        if not self.catchup_enabled():
            content = RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord(base)})
            self._downlink["dense"] = len(targets)
            return [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in targets]

        keys = self.catchup
        target = server_round - 1  # the round that produced ``arrays``
        total, norm = weights_check(self.layout.flatten(self._global))
        base = {**base, DOWNLINK: keys.downlink, keys.global_round: target, keys.check_sum: total,
                keys.check_norm: norm}
        dense_bytes = 4 * self.layout.d
        contents: dict[int | None, RecordDict] = {}  # by the node's held round (None: dense)
        messages = []
        for node in targets:
            held = self.synced.get(node)
            rounds = [r for r in sorted(self.history) if held is not None and held < r <= target]
            size = sum(payload_nbytes(self.history[r]) for r in rounds)
            if held is None or held > target or size >= dense_bytes:
                held = None
            if held not in contents:
                contents[held] = self._downlink_content(base, arrays, held, rounds)
            if held is None:
                self._downlink["dense"] += 1
            else:
                self._downlink["catchup"] += 1
                self._downlink["catchup_rounds"].append(len(rounds))
            messages.append(Message(content=contents[held], dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def _downlink_content(self, base: dict[str, Any], arrays: ArrayRecord, held: int | None,
                          rounds: list[int]) -> RecordDict:
        keys = self.catchup
        if held is None:
            return RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord({**base, keys.sync: "dense"})})
        payloads = {payload_key(r, part): a for r in rounds for part, a in self.history[r].items()}
        config = ConfigRecord({**base, keys.sync: "catch-up", keys.base_round: held, keys.rounds: list(rounds)})
        return RecordDict({P.ARRAYS: P.to_array_record(payloads), P.CONFIG: config})

    # -- after aggregation --------------------------------------------------------------------------
    def end_catchup_round(self, server_round: int, update: dict[str, np.ndarray] | None,
                          accepted_nodes: set[int]) -> None:
        """Keep round t's compact update (None: the global model did not move) and update ``synced``."""
        if not self.catchup_enabled():
            return
        if update is not None:
            self.history[server_round] = update
        self._update_sync(server_round, set(accepted_nodes) if update is not None else set())

    def _update_sync(self, server_round: int, ok: set[int]) -> None:
        """Accepted nodes hold round t − 1's weights; the others' state is unknown. Prune the history."""
        for node in self._downlink.get("sent", []):
            if node in ok:
                self.synced[node] = server_round - 1
            else:
                self.synced.pop(node, None)
        dense_bytes = 4 * self.layout.d
        kept, size = [], 0
        for r in sorted(self.history, reverse=True):  # newest first, while a catch-up stays below dense
            size += payload_nbytes(self.history[r])
            if size >= dense_bytes:
                break
            kept.append(r)
        oldest_kept = min(kept, default=server_round + 1)
        for node, held in list(self.synced.items()):  # they would need a dropped round: dense next time
            if any(held < r < oldest_kept for r in self.history):
                del self.synced[node]
        floor = min(self.synced.values(), default=server_round)
        self.history = {r: self.history[r] for r in kept if r > floor}

    # -- what is recorded ---------------------------------------------------------------------------
    def downlink_metrics(self) -> dict[str, Any]:
        p, r = self.catchup.prefix, self._downlink
        return {
            f"{p}_dense_nodes": r.get("dense", 0),
            f"{p}_catchup_nodes": r.get("catchup", 0),
            f"{p}_catchup_rounds": list(r.get("catchup_rounds", [])),
            f"{p}_history_rounds": len(self.history),
            f"{p}_history_bytes": int(sum(payload_nbytes(u) for u in self.history.values())),
        }
