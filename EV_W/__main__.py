"""`python -m EV_W [--provider file|openweather] ...`: run the weather service;
`python -m EV_W set PLACE TEMP [--file PATH] [--add]`: set a place's temperature in the
file provider's file (atomically)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from EV_W.config import add_file_option, parse_settings
from EV_W.places_file import PlacesFileError, parse_temperature, set_place
from EV_W.service import WeatherService
from shared.errors import ConfigError
from shared.lifecycle import Shutdown, run_service
from shared.logs import setup_logging
from shared.settings import EnvArgumentParser


def set_main(argv: Sequence[str]) -> int:
    parser = EnvArgumentParser(
        prog="EV_W set",
        description="Set a place's temperature in the file provider's file; the service "
        "reads it in its next round.",
    )
    parser.add_argument("place", help='a place, as Central names it (e.g. "Alicante")')
    parser.add_argument("temperature", help="°C, e.g. -2 or 14.5")
    add_file_option(parser)
    parser.add_argument("--add", action="store_true", help="add a place the file lacks")
    args = parser.parse_args(argv)
    try:
        temperature = parse_temperature(args.temperature)
        name = set_place(args.file, args.place, temperature, add=args.add)
    except PlacesFileError as exc:
        print(f"EV_W set: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"EV_W set: error: cannot write {args.file}: {exc}", file=sys.stderr)
        return 1
    print(f"{name}: {temperature:g} °C ({args.file})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "set":
        try:
            return set_main(args[1:])
        except ConfigError as exc:
            print(f"EV_W set: error: {exc}", file=sys.stderr)
            return 2
    try:
        settings = parse_settings(args)
    except ConfigError as exc:
        print(f"EV_W: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)

    async def serve(shutdown: Shutdown) -> None:
        await WeatherService(settings, shutdown).run()

    return run_service(serve)


if __name__ == "__main__":
    sys.exit(main())
