"""Central's console: a live panel (or event lines) on stdout, commands from stdin.

Commands: `stop CP_ID`, `stop all`, `resume CP_ID`, `resume all`, `list`, `help`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from EV_Central.audit import AuditLog
from EV_Central.cp_links import CPLinks
from EV_Central.feed import Feed
from EV_Central.registry import ChargingPoint, Registry
from EV_Central.session import SessionStatus
from shared.console import stdin_lines
from shared.messages import CPState

log = logging.getLogger(__name__)

ANSI = {
    CPState.ACTIVADO: "\033[42;30m",
    CPState.SUMINISTRANDO: "\033[102;30m",
    CPState.PARADO: "\033[43;30m",
    CPState.AVERIADO: "\033[41;97m",
    CPState.DESCONECTADO: "\033[100;97m",
}
RESET = "\033[0m"
HELP = "commands: stop CP_ID | stop all | resume CP_ID | resume all | list | help"


def cp_line(cp: ChargingPoint, colour: bool) -> str:
    state = cp.state.value
    label = f"{ANSI[cp.state]} {state:<13} {RESET}" if colour else f"{state:<13}"
    line = f"{cp.id:<8} {label} {cp.location[:34]:<34} {cp.price_eur_kwh:5.2f} €/kWh"
    s = cp.session
    if s is not None:
        line += f"  {s.status.lower():<10} {s.driver_id:<8}"
        if s.status != SessionStatus.AUTHORISED:
            line += f" {s.kw:6.2f} kW {s.kwh:8.4f} kWh {s.amount_eur:7.2f} €"
    return line


class Console:
    def __init__(
        self, registry: Registry, feed: Feed, links: CPLinks, audit: AuditLog, mode: str
    ) -> None:
        self.registry = registry
        self.feed = feed
        self.links = links
        self.audit = audit
        if mode == "auto":
            mode = "panel" if sys.stdout.isatty() else "log"
        self.mode = mode
        self._redraw = asyncio.Event()
        self._message = ""
        if mode == "panel":
            feed.on_cps(lambda _cps: self._redraw.set())
            feed.on_event(lambda _e: self._redraw.set())
            # The panel shows every event; log lines would scribble over it.
            logging.getLogger("EV_Central.feed").setLevel(logging.WARNING)

    def render(self) -> str:
        cps = self.registry.sorted()
        lines = ["\033[H\033[2J" + "EV_Central".ljust(30) + time.strftime("%H:%M:%S"), ""]
        lines += [cp_line(cp, colour=True) for cp in cps]
        requests = [cp for cp in cps if cp.session is not None]
        lines += ["", f"in progress: {len(requests)}"]
        lines += ["", "recent events:"]
        for event in list(self.feed.events)[-8:]:
            lines.append("  " + time.strftime("%H:%M:%S ", time.localtime(event.ts)) + event.text)
        lines += ["", HELP, self._message, "> "]
        return "\n".join(lines)

    async def run(self) -> None:
        if self.mode == "off":
            return
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._commands())
            if self.mode == "panel":
                tasks.create_task(self._draw())

    async def _draw(self) -> None:
        while True:
            sys.stdout.write(self.render())
            sys.stdout.flush()
            self._redraw.clear()
            # Redraw on change, at most 4 times a second, and every second for live figures.
            await asyncio.sleep(0.25)
            try:
                await asyncio.wait_for(self._redraw.wait(), 1.0)
            except TimeoutError:
                pass

    def _say(self, text: str) -> None:
        self._message = text
        if self.mode == "log":
            print(text, flush=True)
        self._redraw.set()

    async def _commands(self) -> None:
        async for line in stdin_lines():
            words = line.split()
            if not words:
                continue
            verb = words[0].lower()
            if verb in ("stop", "resume") and len(words) == 2:
                try:
                    affected = await self.links.set_service(words[1], verb == "resume")
                except (LookupError, ValueError) as exc:  # unknown CP; frost holds it
                    self._say(f"error: {exc}")
                    outcome, detail = "failed", f"{words[1]}: {exc}"
                else:
                    self._say(f"{verb}: {', '.join(affected)}")
                    outcome, detail = "ok", f"{words[1]}: {', '.join(affected)}"
                # Whoever can type into Central's terminal: the console has no login of its own.
                await self.audit.record(
                    verb, outcome, actor="console", source="console", detail=detail
                )
            elif verb == "list":
                self._say("\n".join(cp_line(cp, colour=False) for cp in self.registry.sorted()))
            else:
                self._say(HELP)
