"""What the weather tests set up: the weather service's account at Central, and EV_W itself."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from EV_Central.users import add as add_account
from procs import Deployment, ServiceProcess

WEATHER_PASSWORD = "weather-password"  # the tests' own account, not a demo one


def add_weather_account(system: Deployment) -> None:
    """The account EV_W logs in with (role weather), as `EV_Central user add` makes it."""
    with contextlib.closing(sqlite3.connect(system.db_path)) as conn:
        add_account(conn, "weather", "weather", 0.0, WEATHER_PASSWORD)


def start_weather(system: Deployment, places: Path, *flags: str) -> ServiceProcess:
    """`python -m EV_W` with the file provider on `places`, reporting to the system's Central."""
    return system._add(
        ServiceProcess(
            "weather",
            [
                "-m",
                "EV_W",
                "--central",
                f"127.0.0.1:{system.http_port}",
                "--provider",
                "file",
                "--file",
                str(places),
                *flags,
            ],
            system.workdir,
            env={"EV_WEATHER_PASSWORD": WEATHER_PASSWORD},
        )
    )
