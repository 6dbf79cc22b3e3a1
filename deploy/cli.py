"""``stamen deploy …``: run a config on a real (loopback) deployment, and the commands that start
each process of a deployment across machines (same flags as the compose file and k8s manifests).

Only typer is imported at module level: ``stamen --help`` stays fast.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import typer

deploy_app = typer.Typer(no_args_is_help=True, help=(
    "Deployment over gRPC: a loopback federation with TLS and node authentication (local), "
    "certificates, and the SuperLink / SuperNode / flwr commands for real machines (see DEPLOY.md)."))


def _errors(debug: bool):
    from stamen.cli import _fail, user_errors
    from stamen.deploy.local import DeployError

    return (*user_errors(), DeployError, FileNotFoundError), (lambda err: _fail(err, debug))


def _load(config: Optional[Path], set_: list[str]):
    from stamen import config as C
    from stamen.cli import DEFAULT_CONFIG

    return C.load(config or DEFAULT_CONFIG, set_)


def local_layout(cfg, nodes: int | None, clients: int | None) -> int:
    """Apply ``--nodes`` / ``--clients`` to ``cfg`` (in place); return the number of SuperNodes.

    ``clients`` sets ``federation.clients``. SuperNodes: ``nodes``, else the config's own
    deployment layout (``federation.sim_nodes``), else at most :data:`spec.LOCAL_SUPERNODES`. With
    fewer SuperNodes than clients each hosts several (``federation.sim_nodes`` = SuperNodes).
    """
    from stamen.config import ConfigError
    from stamen.deploy import spec

    if clients is not None:
        cfg.federation.clients = clients
    n_clients = cfg.federation.clients
    if nodes is None:
        set_by_config = 0 < cfg.federation.sim_nodes and cfg.federation.virtual_clients
        nodes = spec.deployed_supernodes(cfg) if set_by_config else min(n_clients, spec.LOCAL_SUPERNODES)
    if nodes > n_clients:
        raise ConfigError(f"--nodes {nodes} is more SuperNodes than federation.clients={n_clients}: every SuperNode "
                          f"hosts at least one client (give --clients {nodes} for one client per SuperNode)")
    if nodes < n_clients and not cfg.federation.virtual_clients:
        raise ConfigError(f"federation.virtual_clients=false needs one SuperNode per client: give --nodes {n_clients}")
    cfg.federation.sim_nodes = nodes
    return nodes


@deploy_app.command()
def local(
    config: Optional[Path] = typer.Argument(None, help="Run config (TOML). Default: the embedded digits/FedAvg config."),
    nodes: Optional[int] = typer.Option(None, "--nodes", "-n", min=1, help=(
        "SuperNodes to start; with fewer than federation.clients each hosts several clients (sets "
        "federation.sim_nodes). Default: the config's federation.sim_nodes, else min(federation.clients, 4).")),
    clients: Optional[int] = typer.Option(None, "--clients", min=1, help="Sets federation.clients."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: section.key=value (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results directory (default runs/<name>-<timestamp>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help=(
        "Continue the run in DIR from its last checkpoint (after the SuperLink or the ServerApp died); the config "
        "comes from DIR/config.toml.")),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS and no node authentication (loopback only!)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Stop everything if the run takes longer (seconds)."),
    measure_bytes: bool = typer.Option(False, "--measure-bytes",
                                       help="Route SuperNodes through a byte-counting proxy; write wire_bytes.json."),
    flower_clientapps: bool = typer.Option(False, "--flower-clientapps", help=(
        "Flower's own SuperNodes: a new ClientApp process per message, 3 s polls (slow; for comparison).")),
    keep: Optional[Path] = typer.Option(None, "--keep", help="Copy the work dir (certs, logs, Flower state) here."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run a config on 1 SuperLink + N SuperNodes on this machine (gRPC, TLS, node auth), then stop them all."""
    from rich.console import Console

    from stamen.server.app import default_out_dir

    console = Console(soft_wrap=True)  # one line per message, also in logs and pipes
    errors, fail = _errors(debug)
    try:
        from stamen import config as C
        from stamen.server.results import RunDirectory

        if resume is not None:
            if config is not None:
                raise C.ConfigError("--resume DIR takes its config from DIR/config.toml; drop the CONFIG argument")
            if out is not None and out.resolve() != resume.resolve():
                raise C.ConfigError("--out must be omitted or equal to the --resume directory")
            cfg = C.load(resume / "config.toml", set_)
            RunDirectory(resume).load_checkpoint()  # a damaged checkpoint fails here, before any process starts
            out = resume
        else:
            cfg = _load(config, set_)
        n = local_layout(cfg, nodes, clients)
        from stamen.experiment import preflight

        preflight(cfg)
        out_dir = (out or default_out_dir(cfg)).resolve()
        if resume is None and (out_dir / "metrics.jsonl").exists():
            raise C.ConfigError(f"{out_dir} already holds a run; use --resume {out_dir} or another --out")
    except errors as err:
        fail(err)
        return
    layout = f"{n} SuperNodes" if n == cfg.federation.clients else f"{cfg.federation.clients} clients on {n} SuperNodes"
    console.print(f"[bold]stamen deploy local[/] {cfg.strategy.name} on {cfg.task.dataset} ({layout}, "
                  f"{cfg.run.rounds} rounds, codec {cfg.compression.codec}) → {out_dir}"
                  + (" (resuming)" if resume is not None else ""))

    def on_round(row: dict) -> None:
        acc = row.get("test_accuracy")
        console.print(f"  round {row['round']}/{cfg.run.rounds}: {row['clients']} replies, "
                      f"up {row['uplink_bytes']} B, down {row['downlink_bytes']} B, {row['wall_s']:.1f} s"
                      + (f", acc {acc:.4f}" if acc is not None else ""))

    from stamen.deploy.local import deploy_local

    try:
        result = deploy_local(cfg, n, out_dir, tls=not insecure, timeout=timeout, keep=keep,
                              measure_bytes=measure_bytes, echo=console.print, on_round=on_round,
                              resume=resume is not None, clientapps="flower" if flower_clientapps else "warm")
    except errors as err:
        fail(err)
        return
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process was stopped[/]")
        raise typer.Exit(code=130)
    console.print(f"[green]run {result.run_id}: {result.status}[/] in {result.finished_at - result.started_at:.1f} s; "
                  f"results in {out_dir}")


@deploy_app.command()
def certs(
    out: Path = typer.Option(..., "--out", "-o", help="Directory for ca.crt, server.pem/.key, supernode-<i>.key/.pub."),
    nodes: int = typer.Option(0, "--nodes", "-n", min=0, help="SuperNode key pairs to create."),
    host: list[str] = typer.Option([], "--host", help="DNS name of the SuperLink (repeatable)."),
    ip: list[str] = typer.Option([], "--ip", help="IP address of the SuperLink (repeatable)."),
    days: int = typer.Option(365, "--days"),
) -> None:
    """Create a CA, the SuperLink's TLS certificate and SuperNode authentication keys."""
    from stamen.deploy.certs import make_certificates

    paths = make_certificates(out, nodes, host, ip, days)
    typer.echo(f"CA {paths.ca_cert}; SuperLink certificate {paths.server_cert} for {', '.join([*host, *ip]) or 'loopback'}"
               f" (+ localhost, 127.0.0.1, ::1); {nodes} SuperNode key pairs (register the .pub files with "
               f"`flwr supernode register`)")


def _exec(argv: list[str], dry_run: bool) -> None:
    from stamen.deploy.spec import FLOWER_ENV

    if dry_run:
        import shlex

        typer.echo(shlex.join(argv))
        return
    if shutil.which(argv[0]) is None:
        raise typer.BadParameter(f"{argv[0]} is not on PATH (pip install stamen, or use the Docker image)")
    os.environ.update({k: v for k, v in FLOWER_ENV.items() if k not in os.environ})
    os.execvp(argv[0], argv)


@deploy_app.command()
def superlink(
    certs_dir: Optional[Path] = typer.Option(None, "--certs", help="Directory made by `stamen deploy certs` "
                                             "(TLS + SuperNode authentication)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS, no node authentication. Needed explicitly to "
                                  "bind a non-loopback address without TLS and node authentication (prints a warning)."),
    no_node_auth: bool = typer.Option(False, "--no-node-auth", help="TLS but accept any SuperNode (loopback binds only)."),
    fleet_address: str = typer.Option("127.0.0.1:9092", "--fleet-address",
                                      help="Fleet API bind address (SuperNodes connect here). Default: loopback only; "
                                      "give e.g. 0.0.0.0:9092 or the interface's address for SuperNodes on other "
                                      "machines."),
    host: str = typer.Option("127.0.0.1", "--host", help="Control/Runtime API bind host (flwr CLI, the ServerApp's "
                             "SuperExec). Default: loopback only — reach it over an SSH tunnel, or give an address."),
    port: int = typer.Option(8000, "--port", help="Control/Runtime API port."),
    isolation: str = typer.Option("subprocess", "--isolation", help="subprocess: start the ServerApp itself; "
                                  "process: an external `flower-superexec` does."),
    database: Optional[str] = typer.Option(None, "--database", help="State file (registered keys survive restarts)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command instead of running it."),
) -> None:
    """Start a SuperLink (exec flower-superlink with Stamen's flags). Binds loopback unless told otherwise."""
    from stamen.deploy import spec
    from stamen.deploy.certs import CertPaths

    exposed = spec.exposed_binds(fleet_address, host)
    shown = [f"{opt} {exposed[k]}" for k, opt in (("fleet", "--fleet-address"), ("control", "--host")) if k in exposed]
    where = f"{' and '.join(shown)} {'are not loopback addresses' if len(shown) > 1 else 'is not a loopback address'}"
    if insecure and certs_dir is not None:
        raise typer.BadParameter("--insecure turns TLS off, --certs DIR turns it on: give one of them")
    if insecure:
        if exposed:
            consequences = []
            if "fleet" in exposed:
                consequences.append("Anyone who reaches the Fleet API can join as a SuperNode, and anyone on the "
                                    "path can read or alter model updates.")
            if "control" in exposed:
                consequences.append("Anyone who reaches the Control API can start runs, i.e. run their own code on "
                                    "this machine and on every SuperNode.")
            typer.echo(f"WARNING: {where} and --insecure is set: this federation is OPEN to that network — plain "
                       f"text (no TLS), no SuperNode authentication. {' '.join(consequences)}", err=True)
        args = spec.superlink_args(ca=None, node_auth=False, fleet_address=fleet_address, host=host, port=port,
                                   isolation=isolation, database=database, open_ok=True)
    else:
        if certs_dir is None:
            if exposed:
                raise typer.BadParameter(
                    f"{where}, and a SuperLink reachable from the network "
                    "needs TLS and SuperNode authentication: add --certs DIR (from `stamen deploy certs --nodes N`; "
                    "register each SuperNode's .pub key with `flwr supernode register`), or add --insecure to run "
                    "an open federation (plain text, no node authentication) deliberately.")
            raise typer.BadParameter("give --certs DIR (or --insecure)")
        if no_node_auth and exposed:
            raise typer.BadParameter(
                f"{where}, and --no-node-auth would let any client that "
                "trusts the CA join the federation: drop --no-node-auth and register each SuperNode's .pub key "
                "(`flwr supernode register`), or run an open federation deliberately with --insecure instead of "
                "--certs (plain text, no node authentication).")
        if "control" in exposed:  # TLS + node auth guard the Fleet API; the Control API has no accounts
            typer.echo(f"WARNING: --host {host} is not loopback: the Control API has no user accounts in open-source "
                       "Flower — whoever reaches it can register SuperNode keys and start runs (run their own code on "
                       "this machine and on every SuperNode). Keep it on the operator's network, or bind loopback and "
                       "use an SSH tunnel.", err=True)
        c = CertPaths(certs_dir.resolve())
        args = spec.superlink_args(ca=c.ca_cert, cert=c.server_cert, key=c.server_key, node_auth=not no_node_auth,
                                   fleet_address=fleet_address, host=host, port=port, isolation=isolation,
                                   database=database)
    _exec(["flower-superlink", *args], dry_run)


@deploy_app.command()
def supernode(
    partition_id: int = typer.Option(..., "--partition-id", "-i", min=0, help=(
        "This node's partition (0 … N-1); with --supernodes K, this is SuperNode k (0 … K-1), hosting the "
        "partitions p with p mod K = k.")),
    num_partitions: int = typer.Option(..., "--nodes", "-n", min=1, help="N = federation.clients."),
    supernodes: Optional[int] = typer.Option(None, "--supernodes", min=1, help=(
        "K SuperNodes host the N clients (federation.sim_nodes = K in the run config). Default: one per client.")),
    flower_clientapps: bool = typer.Option(False, "--flower-clientapps", help=(
        "Run Flower's own flower-supernode (a new ClientApp process per message, 3 s polls) instead of Stamen's "
        "(paced polls, one warm ClientApp process: python -m stamen.deploy.supernode).")),
    superlink_address: str = typer.Option(..., "--superlink", help="SuperLink Fleet API, host:9092."),
    certs_dir: Optional[Path] = typer.Option(None, "--certs", help="Directory with ca.crt and supernode-<i>.key."),
    key: Optional[Path] = typer.Option(None, "--key", help="Private key (default CERTS/supernode-<i>.key)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS (the SuperLink must be --insecure too)."),
    port: Optional[int] = typer.Option(None, "--port", help="Runtime API port (default 9094 + partition id)."),
    isolation: str = typer.Option("subprocess", "--isolation"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command instead of running it."),
) -> None:
    """Start SuperNode i (exec flower-supernode with Stamen's flags)."""
    from stamen.deploy import spec
    from stamen.deploy.certs import CertPaths

    runtime_port = port if port is not None else spec.SUPERNODE_PORT + partition_id
    if not flower_clientapps:
        isolation = "process"  # Stamen's SuperNode runs its ClientApps itself
    if supernodes is not None and not (partition_id < supernodes <= num_partitions):
        raise typer.BadParameter(f"--supernodes {supernodes} needs --partition-id < {supernodes} <= --nodes "
                                 f"{num_partitions}")
    if insecure:
        if not spec.is_loopback(spec.address_host(superlink_address)):
            typer.echo(f"WARNING: --insecure SuperNode dialling {superlink_address}, which is not loopback: its "
                       "updates cross the network in plain text (no TLS) and the SuperLink does not authenticate "
                       "it.", err=True)
        args = spec.supernode_args(partition_id, num_partitions, superlink=superlink_address, ca=None,
                                   port=runtime_port, isolation=isolation, supernodes=supernodes)
    else:
        if certs_dir is None:
            raise typer.BadParameter("give --certs DIR (or --insecure)")
        c = CertPaths(certs_dir.resolve())
        args = spec.supernode_args(partition_id, num_partitions, superlink=superlink_address, ca=c.ca_cert,
                                   auth_key=(key or c.node_key(partition_id)).resolve(), port=runtime_port,
                                   isolation=isolation, supernodes=supernodes)
    if flower_clientapps:
        _exec(["flower-supernode", *args], dry_run)
    else:
        import sys

        _exec(spec.stamen_supernode_argv(sys.executable, args), dry_run)


@deploy_app.command("flwr-home")
def flwr_home(
    superlink_address: str = typer.Option(..., "--superlink", help="SuperLink Control API, host:8000 (127.0.0.1:8000 "
                                          "through an SSH tunnel or port-forward: it binds loopback by default)."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="Root certificate (ca.crt)."),
    insecure: bool = typer.Option(False, "--insecure"),
    out: Path = typer.Option(..., "--out", "-o", help="The FLWR_HOME directory to write config.toml into."),
) -> None:
    """Write a FLWR_HOME config with the connection `stamen` (for flwr run / flwr supernode register)."""
    from stamen.deploy import spec

    if not insecure and ca is None:
        raise typer.BadParameter("give --ca ca.crt (or --insecure)")
    if insecure and not spec.is_loopback(spec.address_host(superlink_address)):
        typer.echo(f"WARNING: --insecure connection to {superlink_address}, which is not loopback: flwr commands "
                   "and apps travel in plain text (no TLS), and the server is not verified.", err=True)
    home = spec.write_flwr_home(out, superlink_address, ca=None if insecure else ca)
    typer.echo(f"wrote {home / 'config.toml'}; use: FLWR_HOME={home} flwr … {spec.CONNECTION}")


@deploy_app.command()
def app(
    config: Optional[Path] = typer.Argument(None, help="Run config (TOML). Default: the embedded config."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: section.key=value (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for app/ (the FAB) and run-config.toml."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Write what `flwr run` needs for CONFIG: an app directory and a --run-config file."""
    from stamen.deploy import spec

    errors, fail = _errors(debug)
    try:
        cfg = _load(config, set_)
    except errors as err:
        fail(err)
        return
    app_dir = spec.write_app_dir(out / "app")
    rc = out / "run-config.toml"
    rc.write_text(spec.run_config_toml(cfg))
    k, n = spec.deployed_supernodes(cfg), cfg.federation.clients
    layout = (f"start {n} SuperNodes, one per client (stamen deploy supernode -i i -n {n})" if k == n else
              f"start {k} SuperNodes hosting {n} clients (stamen deploy supernode -i k -n {n} --supernodes {k})")
    typer.echo(f"wrote {app_dir} and {rc}: {layout}\n"
               f"run:  flwr run {app_dir} {spec.CONNECTION} --run-config {rc} --stream")
    if not Path(cfg.run.out_dir or "runs").is_absolute():
        typer.echo(f"NOTE: run.out_dir={cfg.run.out_dir!r} is relative: the ServerApp writes its results on the "
                   "SuperLink's machine, relative to the SuperLink's working directory. Give an absolute path "
                   "(--set run.out_dir='/path/on/the/superlink/host') to know where they land.", err=True)


if __name__ == "__main__":
    deploy_app()
