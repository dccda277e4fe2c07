"""Fixtures shared by the suites under tests/ (unit, webui)."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

S = TypeVar("S", bound=socketserver.BaseServer)


@pytest.fixture
def serve() -> Iterator[Callable[[S], S]]:
    """Serve a loopback server in a thread of its own until the test ends: `serve(server)`
    starts it and returns it; the teardown stops and closes it, and joins its thread."""
    started: list[tuple[socketserver.BaseServer, threading.Thread]] = []

    def start(server: S) -> S:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join()
