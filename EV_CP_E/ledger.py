"""The engine's ledger (--ledger): what was metered, a JSON line an event, for audits."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import BinaryIO

from shared.messages import CPSupplyEnded, CPTelemetry

log = logging.getLogger(__name__)


class Ledger:
    """An append-only record of what was metered: one compact JSON object a line, "event"
    first, "ts" last: when it happened, on this PC's clock (for an event, the stamp it carries
    to Central). Documented in the README (EV_CP_E's --ledger); the fleet simulator writes the
    same lines.

    Each line goes to the file in one unbuffered write, so that a process killed at once loses
    none that were written (no fsync: the operating system keeps them). The write is made in
    line, on the event loop: appending a line to a local file costs microseconds, and it is what
    lets a line be on file before the event it records is published. A write that fails is
    logged once and the line is lost; the service goes on.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = path.open("ab", buffering=0)
        self._lost = 0
        self._torn = False  # a line was cut short by a failed write: the next starts afresh

    def write(self, event: str, **fields: object) -> None:
        """Append one line: {"event": EVENT, **FIELDS}."""
        if self._file is None:
            return
        line = json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n"
        data = ("\n" + line if self._torn else line).encode()
        written = 0
        try:
            while written < len(data):
                count = self._file.write(data[written:])
                if not count:
                    raise OSError("the file took nothing")
                written += count
        except OSError as exc:
            self._torn = written > 0
            self._lost += 1
            if self._lost == 1:
                log.warning(
                    "cannot write to the ledger %s (%s): lines are lost while this lasts",
                    self.path,
                    exc.strerror or exc,
                )
            return
        self._torn = False

    def authorised(
        self,
        *,
        cp_id: str,
        session_id: str,
        driver_id: str,
        price_eur_kwh: float,
        max_kwh: float | None,
        ts: float,
    ) -> None:
        self.write(
            "authorised",
            cp_id=cp_id,
            session_id=session_id,
            driver_id=driver_id,
            price_eur_kwh=price_eur_kwh,
            max_kwh=max_kwh,
            ts=ts,
        )

    def tick(self, event: CPTelemetry, driver_id: str | None) -> None:
        self._metered("tick", event, driver_id, seq=event.seq)

    def ended(self, event: CPSupplyEnded, driver_id: str | None) -> None:
        self._metered("ended", event, driver_id, reason=event.reason.value)

    def _metered(
        self, kind: str, event: CPTelemetry | CPSupplyEnded, driver_id: str | None, **extra: object
    ) -> None:
        """A sample's or an end's line: the energy and amount so far, `extra`, "ts" last."""
        self.write(
            kind,
            cp_id=event.cp_id,
            session_id=event.session_id,
            driver_id=driver_id,
            kwh=event.kwh,
            amount_eur=event.amount_eur,
            **extra,
            ts=event.ts,
        )

    def close(self) -> None:
        """Close the file (idempotent); say how many lines were lost, if any."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.close()
        self._file = None
        if self._lost:
            log.warning("%d line(s) could not be written to the ledger %s", self._lost, self.path)
