"""The fleet's failover arithmetic: address rotation and the figures of a failover window."""

from __future__ import annotations

import pytest

from shared.centrals import CentralRotation, Next
from tools.fleet.failover import (
    Rotation,
    in_flight,
    parse_addresses,
    reconnection_times,
    summarise_seconds,
    time_until_all_back,
)

A, B, C = ("127.0.0.1", 5000), ("127.0.0.1", 5001), ("10.0.0.3", 5000)


def test_addresses_parse_in_order_without_duplicates() -> None:
    assert parse_addresses("127.0.0.1:5000") == [A]
    assert parse_addresses("127.0.0.1:5000, 127.0.0.1:5001,127.0.0.1:5000") == [A, B]


@pytest.mark.parametrize("text", ["", ",", "127.0.0.1", "host:", ":5000", "h:0", "h:70000"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_addresses(text)


def test_a_failed_address_moves_on_at_once_and_a_whole_round_pauses() -> None:
    rotation = Rotation([A, B, C], round_pause=1.0)
    assert rotation.current == A
    assert rotation.fail() == 0.0
    assert rotation.current == B
    assert rotation.fail() == 0.0
    assert rotation.current == C
    # Every address failed in this round: a pause, then a new round from the next one.
    assert rotation.fail() == 1.0
    assert rotation.current == A
    assert rotation.fail() == 0.0
    assert rotation.current == B


def test_a_standby_naming_the_active_central_sends_the_monitor_there() -> None:
    rotation = Rotation([A, B, C])
    assert rotation.fail(active_central="10.0.0.3:5000") == 0.0
    assert rotation.current == C


def test_a_named_central_that_already_failed_in_this_round_is_not_tried_again() -> None:
    # A dies; B, still the standby, names A (the dead one): B's refusal goes on to C.
    rotation = Rotation([A, B, C])
    rotation.fail()  # A: connection refused
    assert rotation.current == B
    assert rotation.fail(active_central="127.0.0.1:5000") == 0.0
    assert rotation.current == C


def test_a_named_central_outside_the_list_is_ignored() -> None:
    rotation = Rotation([A, B])
    assert rotation.fail(active_central="192.0.2.1:5000") == 0.0
    assert rotation.current == B


def test_being_served_starts_a_new_round() -> None:
    rotation = Rotation([A, B], round_pause=1.0)
    rotation.fail()  # A
    rotation.served()  # B accepted it
    # B dies later: A is tried at once, not after a pause (A's old failure is forgotten).
    assert rotation.fail() == 0.0
    assert rotation.current == A


def test_a_single_address_pauses_after_each_failure() -> None:
    rotation = Rotation([A], round_pause=0.5)
    assert rotation.fail() == 0.5
    assert rotation.current == A


def test_requests_in_flight_during_a_window() -> None:
    requests = [
        (0.0, 1.0),  # answered before the window: out
        (9.0, 2.0),  # sent before, answered during: in
        (10.5, 0.1),  # within: in
        (14.0, 3.0),  # sent within, answered after: in
        (15.5, 0.1),  # sent after: out
        (11.0, None),  # never answered: out
    ]
    assert in_flight(requests, 10.0, 15.0) == [2.0, 0.1, 3.0]


def test_time_until_every_cp_is_back() -> None:
    outages = [(10.2, 13.0), (10.3, 14.5), (10.4, 12.0), (3.0, 4.0)]
    assert time_until_all_back(outages, 10.0, 20.0) == pytest.approx(4.5)
    assert sorted(reconnection_times(outages, 10.0, 20.0)) == pytest.approx([1.6, 2.8, 4.2])


def test_a_cp_still_out_means_not_every_cp_is_back() -> None:
    assert time_until_all_back([(10.2, 13.0), (10.3, None)], 10.0, 20.0) is None
    assert reconnection_times([(10.2, 13.0), (10.3, None)], 10.0, 20.0) == pytest.approx([2.8])


def test_no_cp_lost_in_the_window() -> None:
    assert time_until_all_back([(3.0, 4.0)], 10.0, 20.0) is None


def test_summaries_in_seconds() -> None:
    summary = summarise_seconds([1.0, 2.0, 3.0])
    assert summary["count"] == 3
    assert summary["p50"] == 2.0
    assert summary["max"] == 3.0


def test_the_monitor_learns_whether_a_standby_refused_in_the_round_that_ended() -> None:
    rotation = CentralRotation([A, B])
    assert rotation.fail() is Next.NEXT  # A: no answer
    assert rotation.fail(active_central="127.0.0.1:5000") is Next.ROUND_OVER  # B: standby
    assert rotation.standby_seen  # so the monitor looks again soon
    assert rotation.fail() is Next.NEXT and not rotation.standby_seen  # a new round
    assert rotation.fail() is Next.ROUND_OVER and not rotation.standby_seen
