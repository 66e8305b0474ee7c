"""Which event loop services run on: uvloop unless EV_EVENT_LOOP says otherwise."""

from __future__ import annotations

import asyncio

import pytest

from shared.errors import EVError
from shared.lifecycle import loop_factory, run_loop


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_is_the_default_and_asyncio_can_be_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EV_EVENT_LOOP", raising=False)
    assert run_loop(_loop_type()).startswith("uvloop")
    monkeypatch.setenv("EV_EVENT_LOOP", "asyncio")
    assert run_loop(_loop_type()).startswith("asyncio")
    monkeypatch.setenv("EV_EVENT_LOOP", "UVLOOP")
    assert run_loop(_loop_type()).startswith("uvloop")


def test_an_unknown_choice_is_a_clear_error() -> None:
    with pytest.raises(EVError, match="must be auto, uvloop or asyncio"):
        loop_factory({"EV_EVENT_LOOP": "trio"})
    assert loop_factory({"EV_EVENT_LOOP": "asyncio"}) is None
