"""python -m EV_Central [--port 5000] --broker HOST:PORT [--db PATH] [--http-port 8002]
python -m EV_Central ctl [--central HOST:HTTP_PORT] [--user admin] (stop|resume) (CP_ID|all)
python -m EV_Central ctl ... (register CP_ID --location T --price EUR --max-kw KW |
                              revoke-key CP_ID | reset-secret CP_ID)
python -m EV_Central user [--db PATH] (add ID --role driver|admin | passwd ID | list)
python -m EV_Central audit (verify|show) [--db PATH]
python -m EV_Central kafka-access --broker B --kafka-ca CA --kafka-password-file F
                                  (setup DIR [CP_ID ...] | cp CP_ID DIR | password NAME DIR |
                                  withdraw NAME)
"""

from __future__ import annotations

import sys

from EV_Central import audit_cli, config, ctl, kafka_cli, users
from shared.errors import ConfigError
from shared.lifecycle import run_service
from shared.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["ctl"]:
            return ctl.main(args[1:])
        if args[:1] == ["audit"]:
            return audit_cli.main(args[1:])
        if args[:1] == ["user"]:
            return users.main(args[1:])
        if args[:1] == ["kafka-access"]:
            return kafka_cli.main(args[1:])
        settings = config.parse(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)
    # Imported here: the command lines above (audit, user, ctl) work on the database or over
    # HTTP and need none of Central's service.
    from EV_Central.app import run_central

    return run_service(lambda shutdown: run_central(settings, shutdown))


if __name__ == "__main__":
    sys.exit(main())
