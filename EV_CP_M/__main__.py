"""`python -m EV_CP_M --engine HOST:PORT --central HOST:PORT --cp-id ID [--broker HOST:PORT]`:
run a CP's monitor; `python -m EV_CP_M dashboard --broker HOST:PORT`: the site dashboard."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from EV_CP_M.config import parse_settings
from EV_CP_M.enrolment import enrol
from EV_CP_M.service import MonitorService
from shared.errors import ConfigError, EVError
from shared.lifecycle import Shutdown, run_service
from shared.logs import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "dashboard":
        from EV_CP_M import dashboard  # the monitor alone needs no web server

        return dashboard.main(args[1:])
    try:
        settings = parse_settings(args)
    except ConfigError as exc:
        print(f"EV_CP_M: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)
    if settings.enrolment_token:  # a new CP: its secret from the registry, once
        try:
            settings = enrol(settings)
        except ConfigError as exc:  # the token refused
            print(f"EV_CP_M: error: {exc}", file=sys.stderr)
            return 2
        except EVError as exc:  # the registry could not be asked
            print(f"EV_CP_M: error: {exc}", file=sys.stderr)
            return 1
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)

    async def serve(shutdown: Shutdown) -> None:
        await MonitorService(settings, shutdown).run()

    return run_service(serve)


if __name__ == "__main__":
    sys.exit(main())
