"""The Stamen ServerApp.

Under ``stamen run`` (simulation) the app is built by :func:`make_server_app` with the
config, output directory and a per-round callback passed by closure. Under ``flwr run``
(simulation or SuperLink deployment) the module-level ``app`` reads the config from
Flower's ``context.run_config`` (``config-file`` plus flattened ``section.key`` entries).

In a deployment (the config came from the run config and the grid talks to a SuperLink):

- replies are collected on a :class:`~stamen.deploy.pacing.Backoff` (10 ms, growing to
  0.25 s) instead of Flower's fixed 3 s (:class:`ReplyPolling`), and message contents travel
  sealed — one Flower object each — to and from SuperNodes whose ClientApp runner is Stamen's
  (``deploy/envelope.py``);
- with fewer SuperNodes than clients (``stamen.deploy.spec.deployed_supernodes``) each
  SuperNode hosts several clients as virtual nodes, as the simulation's carriers do
  (:class:`DeployedCarriers`): SuperNode k (node config ``partition-id=k``) hosts the
  partitions ``{p : p mod K = k}`` and gets one message per round carrying its clients'
  messages; the server still sees, validates and accounts every client's own message;
- a run directory that already holds a checkpoint is resumed (a deployment cannot be told
  ``--resume`` any other way: every ClientApp reads the same run config); ``stamen deploy
  local`` asks for ``--resume`` explicitly before it submits such a run;
- every round is logged through Flower's logger, so it shows in ``flwr log`` and
  ``flwr run --stream``, and so are the results directory and how the run ended.
"""

from __future__ import annotations

import logging
import sys
import time
from logging import INFO
from pathlib import Path
from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from stamen import schema as P
from stamen.config import StamenConfig, from_flat
from stamen.deploy import envelope, pacing
from stamen.deploy.spec import deployed_supernodes
from stamen.server.loop import JOIN_TIMEOUT_S, run_federation
from stamen.server.results import RunDirectory
from stamen.server.virtual_grid import VirtualGrid


def default_out_dir(cfg: StamenConfig) -> Path:
    return Path(cfg.run.out_dir or f"runs/{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}")


class ReplyPolling:
    """A SuperLink grid whose ``send_and_receive`` pulls replies on a :class:`Backoff`, not every 3 s,
    and seals contents (``deploy/envelope.py``) for nodes whose ClientApp runner unseals them.

    Pulling costs the SuperLink one ``PullMessages`` per interval for the whole run (it lists
    the message ids still outstanding), whatever the number of nodes. Each message goes out as
    a copy (asking for a sealed reply, or sealed); the caller's message gets the copy's message
    id, which the replies answer; replies come back unsealed.
    """

    def __init__(self, grid, poll: pacing.Backoff | None = None):
        self._grid = grid
        self.poll = poll or pacing.Backoff(pacing.SERVER_POLL_MIN_S, pacing.SERVER_POLL_MAX_S,
                                           pacing.SERVER_POLL_FACTOR)
        self.sealing_nodes: set[int] = set()  # nodes that answered sealed: their runner unseals too
        self._request = envelope.seal_request()
        #: per call: messages, seconds to push them, to the first and the last reply, polls, seconds pulling
        self.calls: list[dict[str, float]] = []

    def _outgoing(self, messages: list[Message]) -> list[Message]:
        uses: dict[int, int] = {}
        size: dict[int, int] = {}
        for m in messages:
            for record in m.content.values():
                uses[id(record)] = uses.get(id(record), 0) + 1
                if isinstance(record, ArrayRecord):
                    size[id(record)] = sum(len(a.data) for a in record.values())
        # sealing a shared record uploads it once per message instead of once: fine while that stays small
        duplicated = sum(size.get(r, 0) * (n - 1) for r, n in uses.items())
        share_ok = duplicated <= envelope.MAX_DUPLICATED_BYTES
        out = []
        for m in messages:
            content = m.content
            if m.metadata.dst_node_id in self.sealing_nodes and (
                    share_ok or all(uses[id(r)] == 1 for r in content.values())):
                content = envelope.seal(content)
            else:  # a shared record (a broadcast) stays one object that Flower uploads once
                content = RecordDict({**content, envelope.WANTS_SEALED: self._request})
            out.append(Message(content, m.metadata.dst_node_id, m.metadata.message_type, ttl=m.metadata.ttl,
                               group_id=m.metadata.group_id))
        return out

    def _incoming(self, replies: list[Message]) -> list[Message]:
        out = []
        for r in replies:
            if r.has_content() and envelope.is_sealed(r.content):
                self.sealing_nodes.add(r.metadata.src_node_id)
                try:
                    r.content = envelope.unseal(r.content)
                except envelope.SealError as err:  # malformed: an error reply, rejected like any other
                    r = make_message(metadata=r.metadata,
                                     error=Error(code=ErrorCode.UNKNOWN, reason=f"malformed sealed reply: {err}"))
            out.append(r)
        return out

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        t0 = time.monotonic()
        messages = list(messages)
        outgoing = self._outgoing(messages)
        ids = list(self._grid.push_messages(outgoing))
        for m, i in zip(messages, ids):
            if i:
                m.metadata.__dict__["_message_id"] = i
        pending = {i for i in ids if i}
        pushed = time.monotonic()
        stats = {"messages": float(len(pending)), "push_s": pushed - t0, "first_reply_s": float("nan"),
                 "last_reply_s": float("nan"), "polls": 0.0, "pull_s": 0.0}
        self.calls.append(stats)
        end = None if timeout is None else t0 + timeout
        replies: list[Message] = []
        self.poll.reset()
        last = False
        while pending:
            a = time.monotonic()
            with pacing.object_pull_deadline(end):  # a reply whose upload never ends holds no one past the end
                got = list(self._grid.pull_messages(pending))
            b = time.monotonic()
            stats["polls"] += 1
            stats["pull_s"] += b - a
            if got:
                if not replies:
                    stats["first_reply_s"] = b - pushed
                stats["last_reply_s"] = b - pushed
            replies.extend(self._incoming(got))
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or last:
                break
            wait = self.poll.next()
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:  # one last pull: replies that came in while the previous pull waited
                    last = True
                    continue
                wait = min(wait, left)
            time.sleep(wait)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _is_superlink_grid(grid) -> bool:
    from flwr.superlink.grid.http_grid import HttpGrid

    return isinstance(grid, HttpGrid)


class DeployedCarriers(VirtualGrid):
    """Clients as virtual nodes on K real SuperNodes: SuperNode k hosts ``{p : p mod K = k}``.

    Which SuperNode is carrier k is what it reports as its ``partition-id`` (its node config) to
    a discovery query, asked once all K have connected. More than K SuperNodes, two claiming the
    same index, or an index ≥ K is an error that says how to start the SuperNodes.
    """

    def __init__(self, grid, cfg, carriers: int):
        super().__init__(grid, cfg, carriers)
        self.connected = 0

    def join_status(self) -> str:
        k, n = self.num_carriers, self.cfg.federation.clients
        return (f"{self.connected} of {k} SuperNodes connected ({n} clients, SuperNode k hosting the partitions "
                f"p with p mod {k} = k); start the missing ones with --node-config "
                f"'partition-id=k num-partitions={n} supernodes={k}', or set federation.sim_nodes (SuperNodes) and "
                f"federation.clients to what is running")

    def _carriers_ready(self) -> bool:
        if self._carriers is not None:
            return True
        ids = list(self._grid.get_node_ids())
        self.connected = len(ids)
        k, n = self.num_carriers, self.cfg.federation.clients
        if len(ids) < k:
            return False
        if len(ids) > k:
            raise RuntimeError(f"{len(ids)} SuperNodes are connected, but this run expects {k} (federation.sim_nodes) "
                               f"hosting its {n} clients: stop the extra ones, or set federation.sim_nodes={len(ids)}")
        msgs = [Message(content=RecordDict({P.CONFIG: ConfigRecord({P.SCHEMA: P.SCHEMA_VERSION})}),
                        message_type=MessageType.QUERY, dst_node_id=nid) for nid in ids]
        order: dict[int, int] = {}
        for reply in self._grid.send_and_receive(msgs, timeout=min(self.wait_s, JOIN_TIMEOUT_S)):
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise RuntimeError(f"SuperNode {node} did not answer Stamen's discovery query ({reply.error.reason})")
            index = reply.content.config_records[P.META].get(P.PARTITION_ID)
            if not isinstance(index, int) or not 0 <= index < k or index in order:
                raise RuntimeError(
                    f"SuperNode {node} has partition-id={index!r}"
                    + (f", like SuperNode {order[index]}" if index in order else "")
                    + f": with {k} SuperNodes hosting {n} clients, SuperNode k (k = 0..{k - 1}) must be started with "
                    f"--node-config 'partition-id=k num-partitions={n} supernodes={k}'")
            order[index] = node
        if len(order) < k:
            raise RuntimeError(f"only {len(order)} of {k} SuperNodes answered the discovery query")
        self._carriers = [order[i] for i in range(k)]
        return True


def _flower_log(msg: str, *args) -> None:
    from flwr.common.logger import log

    log(INFO, "[stamen] " + msg, *args)


def round_line(row: dict[str, Any], rounds: int) -> str:
    acc = row.get("test_accuracy")
    return (f"round {row['round']}/{rounds}: {row['clients']} replies ({row['rejected']} rejected, {row['missing']} "
            f"missing), train_loss {row.get('train_loss')}, "
            + (f"test_accuracy {acc:.4f}, " if acc is not None else "")
            + f"up {row['uplink_bytes']} B, down {row['downlink_bytes']} B, {row['wall_s']:.2f} s")


def transport_line(calls: list[dict[str, float]]) -> str:
    """How the round's longest exchange (its train messages) went, as seen from the ServerApp."""
    if not calls:
        return "no messages"
    c = max(calls, key=lambda c: (c["messages"], c["last_reply_s"] if c["last_reply_s"] == c["last_reply_s"] else 0))
    return (f"train exchange: {int(c['messages'])} messages pushed in {c['push_s']:.3f} s, replies "
            f"{c['first_reply_s']:.3f}–{c['last_reply_s']:.3f} s after, {int(c['polls'])} polls "
            f"({c['pull_s']:.3f} s pulling)")


def _stamen_logs_to_stderr() -> None:
    """In a ServerApp process Flower mirrors stderr into the run's log (``flwr log``)."""
    logger = logging.getLogger("stamen")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(INFO)


def make_server_app(cfg: StamenConfig | None = None, out_dir: str | Path | None = None, *, resume: bool = False,
                    on_round: Callable[[dict[str, Any]], None] | None = None,
                    result: dict[str, Any] | None = None, carriers: int | None = None) -> ServerApp:
    """The ServerApp; ``carriers``: the simulation hosts the clients as virtual nodes on that many
    SuperNodes (server/virtual_grid.py), None: one SuperNode per client."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else from_flat(dict(context.run_config))
        out = Path(out_dir) if out_dir is not None else default_out_dir(run_cfg)
        report = on_round
        resuming = resume
        if cfg is None and _is_superlink_grid(grid):  # a deployment
            from flwr.superlink.grid import http_grid

            pacing.install_fast_object_pulls(http_grid)  # this process serves this one run
            _stamen_logs_to_stderr()
            grid = polling = ReplyPolling(grid)
            k = deployed_supernodes(run_cfg)
            if k < run_cfg.federation.clients:
                grid = DeployedCarriers(grid, run_cfg, k)
            resuming = resuming or RunDirectory(out).checkpoint_path.exists()
            _flower_log("results in %s%s; %d clients on %d SuperNodes", out.resolve(),
                        " (resuming from its checkpoint)" if resuming else "", run_cfg.federation.clients, k)
            if report is None:
                def report(row: dict[str, Any]) -> None:
                    _flower_log("%s; %s", round_line(row, run_cfg.run.rounds), transport_line(polling.calls))
                    polling.calls.clear()
        elif carriers:
            grid = VirtualGrid(grid, run_cfg, carriers)
        try:
            summary = run_federation(grid, run_cfg, out, resume=resuming, on_round=report)
            if result is not None:
                result["summary"] = summary
            if cfg is None:
                _flower_log("finished: %d rounds, final test accuracy %s; results in %s", summary.get("rounds", 0),
                            summary.get("final_test_accuracy"), out.resolve())
        except BaseException as err:  # surfaced by the caller: run_simulation swallows errors
            if result is not None:
                result["error"] = err
            raise

    return app


app = make_server_app()
