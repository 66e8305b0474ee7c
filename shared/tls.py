"""TLS for Central's :5000 and the three web servers: contexts from PEM files, clear errors.

Servers turn TLS on with a certificate and its key (`server_context`); clients verify the
server's certificate chain and host name against a CA file (`client_context`). A file that is
missing, unreadable, not PEM, encrypted or not the key of its certificate is a ConfigError
with one line that names the file, so a service exits 2 with it instead of a traceback.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from shared.errors import ConfigError
from shared.settings import EnvArgumentParser

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# A PEM file bigger than this is no certificate or key of ours (a chain of a few certs is ~5 kB).
MAX_PEM_BYTES = 1 << 20
# A client that opens a TCP connection and never starts the handshake is dropped after this.
HANDSHAKE_TIMEOUT = 10.0


def read_pem(path: str, what: str) -> str:
    """The text of PEM file `path`, or ConfigError saying what is wrong with it.

    `what` names the file's role in the message ("TLS certificate", "TLS key", "CA file").
    """
    file = Path(path)
    try:
        if file.stat().st_size > MAX_PEM_BYTES:
            raise ConfigError(f"{what} {path}: larger than {MAX_PEM_BYTES} bytes, not a PEM file")
        text = file.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{what} {path}: permission denied (cannot read it)") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if "-----BEGIN " not in text:
        raise ConfigError(f"{what} {path}: not a PEM file (no -----BEGIN line)")
    return text


def _check_certificate(path: str, what: str) -> None:
    if "-----BEGIN CERTIFICATE-----" not in read_pem(path, what):
        raise ConfigError(f"{what} {path}: holds no certificate (no BEGIN CERTIFICATE)")


def _check_key(path: str) -> None:
    text = read_pem(path, "TLS key")
    if "ENCRYPTED" in text:
        raise ConfigError(f"TLS key {path}: is encrypted; give the service an unencrypted key")
    if "PRIVATE KEY-----" not in text:
        raise ConfigError(f"TLS key {path}: holds no private key (no BEGIN ... PRIVATE KEY)")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side context (TLS 1.2 or newer) presenting `cert` (PEM, chain allowed) with `key`.

    Raises ConfigError when a file is missing, unreadable, not PEM, or the key does not match.
    """
    _check_certificate(cert, "TLS certificate")
    _check_key(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"TLS key {key} is not the key of certificate {cert}") from None
        raise ConfigError(
            f"TLS certificate {cert} or key {key} is not valid ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"TLS certificate {cert} or key {key}: {exc.strerror or exc}") from None
    return context


def client_context(ca: str | None) -> ssl.SSLContext:
    """A client-side context that verifies the server's certificate and host name.

    Trusts only the certificates of PEM file `ca` (a CA, or a server's own certificate,
    which then is pinned), or the system's CAs when `ca` is None. TLS 1.2 or newer.
    """
    if ca is not None:
        _check_certificate(ca, "CA file")
    try:
        context = ssl.create_default_context(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"CA file {ca}: not a valid certificate ({exc.reason or exc})") from None
    context.minimum_version = MINIMUM_VERSION
    # As newer Pythons do by default: a trusted certificate need not be a self-signed root
    # (pinning a server's own certificate works), and certificates must be well formed.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    return context


def optional_server_context(
    cert: str | None, key: str | None, *, cert_flag: str = "--tls-cert", key_flag: str = "--tls-key"
) -> ssl.SSLContext | None:
    """The server context of a service whose flags `cert_flag` and `key_flag` may be unset.

    Both unset (or empty): None, TLS stays off. Both set: server_context. One alone:
    ConfigError, because a half-configured TLS must not silently serve plain text.
    """
    if not cert and not key:
        return None
    if not cert or not key:
        given, missing = (cert_flag, key_flag) if cert else (key_flag, cert_flag)
        raise ConfigError(f"{given} needs {missing} too (TLS takes a certificate and its key)")
    return server_context(cert, key)


def add_server_options(parser: EnvArgumentParser, serves: str) -> None:
    """--tls-cert and --tls-key (EV_TLS_CERT, EV_TLS_KEY) of a server; `serves` says what."""
    parser.add_option(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help=f"certificate (chain) to serve {serves} over TLS, with --tls-key (docs/tls.md)",
    )
    parser.add_option(
        "--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert"
    )


def describe_failure(exc: BaseException) -> str | None:
    """'TLS: certificate verify failed: ...' for a failed handshake; None for other errors."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or "rejected"
        return f"TLS: certificate verify failed: {detail}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        return f"TLS: {reason.replace('_', ' ').lower()}"
    return None
