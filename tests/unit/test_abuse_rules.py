"""The rules that hold off abuse (shared/abuse.py): pure, with the time given to every call."""

from __future__ import annotations

import pytest

from shared.abuse import (
    ConnectionCap,
    FailureDigest,
    LoginThrottle,
    Summary,
    Throttle,
    ThrottleRules,
)

RULES = ThrottleRules(free=3, base_delay=0.2, max_delay=1.0, first_block=10.0, max_block=35.0)


def test_delays_double_up_to_their_cap_and_blocks_start_after_the_free_failures() -> None:
    throttle: Throttle[str] = Throttle(RULES)
    verdicts = [throttle.failed("a", 100.0) for _ in range(6)]
    assert [v.delay for v in verdicts] == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    # Blocked from the third failure, for doubling times up to the cap.
    assert [v.blocked_for for v in verdicts] == [0.0, 0.0, 10.0, 20.0, 35.0, 35.0]
    assert [v.failures for v in verdicts] == [1, 2, 3, 4, 5, 6]


def test_a_block_runs_out_and_a_success_or_a_long_quiet_forgets() -> None:
    throttle: Throttle[str] = Throttle(RULES)
    for _ in range(3):
        throttle.failed("a", 100.0)
    assert throttle.retry_after("a", 100.0) == 10.0
    assert throttle.retry_after("a", 105.0) == 5.0
    assert throttle.retry_after("a", 110.0) == 0.0
    assert throttle.retry_after("b", 100.0) == 0.0  # other keys are not touched
    # Quiet for longer than twice the longest block: the count starts afresh.
    assert throttle.failed("a", 110.0 + 2 * 35.0 + 1).failures == 1
    throttle.succeeded("a")
    assert throttle.failed("a", 200.0).failures == 1
    assert len(throttle) == 1


def test_keys_are_bounded_by_forgetting_the_least_recently_failed() -> None:
    rules = ThrottleRules(free=1, first_block=5.0, max_block=5.0, max_keys=3)
    throttle: Throttle[str] = Throttle(rules)
    for key in ("a", "b", "c"):
        throttle.failed(key, 0.0)
    throttle.failed("a", 1.0)  # "a" is the most recent now
    throttle.failed("d", 1.0)
    assert len(throttle) == 3
    assert throttle.retry_after("b", 1.0) == 0.0  # forgotten
    assert throttle.retry_after("a", 1.0) > 0


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="free"):
        ThrottleRules(free=0)
    with pytest.raises(ValueError, match="first_block"):
        ThrottleRules(first_block=10.0, max_block=5.0)


def test_a_failing_source_does_not_hold_back_another_source() -> None:
    logins = LoginThrottle(RULES, ThrottleRules(free=20, first_block=10.0, max_block=35.0))
    for _ in range(6):
        verdict = logins.failed("admin", "10.6.6.6", 0.0)
    assert verdict.source_blocked_for == 35.0 and verdict.unknown_blocked_for == 0.0
    assert logins.retry_after("admin", "10.6.6.6", 1.0) == 34.0
    assert logins.retry_after("admin", "10.0.0.1", 1.0) == 0.0
    assert logins.retry_after("user1", "10.6.6.6", 1.0) == 0.0  # another account


def test_made_up_sources_share_one_budget_that_known_sources_skip() -> None:
    logins = LoginThrottle(RULES, ThrottleRules(free=4, first_block=10.0, max_block=35.0))
    logins.succeeded("user1", "my app")
    assert logins.known("user1", "my app")
    verdicts = [logins.failed("user1", f"key {n}", 0.0) for n in range(4)]
    assert [v.unknown_blocked_for for v in verdicts] == [0.0, 0.0, 0.0, 10.0]
    assert all(v.source_blocked_for == 0.0 for v in verdicts)  # each key failed only once
    assert logins.retry_after("user1", "key 99", 1.0) == 9.0  # any new key waits
    assert logins.retry_after("user1", "my app", 1.0) == 0.0  # the known one does not
    # A known source's failures do not spend the budget.
    logins.failed("user1", "my app", 20.0)
    assert logins.unknown.failed("user1", 20.0).failures == 5


def test_known_sources_are_bounded_per_account() -> None:
    logins = LoginThrottle(RULES, RULES, known_per_account=2, max_accounts=2)
    for source in ("a", "b", "c"):
        logins.succeeded("user1", source)
    assert [logins.known("user1", s) for s in ("a", "b", "c")] == [False, True, True]
    logins.succeeded("user2", "a")
    logins.succeeded("user3", "a")
    assert not logins.known("user1", "b")  # the least recent account was forgotten


def test_a_connection_cap_per_address() -> None:
    cap = ConnectionCap(2)
    assert cap.open("10.0.0.1") and cap.open("10.0.0.1")
    assert not cap.open("10.0.0.1")
    assert cap.open("10.0.0.2")
    cap.close("10.0.0.1")
    assert cap.count("10.0.0.1") == 1
    assert cap.open("10.0.0.1")
    with pytest.raises(ValueError):
        ConnectionCap(0)


def test_a_flood_of_failures_is_one_row_and_one_summary_per_source_and_window() -> None:
    digest = FailureDigest(window=60.0, max_sources=2)
    written = [digest.failed("10.6.6.6", float(t)) for t in range(100)]
    assert written == [True] + [False] * 99
    assert digest.due(59.0) == []
    assert digest.due(60.0) == [Summary("10.6.6.6", 99, 60.0)]
    assert digest.failed("10.6.6.6", 61.0)  # a new window: its first failure is written
    assert digest.due(200.0) == []  # and nothing else came: no summary
    # Beyond max_sources, the others share one window, never a row each.
    assert digest.failed("a", 300.0) and digest.failed("b", 300.0)
    assert [digest.failed(f"x{n}", 300.0) for n in range(5)] == [False] * 5
    assert Summary(FailureDigest.OTHERS, 5, 60.0) in digest.due(360.0)
