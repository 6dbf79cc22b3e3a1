"""Evaluate messages (federated evaluation, ``federation.fraction_evaluate > 0``).

**Instruction**: ``arrays`` — the global weights; ``config`` — the identity entries of
:mod:`stamen.schema` (schema, run, round, partition, nonce). **Reply**: ``metrics`` —
``num-examples``, ``eval_loss``, ``eval_accuracy``; ``meta`` — the identity entries echoed.
"""

from __future__ import annotations

EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
