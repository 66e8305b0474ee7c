"""HTTP reads from inside a simulated host: run with `ip netns exec NS python probe.py`.

Reads one URL a line on stdin and answers each with one JSON line on stdout:
`{"status": 200, "body": ...}` or `{"error": "..."}`. It lives as long as its stdin, so a test
reads Central's API from another host without a process start per request.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

MAX_BODY = 4 * 1024 * 1024


# No proxy from the environment: every request stays inside the simulated network.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, timeout: float) -> dict[str, object]:
    try:
        with OPENER.open(url, timeout=timeout) as resp:
            return {"status": resp.status, "body": json.loads(resp.read(MAX_BODY))}
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read(MAX_BODY) or b"null")
        except ValueError:
            body = None
        return {"status": exc.code, "body": body}
    except (OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    for line in sys.stdin:
        url = line.strip()
        if url:
            print(json.dumps(get(url, timeout)), flush=True)


if __name__ == "__main__":
    main()
