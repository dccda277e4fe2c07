"""Failure paths of the service stage, run with ansible-playbook against one converged server.

Bad input must fail in preflight with a clear message before anything changes; a server that does
not come up must fail the play with the unit's journal in the message. The last test restores the
converged state. Traffic stays inside the test containers.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
HOST = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")[-1]
testinfra_hosts = [HOST]
UNIT = "/etc/systemd/system/vllm.service"


def _serve(**extra_vars: object) -> tuple[int, str]:
    """Run the service stage on HOST with extra variables; return its exit code and its output
    with white space folded (the YAML callback wraps long messages)."""
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(PROJECT / "roles"), ANSIBLE_NOCOLOR="1")
    run = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            INVENTORY,
            "--limit",
            HOST,
            "-e",
            json.dumps(extra_vars),
            str(PROJECT / "playbooks" / "serve.yml"),
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return run.returncode, " ".join((run.stdout + run.stderr).split())


def test_oversized_kv_cache_is_refused_before_anything_changes(host) -> None:
    before = host.file(UNIT).sha256sum
    rc, out = _serve(vllm_service_kvcache_space_gib=100000)
    assert rc != 0
    assert "does not fit" in out and "lower vllm_service_kvcache_space_gib" in out
    assert "Write the systemd unit" not in out
    assert host.file(UNIT).sha256sum == before
    assert host.service("vllm").is_running


def test_a_server_that_does_not_start_fails_with_its_journal(host) -> None:
    rc, out = _serve(vllm_service_extra_args=["--no-such-option"], vllm_service_start_timeout=60)
    assert rc != 0
    assert "did not answer" in out
    assert "Last lines of its journal" in out
    # vLLM's own complaint, read from the journal of the unit
    assert "--no-such-option" in out.split("Last lines of its journal", 1)[1]


def test_rerunning_with_good_settings_restores_the_server(host) -> None:
    rc, out = _serve()
    assert rc == 0, out[-3000:]
    assert host.service("vllm").is_running
    assert host.run("curl --silent --fail http://127.0.0.1:8000/health").rc == 0
