"""The one source of truth for a Stamen deployment on Flower 1.39: versions, images, ports,
and the exact command lines of every process.

``stamen deploy local``, ``python -m stamen.deploy.launch`` (real machines), the Docker compose
file and the Kubernetes manifests all use these values; ``tests/test_deploy.py`` checks that the
YAML files in ``deploy/docker`` and ``deploy/k8s`` carry the same ports, image tags and flags.

The processes of a deployment (Flower 1.39)::

    flwr CLI ──HTTPS :8000 (Control API)──▶ SuperLink ◀──HTTPS :8000 (Runtime API)── SuperExec → ServerApp
                                              ▲ gRPC+TLS :9092 (Fleet API, node auth)
                         SuperNode i ─────────┘
                           ▲ HTTP 127.0.0.1:9094 (Runtime API, one port per SuperNode on a host)
                         ClientApp runner → one warm ClientApp process (Stamen's SuperNode), or
                         SuperExec → ClientApp (Flower's: one short-lived process per message)

``stamen deploy local`` and ``stamen deploy supernode`` run Stamen's SuperNode
(:func:`stamen_supernode_argv`: Flower's ``flower-supernode`` with paced polls, serving its
ClientApps with one warm process; ``deploy/supernode.py``). With ``--isolation subprocess`` the
SuperLink starts its SuperExec itself; with ``--isolation process`` (compose, k8s) the SuperExec
runs in its own container, built from the Stamen image, next to Flower's official
``flwr/superlink`` / ``flwr/supernode`` containers (those keep Flower's per-message ClientApps).

Closed by default: every API binds loopback (:data:`LOOPBACK`) unless an address is given, and
:func:`superlink_args` refuses a non-loopback bind without TLS and SuperNode authentication
unless the caller opts in explicitly (``open_ok``; ``stamen deploy superlink --insecure``).
:func:`is_loopback` is the one rule for what counts as loopback.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import tomli_w

FLOWER_VERSION = "1.39.0"
SUPERLINK_IMAGE = f"flwr/superlink:{FLOWER_VERSION}"
SUPERNODE_IMAGE = f"flwr/supernode:{FLOWER_VERSION}"
#: built from deploy/docker/Dockerfile (python:3.11-slim + ``pip install .``: flwr==1.39.0, torch CPU, stamen)
STAMEN_IMAGE = "stamen:0.1.0"

FLEET_PORT = 9092  #: SuperLink Fleet API (gRPC-rere): SuperNodes connect here; model updates travel here
CONTROL_PORT = 8000  #: SuperLink HTTP(S) API: Control (``flwr`` CLI) and Runtime (ServerApp SuperExec)
#: the default bind host of every API: nothing is reachable from another machine unless an address is given
LOOPBACK = "127.0.0.1"
SUPERNODE_PORT = 9094  #: SuperNode Runtime API (its ClientApp SuperExec); each SuperNode on a host needs its own
RAY_PORT = 6379  #: Ray head (GCS) port for simulations on a Ray cluster (``federation.ray_address``)
#: ``stamen deploy local``'s SuperNodes when the config sets no layout: clients are spread over at most this many
#: (one process per SuperNode and one warm ClientApp each: more than the machine's cores only adds contention)
LOCAL_SUPERNODES = 4

#: where the compose file and the k8s manifests mount the certificate directory (the images' workdir is /app)
CERTS_DIR_IN_CONTAINER = "/app/certificates"
#: the uid/gid Flower's official images run as: mounted keys must be readable by it
FLOWER_IMAGE_UID = 49999

#: the ``flwr`` connection name that Stamen writes into a FLWR_HOME config
CONNECTION = "stamen"

#: environment every Flower process of a Stamen deployment gets (no `uv sync` at run time, no telemetry)
FLOWER_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}


def _p(path: str | os.PathLike) -> str:
    return str(path)


def address_host(address: str) -> str:
    """The host part of a ``host:port`` bind address, as Flower splits it (``[::1]:9092`` → ``::1``).

    The port is what follows the last ``:``; brackets around an IPv6 host are dropped. A value
    without ``:`` is returned unchanged (a bare host name or IPv4 address).
    """
    if ":" not in address:
        return address.strip()
    host = address.rpartition(":")[0].strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a service on this machine: 127.0.0.0/8, ``::1`` (also as
    ``::ffff:127.x.y.z``) or the name ``localhost``.

    Everything else counts as reachable from the network: ``0.0.0.0`` / ``::`` / ``""`` (every
    interface), LAN and public addresses, and any other host name (its resolution is not ours to
    trust). ``host`` is a host, not ``host:port`` — see :func:`address_host`.
    """
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def exposed_binds(fleet_address: str, host: str) -> dict[str, str]:
    """The SuperLink's non-loopback binds: ``{"fleet": fleet_address, "control": host}``, loopback ones left out."""
    out = {}
    if not is_loopback(address_host(fleet_address)):
        out["fleet"] = fleet_address
    if not is_loopback(host):
        out["control"] = host
    return out


class OpenBindError(ValueError):
    """A SuperLink would listen beyond loopback without TLS and SuperNode authentication."""


def superlink_args(*, ca: str | os.PathLike | None, cert: str | os.PathLike | None = None,
                   key: str | os.PathLike | None = None, node_auth: bool = True,
                   fleet_address: str = f"{LOOPBACK}:{FLEET_PORT}", host: str = LOOPBACK, port: int = CONTROL_PORT,
                   isolation: str = "subprocess", database: str | None = None, open_ok: bool = False) -> list[str]:
    """Arguments of ``flower-superlink`` (the official image's entrypoint).

    ``ca=None`` means ``--insecure`` (plain text, no node authentication possible). ``host``/``port``
    is where the Control API (``flwr``) and the Runtime API (the ServerApp's SuperExec) listen;
    ``fleet_address`` is where SuperNodes connect. Both default to loopback. A non-loopback bind
    without TLS *and* node authentication raises :class:`OpenBindError` unless ``open_ok`` (the
    caller's explicit ``--insecure``).
    """
    exposed = exposed_binds(fleet_address, host)
    if exposed and (ca is None or not node_auth) and not open_ok:
        what = "no TLS and no SuperNode authentication" if ca is None else "no SuperNode authentication"
        raise OpenBindError(f"the SuperLink would listen on {', '.join(exposed.values())} (not loopback) with {what}; "
                            "give TLS certificates with node authentication, bind loopback, or opt in explicitly")
    args: list[str] = []
    if ca is None:
        if node_auth:
            raise ValueError("SuperNode authentication needs TLS: give the certificates or node_auth=False")
        args += ["--insecure"]
    else:
        if cert is None or key is None:
            raise ValueError("TLS needs the CA certificate, the server certificate and its key")
        args += ["--ssl-ca-certfile", _p(ca), "--ssl-certfile", _p(cert), "--ssl-keyfile", _p(key)]
        if node_auth:
            args += ["--enable-supernode-auth"]
    args += ["--fleet-api-type", "grpc-rere", "--fleet-api-address", fleet_address,
             "--host", host, "--port", str(port), "--isolation", isolation,
             "--disable-runtime-dependency-installation"]
    if database:
        args += ["--database", database]
    return args


def node_config(partition_id: int | str, num_partitions: int, supernodes: int | None = None) -> str:
    """The ``--node-config`` of SuperNode ``partition_id``: Stamen's ClientApp reads ``partition-id``.

    ``partition_id`` may be a placeholder string such as ``$(POD_INDEX)`` (Kubernetes expands it).
    With ``supernodes`` K < ``num_partitions`` N, SuperNode k hosts the N/K partitions
    ``{p : p mod K = k}`` (:func:`deployed_supernodes`) and says so in ``supernodes=K``.
    """
    pid = partition_id if isinstance(partition_id, str) else int(partition_id)
    extra = f" supernodes={int(supernodes)}" if supernodes and int(supernodes) < int(num_partitions) else ""
    return f"partition-id={pid} num-partitions={int(num_partitions)}{extra}"


def deployed_supernodes(cfg) -> int:
    """How many SuperNodes a deployment of ``cfg`` has: one per client (``federation.clients``), or
    K = ``federation.sim_nodes`` when ``federation.virtual_clients`` and 0 < K < clients — then
    SuperNode k hosts the clients ``{p : p mod K = k}`` as virtual nodes (``server/app.py``,
    ``DeployedCarriers``), one Flower message per SuperNode per round, as the simulation's
    carriers do.
    """
    f = cfg.federation
    k = int(f.sim_nodes if f.virtual_clients else 0)
    return k if 0 < k < f.clients else f.clients


def node_key_name(partition_id: int | str) -> str:
    """File name of SuperNode ``partition_id``'s private key (see :mod:`stamen.deploy.certs`)."""
    return f"supernode-{partition_id}.key"


def supernode_args(partition_id: int | str, num_partitions: int, *, superlink: str, ca: str | os.PathLike | None,
                   auth_key: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = SUPERNODE_PORT,
                   isolation: str = "subprocess", max_retries: int | None = None,
                   max_wait_time: float | None = None, supernodes: int | None = None) -> list[str]:
    """Arguments of ``flower-supernode`` (the official image's entrypoint).

    ``superlink`` is the Fleet API address (``host:9092``); ``ca=None`` means ``--insecure``;
    ``auth_key`` is the node's OpenSSH private key (see :mod:`stamen.deploy.certs`).
    ``host``/``port`` is this node's Runtime API, which its ClientApp SuperExec dials.
    """
    args = ["--insecure"] if ca is None else ["--root-certificates", _p(ca)]
    args += ["--grpc-rere", "--superlink", superlink]
    if auth_key is not None:
        args += ["--auth-supernode-private-key", _p(auth_key)]
    args += ["--node-config", node_config(partition_id, num_partitions, supernodes),
             "--host", host, "--port", str(port), "--isolation", isolation]
    if max_retries is not None:
        args += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        args += ["--max-wait-time", str(max_wait_time)]
    return args


#: Stamen's SuperNode: Flower's, paced, with warm ClientApps (``deploy/supernode.py``)
STAMEN_SUPERNODE = ["-m", "stamen.deploy.supernode"]
#: Stamen's runner of warm ClientApps next to a SuperNode with ``--isolation process`` (``deploy/clientapp.py``)
STAMEN_CLIENTAPP = ["-m", "stamen.deploy.clientapp"]


def stamen_supernode_argv(python: str, flower_args: list[str], *, clientapps: str = "warm",
                          poll_min: float | None = None, poll_max: float | None = None,
                          zygote: str | None = None) -> list[str]:
    """The command line of a Stamen SuperNode: ``python -m stamen.deploy.supernode [options] FLOWER-ARGS``.

    ``flower_args`` are :func:`supernode_args` (``--isolation`` is forced to ``process`` when
    ``clientapps`` is ``warm``: the SuperNode's own process then runs its ClientApps warm; with
    ``external`` a :func:`clientapp_runner_argv` process next to it does).
    """
    opts = ["--clientapps", clientapps]
    if poll_min is not None:
        opts += ["--poll-min", str(poll_min)]
    if poll_max is not None:
        opts += ["--poll-max", str(poll_max)]
    if zygote is not None:
        opts += ["--zygote", str(zygote)]
    return [python, *STAMEN_SUPERNODE, *opts, *flower_args]


def clientapp_runner_argv(python: str, runtime_address: str, *, zygote: str | None = None) -> list[str]:
    """Stamen's warm-ClientApp runner as its own process next to a SuperNode started with
    ``--isolation process`` (in place of ``flower-superexec``; ``deploy/clientapp.py``)."""
    return [python, *STAMEN_CLIENTAPP, "--runtime-api-address", runtime_address,
            *(["--zygote", str(zygote)] if zygote is not None else [])]


def clientapp_zygote_argv(python: str, socket_path: str, *, parent_pid: int | None = None) -> list[str]:
    """A ClientApp zygote shared by the SuperNodes of one machine (``deploy/clientapp.py``)."""
    return [python, *STAMEN_CLIENTAPP, "zygote", "--socket", str(socket_path),
            *(["--parent-pid", str(parent_pid)] if parent_pid is not None else [])]


def superexec_args(runtime_address: str, *, ca: str | os.PathLike | None) -> list[str]:
    """Arguments of ``flower-superexec`` (Stamen image) for ``--isolation process``.

    Next to a SuperLink it runs the ServerApp (``runtime_address`` = SuperLink ``host:8000``, TLS
    with the deployment CA); next to a SuperNode it runs the ClientApps (``127.0.0.1:9094`` in
    the same network namespace — a Pod or ``network_mode: service:…`` — where ``ca=None`` is fine).
    """
    tls = ["--insecure"] if ca is None else ["--root-certificates", _p(ca)]
    return [*tls, "--runtime-api-address", runtime_address]


def flwr_config(address: str, *, ca: str | os.PathLike | None, name: str = CONNECTION) -> str:
    """``$FLWR_HOME/config.toml`` for the ``flwr`` CLI: one SuperLink connection, the default.

    ``address`` is the SuperLink Control API (``host:8000``); ``ca`` its root certificate
    (absolute path), or None for an ``--insecure`` SuperLink.
    """
    conn: dict[str, Any] = {"address": address}
    if ca is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(ca).resolve())
    return tomli_w.dumps({"superlink": {"default": name, name: conn}})


def write_flwr_home(flwr_home: str | os.PathLike, address: str, *, ca: str | os.PathLike | None,
                    name: str = CONNECTION) -> Path:
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(flwr_config(address, ca=ca, name=name))
    return home


# -- the run config ---------------------------------------------------------------------
def _toml_literal(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def run_overrides(cfg) -> str:
    """The whole resolved Stamen config as one ``overrides`` string (``section.key=value; …``).

    Under ``flwr run`` every process — the ServerApp on the SuperLink host and each ClientApp on
    its SuperNode — rebuilds the config from the run config (:func:`stamen.config.from_flat`).
    Inlining every key (instead of ``config-file``, a path that would have to exist on every
    machine) makes a deployment need nothing but the installed Stamen package.
    """
    from stamen.config import to_flat

    items = []
    for key, value in to_flat(cfg).items():
        if value is None:  # "not set": the default on the other side is None too
            continue
        lit = _toml_literal(value)
        if ";" in lit:
            raise ValueError(f"config value {key}={lit} contains ';', which separates overrides")
        items.append(f"{key}={lit}")
    return "; ".join(items)


def run_config(cfg) -> dict[str, str]:
    """Flower's run config (``[tool.flwr.app.config]`` keys) that carries ``cfg``."""
    return {"config-file": "", "overrides": run_overrides(cfg)}


def run_config_toml(cfg) -> str:
    """A file for ``flwr run … --run-config FILE`` (avoids shell quoting of the overrides)."""
    return tomli_w.dumps(run_config(cfg))


#: the Flower app Stamen runs (the same values as ``[tool.flwr.app]`` in Stamen's pyproject.toml)
APP_PUBLISHER = "stamen"
APP_COMPONENTS = {"serverapp": "stamen.server.app:app", "clientapp": "stamen.client.app:app"}
APP_CONFIG = {"config-file": "", "overrides": ""}


def app_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]``: ``config-file``, ``overrides`` and every Stamen key, unset ("") — the
    declaration of Stamen's pyproject.toml (``stamen.flwr_config``), so ``flwr run --run-config`` takes
    the same keys on a deployment as on the repository."""
    from stamen.flwr_config import run_config_keys

    return {**APP_CONFIG, **{section: {name: "" for name in names} for section, names in run_config_keys().items()}}


def app_pyproject() -> str:
    """The pyproject.toml of the Flower app (FAB) that ``flwr run`` uploads.

    Stamen is installed on every machine (the Stamen image, or ``pip install``), so the FAB carries
    only the app's identity, its components and its run-config keys — no code. Shipping code in the
    FAB would not work anyway: Stamen maps top-level folders into the ``stamen.*`` namespace at
    install time.
    """
    from importlib.metadata import metadata, requires, version

    deps = [r for r in (requires("stamen") or []) if "extra ==" not in r]
    return tomli_w.dumps({
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "stamen", "version": version("stamen"),
                    "description": metadata("stamen")["Summary"] or "Stamen", "dependencies": deps},
        "tool": {"flwr": {"app": {"publisher": APP_PUBLISHER, "components": APP_COMPONENTS,
                                  "config": app_config()}}},
    })


def write_app_dir(dest: str | os.PathLike) -> Path:
    """Write the Flower app directory for ``flwr run`` into ``dest`` (a temporary directory).

    ``flwr run`` may rewrite an app's pyproject.toml (it migrates ``[tool.flwr.federations]``
    tables into FLWR_HOME), so it is pointed at this generated copy, never at the repository.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(app_pyproject())
    return dest
