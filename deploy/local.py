"""A real Flower deployment on one machine: 1 SuperLink + N SuperNodes over gRPC, TLS and node auth.

:class:`LocalFederation` starts the processes of :mod:`stamen.deploy.spec` with freshly made
certificates, registers each SuperNode's public key, submits Stamen configs with ``flwr run``
(from a generated app directory, never the repository) and stops everything — grandchildren
included — on exit, error, timeout or Ctrl-C. Options route the SuperNodes through a
byte-counting proxy (:mod:`stamen.deploy.proxy`) or place the SuperLink and each SuperNode in
their own network namespace (:mod:`stamen.deploy.netns`), i.e. on separate "hosts".

``stamen deploy local`` is :func:`deploy_local`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stamen.deploy import pacing, spec
from stamen.deploy.certs import CertPaths, make_certificates
from stamen.deploy.procs import ProcessGroup, tagged_pids
from stamen.deploy.proxy import DOWN, UP, ByteCountingProxy, split_traffic


class DeployError(RuntimeError):
    """The deployment could not start, or a run failed; the message says which process and why."""


class DeployTimeout(DeployError):
    """A run did not finish within its timeout (it was stopped)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Placement:
    """Where each process runs and which address it dials (default: everything on loopback).

    ``superlink_ns`` / ``node_ns[i]``: network namespace (None: this one). ``node_dial[i]``: the
    SuperLink IP that node i connects to. ``fleet_bind``: the Fleet API bind host (loopback unless a
    placement says otherwise; a non-loopback one needs TLS and node authentication — see
    :func:`stamen.deploy.spec.superlink_args`). The Control API always binds loopback.
    """

    superlink_ns: str | None = None
    fleet_bind: str = spec.LOOPBACK
    node_ns: list[str | None] = field(default_factory=list)
    node_dial: list[str] = field(default_factory=list)
    cert_ips: list[str] = field(default_factory=list)

    def ns(self, i: int) -> str | None:
        return self.node_ns[i] if i < len(self.node_ns) else None

    def dial(self, i: int) -> str:
        return self.node_dial[i] if i < len(self.node_dial) else "127.0.0.1"


@dataclass
class RunResult:
    run_id: str | None
    status: str  # Flower's run status, e.g. "finished:completed"
    out_dir: Path
    started_at: float
    finished_at: float
    rows: list[dict[str, Any]]
    #: wall-clock time each metrics.jsonl row was written (mtime of the file when the row appeared)
    row_written_at: list[float]
    flower_traffic: dict[str, Any] | None
    log: str
    #: Flower's record of the run (``flwr ls --run-id``): status, timestamps, traffic, compute time
    flower_info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed" and (self.out_dir / "summary.json").exists()

    def round_windows(self) -> list[tuple[float, float]]:
        """[start, end] of each round in wall-clock time (end = row written, start = end − wall_s)."""
        return [(t - float(r["wall_s"]), t) for r, t in zip(self.rows, self.row_written_at)]


class LocalFederation:
    """1 SuperLink + ``nodes`` SuperNodes as local processes; a context manager.

    ``clients``: the partitions the SuperNodes host (default ``nodes``: one each); with fewer
    SuperNodes than clients, SuperNode k hosts ``{p : p mod nodes = k}`` (runs must then set
    ``federation.sim_nodes = nodes``; :func:`stamen.deploy.spec.deployed_supernodes`).
    ``clientapps``: ``"warm"`` (default) runs Stamen's SuperNode (``deploy/supernode.py``: paced
    polls, one long-lived ClientApp process per SuperNode); ``"flower"`` runs Flower's own
    ``flower-supernode`` (a new ClientApp process per message, 3 s polls) — the "before" of
    ``benchmarks/deploy_rounds.py``.
    """

    def __init__(self, nodes: int, workdir: str | Path | None = None, *, tls: bool = True, node_auth: bool = True,
                 measure_bytes: bool = False, placement: Placement | None = None, isolation: str = "subprocess",
                 start_timeout: float = 120.0, echo: Callable[[str], None] | None = None,
                 clients: int | None = None, clientapps: str = "warm",
                 supernode_poll: tuple[float, float] | None = None):
        if nodes < 1:
            raise ValueError("a federation needs at least one SuperNode")
        if clients is not None and clients < nodes:
            raise ValueError(f"{nodes} SuperNodes for {clients} clients: each SuperNode hosts at least one client")
        if clientapps not in ("warm", "flower"):
            raise ValueError(f"clientapps must be 'warm' or 'flower', not {clientapps!r}")
        if node_auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure)")
        if measure_bytes and placement is not None and (placement.superlink_ns or any(placement.node_ns)):
            raise ValueError("the byte-counting proxy runs in this network namespace: use it on loopback only")
        self.nodes = nodes
        self.clients = clients or nodes
        self.clientapps = clientapps
        self.supernode_poll = supernode_poll  # (min, max) seconds of the SuperNodes' polls; None: the defaults
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="stamen-deploy-")).resolve()
        self.tls, self.node_auth, self.isolation = tls, node_auth, isolation
        self.placement = placement or Placement()
        self.start_timeout = start_timeout
        self.echo = echo or (lambda s: None)
        self.procs = ProcessGroup(self.workdir / "logs", env=spec.FLOWER_ENV)
        self.certs: CertPaths | None = None
        self.fleet_port = free_port()
        self.control_port = free_port()
        self.node_ports = [free_port() for _ in range(nodes)]
        self.proxy: ByteCountingProxy | None = None
        self.measure_bytes = measure_bytes
        self.flwr_home = self.workdir / "flwr-home"
        self.app_dir = self.workdir / "app"
        self.node_ids: dict[int, str] = {}
        self.killed: set[int] = set()  # SuperNodes stopped on purpose (a fault being simulated)
        self.killed_superlink = False
        self._runs = 0

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, *, wait: bool = True, after_superlink: Callable[[], Any] | None = None) -> Any:
        """Start the SuperLink, register the keys, start the SuperNodes (and wait until they are
        connected, if ``wait``). ``after_superlink`` runs as soon as the SuperLink is up — e.g. a
        ``submit`` — so the ServerApp starts while the SuperNodes do; its result is returned."""
        if self.tls:
            self.certs = make_certificates(self.workdir / "certs", nodes=self.nodes,
                                           ips=list(dict.fromkeys(self.placement.cert_ips)))
        spec.write_flwr_home(self.flwr_home, f"127.0.0.1:{self.control_port}",
                             ca=self.certs.ca_cert if self.certs else None)
        spec.write_app_dir(self.app_dir)
        self.start_zygote()  # its imports overlap the SuperLink's start
        self.start_superlink()
        early = after_superlink() if after_superlink is not None else None
        if self.node_auth:
            self.register_all()
        if self.measure_bytes:
            self.proxy = ByteCountingProxy(("127.0.0.1", self.fleet_port))
        for i in range(self.nodes):
            self.start_supernode(i)
        if wait:
            self.wait_connected(range(self.nodes), self.start_timeout)
        return early

    def wait_connected(self, nodes, timeout: float) -> None:
        """Wait until each SuperNode in ``nodes`` is connected and activated (it logs its node id)."""
        deadline = time.monotonic() + timeout
        for i in nodes:
            self._wait_log(f"supernode-{i}", ("SuperNode ID:",), max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        try:
            self.procs.shutdown()
        finally:
            if self.proxy is not None:
                self.proxy.close()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- processes -----------------------------------------------------------------------
    def _home(self, name: str) -> dict[str, str]:
        home = self.workdir / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        return {"FLWR_HOME": str(home)}

    def superlink_argv(self) -> list[str]:
        c = self.certs
        return ["flower-superlink", *spec.superlink_args(
            ca=c.ca_cert if c else None, cert=c.server_cert if c else None, key=c.server_key if c else None,
            node_auth=self.node_auth, fleet_address=f"{self.placement.fleet_bind}:{self.fleet_port}",
            host=spec.LOOPBACK, port=self.control_port, isolation=self.isolation)]

    def _superlink_env(self, name: str) -> dict[str, str]:
        env = self._home(name)
        if self.clientapps == "warm":  # the SuperExec starts the ServerApp within 0.2 s of `flwr run`, not 1 s
            env[pacing.SUPEREXEC_POLL_ENV] = str(pacing.SUPEREXEC_POLL_S)
        return env

    def start_superlink(self) -> None:
        self.procs.start("superlink", self.superlink_argv(), env=self._superlink_env("superlink"),
                         netns=self.placement.superlink_ns, cwd=self.workdir)
        if self.isolation == "process":
            self.procs.start("superlink-superexec", ["flower-superexec", *spec.superexec_args(
                f"127.0.0.1:{self.control_port}", ca=self.certs.ca_cert if self.certs else None)],
                env=self._superlink_env("superlink-superexec"), netns=self.placement.superlink_ns, cwd=self.workdir)
        self._wait_log("superlink", ("Application startup complete", "Fleet API"), self.start_timeout)

    def fleet_target(self) -> str:
        """The address a SuperNode on this machine dials (the proxy when counting bytes)."""
        if self.proxy is not None:
            return f"127.0.0.1:{self.proxy.port}"
        return f"{self.placement.dial(0)}:{self.fleet_port}"

    def supernode_argv(self, i: int) -> list[str]:
        c = self.certs
        target = self.fleet_target() if self.proxy is not None else f"{self.placement.dial(i)}:{self.fleet_port}"
        args = spec.supernode_args(
            i, self.clients, superlink=target, ca=c.ca_cert if c else None,
            auth_key=c.node_key(i) if (c and self.node_auth) else None, host="127.0.0.1", port=self.node_ports[i],
            isolation="process" if self.clientapps == "warm" else self.isolation, supernodes=self.nodes)
        if self.clientapps == "warm":
            poll = self.supernode_poll or (None, None)
            # --isolation process asks for the compose/k8s layout: the ClientApp runner is a process of its own
            external = "external" if self.isolation == "process" else "warm"
            return spec.stamen_supernode_argv(sys.executable, args, clientapps=external, zygote=self.zygote_socket,
                                              poll_min=poll[0], poll_max=poll[1])
        return ["flower-supernode", *args]

    @property
    def zygote_socket(self) -> str | None:
        """The ClientApp zygote the SuperNodes share (one per network namespace: they meet on its socket)."""
        if self.clientapps != "warm" or any(self.placement.ns(i) for i in range(self.nodes)):
            return None  # SuperNodes on separate "hosts" each start their own
        return str(self.workdir / "zygote.sock")

    def start_zygote(self) -> None:
        if self.zygote_socket is not None and not self.procs.alive("clientapp-zygote"):
            self.procs.start("clientapp-zygote", spec.clientapp_zygote_argv(sys.executable, self.zygote_socket,
                                                                          parent_pid=os.getpid()),
                             env=self._home("clientapp-zygote"), cwd=self.workdir)

    def start_supernode(self, i: int) -> str:
        name = f"supernode-{i}"
        self.procs.start(name, self.supernode_argv(i), env=self._home(name), netns=self.placement.ns(i),
                         cwd=self.workdir)
        if self.isolation == "process" and self.clientapps == "flower":
            self.procs.start(f"{name}-superexec", ["flower-superexec", *spec.superexec_args(
                f"127.0.0.1:{self.node_ports[i]}", ca=None)], env=self._home(f"{name}-superexec"),
                netns=self.placement.ns(i), cwd=self.workdir)
        elif self.isolation == "process":  # Stamen's runner in its own process, as in a separate container
            self.procs.start(f"{name}-superexec", spec.clientapp_runner_argv(
                sys.executable, f"127.0.0.1:{self.node_ports[i]}", zygote=self.zygote_socket),
                env=self._home(f"{name}-superexec"), netns=self.placement.ns(i), cwd=self.workdir)
        return name

    def start_process(self, name: str, argv: list[str], netns: str | None = None):
        """Start any other process in this deployment (cleaned up with it), e.g. an intruder node."""
        return self.procs.start(name, argv, env=self._home(name), netns=netns, cwd=self.workdir)

    def kill_supernode(self, i: int) -> None:
        """Crash SuperNode ``i``: SIGKILL it and its ClientApp processes (no sign-off)."""
        self.killed.add(i)
        for suffix in ("-superexec", ""):
            self.procs.kill(f"supernode-{i}{suffix}")

    def rejoin_supernode(self, i: int, timeout: float = 180.0) -> None:
        """Start SuperNode ``i`` again until the SuperLink accepts it (same key, so same node id).

        A crashed node stays "online" at the SuperLink until 2 heartbeat intervals (2 × 30 s)
        pass without a heartbeat, and Flower 1.39 refuses to activate an online node, so a
        restart is retried until it connects.
        """
        name = f"supernode-{i}"
        deadline = time.monotonic() + timeout
        while True:
            if self.procs.alive(name):
                self.kill_supernode(i)
            log = self.procs.started[name].log
            offset = log.stat().st_size if log.exists() else 0
            self.start_supernode(i)  # stays in self.killed (runs tolerate its absence) until it is back
            while time.monotonic() < deadline:
                text = log.read_bytes()[offset:].decode(errors="replace")
                if "SuperNode ID:" in text:
                    self.killed.discard(i)
                    return
                if not self.procs.alive(name):
                    break
                time.sleep(0.5)
            if time.monotonic() >= deadline:
                self.kill_supernode(i)
                raise DeployError(f"{name} could not rejoin within {timeout:.0f} s:\n{self.procs.log_tail(name)}")
            time.sleep(5.0)

    def _pids_where(self, name: str | None, needle: str) -> list[int]:
        """Live processes of this deployment (of process ``name``, if given) whose command line has ``needle``."""
        out = []
        for pid in tagged_pids(self.procs.tag, name):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                out.append(pid)
        return sorted(out)

    def clientapp_pids(self, i: int) -> list[int]:
        """PIDs of SuperNode ``i``'s live ClientApp processes: its one warm worker (the last its runner
        started, as its log says), or Flower's per-message ``flwr-clientapp`` processes."""
        if self.clientapps == "flower":
            return self._pids_where(f"supernode-{i}", "flwr-clientapp")
        log = self._runner_log(i)
        started = re.findall(r"started ClientApp worker process (\d+)", log.read_text(errors="replace")
                             if log.exists() else "")
        from stamen.deploy.clientapp import _pid_alive

        return [int(started[-1])] if started and _pid_alive(int(started[-1])) else []

    def clientapp_pids_served(self, i: int, message_type: str = "train") -> list[int]:
        """The worker PID that served each ``message_type`` message at SuperNode ``i``, in order."""
        log = self._runner_log(i)
        text = log.read_text(errors="replace") if log.exists() else ""
        return [int(pid) for pid in re.findall(rf"{re.escape(message_type)}\S* message served by ClientApp worker "
                                               rf"(\d+)", text)]

    def _runner_log(self, i: int) -> Path:
        """The log of SuperNode ``i``'s ClientApp runner: the SuperNode's own, or its runner process's."""
        name = f"supernode-{i}-superexec" if self.isolation == "process" else f"supernode-{i}"
        return self.procs.started[name].log

    def serverapp_pids(self) -> list[int]:
        return self._pids_where(None, "flwr-serverapp")

    def kill_clientapp(self, i: int) -> list[int]:
        """SIGKILL SuperNode ``i``'s ClientApp process(es), as a crash would; return their PIDs."""
        pids = self.clientapp_pids(i)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink (a crash): the ServerApp it started goes with it; SuperNodes keep retrying."""
        self.killed_superlink = True
        self.procs.kill("superlink")
        for pid in self.serverapp_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_count(self, name: str, needle: str) -> int:
        log = self.procs.started[name].log
        return log.read_text(errors="replace").count(needle) if log.exists() else 0

    def wait_log_count(self, name: str, needle: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.log_count(name, needle) < count:
            if time.monotonic() > deadline:
                raise DeployError(f"{name}: fewer than {count} × {needle!r} within {timeout:.0f} s")
            time.sleep(0.2)

    def _wait_log(self, name: str, needles: tuple[str, ...], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        log = self.procs.started[name].log
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if all(n in text for n in needles):
                return
            if not self.procs.alive(name):
                raise DeployError(f"{name} exited with code {self.procs.started[name].popen.returncode}:\n"
                                  f"{self.procs.log_tail(name)}")
            time.sleep(0.2)
        raise DeployError(f"{name} did not start within {timeout:.0f} s:\n{self.procs.log_tail(name)}")

    # -- the flwr CLI ----------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run ``flwr ARGS`` against this federation's SuperLink; return (exit code, output)."""
        self._runs += 1
        name = f"flwr-{self._runs}"
        s = self.procs.start(name, ["flwr", *args], env={"FLWR_HOME": str(self.flwr_home)},
                             netns=self.placement.superlink_ns, cwd=self.workdir)
        try:
            rc = s.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(name)
            raise DeployError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None
        return rc, s.log.read_text(errors="replace")

    def _flwr_many(self, argss: list[list[str]], timeout: float = 180.0) -> list[tuple[int, str]]:
        """Run several flwr commands concurrently (each CLI start costs seconds of CPU)."""
        started = []
        for args in argss:
            self._runs += 1
            name = f"flwr-{self._runs}"
            started.append(self.procs.start(name, ["flwr", *args], env={"FLWR_HOME": str(self.flwr_home)},
                                            netns=self.placement.superlink_ns, cwd=self.workdir))
        out = []
        deadline = time.monotonic() + timeout
        for s in started:
            try:
                rc = s.popen.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.procs.stop(s.name)
                rc = -1
            out.append((rc, s.log.read_text(errors="replace")))
        return out

    def register_all(self) -> None:
        """Register every SuperNode's public key with the SuperLink: through Flower's Control API
        client in this process (as ``flwr supernode register`` does, without a CLI process per
        key), or with ``flwr supernode register`` inside the SuperLink's network namespace."""
        assert self.certs is not None
        if self.placement.superlink_ns is None:
            try:
                self._register_in_process()
                return
            except Exception as err:  # e.g. the Control API not answering yet: the CLI retries on its own
                self.echo(f"registering the SuperNode keys in-process failed ({err}); using `flwr supernode register`")
        results = self._flwr_many([["supernode", "register", str(self.certs.node_pub(i)), spec.CONNECTION,
                                    "--format", "json"] for i in range(self.nodes)])
        for i, (rc, out) in enumerate(results):
            data = _last_json(out)
            if rc != 0 or not data or not data.get("success"):
                raise DeployError(f"registering supernode-{i}'s public key failed (exit {rc}):\n{out[-2000:]}")
            self.node_ids[i] = str(data["node-id"])

    def _register_in_process(self) -> None:
        import tomllib

        from flwr.cli.flower_config import parse_superlink_connection
        from flwr.cli.supernode.register import try_load_public_key
        from flwr.cli.utils import init_http_client_from_connection
        from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611

        conf = tomllib.loads((self.flwr_home / "config.toml").read_text())["superlink"][spec.CONNECTION]
        with contextlib.redirect_stdout(io.StringIO()):  # the CLI helper announces the connection
            client = init_http_client_from_connection(parse_superlink_connection(conf, spec.CONNECTION))
        try:
            for i in range(self.nodes):
                try:
                    res = client.RegisterNode(RegisterNodeRequest(public_key=try_load_public_key(self.certs.node_pub(i))))
                except Exception as err:
                    raise DeployError(f"registering supernode-{i}'s public key failed: {err}") from err
                if not res.node_id:
                    raise DeployError(f"registering supernode-{i}'s public key failed: no node id")
                self.node_ids[i] = str(res.node_id)
        finally:
            client.close()

    def list_nodes(self) -> list[dict[str, Any]]:
        rc, out = self.flwr("supernode", "list", spec.CONNECTION, "--format", "json")
        data = _last_json(out)
        if rc != 0 or not data:
            raise DeployError(f"`flwr supernode list` failed (exit {rc}):\n{out[-2000:]}")
        return list(data.get("nodes", []))

    def wait_online(self, count: int | None = None, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Wait until ``count`` (default: all) SuperNodes are online; return the node list."""
        count = self.nodes if count is None else count
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.list_nodes()
            if sum(n.get("status") == "online" for n in nodes) >= count:
                return nodes
            if time.monotonic() > deadline:
                raise DeployError(f"only {sum(n.get('status') == 'online' for n in nodes)} of {count} SuperNodes "
                                  f"came online within {timeout:.0f} s: {nodes}")
            time.sleep(2.0)

    def run_status(self, run_id: str) -> dict[str, Any]:
        rc, out = self.flwr("list", spec.CONNECTION, "--run-id", str(run_id), "--format", "json")
        data = _last_json(out) or {}
        runs = data.get("runs") or []
        return runs[0] if runs else {}

    # -- runs ------------------------------------------------------------------------------
    def check_fits(self, cfg) -> None:
        """Raise :class:`DeployError` unless ``cfg`` runs on this federation's SuperNodes as they were started."""
        k = spec.deployed_supernodes(cfg)
        if cfg.federation.clients != self.clients or k != self.nodes:
            layout = (f"{self.clients} clients on {self.nodes} SuperNodes" if self.clients != self.nodes
                      else f"{self.nodes} SuperNodes, one client each")
            raise DeployError(f"the config expects federation.clients={cfg.federation.clients} on {k} SuperNodes, "
                              f"this federation has {layout}: set federation.clients={self.clients}"
                              + (f" and federation.sim_nodes={self.nodes}" if self.clients != self.nodes else ""))

    def submit(self, cfg, out_dir: str | Path, *, resume: bool = False, check: bool = True) -> "RunHandle":
        """Start ``cfg`` with ``flwr run`` (log streamed to a file); the results go to ``out_dir``.

        ``resume``: ``out_dir`` holds an interrupted run of the same config; the ServerApp continues
        from its last checkpoint (it resumes whenever the directory has one, so a directory that
        holds a run is refused unless ``resume``).
        """
        from stamen.server.results import RunDirectory

        out_dir = Path(out_dir).resolve()
        run_dir = RunDirectory(out_dir)
        if resume and not run_dir.checkpoint_path.exists():
            raise DeployError(f"--resume {out_dir}: no checkpoint there ({run_dir.checkpoint_path.name}); nothing to "
                              "resume")
        if not resume and (run_dir.metrics_path.exists() or run_dir.checkpoint_path.exists()):
            raise DeployError(f"{out_dir} already holds a run; choose another output directory (or resume it)")
        cfg = cfg.model_copy(deep=True)
        cfg.run.out_dir = str(out_dir)
        if check:  # (off only to show what the ServerApp says about a federation that does not fit)
            self.check_fits(cfg)
        self._runs += 1
        rc_file = self.workdir / f"run-config-{self._runs}.toml"
        rc_file.write_text(spec.run_config_toml(cfg))
        name = f"flwr-run-{self._runs}"
        s = self.procs.start(name, ["flwr", "run", str(self.app_dir), spec.CONNECTION, "--run-config", str(rc_file),
                                    "--stream"], env={"FLWR_HOME": str(self.flwr_home)},
                             netns=self.placement.superlink_ns, cwd=self.workdir)
        return RunHandle(self, name, s.popen, out_dir, cfg, time.time())

    def run(self, cfg, out_dir: str | Path, timeout: float = 1800.0,
            on_round: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
        return self.submit(cfg, out_dir).wait(timeout, on_round=on_round)

    # -- bytes -------------------------------------------------------------------------------
    def idle_rate(self, seconds: float = 10.0) -> dict[str, float]:
        """Bytes/s that cross the proxy while no run is active (polling, heartbeats)."""
        if self.proxy is None:
            raise DeployError("start the federation with measure_bytes=True")
        a, t0 = self.proxy.snapshot(), time.time()
        time.sleep(seconds)
        b, t1 = self.proxy.snapshot(), time.time()
        return {UP: (b[UP] - a[UP]) / (t1 - t0), DOWN: (b[DOWN] - a[DOWN]) / (t1 - t0)}

    def wire_bytes_per_round(self, result: RunResult) -> list[dict[str, Any]]:
        """Measured bytes per round next to the reported ones.

        ``wire_*``: everything in the round's time window; ``transfer_*``: the bursts that carry
        messages (with their framing); ``polling_*``: the rest (idle polls, heartbeats, pings).
        ``up`` = SuperNodes → SuperLink, ``down`` = SuperLink → SuperNodes.
        """
        if self.proxy is None:
            raise DeployError("start the federation with measure_bytes=True")
        windows = result.round_windows()
        split = split_traffic(self.proxy.events(), windows)
        return [{"round": r["round"], "window_s": round(t1 - t0, 3), "uplink_bytes": r["uplink_bytes"],
                 "downlink_bytes": r["downlink_bytes"], **s}
                for r, (t0, t1), s in zip(result.rows, windows, split)]


@dataclass
class RunHandle:
    fed: LocalFederation
    name: str
    popen: subprocess.Popen
    out_dir: Path
    cfg: Any
    started_at: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    row_written_at: list[float] = field(default_factory=list)

    @property
    def log(self) -> str:
        return self.fed.procs.started[self.name].log.read_text(errors="replace")

    @property
    def run_id(self) -> str | None:
        m = re.search(r"Successfully started run (\d+)", self.log)
        return m.group(1) if m else None

    def poll_rows(self, on_round: Callable[[dict[str, Any]], None] | None = None) -> int:
        """Read new metrics.jsonl rows (noting when each was written); return the row count."""
        path = self.out_dir / "metrics.jsonl"
        try:
            st = path.stat()
            text = path.read_text()
        except OSError:
            return len(self.rows)
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        for row in rows[len(self.rows):]:
            self.rows.append(row)
            self.row_written_at.append(st.st_mtime)
            if on_round:
                on_round(row)
        return len(self.rows)

    def wait(self, timeout: float, on_round: Callable[[dict[str, Any]], None] | None = None,
             poll: float = 0.1) -> RunResult:
        deadline = self.started_at + timeout
        fed = self.fed
        while self.popen.poll() is None:
            self.poll_rows(on_round)
            if not fed.procs.alive("superlink") and not fed.killed_superlink:
                self.stop()
                raise DeployError(f"the SuperLink exited during the run:\n{fed.procs.log_tail('superlink')}")
            for i in range(fed.nodes):
                if i not in fed.killed and not fed.procs.alive(f"supernode-{i}"):
                    self.stop()
                    code = fed.procs.started[f"supernode-{i}"].popen.returncode
                    raise DeployError(f"supernode-{i} (partition-id {i}) exited with code {code} during the run:\n"
                                      f"{fed.procs.log_tail(f'supernode-{i}')}")
            if time.time() > deadline:
                self.stop()
                raise DeployTimeout(f"run {self.run_id} did not finish within {timeout:.0f} s "
                                    f"({len(self.rows)} of {self.cfg.run.rounds} rounds done); it was stopped.\n"
                                    f"{_tail(self.log)}")
            time.sleep(poll)
        self.poll_rows(on_round)
        info: dict[str, Any] = fed.run_status(self.run_id) if self.run_id else {}
        return RunResult(self.run_id, info.get("status", "unknown"), self.out_dir, self.started_at, time.time(),
                         self.rows, self.row_written_at, info.get("network-traffic"), self.log, info)

    def stop(self) -> None:
        """Stop the run on the SuperLink (``flwr stop``) and the streaming CLI."""
        if self.run_id and self.fed.procs.alive("superlink"):
            try:
                self.fed.flwr("stop", self.run_id, spec.CONNECTION, timeout=60)
            except DeployError:
                pass
        self.fed.procs.stop(self.name)


def _last_json(text: str) -> dict[str, Any] | None:
    """The last top-level JSON object in a CLI's output (flwr prints banners before it)."""
    decoder = json.JSONDecoder()
    found = None
    for m in re.finditer(r"^\{", text, flags=re.M):
        try:
            obj, _ = decoder.raw_decode(text[m.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            found = obj
    return found


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- stamen deploy local -------------------------------------------------------------------
def deploy_local(cfg, nodes: int, out_dir: str | Path, *, tls: bool = True, timeout: float = 3600.0,
                 keep: str | Path | None = None, measure_bytes: bool = False,
                 echo: Callable[[str], None] = print,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 resume: bool = False, clientapps: str = "warm") -> RunResult:
    """Run ``cfg`` on a loopback deployment of ``nodes`` SuperNodes and tear it down again.

    ``cfg`` must fit ``nodes`` (:func:`stamen.deploy.spec.deployed_supernodes`): one SuperNode per
    client, or ``federation.sim_nodes = nodes`` SuperNodes hosting ``federation.clients`` clients.
    The run is submitted as soon as the SuperLink is up, so the ServerApp starts while the
    SuperNodes and their ClientApps do. ``resume``: continue the run in ``out_dir`` from its last
    checkpoint. Certificates, logs and Flower's state live in a temporary directory (kept in
    ``keep`` if given, else deleted). Raises :class:`DeployError` / :class:`DeployTimeout` naming
    the cause.
    """
    began = time.time()
    out_dir = Path(out_dir).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="stamen-deploy-"))
    previous = _raise_on_sigterm()
    try:
        fed = LocalFederation(nodes, workdir, tls=tls, node_auth=tls, measure_bytes=measure_bytes,
                              clients=cfg.federation.clients, clientapps=clientapps)
        fed.check_fits(cfg)
        echo(f"work dir {workdir} (certificates, Flower's state, logs/)")
        try:
            if measure_bytes:  # the idle rate needs connected SuperNodes and no run
                fed.start()
                idle = fed.idle_rate(5.0)
                handle = fed.submit(cfg, out_dir, resume=resume)
            else:
                idle = None
                handle = fed.start(wait=False, after_superlink=lambda: fed.submit(cfg, out_dir, resume=resume))
            layout = (f"{nodes} SuperNodes" if nodes == cfg.federation.clients
                      else f"{cfg.federation.clients} clients on {nodes} SuperNodes")
            echo(f"SuperLink: Fleet API 127.0.0.1:{fed.fleet_port}, Control API 127.0.0.1:{fed.control_port} "
                 f"({'TLS + node authentication' if tls else 'INSECURE: no TLS, no node authentication'}); "
                 f"{layout}")
            try:
                result = handle.wait(timeout, on_round=on_round)
            except KeyboardInterrupt:
                handle.stop()
                raise
            if not result.ok:
                raise DeployError(f"run {result.run_id} ended with status {result.status!r} and "
                                  f"{len(result.rows)} of {cfg.run.rounds} rounds:\n{_tail(result.log)}")
            if measure_bytes:
                wire = fed.wire_bytes_per_round(result)
                (out_dir / "wire_bytes.json").write_text(json.dumps(
                    {"idle_bytes_per_s": idle, "rounds": wire, "flower_network_traffic": result.flower_traffic},
                    indent=2) + "\n")
            (out_dir / "deployment.json").write_text(json.dumps(
                {"run_id": result.run_id, "status": result.status, "supernodes": nodes,
                 "clients": cfg.federation.clients, "clientapps": clientapps, "tls": tls, "node_auth": tls,
                 "resumed": resume, "flower_network_traffic": result.flower_traffic,
                 "wall_s": result.finished_at - began,
                 "first_round_done_s": (result.row_written_at[0] - began) if result.row_written_at else None,
                 "round_wall_s": [r["wall_s"] for r in result.rows], "flower_run": result.flower_info},
                indent=2) + "\n")
        finally:
            fed.close()
        return result
    finally:
        if previous is not None:
            try:
                signal.signal(signal.SIGTERM, previous)
            except ValueError:
                pass
        logs = workdir / "logs"
        if keep is not None:
            shutil.copytree(workdir, Path(keep), dirs_exist_ok=True)
        elif out_dir.exists() and logs.exists():
            shutil.copytree(logs, out_dir / "deploy-logs", dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _raise_on_sigterm():
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None
