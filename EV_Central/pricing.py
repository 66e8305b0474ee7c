"""Session pricing and request decisions: pure functions, no I/O."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from shared.messages import DenialReason


def amount_cents(kwh: float, price_eur_kwh: float) -> int:
    """kWh × €/kWh in whole cents, rounded half up."""
    cents = Decimal(str(round(kwh, 6))) * Decimal(str(price_eur_kwh)) * 100
    return int(cents.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def cap_to_balance(kwh: float, price_eur_kwh: float, balance_cents: int) -> tuple[float, int]:
    """Energy and amount to bill, never more than the driver can pay.

    When the energy would cost more than the balance, the energy billed is cut to what the
    balance buys, so the ticket's amount is still kWh × price.
    """
    kwh = round(kwh, 4)  # billed energy is kept to the 0.1 Wh, and priced as kept
    cents = amount_cents(kwh, price_eur_kwh)
    if cents <= balance_cents or price_eur_kwh <= 0:
        return kwh, cents
    affordable = balance_cents / 100 / price_eur_kwh
    kwh_capped = int(affordable * 10_000) / 10_000  # round down to the 0.1 Wh
    return kwh_capped, amount_cents(kwh_capped, price_eur_kwh)


def max_kwh_for(balance_cents: int, price_eur_kwh: float) -> float | None:
    """The most energy a balance buys, or None when the CP is free."""
    if price_eur_kwh <= 0:
        return None
    return int(balance_cents / 100 / price_eur_kwh * 10_000) / 10_000


def decide_request(
    *,
    driver_known: bool,
    cp_known: bool,
    cp_available: bool,
    driver_busy: bool,
    balance_cents: int,
    price_eur_kwh: float,
    age_s: float,
    max_age_s: float,
) -> DenialReason | None:
    """Why a supply request must be denied, or None when it can be authorised."""
    if age_s > max_age_s:
        return DenialReason.REQUEST_EXPIRED
    if not driver_known:
        return DenialReason.UNKNOWN_DRIVER
    if not cp_known:
        return DenialReason.UNKNOWN_CP
    if driver_busy:
        return DenialReason.DRIVER_BUSY
    if not cp_available:
        return DenialReason.CP_UNAVAILABLE
    if price_eur_kwh > 0 and balance_cents < max(1, amount_cents(0.01, price_eur_kwh)):
        # Less than a cent, or than what 10 Wh would cost: not worth starting.
        return DenialReason.INSUFFICIENT_BALANCE
    return None
