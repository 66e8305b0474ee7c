"""`python -m EV_Registry --central HOST:HTTP_PORT --tls-cert PEM --tls-key PEM`: the REST API
for registering, deregistering and enrolling charging points (docs/registry.md)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from EV_Registry.config import check_files, parse_settings
from EV_Registry.service import serve
from shared.errors import ConfigError
from shared.lifecycle import Shutdown, run_service
from shared.logs import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
        check_files(settings)
    except ConfigError as exc:
        print(f"EV_Registry: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)

    async def run(shutdown: Shutdown) -> None:
        await serve(settings, shutdown)

    return run_service(run)


if __name__ == "__main__":
    sys.exit(main())
