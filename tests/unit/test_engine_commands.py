"""How the engine judges a command's age: by the broker's stamp and by when Central wrote it,
each read on the network's clock with measured offsets, never this PC's clock against
Central's (docs/operations.md, "Clocks")."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

import pytest

from EV_CP_E.config import EngineSettings
from EV_CP_E.service import COMMAND_MAX_AGE, EngineService
from shared.lifecycle import Shutdown
from shared.messages import AuthorizeSupply, CPAuthorisation, encode
from shared.sealing import Sealer, new_key

CP = "CP001"
KEY_ID = "key0000001"


def network_now(this_pc_ahead: float) -> float:
    """The network's time now, when this PC's clock (the test's) is `this_pc_ahead`."""
    return time.time() - this_pc_ahead


def engine(this_pc_ahead: float, central_ahead: float) -> tuple[EngineService, Sealer]:
    """An engine for CP001 holding its key, whose PC's and Central's offsets are measured
    (this PC's clock is the test's own: the network's is `this_pc_ahead` behind it)."""
    service = EngineService(
        EngineSettings(broker="127.0.0.1:1", listen=("127.0.0.1", 0)),
        Shutdown(),
        screen=io.StringIO(),
    )
    assert service.machine.set_cp_id(CP)
    key = new_key()
    service._channel_of(CP).take_key(KEY_ID, key)
    service.clock.estimate.add(this_pc_ahead, 0.001)
    service._central_offset = central_ahead
    service.machine.health_check(True)  # its monitor and Central are there
    return service, Sealer("cp-command", CP, KEY_ID, key)


def authorisation(written_at: float, ttl: float = 60.0) -> AuthorizeSupply:
    return AuthorizeSupply(
        cp_id=CP,
        session_id="s1",
        driver_id="user1",
        price_eur_kwh=0.35,
        max_kw=22,
        expires_at=written_at + ttl,
    ).model_copy(update={"ts": written_at})


def record(value: bytes, stamped: float) -> SimpleNamespace:
    return SimpleNamespace(
        key=CP.encode(),
        value=value,
        timestamp=round(stamped * 1000),
        timestamp_type=1,
        topic="ev.cp.commands",
        partition=0,
        offset=0,
    )


def answers(service: EngineService) -> list[CPAuthorisation]:
    return [m for _, m, _ in service._outbox if isinstance(m, CPAuthorisation)]


@pytest.mark.parametrize(
    ("this_pc_ahead", "central_ahead"), [(60, 0), (-60, 0), (0, 60), (30, -45)]
)
def test_a_fresh_command_is_taken_whatever_the_clocks(
    this_pc_ahead: float, central_ahead: float
) -> None:
    service, sealer = engine(this_pc_ahead, central_ahead)
    now = network_now(this_pc_ahead)
    command = authorisation(written_at=now - 0.5 + central_ahead)
    service._on_record(record(sealer.seal(command.id, encode(command)), stamped=now - 0.4))
    [answer] = answers(service)
    assert answer.accepted, answer
    # Its end on this PC's clock: about 59.6 s from now, whatever the two clocks say.
    assert service.machine.auth is not None
    left = service.machine.auth.expires_at - time.time()
    assert abs(left - 59.6) < 0.5, left


def test_a_copy_of_an_old_command_with_a_new_stamp_is_refused() -> None:
    """A captured authorisation sent again (a new broker stamp) to an engine that restarted,
    and so forgot the sequence numbers it had seen: Central wrote it too long ago."""
    service, sealer = engine(this_pc_ahead=60, central_ahead=-30)
    now = network_now(60)
    old = authorisation(written_at=now - COMMAND_MAX_AGE - 5 - 30, ttl=3600)
    service._on_record(record(sealer.seal(old.id, encode(old)), stamped=now))
    [answer] = answers(service)
    assert not answer.accepted and "old by the network's clock" in answer.reason
    assert service.machine.auth is None
    assert "refused a stale authorize_supply" in service.screen.getvalue()  # type: ignore[attr-defined]


def test_a_command_that_waited_in_kafka_too_long_is_refused() -> None:
    service, sealer = engine(this_pc_ahead=-60, central_ahead=0)
    now = network_now(-60)
    waited = authorisation(written_at=now - 100, ttl=3600)
    service._on_record(record(sealer.seal(waited.id, encode(waited)), stamped=now - 90))
    [answer] = answers(service)
    assert not answer.accepted and "100 s old" in answer.reason  # written 100 s ago
