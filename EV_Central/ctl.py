"""`python -m EV_Central ctl`: send one admin command to a running Central, as an admin.

    ctl [--central HOST:PORT] [--user admin] [--password-file PATH] (stop|resume) (CP_ID|all)
    ctl ... register CP_ID --location TEXT --price EUR --max-kw KW
    ctl ... revoke-key CP_ID
    ctl ... reset-secret CP_ID

It logs in like the admin page does (docs/web-auth.md): the password on a /login WebSocket,
the grant it answers exchanged for the session cookie with GET /session, then the command on
/ws with that cookie. The password comes from --password-file, else EV_ADMIN_PASSWORD, else a
prompt when stdin is a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import http.client
import json
import os
import ssl
import sys
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import quote

from pydantic import BaseModel, ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from EV_Central.admin_api import ADMIN_COOKIE, AdminCommand, RegisterCP, ResetSecret, RevokeKey
from shared.errors import EVError
from shared.settings import EnvArgumentParser, host_port, identifier
from shared.tls import client_context, describe_failure
from shared.websession import WebLogin

MAX_PASSWORD_FILE = 4096


class LoginRefused(EVError):
    """Central refused the login (wrong user or password, a blocked source, not an admin);
    `retry_after`: seconds until the source may try again, when it is blocked."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_Central ctl",
        description="Send an admin command to Central: stop or resume CPs, register a CP, "
        "revoke a CP's keys or give it a new secret. Logs in as an admin first.",
        epilog="The password comes from --password-file, else the environment variable "
        "EV_ADMIN_PASSWORD, else a prompt when run from a terminal.",
    )
    parser.add_option(
        "--central",
        type=host_port,
        default=host_port("127.0.0.1:8002"),
        help="Central's admin HOST:HTTP_PORT",
    )
    parser.add_option(
        "--user", env="EV_ADMIN_USER", type=identifier, default="admin", help="admin account"
    )
    parser.add_option(
        "--password-file",
        env="EV_ADMIN_PASSWORD_FILE",
        metavar="PATH",
        help="file whose first line is the admin's password",
    )
    parser.add_option(
        "--timeout",
        type=float,
        default=10.0,
        env="EV_CTL_TIMEOUT",
        help="seconds to wait for the result",
    )
    parser.add_option(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="CA certificate of Central's admin web: connect with TLS (wss://, https://) and "
        "verify it (docs/tls.md)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for action in ("stop", "resume"):
        sub = commands.add_parser(action, help=f"{action} one CP or all of them")
        sub.add_argument("target", help="a CP id, or 'all'")
    register = commands.add_parser("register", help="register a CP and print its secret once")
    register.add_argument("cp_id", type=identifier)
    register.add_argument("--location", required=True, help="where the CP is")
    register.add_argument("--price", type=float, required=True, metavar="EUR", help="€/kWh")
    register.add_argument("--max-kw", type=float, required=True, metavar="KW", help="max power")
    revoke = commands.add_parser("revoke-key", help="revoke a CP's keys (it must log in again)")
    revoke.add_argument("cp_id", type=identifier)
    reset = commands.add_parser("reset-secret", help="give a CP a new secret (printed once)")
    reset.add_argument("cp_id", type=identifier)
    return parser


def command_of(args: argparse.Namespace) -> BaseModel:
    """The admin message for the parsed command line (ValidationError when out of range)."""
    if args.command in ("stop", "resume"):
        return AdminCommand(action=args.command, target=args.target, ref="ctl")
    if args.command == "register":
        return RegisterCP(
            id=args.cp_id,
            location=args.location,
            price_eur_kwh=args.price,
            max_kw=args.max_kw,
            ref="ctl",
        )
    if args.command == "revoke-key":
        return RevokeKey(target=args.cp_id, ref="ctl")
    return ResetSecret(target=args.cp_id, ref="ctl")


async def admin_login(
    host: str,
    port: int,
    user: str,
    password: str,
    wait_s: float,
    tls: ssl.SSLContext | None = None,
) -> str:
    """Log in at Central's admin web; return the Cookie header value of the new session.

    Raises LoginRefused when Central says no, OSError/WebSocketException when unreachable.
    """
    form = WebLogin(type="login", user=user, password=password)
    async with asyncio.timeout(wait_s):
        async with connect(
            f"{'wss' if tls else 'ws'}://{host}:{port}/login", open_timeout=wait_s, ssl=tls
        ) as ws:
            await ws.send(form.model_dump_json())
            answer = json.loads(await ws.recv())
    if not isinstance(answer, dict) or answer.get("type") != "login_result":
        raise ConnectionError("Central answered the login with something unexpected")
    if not answer.get("ok"):
        retry_after = answer.get("retry_after")
        raise LoginRefused(
            str(answer.get("reason") or "login refused"),
            float(retry_after) if isinstance(retry_after, int | float) else None,
        )
    grant = str(answer.get("grant", ""))
    return await asyncio.to_thread(_redeem, host, port, grant, wait_s, tls)


def _redeem(
    host: str, port: int, grant: str, wait_s: float, tls: ssl.SSLContext | None = None
) -> str:
    """GET /session?grant=...: the session cookie from the answer's Set-Cookie header."""
    conn = (
        http.client.HTTPSConnection(host, port, timeout=wait_s, context=tls)
        if tls
        else http.client.HTTPConnection(host, port, timeout=wait_s)
    )
    try:
        conn.request("GET", f"/session?grant={quote(grant)}")
        reply = conn.getresponse()
        reply.read()
        cookies = reply.headers.get_all("Set-Cookie") or []
    finally:
        conn.close()
    if reply.status != 204:
        raise ConnectionError(f"Central refused the session (HTTP {reply.status})")
    for cookie in cookies:
        pair = cookie.split(";", 1)[0].strip()
        if pair.startswith(f"{ADMIN_COOKIE}="):
            return pair
    raise ConnectionError("Central's answer carried no session cookie")


async def send_command(
    host: str,
    port: int,
    command: BaseModel,
    wait_s: float,
    cookie: str,
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Send `command` on /ws with the session `cookie`; return Central's result."""
    ref = getattr(command, "ref", "")
    async with asyncio.timeout(wait_s):
        async with connect(
            f"{'wss' if tls else 'ws'}://{host}:{port}/ws",
            open_timeout=wait_s,
            additional_headers={"Cookie": cookie},
            max_size=None,
            ssl=tls,
        ) as ws:
            await ws.send(command.model_dump_json())
            async for raw in ws:
                reply = json.loads(raw)
                if reply.get("type") == "result" and reply.get("ref") == ref:
                    return dict(reply)
    raise ConnectionError("Central closed the connection without answering")


def read_password(
    password_file: str | None, environ: Mapping[str, str], stdin: TextIO, user: str
) -> str | None:
    """The admin password from the file, the environment or a prompt; None when none."""
    if password_file:
        with open(password_file, encoding="utf-8") as f:
            text = f.read(MAX_PASSWORD_FILE)
        lines = text.splitlines()
        return lines[0] if lines and lines[0] else None
    if environ.get("EV_ADMIN_PASSWORD"):
        return environ["EV_ADMIN_PASSWORD"]
    if stdin.isatty():
        return getpass.getpass(f"password of {user} at Central: ") or None
    return None


async def run(
    host: str,
    port: int,
    user: str,
    password: str,
    command: BaseModel,
    wait: float,
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Log in, then send `command`; Central's result. TLS with `tls`."""
    cookie = await admin_login(host, port, user, password, wait, tls)
    return await send_command(host, port, command, wait, cookie, tls)


def main(
    argv: list[str],
    environ: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
) -> int:
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    host, port = args.central
    try:
        command = command_of(args)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "command"
        print(f"error: {where}: {first['msg']}", file=sys.stderr)
        return 2
    try:
        password = read_password(args.password_file, environ, stdin or sys.stdin, args.user)
    except OSError as exc:
        print(f"error: cannot read the password file: {exc}", file=sys.stderr)
        return 2
    if password is None:
        print(
            "error: no password for the admin account: use --password-file PATH, set "
            "EV_ADMIN_PASSWORD, or run ctl from a terminal to be asked",
            file=sys.stderr,
        )
        return 2
    try:
        tls = client_context(args.tls_ca) if args.tls_ca else None
    except EVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        reply = asyncio.run(run(host, port, args.user, password, command, args.timeout, tls))
    except LoginRefused as exc:
        print(f"error: Central refused the login of {args.user}: {exc}", file=sys.stderr)
        return 1
    except InvalidStatus as exc:
        status = exc.response.status_code
        why = "not an admin" if status == 403 else f"HTTP {status}"
        print(f"error: Central refused the admin connection: {why}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, WebSocketException, ConnectionError) as exc:
        reason = describe_failure(exc) or str(exc) or "timed out"
        print(f"error: cannot reach Central at {host}:{port}: {reason}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"error: {reply.get('detail')}", file=sys.stderr)
        return 1
    print(f"ok: {reply.get('detail')} ({', '.join(reply.get('cps', []))})")
    secret = reply.get("secret")
    if secret:
        cp_id = (reply.get("cps") or ["the CP"])[0]
        print(f"secret of {cp_id}: {secret}")
        print(
            f"Give it to {cp_id}'s monitor as --secret or EV_CP_SECRET now: it is not shown "
            "again (reset-secret issues a new one)."
        )
    if reply.get("kafka_user"):
        print(f"Kafka login of its engine: {reply['kafka_user']} {reply.get('kafka_password')}")
        print(
            "Give them to the engine as --kafka-user and --kafka-password-file now: the password"
            ' is not shown again (docs/security.md, "Kafka").'
        )
    return 0
