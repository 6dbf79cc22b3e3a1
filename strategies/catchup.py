"""The catch-up downlink: sampled clients rebuild the global model from compact per-round updates.

Used by ``ferret`` / ``fedkseed`` (the aggregated coefficients Γ_t), ``sketched_fedavg`` (the mean
sketch ȳ_t) and ``fetchsgd`` (the k unsketched coordinates). Each of them moves the global model
by a compact update U_t per round, w_t = step(w_{t−1}, U_t), with a step that the clients can
repeat (``sketching/downlink.py``, ``strategies.ferret.apply_update``). The client half is
``client/catchup.py``; the two sides share only the message entries of
:class:`stamen.schema.train.CatchUpKeys`.

**Server duty** (:class:`CatchUpDownlink`, a component the strategy's method owns):

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
- ``history`` is checkpointed; on resume ``synced`` is cleared.

With the compressed downlink off the component sends the dense weights (one shared message
content) and keeps nothing. ``<p>`` is the strategy's :attr:`CatchUpStrategy.catchup` prefix
(``ferret``, ``sketched``, ``fetchsgd``); the per-round metrics are ``<p>_dense_nodes``,
``<p>_catchup_nodes``, ``<p>_catchup_rounds`` (rounds carried per catch-up message),
``<p>_history_rounds`` and ``<p>_history_bytes``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from stamen import schema as P
from stamen.schema.train import DOWNLINK, CatchUpKeys
from stamen.sketching.downlink import weights_check


def payload_key(server_round: int, part: str) -> str:
    """Array name of one part of round ``server_round``'s update in a catch-up message."""
    return f"{server_round}.{part}"


def payload_nbytes(payload: dict[str, np.ndarray]) -> int:
    return int(sum(int(np.asarray(a).nbytes) for a in payload.values()))


class CatchUpDownlink:
    """The server half of a catch-up downlink (module docstring), owned by a strategy method.

    The method calls :meth:`messages` to build the round's train messages (when ``enabled``),
    and after each round :meth:`end_round` with the round's compact update (None when the
    global model did not move) and the nodes whose replies were accepted.
    """

    def __init__(self, keys: CatchUpKeys, enabled: bool = True):
        self.catchup, self.enabled = keys, bool(enabled)
        self.history: dict[int, dict[str, np.ndarray]] = {}  # round -> its compact update U_t
        self.synced: dict[int, int] = {}  # node id -> the round whose global weights it holds
        self._downlink: dict[str, Any] = {}  # this round's downlink bookkeeping (not checkpointed)

    def bind(self, layout) -> None:
        self.layout = layout

    def state_dict(self) -> dict[str, Any]:
        return {"history": {int(r): dict(u) for r, u in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {int(r): dict(u) for r, u in state["history"].items()}
        self.synced = {}  # a resumed run talks to nodes with fresh state: they get dense weights first

    # -- what is sent ---------------------------------------------------------------------------
    def messages(self, server_round: int, arrays: ArrayRecord, global_flat: torch.Tensor, base: dict[str, Any],
                 targets: list[tuple[int, int]], identity) -> list[Message]:
        """One train message per (partition, node): dense weights, or the updates of the rounds it missed."""
        self._downlink = {"sent": [node for _, node in targets], "dense": 0, "catchup": 0, "catchup_rounds": []}

        def message(node: int, pid: int, records: ArrayRecord, config: dict[str, Any]) -> Message:
            return Message(content=RecordDict({P.ARRAYS: records, P.CONFIG: ConfigRecord({**config,
                                                                                         **identity(node, pid)})}),
                           dst_node_id=node, message_type=MessageType.TRAIN)

        if not self.enabled:
            self._downlink["dense"] = len(targets)
            return [message(node, pid, arrays, base) for pid, node in targets]
        keys = self.catchup
        target = server_round - 1  # the round that produced ``arrays``
        total, norm = weights_check(global_flat)
        base = {**base, DOWNLINK: keys.downlink, keys.global_round: target, keys.check_sum: total,
                keys.check_norm: norm}
        dense_bytes = 4 * self.layout.d
        records: dict[int | None, tuple[ArrayRecord, dict[str, Any]]] = {}  # by the node's held round (None: dense)
        messages = []
        for pid, node in targets:
            held = self.synced.get(node)
            rounds = [r for r in sorted(self.history) if held is not None and held < r <= target]
            size = sum(payload_nbytes(self.history[r]) for r in rounds)
            if held is None or held > target or size >= dense_bytes:
                held = None
            if held not in records:
                records[held] = self._downlink_records(base, arrays, held, rounds)
            if held is None:
                self._downlink["dense"] += 1
            else:
                self._downlink["catchup"] += 1
                self._downlink["catchup_rounds"].append(len(rounds))
            messages.append(message(node, pid, *records[held]))
        return messages

    def _downlink_records(self, base: dict[str, Any], arrays: ArrayRecord, held: int | None,
                          rounds: list[int]) -> tuple[ArrayRecord, dict[str, Any]]:
        keys = self.catchup
        if held is None:
            return arrays, {**base, keys.sync: "dense"}
        payloads = {payload_key(r, part): a for r in rounds for part, a in self.history[r].items()}
        return P.to_array_record(payloads), {**base, keys.sync: "catch-up", keys.base_round: held,
                                             keys.rounds: list(rounds)}

    # -- after aggregation --------------------------------------------------------------------------
    def end_round(self, server_round: int, update: dict[str, np.ndarray] | None, accepted_nodes: set[int]) -> None:
        """Keep round t's compact update (None: the global model did not move) and update ``synced``."""
        if not self.enabled:
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
