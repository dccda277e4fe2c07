"""Failure paths of the service and model stages, run with ansible-playbook against one server.

Bad input must fail in preflight with a clear message before anything changes; a server that does
not come up must fail the play with the unit's journal in the message (a good re-run restores it); a
model download that breaks off is never published where the service would load it, and the next
run redoes it. Traffic stays inside the test containers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
HOST = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")[-1]
testinfra_hosts = [HOST]
MIRROR = testinfra.get_host(f"ansible://hf-standin?ansible_inventory={INVENTORY}")
UNIT = "/etc/systemd/system/vllm.service"
SRV = "/srv/hf-standin"


def _serve(**extra_vars: object) -> tuple[int, str]:
    """Run the service stage on HOST with extra variables (see _stage)."""
    return _stage("serve.yml", **extra_vars)


def _stage(playbook: str, **extra_vars: object) -> tuple[int, str]:
    """Run a stage playbook on HOST with extra variables; return its exit code and its output
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
            str(PROJECT / "playbooks" / playbook),
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


def test_a_broken_off_model_download_is_never_served_and_is_redone(host) -> None:
    good = f"{SRV}/git/Qwen/Qwen2.5-1.5B-Instruct"
    oid = MIRROR.check_output(
        f"git --git-dir={good} show main:model.safetensors | sed -n 's/^oid sha256://p'"
    )
    # A copy of the repository whose LFS store lacks the weights: git-lfs breaks off mid-checkout.
    MIRROR.check_output(
        f"rm -rf {SRV}/git/Qwen/Broken {SRV}/lfs/Qwen/Broken"
        f" && cp -a {good} {SRV}/git/Qwen/Broken"
        f" && cp -a {SRV}/lfs/Qwen/Qwen2.5-1.5B-Instruct {SRV}/lfs/Qwen/Broken"
        f" && rm {SRV}/lfs/Qwen/Broken/{oid}"
    )
    settings = {
        "vllm_model_repo_url": "http://hf-standin:8080/Qwen/Broken",
        "vllm_model_name": "Broken",
    }
    try:
        rc, out = _stage("model.yml", **settings)
        assert rc != 0
        assert "smudge" in out or "lfs" in out.lower()
        assert not host.file("/opt/vllm/models/Broken/current").exists
        entries = host.check_output("ls -A /opt/vllm/models/Broken").split()
        # the half-written clone stays in its staging folder; nothing is published under its sha
        assert any(name.startswith(".staging-") for name in entries)
        assert not any(re.fullmatch("[0-9a-f]{40}", name) for name in entries)
        assert host.service("vllm").is_running

        # The weights are back: the next run throws the staging folder away and redoes the clone.
        MIRROR.check_output(f"cp {SRV}/lfs/Qwen/Qwen2.5-1.5B-Instruct/{oid} {SRV}/lfs/Qwen/Broken/")
        rc, out = _stage("model.yml", **settings)
        assert rc == 0, out[-3000:]
        current = host.file("/opt/vllm/models/Broken/current")
        assert current.is_symlink
        assert host.file(current.linked_to + "/.vllm-model-verified").exists
        assert host.file(current.linked_to + "/model.safetensors").size > 1024
        assert host.run("ls -d /opt/vllm/models/Broken/.staging-*").rc != 0
    finally:
        host.run("rm -rf /opt/vllm/models/Broken")
        MIRROR.run(f"rm -rf {SRV}/git/Qwen/Broken {SRV}/lfs/Qwen/Broken")
