"""Who may do what on a secured Kafka: logins (SCRAM) and the ACLs of each principal.

A secured broker (scripts/kafka.sh with EV_KAFKA_SECURE_DIR, docs/security.md "Kafka") takes
clients over TLS with a SCRAM-SHA-512 login and lets a principal do only what an ACL grants.
This module is the one place that says what each role of the network needs (`ROLE_GRANTS`):
an engine writes `ev.cp.events` and reads `ev.cp.commands`, nothing else; only Central (and
the admin principal) creates topics.

aiokafka's admin client has no request for SCRAM credentials, and its ACL requests are the
versions Kafka 4 no longer serves, so the three requests needed are declared here on aiokafka's
own protocol types (flexible versions: AlterUserScramCredentials v0, CreateAcls v3, DeleteAcls
v3) and sent through its admin client's connection.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from shared.errors import EVError

MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192  # Kafka's own tools use 4096 by default; at least 4096 is required
_SCRAM_SHA_512 = 2  # the mechanism's number in AlterUserScramCredentials


class AccessError(EVError):
    """The broker refused to change a login or an ACL."""


@dataclass(frozen=True)
class KafkaLogin:
    """How a client logs in to a secured broker: TLS verified with `ca_file`, then SCRAM."""

    username: str
    password: str
    ca_file: str

    @classmethod
    def from_files(cls, username: str, password_file: str, ca_file: str) -> KafkaLogin:
        password = Path(password_file).read_text(encoding="utf-8").strip()
        if not password:
            raise EVError(f"{password_file} is empty: it must hold the Kafka password")
        if not Path(ca_file).is_file():
            raise EVError(f"{ca_file}: no such CA certificate file")
        return cls(username, password, ca_file)

    def client_options(self) -> dict[str, Any]:
        """The aiokafka options of a producer, consumer or admin client that logs in."""
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": MECHANISM,
            "sasl_plain_username": self.username,
            "sasl_plain_password": self.password,
            "ssl_context": ssl.create_default_context(cafile=self.ca_file),
        }


# --- what each role may do ------------------------------------------------------------------


class Resource(IntEnum):
    ANY = 1  # in a filter
    TOPIC = 2
    GROUP = 3
    CLUSTER = 4
    TRANSACTIONAL_ID = 5


class Pattern(IntEnum):
    ANY = 1
    LITERAL = 3
    PREFIXED = 4


class Operation(IntEnum):
    ANY = 1
    ALL = 2
    READ = 3
    WRITE = 4
    CREATE = 5
    DELETE = 6
    ALTER = 7
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10
    ALTER_CONFIGS = 11
    IDEMPOTENT_WRITE = 12


_ANY_PERMISSION = 1
_ALLOW = 3


@dataclass(frozen=True)
class Grant:
    """One ACL: `operation` on a resource, by name or by name prefix."""

    resource: Resource
    name: str
    operation: Operation
    pattern: Pattern = Pattern.LITERAL


def _topics(operation: Operation, *names: str) -> list[Grant]:
    return [Grant(Resource.TOPIC, name, operation) for name in names]


def _groups(prefix: str) -> list[Grant]:
    return [Grant(Resource.GROUP, prefix, Operation.READ, Pattern.PREFIXED)]


# Every client measures its clock against the brokers' by writing to ev.clock (shared/clock.py).
_CLOCK = _topics(Operation.WRITE, "ev.clock")

ROLE_GRANTS: dict[str, list[Grant]] = {
    # Central owns the topics: it creates them (deleting one is the admin's alone), reads and
    # writes them all, runs its lease group and its transactions (docs/high-availability.md),
    # and manages the CPs' logins (ALTER on the cluster).
    "central": [
        *[
            Grant(Resource.TOPIC, "ev.", operation, Pattern.PREFIXED)
            for operation in (
                Operation.READ,
                Operation.WRITE,
                Operation.CREATE,
                Operation.DESCRIBE,
                Operation.DESCRIBE_CONFIGS,
                Operation.ALTER_CONFIGS,  # topics made before are switched (shared/bus.py)
            )
        ],
        Grant(Resource.GROUP, "ev-central", Operation.ALL, Pattern.PREFIXED),
        Grant(Resource.TRANSACTIONAL_ID, "ev-central", Operation.ALL, Pattern.PREFIXED),
        Grant(Resource.CLUSTER, "kafka-cluster", Operation.CREATE),
        Grant(Resource.CLUSTER, "kafka-cluster", Operation.DESCRIBE),
        Grant(Resource.CLUSTER, "kafka-cluster", Operation.ALTER),
        Grant(Resource.CLUSTER, "kafka-cluster", Operation.DESCRIBE_CONFIGS),
    ],
    # A CP's engine: its commands in, its events out.
    "cp": [
        *_topics(Operation.READ, "ev.cp.commands"),
        *_topics(Operation.WRITE, "ev.cp.events"),
        *_topics(Operation.DESCRIBE, "ev.cp.commands", "ev.cp.events"),
        *_CLOCK,
    ],
    # The monitors publish health samples (sealed with the CP's secret: shared/... health).
    "monitor": [*_topics(Operation.WRITE, "ev.cp.health"), *_CLOCK],
    # The driver app and the drivers' dashboard: requests out, updates and CP states in.
    "driver": [
        *_topics(Operation.WRITE, "ev.driver.requests"),
        *_topics(Operation.READ, "ev.driver.updates", "ev.cp.state"),
        *_topics(Operation.DESCRIBE, "ev.driver.requests"),
        *_groups("ev-driver"),
        *_CLOCK,
    ],
    # The site dashboard reads the health samples and the CPs' public state.
    "site": [
        *_topics(Operation.READ, "ev.cp.health", "ev.cp.state"),
        *_groups("site-dashboard"),
        *_CLOCK,
    ],
    # Kafka UI looks, and changes nothing.
    "kafka-ui": [
        Grant(Resource.TOPIC, "ev.", Operation.DESCRIBE, Pattern.PREFIXED),
        Grant(Resource.TOPIC, "ev.", Operation.DESCRIBE_CONFIGS, Pattern.PREFIXED),
        Grant(Resource.GROUP, "*", Operation.DESCRIBE),  # "*": every group
        Grant(Resource.CLUSTER, "kafka-cluster", Operation.DESCRIBE),
        Grant(Resource.CLUSTER, "kafka-cluster", Operation.DESCRIBE_CONFIGS),
    ],
}


def cp_principal(cp_id: str) -> str:
    """The Kafka login of CP `cp_id`'s engine."""
    return f"cp-{cp_id}"


# --- the requests ---------------------------------------------------------------------------


def _array(*fields: tuple[str, Any]) -> CompactArray:
    """A flexible version's array of structs: compact, each with its tagged fields."""
    return CompactArray(*fields, ("tags", TaggedFields))


def _flexible(*fields: tuple[str, Any]) -> Schema:
    return Schema(*fields, ("tags", TaggedFields))


_TEXT = CompactString("utf-8")
# An ACL, or a filter of ACLs (None matches any name, principal or host), as the requests have it.
_ACL = (
    ("resource_type", Int8),
    ("resource_name", _TEXT),
    ("pattern_type", Int8),
    ("principal", _TEXT),
    ("host", _TEXT),
    ("operation", Int8),
    ("permission_type", Int8),
)


class _AlterScramResponse(Response):  # type: ignore[misc]
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = _flexible(
        ("throttle_time_ms", Int32),
        ("results", _array(("user", _TEXT), ("error_code", Int16), ("error_message", _TEXT))),
    )


class _AlterScramStruct(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterScramResponse
    SCHEMA = _flexible(
        ("deletions", _array(("name", _TEXT), ("mechanism", Int8))),
        (
            "upsertions",
            _array(
                ("name", _TEXT),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
            ),
        ),
    )


class _CreateAclsResponse(Response):  # type: ignore[misc]
    API_KEY = 30
    API_VERSION = 3
    SCHEMA = _flexible(
        ("throttle_time_ms", Int32),
        ("results", _array(("error_code", Int16), ("error_message", _TEXT))),
    )


class _CreateAclsStruct(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 30
    API_VERSION = 3
    RESPONSE_TYPE = _CreateAclsResponse
    SCHEMA = _flexible(("creations", _array(*_ACL)))


class _DeleteAclsResponse(Response):  # type: ignore[misc]
    API_KEY = 31
    API_VERSION = 3
    SCHEMA = _flexible(
        ("throttle_time_ms", Int32),
        (
            "filter_results",
            _array(
                ("error_code", Int16),
                ("error_message", _TEXT),
                ("matching_acls", _array(("error_code", Int16), ("error_message", _TEXT), *_ACL)),
            ),
        ),
    )


class _DeleteAclsStruct(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 31
    API_VERSION = 3
    RESPONSE_TYPE = _DeleteAclsResponse
    SCHEMA = _flexible(("filters", _array(*_ACL)))


class _Fixed(Request[Any]):  # type: ignore[misc]
    """One struct, sent as it is (the broker's version range is checked by the caller)."""

    API_KEY = 0  # replaced per instance

    def __init__(self, struct: RequestStruct) -> None:
        self._struct = struct
        self.API_KEY = struct.API_KEY

    def build(self, request_struct_class: type[Any]) -> Any:
        return self._struct

    def prepare(self, versions: dict[int, tuple[int, int]]) -> Any:
        low, high = versions.get(self.API_KEY, (0, -1))
        if not low <= self._struct.API_VERSION <= high:
            raise AccessError(
                f"the broker does not serve request {self.API_KEY} version "
                f"{self._struct.API_VERSION} (Kafka 3.0 or later is needed)"
            )
        return self._struct


def salted_password(password: str, salt: bytes, iterations: int = SCRAM_ITERATIONS) -> bytes:
    """SCRAM's SaltedPassword (RFC 5802): what the broker stores instead of the password."""
    return hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)


class KafkaAccess:
    """Logins and ACLs on a secured broker, through an admin client logged in as `admin`."""

    def __init__(self, bootstrap: str, login: KafkaLogin) -> None:
        self._admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, client_id="ev-kafka-access", **login.client_options()
        )

    async def __aenter__(self) -> KafkaAccess:
        await self._admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._admin.close()

    async def _send(self, struct: RequestStruct) -> Any:
        return await self._admin._send_request(_Fixed(struct))

    async def set_password(self, user: str, password: str) -> None:
        """Create `user`'s login, or give it a new password."""
        salt = os.urandom(32)
        struct = _AlterScramStruct(
            deletions=[],
            upsertions=[
                (
                    user,
                    _SCRAM_SHA_512,
                    SCRAM_ITERATIONS,
                    salt,
                    salted_password(password, salt),
                    {},
                )
            ],
            tags={},
        )
        self._check_scram(await self._send(struct), user)

    async def delete_login(self, user: str) -> None:
        """`user` can no longer log in (a login that does not exist is not an error)."""
        struct = _AlterScramStruct(deletions=[(user, _SCRAM_SHA_512, {})], upsertions=[], tags={})
        self._check_scram(await self._send(struct), user, missing_ok=True)

    @staticmethod
    def _check_scram(response: Any, user: str, missing_ok: bool = False) -> None:
        for _name, code, message, _tags in response.results:
            # 91: RESOURCE_NOT_FOUND (no such login to delete)
            if code and not (missing_ok and code == 91):
                raise AccessError(f"Kafka refused to change the login {user!r}: {message} ({code})")

    async def grant(self, principal: str, grants: Iterable[Grant]) -> None:
        """Allow `principal` (a login name) what `grants` say, from any host."""
        creations: list[tuple[Any, ...]] = [
            (g.resource, g.name, g.pattern, f"User:{principal}", "*", g.operation, _ALLOW, {})
            for g in grants
        ]
        if not creations:
            return
        response = await self._send(_CreateAclsStruct(creations=creations, tags={}))
        for code, message, _tags in response.results:
            if code:
                raise AccessError(f"Kafka refused an ACL for {principal!r}: {message} ({code})")

    async def revoke_all(self, principal: str) -> int:
        """Remove every ACL of `principal`; how many there were."""
        any_filter: tuple[Any, ...] = (
            Resource.ANY,
            None,
            Pattern.ANY,
            f"User:{principal}",
            None,
            Operation.ANY,
            _ANY_PERMISSION,
            {},
        )
        response = await self._send(_DeleteAclsStruct(filters=[any_filter], tags={}))
        removed = 0
        for code, message, matching, _tags in response.filter_results:
            if code:
                raise AccessError(f"Kafka refused to remove the ACLs of {principal!r}: {message}")
            removed += len(matching)
        return removed

    async def enrol(self, principal: str, password: str, role: str) -> None:
        """`principal` logs in with `password` and may do what `role` may."""
        await self.set_password(principal, password)
        await self.grant(principal, ROLE_GRANTS[role])

    async def withdraw(self, principal: str) -> None:
        """`principal` can neither log in nor do anything with a session it still holds."""
        await self.revoke_all(principal)
        await self.delete_login(principal)
