"""The gateway of the default scenario, in front of the two real vLLM servers: what needs a real
vLLM behind nginx. Sessions find their prefix in their server's cache, and the chat page (Gradio,
on the gateway host) is served under the root, behind its login, closed to other sites and to
scripts.

The gateway alone (TLS, the key at the edge, the allowlist, spreading, a server down, streaming) is
proven in molecule/gateway against OpenAI stubs. The client code is
molecule/resources/tests/gateway_client.py. Traffic stays inside the test containers.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from gateway_client import (
    CA,
    GATEWAY,
    OUTSIDE_CA,
    SERVED_NAME,
    SERVERS,
    SESSION_HEADER,
    URL,
    VLLM_PORT,
    Reply,
    answered_by,
    assert_logs_never_hold_the_key,
    assert_spread_over_all_servers,
    chat,
    client_elsewhere,
    curl,
)
from helpers import host_named

testinfra_hosts = [GATEWAY]
# The page's login, as in molecule.yml (group_vars gateway; Molecule reads its $$ as $).
WEBUI_USER, WEBUI_PASSWORD = "tester", 'pa ss"wo`rd$1\\x'


def test_requests_are_spread_over_both_servers(host) -> None:
    # the servers' addresses as site.yml hands them to the gateway (published by vllm_service)
    assert_spread_over_all_servers(host)


def _idle_nginx_connections(host) -> set[tuple[str, str]]:
    """nginx's connections from the gateway to the vLLM servers idle for a second or more (its
    keepalive cache), as (local, peer) address:port: those of its workers' user (ss cannot name
    their process: they are not dumpable), not Prometheus's (it scrapes the servers from here)."""
    workers = host.check_output("ps -o uid= -o args= -C nginx | awk '/worker/ {print $1}'").split()
    assert workers and "0" not in workers, workers
    out = host.check_output("ss -Htnei state established '( dport = :%s )'", str(VLLM_PORT))
    idle = set()
    for entry in re.split(r"\n(?=\S)", out.strip()):
        quiet = [int(ms) for ms in re.findall(r"\blast(?:snd|rcv):(\d+)", entry)]
        uid = re.search(r"\buid:(\d+)", entry)
        if uid and uid.group(1) in workers and len(quiet) == 2 and min(quiet) >= 1000:
            idle.add(_pair(entry.split()[2:4]))
    return idle


def _pair(addresses: list[str]) -> tuple[str, str]:
    """(local, peer) as ss prints them; IPv4 mapped into IPv6 ([::ffff:a.b.c.d]) as plain IPv4."""
    local, peer = (re.sub(r"^\[::ffff:([0-9.]+)\]", r"\1", a) for a in addresses)
    return local, peer


def _time_wait(host) -> set[tuple[str, str]]:
    """The host's TCP connections in TIME-WAIT, as (local, peer): the side that closed first."""
    out = host.check_output("ss -Htan state time-wait")
    return {_pair(line.split()[2:4]) for line in out.splitlines()}


def test_the_gateway_closes_an_idle_connection_to_a_server_before_the_server_does(host) -> None:
    # vLLM closes a connection idle for 5 s. Were nginx to keep it longer, a request it sent on it
    # as the server closed it would be lost (nginx does not try that server again for it; during a
    # rollout there may be no other). The side that closes a TCP connection first keeps it in
    # TIME-WAIT: it must be the gateway, for every idle connection nginx keeps to a server.
    for _ in range(4):
        assert curl(host, f"{URL}/v1/models").status == 200
    time.sleep(1.5)
    kept = _idle_nginx_connections(host)
    assert kept, host.run("ss -Htnei state established").stdout
    time.sleep(8)  # both idle timeouts (the gateway's 4 s, vLLM's 5 s) have passed
    assert kept <= _time_wait(host), (kept, _time_wait(host))
    for name in SERVERS:
        closed_by_server = {(peer, local) for local, peer in _time_wait(host_named(name))}
        assert not kept & closed_by_server, (name, kept & closed_by_server)


def _prefix_cache_hits(host, server: str) -> float:
    """Prompt tokens the server found in its prefix cache so far (vLLM's own counter)."""
    metrics = host.check_output("curl --silent --fail --max-time 10 http://%s/metrics", server)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total")
    )


def test_the_next_turn_of_a_session_is_prefilled_from_its_server_cache(host) -> None:
    # A conversation through the gateway, as the chat page sends it: the second turn resends the
    # first. It must reach the same server and find most of its prompt in that server's cache.
    system = "You answer questions about a fleet of CPU servers, briefly and precisely. " * 30
    for number in range(4):
        header = ("--header", f"{SESSION_HEADER}: prefix-{number}")
        turn = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"What is question number {number} about?"},
        ]
        first = curl(host, f"{URL}/v1/chat/completions", body=chat(messages=turn), extra=header)
        assert first.status == 200, first.body
        server = answered_by(first)
        hits = _prefix_cache_hits(host, server)
        turn += [
            {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And the next one?"},
        ]
        second = curl(host, f"{URL}/v1/chat/completions", body=chat(messages=turn), extra=header)
        assert second.status == 200, second.body
        assert answered_by(second) == server
        assert _prefix_cache_hits(host, server) - hits >= first.json()["usage"]["prompt_tokens"] / 2


def test_web_ui_is_served_under_the_root(host) -> None:
    # the page must run in this scenario: a dead page fails here
    page = curl(host, f"{URL}/", key=None)
    assert page.status == 200, page.body[:500]
    assert page.headers["content-type"].startswith("text/html")


def _login(host, jar: str) -> Reply:
    """Gradio's login form, as the page posts it; its cookie goes to `jar` on `host`."""
    fields = ("--data-urlencode", f"username={WEBUI_USER}")
    fields += ("--data-urlencode", f"password={WEBUI_PASSWORD}")
    return curl(host, f"{URL}/login", key=None, extra=("--cookie-jar", jar, *fields))


def test_web_ui_config_is_behind_the_login_and_points_at_the_gateway(host) -> None:
    # without the login, Gradio keeps its config from strangers
    config = curl(host, f"{URL}/config", key=None)
    assert config.status == 401
    assert "Not authenticated" in config.body
    # logged in (Gradio's login form, then its cookie): URLs built from X-Forwarded-Host/-Proto
    jar = "/tmp/webui-test-cookies"
    try:
        login = _login(host, jar)
        assert login.status == 200, login.body
        config = curl(host, f"{URL}/config", key=None, extra=("--cookie", jar))
        assert config.status == 200, config.body[:500]
        assert config.json()["root"] == URL
        # logged in or not, no Gradio scripting API through the gateway (the page never uses it)
        for path in ("/gradio_api/call/respond", "/gradio_api/openapi.json", "/gradio_api/mcp/"):
            scripted = curl(
                host, URL + path, key=None, body={"data": _CHAT_DATA}, extra=("--cookie", jar)
            )
            assert scripted.status == 404, (path, scripted.body[:500])
            assert scripted.json()["error"]["code"] == "not_found"
    finally:
        host.run("rm -f %s", jar)


# Gradio's API behind the page, asked with no login and no key from another host: each is refused
# (Gradio's login: 401; the gateway's denial of Gradio's scripting API: 404), never runs the chat.
_CHAT_DATA = ["Hello", [], SERVED_NAME, "You are a helpful assistant.", 0.7, 0.8, 8, 1.05]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/config", None),
        ("GET", "/gradio_api/info", None),
        ("GET", "/gradio_api/openapi.json", None),
        ("POST", "/gradio_api/call/respond", {"data": _CHAT_DATA}),
        ("POST", "/gradio_api/call/chat", {"data": _CHAT_DATA}),
        ("POST", "/gradio_api/run/respond", {"data": _CHAT_DATA}),
        (
            "POST",
            "/gradio_api/queue/join",
            {"data": _CHAT_DATA, "fn_index": 0, "session_hash": "strangerzzz1", "event_data": None},
        ),
        ("GET", "/gradio_api/queue/data?session_hash=strangerzzz1", None),
    ],
    ids=["config", "info", "openapi", "call-respond", "call-chat", "run-respond", "join", "data"],
)
def test_gradio_api_is_closed_to_a_stranger(
    host, method: str, path: str, body: dict | None
) -> None:
    reply = curl(
        client_elsewhere(host), URL + path, key=None, body=body, method=method, ca=OUTSIDE_CA
    )
    assert reply.status != 200, reply.body[:500]
    assert reply.status in (401, 403, 404), reply.body[:500]
    assert "event_id" not in reply.body


ELSEWHERE = ("--header", "Origin: https://elsewhere.example")


def test_another_site_cannot_use_the_page_in_a_users_name(host) -> None:
    # Gradio would let any site's scripts run the chat with the user's login cookie (SameSite=None)
    # and read the answers (CORS headers naming any site). The browser sends the cookie on another
    # site's requests only if it is SameSite=None:
    login = host.run(
        "curl --silent --show-error --output /dev/null --dump-header - --cacert %s"
        " --data-urlencode %s --data-urlencode %s %s",
        CA,
        f"username={WEBUI_USER}",
        f"password={WEBUI_PASSWORD}",
        f"{URL}/login",
    )
    cookies = [h for h in login.stdout.lower().splitlines() if h.startswith("set-cookie:")]
    assert cookies, login.stdout
    for cookie in cookies:
        assert "samesite=lax" in cookie and "samesite=none" not in cookie, cookie
        assert "; secure" in cookie, cookie  # never sent over plain HTTP
    # and it lets another site's scripts read an answer only on CORS headers naming that site,
    # which the gateway never passes on. A browser's preflight from another host:
    preflight = ("--header", "Access-Control-Request-Method: POST")
    preflight += ("--header", "Access-Control-Request-Headers: content-type")
    for path in ("/gradio_api/queue/join", "/config"):
        reply = curl(
            client_elsewhere(host),
            URL + path,
            key=None,
            method="OPTIONS",
            ca=OUTSIDE_CA,
            extra=ELSEWHERE + preflight,
        )
        assert reply.status == 200, (path, reply)  # Gradio's answer, without its CORS headers
        assert not [h for h in reply.headers if h.startswith("access-control-")], (path, reply)
    # a logged-in user's request from that site: answered, without CORS headers
    jar = "/tmp/webui-cors-cookies"
    try:
        assert _login(host, jar).status == 200
        config = curl(host, f"{URL}/config", key=None, extra=("--cookie", jar, *ELSEWHERE))
        assert config.status == 200, config.body[:500]
        assert not [h for h in config.headers if h.startswith("access-control-")], config.headers
    finally:
        host.run("rm -f %s", jar)
    # and no other site may frame the page (clickjacking), an image in an answer (Markdown) cannot
    # carry the conversation to another host, and the browser takes no guessed content types
    page = curl(host, f"{URL}/", key=None)
    csp = page.headers["content-security-policy"]
    assert csp == "frame-ancestors 'self'; img-src 'self' data: blob:", csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "same-origin"


LOGINS_PER_MINUTE = 10  # vllm_gateway_login_attempts_per_minute (the role's default)


def test_guessing_the_page_password_is_slowed_at_the_gateway(host) -> None:
    # Wrong passwords from another host (which no other test logs in from), as fast as curl sends
    # them: Gradio answers the first LOGINS_PER_MINUTE + 1, then the gateway one every
    # 60 / LOGINS_PER_MINUTE s, and 429 to the others. nginx keeps the limit's counts across a
    # reload but not across a restart: restarted before, so that the address starts with its whole
    # budget whatever ran before, and after, so that it has it again (else within a minute).
    outside = client_elsewhere(host)
    attempt = (
        "curl --silent --output /dev/null --write-out '%%{http_code} ' --max-time 20 --cacert %s"
        " --data-urlencode username=%s --data-urlencode password=wrong-guess %s"
    )
    host.check_output("systemctl restart nginx")
    try:
        start = time.monotonic()
        guesses = outside.check_output(
            "for i in $(seq %s); do " + attempt + "; done",
            str(3 * LOGINS_PER_MINUTE),
            OUTSIDE_CA,
            WEBUI_USER,
            f"{URL}/login",
        ).split()
        elapsed = time.monotonic() - start
        # the page's own host and its users elsewhere are not held back by that address's guesses
        jar = "/tmp/webui-limit-cookies"
        try:
            own_login = _login(host, jar).status
        finally:
            host.run("rm -f %s", jar)
    finally:
        host.check_output("systemctl restart nginx")
    assert len(guesses) == 3 * LOGINS_PER_MINUTE, guesses
    assert set(guesses[:LOGINS_PER_MINUTE]) <= {"400", "401"}, guesses  # wrong credentials
    answered = [g for g in guesses if g != "429"]
    assert set(answered) <= {"400", "401"}, guesses
    assert len(answered) <= LOGINS_PER_MINUTE + 2 + elapsed * LOGINS_PER_MINUTE / 60, (
        elapsed,
        guesses,
    )
    assert "429" in guesses, guesses
    assert own_login == 200


PAGE_REQUESTS_PER_CLIENT = 64  # vllm_gateway_page_requests_per_client (the role's default)

# argv[3] requests to the page over TLS, each with a body of 1000 bytes announced and 9 sent (nginx
# waits for the rest), then one whole request. Prints [that request's status line, how many of the
# held ones the gateway had answered].
HELD_BODIES = (
    "import json, socket, ssl, sys, time\n"
    "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
    "def opened(request):\n"
    "    raw = socket.create_connection((sys.argv[2], 443), timeout=20)\n"
    "    conn = ctx.wrap_socket(raw, server_hostname=sys.argv[2])\n"
    "    conn.sendall(request.encode())\n"
    "    return conn\n"
    "head = 'HTTP/1.1\\r\\nHost: ' + sys.argv[2] + '\\r\\n'\n"
    "begun = 'POST / ' + head + 'Content-Length: 1000\\r\\n\\r\\nusername='\n"
    "held = [opened(begun) for _ in range(int(sys.argv[3]))]\n"
    "time.sleep(1)\n"
    "last = opened('GET / ' + head + 'Connection: close\\r\\n\\r\\n')\n"
    "status = last.recv(4096).decode(errors='replace').split('\\r\\n')[0]\n"
    "answered = 0\n"
    "for conn in held:\n"
    "    conn.setblocking(False)\n"
    "    try:\n"
    "        answered += len(conn.recv(4096)) > 0\n"
    "    except (BlockingIOError, ssl.SSLWantReadError):\n"
    "        pass\n"
    "    conn.close()\n"
    "last.close()\n"
    "time.sleep(0.5)\n"
    "print(json.dumps([status, answered]))\n"
)


def test_one_client_holds_at_most_its_share_of_requests_to_the_page(host) -> None:
    # One host sending bodies a byte at a time (each within the client timeout) could otherwise
    # take all of nginx's connections, and the page from everybody. From another host: the
    # page's share of requests held, each waiting for the rest of its body; the next one is
    # refused at once, and answered once they are closed.
    outside = client_elsewhere(host)
    out = outside.check_output(
        "python3 -c %s %s %s %s", HELD_BODIES, OUTSIDE_CA, GATEWAY, str(PAGE_REQUESTS_PER_CLIENT)
    )
    status, answered = json.loads(out)
    assert answered == 0, out  # every held request still waits: the share is not smaller
    assert status.split()[1:2] == ["429"], out
    assert curl(outside, f"{URL}/", key=None, ca=OUTSIDE_CA).status == 200


def test_no_protocol_upgrade_reaches_the_page(host) -> None:
    # The web UI has no websocket route (Gradio 6 streams by server-sent events): an upgrade passed
    # on could only open a tunnel to it past the gateway's rules. Its uvicorn logs every upgrade it
    # is asked for ("Unsupported upgrade request."); asked for two from another host, it logs none.
    since = host.check_output("date +%s")
    for upgrade in ("websocket", "h2c"):
        asked = ("--header", "Connection: Upgrade, HTTP2-Settings")
        asked += ("--header", f"Upgrade: {upgrade}")
        asked += ("--header", "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA")
        reply = curl(client_elsewhere(host), f"{URL}/", key=None, ca=OUTSIDE_CA, extra=asked)
        assert reply.status == 200, reply
    time.sleep(1)  # the web UI's log reaches the journal
    log = host.check_output(
        "journalctl --unit vllm-webui --since @%s --no-pager --output cat", since
    )
    assert "upgrade" not in log.lower(), log


def test_logs_never_hold_the_api_key(host) -> None:
    # every test above sent the key; nginx's access log format has no Authorization header
    assert_logs_never_hold_the_key(host)
