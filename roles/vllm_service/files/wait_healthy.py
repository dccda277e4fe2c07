"""Looks at a starting systemd service: does it answer its health URL, or has its process ended?

The role's health gate (tasks/run.yml) installs it on the server and runs it with the service's own
Python, one try after another, until it exits with 0 or 4; each try looks every half second for
about SECONDS, so that the gate sees a server within half a second of its first answer while a try
runs (a retry delay of the task's would add up to its whole length).
A `uri` until-loop cannot see the unit, so a server that vLLM refused to start (a flag it rejects,
say) used to be waited on for the whole start timeout; this also reads systemd's state of the unit,
and reports at once that its process ended: the unit is no longer active or activating, waits for an
automatic restart, or systemd restarted it since the wait began (its NRestarts counter grew).

Usage: python -I -S wait_healthy.py URL UNIT NRESTARTS_WHEN_THE_WAIT_BEGAN [SECONDS]
Exit 0: URL answered 200. Exit 4: the unit's process ended (why on stdout). Exit 3: not yet after
about SECONDS (default 0: one look; a look can take longer), including looks that could not be
made (systemctl or the request failed; why on stdout).
Standard library only; no proxy is ever used (the URL is the server's own address).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

ANSWERED, NOT_YET, ENDED = 0, 3, 4


def look(url: str, unit: str, restarts_before: str) -> tuple[int, str]:
    shown = subprocess.run(
        ["systemctl", "show", "--property=ActiveState,SubState,NRestarts", unit],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    state = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    if (
        state["ActiveState"] not in ("active", "activating")
        or state["SubState"].startswith("auto-restart")
        or state["NRestarts"] != restarts_before
    ):
        return ENDED, (
            f"its process ended during the start ({unit}: {state['ActiveState']}/"
            f"{state['SubState']}, {state['NRestarts']} automatic restarts)"
        )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            if response.status == 200:
                return ANSWERED, ""
    except Exception as error:  # refused, reset, timed out, an HTTP error status, a garbled reply
        return NOT_YET, f"no answer from {url} yet: {error}"
    return NOT_YET, f"no answer from {url} yet"


def main() -> int:
    deadline = time.monotonic() + float(sys.argv[4] if len(sys.argv) > 4 else 0)
    while True:
        try:
            code, why = look(*sys.argv[1:4])
        except Exception as error:  # systemctl failed or timed out: look again
            code, why = NOT_YET, f"could not read the unit's state: {error}"
        if code != NOT_YET or time.monotonic() >= deadline:
            print(why)
            return code
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
