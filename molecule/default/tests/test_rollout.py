"""A rollout that restarts every server loses no request.

While hf-standin (a client outside the fleet) sends a bounded load of streamed and non-streamed chat
completions through the gateway (tests/files/gateway_load.py: 4 clients, each pausing 2 s after each
answer: ~2 requests a second all through the rollout, without keeping both cores of a small test
machine busy: with a pause of half a second every task of the rollout took 2 to 4 s on a 2-core
host, and a saturating load made the test more than twice as long), serve.yml rolls a restart
through the fleet (`vllm_service_rolling_restart`, batches of one): each server is drained at the
gateway, restarted, gated and put back, the path every planned restart takes (a changed unit,
environment or package). Every request must succeed and every answer be complete. When the first
server is taken out of rotation, the controller sends it long requests of its own (4 answers of
1,900 tokens each, straight to its port, open to the controller as to a monitoring host), a new one
every few seconds until the drain's wait begins, so that one is in flight when it first looks,
however long the gateways took: the drain must wait for them before the restart (its first wait, on
vLLM's /load, must see them), and each must be answered in full. Nothing changes on the servers but
their processes, so there is nothing to roll back. Traffic stays inside the test containers.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner
from helpers import (
    api,
    api_key,
    host_named,
    run_playbook,
    run_with_secret,
    server_state,
    task_result,
    wait_until,
)

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
SERVERS = [host_named(n) for n in RUNNER.get_hosts("vllm_servers")]
GATEWAY_NAME = RUNNER.get_hosts("gateway")[0]
GATEWAY = host_named(GATEWAY_NAME)
CLIENT = host_named("hf-standin")
CA = "/etc/nginx/vllm-gateway/tls/gateway.crt"
LOAD = Path(__file__).parent / "files" / "gateway_load.py"
STOP, OUT = "/tmp/rollout-load.stop", "/tmp/rollout-load.json"


@pytest.fixture
def load() -> Iterator[None]:
    """The load generator on the client, started before the rollout; always stopped afterwards."""
    CLIENT.check_output("printf '%%s' %s > /tmp/rollout-ca.crt", GATEWAY.file(CA).content_string)
    CLIENT.check_output("printf '%%s' %s > /tmp/gateway_load.py", LOAD.read_text())
    CLIENT.check_output("rm -f %s %s", STOP, OUT)
    rc, _, err = run_with_secret(
        CLIENT,
        "VLLM_API_KEY=%s nohup python3 /tmp/gateway_load.py --host %s --ca /tmp/rollout-ca.crt"
        " --workers 4 --pause 2 --max-seconds 1500 --stop %s --out %s"
        " > /tmp/rollout-load.log 2>&1 &",
        api_key(SERVERS[0]),
        GATEWAY_NAME,
        STOP,
        OUT,
    )
    assert rc == 0, err
    time.sleep(10)
    try:
        yield
    finally:
        CLIENT.run("touch %s", STOP)
        wait_until(lambda: CLIENT.file(OUT).exists, 360, "the load client's summary", 3)


LONG = {"n": 4, "max_tokens": 1900, "min_tokens": 1900, "ignore_eos": True}
# Between two long requests: well under the length of one (it added 40 s to the test on an AVX2
# host); a new one also goes as soon as none is in flight, and at most LONG_AT_MOST in all (the
# drain gives up after vllm_service_drain_timeout). A single request sent as the drain began once
# left the wait nothing to wait for in CI, most likely because it had ended before the gateways had
# reloaded and the wait first looked.
LONG_EVERY, LONG_AT_MOST = 4, 10
DRAIN = "Take the server out of rotation at the gateways]"
DRAIN_WAIT = "Wait until the server has no request in its HTTP front end]"


def _long_request(url: str, key: str, answer: dict) -> None:
    """A chat completion of LONG's size sent straight to a server: its answer, or the error, and
    when it was sent and ended (time.monotonic())."""
    answer["sent"] = time.monotonic()
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(
            {"model": "Qwen/Qwen2.5-1.5B-Instruct", "messages": [{"role": "user", "content": "Hi"}]}
            | LONG
        ).encode(),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=600) as response:
            answer.update(json.load(response))
    except urllib.error.HTTPError as error:
        answer["error"] = f"{error}: {error.read()[:1000]!r}"
    except Exception as error:  # whatever broke it is the test's failure message
        answer["error"] = repr(error)
    finally:
        answer["ended"] = time.monotonic()


def _long_requests(url: str, key: str, answers: list[dict], stop: threading.Event) -> None:
    """LONG requests sent straight to a server until `stop` is set, each in its own thread: a new
    one every LONG_EVERY s and whenever none is in flight, at most LONG_AT_MOST. Each one's answer
    or error goes in `answers`; returns when all have ended (or after 10 minutes each)."""
    senders: list[threading.Thread] = []
    last = -LONG_EVERY
    while not stop.is_set():
        idle = not any(sender.is_alive() for sender in senders)
        if len(senders) < LONG_AT_MOST and (idle or time.monotonic() - last >= LONG_EVERY):
            answers.append({})
            senders.append(threading.Thread(target=_long_request, args=(url, key, answers[-1])))
            senders[-1].start()
            last = time.monotonic()
        stop.wait(0.1)
    for sender in senders:
        sender.join(600)


def _timeline(answers: list[dict], began: float) -> list[str]:
    """When each long request was sent and ended (s after the drain began), and how."""
    return [
        f"{a.get('sent', began) - began:.1f}-{a.get('ended', began) - began:.1f} s:"
        f" {a.get('error') or a.get('usage')}"
        for a in answers
    ]


def test_a_rollout_of_every_server_loses_no_request(load: None) -> None:
    before = [server_state(host) for host in SERVERS]
    # the first batch: the first server in the inventory's order (molecule.yml), checked below
    first = RUNNER.get_hosts("vllm_servers")[0]
    answers: list[dict] = []
    waiting = threading.Event()  # the drain's wait has begun: no more long requests
    target = (api(SERVERS[0]), api_key(SERVERS[0]), answers, waiting)  # SERVERS[0] is `first`
    sender = threading.Thread(target=_long_requests, args=target, daemon=True)

    began: dict[str, float] = {}  # when the drain ("drain") and its wait ("wait") began

    def on_drain(line: str) -> None:
        if DRAIN in line and sender.ident is None:
            began["drain"] = time.monotonic()
            sender.start()
        if DRAIN_WAIT in line and not waiting.is_set():
            began["wait"] = time.monotonic()
            waiting.set()

    # every server is drained, restarted, gated and put back in turn
    rolling = {"vllm_service_rolling_restart": True, "vllm_rollout_batch": 1}
    try:
        rc, out = run_playbook("playbooks/serve.yml", extra_vars=rolling, watch=on_drain)
    finally:
        waiting.set()  # no more long requests, whatever happened (had the drain no wait: here)
    assert rc == 0, out[-3000:]
    assert sender.ident is not None, "no server was taken out of rotation"
    sender.join(600)
    assert not sender.is_alive(), "the long requests did not end within 10 minutes"
    # the long requests kept the first server's drain waiting, and each was answered in full
    drained_first = out.split(DRAIN, 1)[1]
    assert re.match(rf"[\s*]*included: \S+ for {re.escape(first)}\b", drained_first), out[-3000:]
    waited = f"RETRYING: [{first}]: {DRAIN_WAIT.rstrip(']')}"
    wait = f"at {began['wait'] - began['drain']:.1f} s" if "wait" in began else "never"
    timeline = [f"the wait began {wait}", *_timeline(answers, began["drain"])]
    assert waited in out, (timeline, out[-3000:])
    assert answers, timeline
    for answer in answers:
        assert "ended" in answer, timeline
        assert "error" not in answer, timeline
        assert len(answer["choices"]) == LONG["n"], answer
        usage = answer["usage"]
        assert usage["completion_tokens"] == LONG["n"] * LONG["max_tokens"], usage
    asked = "is to restart (vllm_service_rolling_restart): restart it"
    assert out.count(asked) == len(SERVERS), out[-3000:]
    for name in RUNNER.get_hosts("vllm_servers"):
        # drained at the gateways before its restart, and asked a chat by the gate after it
        drained = task_result(out, "Take the server out of rotation at the gateways", name)
        assert drained == "included", out[-3000:]
        assert task_result(out, "Ask for one real chat completion", name) == "ok"
    after = [server_state(host) for host in SERVERS]
    for (unit, env, old_pid), (new_unit, new_env, new_pid) in zip(before, after, strict=True):
        # the same unit and environment file, a new process
        assert (unit, env) == (new_unit, new_env) and old_pid != new_pid, (before, after)
    time.sleep(5)
    CLIENT.check_output("touch %s", STOP)
    wait_until(
        lambda: CLIENT.file(OUT).exists,
        360,
        lambda: "the load client's summary: " + CLIENT.run("cat /tmp/rollout-load.log").stdout,
        3,
    )
    summary = json.loads(CLIENT.file(OUT).content_string)
    # in full, with what the gateway logged of requests not answered 200 (no secrets there)
    said = (
        json.dumps(summary)
        + GATEWAY.run(
            "cd /var/log/nginx && grep -v '\" 200 ' vllm-gateway.access.log | tail -n 20;"
            " tail -n 20 vllm-gateway.error.log"
        ).stdout
    )
    assert summary["requests"] >= 20, said
    assert summary["streamed"] > 0 and summary["streamed"] < summary["requests"], said
    assert (summary["failed"], summary["truncated"]) == (0, 0), said
