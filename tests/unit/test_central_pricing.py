"""Session pricing and supply-request decisions (EV_Central.pricing): pure functions."""

from __future__ import annotations

from typing import Any

import pytest

from EV_Central.pricing import amount_cents, cap_to_balance, decide_request, max_kwh_for
from shared.messages import DenialReason

DEMO_PRICES = [0.30, 0.33, 0.35, 0.36, 0.38, 0.39, 0.40, 0.42, 0.45]

# --- amount_cents -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwh", "price", "cents"),
    [
        (10.0, 0.35, 350),
        (0.1, 0.30, 3),  # 0.1 * 0.3 is 0.030000000000000002 in floats
        (3.0, 0.33, 99),
        (7.4, 0.36, 266),  # 266.4
        (12.34, 0.42, 518),  # 518.28
        (100.0, 0.45, 4500),
        (22.0, 0.38, 836),
        (0.0, 0.35, 0),
        (50.0, 0.0, 0),
    ],
)
def test_amount_is_kwh_times_price_in_cents(kwh: float, price: float, cents: int) -> None:
    assert amount_cents(kwh, price) == cents


@pytest.mark.parametrize(
    ("kwh", "price", "cents"),
    [
        (1.5, 0.35, 53),  # 52.5 cents; as floats 1.5 * 0.35 is 0.5249999999999999
        (0.25, 0.5, 13),  # 12.5: banker's rounding would give 12
        (2.5, 0.01, 3),  # 2.5: banker's rounding would give 2
        (0.005, 1.0, 1),  # 0.5
        (1.1, 0.45, 50),  # 49.5
        (2.675, 1.0, 268),  # 267.5; 2.675 is 2.67499999... as a float
    ],
)
def test_amount_rounds_half_up(kwh: float, price: float, cents: int) -> None:
    assert amount_cents(kwh, price) == cents


def test_amount_just_below_half_rounds_down() -> None:
    assert amount_cents(0.2498, 0.5) == 12  # 12.49 cents


# --- cap_to_balance ---------------------------------------------------------------------


def test_cap_leaves_an_affordable_session_alone() -> None:
    assert cap_to_balance(10.0, 0.35, 1000) == (10.0, 350)


def test_cap_at_exactly_the_balance_is_not_a_cut() -> None:
    assert cap_to_balance(10.0, 0.35, 350) == (10.0, 350)


def test_cap_reports_energy_to_the_tenth_of_a_watt_hour() -> None:
    assert cap_to_balance(1.234567, 0.35, 10_000) == (1.2346, 43)


def test_cap_cuts_energy_to_what_the_balance_buys() -> None:
    kwh, cents = cap_to_balance(100.0, 0.35, 1000)  # 35 € of energy, 10 € of balance
    assert kwh == 28.5714  # 10 € / 0.35 €/kWh = 28.571428..., rounded down
    assert cents == 1000
    assert cents == amount_cents(kwh, 0.35)


def test_cap_rounds_the_energy_down_not_to_nearest() -> None:
    # 10 € / 0.36 €/kWh = 27.77777... kWh: billing 27.7778 kWh would be more than was paid for.
    assert cap_to_balance(100.0, 0.36, 1000) == (27.7777, 1000)


def test_cap_with_no_balance_bills_nothing() -> None:
    assert cap_to_balance(5.0, 0.35, 0) == (0.0, 0)


@pytest.mark.parametrize("price", [*DEMO_PRICES, 0.07, 0.13, 1.17, 73.0])
def test_capped_amount_is_kwh_times_price_and_never_exceeds_balance(price: float) -> None:
    requested = 1000.0
    for balance in range(0, 3001, 7):
        kwh, cents = cap_to_balance(requested, price, balance)
        assert cents <= balance, (price, balance, kwh, cents)
        assert cents == amount_cents(kwh, price), (price, balance, kwh, cents)
        assert 0 <= kwh <= requested
        # Never more energy than the balance pays for, before any rounding of cents.
        assert kwh * price * 100 <= balance + 1e-6, (price, balance, kwh)
        # The cut is tight: less than 0.1 Wh below what the balance buys.
        assert balance / 100 / price - kwh < 0.0001 + 1e-9, (price, balance, kwh)


def test_free_cp_is_never_cut() -> None:
    assert cap_to_balance(50.0, 0.0, 0) == (50.0, 0)


# --- max_kwh_for ------------------------------------------------------------------------


def test_max_kwh_is_what_the_balance_buys_rounded_down() -> None:
    assert max_kwh_for(1000, 0.35) == 28.5714
    assert max_kwh_for(1000, 0.36) == 27.7777  # 27.77777..., not 27.7778
    assert max_kwh_for(15000, 0.30) == 500.0
    assert max_kwh_for(0, 0.35) == 0.0


def test_max_kwh_is_unlimited_on_a_free_cp() -> None:
    assert max_kwh_for(0, 0.0) is None
    assert max_kwh_for(15000, 0.0) is None


@pytest.mark.parametrize("price", DEMO_PRICES)
def test_max_kwh_costs_no_more_than_the_balance(price: float) -> None:
    for balance in (1, 99, 7550, 15000, 20000):
        kwh = max_kwh_for(balance, price)
        assert kwh is not None
        assert amount_cents(kwh, price) <= balance


# --- decide_request ---------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "driver_known": True,
    "cp_known": True,
    "cp_available": True,
    "driver_busy": False,
    "balance_cents": 15000,
    "price_eur_kwh": 0.35,
    "age_s": 1.0,
    "max_age_s": 30.0,
}

# Everything wrong at once. Price 0.60 €/kWh: 10 Wh cost 0.6 cents, which rounds to 1.
ALL_WRONG: dict[str, Any] = {
    "driver_known": False,
    "cp_known": False,
    "cp_available": False,
    "driver_busy": True,
    "balance_cents": 0,
    "price_eur_kwh": 0.60,
    "age_s": 31.0,
    "max_age_s": 30.0,
}

# Fixing the causes one by one, in this order, must reveal each reason in turn.
PRECEDENCE: list[tuple[dict[str, Any], DenialReason | None]] = [
    ({}, DenialReason.REQUEST_EXPIRED),
    ({"age_s": 1.0}, DenialReason.UNKNOWN_DRIVER),
    ({"driver_known": True}, DenialReason.UNKNOWN_CP),
    ({"cp_known": True}, DenialReason.DRIVER_BUSY),
    ({"driver_busy": False}, DenialReason.CP_UNAVAILABLE),
    ({"cp_available": True}, DenialReason.INSUFFICIENT_BALANCE),
    ({"balance_cents": 1}, None),
]


def test_decide_request_reasons_come_in_order_of_precedence() -> None:
    kwargs = dict(ALL_WRONG)
    seen: list[DenialReason | None] = []
    for fix, expected in PRECEDENCE:
        kwargs.update(fix)
        reason = decide_request(**kwargs)
        seen.append(reason)
        assert reason == expected, (fix, seen)


def test_decide_request_authorises_a_good_request() -> None:
    assert decide_request(**GOOD) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"age_s": 30.5}, DenialReason.REQUEST_EXPIRED),
        ({"driver_known": False}, DenialReason.UNKNOWN_DRIVER),
        ({"cp_known": False}, DenialReason.UNKNOWN_CP),
        ({"driver_busy": True}, DenialReason.DRIVER_BUSY),
        ({"cp_available": False}, DenialReason.CP_UNAVAILABLE),
        ({"price_eur_kwh": 0.60, "balance_cents": 0}, DenialReason.INSUFFICIENT_BALANCE),
    ],
)
def test_decide_request_each_single_fault(change: dict[str, Any], reason: DenialReason) -> None:
    assert decide_request(**{**GOOD, **change}) == reason


def test_request_exactly_at_its_max_age_is_still_valid() -> None:
    assert decide_request(**{**GOOD, "age_s": 30.0}) is None


def test_free_cp_needs_no_balance() -> None:
    assert decide_request(**{**GOOD, "price_eur_kwh": 0.0, "balance_cents": 0}) is None


@pytest.mark.parametrize("price", [0.30, 0.35, 0.45])
def test_zero_balance_is_insufficient_at_demo_prices(price: float) -> None:
    # Regression: the cost of 10 Wh rounds to 0 cents below 0.50 €/kWh (every demo CP),
    # which once let a driver with no balance at all be authorised.
    assert (
        decide_request(**{**GOOD, "price_eur_kwh": price, "balance_cents": 0})
        == DenialReason.INSUFFICIENT_BALANCE
    )


@pytest.mark.parametrize("price", [0.30, 0.35, 0.45])
def test_one_cent_is_enough_to_start_at_demo_prices(price: float) -> None:
    assert decide_request(**{**GOOD, "price_eur_kwh": price, "balance_cents": 1}) is None
