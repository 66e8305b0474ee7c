"""python -m EV_Driver: the driver app's command line.

python -m EV_Driver --broker HOST:PORT --driver-id ID (--cp CP_ID | --file PATH) [--json]
python -m EV_Driver login --broker HOST:PORT --driver-id ID --token-file PATH
python -m EV_Driver dashboard --broker HOST:PORT [--http-port 8001]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from EV_Driver.app import DriverApp
from EV_Driver.config import ExitCode, parse_settings
from EV_Driver.output import Output
from shared.errors import ConfigError
from shared.lifecycle import Shutdown, run_service
from shared.logs import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    """Run the driver app; return the exit code (ExitCode, listed in --help)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["dashboard"]:
        from EV_Driver.dashboard import main as dashboard_main

        return dashboard_main(args[1:])
    login_only = args[:1] == ["login"]
    try:
        settings = parse_settings(args[1:] if login_only else args, login_only=login_only)
    except ConfigError as exc:
        print(f"EV_Driver: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except SystemExit as exc:  # argparse: --help (0) or bad flags (2), already printed
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    setup_logging(settings.log_level, settings.log_json)
    for problem in settings.file_problems:
        print(f"EV_Driver: {settings.source}: skipping {problem}", file=sys.stderr)

    output = Output(json_mode=settings.json)
    app: DriverApp | None = None

    async def service(shutdown: Shutdown) -> None:
        nonlocal app
        app = DriverApp(settings, output, shutdown)
        await app.run()

    code = run_service(service)
    if code != 0:
        return code  # an unexpected error, already printed: ExitCode.FAILED
    if app is None:
        return ExitCode.STOPPED  # interrupted before the app started
    return app.exit_code


if __name__ == "__main__":
    sys.exit(main())
