"""The CP's side of its sealed channel (shared.cp_channel): keys, sealed events, opened commands."""

from __future__ import annotations

import time

import pytest

from shared.cp_channel import CPChannel, KeyNotKnown
from shared.messages import AuthorizeSupply, CPPlugged, encode
from shared.sealing import Sealer, SealError, b64, new_key, open_sealed, parse

CP = "CP001"


def command(cp_id: str = CP, ts: float | None = None) -> AuthorizeSupply:
    sent = AuthorizeSupply(
        cp_id=cp_id,
        session_id="s1",
        driver_id="D1",
        price_eur_kwh=0.35,
        max_kw=22,
        expires_at=2_000_000_000.0,
    )
    return sent if ts is None else sent.model_copy(update={"ts": ts})


def central(key_id: str, key: bytes, cp_id: str = CP) -> Sealer:
    """Central's sealer of commands to `cp_id`."""
    return Sealer("cp-command", cp_id, key_id, key)


def test_events_are_sealed_with_the_newest_key_for_central_to_open() -> None:
    channel = CPChannel(CP)
    first, second = new_key(), new_key()
    assert channel.take_key("key0000001", b64(first))  # base64, as the monitor hands it over
    assert channel.take_key("key0000002", second)
    event = CPPlugged(cp_id=CP, session_id="s1")
    envelope = parse(channel.seal(event))
    assert (envelope.ch, envelope.principal, envelope.key_id) == ("cp-event", CP, "key0000002")
    assert open_sealed(envelope, second) == encode(event)
    assert channel.key_id == "key0000002"


def test_no_key_no_sealing_and_a_known_key_changes_nothing() -> None:
    channel = CPChannel(CP)
    assert not channel.ready
    with pytest.raises(SealError, match="no key"):
        channel.seal(CPPlugged(cp_id=CP, session_id="s1"))
    key = new_key()
    assert channel.take_key("key0000001", key)
    assert not channel.take_key("key0000001", new_key())
    assert channel.ready and channel.key_id == "key0000001"
    channel.revoke()
    assert not channel.ready
    with pytest.raises(KeyNotKnown):
        channel.open(central("key0000001", key).seal("c1", encode(command())))


def test_a_command_opens_once_and_a_replay_is_refused() -> None:
    channel = CPChannel(CP)
    key = new_key()
    channel.take_key("key0000001", key)
    sent = command()
    sealed = central("key0000001", key).seal(sent.id, encode(sent))
    assert channel.open(sealed) == sent
    with pytest.raises(SealError, match="replayed"):
        channel.open(sealed)


def test_a_command_under_a_key_not_held_names_that_key() -> None:
    channel = CPChannel(CP)
    channel.take_key("key0000001", new_key())
    sent = command()
    with pytest.raises(KeyNotKnown) as caught:
        channel.open(central("key0000009", new_key()).seal(sent.id, encode(sent)))
    assert caught.value.key_id == "key0000009"


def test_old_keys_open_commands_until_they_are_rotated_out() -> None:
    channel = CPChannel(CP, old_keys=1)
    keys = {f"key000000{n}": new_key() for n in range(1, 4)}
    for key_id, key in keys.items():
        channel.take_key(key_id, key)
    for key_id in ("key0000002", "key0000003"):
        sent = command()
        assert channel.open(central(key_id, keys[key_id]).seal(sent.id, encode(sent))) == sent
    sent = command()
    with pytest.raises(KeyNotKnown):
        channel.open(central("key0000001", keys["key0000001"]).seal(sent.id, encode(sent)))


@pytest.mark.parametrize(
    "value, reason",
    [
        (encode(command()), "must be sealed"),
        (b'{"type":"sealed","v":1}', "not a valid sealed envelope"),
    ],
)
def test_what_is_not_a_sealed_command_is_refused(value: bytes, reason: str) -> None:
    channel = CPChannel(CP)
    channel.take_key("key0000001", new_key())
    with pytest.raises(SealError, match=reason):
        channel.open(value)


def test_commands_for_another_cp_or_on_another_channel_are_refused() -> None:
    channel = CPChannel(CP)
    key = new_key()
    channel.take_key("key0000001", key)
    moved = command("CP002")
    with pytest.raises(SealError, match="an envelope for CP002"):
        channel.open(central("key0000001", key, "CP002").seal(moved.id, encode(moved)))
    event = Sealer("cp-event", CP, "key0000001", key)
    sent = command()
    with pytest.raises(SealError, match=r"\(cp-event\)"):
        channel.open(event.seal(sent.id, encode(sent)))
    # Sealed for this CP, but the command inside names another one.
    with pytest.raises(SealError, match="does not match"):
        channel.open(central("key0000001", key).seal(moved.id, encode(moved)))


def test_how_old_a_command_is_does_not_matter_to_the_channel() -> None:
    """Age is judged by the engine from the broker's stamp (docs/operations.md, "Clocks"):
    a command whose `ts` is far from this PC's clock is opened all the same."""
    channel = CPChannel(CP)
    key = new_key()
    channel.take_key("key0000001", key)
    sealer = central("key0000001", key)
    for skew in (-3600.0, 3600.0):
        sent = command(ts=time.time() + skew)
        assert channel.open(sealer.seal(sent.id, encode(sent))) == sent
