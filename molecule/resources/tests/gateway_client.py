"""A client of the gateway, shared by the scenarios that have one (molecule/gateway and default).

Requests go over HTTPS to https://<gateway>/ with the certificate the role generated as the only
trust anchor (curl --cacert), from the gateway host itself or from a host of the test network that
is neither the gateway nor a server. Which server answered is read from the X-Upstream response
header (vllm_gateway_upstream_header, set by both scenarios). Traffic stays inside the containers.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import testinfra.utils.ansible_runner
from helpers import address_of, api_key, host_named, run_with_secret

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
GATEWAY = RUNNER.get_hosts("gateway")[0]
SERVERS = RUNNER.get_hosts("vllm_servers")
# A client from outside: the first host of the scenario that is neither the gateway nor a server.
OUTSIDE = next(
    name
    for name in RUNNER.get_hosts("all")
    if name not in {GATEWAY, *SERVERS, *RUNNER.get_hosts("monitoring")}
)

# The gateway's name is its inventory name: a SAN of its self-signed certificate and, on Docker's
# network, a resolvable host name.
URL = f"https://{GATEWAY}"
CA = "/etc/nginx/vllm-gateway/tls/gateway.crt"
INTERNAL = "http://127.0.0.1:8090"
SERVED_NAME = "Qwen/Qwen2.5-1.5B-Instruct"
# Where the tests put the gateway's certificate on OUTSIDE.
OUTSIDE_CA = "/tmp/gateway-ca.crt"
VLLM_PORT = 8000
# The chat page names each conversation in this header (vllm-router's name for it); the gateway
# sends every request of a session to the same server, the one that holds its prefix in cache.
SESSION_HEADER = "X-Session-ID"
SESSIONS = [f"conversation-{i}" for i in range(16)]


# The key the servers and the gateway share, as the first server reads it (from Vault, via its
# environment file).
KEY = api_key(host_named(SERVERS[0]))


@dataclass
class Reply:
    """An HTTP answer as curl saw it."""

    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> dict:
        return json.loads(self.body)


def curl(
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
    rc, out, err = run_with_secret(host, "curl " + " ".join(["%s"] * (len(args) + 1)), *args, url)
    assert rc == 0, err
    head, _, text = out.replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.splitlines()
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Reply(int(status_line.split()[1]), headers, text)


def client_elsewhere(gateway) -> testinfra.host.Host:
    """The client elsewhere on the network, with the gateway's certificate as its trust anchor."""
    client = host_named(OUTSIDE)
    pem = gateway.file(CA).content_string
    assert client.run("printf '%%s' %s > %s", pem, OUTSIDE_CA).rc == 0
    return client


def answered_by(reply: Reply) -> str:
    """The server that produced the answer: the last address nginx tried."""
    return reply.headers["x-upstream"].split(",")[-1].strip()


def server_address(host, name: str) -> str:
    """ip:port of a server as nginx reports it ($upstream_addr): its address on the test network."""
    return f"{address_of(host, name)}:{VLLM_PORT}"


def assert_spread_over_all_servers(host) -> None:
    """Sequential requests reach every server (least_conn breaks ties by taking turns)."""
    expected = {server_address(host, name) for name in SERVERS}
    seen: set[str] = set()
    # A server restarted shortly before may still be marked failed for fail_timeout (10 s).
    deadline = time.monotonic() + 60
    while seen != expected and time.monotonic() < deadline:
        for _ in range(4):
            reply = curl(host, f"{URL}/v1/models")
            assert reply.status == 200
            seen.add(answered_by(reply))
        if seen != expected:
            time.sleep(2)
    assert seen == expected


def chat(max_tokens: int = 4, stream: bool = False, messages: list | None = None) -> dict:
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


def assert_logs_never_hold_the_key(gateway) -> None:
    """No line of nginx's logs on `gateway` holds the API key (counted, never printed)."""
    rc, counts, _ = run_with_secret(gateway, "grep -rcF -- %s /var/log/nginx/", KEY)
    assert rc == 1, counts
