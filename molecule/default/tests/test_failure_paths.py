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
import time
from pathlib import Path

import testinfra.utils.ansible_runner
from helpers import api, api_key

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
HOST = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")[-1]
testinfra_hosts = [HOST]
BUILDER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")[0]
MIRROR = testinfra.get_host(f"ansible://hf-standin?ansible_inventory={INVENTORY}")
UNIT = "/etc/systemd/system/vllm.service"
SRV = "/srv/hf-standin"


def _serve(**extra_vars: object) -> tuple[int, str]:
    """Run the service stage on HOST with extra variables (see _stage)."""
    return _stage("serve.yml", **extra_vars)


def _stage(playbook: str, limit: str | None = HOST, **extra_vars: object) -> tuple[int, str]:
    """Run a stage playbook on HOST (or `limit`, None: every host) with extra variables; return
    its exit code and its output with white space folded (the YAML callback wraps long messages)."""
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(PROJECT / "roles"), ANSIBLE_NOCOLOR="1")
    run = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            INVENTORY,
            *(["--limit", limit] if limit else []),
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


def test_weights_plus_kv_cache_that_do_not_fit_are_refused_with_the_numbers(host) -> None:
    before = host.file(UNIT).sha256sum
    total_gib = int(host.check_output("awk '/MemTotal/ {print int($2 / 1048576)}' /proc/meminfo"))
    # passes the quick settings check (below the host's memory) but not the budget with overhead
    rc, out = _serve(vllm_service_kvcache_space_gib=total_gib - 1)
    assert rc != 0
    assert re.search(r"weights [0-9.]+ GiB \+ KV cache [0-9]+ GiB \+ runtime overhead", out), out[
        -2000:
    ]
    assert "does not fit in" in out
    assert "Write the systemd unit" not in out
    assert host.file(UNIT).sha256sum == before
    assert host.service("vllm").is_running


def test_rollout_stops_at_a_failing_batch_and_the_others_keep_serving(host) -> None:
    hosts = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")
    first = testinfra.get_host(f"ansible://{hosts[0]}?ansible_inventory={INVENTORY}")
    assert hosts[-1] == HOST != hosts[0]
    before = host.file(UNIT).sha256sum
    # batches of one: the first server gets a setting vLLM rejects and never becomes healthy
    rc, out = _stage(
        "serve.yml",
        limit=None,
        vllm_rollout_batch=1,
        vllm_service_extra_args=["--no-such-option"],
        vllm_service_start_timeout=60,
    )
    assert rc != 0
    assert "did not answer" in out and "Last lines of its journal" in out
    # vLLM's own complaint, read from the journal of the unit
    assert "--no-such-option" in out.split("Last lines of its journal", 1)[1]
    assert "--no-such-option" in first.file(UNIT).content_string
    # the rollout stopped there: the second batch was never touched and still serves
    assert host.file(UNIT).sha256sum == before
    assert host.service("vllm").is_running
    assert host.run("curl --silent --fail %s/health", api(host)).rc == 0


def test_rerunning_with_good_settings_restores_the_server(host) -> None:
    rc, out = _stage("serve.yml", limit=None)
    assert rc == 0, out[-3000:]
    assert host.service("vllm").is_running
    assert host.run("curl --silent --fail %s/health", api(host)).rc == 0


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


def test_server_is_restarted_after_kill_9(host) -> None:
    pid = int(host.check_output("systemctl show --property MainPID --value vllm"))
    assert pid > 0
    host.check_output("kill -9 %s", str(pid))
    # Restart=on-failure, after RestartSec: a new process, healthy again
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        new = int(host.check_output("systemctl show --property MainPID --value vllm"))
        if new not in (0, pid) and host.run("curl --silent --fail %s/health", api(host)).rc == 0:
            break
        time.sleep(5)
    else:
        raise AssertionError("vllm did not come back after kill -9")
    assert int(host.check_output("systemctl show --property NRestarts --value vllm")) >= 1


def test_smoke_playbook_runs_the_recipes_two_clients_with_timings(host) -> None:
    rc, out = _stage("smoke.yml", vllm_smoke_max_tokens=8)
    assert rc == 0, out[-3000:]
    assert re.search(r"openai client: [0-9]+ tokens in [0-9.]+ s", out), out[-2000:]
    assert re.search(r"offline LLM.generate: model loaded in [0-9.]+ s", out), out[-2000:]
    assert api_key(host) not in out


def _recap_changed(out: str, name: str) -> int:
    found = re.search(rf"{re.escape(name)}\s*: ok=\d+\s+changed=(\d+)", out)
    assert found, out[-2000:]
    return int(found.group(1))


def test_rerunning_the_build_builds_nothing(host) -> None:
    builder = testinfra.get_host(f"ansible://{BUILDER}?ansible_inventory={INVENTORY}")
    before = builder.check_output("ls -l --time-style=+%s /var/lib/vllm-build/dist")
    rc, out = _stage("vllm.yml", limit=None)
    assert rc == 0, out[-3000:]
    assert "Build the wheel with VLLM_TARGET_DEVICE=cpu" not in out
    assert "Fetch the commit from git" not in out
    assert _recap_changed(out, BUILDER) == 0 and _recap_changed(out, HOST) == 0
    assert builder.check_output("ls -l --time-style=+%s /var/lib/vllm-build/dist") == before


def test_a_full_compile_with_debian_gcc_is_refused_before_anything_changes(host) -> None:
    builder = testinfra.get_host(f"ansible://{BUILDER}?ansible_inventory={INVENTORY}")
    listing = "ls -A /var/lib/vllm-build/work /var/lib/vllm-build/dist /var/lib/vllm-build/venvs"
    before = builder.check_output(listing)
    rc, out = _stage("vllm.yml", limit=BUILDER, vllm_build_use_precompiled=False)
    assert rc != 0
    gcc = builder.check_output("gcc -dumpfullversion")
    refusal = f"gcc {gcc} on builder {BUILDER} is older than 12.3, which vLLM v0.32.0 requires"
    assert refusal + " for x86 CPU builds" in out, out[-3000:]
    assert "vllm_build_use_precompiled: true" in out
    assert _recap_changed(out, BUILDER) == 0
    assert "Install what the build needs" not in out
    assert builder.check_output(listing) == before
    assert host.service("vllm").is_running


def test_a_server_without_the_target_instruction_set_is_refused(host) -> None:
    # No test CPU has AMX (the environment's CPUs: AVX2, some AVX-512, never AMX).
    rc, out = _stage("vllm.yml", limit=BUILDER, vllm_build_cpu_isa="amx_bf16")
    assert rc != 0
    assert f"{HOST} cannot run a vLLM wheel built for amx_bf16: its CPU lacks" in out
    assert "amx_bf16" in out.split("its CPU lacks", 1)[1]
    assert _recap_changed(out, BUILDER) == 0
