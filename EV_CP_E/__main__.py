"""`python -m EV_CP_E --broker HOST:PORT --listen HOST:PORT`: run a charging point's engine."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from EV_CP_E.config import parse_settings
from EV_CP_E.service import EngineService
from shared.errors import ConfigError
from shared.lifecycle import Shutdown, run_service
from shared.logs import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ConfigError as exc:
        print(f"EV_CP_E: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)

    async def serve(shutdown: Shutdown) -> None:
        await EngineService(settings, shutdown).run()

    return run_service(serve)


if __name__ == "__main__":
    sys.exit(main())
