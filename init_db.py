"""Create and seed the EV Central SQLite database.

    python init_db.py [--db PATH] [--reset] [--no-seed]

Idempotent: running it again adds only what is missing. --reset deletes the file first.
"""

from __future__ import annotations

import sys

from EV_Central.schema import initialise
from shared.settings import EnvArgumentParser

DEFAULT_DB = "data/ev_charging.db"


def main(argv: list[str] | None = None) -> int:
    parser = EnvArgumentParser(prog="init_db.py", description=__doc__.splitlines()[0])
    parser.add_option("--db", default=DEFAULT_DB, help="path of the SQLite database file")
    parser.add_argument("--reset", action="store_true", help="delete the database first")
    parser.add_argument("--no-seed", action="store_true", help="create the schema only")
    args = parser.parse_args(argv)
    try:
        cps, users = initialise(args.db, reset=args.reset, seed=not args.no_seed)
    except OSError as exc:
        print(f"error: cannot create the database at {args.db}: {exc}", file=sys.stderr)
        return 1
    print(f"database ready at {args.db} ({cps} charging points and {users} accounts added)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
