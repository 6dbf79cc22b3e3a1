"""Trust boundaries: each attack of the issue against the current Stamen, and what happens.

    python -m stamen.benchmarks.trust_table

A markdown table, attack → outcome, from hand-made Flower replies to a bound FedAvg round
pipeline (four fake nodes, the acceptance stage of ``strategies/accept.py``), a crafted pickle
checkpoint, an open SuperLink bind and an unwritable ``--out``. The real-deployment version of
the first three attacks is ``tests/test_deploy_malicious.py`` (SuperLink + 3 SuperNodes, TLS and
node authentication).
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    from _fakes import LAYOUT, NODES, bound_strategy, configure, global_weights, reply_to

    from stamen import schema as P

    def mean_update(arrays) -> float:
        if arrays is None:
            return float("nan")
        return float((LAYOUT.flatten(P.from_array_record(arrays)).numpy() - LAYOUT.flatten(global_weights()).numpy()).mean())

    def pid(msg) -> int:
        return dict(msg.content.config_records[P.CONFIG])[P.PARTITION_ID]

    rows = []
    s = bound_strategy()
    msgs = configure(s)
    replies = [reply_to(m, np.full(LAYOUT.d, 100.0 if i == 0 else 1.0), 1e12 if i == 0 else 5) for i, m in enumerate(msgs)]
    a, _ = s.aggregate_train(1, replies)
    rows.append(("num-examples = 1e12 from one client", f"rejected {s.last_reasons}; mean update {mean_update(a):.2f} "
                                                         "(honest 1.0, attacker 100)"))
    s = bound_strategy()
    msgs = configure(s)
    forged = reply_to(msgs[0], np.full(LAYOUT.d, 100.0), 5, pid=pid(msgs[1]))
    a, _ = s.aggregate_train(1, [forged] + [reply_to(m, np.ones(LAYOUT.d), 5) for m in msgs[1:]])
    rows.append(("a node answers as another partition", f"rejected {s.last_reasons}; the victim's reply accepted "
                                                        f"({pid(msgs[1]) in s.last_participants})"))
    s = bound_strategy()
    old = configure(s, 1)
    old_replies = [reply_to(m, np.ones(LAYOUT.d), 5) for m in old]
    s.aggregate_train(1, old_replies)
    new = configure(s, 2)
    s.aggregate_train(2, [old_replies[0]] + [reply_to(m, np.zeros(LAYOUT.d), 5) for m in new[1:]])
    rows.append(("round-1 reply replayed in round 2", f"rejected {s.last_reasons}"))
    s = bound_strategy("ferret", "strategy.K=4", layout=LAYOUT)
    msgs = configure(s)
    from stamen.sketching.codec import CodecContext
    import torch

    payloads = [s.run.codec.encode(torch.ones(LAYOUT.d), CodecContext(0, 1, LAYOUT, node=pid(m))) for m in msgs]
    reps = [reply_to(m, None, 5, codec="ferret", payload=p) for m, p in zip(msgs, payloads)]
    s.aggregate_train(1, reps + [reps[0]])
    rows.append(("a reply delivered twice (ferret)", f"rejected {s.last_reasons}; counted once: "
                                                     f"{sorted(s.last_participants) == sorted(NODES)}"))

    from stamen.server.results import CheckpointError, RunDirectory

    d = Path(tempfile.mkdtemp())
    marker = d / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "checkpoint.pkl").write_bytes(pickle.dumps({"format": 1, "round": 1, "evil": Evil()}))
    try:
        RunDirectory(d).load_checkpoint()
        outcome = "loaded"
    except CheckpointError as err:
        outcome = f"refused: {str(err).splitlines()[0][:90]}…"
    rows.append(("crafted checkpoint.pkl on --resume", f"{outcome} code ran: {marker.exists()}"))

    from stamen.deploy.spec import OpenBindError, superlink_args

    try:
        superlink_args(ca=None, node_auth=False, fleet_address="0.0.0.0:9092", host="0.0.0.0")
        outcome = "started open"
    except OpenBindError as err:
        outcome = f"refused: {str(err)[:90]}…"
    defaults = superlink_args(ca=None, node_auth=False)
    rows.append(("SuperLink on 0.0.0.0 without TLS and node auth", outcome))
    rows.append(("SuperLink defaults", "binds " + ", ".join(a for a in defaults if a.startswith("127."))))
    from stamen.server.results import OutputDirError, ensure_writable_dir

    blocker = d / "file"
    blocker.write_text("x")
    try:
        ensure_writable_dir(blocker / "out")
        outcome = "accepted"
    except OutputDirError as err:
        outcome = f"refused before start: {str(err)[:90]}"
    rows.append(("--out below a regular file", outcome))
    print("| attack | outcome (current Stamen) |\n|---|---|")
    for attack, outcome in rows:
        print(f"| {attack} | {outcome} |")


if __name__ == "__main__":
    main()
