#!/usr/bin/env python3
"""Make a local certificate authority and, signed by it, the server certificates of a deployment.

    scripts/make-certs.py [--out certs] [--server NAME=SAN,SAN,...]... [--days N] [--force]

Each --server NAME=... writes NAME.crt and NAME.key for a server known by those names (DNS
names and IP addresses, e.g. central=central,localhost,127.0.0.1,192.168.1.20). Without
--server it makes the five of a deployment from network_config.py's addresses (PC1_IP,
PC2_IP, PC3_IP, overridable by the environment as there), each also valid for localhost and
127.0.0.1:

    central           Central's :5000 and admin web :8002   (central, PC2_IP, PC1_IP: the
                      active Central and its standby present the same certificate)
    driver-dashboard  the drivers' dashboard :8001          (PC1_IP)
    site-dashboard    the site dashboard :8003              (PC3_IP)
    registry          EV_Registry's REST API :8004          (registry, PC2_IP)
    kafka             every Kafka node, to clients and to each other (kafka, pc1, pc2, pc3,
                      PC1_IP, PC2_IP, PC3_IP; CN=kafka is the nodes' principal, User:kafka)

The CA is ca.crt (give it to every client: monitors, ctl, health checks, browsers) and ca.key
(keep it on this machine). Keys are written with mode 0600. Running it again changes nothing:
existing files are kept (and checked against what was asked). --force issues new server
certificates and keys, signed by the CA already there. Needs the `cryptography` package (the
project's .venv has it). Details: docs/tls.md.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit(
        "make-certs: needs the 'cryptography' package: run it with the project's "
        ".venv/bin/python, or pip install cryptography"
    )

ROOT = Path(__file__).resolve().parent.parent
ORGANISATION = "EV charging network"
CA_NAME = "EV charging network local CA"
CA_DAYS = 3650
SERVER_DAYS = 825
# Certificates start a little in the past: the PCs' clocks may disagree by a few minutes.
BACKDATE = datetime.timedelta(minutes=10)
LOCAL_NAMES = ("localhost", "127.0.0.1")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

SubjectName = x509.DNSName | x509.IPAddress


class CertError(Exception):
    """A request or a file this script cannot work with (one line for the user)."""


@dataclass(frozen=True)
class ServerRequest:
    """One server certificate to make: its file name and the names it is valid for."""

    name: str
    sans: tuple[str, ...]

    def general_names(self) -> list[SubjectName]:
        return [subject_name(san) for san in self.sans]


def subject_name(value: str) -> SubjectName:
    """An IP address or a DNS name as a SubjectAltName entry; CertError if it is neither."""
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.split(".")
    if len(value) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise CertError(f"{value!r} is neither an IP address nor a DNS name")
    return x509.DNSName(value.lower())


def parse_server(text: str) -> ServerRequest:
    """NAME=SAN,SAN,... as given to --server."""
    name, sep, names = text.partition("=")
    name = name.strip()
    if not sep or not _NAME.match(name):
        raise argparse.ArgumentTypeError(
            f"expected NAME=SAN,SAN,... with NAME made of letters, digits, '_', '.', '-'; "
            f"got {text!r}"
        )
    sans = unique(part.strip() for part in names.split(",") if part.strip())
    if not sans:
        raise argparse.ArgumentTypeError(f"{name}: give at least one DNS name or IP address")
    try:
        for san in sans:
            subject_name(san)
    except CertError as exc:
        raise argparse.ArgumentTypeError(f"{name}: {exc}") from None
    return ServerRequest(name, sans)


def unique(values: Iterable[str]) -> tuple[str, ...]:
    """`values` without repeats, in their first order."""
    return tuple(dict.fromkeys(values))


def deployment_servers() -> list[ServerRequest]:
    """The five servers of a deployment, at network_config.py's addresses."""
    sys.path.insert(0, str(ROOT))
    import network_config

    try:
        config = network_config.load()
    except ValueError as exc:
        raise CertError(f"network_config.py: {exc}") from None
    return [
        ServerRequest(
            "central", unique(["central", *LOCAL_NAMES, config["PC2_IP"], config["PC1_IP"]])
        ),
        ServerRequest("driver-dashboard", unique([*LOCAL_NAMES, config["PC1_IP"]])),
        ServerRequest("site-dashboard", unique([*LOCAL_NAMES, config["PC3_IP"]])),
        ServerRequest("registry", unique(["registry", *LOCAL_NAMES, config["PC2_IP"]])),
        # pc1..pc3 too: Kafka's Java clients check a node's certificate against the name the
        # address they dial resolves to backwards, which the compose files' /etc/hosts gives.
        ServerRequest(
            "kafka",
            unique(
                [
                    "kafka",
                    *LOCAL_NAMES,
                    *(f"pc{n}" for n in (1, 2, 3)),
                    *(config[f"PC{n}_IP"] for n in (1, 2, 3)),
                ]
            ),
        ),
    ]


# --- files --------------------------------------------------------------------------------------


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with `mode`, atomically (a temporary file renamed over it).

    The temporary file is created with `mode` already, so a key is never readable by others,
    not even for a moment.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temporary, mode)  # in case the umask took bits away
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file(path, pem, 0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    write_file(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: not an elliptic-curve key (this script makes P-256 keys)")
    return key


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CertError(f"{path}: not a PEM certificate ({exc})") from None


def same_public_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    der = serialization.Encoding.DER
    info = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, info) == cert.public_key().public_bytes(der, info)


# --- certificates -------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def make_server_cert(
    request: ServerRequest,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(request.name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(request.general_names()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Also a client's: Kafka's nodes show theirs to each other (mutual TLS).
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def sans_of(cert: x509.Certificate) -> list[SubjectName]:
    """The DNS names and IP addresses `cert` is valid for, in its order."""
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names: list[SubjectName] = [
        n for n in extension.value if isinstance(n, (x509.DNSName, x509.IPAddress))
    ]
    return names


# --- the run ------------------------------------------------------------------------------------


def ensure_ca(out: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in `out`: the one already there (checked), or a new one."""
    cert_path, key_path = out / "ca.crt", out / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert, key = load_cert(cert_path), load_key(key_path)
        if not same_public_key(key, cert):
            raise CertError(f"{key_path} is not the key of {cert_path}")
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca:
            raise CertError(f"{cert_path} is not a CA certificate")
        print(f"kept   {cert_path} (the CA already there)")
        return cert, key
    if cert_path.exists() or key_path.exists():
        present = cert_path if cert_path.exists() else key_path
        raise CertError(f"{present} exists without its pair: remove it to make a new CA")
    key = new_key()
    cert = make_ca(key, days)
    write_key(key_path, key)
    write_cert(cert_path, cert)
    print(f"wrote  {cert_path} and {key_path} (a new CA, valid {days} days)")
    return cert, key


def ensure_server(
    out: Path,
    request: ServerRequest,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    days: int,
    force: bool,
) -> list[str]:
    """Write request's certificate and key unless they are there; return the problems found."""
    cert_path, key_path = out / f"{request.name}.crt", out / f"{request.name}.key"
    ca_cert, ca_key = ca
    if not force and (cert_path.exists() or key_path.exists()):
        if not (cert_path.exists() and key_path.exists()):
            alone = cert_path if cert_path.exists() else key_path
            return [f"{alone} exists without its pair: remove it or use --force"]
        cert, key = load_cert(cert_path), load_key(key_path)
        problems = []
        if not same_public_key(key, cert):
            problems.append(f"{key_path} is not the key of {cert_path}")
        if not signed_by(cert, ca_cert):
            problems.append(f"{cert_path} is not signed by {out / 'ca.crt'}")
        valid_for = sans_of(cert)
        if set(valid_for) != set(request.general_names()):
            problems.append(
                f"{cert_path} is for {', '.join(str(n.value) for n in valid_for)}, "
                f"not {', '.join(request.sans)}"
            )
        if problems:
            return [f"{p} (kept it: use --force to issue a new one)" for p in problems]
        print(f"kept   {cert_path} ({', '.join(request.sans)})")
        return []
    key = new_key()
    cert = make_server_cert(request, key, ca_cert, ca_key, days)
    write_key(key_path, key)
    write_cert(cert_path, cert)
    print(f"wrote  {cert_path} and {key_path} ({', '.join(request.sans)})")
    return []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make-certs.py",
        description="Make a local CA and server certificates signed by it (docs/tls.md).",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("certs"), help="directory for the files (certs)"
    )
    parser.add_argument(
        "--server",
        type=parse_server,
        action="append",
        metavar="NAME=SAN,SAN,...",
        help="a server certificate NAME.crt valid for these DNS names and IP addresses "
        "(repeatable); default: central, driver-dashboard, site-dashboard, registry and kafka at "
        "network_config.py's addresses",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=SERVER_DAYS,
        help=f"server certificates' validity ({SERVER_DAYS})",
    )
    parser.add_argument(
        "--ca-days", type=int, default=CA_DAYS, help=f"a new CA's validity ({CA_DAYS})"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="issue new server certificates and keys even if they exist (the CA is kept)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.days < 1 or args.ca_days < 1:
        parser.error("--days and --ca-days must be at least 1")
    try:
        servers: list[ServerRequest] = args.server or deployment_servers()
        names = [server.name for server in servers]
        if "ca" in names or len(set(names)) != len(names):
            raise CertError("each --server needs its own NAME, and 'ca' is the CA's")
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        ca = ensure_ca(out, args.ca_days)
        problems = [
            problem
            for server in servers
            for problem in ensure_server(out, server, ca, args.days, args.force)
        ]
    except (CertError, OSError) as exc:
        print(f"make-certs: error: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"make-certs: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(
        f"CA certificate for clients: {out / 'ca.crt'}; keep {out / 'ca.key'} on this machine "
        "only (docs/tls.md says which file goes to which PC)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
