"""Deployment: certificates, the deploy/ manifests against deploy/spec.py, and real federations —
1 Flower SuperLink + 3 SuperNodes over gRPC with TLS and node authentication, on loopback (bytes
counted by a proxy on the wire), across network namespaces, under attack and under faults.

The slow tests start real processes; one federation (module fixture) serves several of them.
Set STAMEN_DEPLOY_REPORT=FILE to get the measured tables as JSON.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
import yaml

from stamen import config as C
from stamen.deploy import spec
from stamen.deploy.certs import make_certificates, make_node_keypair
from stamen.deploy.procs import TAG_VAR, ProcessGroup, tagged_pids
from stamen.deploy.proxy import ByteCountingProxy, bursts, split_traffic

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the environment's flwr / flower-* / stamen commands


def _exe(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else name
DEPLOY = ROOT / "deploy"
CERTS = spec.CERTS_DIR_IN_CONTAINER
NODES = 3
#: small and quick: digits, 3 IID partitions, 2 rounds; a wider MLP so that updates dominate polling
BASE = [f"federation.clients={NODES}", "run.rounds=2", "task.partition='iid'", "task.hidden=512",
        "task.local_epochs=1", "federation.round_timeout_s=600"]
COMPRESSED = ["compression.codec='topk'", "compression.ratio=0.05"]


def _report(key: str, value) -> None:
    path = os.environ.get("STAMEN_DEPLOY_REPORT")
    if not path:
        return
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() else {}
    data[key] = value
    p.write_text(json.dumps(data, indent=2, default=str) + "\n")


# -- certificates ------------------------------------------------------------------------
def test_certificates_have_the_formats_flower_reads(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    paths = make_certificates(tmp_path, nodes=2, hosts=["superlink.example.org"], ips=["10.200.0.1"])
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"superlink.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"10.200.0.1", "127.0.0.1"} <= {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    # SuperNode keys: OpenSSH private key (flower-supernode), OpenSSH public key (flwr supernode register)
    key = load_ssh_private_key(paths.node_key(1).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    assert try_load_public_key(paths.node_pub(1))  # Flower's own loader accepts it
    assert oct(paths.node_key(1).stat().st_mode & 0o777) == "0o600"
    # a second call keeps the CA (new server certificate, more keys) so registered nodes stay valid
    again = make_certificates(tmp_path, nodes=3)
    assert again.ca_cert.read_bytes() == paths.ca_cert.read_bytes()
    assert again.node_pub(2).exists()


# -- the run config ----------------------------------------------------------------------
def test_run_config_carries_the_whole_config_to_every_process():
    cfg = C.load(ROOT / "stamen/configs/default.toml", BASE + COMPRESSED + ["""run.out_dir='/tmp/a "b"'"""])
    assert cfg.run.out_dir == '/tmp/a "b"'
    assert C.from_flat(spec.run_config(cfg)) == cfg
    assert C.from_flat(tomllib.loads(spec.run_config_toml(cfg))) == cfg
    cfg.run.name = "a;b"  # ';' separates overrides: refused, not silently split
    with pytest.raises(ValueError, match="run.name"):
        spec.run_config(cfg)


def test_flwr_connection_config_is_what_flower_parses(tmp_path):
    from flwr.cli.flower_config import parse_superlink_connection

    for text in (spec.flwr_config("10.0.0.5:8000", ca=tmp_path / "ca.crt"),
                 (DEPLOY / "flwr-config.toml").read_text()):
        data = tomllib.loads(text)["superlink"]
        conn = parse_superlink_connection(data[data["default"]], data["default"])
        assert conn.address.endswith(f":{spec.CONTROL_PORT}") and conn.root_certificates and not conn.insecure
    data = tomllib.loads(spec.flwr_config("127.0.0.1:8000", ca=None))["superlink"]
    assert parse_superlink_connection(data[spec.CONNECTION], spec.CONNECTION).insecure


def test_generated_app_matches_the_repository_app():
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    gen = tomllib.loads(spec.app_pyproject())
    assert gen["tool"]["flwr"]["app"] == repo
    assert gen["project"]["name"] == "stamen"


# -- the manifests against deploy/spec.py ---------------------------------------------------
def _compose():
    return yaml.safe_load((DEPLOY / "docker/compose.yaml").read_text())


def _mounted(volumes) -> dict[str, str]:
    """container path → host path of compose volume strings."""
    out = {}
    for v in volumes:
        parts = v.split(":")
        out[parts[1]] = parts[0]
    return out


def _referenced_cert_files(args) -> set[str]:
    return {a for a in args if a.startswith(CERTS + "/")}


def _flag(args: list[str], flag: str) -> str:
    (i,) = [i for i, a in enumerate(args) if a == flag]
    return args[i + 1]


def test_compose_uses_the_spec():
    svc = _compose()["services"]
    ca, env = f"{CERTS}/ca.crt", spec.FLOWER_ENV

    sl = svc["superlink"]
    assert sl["image"] == spec.SUPERLINK_IMAGE
    # the Fleet API listens on the container's interfaces (TLS + node auth); the Control API on its loopback
    assert sl["command"] == spec.superlink_args(
        ca=ca, cert=f"{CERTS}/server.pem", key=f"{CERTS}/server.key", node_auth=True,
        fleet_address=f"0.0.0.0:{spec.FLEET_PORT}", port=spec.CONTROL_PORT, isolation="process")
    assert _flag(sl["command"], "--host") == "127.0.0.1"
    # only the Fleet port is published, nothing else (the Control API is reached from inside `serverapp`)
    assert sl["ports"] == [f"{spec.FLEET_PORT}:{spec.FLEET_PORT}"]
    assert [name for name, s in svc.items() if s.get("ports") or s.get("expose")] == ["superlink"]

    server = svc["serverapp"]
    assert server["image"] == spec.STAMEN_IMAGE and server["entrypoint"] == ["flower-superexec"]
    assert server["network_mode"] == "service:superlink"
    assert server["command"] == spec.superexec_args(f"127.0.0.1:{spec.CONTROL_PORT}", ca=ca)
    assert (DEPLOY / "docker" / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == \
        (DEPLOY / "docker/Dockerfile").resolve()

    nodes = sorted(k for k in svc if k.startswith("supernode-"))
    assert nodes == [f"supernode-{i}" for i in range(len(nodes))] and len(nodes) >= 2
    for i, name in enumerate(nodes):
        sn = svc[name]
        assert sn["image"] == spec.SUPERNODE_IMAGE
        assert sn["command"] == spec.supernode_args(
            i, len(nodes), superlink=f"superlink:{spec.FLEET_PORT}", ca=ca,
            auth_key=f"{CERTS}/{spec.node_key_name(i)}", host="127.0.0.1", port=spec.SUPERNODE_PORT,
            isolation="process")
        app = svc[f"clientapp-{i}"]
        assert app["image"] == spec.STAMEN_IMAGE and app["entrypoint"] == ["flower-superexec"]
        assert app["network_mode"] == f"service:{name}"
        assert app["command"] == spec.superexec_args(f"127.0.0.1:{spec.SUPERNODE_PORT}", ca=None)

    for name, s in svc.items():
        assert {k: str(v) for k, v in s["environment"].items()} == env, name
        # every certificate file a command names is mounted read-only from ./certs, and nothing else is
        mounts = {c: h for c, h in _mounted(s.get("volumes", [])).items() if c.startswith(CERTS)}
        assert set(mounts) == _referenced_cert_files(s["command"]), name
        for c, h in mounts.items():
            assert h == f"./certs/{Path(c).name}", name
        assert "ca.key" not in json.dumps(s)


def _k8s(name):
    return list(yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()))


def test_kubernetes_manifests_use_the_spec():
    ca = f"{CERTS}/ca.crt"
    docs = {(d["kind"], d["metadata"]["name"]): d for f in ("superlink.yaml", "supernodes.yaml") for d in _k8s(f)}
    svc = docs[("Service", "superlink")]
    # the Fleet API only, cluster-internal; the Control API has no Service (Pod loopback, kubectl port-forward)
    assert svc["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(spec.FLEET_PORT, spec.FLEET_PORT)]
    for doc in docs.values():
        if doc["kind"] == "Service":
            assert spec.CONTROL_PORT not in {p.get("port") for p in doc["spec"]["ports"]}, doc["metadata"]["name"]
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]

    pod = docs[("Deployment", "superlink")]["spec"]["template"]["spec"]
    c = {x["name"]: x for x in pod["containers"]}
    assert c["superlink"]["image"] == spec.SUPERLINK_IMAGE
    assert c["superlink"]["args"] == spec.superlink_args(
        ca=ca, cert=f"{CERTS}/server.pem", key=f"{CERTS}/server.key", node_auth=True,
        fleet_address=f"0.0.0.0:{spec.FLEET_PORT}", port=spec.CONTROL_PORT, isolation="process",
        database="/app/state/superlink.db")
    assert _flag(c["superlink"]["args"], "--host") == "127.0.0.1"
    assert {p["containerPort"] for p in c["superlink"]["ports"]} == {spec.FLEET_PORT}
    assert c["serverapp"]["image"] == spec.STAMEN_IMAGE and c["serverapp"]["command"] == ["flower-superexec"]
    assert c["serverapp"]["args"] == spec.superexec_args(f"127.0.0.1:{spec.CONTROL_PORT}", ca=ca)
    assert pod["securityContext"]["fsGroup"] == spec.FLOWER_IMAGE_UID

    sts = docs[("StatefulSet", "supernode")]
    n = sts["spec"]["replicas"]
    pod = sts["spec"]["template"]["spec"]
    c = {x["name"]: x for x in pod["containers"]}
    assert c["supernode"]["image"] == spec.SUPERNODE_IMAGE
    assert c["supernode"]["args"] == spec.supernode_args(
        "$(POD_INDEX)", n, superlink=f"superlink:{spec.FLEET_PORT}", ca=ca,
        auth_key=f"{CERTS}/{spec.node_key_name('$(POD_INDEX)')}", host="127.0.0.1", port=spec.SUPERNODE_PORT,
        isolation="process")
    env = {e["name"]: e for e in c["supernode"]["env"]}
    assert "pod-index" in env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert c["clientapp"]["image"] == spec.STAMEN_IMAGE
    assert c["clientapp"]["args"] == spec.superexec_args(f"127.0.0.1:{spec.SUPERNODE_PORT}", ca=None)

    for doc in docs.values():
        for ctr in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            got = {e["name"]: e.get("value") for e in ctr.get("env", []) if "value" in e}
            assert {k: got.get(k) for k in spec.FLOWER_ENV} == spec.FLOWER_ENV, ctr["name"]
            for m in ctr.get("volumeMounts", []):
                if m["mountPath"] == CERTS:
                    assert m.get("readOnly") is True

    kust = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    for r in kust["resources"]:
        assert (DEPLOY / "k8s" / r).is_file()
    gen = {g["name"]: {Path(f).name for f in g["files"]} for g in kust["secretGenerator"]}
    assert gen["stamen-superlink-tls"] == {"ca.crt", "server.pem", "server.key"}
    assert gen["stamen-supernode-keys"] == {"ca.crt", *(spec.node_key_name(k) for k in range(n))}
    assert f"num-partitions={n}" in " ".join(c["supernode"]["args"])


def test_every_flower_image_is_pinned_and_the_dockerfile_packs_every_package():
    text = "\n".join(p.read_text() for p in [*DEPLOY.glob("docker/*.yaml"), *DEPLOY.glob("k8s/*.yaml")])
    images = set(re.findall(r"image:\s*(\S+)", text))
    assert images == {spec.SUPERLINK_IMAGE, spec.SUPERNODE_IMAGE, spec.STAMEN_IMAGE}
    assert spec.SUPERLINK_IMAGE.endswith(":1.39.0") and spec.FLOWER_VERSION == "1.39.0"
    docker = (DEPLOY / "docker/Dockerfile").read_text()
    assert "python:${PYTHON_VERSION}-slim" in docker and "ARG PYTHON_VERSION=3.11" in docker
    assert f"--uid {spec.FLOWER_IMAGE_UID}" in docker
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for d in {d.split("/")[0] for d in dirs}:
        assert f"COPY {d}/ {d}/" in docker, d
    ray = yaml.safe_load((DEPLOY / "ray/ray-cluster.yaml").read_text())
    assert any(f"--port={spec.RAY_PORT}" in cmd for cmd in ray["head_start_ray_commands"])
    assert any(f":{spec.RAY_PORT}" in cmd for cmd in ray["worker_start_ray_commands"])
    assert C.load(DEPLOY / "ray/cluster.toml").federation.ray_address == "auto"


def test_spec_flags_exist_in_the_installed_flower_clis():
    """Every flag the launchers, compose file and manifests pass is one Flower 1.39 knows."""
    ca = "/c/ca.crt"
    uses = {
        "flower-superlink": spec.superlink_args(ca=ca, cert="/c/s.pem", key="/c/s.key", database="/s.db"),
        "flower-supernode": spec.supernode_args(0, 2, superlink="h:1", ca=ca, auth_key="/k", max_retries=1,
                                                max_wait_time=1),
        "flower-superexec": spec.superexec_args("h:1", ca=ca) + spec.superexec_args("h:1", ca=None),
    }
    for cli, args in uses.items():
        help_text = subprocess.run([_exe(cli), "--help"], capture_output=True, text=True, timeout=120).stdout
        for flag in {a for a in args if a.startswith("--")}:
            assert re.search(rf"(^|\s|\[){re.escape(flag)}(\s|$|\]|,)", help_text), f"{cli} has no {flag}"


# -- closed by default: loopback binds, explicit --insecure ------------------------------------
@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("127.255.255.254", True), ("::1", True), ("[::1]", True),
    ("0:0:0:0:0:0:0:1", True), ("::ffff:127.0.0.1", True), ("localhost", True), ("LOCALHOST", True),
    ("localhost.", True), (" 127.0.0.1 ", True),
    ("0.0.0.0", False), ("::", False), ("[::]", False), ("", False), ("*", False),
    ("10.0.0.5", False), ("192.168.1.20", False), ("172.16.0.1", False), ("10.200.0.1", False),
    ("203.0.113.10", False), ("128.0.0.1", False), ("fe80::1", False), ("fe80::1%eth0", False), ("::2", False),
    ("::ffff:10.0.0.1", False), ("superlink", False), ("superlink.example.org", False), ("localhost.example.org", False),
    ("my-localhost", False), ("127.0.0.1.nip.io", False), ("127.1", False),
])
def test_address_classifier(host, loopback):
    assert spec.is_loopback(host) is loopback


@pytest.mark.parametrize("address, host", [
    ("127.0.0.1:9092", "127.0.0.1"), ("0.0.0.0:9092", "0.0.0.0"), ("[::1]:9092", "::1"), ("[::]:9092", "::"),
    ("localhost:9092", "localhost"), ("superlink:9092", "superlink"), (":9092", ""), ("127.0.0.1", "127.0.0.1"),
])
def test_address_host_splits_like_flower(address, host):
    from flwr.supercore.address import parse_address

    assert spec.address_host(address) == host
    if ":" in address and not address.startswith(":"):
        assert parse_address(address)[0] == host  # the host Flower itself will bind


def test_every_launcher_binds_loopback_by_default(tmp_path):
    from stamen.deploy.local import LocalFederation, Placement

    args = spec.superlink_args(ca="/c/ca.crt", cert="/c/s.pem", key="/c/s.key")
    assert _flag(args, "--fleet-api-address") == f"127.0.0.1:{spec.FLEET_PORT}" and _flag(args, "--host") == "127.0.0.1"
    args = spec.superlink_args(ca=None, node_auth=False)
    assert _flag(args, "--fleet-api-address") == f"127.0.0.1:{spec.FLEET_PORT}" and _flag(args, "--host") == "127.0.0.1"
    assert _flag(spec.supernode_args(0, 2, superlink="h:9092", ca=None), "--host") == "127.0.0.1"
    fed = LocalFederation(2, tmp_path / "fed", tls=False, node_auth=False)  # nothing started
    argv = fed.superlink_argv()
    assert _flag(argv, "--fleet-api-address") == f"127.0.0.1:{fed.fleet_port}" and _flag(argv, "--host") == "127.0.0.1"
    # a placement that binds beyond loopback without TLS + node auth is refused before anything starts
    fed = LocalFederation(2, tmp_path / "open", tls=False, node_auth=False, placement=Placement(fleet_bind="0.0.0.0"))
    with pytest.raises(spec.OpenBindError, match="0.0.0.0"):
        fed.superlink_argv()


def test_superlink_args_refuse_open_binds_without_tls_and_node_auth():
    tls = dict(ca="/c/ca.crt", cert="/c/s.pem", key="/c/s.key")
    for binds in (dict(fleet_address="0.0.0.0:9092"), dict(host="0.0.0.0"), dict(fleet_address="[::]:9092"),
                  dict(host="192.168.1.20"), dict(fleet_address="superlink:9092")):
        with pytest.raises(spec.OpenBindError, match="not loopback"):
            spec.superlink_args(ca=None, node_auth=False, **binds)
        with pytest.raises(spec.OpenBindError, match="no SuperNode authentication"):
            spec.superlink_args(**tls, node_auth=False, **binds)
        assert "--insecure" in spec.superlink_args(ca=None, node_auth=False, open_ok=True, **binds)
        assert "--enable-supernode-auth" in spec.superlink_args(**tls, **binds)  # TLS + node auth: allowed
    for binds in (dict(fleet_address="localhost:9092"), dict(fleet_address="[::1]:9092", host="::1"),
                  dict(host="127.0.0.2")):
        assert "--insecure" in spec.superlink_args(ca=None, node_auth=False, **binds)


def _cli(*args: str):
    from typer.testing import CliRunner

    from stamen.deploy.cli import deploy_app

    res = CliRunner().invoke(deploy_app, list(args))
    flat = lambda text: " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())  # rich's error panel, unwrapped
    return res, flat(res.stdout), flat(res.stderr)


def _dry_run_argv(stdout: str) -> list[str]:
    return shlex.split(stdout)


def test_stamen_deploy_superlink_binds_loopback_by_default(tmp_path):
    paths = make_certificates(tmp_path / "certs", nodes=1)
    for extra in (["--insecure"], ["--certs", str(paths.ca_cert.parent)],
                  ["--certs", str(paths.ca_cert.parent), "--no-node-auth"]):
        res, out, err = _cli("superlink", "--dry-run", *extra)
        assert res.exit_code == 0, err
        argv = _dry_run_argv(out)
        assert argv[0] == "flower-superlink"
        assert _flag(argv, "--fleet-api-address") == "127.0.0.1:9092" and _flag(argv, "--host") == "127.0.0.1"
        assert "WARNING" not in err
    res, out, err = _cli("superlink", "--help")
    assert out.count("Default: loopback only") == 2  # --fleet-address and --host say so


def test_stamen_deploy_superlink_refuses_an_open_bind_without_insecure(tmp_path):
    certs = str(make_certificates(tmp_path / "certs", nodes=1).ca_cert.parent)
    for binds in (["--host", "0.0.0.0"], ["--fleet-address", "0.0.0.0:9092"], ["--fleet-address", "10.0.0.5:9092"],
                  ["--fleet-address", "[::]:9092", "--host", "192.168.1.20"]):
        res, out, err = _cli("superlink", "--dry-run", *binds)  # neither TLS nor --insecure
        assert res.exit_code == 2 and not out, out
        assert "not a loopback address" in err or "not loopback addresses" in err, err
        assert binds[-1] in err
        assert "add --certs DIR" in err and "flwr supernode register" in err and "add --insecure" in err, err
        res, out, err = _cli("superlink", "--dry-run", "--certs", certs, "--no-node-auth", *binds)  # TLS, no node auth
        assert res.exit_code == 2 and not out, out
        assert "drop --no-node-auth" in err and "--insecure" in err, err
    # --insecure and --certs contradict each other
    res, out, err = _cli("superlink", "--dry-run", "--insecure", "--certs", certs)
    assert res.exit_code == 2 and "give one of them" in err


def test_stamen_deploy_superlink_warns_when_insecure_is_explicit_on_the_network(tmp_path):
    res, out, err = _cli("superlink", "--dry-run", "--insecure", "--fleet-address", "0.0.0.0:9092")
    assert res.exit_code == 0, err
    argv = _dry_run_argv(out)
    assert "--insecure" in argv and _flag(argv, "--fleet-api-address") == "0.0.0.0:9092"
    assert _flag(argv, "--host") == "127.0.0.1"
    assert err.startswith("WARNING: --fleet-address 0.0.0.0:9092 is not a loopback address and --insecure is set")
    assert "OPEN to that network" in err and "plain text (no TLS), no SuperNode authentication" in err
    assert "join as a SuperNode" in err and "Control API" not in err  # the Control API stayed on loopback
    res, out, err = _cli("superlink", "--dry-run", "--insecure", "--host", "10.0.0.5")
    assert res.exit_code == 0 and "OPEN to that network" in err and "start runs" in err
    # TLS + node auth on the network: allowed; only the Control API's missing accounts are pointed out
    certs = str(make_certificates(tmp_path / "certs", nodes=1).ca_cert.parent)
    res, out, err = _cli("superlink", "--dry-run", "--certs", certs, "--fleet-address", "0.0.0.0:9092")
    assert res.exit_code == 0 and err == "", err
    assert "--enable-supernode-auth" in _dry_run_argv(out)
    res, out, err = _cli("superlink", "--dry-run", "--certs", certs, "--host", "0.0.0.0")
    assert res.exit_code == 0 and "WARNING: --host 0.0.0.0 is not loopback" in err and "no user accounts" in err
    # SuperNodes and flwr connections: --insecure across the network is allowed, and says so
    res, out, err = _cli("supernode", "-i", "0", "-n", "2", "--superlink", "10.0.0.5:9092", "--insecure", "--dry-run")
    assert res.exit_code == 0 and "WARNING" in err and "plain text" in err
    res, out, err = _cli("supernode", "-i", "0", "-n", "2", "--superlink", "127.0.0.1:9092", "--insecure", "--dry-run")
    assert res.exit_code == 0 and err == ""
    res, out, err = _cli("flwr-home", "--superlink", "10.0.0.5:8000", "--insecure", "--out", str(tmp_path / "h"))
    assert res.exit_code == 0 and "WARNING" in err and "plain text" in err


def test_the_stamen_cli_refuses_with_exit_code_2():
    from typer.testing import CliRunner

    from stamen.cli import app

    res = CliRunner().invoke(app, ["deploy", "superlink", "--dry-run", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--insecure" in res.stderr


# -- helpers: proxy and process cleanup -------------------------------------------------------
def test_proxy_counts_both_directions_and_splits_polls_from_transfers():
    srv = socket.create_server(("127.0.0.1", 0))

    def echo():
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data[: len(data) // 2])  # answer half

    threading.Thread(target=echo, daemon=True).start()
    with ByteCountingProxy(srv.getsockname()) as proxy:
        c = socket.create_connection(("127.0.0.1", proxy.port))
        t0 = time.time()
        c.sendall(b"p" * 200)  # a "poll"
        c.recv(65536)
        time.sleep(1.5)
        payload = b"x" * 50_000
        c.sendall(payload)  # a "transfer"
        got = 0
        while got < 25_000:
            got += len(c.recv(65536))
        c.close()
        time.sleep(0.3)
        assert proxy.total("up") == 50_200 and proxy.total("down") == 25_100
        assert len(bursts(proxy.events(), gap=1.0)) == 2
        (row,) = split_traffic(proxy.events(), [(t0, time.time())])
        assert row["transfer_up"] == 50_000 and row["polling_up"] == 200
        assert row["wire_down"] == 25_100
    srv.close()


def test_process_group_kills_detached_grandchildren(tmp_path):
    group = ProcessGroup(tmp_path)
    # the child starts a grandchild in a new session (as Flower's SuperExec is started) and exits
    group.start("parent", [sys.executable, "-c",
                           "import subprocess,sys,time;"
                           "subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)'],start_new_session=True);"
                           "time.sleep(600)"])
    deadline = time.time() + 30
    while len(tagged_pids(group.tag)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(tagged_pids(group.tag)) == 2
    group.shutdown(grace=2)
    assert tagged_pids(group.tag) == []


# -- real federations ------------------------------------------------------------------------
def _cfg(*overrides):
    return C.load(ROOT / "stamen/configs/default.toml", BASE + list(overrides))


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from stamen.deploy.local import LocalFederation

    fed = LocalFederation(NODES, tmp_path_factory.mktemp("federation"), measure_bytes=True)
    with fed:
        yield fed
    assert fed.procs.leftovers() == [], "processes outlived the federation"


@pytest.mark.slow
def test_fedavg_and_compressed_runs_over_tls_with_wire_bytes(federation, tmp_path):
    fed = federation
    assert fed.tls and fed.node_auth and len(fed.node_ids) == NODES  # every key registered
    superlink_cmd = fed.procs.started["superlink"].argv
    assert "--enable-supernode-auth" in superlink_cmd and "--insecure" not in superlink_cmd
    idle = fed.idle_rate(6.0)
    results, tables = {}, {}
    for name, extra in (("dense", []), ("topk", COMPRESSED)):
        res = fed.run(_cfg(*extra, f"run.name='deploy-{name}'"), tmp_path / name, timeout=1200)
        assert res.ok, res.log[-3000:]
        assert [r["round"] for r in res.rows] == [1, 2]
        assert all(r["clients"] == NODES and r["rejected"] == 0 for r in res.rows)
        assert (res.out_dir / "metrics.jsonl").exists() and (res.out_dir / "summary.json").exists()
        results[name], tables[name] = res, fed.wire_bytes_per_round(res)

    for name, table in tables.items():
        for row in table:
            # everything the messages carry crosses the wire, plus framing (TLS records, HTTP/2 and
            # gRPC frames, Flower's object-store RPCs with node-auth signatures): a bounded overhead
            assert row["transfer_down"] >= row["downlink_bytes"]
            assert row["transfer_up"] >= row["uplink_bytes"]
            assert row["transfer_down"] <= 1.25 * row["downlink_bytes"] + NODES * 20_000, row
            assert row["transfer_up"] <= 1.25 * row["uplink_bytes"] + NODES * 40_000, row
    for d, t in zip(tables["dense"], tables["topk"]):
        assert t["uplink_bytes"] < 0.15 * d["uplink_bytes"]
        assert t["transfer_up"] < 0.3 * d["transfer_up"]  # the compressed run is far lighter on the wire
        assert t["wire_up"] < 0.3 * d["wire_up"]
    traffic = {k: r.flower_traffic for k, r in results.items()}
    print("\nidle polling bytes/s:", idle)
    for name, table in tables.items():
        print(name, json.dumps(table, indent=1))
    print("Flower's own network-traffic counters:", traffic)
    _report("wire_bytes", {"idle_bytes_per_s": idle, "rounds": tables, "flower_network_traffic": traffic,
                           "wall_s": {k: [r["wall_s"] for r in v.rows] for k, v in results.items()}})


@pytest.mark.slow
def test_unregistered_supernode_is_refused(federation, tmp_path):
    fed = federation
    private, _ = make_node_keypair()  # never registered
    key = tmp_path / "intruder.key"
    key.write_bytes(private)
    key.chmod(0o600)
    from stamen.deploy.local import free_port

    argv = ["flower-supernode", *spec.supernode_args(0, NODES, superlink=fed.fleet_target(), ca=fed.certs.ca_cert,
                                                     auth_key=key, port=free_port(), max_retries=2,
                                                     max_wait_time=60)]
    s = fed.start_process("intruder", argv)
    rc = s.popen.wait(timeout=180)
    log = s.log.read_text()
    assert rc != 0 and "Failed to activate SuperNode" in log, log[-2000:]
    assert "No SuperNode found with the given public key" in fed.procs.started["superlink"].log.read_text()


@pytest.mark.slow
def test_clients_without_the_ca_cannot_connect(federation, tmp_path):
    fed = federation
    # plain TLS clients with the system's roots: the SuperLink's certificate does not verify …
    for port in (fed.fleet_port, fed.control_port):
        ctx = ssl.create_default_context()
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    # … and with the deployment's CA it does
    ctx = ssl.create_default_context(cafile=str(fed.certs.ca_cert))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", fed.fleet_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # a SuperNode without --root-certificates (system roots) fails the handshake and exits
    private, _ = make_node_keypair()
    key = tmp_path / "n.key"
    key.write_bytes(private)
    from stamen.deploy.local import free_port

    args = spec.supernode_args(1, NODES, superlink=fed.fleet_target(), ca=fed.certs.ca_cert, auth_key=key,
                               port=free_port(), max_retries=1, max_wait_time=30)
    assert args[:2] == ["--root-certificates", str(fed.certs.ca_cert)]
    s = fed.start_process("no-ca-node", ["flower-supernode", *args[2:]])  # only the system's roots
    rc = s.popen.wait(timeout=180)
    log = s.log.read_text()
    assert rc != 0 and "CERTIFICATE_VERIFY_FAILED" in log, log[-2000:]
    # the flwr CLI without the CA cannot reach the Control API either
    home = tmp_path / "flwr-home"
    home.mkdir()
    conn = {"superlink": {"default": spec.CONNECTION, spec.CONNECTION: {"address": f"127.0.0.1:{fed.control_port}"}}}
    (home / "config.toml").write_text(tomli_w.dumps(conn))  # TLS, but no root-certificates
    rc = subprocess.run([_exe("flwr"), "ls", spec.CONNECTION], capture_output=True, text=True, timeout=180,
                        env={**os.environ, "FLWR_HOME": str(home)})
    assert rc.returncode != 0  # (the same command with the CA works: the fixture's flwr calls use it)
    assert re.search(r"certificate verify failed|SSL|Connection to the SuperLink is unavailable", rc.stdout + rc.stderr)


@pytest.mark.slow
def test_killed_supernode_run_finishes_and_the_node_rejoins(federation, tmp_path):
    """Kill SuperNode 1 while it trains in round 2: round 2 closes with 2 replies (the SuperLink
    answers "Node Unavailable" once 2 heartbeats are missed, or the round times out — never later),
    and the node, restarted with the same key (so the same node id), is sampled again: every round
    that starts after it is back has all 3 replies."""
    fed = federation
    timeout_s = 120
    cfg = _cfg("run.rounds=4", f"federation.round_timeout_s={timeout_s}", "run.name='deploy-fault'")
    received = fed.log_count("supernode-1", "Receiving: train message")
    handle = fed.submit(cfg, tmp_path / "fault")
    fed.wait_log_count("supernode-1", "Receiving: train message", received + 2, timeout=900)
    fed.kill_supernode(1)  # mid-round 2: its ClientApp is training
    rejoined_at: list[float] = []
    rejoin_error: list[BaseException] = []

    def rejoin():
        try:
            fed.rejoin_supernode(1, timeout=400)
            rejoined_at.append(time.time())
        except BaseException as err:  # reported below
            rejoin_error.append(err)

    t = threading.Thread(target=rejoin)
    t.start()
    res = handle.wait(timeout=1500)
    t.join(timeout=400)
    assert not rejoin_error, rejoin_error
    assert res.ok, res.log[-3000:]
    rows, starts = res.rows, [w[0] for w in res.round_windows()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["clients"] == NODES
    r2 = rows[1]
    assert r2["clients"] == NODES - 1 and r2["missing"] + r2["rejected"] == 1, r2
    assert r2["wall_s"] < timeout_s + 60  # a dead node cannot hold a round past the round timeout
    assert not any(r["failed"] for r in rows)
    back = [i for i, t0 in enumerate(starts) if t0 > rejoined_at[0]]
    assert back, f"the node rejoined only after the last round started ({rejoined_at[0]} vs {starts})"
    for i, r in enumerate(rows[2:], start=2):  # rounds after the kill: 2 replies until the node is back
        assert r["clients"] == NODES if i in back else r["clients"] in (NODES - 1, NODES), (i, r)
    _report("fault", {"rejoined_at_s_after_start": rejoined_at[0] - res.started_at,
                      "rounds": [{k: r.get(k) for k in ("round", "clients", "missing", "rejected", "wall_s")}
                                 for r in rows],
                      "round_starts_s_after_start": [t0 - res.started_at for t0 in starts]})


# -- several hosts: network namespaces ---------------------------------------------------------
@pytest.mark.slow
def test_federation_across_network_namespaces(tmp_path):
    """SuperLink and SuperNodes on separate network stacks ("hosts") joined by veth links."""
    from stamen.deploy.local import LocalFederation
    from stamen.deploy.netns import NetnsTopology, netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with NetnsTopology(NODES) as topo:
        # isolation="process": a separate SuperExec per SuperLink/SuperNode, the compose/k8s topology
        fed = LocalFederation(NODES, tmp_path / "fed", placement=topo.placement(), isolation="process")
        with fed:
            inode = lambda name: os.stat(f"/proc/{fed.procs.started[name].popen.pid}/ns/net").st_ino
            spaces = {inode("superlink"), *(inode(f"supernode-{i}") for i in range(NODES))}
            assert len(spaces) == NODES + 1 and os.stat("/proc/self/ns/net").st_ino not in spaces
            res = fed.run(_cfg("run.name='deploy-netns'"), tmp_path / "out", timeout=1200)
            assert res.ok, res.log[-3000:]
            assert all(r["clients"] == NODES for r in res.rows)
            # each SuperNode dialled the SuperLink's address on its own link
            for i in range(NODES):
                assert f"--superlink {topo.superlink_ip(i)}:{fed.fleet_port}" in shlex.join(
                    fed.procs.started[f"supernode-{i}"].argv)
        assert fed.procs.leftovers() == []
    _report("netns_wall_s", [r["wall_s"] for r in res.rows])


# -- stamen deploy local ----------------------------------------------------------------------------
def _deploy_tags() -> set[str]:
    tags = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                env = Path(f"/proc/{entry.name}/environ").read_bytes()
            except OSError:
                continue
            m = re.search(rb"(?:^|\0)" + TAG_VAR.encode() + rb"=([^\0]*)", env)
            if m:
                tags.add(m.group(1).decode())
    return tags


@pytest.mark.slow
def test_stamen_deploy_local_runs_to_completion_and_cleans_up_on_ctrl_c(tmp_path):
    before = _deploy_tags()
    out = tmp_path / "run"
    cmd = [_exe("stamen"), "deploy", "local", "--nodes", "2", "--set", "run.rounds=1", "--set", "task.partition='iid'",
           "--set", "task.local_epochs=1", "--out", str(out), "--timeout", "900"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "TLS + node authentication" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["clients"] == 2
    dep = json.loads((out / "deployment.json").read_text())
    assert dep["status"] == "finished:completed" and dep["tls"] and dep["node_auth"]
    assert _deploy_tags() <= before

    # Ctrl-C while the federation runs: exit 130, nothing left behind
    p = subprocess.Popen([*cmd[:-4], "--out", str(tmp_path / "interrupted"), "--set", "run.rounds=5"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "SuperLink: Fleet API" in line:
            time.sleep(3)
            p.send_signal(signal.SIGINT)
            break
    rest, _ = p.communicate(timeout=300)
    assert p.returncode == 130, "".join(lines) + rest
    assert _deploy_tags() <= before
