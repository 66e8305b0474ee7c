"""Health samples sealed by a monitor and opened by the site dashboard (EV_CP_M/health.py)."""

from __future__ import annotations

import pytest

from EV_CP_M.health import HealthOpener, HealthSealer
from shared.messages import HealthSample, encode
from shared.sealing import SealError, health_key


def sample(cp_id: str = "CP001", **fields: object) -> bytes:
    return encode(HealthSample(cp_id=cp_id, engine_ok=True, central_ok=True, **fields))


def sealed(sealer: HealthSealer, value: bytes) -> bytes:
    (envelope,) = sealer.outgoing("ev.cp.health", "CP001", value)
    return envelope


def test_a_monitor_s_samples_open_once_with_its_cp_s_secret() -> None:
    opener = HealthOpener({"CP001": "s3cret", "CP002": "other"})
    monitor = HealthSealer("CP001", "s3cret")
    first = sealed(monitor, sample(seq=1))
    assert opener.open(first).seq == 1
    assert opener.open(sealed(monitor, sample(seq=2))).seq == 2
    with pytest.raises(SealError, match="replayed"):
        opener.open(first)
    # A restarted monitor seals in a new stream: its samples open again from the start.
    assert opener.open(sealed(HealthSealer("CP001", "s3cret"), sample(seq=0))).seq == 0


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (sample(), "not a valid sealed envelope"),  # in clear
        (sealed(HealthSealer("CP001", "a guess"), sample()), "another key"),
        (sealed(HealthSealer("CP001", "s3cret"), sample("CP002")), "sealed as CP001's"),
        (sealed(HealthSealer("CP009", "s3cret"), sample("CP009")), "not given here"),
    ],
    ids=["clear", "wrong secret", "moved to another CP", "a CP of another site"],
)
def test_anything_but_a_monitor_s_own_sample_is_refused(value: bytes, why: str) -> None:
    with pytest.raises(SealError, match=why):
        HealthOpener({"CP001": "s3cret", "CP002": "other"}).open(value)


def test_the_key_depends_on_the_cp_and_its_secret() -> None:
    key_id, key = health_key("CP001", "s3cret")
    assert len(key) == 32 and len(key_id) == 16
    assert health_key("CP001", "s3cret") == (key_id, key)
    assert health_key("CP002", "s3cret")[1] != key
    assert health_key("CP001", "s3cret!")[1] != key
