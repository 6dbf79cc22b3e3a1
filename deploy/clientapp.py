"""Warm ClientApps: one long-lived ClientApp process per SuperNode, serving message after message.

Flower 1.39 runs a ClientApp as a fresh ``flwr-clientapp`` process per message (its SuperExec
launches one per task token; ``flwr-clientapp`` serves exactly one task and exits), so every
message pays for importing torch, Flower and Stamen and for loading the dataset — seconds per
round that no training needs (DEPLOY.md §7). This module replaces that SuperExec for a
SuperNode started with ``--isolation process``. It speaks Flower's own Runtime API (the
"ClientAppIo" API of the SuperNode) and splits Flower's ``flwr-clientapp`` in two:

- the **runner** (:class:`ClientAppRunner`; light, imports only Flower) acquires each task
  from the SuperNode, holds its token and heartbeat, pulls the task's input (context, run,
  FAB) and message, hands them to the worker, and pushes the worker's reply and the new
  context back — the calls ``flwr-clientapp`` makes, in the same order;
- the **worker** (:func:`worker_main`) loads the ClientApp once per FAB and calls it for every
  message. Whatever the app caches per process — Stamen's task, model and partitions
  (``client/app.py``, ``_worker``) — stays warm across messages and rounds. Workers are forked
  by a **zygote** (:func:`zygote_main`) that has imported the app's modules once
  (``--preload``: torch, Flower, Stamen, the dataset libraries), so a worker starts warm and a
  dead one is replaced in a fraction of a second; SuperNodes on one machine may share a
  zygote (``--zygote``; ``stamen deploy local`` does), paying those imports once.

Runner and worker exchange frames over a socket pair (:func:`pack_frame`: a JSON header and
raw byte blobs — Flower's own serialized objects and protobufs, never pickle). If the worker
dies (crash, OOM, ``kill -9``) while it handles a message, the runner answers that message
with a ``CLIENT_APP_CRASHED`` error reply at once (the round closes without waiting for the
token to expire, 60 s in Flower), marks the task failed and starts a new worker; a worker that
died while idle is replaced before the next message. A worker that keeps dying before it is
ready is restarted with a growing pause (at most 30 s).

The runner runs inside the SuperNode's process when the SuperNode is started by
``python -m stamen.deploy.supernode`` (then the SuperNode wakes it the moment a message is
stored, and it wakes the SuperNode the moment the reply is stored: no poll on that hop), or
as its own process next to a SuperNode (``python -m stamen.deploy.clientapp
--runtime-api-address 127.0.0.1:9094``, the compose/k8s layout), polling ``AcquireTask`` with
a :class:`~stamen.deploy.pacing.Backoff`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from logging import DEBUG, ERROR, INFO, WARNING
from multiprocessing.connection import Connection
from typing import Any, Callable

from stamen.deploy import envelope
from stamen.deploy.pacing import Backoff, object_pull_options

#: modules a worker has imported before its first message (the cold start it saves every message): Stamen's
#: ClientApp (torch, Flower, Stamen) and what loading the default digits task imports (scikit-learn's
#: loaders, flwr-datasets' partitioners); ~8 CPU seconds in all, paid once per zygote
DEFAULT_PRELOAD = ("stamen.client.app", "sklearn.datasets", "sklearn.model_selection", "flwr_datasets.partitioner")
#: env variable: the runner's worker command prefix (tests may point it elsewhere); default this Python
WORKER_PYTHON_ENV = "STAMEN_CLIENTAPP_PYTHON"
MAX_RESTART_PAUSE_S = 30.0


def _log(level: int, msg: str, *args: Any) -> None:
    from flwr.supercore import log

    log(level, "[stamen clientapp] " + msg, *args)


# -- frames -----------------------------------------------------------------------------------
def pack_frame(header: dict[str, Any], blobs: dict[str, bytes] | None = None) -> bytes:
    """``header`` (JSON) and named byte ``blobs`` as one frame: length, header, blobs in order."""
    blobs = blobs or {}
    head = json.dumps({**header, "_blobs": [[name, len(data)] for name, data in blobs.items()]}).encode()
    return b"".join([struct.pack("!I", len(head)), head, *blobs.values()])


def unpack_frame(frame: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    (n,) = struct.unpack_from("!I", frame)
    header = json.loads(frame[4:4 + n])
    pos, blobs = 4 + n, {}
    for name, size in header.pop("_blobs"):
        blobs[name] = frame[pos:pos + size]
        pos += size
    if pos != len(frame):
        raise ValueError(f"malformed frame: {len(frame) - pos} trailing bytes")
    return header, blobs


_OBJ = "obj:"


def _message_blobs(contents: dict[str, bytes]) -> dict[str, bytes]:
    return {_OBJ + oid: data for oid, data in contents.items()}


def _message_from_blobs(message_id: str, blobs: dict[str, bytes]):
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents = {name[len(_OBJ):]: data for name, data in blobs.items() if name.startswith(_OBJ)}
    message = inflate_object_from_contents(message_id, contents)
    message.metadata.__dict__["_message_id"] = message_id
    return message


def _message_contents(message) -> dict[str, bytes]:
    """Every object of ``message`` (itself included) by object id, as Flower deflates them."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}


# -- the worker ---------------------------------------------------------------------------------
def _flower_reason(ex: BaseException) -> str:
    return str(type(ex)) + ":<'" + str(ex) + "'>"  # the format flwr-clientapp reports


class _Apps:
    """ClientApps loaded in this worker, one per FAB hash (installed into FLWR_HOME once)."""

    def __init__(self) -> None:
        self.apps: dict[str, Any] = {}

    def get(self, fab, run):
        if fab.hash_str not in self.apps:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]


def _serve_in_worker(header: dict[str, Any], blobs: dict[str, bytes], apps: _Apps) -> bytes:
    from flwr.app import Error, Message
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
    from flwr.proto.fab_pb2 import Fab as ProtoFab  # pylint: disable=E0611
    from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
    from flwr.proto.run_pb2 import Run as ProtoRun  # pylint: disable=E0611
    from flwr.supercore.task_identity import TaskIdentity

    t0, c0 = time.perf_counter(), time.process_time()
    context = context_from_proto(ProtoContext.FromString(blobs["context"]))
    run = run_from_proto(ProtoRun.FromString(blobs["run"]))
    fab = fab_from_proto(ProtoFab.FromString(blobs["fab"]))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = header["task_id"], run.run_id, context.node_id
    message = _message_from_blobs(header["message_id"], blobs)
    seal_reply = False
    try:
        if message.has_content() and envelope.is_sealed(message.content):
            message.content, seal_reply = envelope.unseal(message.content), True
        elif message.has_content() and envelope.wants_sealed(message.content):
            message.content, seal_reply = envelope.without_request(message.content), True
        reply = apps.get(fab, run)(message=message, context=context)
        if seal_reply and reply.has_content():
            reply.content = envelope.seal(reply.content)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # as flwr-clientapp: the app's exception becomes an error reply
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = ("An exception was raised when attempting to load `ClientApp`" if isinstance(ex, LoadClientAppError)
                  else _flower_reason(ex))
        _log(ERROR, "ClientApp raised an exception: %s", reason)
        reply = Message(Error(code=code, reason=reason), reply_to=message)
        status, details = SubStatus.FAILED, reason
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return pack_frame({"kind": "reply", "message_id": reply.object_id, "status": status, "details": details,
                       "pid": os.getpid(), "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0},
                      {"context": context_to_proto(context).SerializeToString(), **_message_blobs(_message_contents(reply))})


def _preload(names: list[str]) -> float:
    t0 = time.perf_counter()
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # the app's own import will report it when it is loaded
            _log(WARNING, "preloading %s failed: %s", name, err)
    return time.perf_counter() - t0


def worker_main(fd: int, import_s: float = 0.0) -> None:
    """The worker: say ready, then serve task frames until the socket closes."""
    conn = Connection(fd)
    conn.send_bytes(pack_frame({"kind": "ready", "pid": os.getpid(), "import_s": import_s}))
    apps = _Apps()
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):  # the runner is gone: so is our SuperNode
            return
        header, blobs = unpack_frame(frame)
        if header.get("kind") == "stop":
            return
        try:
            conn.send_bytes(_serve_in_worker(header, blobs, apps))
        except (BrokenPipeError, OSError):
            return


# -- the zygote: imports once, forks workers -------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def zygote_main(path: str, preload: list[str], parent_pid: int | None = None) -> None:
    """Import ``preload`` once, then fork a ready worker for every request on the Unix socket ``path``.

    A request carries one file descriptor (the worker's end of a socket pair, ``SCM_RIGHTS``)
    and a JSON object with the requester's environment and working directory, which the
    worker takes over; the answer is the worker's PID. The zygote stays single-threaded (it
    forks), reaps nothing (``SIGCHLD`` ignored: workers vanish when they exit) and leaves when
    ``parent_pid`` does. Several SuperNodes on one machine can share one zygote
    (``stamen deploy local``): the imports — torch, Flower, Stamen, the dataset libraries, ~8 CPU
    seconds — are paid once, and a worker killed mid-round is back in a fraction of a second.
    """
    import select

    import_s = _preload(preload)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    tmp = f"{path}.{os.getpid()}.tmp"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(tmp)
    srv.listen(64)
    os.replace(tmp, path)  # appears only once it listens
    print(f"[stamen clientapp] zygote {os.getpid()} ready on {path} (imports {import_s:.1f} s)", file=sys.stderr,
          flush=True)
    try:
        while parent_pid is None or _pid_alive(parent_pid):
            ready, _, _ = select.select([srv], [], [], 1.0)
            if not ready:
                continue
            conn, _ = srv.accept()
            try:
                conn.settimeout(30)
                data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 1)
                if len(fds) != 1:
                    raise ValueError(f"a request carries one file descriptor, not {len(fds)}")
                request = json.loads(data)
                pid = os.fork()
                if pid == 0:  # the worker
                    try:
                        srv.close()
                        conn.close()
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        os.environ.clear()
                        os.environ.update(request.get("env", {}))
                        if request.get("cwd"):
                            os.chdir(request["cwd"])
                        try:
                            with open("/proc/self/comm", "w") as comm:
                                comm.write("stamen-worker")
                        except OSError:
                            pass
                        worker_main(fds[0], import_s)
                    finally:
                        os._exit(0)
                os.close(fds[0])
                conn.sendall(json.dumps({"pid": pid}).encode())
            except Exception as err:  # one bad request must not take the zygote down
                print(f"[stamen clientapp] zygote: request failed: {err}", file=sys.stderr, flush=True)
            finally:
                conn.close()
    finally:
        srv.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def request_worker(path: str, timeout: float = 30.0) -> tuple[int, Connection]:
    """Ask the zygote at ``path`` for a worker; return its PID and our end of its socket."""
    parent, child = socket.socketpair()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            socket.send_fds(s, [json.dumps({"env": dict(os.environ), "cwd": os.getcwd()}).encode()],
                            [child.fileno()])
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        pid = int(json.loads(answer)["pid"])
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return pid, Connection(parent.detach())


# -- the runner ---------------------------------------------------------------------------------
class WorkerDied(RuntimeError):
    pass


class _Worker:
    def __init__(self, pid: int, conn: Connection):
        self.pid, self.conn = pid, conn
        self.fab_hash: str | None = None  # the app it has loaded
        self.ready = False
        self.started = time.monotonic()

    def alive(self) -> bool:
        return _pid_alive(self.pid)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def describe_exit(self) -> str:
        deadline = time.monotonic() + 1.0  # its socket closes a moment before the process is gone
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return f"ClientApp process {self.pid} {'stopped answering' if self.alive() else 'died'}"


def _retry_invoker(max_time: float | None = 600.0):
    """Retries for the runner's Runtime API calls: Flower's (transport errors, 503/504), without what
    suits only a one-task process — Flower's invoker SIGINTs the process on a 401 (the task's token
    was revoked) and raises the BaseException ``RunNotRunningException`` on a 403. Here both are
    ordinary errors of that one task; the SuperNode the runner lives in carries on."""
    import httpx
    from flwr.common.constant import MAX_RETRY_DELAY
    from flwr.supercore.retry import RetryInvoker, exponential

    retryable = {httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT}

    def give_up(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in retryable
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=MAX_RETRY_DELAY),
        recoverable_exceptions=(httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
                                httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout,
                                httpx.HTTPStatusError),
        max_tries=None, max_time=max_time, on_success=None, on_backoff=None, on_giveup=None, should_giveup=give_up)


def _task_heartbeat(client) -> Callable[[], bool]:
    """A task's heartbeat, as Flower's ``make_task_heartbeat_fn_http`` but for a process that outlives
    its tasks: a rejected heartbeat (the task was finished or its token revoked meanwhile) just
    stops counting; Flower's raises SIGINT, which would end the whole SuperNode the runner lives in."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False  # retried with backoff by the sender
        except httpx.HTTPStatusError as err:
            return err.response.status_code not in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT)
        return True

    return beat


class ClientAppRunner:
    """Acquire ClientApp tasks from a SuperNode's Runtime API and run them in a warm worker.

    ``wake``: an event the SuperNode sets when a message arrives (in-process runner), else the
    runner polls with ``poll``. ``on_reply``: called once a reply is stored at the SuperNode.
    """

    def __init__(self, runtime_api_address: str, *, insecure: bool = True, root_certificates: bytes | None = None,
                 wake: threading.Event | None = None, on_reply: Callable[[], None] | None = None,
                 poll: Backoff | None = None, preload: tuple[str, ...] | list[str] = DEFAULT_PRELOAD,
                 zygote: str | None = None, pull_max_s: float | None = None):
        self.address = runtime_api_address
        self.insecure, self.root_certificates = insecure, root_certificates
        self.wake, self.on_reply = wake, on_reply or (lambda: None)
        self.poll = poll or Backoff(0.01, 1.0, 1.5)
        self.preload = list(preload)
        self.shared_zygote = zygote  # a zygote shared with other SuperNodes (stamen deploy local), if any
        #: give up on a message's objects after this long (None: Flower's 2 h). Woken by its SuperNode, the
        #: runner only sees tasks whose objects are stored; one without them belongs to a stopped run.
        self.pull_max_s = pull_max_s
        self._own_zygote: tuple[subprocess.Popen, str] | None = None
        self._stop = threading.Event()
        self._worker: _Worker | None = None
        self._restart_pause = 0.0
        self._thread: threading.Thread | None = None

    # -- worker lifecycle ------------------------------------------------------------------
    def _start_own_zygote(self) -> str:
        import tempfile

        if self._own_zygote is not None:
            if self._own_zygote[0].poll() is None:
                return self._own_zygote[1]
            self._remove_own_zygote()
        path = os.path.join(tempfile.mkdtemp(prefix="stamen-zygote-"), "zygote.sock")
        python = os.environ.get(WORKER_PYTHON_ENV, sys.executable)
        popen = subprocess.Popen([python, "-m", "stamen.deploy.clientapp", "zygote", "--socket", path,
                                  "--parent-pid", str(os.getpid()), *[x for m in self.preload for x in ("--preload", m)]],
                                 stdin=subprocess.DEVNULL)
        self._own_zygote = (popen, path)
        _log(INFO, "started ClientApp zygote process %d (imports %s)", popen.pid, ", ".join(self.preload))
        return path

    def _zygote_path(self, deadline: float) -> str:
        """The socket of a zygote that is up (waiting for it to finish its imports)."""
        while not self._stop.is_set():
            path = self.shared_zygote if self.shared_zygote else self._start_own_zygote()
            if os.path.exists(path):
                return path
            own = self._own_zygote
            if self.shared_zygote and time.monotonic() > deadline:
                _log(WARNING, "the shared ClientApp zygote %s is not there; starting this SuperNode's own", path)
                self.shared_zygote = None
                continue
            if not self.shared_zygote and own is not None and own[0].poll() is not None:
                raise RuntimeError(f"the ClientApp zygote exited with code {own[0].returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no ClientApp zygote at {path} after waiting")
            time.sleep(0.05)
        raise RuntimeError("stopped")

    def _spawn(self) -> _Worker:
        deadline = time.monotonic() + 600.0
        while True:
            path = self._zygote_path(deadline)
            try:
                pid, conn = request_worker(path)
                break
            except (OSError, ValueError, KeyError) as err:  # the zygote died: use (or restart) our own
                _log(WARNING, "the ClientApp zygote at %s did not answer (%s)", path, err)
                if self.shared_zygote:
                    self.shared_zygote = None
                elif self._own_zygote is not None and self._own_zygote[0].poll() is None:
                    self._own_zygote[0].kill()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        _log(INFO, "started ClientApp worker process %d", pid)
        return _Worker(pid, conn)

    def _retire(self, worker: _Worker) -> None:
        try:
            worker.conn.close()
        except OSError:
            pass
        if worker.alive():
            worker.kill()

    def ensure_worker(self) -> _Worker:
        """A live worker (started now if there is none or it died while idle)."""
        w = self._worker
        if w is not None and w.alive():
            return w
        if w is not None:
            _log(WARNING, "%s while idle; starting a new one", w.describe_exit())
            self._retire(w)
            early = not w.ready or time.monotonic() - w.started < 10.0
            self._restart_pause = min(MAX_RESTART_PAUSE_S, 2 * self._restart_pause or 1.0) if early else 0.0
            if self._restart_pause:
                self._stop.wait(self._restart_pause)
        self._worker = self._spawn()
        return self._worker

    def _recv(self, worker: _Worker) -> tuple[dict[str, Any], dict[str, bytes]]:
        try:
            header, blobs = unpack_frame(worker.conn.recv_bytes())
        except (EOFError, OSError):
            raise WorkerDied(worker.describe_exit()) from None
        if header.get("kind") == "ready":
            worker.ready = True
            self._restart_pause = 0.0
            _log(INFO, "ClientApp worker %d ready (forked from a zygote that imported the app's modules in %.1f s)",
                 header["pid"], header["import_s"])
        return header, blobs

    def _call_worker(self, frame: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
        worker = self.ensure_worker()
        try:
            worker.conn.send_bytes(frame)
        except OSError:
            raise WorkerDied(worker.describe_exit()) from None
        while True:
            header, blobs = self._recv(worker)
            if header.get("kind") == "reply":
                return header, blobs

    # -- the loop ----------------------------------------------------------------------------
    def _client(self, interceptors):
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.insecure, root_certificates=self.root_certificates,
            interceptors=interceptors, retry_invoker=_retry_invoker())

    def run(self) -> None:
        """Serve tasks until :meth:`stop` (blocking)."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        self.ensure_worker()
        base = self._client([RuntimeVersionHttpInterceptor(component_name="SuperExec")])
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while not self._stop.is_set():
                try:
                    res = base.AcquireTask(request)
                except Exception as err:  # the SuperNode is starting or going away: keep trying until stopped
                    _log(DEBUG, "AcquireTask failed: %s", err)
                    res = None
                if res is not None and res.HasField("task") and res.token:
                    self._serve(res.task, res.token)
                    self.poll.reset()
                    continue
                if self._worker is not None and not self._worker.alive():
                    self.ensure_worker()
                interval = self.poll.next()
                if self.wake is not None:
                    if self.wake.wait(interval):
                        self.wake.clear()
                else:
                    self._stop.wait(interval)
        finally:
            base.close()

    def _serve(self, task, token: str) -> None:
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.common.serde import context_from_proto
        from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
        from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf)
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, pull_objects
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.run import RunNotRunningException
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        t0 = time.perf_counter()
        client = self._client([RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                               RuntimeTokenHttpInterceptor(token)])
        heartbeat = HeartbeatSender(_task_heartbeat(client))
        heartbeat.start()
        message = context = None
        try:
            res = client.PullTaskInput(PullTaskInputRequest())
            context = context_from_proto(res.context)
            pulled = client.PullMessages(PullAppMessagesRequest())
            if not pulled.messages_list:
                raise RuntimeError("No messages received from Runtime API")
            tree = pulled.message_object_trees[0]
            node = Node(node_id=context.node_id)
            options = object_pull_options()
            if self.pull_max_s is not None:
                options["max_time"] = self.pull_max_s
            object_ids = [t.object_id for t in iterate_object_tree(tree)]
            contents = pull_objects(object_ids,
                                    make_pull_object_fn_protobuf(client.PullObject, node, context.run_id), **options)
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id)(
                tree.object_id)
            t_pulled = time.perf_counter()
            message = inflate_object_from_contents(tree.object_id, contents, keep_object_contents=True)
            message.metadata.__dict__["_message_id"] = tree.object_id
            frame = pack_frame({"kind": "task", "task_id": int(task.task_id), "message_id": tree.object_id},
                               {"context": res.context.SerializeToString(), "run": res.run.SerializeToString(),
                                "fab": res.fab.SerializeToString(), **_message_blobs(contents)})
            del contents
            t_sent = time.perf_counter()
            if task.fab_hash and self._worker is not None and self._worker.fab_hash not in (None, task.fab_hash):
                _log(INFO, "a new app (FAB %s): a fresh ClientApp process for it", task.fab_hash[:8])
                self._retire(self._worker)  # a worker serves one app: modules a FAB brings are not shared
                self._worker = None
            try:
                header, blobs = self._call_worker(frame)
                self._worker.fab_hash = task.fab_hash or None
            except WorkerDied as died:
                reason = f"{died}: Stamen restarts it; this message is lost"
                _log(ERROR, "%s while handling %s message %s", died, message.metadata.message_type,
                     message.metadata.message_id[:12])
                self._retire(self._worker)
                self._worker = None
                push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason),
                                             reply_to=message), context)
                self.on_reply()
                push_task_output(client, context, SubStatus.FAILED, reason)
                self.ensure_worker()
                return
            t_back = time.perf_counter()
            reply = _message_from_blobs(header["message_id"], blobs)
            new_context = context_from_proto(ProtoContext.FromString(blobs["context"]))
            push_message(client, reply, new_context)
            self.on_reply()
            t_pushed = time.perf_counter()
            push_task_output(client, new_context, header["status"], header["details"])
            _log(INFO, "%s message served by ClientApp worker %d in %.2f s (pull %.2f s for %d objects, worker %.2f s "
                 "of which app %.2f s (CPU %.2f s), push %.2f s)", message.metadata.message_type, header["pid"],
                 time.perf_counter() - t0, t_pulled - t0, len(object_ids), t_back - t_sent,
                 header["seconds"], header["cpu_s"], t_pushed - t_back)
        except (Exception, RunNotRunningException) as err:  # the task failed (API error, token revoked, run
            _log(ERROR, "task %d failed: %s", task.task_id, err or type(err).__name__)  # stopped): keep serving
            try:
                # answer only a message that arrived whole: its SuperNode waits for that reply (and would
                # take any other reply for it); a message without its objects belongs to a stopped run
                if message is not None and context is not None:
                    push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=str(err)),
                                                 reply_to=message), context)
                    self.on_reply()
                push_task_output(client, context, SubStatus.FAILED, str(err))
            except (Exception, RunNotRunningException):  # the SuperNode is gone or the token was revoked
                pass
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    # -- threads and shutdown ------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Run in a daemon thread (inside a SuperNode process)."""
        self._thread = threading.Thread(target=self._run_logged, name="stamen-clientapp-runner", daemon=True)
        self._thread.start()
        return self._thread

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception as err:  # never silently: the SuperNode would wait forever for replies
            _log(ERROR, "the ClientApp runner stopped: %s", err)
            raise

    def stop(self) -> None:
        self._stop.set()
        if self.wake is not None:
            self.wake.set()
        w, self._worker = self._worker, None
        if w is not None:
            try:
                w.conn.send_bytes(pack_frame({"kind": "stop"}))
            except OSError:
                pass
            deadline = time.monotonic() + 5
            while w.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            self._retire(w)
        self._remove_own_zygote()

    def _remove_own_zygote(self) -> None:
        import shutil

        if self._own_zygote is None:
            return
        popen, path = self._own_zygote
        self._own_zygote = None
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                popen.kill()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


# -- command line -----------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stamen.deploy.clientapp", description=(
        "Serve a SuperNode's ClientApp tasks with one warm ClientApp process (the SuperNode runs with "
        "--isolation process). 'worker' is the internal child process."))
    sub = p.add_subparsers(dest="cmd")
    z = sub.add_parser("zygote", help="import the app's modules once; fork a worker per request on --socket")
    z.add_argument("--socket", required=True)
    z.add_argument("--preload", action="append", default=None)
    z.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                   help="the SuperNode's Runtime API (its --host:--port)")
    p.add_argument("--root-certificates", default=None, help="CA of a TLS Runtime API (default: plain HTTP)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    p.add_argument("--preload", action="append", default=None,
                   help=f"module the worker imports before its first message (repeatable; default {DEFAULT_PRELOAD})")
    p.add_argument("--poll-min", type=float, default=0.01)
    p.add_argument("--poll-max", type=float, default=1.0)
    p.add_argument("--zygote", default=None, help="socket of a zygote shared with other SuperNodes on this machine")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.cmd == "zygote":
        zygote_main(args.socket, list(args.preload or DEFAULT_PRELOAD), args.parent_pid)
        return
    roots = open(args.root_certificates, "rb").read() if args.root_certificates else None
    runner = ClientAppRunner(args.runtime_api_address, insecure=roots is None, root_certificates=roots,
                             poll=Backoff(args.poll_min, args.poll_max, 1.5),
                             preload=tuple(args.preload or DEFAULT_PRELOAD), zygote=args.zygote)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)

    def stop(signum, frame):
        runner.stop()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        runner.run()
    finally:
        runner.stop()


if __name__ == "__main__":
    main()
