"""A rollout that restarts every server loses no request.

While hf-standin (a client outside the fleet) sends a bounded load of streamed and non-streamed chat
completions through the gateway (tests/files/gateway_load.py: 4 clients, each pausing half a second
after each answer: ~6 requests a second all through the rollout, without keeping both cores of a
small test machine busy, where a saturating load tripled the time of the two restarts),
serve.yml rolls a restart through
the fleet (`vllm_service_rolling_restart`, batches of one): each server is drained at the gateway,
restarted, gated and put back, the path every planned restart takes (a changed unit, environment or
package). Every request must succeed and every answer be complete. Nothing changes on the servers
but their processes, so there is nothing to roll back. Traffic stays inside the test containers.
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
from helpers import api_key, run_playbook, server_state, task_result, wait_until

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
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


@pytest.fixture
def load() -> Iterator[None]:
    """The load generator on the client, started before the rollout; always stopped afterwards."""
    CLIENT.check_output("printf '%%s' %s > /tmp/rollout-ca.crt", GATEWAY.file(CA).content_string)
    CLIENT.check_output("printf '%%s' %s > /tmp/gateway_load.py", LOAD.read_text())
    CLIENT.check_output("rm -f %s %s", STOP, OUT)
    CLIENT.check_output(
        "VLLM_API_KEY=%s nohup python3 /tmp/gateway_load.py --host %s --ca /tmp/rollout-ca.crt"
        " --workers 4 --pause 0.5 --max-seconds 1500 --stop %s --out %s"
        " > /tmp/rollout-load.log 2>&1 &",
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
        wait_until(lambda: CLIENT.file(OUT).exists, 360, "the load client's summary", 3)


def test_a_rollout_of_every_server_loses_no_request(load: None) -> None:
    before = [server_state(host) for host in SERVERS]
    # every server is drained, restarted, gated and put back in turn
    rolling = {"vllm_service_rolling_restart": True, "vllm_rollout_batch": 1}
    rc, out = run_playbook("playbooks/serve.yml", extra_vars=rolling)
    assert rc == 0, out[-3000:]
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
    assert summary["requests"] >= 20, summary
    assert summary["streamed"] > 0 and summary["streamed"] < summary["requests"], summary
    assert (summary["failed"], summary["truncated"]) == (0, 0), summary
