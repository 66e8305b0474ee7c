"""One logged-in driver on the dashboard: its browsers, its supply, its file run.

A room exists while at least one browser is logged in as its driver. Every update Central
sends that driver goes through the room's DriverFlow (the same decisions as the CLI app),
and the resulting events are pushed to every browser of the room, never to another's.
The room owns its tasks (the outbox sender, a request being followed, a file run) and
cancels them when its last browser leaves or the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from EV_Driver.dashboard_protocol import (
    FileRun,
    Push,
    RunItem,
    SupplyPanel,
    balance_push,
    history_push,
)
from EV_Driver.flow import (
    DriverFlow,
    Event,
    Following,
    Outcome,
    Phase,
    Reaction,
    Requested,
    TicketShown,
    Tracked,
)
from EV_Driver.requests_file import RequestsFileError, parse_requests
from shared.backoff import Backoff
from shared.bus import BusError
from shared.messages import (
    DriverHistory,
    DriverStatus,
    DriverUpdate,
    HistoryQuery,
    LoginResult,
    Message,
    SessionInfo,
    StopRequest,
    SupplyAuthorized,
    SupplyProgress,
    SupplyRequest,
    SupplyStarted,
)
from shared.webapp import dumps

log = logging.getLogger(__name__)

OUTBOX_SIZE = 200
SEND_ATTEMPTS = 3
MAX_ENDED = 200  # session ids whose ticket was shown (never adopted again)
MAX_QUERIES = 20


class Client(Protocol):
    """A browser connection as the room sees it."""

    def send_text(self, text: str) -> None: ...


Publish = Callable[[Message], Awaitable[None]]


class Signal:
    """Wakes every coroutine waiting at the moment it fires."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class DriverRoom:
    def __init__(
        self,
        driver_id: str,
        publish: Publish,
        *,
        pause: float = 4.0,
        answer_timeout: float = 30.0,
        balance_eur: float | None = None,
    ) -> None:
        self.driver_id = driver_id
        self.clients: set[Client] = set()
        self.flow = DriverFlow(driver_id)
        self.panel = SupplyPanel()
        self.run: FileRun | None = None
        self.balance_eur = balance_eur
        self.history: Push | None = None
        self.last_cps = ""  # the CP list last pushed (the server pushes only changes)
        self._publish = publish
        self._pause = pause
        self._answer_timeout = answer_timeout
        self._signal = Signal()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=OUTBOX_SIZE)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._run_task: asyncio.Task[None] | None = None
        self._status_queries: set[str] = set()
        self._history_queries: deque[str] = deque(maxlen=MAX_QUERIES)
        self._ended: deque[str] = deque(maxlen=MAX_ENDED)
        self._closed = False

    # --- life -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the outbox sender; ask Central for the driver's status and history."""
        self._spawn(self._send_outbox(), f"outbox-{self.driver_id}")
        query = self.flow.status_query()
        self._status_queries.add(query.id)
        self._queue(query)
        self.refresh()

    async def close(self) -> None:
        """Cancel and await every task of the room (idempotent)."""
        self._closed = True
        tasks, self._tasks = set(self._tasks), set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "task %s of driver %s failed",
                task.get_name(),
                self.driver_id,
                exc_info=task.exception(),
            )
            self.broadcast({"type": "notice", "level": "error", "text": "internal error"})

    # --- browsers ---------------------------------------------------------------------------

    def attach(self, client: Client) -> None:
        """Bind a browser and bring it up to date."""
        self.clients.add(client)
        for push in self.snapshot():
            client.send_text(dumps(push))

    def detach(self, client: Client) -> bool:
        """Unbind a browser; True when it was the last one."""
        self.clients.discard(client)
        return not self.clients

    @property
    def active_cp(self) -> str | None:
        """The CP of this driver's supply in progress (authorised or supplying), if any."""
        current = self.flow.current
        if current is None or current.session_id is None or current.outcome is not None:
            return None
        return current.cp_id

    def snapshot(self) -> list[Push]:
        pushes: list[Push] = [balance_push(self.balance_eur), self.panel.snapshot()]
        if self.panel.last_ticket is not None:
            pushes.append(self.panel.last_ticket)
        if self.history is not None:
            pushes.append(self.history)
        pushes.append(self.run.as_push() if self.run else {"type": "run", "run": None})
        return pushes

    def broadcast(self, push: Push) -> None:
        self.broadcast_text(dumps(push))

    def broadcast_text(self, text: str) -> None:
        for client in list(self.clients):
            client.send_text(text)

    # --- commands from the browsers -----------------------------------------------------------

    def request_supply(self, cp_id: str) -> str | None:
        """Ask for a supply at `cp_id` and follow it; the reason when it cannot be asked."""
        if self.run is not None and not self.run.finished:
            return "a file of requests is running; cancel it first"
        if self.flow.busy:
            return "a supply is already in progress; stop it or wait for its ticket"
        request, tracked = self._begin(cp_id, None)
        self._spawn(self._follow(request, tracked), f"request-{self.driver_id}-{cp_id}")
        return None

    def stop_supply(self) -> str | None:
        current = self.flow.current
        if current is None or not self.flow.busy:
            return "no supply in progress"
        self._queue(StopRequest(driver_id=self.driver_id, session_id=current.session_id))
        self.broadcast({"type": "notice", "level": "info", "text": f"stop sent to {current.cp_id}"})
        return None

    def start_run(self, name: str, text: str) -> str | None:
        """Run a file of requests one at a time; the reason when it cannot start."""
        if self.run is not None and not self.run.finished:
            return "a file of requests is already running; cancel it first"
        if self.flow.busy:
            return "a supply is in progress; stop it or wait for its ticket first"
        source = name or "file"
        try:
            parsed = parse_requests(text, source)
        except RequestsFileError as exc:
            return str(exc)
        run = FileRun(
            name=source,
            items=[RunItem(cp_id) for cp_id in parsed.cp_ids],
            problems=[f"{source}: skipping {problem}" for problem in parsed.problems],
        )
        self.run = run
        self.broadcast(run.as_push())
        self._run_task = self._spawn(self._run_file(run), f"file-run-{self.driver_id}")
        return None

    def cancel_run(self) -> str | None:
        run, task = self.run, self._run_task
        if run is None or run.finished:
            return "no file of requests is running"
        run.cancel()
        if task is not None:
            task.cancel()
        self._run_task = None
        self.broadcast(run.as_push())
        if self.flow.busy:
            self.broadcast(
                {
                    "type": "notice",
                    "level": "info",
                    "text": "file cancelled; the supply in progress goes on (Stop ends it)",
                }
            )
        return None

    def refresh(self) -> None:
        query = HistoryQuery(driver_id=self.driver_id)
        self._history_queries.append(query.id)
        self._queue(query)

    # --- updates from Central -----------------------------------------------------------------

    def handle(self, update: DriverUpdate) -> None:
        """One update addressed to this driver (the server checked the key and the id)."""
        if isinstance(update, LoginResult):
            return
        if isinstance(update, DriverHistory):
            if update.request_id in self._history_queries and update.known:
                self.history = history_push(update)
                self._set_balance(update.balance_eur)
                self.broadcast(self.history)
            return
        if isinstance(update, DriverStatus):
            if update.request_id not in self._status_queries:
                return  # another app's query for the same driver
            self._status_queries.discard(update.request_id)
            self._set_balance(update.balance_eur)
        self._adopt(update)
        self._apply(self.flow.handle(update))
        self._signal.fire()

    def _set_balance(self, balance_eur: float | None) -> None:
        if balance_eur is not None and balance_eur != self.balance_eur:
            self.balance_eur = balance_eur
            self.broadcast(balance_push(balance_eur))

    def _adopt(self, update: DriverUpdate) -> None:
        """Follow a session of this driver that nobody here asked for.

        It was asked at the CP's own menu, by the driver's CLI app, or answered after this
        room gave up waiting: a driver has one session at a time, so it is the driver's.
        """
        if not isinstance(update, SupplyAuthorized | SupplyStarted | SupplyProgress):
            return
        if self.flow.busy or update.session_id in self._ended:
            return
        authorised = isinstance(update, SupplyAuthorized)
        self.flow.current = Tracked(
            cp_id=update.cp_id,
            request_id=None,
            session_id=update.session_id,
            phase=Phase.ACCEPTED if authorised else Phase.SUPPLYING,
        )
        figures = update if isinstance(update, SupplyProgress) else None
        info = SessionInfo(
            session_id=update.session_id,
            cp_id=update.cp_id,
            status="ACCEPTED" if authorised else "SUPPLYING",
            kw=figures.kw if figures else 0.0,
            kwh=figures.kwh if figures else 0.0,
            amount_eur=figures.amount_eur if figures else 0.0,
        )
        self._emit(Following(self.driver_id, info))

    def _apply(self, reaction: Reaction) -> None:
        for event in reaction.events:
            self._emit(event)
        for ack in reaction.acks:
            self._queue(ack)

    def _emit(self, event: Event) -> None:
        for push in self.panel.apply(event):
            self.broadcast(push)
        if self.run is not None and self.run.apply(event):
            self.broadcast(self.run.as_push())
        if isinstance(event, TicketShown):
            self._ended.append(event.ticket.session_id)
            self.refresh()  # the balance and the history changed

    # --- requests -----------------------------------------------------------------------------

    def _begin(self, cp_id: str, item: RunItem | None) -> tuple[SupplyRequest, Tracked]:
        request = self.flow.request(cp_id)
        tracked = self.flow.current
        assert tracked is not None
        if item is not None:
            item.status, item.request_id, item.sent_at = "requested", request.id, time.time()
        self._emit(Requested(self.driver_id, cp_id, request.id))
        return request, tracked

    async def _follow(self, request: SupplyRequest, tracked: Tracked) -> Outcome | None:
        """Send a request, then wait until it is denied, given up, or its ticket arrives."""
        if not await self._send(request):
            self._apply(self.flow.give_up(f"cannot reach Kafka to ask for {tracked.cp_id}"))
            return tracked.outcome
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._answer_timeout
        while tracked.phase is not Phase.DONE:
            if tracked.phase is Phase.REQUESTED:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._apply(
                        self.flow.give_up(
                            f"no answer from Central about {tracked.cp_id} "
                            f"after {self._answer_timeout:g} s"
                        )
                    )
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._signal.wait()
            else:
                await self._signal.wait()
        return tracked.outcome

    async def _run_file(self, run: FileRun) -> None:
        for index, item in enumerate(run.items):
            if index:
                # The brief's rule: 4 s between two requests, whatever the last outcome.
                run.next_at = time.time() + self._pause
                self.broadcast(run.as_push())
                await asyncio.sleep(self._pause)
                run.next_at = None
            while self.flow.busy:  # a session adopted meanwhile finishes first
                await self._signal.wait()
            request, tracked = self._begin(item.cp_id, item)
            self.broadcast(run.as_push())
            await self._follow(request, tracked)
        run.state = "done"
        self.broadcast(run.as_push())

    # --- publishing ---------------------------------------------------------------------------

    def _queue(self, message: Message) -> None:
        if self._closed:
            return
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning(
                "outbox of driver %s full; dropping a %s", self.driver_id, type(message).__name__
            )

    async def _send_outbox(self) -> None:
        while True:
            message = await self._outbox.get()
            if not await self._send(message):
                log.warning("could not send a message for driver %s", self.driver_id)

    async def _send(self, message: Message) -> bool:
        backoff = Backoff(maximum=2.0)
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                await self._publish(message)
                return True
            except BusError as exc:
                if attempt == SEND_ATTEMPTS:
                    self.broadcast(
                        {"type": "notice", "level": "error", "text": "cannot reach Kafka"}
                    )
                    log.warning("%s (gave up after %d attempts)", exc, attempt)
                    return False
                delay = backoff.next_delay()
                log.warning("%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
        return False
