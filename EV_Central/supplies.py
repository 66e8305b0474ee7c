"""The supply lifecycle at Central: requests, plug-in, telemetry, ending and settling.

The rules are in EV_Central/session.py; this module gives them what they need (the session,
the driver's balance, the CP), then writes what they decided in one transaction: the session,
the debit, the handled message id and the messages to publish (the outbox). Live figures and
notices that the next one replaces are posted after the commit, without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from EV_Central.authorisation import CPOffer, SupplyAsk, decide_supply
from EV_Central.context import Context, Part
from EV_Central.registry import ChargingPoint
from EV_Central.session import Effects, EngineReport, Session, SessionStatus, Timers, stray_plug
from EV_Central.store import StoreTx
from shared.messages import (
    CPAuthorisation,
    CPPlugged,
    CPSupplyEnded,
    CPTelemetry,
    EndReason,
    new_id,
)

log = logging.getLogger(__name__)


class Supplies(Part):
    def __init__(self, context: Context, timers: Timers) -> None:
        super().__init__(context)
        self._timers = timers
        # Telemetry of one consumer poll, written in one transaction (latest per session).
        self._telemetry: dict[str, tuple[ChargingPoint, Session]] = {}
        # Sessions someone waits to see released from their CP (`end_and_settle`).
        self._released: dict[str, asyncio.Event] = {}

    async def load(self) -> int:
        """Give each CP the session it was busy with when Central stopped; returns how many."""
        now = time.time()
        active = await self._store.active_sessions()
        for session in active:
            cp = self._registry.get(session.cp_id)
            if cp is None:
                continue
            # Restarted: give engines time to report what happened while we were away.
            session.last_telemetry_at = now
            if session.status == SessionStatus.ENDING:
                session.settle_deadline = now + self._timers.monitor_grace
            elif session.status == SessionStatus.ASKED:
                session.answer_deadline = now + self._timers.cp_answer_timeout
            cp.session = session
        return len(active)

    # --- requests ------------------------------------------------------------------------------

    async def request(self, ask: SupplyAsk) -> None:
        """A driver (or a CP's own menu) asks for a supply: authorise it or deny it."""
        now = time.time()
        cp = self._registry.get(ask.cp_id)
        async with self._store.transaction() as tx:
            if await tx.seen(ask.request_id):
                return
            account = await tx.account(ask.driver_id)
            offer = None
            if cp is not None:
                available = cp.available
                detail = "" if available else cp.unavailable_detail()
                offer = CPOffer(cp.id, cp.price_eur_kwh, cp.max_kw, available, detail)
            session, effects = decide_supply(
                ask,
                offer,
                driver_known=account is not None and account[0] == "driver",
                driver_busy=await tx.driver_busy(ask.driver_id),
                balance_cents=account[1] if account else 0,
                session_id=new_id()[:16],
                now=now,
                timers=self._timers,
            )
            await tx.insert_session(session)
            await tx.publish(effects.publish)
            if cp is not None and session.status.active:
                # Reserve the CP before the commit yields, so no other request can take it.
                cp.session = session
            await tx.mark_processed(ask.request_id)
        await self._after(cp, session, effects)

    # --- the engine's events -----------------------------------------------------------------

    async def answered(self, event: CPAuthorisation, answered_at: float | None = None) -> None:
        """The engine accepted or refused an authorisation Central asked it for (at
        `answered_at`, its clock's time converted to Central's, when known)."""

        async def decide(tx: StoreTx, session: Session | None) -> Effects:
            if session is None:
                return Effects()
            deadline = session.answer_deadline
            if answered_at is not None and deadline and session.status == SessionStatus.ASKED:
                asked = deadline - self._timers.cp_answer_timeout
                self._clocks.hops.add("Central → engine", answered_at - asked)
            return session.engine_answered(event.cp_id, event.accepted, event.reason, time.time())

        await self._engine_event(event, decide)

    async def plugged(self, event: CPPlugged, at: float | None = None) -> None:
        """A vehicle was plugged in (at `at`, Central's clock): the supply starts (or a stray
        plug is stopped)."""

        async def decide(tx: StoreTx, session: Session | None) -> Effects:
            if session is None:
                return stray_plug(event.cp_id, event.session_id)
            now = time.time()
            return session.plugged(event.cp_id, now if at is None else at, now)

        await self._engine_event(event, decide)

    def stage_telemetry(self, event: CPTelemetry) -> None:
        """Take a telemetry sample into memory; `flush_telemetry` makes it durable."""
        cp = self._registry.get(event.cp_id)
        session = cp.session if cp is not None else None
        if cp is None or session is None or session.session_id != event.session_id:
            return  # late figures of a settled session: its final event carries the total
        if session.telemetry(event, time.time()):
            self._telemetry[session.session_id] = (cp, session)

    async def flush_telemetry(self) -> None:
        """Write the staged telemetry in one transaction, then tell drivers and check balances.

        Runs before any other event is handled and at the end of every consumer poll, before
        the offsets are committed: a sample is durable before its offset is.
        """
        if not self._telemetry:
            return
        staged, self._telemetry = self._telemetry, {}
        started = time.perf_counter()
        drivers = sorted({session.driver_id for _, session in staged.values()})
        async with self._store.transaction() as tx:
            await tx.save_telemetry(session for _, session in staged.values())
            balances = await tx.balances(drivers)
        self._stats.handler_seconds["telemetry_batch"].observe(time.perf_counter() - started)
        for cp, session in staged.values():
            self._feed.changed(cp)
            progress = session.progress()
            await self._bus.post(progress.topic, progress.key, progress.message)
            if cp.session is session and session.balance_exhausted(
                balances.get(session.driver_id, 0)
            ):
                await self.end(cp, EndReason.BALANCE_EXHAUSTED)

    async def engine_ended(self, event: CPSupplyEnded, started_at: float | None = None) -> None:
        """The engine's final figures: the session is settled, or its ticket corrected.
        `started_at` is when the engine says the supply started, on Central's clock."""

        async def decide(tx: StoreTx, session: Session | None) -> Effects:
            if session is None:
                return Effects()
            report = EngineReport(event.cp_id, event.kwh, event.reason, started_at)
            balance = await tx.balance(session.driver_id)
            return session.engine_ended(report, balance, time.time())

        await self._engine_event(event, decide)

    async def _engine_event(
        self,
        event: CPAuthorisation | CPPlugged | CPSupplyEnded,
        decide: Callable[[StoreTx, Session | None], Awaitable[Effects]],
    ) -> None:
        """Handle an engine's event about a session once: what `decide` returns is written in
        one transaction with the event's id, then carried out."""
        cp = self._registry.get(event.cp_id)
        async with self._store.transaction() as tx:
            if await tx.seen(event.id):
                return
            session = await self._find(tx, cp, event.session_id)
            effects = await decide(tx, session)
            await self._write(tx, session, effects)
            await tx.mark_processed(event.id)
        await self._after(cp, session, effects)

    # --- ending and settling -----------------------------------------------------------------

    async def end(self, cp: ChargingPoint, reason: EndReason) -> None:
        """Start ending a CP's session (no-op when it has none or it is ending already)."""
        session = cp.session
        if session is None:
            return
        effects = session.end(reason, time.time(), self._timers)
        if not effects.save:
            return
        async with self._store.transaction() as tx:
            await self._write(tx, session, effects)
        await self._after(cp, session, effects)

    async def end_and_settle(self, cp: ChargingPoint, reason: EndReason) -> str | None:
        """End a CP's session and wait until it is settled (a CP being deregistered).

        The engine's final figures are waited for as after any end (`end_grace`, plus a
        second for the message's way); without them the session is settled with its last
        telemetry's energy. Returns the settled session's id, or None when there was none.
        """
        session = cp.session
        if session is None:
            return None
        released = self._released[session.session_id] = asyncio.Event()
        try:
            await self.end(cp, reason)
            if cp.session is session:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(released.wait(), self._timers.end_grace + 1.0)
        finally:
            del self._released[session.session_id]
        if cp.session is session:
            await self.settle_now(cp)
        if cp.session is session:  # still not settled (nothing to settle): let it go
            cp.session = None
        return session.session_id

    async def settle_now(self, cp: ChargingPoint) -> None:
        """Settle an ending session with the energy of its last telemetry."""
        session = cp.session
        if session is None:
            return
        async with self._store.transaction() as tx:
            balance = await tx.balance(session.driver_id)
            effects = session.settle_now(balance, time.time())
            await self._write(tx, session, effects)
        await self._after(cp, session, effects)

    async def no_answer(self, cp: ChargingPoint) -> None:
        """The CP's engine did not answer an authorisation in time: the request is denied."""
        session = cp.session
        if session is None:
            return
        effects = session.no_answer(self._timers)
        async with self._store.transaction() as tx:
            await self._write(tx, session, effects)
        await self._after(cp, session, effects)

    async def check_timers(self, now: float) -> None:
        """Answers not given, authorisation expiry, settle deadlines and lost engines."""
        for cp in list(self._registry.cps.values()):
            session = cp.session
            if session is None:
                continue
            try:
                if session.answer_due(now):
                    await self.no_answer(cp)
                elif session.settle_due(now):
                    await self.settle_now(cp)
                elif (reason := session.end_due(now, self._timers)) is not None:
                    await self.end(cp, reason)
            except Exception:
                log.exception("timer handling failed for %s", cp.id)

    # --- applying what the rules decided ---------------------------------------------------------

    @staticmethod
    async def _find(tx: StoreTx, cp: ChargingPoint | None, session_id: str) -> Session | None:
        """The session, live on its CP or as the database has it."""
        if cp is not None and cp.session is not None and cp.session.session_id == session_id:
            return cp.session
        return await tx.session(session_id)

    @staticmethod
    async def _write(tx: StoreTx, session: Session | None, effects: Effects) -> None:
        if session is not None and effects.save:
            await tx.save_session(session)
            await tx.debit(session.driver_id, effects.debit_cents)
        await tx.publish(effects.publish)

    async def _after(
        self, cp: ChargingPoint | None, session: Session | None, effects: Effects
    ) -> None:
        """After the commit: post live messages, log, release the CP, tell who shows it."""
        for send in effects.post:
            await self._bus.post(send.topic, send.key, send.message)
        for note in effects.notes:
            driver_id = session.driver_id if session else None
            cp_id = session.cp_id if session else None
            self._feed.note(note.kind, note.text, cp_id, driver_id)
        if effects.save:
            self._feed.sessions_changed()
        if cp is None or session is None:
            return
        if (
            effects.release
            and cp.session is not None
            and cp.session.session_id == session.session_id
        ):
            cp.session = None
            if (released := self._released.get(session.session_id)) is not None:
                released.set()
        if cp.session is session or effects.release:
            self._feed.changed(cp)
