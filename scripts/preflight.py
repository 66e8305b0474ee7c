#!/usr/bin/env python3
"""Preflight: can this PC reach every part of the EV charging network, and do the clocks agree?

    python scripts/preflight.py [--pc pc1|pc2|pc3] [--env-file .env] [--timeout 3] [--tls-ca CA]
                                [--kafka-user kafka-ui] [--kafka-password-file FILE]

Reads the addresses and ports as network_config.py sees them (the environment, then the .env
that deploy wrote, then its defaults) and checks, one line each with a fix when it fails:
Kafka (a broker of KAFKA_BROKERS answers, and the addresses it advertises in its metadata are
reachable from here; how many of the brokers answer, a majority being the quorum; the copies
of every topic's partitions and whether they are in sync), Central (monitors' TCP port and
/healthz; with a standby on PC1, which of the two is active), the clock (against the Date of
Central's answer), the dashboards and Kafka UI. `--pc` names the PC this runs on: its address is
then checked to be one of this machine's. A web server whose certificate is set in the settings
(CENTRAL_TLS_CERT, DRIVER_TLS_CERT, SITE_TLS_CERT: TLS on, docs/tls.md) is checked over https,
its certificate verified against `--tls-ca` (the deployment's ca.crt; the system's CAs without
it). A secured Kafka (SECURE=1, the deployment's default) is asked over TLS, verified with
the same CA (certs/ca.crt when --tls-ca is not given), after logging in (SCRAM-SHA-512) as
`kafka-ui`, the read-only login, with secrets/kafka-kafka-ui.password. Exit 0 when nothing
failed (warnings allowed), 1 when something did. Standard library only: any Python 3.11 runs
it, without the project installed.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import hashlib
import hmac
import json
import os
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import network_config  # noqa: E402  (the repository root, found above)

MAX_SKEW_S = 2.0
MAX_KAFKA_FRAME = 1 << 20
OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
# Each web server's certificate setting: set means it serves https only (docs/tls.md).
WEB_TLS = {"central": "CENTRAL_TLS_CERT", "pc1": "DRIVER_TLS_CERT", "pc3": "SITE_TLS_CERT"}
# A secured Kafka's login: the read-only one Kafka UI uses too (it may describe the cluster,
# every topic and group, and read no record), which every PC has (network_config.py --needs).
KAFKA_LOGIN = "kafka-ui"
KAFKA_LOGIN_FIX = (
    "give the password PC2's deploy made (secrets/kafka-kafka-ui.password, "
    "--kafka-password-file) and the CA (--tls-ca certs/ca.crt); for a plain Kafka "
    "(make run), SECURE=0"
)


@dataclass(frozen=True)
class Result:
    status: str
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"[{self.status:<4}] {self.name:<18} {self.detail}"
        return f"{text} -- fix: {self.fix}" if self.fix and self.status != OK else text


# --- settings ---------------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments and blank lines skipped)."""
    values = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def settings(env_file: Path | None, environ: Mapping[str, str]) -> dict[str, str]:
    """What Compose would use: the environment overrides the .env, which overrides defaults."""
    merged = dict(read_env_file(env_file)) if env_file and env_file.exists() else {}
    merged.update({key: environ[key] for key in network_config.DEFAULTS if key in environ})
    return network_config.load(merged)


# --- network primitives -----------------------------------------------------------------------


def tcp_connect(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc.strerror or exc)


def _kafka_string(data: bytes, offset: int) -> tuple[str | None, int]:
    (length,) = struct.unpack_from(">h", data, offset)
    offset += 2
    if length < 0:
        return None, offset
    return data[offset : offset + length].decode(), offset + length


def metadata_request(
    correlation_id: int, client_id: str = "ev-preflight", all_topics: bool = False
) -> bytes:
    """A Kafka Metadata v7 request for no topics (the answer still lists every broker), or
    for every topic."""
    client = client_id.encode()
    header = struct.pack(">hhih", 3, 7, correlation_id, len(client)) + client
    # topics: an empty array, or null for all of them; allow_auto_topic_creation: false
    body = struct.pack(">ib", -1 if all_topics else 0, 0)
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


@dataclass(frozen=True)
class PartitionInfo:
    topic: str
    partition: int
    leader: int  # -1: none (offline)
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass(frozen=True)
class Metadata:
    brokers: list[tuple[int, str, int]]  # (node id, advertised host, port)
    partitions: list[PartitionInfo]


def _int32_array(data: bytes, offset: int) -> tuple[tuple[int, ...], int]:
    (count,) = struct.unpack_from(">i", data, offset)
    offset += 4
    count = max(count, 0)
    return struct.unpack_from(f">{count}i", data, offset), offset + 4 * count


def parse_metadata(payload: bytes, correlation_id: int) -> Metadata:
    """A Metadata v7 response (without its size): the brokers and every topic's partitions."""
    (got,) = struct.unpack_from(">i", payload, 0)
    if got != correlation_id:
        raise ValueError(f"answer to request {got}, expected {correlation_id}")
    offset = 4 + 4  # correlation id, throttle time
    (count,) = struct.unpack_from(">i", payload, offset)
    offset += 4
    brokers = []
    for _ in range(count):
        (node_id,) = struct.unpack_from(">i", payload, offset)
        host, offset = _kafka_string(payload, offset + 4)
        (port,) = struct.unpack_from(">i", payload, offset)
        _rack, offset = _kafka_string(payload, offset + 4)
        brokers.append((node_id, host or "", port))
    _cluster_id, offset = _kafka_string(payload, offset)
    offset += 4  # controller id
    (topics,) = struct.unpack_from(">i", payload, offset)
    offset += 4
    partitions = []
    for _ in range(max(topics, 0)):
        offset += 2  # error code
        name, offset = _kafka_string(payload, offset)
        offset += 1  # is_internal
        (count,) = struct.unpack_from(">i", payload, offset)
        offset += 4
        for _ in range(max(count, 0)):
            _error, index, leader, _epoch = struct.unpack_from(">hiii", payload, offset)
            replicas, offset = _int32_array(payload, offset + 14)
            isr, offset = _int32_array(payload, offset)
            _offline, offset = _int32_array(payload, offset)
            partitions.append(PartitionInfo(name or "", index, leader, replicas, isr))
    return Metadata(brokers, partitions)


def parse_metadata_brokers(payload: bytes, correlation_id: int) -> list[tuple[int, str, int]]:
    """(node id, host, port) of every broker in a Metadata v7 response (without its size)."""
    return parse_metadata(payload, correlation_id).brokers


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return bytes(data)


@dataclass(frozen=True)
class KafkaLogin:
    """A secured broker's login (docs/security.md, "Kafka"): TLS verified by `tls`, then
    SCRAM-SHA-512 as `user`."""

    user: str
    password: str
    tls: ssl.SSLContext


class KafkaLoginRefused(OSError):
    """The broker refused the login (a wrong password or an unknown user)."""


def _request(api_key: int, version: int, correlation_id: int, body: bytes) -> bytes:
    """A Kafka request with a v1 header (the non-flexible versions used here)."""
    client = b"ev-preflight"
    header = struct.pack(">hhih", api_key, version, correlation_id, len(client)) + client
    return struct.pack(">i", len(header) + len(body)) + header + body


def _answer(sock: socket.socket, correlation_id: int) -> bytes:
    """The body of the answer to request `correlation_id` (after its correlation id)."""
    (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
    if not 0 < size <= MAX_KAFKA_FRAME:
        raise ValueError(f"implausible answer size {size}: is this a Kafka broker?")
    payload = _recv_exactly(sock, size)
    (got,) = struct.unpack_from(">i", payload, 0)
    if got != correlation_id:
        raise ValueError(f"answer to request {got}, expected {correlation_id}")
    return payload[4:]


def _sasl_step(sock: socket.socket, correlation_id: int, message: bytes) -> bytes:
    """One SaslAuthenticate v0 round: our bytes out, the broker's back."""
    sock.sendall(_request(36, 0, correlation_id, struct.pack(">i", len(message)) + message))
    body = _answer(sock, correlation_id)
    (error,) = struct.unpack_from(">h", body, 0)
    text, offset = _kafka_string(body, 2)
    if error:
        raise KafkaLoginRefused(f"the broker refused the login: {text or f'error {error}'}")
    (length,) = struct.unpack_from(">i", body, offset)
    return body[offset + 4 : offset + 4 + max(length, 0)]


def scram_login(sock: socket.socket, login: KafkaLogin, correlation_id: int) -> None:
    """SCRAM-SHA-512 (RFC 5802, as Kafka speaks it) on a connected socket; raises
    KafkaLoginRefused when the broker says no, ValueError when its answer is not SCRAM."""
    mechanism = b"SCRAM-SHA-512"
    sock.sendall(_request(17, 1, correlation_id, struct.pack(">h", len(mechanism)) + mechanism))
    (error,) = struct.unpack_from(">h", _answer(sock, correlation_id), 0)
    if error:
        raise KafkaLoginRefused(f"the broker does not offer {mechanism.decode()} (error {error})")
    name = login.user.replace("=", "=3D").replace(",", "=2C")
    nonce = base64.b64encode(os.urandom(24)).decode()
    first_bare = f"n={name},r={nonce}"
    server_first = _sasl_step(sock, correlation_id + 1, f"n,,{first_bare}".encode()).decode()
    fields = dict(part.split("=", 1) for part in server_first.split(","))
    if not fields.get("r", "").startswith(nonce) or "s" not in fields or "i" not in fields:
        raise ValueError(f"not a SCRAM answer: {server_first[:80]!r}")
    salted = hashlib.pbkdf2_hmac(
        "sha512", login.password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha512")
    final_bare = f"c=biws,r={fields['r']}"
    auth = f"{first_bare},{server_first},{final_bare}".encode()
    signature = hmac.digest(hashlib.sha512(client_key).digest(), auth, "sha512")
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    server_final = _sasl_step(sock, correlation_id + 2, f"{final_bare},p={proof.decode()}".encode())
    expected = hmac.digest(hmac.digest(salted, b"Server Key", "sha512"), auth, "sha512")
    if server_final.decode() != "v=" + base64.b64encode(expected).decode():
        raise ValueError("the broker's SCRAM answer does not prove it knows the login")


def kafka_metadata(
    host: str,
    port: int,
    timeout: float,
    all_topics: bool = False,
    login: KafkaLogin | None = None,
) -> Metadata:
    """What the broker at host:port says about the cluster (and every topic, if asked), over
    TLS with a login when the broker is secured."""
    correlation_id = int(time.time()) & 0x3FFFFFFF
    with socket.create_connection((host, port), timeout=timeout) as plain:
        plain.settimeout(timeout)
        sock = login.tls.wrap_socket(plain, server_hostname=host) if login else plain
        with sock:
            if login:
                scram_login(sock, login, correlation_id)
                correlation_id += 3
            sock.sendall(metadata_request(correlation_id, all_topics=all_topics))
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            if not 0 < size <= MAX_KAFKA_FRAME:
                raise ValueError(f"implausible answer size {size}: is this a Kafka broker?")
            return parse_metadata(_recv_exactly(sock, size), correlation_id)


def kafka_brokers(
    host: str, port: int, timeout: float, login: KafkaLogin | None = None
) -> list[tuple[int, str, int]]:
    """The brokers (and the addresses they advertise) that the bootstrap server reports."""
    return kafka_metadata(host, port, timeout, login=login).brokers


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes
    date: str | None
    sent_at: float
    received_at: float


def http_get(url: str, timeout: float, tls: ssl.SSLContext | None = None) -> HttpAnswer:
    """GET `url` (https verified with `tls`); an HTTP error status is an answer too.

    Raises OSError when unreachable, or when the TLS handshake or the certificate fails.
    """
    sent_at = time.time()
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=tls) as answer:
            body = answer.read(64 * 1024)
            return HttpAnswer(answer.status, body, answer.headers.get("Date"), sent_at, time.time())
    except urllib.error.HTTPError as exc:
        body = exc.read(64 * 1024)
        return HttpAnswer(exc.code, body, exc.headers.get("Date"), sent_at, time.time())
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise OSError(getattr(reason, "strerror", None) or str(reason)) from None


def clock_skew(answer: HttpAnswer) -> float | None:
    """Seconds this clock is ahead of the server's, from its Date header (None without one).

    Date has whole seconds: the server's time was in [Date, Date + 1), compared with the middle
    of the request as seen here.
    """
    if not answer.date:
        return None
    server = email.utils.parsedate_to_datetime(answer.date).timestamp() + 0.5
    local = (answer.sent_at + answer.received_at) / 2
    return local - server


# --- the checks -------------------------------------------------------------------------------


class Preflight:
    def __init__(
        self,
        config: Mapping[str, str],
        pc: str | None,
        timeout: float,
        tls_ca: str | None = None,
        kafka_login: tuple[str, str] | None = None,
    ) -> None:
        self.config = config
        self.pc = pc
        self.timeout = timeout
        self.tls_ca = tls_ca
        # Raises OSError (ssl.SSLError) when the CA file is missing or holds no certificate.
        self.tls = ssl.create_default_context(cafile=tls_ca)
        # A secured Kafka (SECURE=1): TLS with the same CA, and a login (user, password).
        self.kafka_login = (
            KafkaLogin(kafka_login[0], kafka_login[1], self.tls) if kafka_login else None
        )
        self.pc2 = config["PC2_IP"]
        self.central_health: HttpAnswer | None = None
        self.kafka_reachable = False
        # The brokers clients bootstrap from (each once: on one machine they are one).
        self.brokers = list(dict.fromkeys(config["KAFKA_BROKERS"].split(",")))
        self.bootstrap = self.brokers[0]

    def checks(self) -> list[Callable[[], Result]]:
        checks: list[Callable[[], Result]] = []
        if self.pc:
            checks.append(self.this_pc)
        if self.tls_ca or any(self.config.get(key) for key in WEB_TLS.values()):
            checks.append(self.tls_settings)
        checks += [
            self.loopback,
            self.kafka_bootstrap,
            self.kafka_advertised,
            self.kafka_quorum,
            self.kafka_replication,
            self.central_monitors,
            self.central_health_check,
            self.central_active,
            self.clock,
            self.driver_dashboard,
            self.site_dashboard,
            self.kafka_ui,
            self.registry,
        ]
        return checks

    def run(self, out: Callable[[str], None] = print) -> int:
        failed = 0
        for check in self.checks():
            try:
                result = check()
            except Exception as exc:  # one check's surprise must not hide the others
                result = Result(FAIL, check.__name__, f"{type(exc).__name__}: {exc}")
            out(result.line())
            failed += result.status == FAIL
        out(f"preflight: {failed} check(s) failed" if failed else "preflight: all checks passed")
        return 1 if failed else 0

    def this_pc(self) -> Result:
        assert self.pc is not None
        key = f"{self.pc.upper()}_IP"
        address = self.config[key]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((socket.gethostbyname(address), 0))
        except OSError as exc:
            return Result(
                FAIL,
                "this PC's address",
                f"{key}={address} is not an address of this machine ({exc.strerror or exc})",
                f"set {key} to this PC's LAN address (ipconfig / ip -4 addr) and rewrite .env "
                f"(python network_config.py --env .env)",
            )
        return Result(OK, "this PC's address", f"{key}={address} belongs to this machine")

    def web_url(self, server: str, host: str, port_key: str, path: str) -> str:
        scheme = "https" if self.config.get(WEB_TLS[server]) else "http"
        return f"{scheme}://{host}:{self.config[port_key]}{path}"

    def tls_fix(self, error: str, server: str, host: str, fix: str) -> str:
        """The fix for a web server that failed with `error`: TLS advice when TLS is the cause."""
        key = WEB_TLS[server]
        if self.config.get(key) and ("SSL" in error or "certificate" in error):
            trusted = self.tls_ca or "the system's CAs (give --tls-ca certs/ca.crt)"
            return (
                f"its certificate must be signed by {trusted} and name {host}; "
                f"if it has no TLS, leave {key} empty (docs/tls.md)"
            )
        if not self.config.get(key) and "closed" in error:
            return f"if it has TLS on, set {key} as deploy does and give --tls-ca; else {fix}"
        return fix

    def tls_settings(self) -> Result:
        https = [f"{server} ({key})" for server, key in WEB_TLS.items() if self.config.get(key)]
        if not https:
            return Result(
                WARN,
                "tls",
                f"--tls-ca given, but no web server has TLS in the settings "
                f"({', '.join(WEB_TLS.values())} are empty): checking over http",
                "set the certificates in .env as deploy does (docs/tls.md), or drop --tls-ca",
            )
        trusted = self.tls_ca or "the system's CAs"
        return Result(OK, "tls", f"https for {', '.join(https)}, verified with {trusted}")

    def loopback(self) -> Result:
        if self.pc2.startswith("127.") or self.pc2 == "localhost":
            return Result(
                WARN,
                "addresses",
                f"PC2_IP={self.pc2} only works when every part runs on this one machine",
                "for several PCs set PC1_IP, PC2_IP, PC3_IP to their LAN addresses",
            )
        return Result(OK, "addresses", f"PC2 (Kafka, Central) is {self.pc2}")

    def kafka_bootstrap(self) -> Result:
        # Like a client: the first broker of the list that accepts a connection will do.
        errors = []
        for address in self.brokers:
            error = tcp_connect(*host_port(address), self.timeout)
            if error is None:
                self.kafka_reachable = True
                self.bootstrap = address
                return Result(OK, "kafka bootstrap", f"{address} accepts connections")
            errors.append(f"{address}: {error}")
        return Result(
            FAIL,
            "kafka bootstrap",
            f"cannot connect to {'; '.join(errors)}",
            "start PC2 (scripts/deploy.sh pc2 up; with three PCs the Kafka node of each), open "
            "its firewall (scripts/firewall.sh pc2 or firewall.ps1 -Pc pc2), check PC2_IP",
        )

    def kafka_advertised(self) -> Result:
        if not self.kafka_reachable:
            return Result(SKIP, "kafka advertised", "not checked: the bootstrap does not answer")
        try:
            brokers = kafka_brokers(*host_port(self.bootstrap), self.timeout, self.kafka_login)
        except KafkaLoginRefused as exc:
            return Result(FAIL, "kafka advertised", str(exc), KAFKA_LOGIN_FIX)
        except (OSError, ValueError, struct.error) as exc:
            return Result(
                FAIL,
                "kafka advertised",
                f"{self.bootstrap} gave no broker metadata: {exc}",
                "is Kafka (not another program) on that port? see scripts/deploy.sh pc2 logs kafka",
            )
        if not brokers:
            return Result(FAIL, "kafka advertised", "the broker listed no brokers", "restart Kafka")
        unreachable = []
        for _node, host, broker_port in brokers:
            error = tcp_connect(host, broker_port, self.timeout)
            if error:
                unreachable.append(f"{host}:{broker_port} ({error})")
        advertised = ", ".join(f"{host}:{p}" for _n, host, p in brokers)
        if unreachable:
            return Result(
                FAIL,
                "kafka advertised",
                f"Kafka tells clients to use {advertised}; this PC cannot reach "
                + ", ".join(unreachable),
                "the advertised listener comes from PC2_IP in PC2's .env: set PC2_IP to PC2's "
                "LAN address there and restart PC2 (scripts/deploy.sh pc2 up)",
            )
        return Result(OK, "kafka advertised", f"clients are sent to {advertised}: reachable")

    def kafka_quorum(self) -> Result:
        """How many of the brokers answer a metadata request: a majority keeps the KRaft
        quorum (two of three), so the cluster carries on without the others."""
        answered: dict[str, set[int]] = {}
        silent = []
        for address in self.brokers:
            try:
                metadata = kafka_metadata(*host_port(address), self.timeout, login=self.kafka_login)
            except (OSError, ValueError, struct.error) as exc:
                silent.append(f"{address} ({exc})")
                continue
            answered[address] = {node for node, _host, _port in metadata.brokers}
        total = len(self.brokers)
        nodes = sorted(set().union(*answered.values())) if answered else []
        detail = (
            f"{len(answered)} of {total} broker{'s' if total > 1 else ''} answer"
            + (f" (registered nodes: {', '.join(map(str, nodes))})" if nodes else "")
            + (f"; no answer from {', '.join(silent)}" if silent else "")
        )
        if len(answered) == total:
            return Result(OK, "kafka quorum", detail)
        if total > 1 and len(answered) > total // 2:
            return Result(
                WARN,
                "kafka quorum",
                detail + ": a majority still holds the quorum, one more lost node stops Kafka",
                "start the silent node's PC (scripts/deploy.sh pcN up), or open its firewall "
                "for KAFKA_PORT and KAFKA_CONTROLLER_PORT",
            )
        return Result(
            FAIL,
            "kafka quorum",
            detail + (": no majority, Kafka answers nothing" if total > 1 else ""),
            "start the Kafka nodes (scripts/deploy.sh pc1|pc2|pc3 up on their PCs): "
            "a majority of them must run",
        )

    def kafka_replication(self) -> Result:
        """Every partition's copies: offline (no leader), under-replicated (fewer in sync than
        copies), or a single copy on a cluster of several brokers."""
        if not self.kafka_reachable:
            return Result(SKIP, "kafka replication", "not checked: the bootstrap does not answer")
        try:
            metadata = kafka_metadata(
                *host_port(self.bootstrap), self.timeout, all_topics=True, login=self.kafka_login
            )
        except (OSError, ValueError, struct.error) as exc:
            return Result(
                FAIL, "kafka replication", f"{self.bootstrap} gave no topic metadata: {exc}"
            )
        partitions = metadata.partitions
        if not partitions:
            return Result(
                WARN,
                "kafka replication",
                "no topics yet",
                "the services create them at start (Docker: kafka-init)",
            )

        def named(found: list[PartitionInfo]) -> str:
            topics = sorted({p.topic for p in found})
            return ", ".join(topics[:4]) + (
                f" and {len(topics) - 4} more" if len(topics) > 4 else ""
            )

        offline = [p for p in partitions if p.leader < 0]
        under = [p for p in partitions if len(p.isr) < len(p.replicas)]
        single = (
            [p for p in partitions if len(p.replicas) < 3] if len(metadata.brokers) >= 3 else []
        )
        copies = sorted({len(p.replicas) for p in partitions})
        summary = (
            f"{len(partitions)} partitions of {len({p.topic for p in partitions})} topics, "
            f"{'/'.join(map(str, copies))} cop{'y' if copies == [1] else 'ies'} each"
        )
        if offline:
            return Result(
                FAIL,
                "kafka replication",
                f"{summary}; {len(offline)} have no leader (offline): {named(offline)}",
                "start the Kafka nodes that hold them (kafka quorum above)",
            )
        if under:
            return Result(
                WARN,
                "kafka replication",
                f"{summary}; {len(under)} under-replicated (fewer in sync than copies): "
                f"{named(under)}",
                "a node is down or behind: start it again; they catch up by themselves",
            )
        if single:
            return Result(
                WARN,
                "kafka replication",
                f"{summary}; {len(single)} with fewer than 3 copies on a cluster of "
                f"{len(metadata.brokers)}: {named(single)} (created before every node was up)",
                "give them three copies (kafka-reassign-partitions.sh; docs/deployment.md)",
            )
        return Result(OK, "kafka replication", f"{summary}, all in sync")

    def central_monitors(self) -> Result:
        port = int(self.config["CENTRAL_PORT"])
        error = tcp_connect(self.pc2, port, self.timeout)
        if error:
            return Result(
                FAIL,
                "central monitors",
                f"cannot connect to {self.pc2}:{port}: {error}",
                "start PC2 (scripts/deploy.sh pc2 up), open its firewall for CENTRAL_PORT",
            )
        return Result(OK, "central monitors", f"{self.pc2}:{port} accepts connections")

    def central_health_check(self) -> Result:
        url = self.web_url("central", self.pc2, "CENTRAL_HTTP_PORT", "/healthz")
        try:
            answer = http_get(url, self.timeout, self.tls)
        except OSError as exc:
            return Result(
                FAIL,
                "central /healthz",
                f"{url} did not answer: {exc}",
                self.tls_fix(
                    str(exc),
                    "central",
                    self.pc2,
                    "start PC2 (scripts/deploy.sh pc2 up), open its firewall for CENTRAL_HTTP_PORT",
                ),
            )
        self.central_health = answer
        if answer.status != 200:
            try:
                body = json.loads(answer.body)
            except ValueError:
                body = {}
            down = [part for part in ("broker", "database") if body.get(part) is False]
            return Result(
                FAIL,
                "central /healthz",
                f"{url} answered {answer.status}"
                + (f": Central cannot reach its {' and '.join(down)}" if down else ""),
                "see Central's log (scripts/deploy.sh pc2 logs central)",
            )
        return Result(OK, "central /healthz", f"{url} answered 200")

    def central_active(self) -> Result:
        """Which Central is active: PC2's and PC1's /healthz say their role (one machine: one
        Central, which says "single" without --ha)."""
        urls = {
            pc: self.web_url(
                "central", self.config[f"{pc.upper()}_IP"], "CENTRAL_HTTP_PORT", "/healthz"
            )
            for pc in network_config.CENTRAL_PCS
        }
        roles: dict[str, str] = {}
        for pc, url in urls.items():
            if url in (urls[other] for other in roles):
                continue  # the same Central as the PC before
            answer = self.central_health if pc == "pc2" else None
            if answer is None:
                try:
                    answer = http_get(url, self.timeout, self.tls)
                except OSError as exc:
                    roles[pc] = f"does not answer ({exc})"
                    continue
            try:
                body = json.loads(answer.body)
            except ValueError:
                body = {}
            role = body.get("role") if isinstance(body, dict) else None
            roles[pc] = str(role) if role else f"answered {answer.status} without a role"
        said = "; ".join(f"{pc.upper()} {role}" for pc, role in roles.items())
        active = [pc for pc, role in roles.items() if role in ("active", "single")]
        if len(roles) == 1:
            if not active:  # the one Central is down: central /healthz has said so
                return Result(SKIP, "central active", f"not checked: {said}")
            return Result(OK, "central active", f"one Central: {said}")
        if len(active) == 1 and all(r in ("active", "standby") for r in roles.values()):
            note = "" if active == ["pc2"] else " (it took over; it stays active while it runs)"
            return Result(OK, "central active", f"{said}{note}")
        if len(active) == 1:
            return Result(
                WARN,
                "central active",
                f"{said}: no standby to take over",
                "start the other Central (scripts/deploy.sh pc1 up or pc2 up) and check its log",
            )
        return Result(
            FAIL,
            "central active",
            f"{said}: " + ("no Central is active" if not active else "more than one is active"),
            "a standby takes over within seconds: run this again; if it stays so, see "
            "scripts/deploy.sh pc2 logs central and pc1 logs central",
        )

    def clock(self) -> Result:
        answer = self.central_health
        if answer is not None and answer.date is None:
            # Central's JSON answers may carry no Date; its WebSocket endpoint's refusal of a
            # plain GET (the websockets library's own answer) always does.
            url = self.web_url("central", self.pc2, "CENTRAL_HTTP_PORT", "/ws")
            try:
                answer = http_get(url, self.timeout, self.tls)
            except OSError:
                answer = None
        if answer is None:
            return Result(SKIP, "clock", "not compared: Central does not answer")
        skew = clock_skew(answer)
        if skew is None:
            return Result(WARN, "clock", "not compared: Central's answer has no Date header")
        if abs(skew) > MAX_SKEW_S:
            return Result(
                WARN,
                "clock",
                f"this clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} "
                f"Central's (more than {MAX_SKEW_S:.0f} s): times and timeouts will look wrong",
                "synchronise the clocks (Windows: w32tm /resync; Linux: timedatectl set-ntp true)",
            )
        return Result(OK, "clock", f"within {MAX_SKEW_S:.0f} s of Central's ({skew:+.1f} s)")

    def _dashboard(self, name: str, pc: str, port_key: str, required: bool) -> Result:
        host = self.config[f"{pc.upper()}_IP"]
        url = self.web_url(pc, host, port_key, "/healthz")
        fix = f"start {pc} (scripts/deploy.sh {pc} up) and open its firewall for {port_key}"
        try:
            answer = http_get(url, self.timeout, self.tls)
        except OSError as exc:
            return Result(
                FAIL if required else WARN,
                name,
                f"{url} did not answer: {exc}",
                self.tls_fix(str(exc), pc, host, fix),
            )
        if answer.status != 200:
            return Result(
                FAIL if required else WARN,
                name,
                f"{url} answered {answer.status}: it cannot reach Kafka",
                f"see its log (scripts/deploy.sh {pc} logs)",
            )
        return Result(OK, name, f"{url} answered 200")

    def driver_dashboard(self) -> Result:
        return self._dashboard("driver dashboard", "pc1", "DRIVER_HTTP_PORT", required=True)

    def site_dashboard(self) -> Result:
        return self._dashboard("site dashboard", "pc3", "MONITOR_HTTP_PORT", required=True)

    def kafka_ui(self) -> Result:
        # Kafka UI runs only in the Docker deployment (not with `make run`): a warning at most.
        url = f"http://{self.pc2}:{self.config['KAFKA_UI_PORT']}/"
        try:
            answer = http_get(url, self.timeout)
        except OSError as exc:
            return Result(
                WARN,
                "kafka ui",
                f"{url} did not answer: {exc}",
                "only the Docker deployment runs it: scripts/deploy.sh pc2 status",
            )
        status = OK if answer.status < 400 else WARN
        return Result(status, "kafka ui", f"{url} answered {answer.status}")

    def registry(self) -> Result:
        # EV_Registry (HTTPS only) runs when it is asked for (the compose profile `registry`,
        # docs/registry.md): a warning at most.
        url = f"https://{self.pc2}:{self.config['REGISTRY_PORT']}/healthz"
        try:
            answer = http_get(url, self.timeout, self.tls)
        except OSError as exc:
            return Result(
                WARN,
                "registry",
                f"{url} did not answer: {exc}",
                "start it (COMPOSE_PROFILES=registry scripts/deploy.sh pc2 up), open PC2's "
                "firewall for REGISTRY_PORT, and give --tls-ca certs/ca.crt (docs/registry.md)",
            )
        status = OK if answer.status == 200 else WARN
        return Result(status, "registry", f"{url} answered {answer.status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pc", choices=network_config.PCS, help="the PC this runs on")
    parser.add_argument(
        "--env-file",
        type=Path,
        default=REPO_ROOT / ".env",
        help="the .env deploy wrote (default: .env at the repository root, if any)",
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per connection")
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("EV_TLS_CA") or None,
        help="the CA file (certs/ca.crt) that verifies the web servers with TLS on [env EV_TLS_CA]",
    )
    parser.add_argument(
        "--kafka-password-file",
        type=Path,
        default=REPO_ROOT / "secrets" / f"kafka-{KAFKA_LOGIN}.password",
        help=f"with a secured Kafka (SECURE=1): the password of the {KAFKA_LOGIN} login",
    )
    parser.add_argument("--kafka-user", default=KAFKA_LOGIN, help="that login's name")
    args = parser.parse_args(argv)
    try:
        config = settings(args.env_file, os.environ)
    except ValueError as exc:
        print(Result(FAIL, "configuration", str(exc), "fix network_config.py or .env").line())
        return 1
    login = None
    if config.get("KAFKA_SECURE"):
        default_ca = REPO_ROOT / "certs" / "ca.crt"
        if args.tls_ca is None and default_ca.is_file():
            args.tls_ca = str(default_ca)
        try:
            password = args.kafka_password_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError) as exc:
            detail = f"no password in {args.kafka_password_file}: {exc}"
            print(Result(FAIL, "kafka login", detail, KAFKA_LOGIN_FIX).line())
            return 1
        login = (args.kafka_user, password.strip())
    try:
        preflight = Preflight(config, args.pc, args.timeout, args.tls_ca, login)
    except OSError as exc:
        print(
            Result(
                FAIL,
                "tls ca",
                f"cannot use {args.tls_ca} as a CA: {exc.strerror or exc}",
                "give the ca.crt that scripts/make-certs.py wrote (docs/tls.md)",
            ).line()
        )
        return 1
    return preflight.run()


if __name__ == "__main__":
    sys.exit(main())
