"""The health gate's probe (roles/vllm_service/files/wait_healthy.py), run as the role runs it.

`python -I -S wait_healthy.py URL UNIT NRESTARTS [SECONDS]` with a stand-in `systemctl` first on
PATH (it prints the unit state a test gives it, in `systemctl show`'s format) and a real HTTP server
on loopback for the health URL. The exit code is the gate's contract: 0 healthy, 4 the process ended
(the gate fails at once), 3 not yet (the gate looks again); with SECONDS it keeps looking that long.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

Server = http.server.ThreadingHTTPServer
PROBE = Path(__file__).resolve().parents[2] / "roles/vllm_service/files/wait_healthy.py"
ANSWERED, NOT_YET, ENDED = 0, 3, 4


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health(serve: Callable[[Server], Server]) -> Iterator[Server]:
    yield serve(Server(("127.0.0.1", 0), _Health))
    _Health.status = 200


def _url(server: Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/health"


def _probe(
    tmp_path: Path,
    url: str,
    shown: str | None,
    restarts_before: str = "0",
    seconds: float | None = None,
    **env: str,
) -> tuple[int, str]:
    """Run the probe; `shown` is what `systemctl show` prints, None makes systemctl fail. The
    stand-in answers only the question the probe must ask (else it fails, as a wrong unit would)."""
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir(exist_ok=True)
    asked = '[ "$*" = "show --property=ActiveState,SubState,NRestarts vllm.service" ] || exit 2'
    if shown is None:
        fake.write_text(f"#!/bin/sh\n{asked}\necho 'Failed to connect to bus' >&2\nexit 1\n")
    else:
        lines = " ".join(repr(part) for part in shown.split())
        fake.write_text(f"#!/bin/sh\n{asked}\nprintf '%s\\n' {lines}\n")
    fake.chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(PROBE), url, "vllm.service", restarts_before]
        + ([] if seconds is None else [str(seconds)]),
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{fake.parent}:/usr/bin:/bin", **env},
    )
    return done.returncode, done.stdout.strip()


RUNNING = "ActiveState=active SubState=running NRestarts=0"


def test_a_running_unit_that_answers_is_healthy(tmp_path: Path, health: Server) -> None:
    assert _probe(tmp_path, _url(health), RUNNING) == (ANSWERED, "")


def test_a_proxy_in_the_environment_is_not_used(tmp_path: Path, health: Server) -> None:
    dead = "http://127.0.0.1:9"
    assert _probe(tmp_path, _url(health), RUNNING, http_proxy=dead, HTTP_PROXY=dead)[0] == ANSWERED


def test_a_starting_server_that_does_not_answer_yet_is_not_yet(
    tmp_path: Path, health: Server
) -> None:
    _Health.status = 503
    code, why = _probe(tmp_path, _url(health), "ActiveState=activating SubState=start NRestarts=0")
    assert code == NOT_YET and why.startswith("no answer from"), why


def test_a_refused_connection_is_not_yet(tmp_path: Path, health: Server) -> None:
    url = _url(health)
    health.shutdown()
    health.server_close()
    code, why = _probe(tmp_path, url, RUNNING)
    assert code == NOT_YET and "no answer from" in why, why


@pytest.mark.parametrize(
    ("shown", "restarts_before", "state"),
    [
        ("ActiveState=failed SubState=failed NRestarts=0", "0", "failed/failed, 0 automatic"),
        ("ActiveState=inactive SubState=dead NRestarts=0", "0", "inactive/dead"),
        ("ActiveState=activating SubState=auto-restart NRestarts=2", "2", "/auto-restart"),
        ("ActiveState=active SubState=running NRestarts=1", "0", "active/running, 1 automatic"),
    ],
    ids=["failed", "stopped", "waiting-for-an-automatic-restart", "restarted-since-the-wait-began"],
)
def test_an_ended_process_fails_the_gate_at_once_even_if_the_url_answers(
    tmp_path: Path, health: Server, shown: str, restarts_before: str, state: str
) -> None:
    code, why = _probe(tmp_path, _url(health), shown, restarts_before)
    assert code == ENDED, why
    assert why.startswith("its process ended during the start (vllm.service: "), why
    assert state in why, why


def test_an_unreadable_unit_state_is_not_yet(tmp_path: Path, health: Server) -> None:
    code, why = _probe(tmp_path, _url(health), None)
    assert code == NOT_YET and why.startswith("could not read the unit's state"), why
    assert "returned non-zero exit status 1" in why, why  # systemctl's failure, not a bug


def test_within_its_seconds_it_sees_a_server_as_soon_as_it_answers(
    tmp_path: Path, health: Server
) -> None:
    _Health.status = 503
    began = time.monotonic()
    answers = threading.Timer(1.0, lambda: setattr(_Health, "status", 200))
    answers.start()
    try:
        assert _probe(tmp_path, _url(health), RUNNING, seconds=20) == (ANSWERED, "")
        # within about half a second of its first answer (a slow machine gets more)
        assert 1.0 <= time.monotonic() - began < 4.5
    finally:
        answers.cancel()


def test_within_its_seconds_a_server_that_never_answers_is_not_yet_after_them(
    tmp_path: Path, health: Server
) -> None:
    _Health.status = 503
    began = time.monotonic()
    code, why = _probe(tmp_path, _url(health), RUNNING, seconds=1.5)
    assert code == NOT_YET and why.startswith("no answer from"), why
    assert time.monotonic() - began >= 1.5


def test_within_its_seconds_a_process_that_ends_fails_the_gate_at_once(
    tmp_path: Path, health: Server
) -> None:
    # the unit starts (the URL does not answer yet), then its process ends during the try
    _Health.status = 503
    state = tmp_path / "state"
    state.write_text("ActiveState=activating\nSubState=start\nNRestarts=0\n")
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ncat {state}\n")
    fake.chmod(0o755)
    ends = threading.Timer(
        1.0, lambda: state.write_text("ActiveState=failed\nSubState=failed\nNRestarts=0\n")
    )
    began = time.monotonic()
    ends.start()
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", str(PROBE), _url(health), "vllm.service", "0", "30"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": f"{fake.parent}:/usr/bin:/bin"},
        )
        assert done.returncode == ENDED, done.stdout
        assert "failed/failed" in done.stdout, done.stdout
        assert time.monotonic() - began < 4.5
    finally:
        ends.cancel()
