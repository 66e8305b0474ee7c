"""The admin commands EV_Registry needs beyond registering a CP: deregister it, issue it a
one-time enrolment token, and read the CPs in a way that is audited (docs/registry.md).

They arrive on the admin WebSocket like every admin command (EV_Central/web.py hands them
here) and are audited with who gave them and from where: "CALLER via PEER" when a service
names the client it acts for. A token goes only into the result, to that connection.
"""

from __future__ import annotations

import logging
from typing import Any

from EV_Central.admin_api import DeregisterCP, IssueEnrolment, ListCPs, failure_code
from EV_Central.audit import AuditLog
from EV_Central.cp_links import CPLinks
from EV_Central.enrolment import Enrolments
from EV_Central.registry import Registry

log = logging.getLogger(__name__)

RegistryCommand = DeregisterCP | IssueEnrolment | ListCPs
REGISTRY_COMMANDS = (DeregisterCP, IssueEnrolment, ListCPs)


def source_of(caller: str, peer: str) -> str:
    """Where a command came from, for the audit log."""
    return f"{caller} via {peer}" if caller else peer


class RegistryCommands:
    def __init__(
        self, registry: Registry, cp_links: CPLinks, enrolments: Enrolments, audit: AuditLog
    ) -> None:
        self._registry = registry
        self._cp_links = cp_links
        self._enrolments = enrolments
        self._audit = audit

    async def execute(self, command: RegistryCommand, user: str, peer: str) -> dict[str, Any]:
        """Run one command for admin `user` connected from `peer`; audit it; its result."""
        source = source_of(command.caller, peer)
        result: dict[str, Any] = {"type": "result", "ref": command.ref, "ok": True}
        target = command.target or "all"
        match command:
            case DeregisterCP():
                action = "cp_deregistered"
            case IssueEnrolment():
                action = "enrolment_issued"
            case ListCPs():
                action = "cps_listed"
        try:
            match command:
                case DeregisterCP():
                    settled = await self._cp_links.deregister(command.target)
                    result.update(
                        detail=f"deregistered {target}", cps=[target], settled_session=settled
                    )
                    detail = f"{target} (settled session {settled})" if settled else target
                case IssueEnrolment():
                    issued = await self._enrolments.issue(command.target, command.ttl_s)
                    result.update(
                        detail=f"enrolment token for {target}",
                        cps=[target],
                        token=issued.token,
                        expires_at=issued.expires_at,
                    )
                    detail = f"{target}, valid {command.ttl_s} s"
                case ListCPs():
                    result.update(detail="CPs", charging_points=self._listed(command.target))
                    detail = target
        except LookupError as exc:
            await self._record(action, "failed", user, source, f"{target}: {exc}")
            failure = {"ok": False, "detail": str(exc), "code": failure_code(exc)}
            return {"type": "result", "ref": command.ref, **failure}
        await self._record(action, "ok", user, source, detail)
        return result

    def _listed(self, cp_id: str | None) -> list[dict[str, object]]:
        if cp_id is None:
            return [cp.as_api() for cp in self._registry.sorted()]
        cp = self._registry.get(cp_id)
        if cp is None:
            raise LookupError(f"unknown CP {cp_id!r}")
        return [cp.as_api()]

    async def _record(self, action: str, outcome: str, user: str, source: str, detail: str) -> None:
        try:
            await self._audit.record(action, outcome, actor=user, source=source, detail=detail)
        except Exception:  # the command happened; a failing audit must not hide that
            log.exception("could not audit %s by %s", action, user)
