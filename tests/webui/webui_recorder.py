"""Helpers of the web UI tests: the real server to talk to, and a recording reverse proxy."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

APP_DIR = Path(__file__).resolve().parents[2] / "roles" / "vllm_webui" / "files"
# Hop-by-hop headers are the proxy's own business (RFC 9110 7.6.1); it answers in HTTP/1.0 style,
# closing the connection at the end of each response, so no chunked encoding is passed on.
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class Backend:
    """A real OpenAI-compatible (vLLM) server."""

    api_base: str
    api_key: str = field(repr=False)  # not in a failing test's report
    model: str


@dataclass
class Exchange:
    """One request that went through the recorder and the answer it got."""

    path: str
    request: dict[str, Any]
    # request headers, names in lower case; not in a failing test's report (they hold the API key)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    status: int = 0
    response: bytes = b""
    finished: threading.Event = field(default_factory=threading.Event)

    def streamed_text(self) -> str:
        """The text of a streamed chat completion as it went over the wire (server-sent events)."""
        text = ""
        events, _cut_short = _split_events(self.response)  # (the client hung up mid-event)
        for chunk in filter(None, map(_chunk, events)):
            for choice in chunk["choices"]:  # (an error event has none: it raises here)
                text += choice["delta"].get("content") or ""
        return text


def _split_events(data: bytes) -> tuple[list[bytes], bytes]:
    """Server-sent events end with a blank line: the complete events in `data`, and the rest (an
    event still arriving, or one cut short)."""
    *events, rest = data.split(b"\n\n")
    return events, rest


def _chunk(event: bytes) -> dict[str, Any] | None:
    """The JSON a `data:` event carries; None for `data: [DONE]` and for events without data."""
    if not event.startswith(b"data: ") or event == b"data: [DONE]":
        return None
    return json.loads(event.removeprefix(b"data: "))


# Between two events of a steered answer: a server no faster than a CPU serving a real model, so
# that the page's Stop lands while the answer still streams (the tiny test model outran it).
STEERED_EVENT_PACE = 0.02


def _indented(pieces: Iterator[bytes], indent: str) -> Iterator[bytes]:
    """A streamed chat completion (server-sent events) whose answer begins with "Sure:" and a line
    break and has every later line indented by `indent`, as code in an answer is: the form Gradio's
    Chatbot gives back dedented. Rewritten and passed on event by event, at most one every
    STEERED_EVENT_PACE s."""
    pending, started = b"", False
    for piece in pieces:
        events, pending = _split_events(pending + piece)
        for event in events:
            chunk = _chunk(event)
            if chunk is not None:
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    if delta.get("content") is not None:
                        text = delta["content"].replace("\n", "\n" + indent)
                        if not started:
                            text, started = "Sure:\n" + indent + text, True
                        delta["content"] = text
                event = b"data: " + json.dumps(chunk).encode()
            yield event + b"\n\n"
            time.sleep(STEERED_EVENT_PACE)
    if pending:
        yield pending


class _Handler(BaseHTTPRequestHandler):
    server: Recorder

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        sent = {k.lower(): v for k, v in headers.items()}  # names are case-insensitive
        exchange = Exchange(self.path, json.loads(body) if body else {}, sent)
        self.server.exchanges.append(exchange)
        indent = None
        if self.path.endswith("/chat/completions") and self.server.steer is not None:
            (indent, max_tokens), self.server.steer = self.server.steer, None
            # the app's request as it sent it is recorded above; the server gets a longer answer
            longer = {"ignore_eos": True, "max_tokens": max_tokens}
            body = json.dumps(exchange.request | longer).encode()
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=600)
        upstream.request(self.command, self.path, body=body or None, headers=headers)
        answer = upstream.getresponse()
        exchange.status = answer.status
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.end_headers()
        pieces = iter(lambda: answer.read1(65536), b"")
        if indent is not None:
            pieces = _indented(pieces, indent)
        try:
            # Pass each piece on as soon as it arrives: a streamed answer must stay streamed.
            for piece in pieces:
                exchange.response += piece
                self.wfile.write(piece)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up: hang up on the server too, as a client would
        finally:
            upstream.close()
            exchange.finished.set()


class Recorder(ThreadingHTTPServer):
    """A reverse proxy on loopback that passes every request to a real server and keeps a copy.

    Point a client at `url_for(api_base)`; `exchanges` then lists each request's JSON body and the
    raw answer, in order. Plain http upstreams only (the test servers).
    """

    daemon_threads = True

    def __init__(self, api_base: str) -> None:
        parts = urlsplit(api_base)
        assert parts.scheme == "http", f"the recorder passes plain http only, not {api_base}"
        self.upstream = parts.netloc
        self.exchanges: list[Exchange] = []
        # set by `steer_next_answer`, taken by the next chat completion request
        self.steer: tuple[str, int] | None = None
        super().__init__(("127.0.0.1", 0), _Handler)

    def steer_next_answer(self, indent: str = "    ", max_tokens: int = 1500) -> None:
        """Make the next chat completion's answer one Gradio's Chatbot changes: it begins with
        "Sure:" and a line break and every later line is indented (`_indented`); and a long one:
        the server is asked for `max_tokens` tokens, ignoring end-of-sequence, so that the answer
        is still streaming when a test stops it. The request is recorded as the client sent it; the
        answer as the client received it."""
        self.steer = (indent, max_tokens)

    def url_for(self, api_base: str) -> str:
        """`api_base` with its host and port replaced by the recorder's."""
        parts = urlsplit(api_base)
        return urlunsplit(parts._replace(netloc=f"127.0.0.1:{self.server_address[1]}"))

    def chats(self) -> list[Exchange]:
        """The chat completion requests seen so far."""
        return [e for e in self.exchanges if e.path.endswith("/chat/completions")]
