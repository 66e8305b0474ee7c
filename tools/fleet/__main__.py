"""python -m tools.fleet --central HOST:PORT --broker HOST:PORT --admin HOST:PORT --cps N ...

Or `python -m tools.fleet seed --db PATH --cps N [--supplying F]` to register the CPs and
driver accounts in Central's database before Central starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from tools.fleet.sim import Fleet, FleetConfig, cp_ids, driver_ids, seed_database


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["seed"]:
        p = argparse.ArgumentParser(prog="python -m tools.fleet seed")
        p.add_argument("--db", required=True)
        p.add_argument("--cps", type=int, required=True)
        p.add_argument("--supplying", type=float, default=0.2)
        p.add_argument("--prefix", default="SIM")
        a = p.parse_args(argv[1:])
        drivers = max(1, round(a.cps * a.supplying))
        seed_database(a.db, cp_ids(a.prefix, a.cps), driver_ids(a.prefix, drivers))
        print(f"seeded {a.cps} CPs and {drivers} drivers into {a.db}")
        return 0
    p = argparse.ArgumentParser(prog="python -m tools.fleet", description=__doc__)
    p.add_argument("--central", required=True, help="Central's monitor port HOST:PORT")
    p.add_argument("--broker", required=True, help="Kafka HOST:PORT")
    p.add_argument("--admin", required=True, help="Central's admin HOST:PORT")
    p.add_argument("--cps", type=int, default=1000)
    p.add_argument("--supplying", type=float, default=0.2, help="share of CPs supplying")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    p.add_argument("--request-rate", type=float, default=100.0, help="first requests a second")
    p.add_argument("--lose", type=int, default=10, help="CPs cut off near the end")
    p.add_argument("--prefix", default="SIM", help="CP id prefix")
    p.add_argument("--central-pid", type=int, help="Central's pid (default: looked up)")
    p.add_argument(
        "--db",
        help="Central's database: insert the driver accounts (and the CPs, which Central loads"
        " at start; CPs it does not know are registered over the admin WebSocket)",
    )
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet %(message)s")
    pid = a.central_pid
    if pid is None:
        from tools.fleet.procstat import find_pid

        pid = find_pid("EV_Central", a.central.rsplit(":", 1)[1])
    config = FleetConfig(
        central=a.central,
        broker=a.broker,
        admin=a.admin,
        cps=a.cps,
        supplying=a.supplying,
        duration=a.duration,
        warmup=a.warmup,
        request_rate=a.request_rate,
        lose=a.lose,
        prefix=a.prefix,
        central_pid=pid,
        db=a.db,
    )
    result = asyncio.run(Fleet(config).run())
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
