"""The gateway role alone (molecule/gateway): nginx on `gw-g` in front of two OpenAI stubs.

Each server runs tests/fixtures/openai_stub as vllm.service: it checks the API key as vLLM does,
lists the model, answers chat completions and streams them token by token. What nginx does with
them is what these tests prove: TLS, the key at the edge, the allowlist, plain HTTP, spreading,
sessions, a server down, streaming, the logs. One test stops a server and starts it again.
The client code is molecule/resources/tests/gateway_client.py. Traffic stays inside the containers.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from itertools import pairwise

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gateway_client import (
    CA,
    GATEWAY,
    INTERNAL,
    KEY,
    OUTSIDE,
    OUTSIDE_CA,
    SERVED_NAME,
    SERVERS,
    SESSION_HEADER,
    SESSIONS,
    URL,
    answered_by,
    assert_logs_never_hold_the_key,
    assert_spread_over_all_servers,
    chat,
    client_elsewhere,
    curl,
    server_address,
)
from helpers import address_of, host_named, run_playbook, run_with_secret, wait_until

testinfra_hosts = [GATEWAY]
RESTART_TIMEOUT = 120


def _servers_of_sessions(host, order: list[str] = SESSIONS) -> dict[str, str]:
    """Which server answered a request of each session (asked in `order`)."""
    return {
        session: answered_by(
            curl(host, f"{URL}/v1/models", extra=("--header", f"{SESSION_HEADER}: {session}"))
        )
        for session in order
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
    leaked = KEY in host.file("/etc/nginx/conf.d/vllm-gateway.conf").content_string
    assert not leaked  # a boolean: a failing `KEY not in text` would print the key


def test_certificate_names_the_gateway_by_name_and_by_address(host) -> None:
    # vllm_gateway_tls_names' default: the inventory name and every address of the host
    sans = host.check_output("openssl x509 -in %s -noout -ext subjectAltName", CA)
    names = {item.strip() for item in sans.splitlines()[-1].split(",")}
    assert f"DNS:{GATEWAY}" in names, sans
    assert f"IP Address:{address_of(client_elsewhere(host), GATEWAY)}" in names, sans
    assert "IP Address:127.0.0.1" in names, sans


def test_a_client_elsewhere_on_the_network_verifies_the_gateway(host) -> None:
    reply = curl(client_elsewhere(host), f"{URL}/v1/models", ca=OUTSIDE_CA)
    assert reply.status == 200


def test_a_client_elsewhere_verifies_the_gateway_by_its_address(host) -> None:
    # curl checks the address against the certificate's IP SANs (no --insecure, no --resolve)
    outside = client_elsewhere(host)
    reply = curl(outside, f"https://{address_of(outside, GATEWAY)}/health", key=None, ca=OUTSIDE_CA)
    assert reply.status == 200


def _issued_by_a_test_ca(name: str, address: str) -> tuple[str, str, str]:
    """An operator's certificate for the gateway from a CA made here (P-256 keys, two days): the
    CA's PEM, the leaf's PEM with the CA after it (vllm_gateway_tls_certificate), the leaf's key."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )

    def issue(subject: str, key, ca: bool, sans: list | None = None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vllm-fleet test CA")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def pem(cert: x509.Certificate) -> str:
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    ca = issue("vllm-fleet test CA", ca_key, True)
    leaf = issue(
        name, leaf_key, False, [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address(address))]
    )
    key = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem(ca), pem(leaf) + pem(ca), key


def test_a_given_certificate_is_served_with_hsts_and_replaced_when_no_longer_given(host) -> None:
    # the self-signed default: no Strict-Transport-Security (a browser could not accept it any more)
    outside = client_elsewhere(host)
    reply = curl(outside, f"{URL}/health", key=None, ca=OUTSIDE_CA)
    assert reply.status == 200 and "strict-transport-security" not in reply.headers
    # an operator's certificate (vllm_gateway_tls_certificate and its key): served, HSTS for a year
    ca, chain, key = _issued_by_a_test_ca(GATEWAY, address_of(outside, GATEWAY))
    anchor = "/tmp/test-ca.crt"
    assert outside.run("printf '%%s' %s > %s", ca, anchor).rc == 0
    given = {"vllm_gateway_tls_certificate": chain, "vllm_gateway_tls_key": key}
    try:
        rc, out = run_playbook("playbooks/gateway.yml", "--limit", GATEWAY, extra_vars=given)
        assert rc == 0, out[-3000:]
        assert "BEGIN PRIVATE KEY" not in out and key.splitlines()[1] not in out
        for url in (f"{URL}/health", f"https://{address_of(outside, GATEWAY)}/health"):
            reply = curl(outside, url, key=None, ca=anchor)
            assert reply.status == 200, url
            assert reply.headers["strict-transport-security"] == "max-age=31536000"
    finally:
        # no longer given: a self-signed certificate again
        rc, out = run_playbook("playbooks/gateway.yml", "--limit", GATEWAY)
        outside.run("rm -f %s", anchor)
    assert rc == 0, out[-3000:]
    cert = host.check_output("openssl x509 -in %s -noout -issuer -subject", CA).splitlines()
    assert cert[0].split("=", 1)[1] == cert[1].split("=", 1)[1], cert  # issuer = subject
    # with a key of its own: the one the test CA certified is not reused
    given_public = (
        serialization.load_pem_private_key(key.encode(), None)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assert (
        host.check_output("openssl x509 -in %s -noout -pubkey", CA).strip() != given_public.strip()
    )
    reply = curl(client_elsewhere(host), f"{URL}/health", key=None, ca=OUTSIDE_CA)
    assert reply.status == 200 and "strict-transport-security" not in reply.headers


def test_plain_http_redirects_the_page_and_refuses_the_api(host) -> None:
    # A client set up with http:// has sent its key in cleartext by the time the gateway answers: a
    # redirect would make it work and go on doing so. The API is refused; the page is redirected.
    outside = client_elsewhere(host)
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
        reply = curl(outside, f"http://{GATEWAY}{path}", body=body, ca=OUTSIDE_CA)
        assert reply.status == 403, (path, reply)
        assert reply.headers["content-type"] == "application/json"
        assert reply.json()["error"]["code"] == "https_required"
        assert "https://" in reply.json()["error"]["message"]
        assert "location" not in reply.headers
        assert "x-upstream" not in reply.headers  # no server was asked


def test_health_answers_without_a_key(host) -> None:
    assert curl(host, f"{URL}/health", key=None).status == 200


HEALTH_PER_SECOND = 10  # vllm_gateway_health_checks_per_second (the role's default)
ACCESS_LOG = "/var/log/nginx/vllm-gateway.access.log"

# n health checks one after the other on one TLS connection; prints their [status, Retry-After,
# body] and the seconds they took together.
HEALTH_CHECKS = (
    "import json, ssl, sys, time, http.client\n"
    "conn = http.client.HTTPSConnection(sys.argv[2], context=ssl.create_default_context("
    "cafile=sys.argv[1]), timeout=30)\n"
    "results, start = [], time.monotonic()\n"
    "for _ in range(int(sys.argv[3])):\n"
    "    conn.request('GET', '/health')\n"
    "    resp = conn.getresponse()\n"
    "    body = resp.read().decode()\n"
    "    results.append([resp.status, resp.getheader('Retry-After'), body])\n"
    "print(json.dumps([results, time.monotonic() - start]))\n"
)


def test_one_client_checks_health_at_its_pace_and_the_rest_never_reach_a_server(host) -> None:
    # As fast as one connection allows: the first N+1 are answered (N a second and N more at once),
    # then at most one per 1/N s of the time they took; the others get nginx's own 429, no server
    # asked. A second later the client is answered again (for the tests after this one).
    client = client_elsewhere(host)
    out = client.check_output("python3 -c %s %s %s %s", HEALTH_CHECKS, OUTSIDE_CA, GATEWAY, "40")
    results, seconds = json.loads(out)
    answered = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert [r[0] for r in results[: HEALTH_PER_SECOND + 1]] == [200] * (HEALTH_PER_SECOND + 1)
    assert len(answered) <= HEALTH_PER_SECOND + 2 + seconds * HEALTH_PER_SECOND, (seconds, results)
    assert refused, (seconds, results)
    for status, retry_after, body in refused:
        assert (status, retry_after) == (429, "1")
        assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    # nginx's log of these 40: a server was asked for each answered one, none for the 429s
    logged = host.check_output("tail -n %s %s", str(len(results)), ACCESS_LOG).splitlines()
    asked = [line.split(" upstream=")[1].split()[0] != "-" for line in logged]
    assert [status == 200 for status, _, _ in results] == asked, logged
    wait_until(
        lambda: curl(client, f"{URL}/health", key=None, ca=OUTSIDE_CA).status == 200,
        10,
        "/health from the client elsewhere after its burst",
        interval=0.5,
    )


def test_right_key_lists_the_model(host) -> None:
    reply = curl(host, f"{URL}/v1/models")
    assert reply.status == 200
    assert SERVED_NAME in [m["id"] for m in reply.json()["data"]]


@pytest.mark.parametrize(
    "key",
    [None, "wrong-key", KEY + "x", KEY.swapcase() if KEY.swapcase() != KEY else "X"],
    ids=["no-key", "wrong-key", "key-plus-a-character", "key-in-other-case"],
)
@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/models", None), ("/v1/chat/completions", chat()), ("/v1/completions", {})],
)
def test_a_missing_or_wrong_key_gets_401_at_the_edge(
    host, key: str | None, path: str, body: dict | None
) -> None:
    reply = curl(host, URL + path, key=key, body=body)
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
    reply = curl(host, URL + path, body=body, method=method)
    assert reply.status in (403, 404), reply.body
    # nginx's own answer (a server's 404 would not have this body), no server asked
    assert reply.json()["error"]["code"] in ("not_found", "forbidden"), reply.body
    assert "x-upstream" not in reply.headers


def test_requests_are_spread_over_both_servers(host) -> None:
    assert_spread_over_all_servers(host)


def test_streaming_passes_through_tls_unbuffered(host) -> None:
    # Timestamps each line as it arrives on the gateway host. The stub sends a token every 50 ms:
    # unbuffered, the lines arrive one by one, that far apart; buffered, nginx passes them on in
    # batches (or all at the end), most of them together.
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
    request = json.dumps(chat(16, stream=True))
    python = "python3 -c %s %s %s %s %s"
    rc, out, err = run_with_secret(host, python, script, CA, GATEWAY, request, KEY)
    assert rc == 0, err
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
    arrivals = [at for at, _ in events]
    gaps = [later - earlier for earlier, later in pairwise(arrivals)]
    # most lines a token's pause after the one before (a busy machine may bunch a few)
    assert sum(gap > 0.025 for gap in gaps) >= len(gaps) / 2, f"buffered? gaps {gaps}"


PER_CLIENT = 4  # vllm_gateway_api_requests_per_client in molecule.yml


# n streams of about 3 s (a token every 50 ms) started at once; the i-th names forwarded[i % len] in
# X-Forwarded-For when forwarded is given. Each: [status, Retry-After, the end of the body].
STREAMS_AT_ONCE = (
    "import json, ssl, sys, threading, http.client\n"
    "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
    "n, forwarded = int(sys.argv[5]), json.loads(sys.argv[6])\n"
    "results, start = [], threading.Barrier(n)\n"
    "def one(i):\n"
    "    conn = http.client.HTTPSConnection(sys.argv[2], context=ctx, timeout=120)\n"
    "    headers = {'Authorization': 'Bearer ' + sys.argv[4], 'Content-Type': 'application/json'}\n"
    "    if forwarded:\n"
    "        headers['X-Forwarded-For'] = forwarded[i % len(forwarded)]\n"
    "    start.wait()\n"
    "    conn.request('POST', '/v1/chat/completions', body=sys.argv[3], headers=headers)\n"
    "    resp = conn.getresponse()\n"
    "    body = resp.read().decode()\n"
    "    results.append([resp.status, resp.getheader('Retry-After'), body[-300:]])\n"
    "threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]\n"
    "[t.start() for t in threads]\n"
    "[t.join() for t in threads]\n"
    "print(json.dumps(results))\n"
)


def _streams_at_once(client, n: int, forwarded: tuple[str, ...] = ()) -> list[list]:
    python = "python3 -c %s %s %s %s %s %s %s"
    request = json.dumps(chat(60, stream=True))
    rc, out, err = run_with_secret(
        client,
        python,
        STREAMS_AT_ONCE,
        OUTSIDE_CA,
        GATEWAY,
        request,
        KEY,
        str(n),
        json.dumps(forwarded),
    )
    assert rc == 0, err
    return json.loads(out)


def test_one_client_address_holds_at_most_its_share_of_requests(host) -> None:
    # PER_CLIENT + 2 streams start at once from the client elsewhere: PER_CLIENT are answered, the
    # others refused at once with 429 and Retry-After; once they are done the next is answered.
    client = client_elsewhere(host)
    results = _streams_at_once(client, PER_CLIENT + 2)
    answered = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert (len(answered), len(refused)) == (PER_CLIENT, 2), results
    assert all(body.rstrip().endswith("data: [DONE]") for _, _, body in answered), answered
    for _, retry_after, body in refused:
        assert retry_after == "1"
        assert json.loads(body)["error"]["code"] == "too_many_concurrent_requests"
    assert curl(client, f"{URL}/v1/chat/completions", body=chat(), ca=OUTSIDE_CA).status == 200


CLIENT_TIMEOUT = 10  # vllm_gateway_client_timeout (the role's default)

# Two requests over TLS that stop half-way: headers begun and never ended, and a body of 1000
# bytes announced (with the key, so that nginx reads it) and 8 sent. Each: [seconds from the
# connection's opening until the gateway closed it (or until the client gave up, argv[4] s
# without a byte), what the gateway sent back].
HALF_REQUESTS = (
    "import json, socket, ssl, sys, time\n"
    "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
    "def held(request):\n"
    "    start, got = time.monotonic(), b''\n"
    "    raw = socket.create_connection((sys.argv[2], 443), timeout=int(sys.argv[4]))\n"
    "    conn = ctx.wrap_socket(raw, server_hostname=sys.argv[2])\n"
    "    conn.sendall(request.encode())\n"
    "    try:\n"
    "        while chunk := conn.recv(4096):\n"
    "            got += chunk\n"
    "    except (ConnectionError, ssl.SSLError, TimeoutError):\n"
    "        pass\n"
    "    return [time.monotonic() - start, got.decode(errors='replace')[:200]]\n"
    "head = 'POST /v1/chat/completions HTTP/1.1\\r\\nHost: ' + sys.argv[2] + '\\r\\n'\n"
    "body = head + 'Authorization: Bearer ' + sys.argv[3] + '\\r\\n'\n"
    "body += 'Content-Type: application/json\\r\\n'\n"
    "body += 'Content-Length: 1000\\r\\n\\r\\n{\"model\"'\n"
    "print(json.dumps([held(head), held(body)]))\n"
)


def test_a_client_that_stops_half_way_through_its_request_is_dropped(host) -> None:
    # One host could otherwise hold many connections open with requests it never ends, 60 s
    # each (nginx's default): CLIENT_TIMEOUT s after the connection opened (the headers) or after
    # the last bytes of the body, the gateway closes it, answering nothing
    client = client_elsewhere(host)
    gives_up = 3 * CLIENT_TIMEOUT + 5
    rc, out, err = run_with_secret(
        client, "python3 -c %s %s %s %s %s", HALF_REQUESTS, OUTSIDE_CA, GATEWAY, KEY, str(gives_up)
    )
    assert rc == 0, err
    for elapsed, answer in json.loads(out):
        assert CLIENT_TIMEOUT - 1 < elapsed < 3 * CLIENT_TIMEOUT, (elapsed, answer)
        assert answer == "", answer


# Two clients a load balancer (client-g, when trusted) names in X-Forwarded-For (TEST-NET-3).
FORWARDED = ("203.0.113.10", "203.0.113.20")
# IPv6 clients it names (documentation prefix 2001:db8::/32): two addresses of one /64 (the role's
# vllm_gateway_client_ipv6_prefix) and two of different /64s, whose first 64 bits hold 0x0a bytes
# (a newline, which a regular expression's "." skips unless told); an IPv4 address and its
# IPv4-mapped form (one client); two IPv4-mapped addresses, whose first 64 bits are the same (two)
ONE_NETWORK = ("2001:db8:a:a::1", "2001:db8:a:a:ffff::2")
TWO_NETWORKS = ("2001:db8:a:a::1", "2001:db8:a:b::1")
ONE_IPV4 = ("203.0.113.10", "::ffff:203.0.113.10")
MAPPED = ("::ffff:203.0.113.10", "::ffff:203.0.113.20")


def _logged_clients(host, last: int) -> list[str]:
    """The client addresses of the last lines of the gateway's access log."""
    return host.check_output("tail -n %s %s | cut -d' ' -f1", str(last), ACCESS_LOG).split()


def _name_a_client(sender) -> None:
    """One request from `sender` naming the first of FORWARDED as the client."""
    sender.check_output(
        "curl --silent --output /dev/null --max-time 10 -H %s http://%s/",
        f"X-Forwarded-For: {FORWARDED[0]}",
        GATEWAY,
    )


def test_behind_a_trusted_proxy_each_client_it_names_has_its_own_share(host) -> None:
    client = client_elsewhere(host)
    me = address_of(host, OUTSIDE)
    # by default nobody is trusted: the header is ignored, the streams share client-g's budget
    results = _streams_at_once(client, 2 * PER_CLIENT, FORWARDED)
    assert [r[0] for r in results].count(200) == PER_CLIENT, results
    assert set(_logged_clients(host, 2 * PER_CLIENT)) == {me}
    trusted = {"vllm_gateway_real_ip_from": [f"{me}/32"]}
    try:
        rc, out = run_playbook("playbooks/gateway.yml", "--limit", GATEWAY, extra_vars=trusted)
        assert rc == 0, out[-3000:]
        # client-g trusted: each client it names has a share of its own, and is logged as itself
        results = _streams_at_once(client, 2 * PER_CLIENT, FORWARDED)
        assert [r[0] for r in results].count(200) == 2 * PER_CLIENT, results
        assert set(_logged_clients(host, 2 * PER_CLIENT)) == set(FORWARDED)
        # an IPv6 client is its /64: one that takes a new address for each request still has one
        # share, and so has an IPv4 address named in both forms; two networks have two, and so have
        # two IPv4-mapped addresses
        for one in (ONE_NETWORK, ONE_IPV4):
            results = _streams_at_once(client, 2 * PER_CLIENT, one)
            assert [r[0] for r in results].count(200) == PER_CLIENT, (one, results)
            assert set(_logged_clients(host, 2 * PER_CLIENT)) == set(one)
        for two in (TWO_NETWORKS, MAPPED):
            results = _streams_at_once(client, 2 * PER_CLIENT, two)
            assert [r[0] for r in results].count(200) == 2 * PER_CLIENT, (two, results)
        # a host that is not trusted names a client: ignored
        _name_a_client(host_named(SERVERS[0]))
        assert _logged_clients(host, 1) == [address_of(host, SERVERS[0])]
    finally:
        rc, out = run_playbook("playbooks/gateway.yml", "--limit", GATEWAY)
    assert rc == 0, out[-3000:]
    _name_a_client(client)  # restored: client-g is no longer trusted
    assert _logged_clients(host, 1) == [me]


def test_non_streamed_chat_completion_through_the_gateway(host) -> None:
    reply = curl(host, f"{URL}/v1/chat/completions", body=chat())
    assert reply.status == 200
    assert reply.json()["usage"]["completion_tokens"] > 0


def test_internal_listener_serves_the_same_paths_with_the_same_key(host) -> None:
    def answer(path: str, key: str | None = KEY) -> tuple[str, str]:
        """The status and nginx's error code (if any) of a GET of `path` there."""
        auth = ["--header", f"Authorization: Bearer {key}"] if key else []
        rc, out, err = run_with_secret(
            host,
            "curl --silent --show-error --max-time 60 --write-out '\\n%%{http_code}'"
            + " %s" * len(auth)
            + " %s",
            *auth,
            INTERNAL + path,
        )
        assert rc == 0, err
        body, _, status = out.rpartition("\n")
        code = json.loads(body)["error"]["code"] if status not in ("200",) else ""
        return status, code

    assert answer("/v1/models") == ("200", "")
    assert answer("/v1/models", key=None) == ("401", "invalid_api_key")
    assert answer("/v1/models", key="wrong-key") == ("401", "invalid_api_key")
    assert answer("/health", key=None) == ("200", "")
    assert answer("/tokenize") == ("404", "not_found")
    assert answer("/metrics") == ("403", "forbidden")


def test_a_session_goes_back_to_the_server_that_served_it(host) -> None:
    first = _servers_of_sessions(host)
    # asked again in other orders: taking turns (least_conn's tie-break) would send them elsewhere
    for order in (SESSIONS[::-1], SESSIONS[1:] + SESSIONS[:1], SESSIONS[::2] + SESSIONS[1::2]):
        assert _servers_of_sessions(host, order) == first
    # and the sessions are spread over every server
    assert set(first.values()) == {server_address(host, name) for name in SERVERS}


def test_a_session_request_reaches_the_matched_path_only(host) -> None:
    # nginx matches the normalised path; what reaches vLLM must be that path, not the raw URI
    # (vLLM would serve /metrics/... as its metrics, which the allowlist keeps from key holders)
    reply = curl(
        host,
        f"{URL}/metrics/../v1/models",
        extra=("--path-as-is", "--header", f"{SESSION_HEADER}: raw-path"),
    )
    assert reply.status == 200, reply.body
    assert reply.json()["data"][0]["id"] == SERVED_NAME


def test_stopping_one_server_leaves_the_gateway_answering(host) -> None:
    stopped_name = SERVERS[0]
    stopped_address = server_address(host, stopped_name)
    server = host_named(stopped_name)
    sessions = _servers_of_sessions(host)
    assert server.run("systemctl stop vllm").rc == 0
    try:
        assert not server.service("vllm").is_running
        for _ in range(3):
            for reply in (
                curl(host, f"{URL}/v1/models"),
                curl(host, f"{URL}/v1/chat/completions", body=chat()),
            ):
                assert reply.status == 200, reply.body
                assert answered_by(reply) != stopped_address
            assert curl(host, f"{URL}/health", key=None).status == 200
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
    assert_spread_over_all_servers(host)


def test_logs_never_hold_the_api_key(host) -> None:
    # every test above sent the key; nginx's access log format has no Authorization header
    assert_logs_never_hold_the_key(host)
