"""The gateway of the default scenario: nginx on the `gateway` host in front of both vLLM servers.

Requests go over HTTPS to https://gateway/ with the certificate the role generated as the only trust
anchor (curl --cacert), from the gateway host itself and from another host of the test network.
Which server answered is read from the X-Upstream response header. One test stops a server and
starts it again. Traffic stays inside the test containers.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import pytest
import testinfra
import testinfra.utils.ansible_runner
from helpers import api_key, wait_until

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
GATEWAY = RUNNER.get_hosts("gateway")[0]
testinfra_hosts = [GATEWAY]
SERVERS = RUNNER.get_hosts("vllm_servers")
# A host of the test network that is neither the gateway nor a server: a client from outside.
OUTSIDE = "hf-standin"

# The gateway's name is its inventory name: a SAN of its self-signed certificate and, on Docker's
# network, a resolvable host name.
URL = f"https://{GATEWAY}"
CA = "/etc/nginx/vllm-gateway/tls/gateway.crt"
INTERNAL = "http://127.0.0.1:8090"
SERVED_NAME = "Qwen/Qwen2.5-1.5B-Instruct"
# Where the tests put the gateway's certificate on OUTSIDE.
OUTSIDE_CA = "/tmp/gateway-ca.crt"
# The page's login, as in molecule.yml (group_vars gateway; Molecule reads its $$ as $).
WEBUI_USER, WEBUI_PASSWORD = "tester", 'pa ss"wo`rd$1\\x'
VLLM_PORT = 8000
RESTART_TIMEOUT = 300


def _api_key() -> str:
    """The key the servers and the gateway share, as the first server reads it (from Vault, via
    its environment file)."""
    server = testinfra.get_host(f"ansible://{SERVERS[0]}?ansible_inventory={INVENTORY}")
    return api_key(server)


KEY = _api_key()


@dataclass
class Reply:
    """An HTTP answer as curl saw it."""

    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> dict:
        return json.loads(self.body)


def _curl(
    host,
    url: str,
    *,
    key: str | None = KEY,
    body: dict | None = None,
    method: str = "",
    ca: str = CA,
    extra: tuple[str, ...] = (),
) -> Reply:
    """One request from `host`, TLS verified against the gateway's certificate (at `ca` on that
    host); bounded in time. `extra`: more curl arguments (each one argument, quoted here)."""
    args = ["--silent", "--show-error", "--max-time", "120", "--include", "--cacert", ca]
    if key is not None:
        args += ["--header", f"Authorization: Bearer {key}"]
    if body is not None:
        args += ["--header", "Content-Type: application/json", "--data", json.dumps(body)]
    if method:
        args += ["--request", method]
    args += list(extra)
    cmd = host.run("curl " + " ".join(["%s"] * (len(args) + 1)), *args, url)
    assert cmd.rc == 0, cmd.stderr
    head, _, text = cmd.stdout.replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.splitlines()
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Reply(int(status_line.split()[1]), headers, text)


def _outside(gateway) -> testinfra.host.Host:
    """The client elsewhere on the network, with the gateway's certificate as its trust anchor."""
    outside = testinfra.get_host(f"ansible://{OUTSIDE}?ansible_inventory={INVENTORY}")
    pem = gateway.file(CA).content_string
    assert outside.run("printf '%%s' %s > %s", pem, OUTSIDE_CA).rc == 0
    return outside


def _answered_by(reply: Reply) -> str:
    """The server that produced the answer: the last address nginx tried."""
    return reply.headers["x-upstream"].split(",")[-1].strip()


def _server_address(host, name: str) -> str:
    """ip:port of a server as nginx reports it ($upstream_addr): its address on the test network."""
    return f"{host.check_output('getent ahostsv4 %s', name).split()[0]}:{VLLM_PORT}"


def _assert_spread_over_all_servers(host) -> None:
    """Sequential requests reach every server (least_conn breaks ties by taking turns)."""
    expected = {_server_address(host, name) for name in SERVERS}
    seen: set[str] = set()
    # A server restarted shortly before may still be marked failed for fail_timeout (10 s).
    deadline = time.monotonic() + 60
    while seen != expected and time.monotonic() < deadline:
        for _ in range(4):
            reply = _curl(host, f"{URL}/v1/models")
            assert reply.status == 200
            seen.add(_answered_by(reply))
        if seen != expected:
            time.sleep(2)
    assert seen == expected


# The chat page names each conversation in this header (vllm-router's name for it); the gateway
# sends every request of a session to the same server, the one that holds its prefix in cache.
SESSION_HEADER = "X-Session-ID"
SESSIONS = [f"conversation-{i}" for i in range(16)]


def _servers_of_sessions(host, order: list[str] = SESSIONS) -> dict[str, str]:
    """Which server answered a request of each session (asked in `order`)."""
    return {
        session: _answered_by(
            _curl(host, f"{URL}/v1/models", extra=("--header", f"{SESSION_HEADER}: {session}"))
        )
        for session in order
    }


def _chat(max_tokens: int = 4, stream: bool = False, messages: list | None = None) -> dict:
    return {
        "model": SERVED_NAME,
        "messages": messages
        or [{"role": "user", "content": "Tell me something about large language models."}],
        "max_tokens": max_tokens,
        # random weights may pick end-of-sequence first: generate the tokens regardless
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


def test_nginx_runs_and_its_configuration_passes_nginx_t(host) -> None:
    nginx = host.service("nginx")
    assert nginx.is_enabled
    assert nginx.is_running
    assert host.run("nginx -t").rc == 0


def test_listens_on_https_http_and_loopback_only_for_the_internal_listener(host) -> None:
    assert host.socket("tcp://0.0.0.0:443").is_listening
    assert host.socket("tcp://0.0.0.0:80").is_listening
    assert host.socket("tcp://127.0.0.1:8090").is_listening
    assert not host.socket("tcp://0.0.0.0:8090").is_listening


def test_api_key_and_tls_key_files_are_private(host) -> None:
    key_file = host.file("/etc/nginx/vllm-gateway/api-key.conf")
    assert (key_file.user, key_file.group, key_file.mode) == ("root", "www-data", 0o640)
    tls_key = host.file("/etc/nginx/vllm-gateway/tls/gateway.key")
    assert (tls_key.user, tls_key.mode) == ("root", 0o600)
    assert KEY not in host.file("/etc/nginx/conf.d/vllm-gateway.conf").content_string


def _address_seen_from_outside(outside) -> str:
    """The gateway's IPv4 address on the test network, as another host resolves its name."""
    return outside.check_output("getent ahostsv4 %s", GATEWAY).split()[0]


def test_certificate_names_the_gateway_by_name_and_by_address(host) -> None:
    # vllm_gateway_tls_names' default: the inventory name and every address of the host
    sans = host.check_output("openssl x509 -in %s -noout -ext subjectAltName", CA)
    names = {item.strip() for item in sans.splitlines()[-1].split(",")}
    assert f"DNS:{GATEWAY}" in names, sans
    assert f"IP Address:{_address_seen_from_outside(_outside(host))}" in names, sans
    assert "IP Address:127.0.0.1" in names, sans


def test_a_client_elsewhere_on_the_network_verifies_the_gateway(host) -> None:
    outside = _outside(host)
    cmd = outside.run(
        "curl --silent --show-error --max-time 60 --cacert %s"
        " --header %s --write-out '%%{http_code}' --output /dev/null %s",
        OUTSIDE_CA,
        f"Authorization: Bearer {KEY}",
        f"{URL}/v1/models",
    )
    assert cmd.rc == 0, cmd.stderr
    assert cmd.stdout == "200"


def test_a_client_elsewhere_verifies_the_gateway_by_its_address(host) -> None:
    # curl checks the address against the certificate's IP SANs (no --insecure, no --resolve)
    outside = _outside(host)
    address = _address_seen_from_outside(outside)
    cmd = outside.run(
        "curl --silent --show-error --max-time 60 --cacert %s"
        " --write-out '%%{http_code}' --output /dev/null %s",
        OUTSIDE_CA,
        f"https://{address}/health",
    )
    assert cmd.rc == 0, cmd.stderr
    assert cmd.stdout == "200"


def test_plain_http_redirects_the_page_and_refuses_the_api(host) -> None:
    # A client set up with http:// has sent its key in cleartext by the time the gateway answers: a
    # redirect would make it work and go on doing so. The API is refused; the page is redirected.
    outside = _outside(host)
    out = outside.check_output(
        "curl --silent --output /dev/null --write-out '%%{http_code} %%{redirect_url}' %s",
        f"http://{GATEWAY}/?tab=chat",
    )
    assert out == f"308 {URL}/?tab=chat"
    chat = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    for path, body in (
        ("/v1", None),
        ("/v1/models", None),
        ("/v1/chat/completions", chat),
        ("/v2/x", None),
    ):
        reply = _curl(outside, f"http://{GATEWAY}{path}", body=body, ca=OUTSIDE_CA)
        assert reply.status == 403, (path, reply)
        assert reply.headers["content-type"] == "application/json"
        assert reply.json()["error"]["code"] == "https_required"
        assert "https://" in reply.json()["error"]["message"]
        assert "location" not in reply.headers
        assert "x-upstream" not in reply.headers  # no server was asked


def test_health_answers_without_a_key(host) -> None:
    assert _curl(host, f"{URL}/health", key=None).status == 200


def test_right_key_lists_the_model(host) -> None:
    reply = _curl(host, f"{URL}/v1/models")
    assert reply.status == 200
    assert SERVED_NAME in [m["id"] for m in reply.json()["data"]]


@pytest.mark.parametrize(
    "key",
    [None, "wrong-key", KEY + "x", KEY.swapcase() if KEY.swapcase() != KEY else "X"],
    ids=["no-key", "wrong-key", "key-plus-a-character", "key-in-other-case"],
)
@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/models", None), ("/v1/chat/completions", _chat()), ("/v1/completions", {})],
)
def test_a_missing_or_wrong_key_gets_401_at_the_edge(
    host, key: str | None, path: str, body: dict | None
) -> None:
    reply = _curl(host, URL + path, key=key, body=body)
    assert reply.status == 401
    # nginx's own OpenAI-style answer: the request never reached a server
    assert reply.json()["error"]["code"] == "invalid_api_key"
    assert "x-upstream" not in reply.headers
    assert reply.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "path",
    [
        "/tokenize",
        "/detokenize",
        "/pause",
        "/resume",
        "/invocations",
        "/metrics",
        "/version",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/load_lora_adapter",
        "/v1",
        "/v2/rerank",
        "/collective_rpc",
        "/openapi.json",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_vllm_endpoints_outside_the_allowlist_are_not_reachable(
    host, path: str, method: str
) -> None:
    body = {"model": SERVED_NAME, "prompt": "hello"} if method == "POST" else None
    reply = _curl(host, URL + path, body=body, method=method)
    assert reply.status in (403, 404), reply.body
    assert "x-upstream" not in reply.headers


def test_requests_are_spread_over_both_servers(host) -> None:
    _assert_spread_over_all_servers(host)


def test_streaming_passes_through_tls_unbuffered(host) -> None:
    # Timestamps each line as it arrives on the gateway host: with buffering the lines would all
    # arrive together at the end; unbuffered they are spread over the generation of 16 tokens.
    script = (
        "import json, ssl, sys, time, http.client\n"
        "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
        "conn = http.client.HTTPSConnection(sys.argv[2], context=ctx, timeout=120)\n"
        "conn.request('POST', '/v1/chat/completions', body=sys.argv[3],\n"
        "             headers={'Authorization': 'Bearer ' + sys.argv[4],\n"
        "                      'Content-Type': 'application/json'})\n"
        "resp = conn.getresponse()\n"
        "print(json.dumps([resp.status, dict(resp.getheaders())]))\n"
        "for raw in resp:\n"
        "    line = raw.decode().strip()\n"
        "    if line:\n"
        "        print(json.dumps([time.monotonic(), line]))\n"
    )
    out = host.check_output(
        "python3 -c %s %s %s %s %s", script, CA, GATEWAY, json.dumps(_chat(16, stream=True)), KEY
    )
    (status, headers), *events = (json.loads(line) for line in out.splitlines())
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Accel-Buffering"] == "no"
    lines = [line for _, line in events]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert len(chunks) >= 4
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text != ""
    spread = events[-1][0] - events[0][0]
    assert spread > 0.03, f"all {len(events)} events arrived within {spread:.3f} s: buffered?"


def test_non_streamed_chat_completion_through_the_gateway(host) -> None:
    reply = _curl(host, f"{URL}/v1/chat/completions", body=_chat())
    assert reply.status == 200
    assert reply.json()["usage"]["completion_tokens"] > 0


def test_internal_listener_serves_the_same_paths_with_the_same_key(host) -> None:
    def status(path: str, key: str | None = KEY) -> str:
        auth = ["--header", f"Authorization: Bearer {key}"] if key else []
        return host.check_output(
            "curl --silent --max-time 60 --output /dev/null --write-out '%%{http_code}'"
            + " %s" * len(auth)
            + " %s",
            *auth,
            INTERNAL + path,
        )

    assert status("/v1/models") == "200"
    assert status("/v1/models", key=None) == "401"
    assert status("/v1/models", key="wrong-key") == "401"
    assert status("/health", key=None) == "200"
    assert status("/tokenize") == "404"
    assert status("/metrics") == "403"


def test_a_session_goes_back_to_the_server_that_served_it(host) -> None:
    first = _servers_of_sessions(host)
    # asked again in other orders: taking turns (least_conn's tie-break) would send them elsewhere
    for order in (SESSIONS[::-1], SESSIONS[1:] + SESSIONS[:1], SESSIONS[::2] + SESSIONS[1::2]):
        assert _servers_of_sessions(host, order) == first
    # and the sessions are spread over every server
    assert set(first.values()) == {_server_address(host, name) for name in SERVERS}


def test_a_session_request_reaches_the_matched_path_only(host) -> None:
    # nginx matches the normalised path; what reaches vLLM must be that path, not the raw URI
    # (vLLM would serve /metrics/... as its metrics, which the allowlist keeps from key holders)
    reply = _curl(
        host,
        f"{URL}/metrics/../v1/models",
        extra=("--path-as-is", "--header", f"{SESSION_HEADER}: raw-path"),
    )
    assert reply.status == 200, reply.body
    assert reply.json()["data"][0]["id"] == SERVED_NAME


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
        first = _curl(host, f"{URL}/v1/chat/completions", body=_chat(messages=turn), extra=header)
        assert first.status == 200, first.body
        server = _answered_by(first)
        hits = _prefix_cache_hits(host, server)
        turn += [
            {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And the next one?"},
        ]
        second = _curl(host, f"{URL}/v1/chat/completions", body=_chat(messages=turn), extra=header)
        assert second.status == 200, second.body
        assert _answered_by(second) == server
        assert _prefix_cache_hits(host, server) - hits >= first.json()["usage"]["prompt_tokens"] / 2


def test_stopping_one_server_leaves_the_gateway_answering(host) -> None:
    stopped_name = SERVERS[0]
    stopped_address = _server_address(host, stopped_name)
    server = testinfra.get_host(f"ansible://{stopped_name}?ansible_inventory={INVENTORY}")
    sessions = _servers_of_sessions(host)
    assert server.run("systemctl stop vllm").rc == 0
    try:
        assert not server.service("vllm").is_running
        for _ in range(3):
            for reply in (
                _curl(host, f"{URL}/v1/models"),
                _curl(host, f"{URL}/v1/chat/completions", body=_chat()),
            ):
                assert reply.status == 200, reply.body
                assert _answered_by(reply) != stopped_address
            assert _curl(host, f"{URL}/health", key=None).status == 200
        # the stopped server's sessions move to another server; the others stay where they were
        moved = _servers_of_sessions(host)
        assert stopped_address not in moved.values()
        kept = {session for session, address in sessions.items() if address != stopped_address}
        assert {session: moved[session] for session in kept} == {
            session: sessions[session] for session in kept
        }
    finally:
        assert server.run("systemctl start vllm").rc == 0
        wait_until(
            lambda: (
                host.run("curl --silent --fail --max-time 5 http://%s/health", stopped_address).rc
                == 0
            ),
            RESTART_TIMEOUT,
            f"{stopped_name}: /health after its restart",
        )


def test_both_servers_answer_again_after_the_restart(host) -> None:
    _assert_spread_over_all_servers(host)


def test_web_ui_is_served_under_the_root(host) -> None:
    # the page must run in this scenario: a dead page fails here
    page = _curl(host, f"{URL}/", key=None)
    assert page.status == 200, page.body[:500]
    assert page.headers["content-type"].startswith("text/html")


def _login(host, jar: str) -> Reply:
    """Gradio's login form, as the page posts it; its cookie goes to `jar` on `host`."""
    fields = ("--data-urlencode", f"username={WEBUI_USER}")
    fields += ("--data-urlencode", f"password={WEBUI_PASSWORD}")
    return _curl(host, f"{URL}/login", key=None, extra=("--cookie-jar", jar, *fields))


def test_web_ui_config_is_behind_the_login_and_points_at_the_gateway(host) -> None:
    # without the login, Gradio keeps its config from strangers
    config = _curl(host, f"{URL}/config", key=None)
    assert config.status == 401
    assert "Not authenticated" in config.body
    # logged in (Gradio's login form, then its cookie): URLs built from X-Forwarded-Host/-Proto
    jar = "/tmp/webui-test-cookies"
    try:
        login = _login(host, jar)
        assert login.status == 200, login.body
        config = _curl(host, f"{URL}/config", key=None, extra=("--cookie", jar))
        assert config.status == 200, config.body[:500]
        assert config.json()["root"] == URL
        # logged in or not, no Gradio scripting API through the gateway (the page never uses it)
        for path in ("/gradio_api/call/respond", "/gradio_api/openapi.json", "/gradio_api/mcp/"):
            scripted = _curl(
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
    reply = _curl(_outside(host), URL + path, key=None, body=body, method=method, ca=OUTSIDE_CA)
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
    # and it lets another site's scripts read an answer only on CORS headers naming that site,
    # which the gateway never passes on. A browser's preflight from another host:
    preflight = ("--header", "Access-Control-Request-Method: POST")
    preflight += ("--header", "Access-Control-Request-Headers: content-type")
    for path in ("/gradio_api/queue/join", "/config"):
        reply = _curl(
            _outside(host),
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
        config = _curl(host, f"{URL}/config", key=None, extra=("--cookie", jar, *ELSEWHERE))
        assert config.status == 200, config.body[:500]
        assert not [h for h in config.headers if h.startswith("access-control-")], config.headers
    finally:
        host.run("rm -f %s", jar)
    # and no other site may frame the page (clickjacking)
    page = _curl(host, f"{URL}/", key=None)
    assert page.headers["content-security-policy"] == "frame-ancestors 'self'"


LOGINS_PER_MINUTE = 10  # vllm_gateway_login_attempts_per_minute (the role's default)


def test_guessing_the_page_password_is_slowed_at_the_gateway(host) -> None:
    # Wrong passwords from another host (which no other test logs in from), as fast as curl sends
    # them: Gradio answers the first LOGINS_PER_MINUTE + 1, then the gateway one every
    # 60 / LOGINS_PER_MINUTE s, and 429 to the others.
    outside = _outside(host)
    attempt = (
        "curl --silent --output /dev/null --write-out '%%{http_code} ' --max-time 20 --cacert %s"
        " --data-urlencode username=%s --data-urlencode password=wrong-guess %s"
    )
    start = time.monotonic()
    guesses = outside.check_output(
        "for i in $(seq %s); do " + attempt + "; done",
        str(3 * LOGINS_PER_MINUTE),
        OUTSIDE_CA,
        WEBUI_USER,
        f"{URL}/login",
    ).split()
    elapsed = time.monotonic() - start
    assert len(guesses) == 3 * LOGINS_PER_MINUTE, guesses
    assert set(guesses[:LOGINS_PER_MINUTE]) <= {"400", "401"}, guesses  # wrong credentials
    answered = [g for g in guesses if g != "429"]
    assert set(answered) <= {"400", "401"}, guesses
    assert len(answered) <= LOGINS_PER_MINUTE + 2 + elapsed * LOGINS_PER_MINUTE / 60, (
        elapsed,
        guesses,
    )
    assert "429" in guesses, guesses
    # the page's own host and its users elsewhere are not held back by that address's guesses
    jar = "/tmp/webui-limit-cookies"
    try:
        assert _login(host, jar).status == 200
    finally:
        host.run("rm -f %s", jar)
    # the limit lifts by itself: wait until that address has its whole budget again
    time.sleep(60 + 1)


def test_logs_never_hold_the_api_key(host) -> None:
    # every test above sent the key; nginx's access log format has no Authorization header
    cmd = host.run("grep -rcF -- %s /var/log/nginx/", KEY)
    assert cmd.rc == 1, cmd.stdout
