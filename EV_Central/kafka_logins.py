"""Each CP's Kafka login, given with its registration and taken away with it.

On a secured broker (docs/security.md, "Kafka") a CP's engine logs in as `cp-ID` with a
password of its own and may only read its commands and write its events. Central, logged in as
`central` (which may alter the cluster's logins and ACLs), makes that login when an admin
registers the CP, and removes it, with its ACLs, when the CP is deregistered: a CP that is gone
is refused by the broker too, not only by Central. On a plain broker there is nothing to do.
"""

from __future__ import annotations

import logging
import secrets

from aiokafka.errors import KafkaError

from shared.kafka_access import AccessError, KafkaAccess, KafkaLogin, cp_principal

log = logging.getLogger(__name__)


class KafkaLoginError(Exception):
    """Kafka did not make or remove a CP's login."""


class CpKafkaLogins:
    def __init__(self, bootstrap: str, login: KafkaLogin | None) -> None:
        self.bootstrap = bootstrap
        self.login = login  # Central's own; None: a plain broker, no logins to manage

    @property
    def enabled(self) -> bool:
        return self.login is not None

    async def issue(self, cp_id: str) -> tuple[str, str] | None:
        """(user, password) of a new login for CP `cp_id`'s engine; None on a plain broker.

        An existing login of that name gets the new password (the old one stops working).
        """
        if self.login is None:
            return None
        user, password = cp_principal(cp_id), secrets.token_urlsafe(24)
        try:
            async with KafkaAccess(self.bootstrap, self.login) as access:
                await access.enrol(user, password, "cp")
        except (AccessError, KafkaError) as exc:
            raise KafkaLoginError(f"Kafka did not make the login {user}: {exc}") from exc
        return user, password

    async def withdraw(self, cp_id: str) -> bool:
        """Remove CP `cp_id`'s login and ACLs; False (logged) when Kafka did not."""
        if self.login is None:
            return True
        user = cp_principal(cp_id)
        try:
            async with KafkaAccess(self.bootstrap, self.login) as access:
                await access.withdraw(user)
        except (AccessError, KafkaError) as exc:
            log.error(
                "Kafka did not remove the login %s (%s): remove it with "
                "`python -m EV_Central kafka-access ... withdraw %s`",
                user,
                exc,
                user,
            )
            return False
        return True
