"""A rollout that restarts every server loses no request.

While hf-standin (a client outside the fleet) sends a bounded load of streamed and non-streamed chat
completions through the gateway (tests/files/gateway_load.py), serve.yml applies a change that
rewrites every server's unit: each server is drained at the gateway, restarted, gated and put back.
Every request must succeed and every answer be complete. The fixture rolls the change back (another
drained rollout). Traffic stays inside the test containers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import testinfra
import testinfra.utils.ansible_runner
from helpers import api_key, run_playbook

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
SERVERS = [
    testinfra.get_host(f"ansible://{n}?ansible_inventory={INVENTORY}")
    for n in RUNNER.get_hosts("vllm_servers")
]
GATEWAY_NAME = RUNNER.get_hosts("gateway")[0]
GATEWAY = testinfra.get_host(f"ansible://{GATEWAY_NAME}?ansible_inventory={INVENTORY}")
CLIENT = testinfra.get_host(f"ansible://hf-standin?ansible_inventory={INVENTORY}")
CA = "/etc/nginx/vllm-gateway/tls/gateway.crt"
LOAD = Path(__file__).parent / "files" / "gateway_load.py"
STOP, OUT = "/tmp/rollout-load.stop", "/tmp/rollout-load.json"


def _serve(**extra: object) -> tuple[int, str]:
    return run_playbook("playbooks/serve.yml", extra_vars=extra)


def _main_pids() -> list[str]:
    return [h.check_output("systemctl show --property MainPID --value vllm") for h in SERVERS]


@pytest.fixture
def rolled_back() -> Iterator[None]:
    """Whatever the test did, the next rollout puts the servers' own settings back: both servers in
    one batch (no load runs by then), which also proves a batch of more than one server."""
    yield
    rc, out = _serve(vllm_rollout_batch=2)
    assert rc == 0, out[-3000:]


@pytest.fixture
def load() -> Iterator[None]:
    """The load generator on the client, started before the rollout; always stopped afterwards."""
    CLIENT.check_output("printf '%%s' %s > /tmp/rollout-ca.crt", GATEWAY.file(CA).content_string)
    CLIENT.check_output("printf '%%s' %s > /tmp/gateway_load.py", LOAD.read_text())
    CLIENT.check_output("rm -f %s %s", STOP, OUT)
    CLIENT.check_output(
        "VLLM_API_KEY=%s nohup python3 /tmp/gateway_load.py --host %s --ca /tmp/rollout-ca.crt"
        " --workers 4 --max-seconds 1500 --stop %s --out %s > /tmp/rollout-load.log 2>&1 &",
        api_key(SERVERS[0]),
        GATEWAY_NAME,
        STOP,
        OUT,
    )
    time.sleep(10)
    try:
        yield
    finally:
        CLIENT.run("touch %s", STOP)
        deadline = time.monotonic() + 360
        while not CLIENT.file(OUT).exists and time.monotonic() < deadline:
            time.sleep(3)


def test_a_rollout_of_every_server_loses_no_request(rolled_back: None, load: None) -> None:
    before = _main_pids()
    # a different unit on every server: each one is drained, restarted, gated and put back in turn
    rc, out = _serve(vllm_service_max_num_seqs=15, vllm_rollout_batch=1)
    assert rc == 0, out[-3000:]
    assert "Take the server out of rotation" in out
    after = _main_pids()
    assert all(old != new for old, new in zip(before, after, strict=True)), (before, after)
    time.sleep(5)
    CLIENT.check_output("touch %s", STOP)
    deadline = time.monotonic() + 360
    while not CLIENT.file(OUT).exists:
        assert time.monotonic() < deadline, CLIENT.run("cat /tmp/rollout-load.log").stdout
        time.sleep(3)
    summary = json.loads(CLIENT.file(OUT).content_string)
    assert summary["requests"] >= 20, summary
    assert summary["streamed"] > 0 and summary["streamed"] < summary["requests"], summary
    assert (summary["failed"], summary["truncated"]) == (0, 0), summary
