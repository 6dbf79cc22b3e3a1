"""Certificates and keys for a Flower 1.39 deployment: a CA, the SuperLink's TLS certificate,
and one ECDSA authentication key pair per SuperNode.

What Flower 1.39 expects (checked against its source):

- SuperLink: ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``.
  The same certificate serves the Fleet API (gRPC, SuperNodes), the Control API (HTTPS, ``flwr``)
  and the Runtime API (HTTPS, the SuperExec that launches the ServerApp connects to it on
  127.0.0.1), so its subject alternative names must list every name clients dial *and*
  ``localhost`` / ``127.0.0.1``.
- SuperNodes and ``flwr``: ``--root-certificates ca.crt`` / ``root-certificates = ".../ca.crt"``.
- Node authentication (SuperLink ``--enable-supernode-auth``): each SuperNode signs its requests
  with ``--auth-supernode-private-key supernode-<i>.key`` — an ECDSA key on a NIST curve in
  **OpenSSH private-key format** (Flower reads it with ``load_ssh_private_key``); the operator
  registers the matching **OpenSSH public key** ``supernode-<i>.pub`` with
  ``flwr supernode register supernode-<i>.pub <connection>`` (1.39 dropped the old CSV of public
  keys, ``--auth-list-public-keys``, in favour of registration through the Control API).

Usage::

    python -m stamen.deploy.certs --out certs/ --nodes 3 --host superlink.example.org --ip 10.0.0.5
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: names every SuperLink certificate carries: its own SuperExec dials the Runtime API on loopback
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
#: the curve Flower's docs use for SuperNode keys (any NIST curve is accepted)
NODE_KEY_CURVE = ec.SECP384R1


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`make_certificates` put things (all inside one directory)."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    def node_key(self, i: int) -> Path:
        return self.dir / f"supernode-{i}.key"

    def node_pub(self, i: int) -> Path:
        return self.dir / f"supernode-{i}.pub"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(common_name: str = "Stamen deployment CA", days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(days)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_server_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str],
                     ips: list[str], days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for the SuperLink with the given DNS names and IPs as SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    dns = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    addrs = list(dict.fromkeys([*ips, *LOOPBACK_IPS]))
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addrs]
    start, end = _validity(days)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def make_node_keypair() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key) for ``--auth-supernode-private-key`` / registration."""
    key = ec.generate_private_key(NODE_KEY_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_node_keys(paths: CertPaths, i: int) -> None:
    private, public = make_node_keypair()
    _write(paths.node_key(i), private, private=True)
    _write(paths.node_pub(i), public)


def make_certificates(out: str | Path, nodes: int = 0, hosts: list[str] | None = None,
                      ips: list[str] | None = None, days: int = 365) -> CertPaths:
    """Write a CA, a SuperLink certificate (SANs: ``hosts``, ``ips`` + loopback) and ``nodes`` key pairs.

    An existing CA in ``out`` is reused (so a new server certificate or more node keys can be
    added later); everything else is (re)written.
    """
    paths = CertPaths(Path(out))
    if paths.ca_cert.exists() and paths.ca_key.exists():
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    else:
        ca_cert, ca_key = make_ca(days=days)
        _write(paths.ca_key, _pem_key(ca_key), private=True)
        _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    cert, key = make_server_cert(ca_cert, ca_key, list(hosts or []), list(ips or []), days=days)
    _write(paths.server_key, _pem_key(key), private=True)
    _write(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    for i in range(nodes):
        write_node_keys(paths, i)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stamen.deploy.certs", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for ca.crt, server.pem/.key, supernode-<i>.key/.pub")
    p.add_argument("--nodes", type=int, default=0, help="number of SuperNode key pairs (supernode-0 … supernode-N-1)")
    p.add_argument("--host", action="append", default=[], help="a DNS name clients use for the SuperLink (repeatable)")
    p.add_argument("--ip", action="append", default=[], help="an IP address clients use for the SuperLink (repeatable)")
    p.add_argument("--days", type=int, default=365)
    args = p.parse_args(argv)
    paths = make_certificates(args.out, args.nodes, args.host, args.ip, args.days)
    print(f"wrote {paths.ca_cert}, {paths.server_cert} (SANs: {', '.join([*args.host, *args.ip, *LOOPBACK_NAMES, *LOOPBACK_IPS])})"
          + (f" and {args.nodes} SuperNode key pairs" if args.nodes else ""))


if __name__ == "__main__":
    main()
