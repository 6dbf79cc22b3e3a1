"""``python -m stamen.deploy.supernode [STAMEN OPTIONS] FLOWER-SUPERNODE-ARGS…``: Flower's SuperNode,
paced, with warm ClientApps.

Runs Flower 1.39's ``flower-supernode`` in this process with two changes, both on the path of
every round (``deploy/pacing.py`` lists every interval on that path):

- its polls follow a :class:`~stamen.deploy.pacing.Backoff` instead of Flower's fixed 3 s
  (``--poll-min/--poll-max/--poll-factor``) and it notices its ClientApp's reply at once
  instead of within 0.5 s;
- with ``--clientapps warm`` (the default) the SuperNode runs with ``--isolation process`` and
  this process serves its ClientApp tasks itself: a :class:`~stamen.deploy.clientapp.ClientAppRunner`
  thread, woken the moment a message is stored, hands them to one long-lived ClientApp worker
  process (imports, task, model and partitions stay warm; it is restarted if it dies).
  ``--clientapps external``: another process serves them (``--isolation`` as given: Flower's
  SuperExec, or ``python -m stamen.deploy.clientapp`` next to this SuperNode — the compose/k8s
  layout, where SuperNode and ClientApps run in separate containers).

Every other argument goes to ``flower-supernode`` unchanged.
"""

from __future__ import annotations

import argparse
import sys

from stamen.deploy import pacing


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m stamen.deploy.supernode", add_help=False)
    p.add_argument("--clientapps", choices=("warm", "external"), default="warm")
    p.add_argument("--poll-min", type=float, default=pacing.SUPERNODE_POLL_MIN_S)
    p.add_argument("--poll-max", type=float, default=pacing.SUPERNODE_POLL_MAX_S)
    p.add_argument("--poll-factor", type=float, default=pacing.SUPERNODE_POLL_FACTOR)
    p.add_argument("--reply-check", type=float, default=pacing.REPLY_CHECK_S)
    p.add_argument("--preload", action="append", default=None)
    p.add_argument("--zygote", default=None, help="socket of a ClientApp zygote shared by this machine's SuperNodes")
    return p.parse_known_args(argv)


def _runtime_api(flower_args: list[str]) -> tuple[str, bytes | None]:
    """The Runtime API address the SuperNode will serve (its --host/--port) and its CA, if TLS."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host", default=UVICORN_DEFAULT_HOST)
    p.add_argument("--port", type=int, default=SUPERNODE_UVICORN_DEFAULT_PORT)
    p.add_argument("--ssl-ca-certfile", default=None)
    known, _ = p.parse_known_args(flower_args)
    host = "127.0.0.1" if known.host in ("0.0.0.0", "") else ("[::1]" if known.host == "::" else known.host)
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    roots = open(known.ssl_ca_certfile, "rb").read() if known.ssl_ca_certfile else None
    return f"{host}:{known.port}", roots


def with_isolation_process(flower_args: list[str]) -> list[str]:
    out, skip = [], False
    for a in flower_args:
        if skip:
            skip = False
            continue
        if a == "--isolation":
            skip = True
            continue
        if a.startswith("--isolation="):
            continue
        out.append(a)
    return [*out, "--isolation", "process"]


def main(argv: list[str] | None = None) -> None:
    args, flower_args = _parse(sys.argv[1:] if argv is None else argv)
    clock = pacing.SuperNodeClock(pacing.Backoff(args.poll_min, args.poll_max, args.poll_factor), args.reply_check)
    pacing.install_supernode_pacing(clock)
    if args.clientapps == "warm":
        from flwr.supercore.exit import add_exit_handler

        from stamen.deploy.clientapp import DEFAULT_PRELOAD, ClientAppRunner

        flower_args = with_isolation_process(flower_args)
        address, roots = _runtime_api(flower_args)
        runner = ClientAppRunner(address, insecure=roots is None, root_certificates=roots,
                                 wake=clock.message_arrived, on_reply=clock.reply_ready.set,
                                 poll=pacing.Backoff(0.05, 1.0, 2.0),
                                 preload=tuple(args.preload or DEFAULT_PRELOAD), zygote=args.zygote,
                                 pull_max_s=60.0)
        runner.start()  # the worker starts importing now, while the SuperNode connects
        add_exit_handler(runner.stop)
    sys.argv = ["flower-supernode", *flower_args]
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
