"""Client half of the catch-up downlink (the protocol is documented in ``strategies/catchup.py``).

The node keeps its own copy of the global weights in its node state (``<p>-global``, with the
round it belongs to in ``<p>-sync``). A train message either carries the dense weights
(``<p>-sync = "dense"``) or the compact updates U_r of the rounds the node missed
(``"catch-up"``, arrays ``"{r}.{part}"``); the client applies those it lacks, in order, with the
strategy's own step — the server's step, so the copy matches the server's weights bit for bit —
checks the result against the fp64 sum and norm of the server's weights sent along, stores it and
trains from it. Anything wrong (no copy, a copy from another round, a failed check) raises a
``ValueError`` that says what happened; the reply becomes an error, the server forgets the node's
copy and sends it dense weights next time. Used by ``DOWNLINKS["ferret"]``
(``trainers_ferret.py``), ``DOWNLINKS["sketched"]`` and ``DOWNLINKS["fetchsgd"]``
(``trainers_sketched.py``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from stamen import schema as P
from stamen.schema.train import CatchUpKeys
from stamen.sketching.downlink import weights_check, weights_match

#: tolerance of the check of a rebuilt copy against the server's Σw and ‖w‖ (relative to ‖w‖)
CHECK_RTOL = 1e-5

#: ``step(flat, round, payload of that round) -> flat``: one round of the strategy's global step
RoundStep = Callable[[torch.Tensor, int, dict[str, np.ndarray]], torch.Tensor]


class CatchUpClient:
    """The catch-up downlink of the strategy whose message entries start with ``prefix``."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        keys = CatchUpKeys(prefix)  # the message config entries, shared with the server (stamen/schema/train.py)
        self.sync, self.global_round, self.base_round, self.rounds = (keys.sync, keys.global_round, keys.base_round,
                                                                      keys.rounds)
        self.check_sum, self.check_norm = keys.check_sum, keys.check_norm
        # node-state records
        self.copy_record = f"{prefix}-global"  # ArrayRecord {"flat": the global weights, fp32, layout order}
        self.round_record = f"{prefix}-sync"  # ConfigRecord {"round": the round those weights belong to}

    # -- the node's copy -----------------------------------------------------------------------
    def held_copy(self, state: RecordDict) -> tuple[int, torch.Tensor] | None:
        """(round, flat fp32 weights) of the node's copy of the global model, or None."""
        if self.copy_record not in state.array_records or self.round_record not in state.config_records:
            return None
        flat = torch.from_numpy(np.array(state.array_records[self.copy_record]["flat"].numpy(), dtype=np.float32))
        return int(state.config_records[self.round_record]["round"]), flat

    def store_copy(self, state: RecordDict, server_round: int, flat: torch.Tensor) -> None:
        state[self.copy_record] = P.to_array_record({"flat": flat.detach().to("cpu", torch.float32).numpy()})
        state[self.round_record] = ConfigRecord({"round": int(server_round)})

    def forget_copy(self, state: RecordDict) -> None:
        for key in (self.copy_record, self.round_record):
            if key in state:
                del state[key]

    # -- one downlink message --------------------------------------------------------------------
    def rebuild(self, content: RecordDict, config: dict, state: RecordDict, layout, step: RoundStep
                ) -> dict[str, np.ndarray]:
        """The global weights of a catch-up-downlink message (dense, or rebuilt from the node's copy)."""
        mode = config.get(self.sync)
        target = int(config[self.global_round])
        arrays = P.from_array_record(content.array_records[P.ARRAYS])
        if mode == "dense":
            flat = layout.flatten(arrays)
        elif mode == "catch-up":
            held = self.held_copy(state)
            base = int(config[self.base_round])
            if held is None:
                raise ValueError(f"the server sent a catch-up from round {base}, but this node holds no copy of the "
                                 f"global model (the server sends dense weights next time)")
            held_round, flat = held
            if not base <= held_round <= target:
                self.forget_copy(state)
                raise ValueError(f"this node's copy of the global model is from round {held_round}; the catch-up "
                                 f"covers rounds {base}..{target}")
            for r in [int(r) for r in config[self.rounds]]:
                if r > held_round:  # an earlier message may already have brought it (its reply was lost)
                    flat = step(flat, r, round_payload(arrays, r))
        else:
            raise ValueError(f"unknown {self.sync} {mode!r} in a {self.prefix} downlink message; expected 'dense' or "
                             f"'catch-up'")
        self.check_copy(flat, float(config[self.check_sum]), float(config[self.check_norm]), state)
        self.store_copy(state, target, flat)
        return layout.unflatten(flat)

    def check_copy(self, flat: torch.Tensor, expected_sum: float, expected_norm: float, state: RecordDict) -> None:
        """Raise (and drop the node's copy) unless ``flat`` has the server's Σw and ‖w‖."""
        if not weights_match(flat, expected_sum, expected_norm, CHECK_RTOL):
            total, norm = weights_check(flat)
            self.forget_copy(state)
            raise ValueError(f"the rebuilt global weights differ from the server's (sum {total:.9g} vs "
                             f"{expected_sum:.9g}, norm {norm:.9g} vs {expected_norm:.9g}); the copy is dropped and "
                             f"the server sends dense weights next time")


def round_payload(arrays: dict[str, np.ndarray], server_round: int) -> dict[str, np.ndarray]:
    """The parts of round ``server_round``'s update in a catch-up message (arrays ``"{round}.{part}"``)."""
    head = f"{server_round}."
    payload = {k[len(head):]: v for k, v in arrays.items() if k.startswith(head)}
    if not payload:
        raise ValueError(f"the catch-up message lists round {server_round} but carries no arrays for it")
    return payload
