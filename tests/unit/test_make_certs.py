"""scripts/make-certs.py, run as a real process: the CA, the server certificates, their names,
the keys' modes, and what a second run does (nothing, unless --force)."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from helpers import scaled

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "make-certs.py"
CENTRAL = "central=central,localhost,127.0.0.1,192.168.1.20"


def make_certs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def names(certificate: x509.Certificate) -> set[str]:
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in sans}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def public_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_ca_and_server_certificates_with_their_names(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    proc = make_certs("--out", str(out), "--server", CENTRAL, "--server", "site=localhost,::1")
    assert proc.returncode == 0, proc.stderr
    files = {p.name for p in out.iterdir()}
    assert files == {"ca.crt", "ca.key", "central.crt", "central.key", "site.crt", "site.key"}
    for key in ("ca.key", "central.key", "site.key"):
        assert mode(out / key) == 0o600, key
    for crt in ("ca.crt", "central.crt", "site.crt"):
        assert mode(out / crt) == 0o644, crt

    ca = cert(out / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.subject == ca.issuer

    central = cert(out / "central.crt")
    central.verify_directly_issued_by(ca)  # raises unless the CA signed it
    assert central.issuer == ca.subject
    sans = central.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["central", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("192.168.1.20"),
    ]
    assert not central.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = central.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    private = serialization.load_pem_private_key((out / "central.key").read_bytes(), None)
    assert public_der(central) == private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert names(cert(out / "site.crt")) == {"localhost", "::1"}


def test_a_second_run_keeps_everything_and_force_reissues_with_the_same_ca(
    tmp_path: Path,
) -> None:
    out = tmp_path / "certs"
    assert make_certs("--out", str(out), "--server", CENTRAL).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    again = make_certs("--out", str(out), "--server", CENTRAL)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert "kept" in again.stdout and "wrote" not in again.stdout

    # Other names for an existing certificate: nothing is overwritten, and it says so.
    other = make_certs("--out", str(out), "--server", "central=localhost")
    assert other.returncode == 1
    assert "central.crt is for central, localhost, 127.0.0.1, 192.168.1.20" in other.stderr
    assert "--force" in other.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    forced = make_certs("--out", str(out), "--server", "central=localhost", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "ca.crt").read_bytes() == before["ca.crt"]
    assert (out / "ca.key").read_bytes() == before["ca.key"]
    assert (out / "central.key").read_bytes() != before["central.key"]
    assert mode(out / "central.key") == 0o600
    central = cert(out / "central.crt")
    central.verify_directly_issued_by(cert(out / "ca.crt"))
    assert names(central) == {"localhost"}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_the_default_is_a_deployment_at_network_config_s_addresses(tmp_path: Path) -> None:
    env = {"PC1_IP": "10.0.0.11", "PC2_IP": "10.0.0.12", "PC3_IP": "pc3.lan"}
    proc = make_certs("--out", str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr
    ca = cert(tmp_path / "ca.crt")
    expected = {
        "central": {"central", "localhost", "127.0.0.1", "10.0.0.12", "10.0.0.11"},
        "driver-dashboard": {"localhost", "127.0.0.1", "10.0.0.11"},
        "site-dashboard": {"localhost", "127.0.0.1", "pc3.lan"},
        "registry": {"registry", "localhost", "127.0.0.1", "10.0.0.12"},
        "kafka": {
            *("kafka", "localhost", "127.0.0.1", "pc1", "pc2", "pc3"),
            *("10.0.0.11", "10.0.0.12", "pc3.lan"),
        },
    }
    for name, sans in expected.items():
        server = cert(tmp_path / f"{name}.crt")
        server.verify_directly_issued_by(ca)
        assert names(server) == sans, name
        assert mode(tmp_path / f"{name}.key") == 0o600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server", "central=not_a_host"], "neither an IP address nor a DNS name"),
        (["--server", "central="], "at least one DNS name or IP address"),
        (["--server", "../central=localhost"], "expected NAME=SAN"),
        (["--server", "ca=localhost"], "'ca' is the CA's"),
        (["--days", "0"], "at least 1"),
    ],
)
def test_bad_requests_are_refused_in_one_line_and_write_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "certs"
    proc = make_certs("--out", str(out), *args)
    assert proc.returncode in (1, 2)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not list(out.iterdir())


def test_a_bad_network_config_address_is_refused(tmp_path: Path) -> None:
    proc = make_certs("--out", str(tmp_path / "certs"), env={"PC2_IP": "0.0.0.0"})
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "make-certs: error: network_config.py: PC2_IP='0.0.0.0' is not an address other "
        "machines can reach"
    )
