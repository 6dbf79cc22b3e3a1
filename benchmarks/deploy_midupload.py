"""A SuperNode killed while it uploads its reply: how long the round waits, and what it counts.

    python -m stamen.benchmarks.deploy_midupload                     # hidden 100,000, round timeout 90 s

A real local deployment (3 SuperNodes, loopback, TLS + node auth, warm ClientApps, the byte-counting
proxy in front of the SuperLink), digits MLP widened to ``--hidden`` units so that a reply is tens
of MB and its upload takes long enough to be cut: SuperNode 1 is killed as soon as its runner logs
that round 2's reply is handed to the SuperNode (the SuperNode is then registering the reply at the
SuperLink and uploading its arrays). The SuperLink lists such a reply before its arrays are in;
Flower's grid would wait up to 2 h for them. Printed: each round's replies, rejected, missing and
wall seconds, and the rejection reasons — with Stamen's reply polling, round 2 ends at
``--round-timeout`` with the two live replies and the dead one rejected ("objects unavailable").
If the kill misses the upload (the reply was already whole, or not yet registered), the dead node
is answered "Node Unavailable" instead; the output says which happened.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from stamen import config as C
from stamen.deploy.local import LocalFederation

ROOT = Path(__file__).resolve().parents[1]
SERVED = "train message served"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=100_000, help="MLP width (100,000: a 30 MB reply)")
    ap.add_argument("--round-timeout", type=float, default=90.0, help="federation.round_timeout_s")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="stamen-midupload-"))
    cfg = C.load(ROOT / "stamen/configs/default.toml",
                 ["federation.clients=3", f"run.rounds={args.rounds}", "task.partition='iid'",
                  f"task.hidden={args.hidden}", "task.local_epochs=1",
                  f"federation.round_timeout_s={args.round_timeout}", "run.name='midupload'"])
    with LocalFederation(3, work / "federation", measure_bytes=True) as fed:
        before = fed.log_count("supernode-1", SERVED)
        handle = fed.submit(cfg, work / "run")
        t0 = time.monotonic()
        deadline = t0 + 2 * args.round_timeout + 600  # start-up, then rounds 1 and 2
        while fed.log_count("supernode-1", SERVED) < before + 2:  # round 2's reply leaves the runner
            if time.monotonic() > deadline or handle.popen.poll() is not None:  # stuck, or the run ended
                print(f"round 2's reply never left SuperNode 1's runner; logs in {work}")
                return 1
            time.sleep(0.01)
        fed.kill_supernode(1)
        print(f"SuperNode 1 killed {time.monotonic() - t0:.1f} s after the run was submitted")
        res = handle.wait(timeout=args.rounds * args.round_timeout + 600)
    print(f"run ok: {res.ok}; round timeout {args.round_timeout:.0f} s; logs and results in {work}")
    print("round  replies  rejected  missing  wall s")
    for r in res.rows:
        print(f"{r['round']:>5}  {r['clients']:>7}  {r['rejected']:>8}  {r['missing']:>7}  {r['wall_s']:>6.1f}")
    for line in res.log.splitlines():
        if "rejected reply" in line:
            print(line.split("stamen.accept: ", 1)[-1][:240])
    return 0 if res.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
