"""One look at a starting systemd service: does it answer its health URL, or has its process ended?

The role's health gate (tasks/run.yml) runs it on the server with the service's own Python,
every few seconds until it exits with 0 or 1. A `uri` until-loop cannot see the unit, so a server
that vLLM refused to start (a bad flag, a vanished model) used to be waited on for the whole start
timeout; this also reads systemd's state of the unit, and reports at once that its process ended:
the unit is no longer active or activating, waits for an automatic restart, or systemd restarted it
since the wait began (its NRestarts counter grew).

Usage: python -I wait_healthy.py URL UNIT NRESTARTS_WHEN_THE_WAIT_BEGAN
Exit 0: URL answered 200. Exit 1: the unit's process ended (why on stdout). Exit 3: not yet.
Standard library only; no proxy is ever used (the URL is the server's own address).
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request


def main() -> int:
    url, unit, restarts_before = sys.argv[1], sys.argv[2], sys.argv[3]
    shown = subprocess.run(
        ["systemctl", "show", "--property=ActiveState,SubState,NRestarts", unit],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    state = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    if (
        state["ActiveState"] not in ("active", "activating")
        or state["SubState"] == "auto-restart"
        or state["NRestarts"] != restarts_before
    ):
        print(
            f"its process ended during the start ({unit}: {state['ActiveState']}/"
            f"{state['SubState']}, {state['NRestarts']} automatic restarts)"
        )
        return 1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            if response.status == 200:
                return 0
    except OSError:  # refused, reset, timed out, an HTTP error status (HTTPError is an OSError)
        pass
    print(f"no answer from {url} yet")
    return 3


if __name__ == "__main__":
    sys.exit(main())
