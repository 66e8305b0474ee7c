"""A process with its clock shifted, for tests and the chaos tool: libfaketime (Debian's
`faketime` package) preloaded into the process itself.

Not the `faketime` command: it runs the program as a child of its own, so a signal sent to the
process one started (a kill -9) would leave the program running on.
"""

from __future__ import annotations

import glob

# Where Debian and most distributions put the library.
LIBRARY_PATTERNS = (
    "/usr/lib/*/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)


def library() -> str:
    """The path of libfaketime; RuntimeError naming the package when it is not installed."""
    for pattern in LIBRARY_PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise RuntimeError(
        "libfaketime not found: install the faketime package (apt-get install faketime)"
    )


def shifted_clock(shift: str) -> dict[str, str]:
    """Environment variables that run a process with its clock `shift` away ("+60s", "-90s")."""
    return {"LD_PRELOAD": library(), "FAKETIME": shift}
