"""shared.tls: contexts from the files scripts/make-certs.py writes, handshakes over real local
sockets, and one clear ConfigError for every kind of bad file or half-given setting."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from EV_Central import config as central_config
from EV_CP_M import dashboard as site_config
from EV_Driver import dashboard_config as driver_config
from helpers import scaled
from shared.errors import ConfigError
from shared.tls import client_context, describe_failure, optional_server_context, server_context

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with 'central' (127.0.0.1, localhost) and 'site' (localhost), and a second CA."""
    out = tmp_path_factory.mktemp("certs")
    for where, servers in (
        (out, ["central=localhost,127.0.0.1", "site=localhost"]),
        (out / "other", ["stranger=127.0.0.1"]),
    ):
        flags = [arg for server in servers for arg in ("--server", server)]
        subprocess.run(
            [sys.executable, "scripts/make-certs.py", "--out", str(where), *flags],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            timeout=scaled(60),
        )
    return out


async def handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> bytes:
    """Serve one greeting over TLS on 127.0.0.1 and read it as a client dialling `host`."""

    async def greet(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(scaled(5)):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname=host
            )
            try:
                return await reader.read()
            finally:
                writer.close()
    finally:
        listener.close()


async def test_a_client_with_the_ca_talks_to_the_server_by_address_or_name(certs: Path) -> None:
    server = server_context(str(certs / "central.crt"), str(certs / "central.key"))
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    client = client_context(str(certs / "ca.crt"))
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert await handshake(server, client, "127.0.0.1") == b"hello"
    assert await handshake(server, client, "localhost") == b"hello"
    # The server's own certificate works as the trusted one too (the images' health checks).
    pinned = client_context(str(certs / "central.crt"))
    assert await handshake(server, pinned, "127.0.0.1") == b"hello"


@pytest.mark.parametrize(
    ("ca", "host", "why"),
    [
        ("other/ca.crt", "127.0.0.1", "unable to get local issuer certificate"),
        ("ca.crt", "127.0.0.2", "IP address mismatch"),
        ("ca.crt", "central.example", "Hostname mismatch"),
    ],
)
async def test_a_wrong_ca_or_name_fails_the_handshake_with_a_clear_reason(
    certs: Path, ca: str, host: str, why: str
) -> None:
    server = server_context(str(certs / "central.crt"), str(certs / "central.key"))
    with pytest.raises(ssl.SSLCertVerificationError) as failure:
        await handshake(server, client_context(str(certs / ca)), host)
    reason = describe_failure(failure.value)
    assert reason is not None and reason.startswith("TLS: certificate verify failed: ")
    assert why in reason
    assert describe_failure(ConnectionRefusedError()) is None


def test_the_system_cas_verify_when_no_ca_is_given() -> None:
    context = client_context(None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_bad_files_are_one_clear_config_error(certs: Path, tmp_path: Path) -> None:
    crt, key = str(certs / "central.crt"), str(certs / "central.key")
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello\n")
    locked = tmp_path / "locked.key"
    private = serialization.load_pem_private_key((certs / "central.key").read_bytes(), None)
    locked.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cases = [
        ((str(tmp_path / "missing.crt"), key), "missing.crt: no such file"),
        ((str(tmp_path), key), "is a directory"),
        ((str(not_pem), key), "not a PEM file"),
        ((key, key), "holds no certificate"),
        ((crt, crt), "holds no private key"),
        ((crt, str(locked)), "is encrypted"),
        ((crt, str(certs / "site.key")), "is not the key of certificate"),
    ]
    for (cert_path, key_path), message in cases:
        with pytest.raises(ConfigError, match=message):
            server_context(cert_path, key_path)
    with pytest.raises(ConfigError, match="CA file .*missing.crt: no such file"):
        client_context(str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match="holds no certificate"):
        client_context(key)


def test_a_certificate_without_its_key_is_refused_and_empty_means_off(certs: Path) -> None:
    crt, key = str(certs / "central.crt"), str(certs / "central.key")
    assert optional_server_context(None, None) is None
    assert optional_server_context("", "") is None
    assert optional_server_context(crt, key) is not None
    with pytest.raises(ConfigError, match="--tls-cert needs --tls-key too"):
        optional_server_context(crt, None)
    with pytest.raises(ConfigError, match="--tls-key needs --tls-cert too"):
        optional_server_context("", key)


def test_the_services_settings_read_tls_from_flags_or_environment(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crt, key = str(certs / "central.crt"), str(certs / "central.key")
    for name in ("EV_TLS_CERT", "EV_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    central = central_config.parse(["--broker", "k:9092", "--tls-cert", crt, "--tls-key", key])
    assert (central.tls_cert, central.tls_key) == (crt, key)
    with pytest.raises(ConfigError, match="--tls-cert needs --tls-key"):
        central_config.parse(["--broker", "k:9092", "--tls-cert", crt])
    # Compose passes the variables empty while TLS is off.
    off = {"EV_BROKER": "k:9092", "EV_TLS_CERT": "", "EV_TLS_KEY": ""}
    assert driver_config.parse_settings([], environ=off).tls_cert is None
    assert site_config.parse_settings([], environ=off).tls_key is None
    on = {**off, "EV_TLS_CERT": crt, "EV_TLS_KEY": key}
    assert driver_config.parse_settings([], environ=on).tls_cert == crt
    with pytest.raises(ConfigError, match="is not the key of certificate"):
        site_config.parse_settings([], environ={**on, "EV_TLS_KEY": str(certs / "site.key")})
