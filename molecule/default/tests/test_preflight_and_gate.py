"""Bad input on one host stops the run for every host before anything changes; a server whose
model folder vanished says so and stops restarting; a new package, or a server that does not run
its current unit and environment (a run stopped between writing them and the restart), restarts it
through the rollout; a server restarted outside Ansible is asked a chat by the next run's gate.

Each test reads every server's unit and environment file (sha256) and vLLM's main pid before and
after, from the outside, and restores what it breaks in a fixture. Runs ansible-playbook against the
scenario's containers; traffic stays inside them.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterator

import pytest
import testinfra.utils.ansible_runner
from helpers import (
    PYTHON,
    host_named,
    main_pid,
    run_playbook,
    server_state,
    serving,
    task_result,
    wait_until,
)

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
SERVERS = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")
HOSTS = {name: host_named(name) for name in SERVERS}
BAD, GOOD = SERVERS[-1], SERVERS[0]
GATEWAY = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("gateway")[0]
START_TIMEOUT = 600


def _playbook(
    playbook: str, *args: str, host_vars: dict | None = None, on: str = BAD, **extra: object
) -> tuple[int, str]:
    """Run a playbook on the scenario; `host_vars` go to the host `on` only (BAD unless told)."""
    return run_playbook(
        playbook, *args, extra_vars=extra, host_vars={on: host_vars or {}}, timeout=1200
    )


def _state() -> dict[str, tuple[str, str, int]]:
    """Per server: sha256 of the unit and of the environment file, and vLLM's main pid."""
    return {name: server_state(host) for name, host in HOSTS.items()}


# A change every server would get if the run went on: a different unit everywhere.
CHANGE = {"vllm_service_max_num_seqs": 15}


# Secrets short enough to guess: refused, and never printed.
SHORT_KEY, SHORT_PASSWORD = "sk-" + "k3y" * 9, "pass-w0rd"


@pytest.mark.parametrize(
    ("playbook", "bad_value", "message", "on"),
    [
        # the argument spec (type) in site.yml's preflight
        ("site.yml", {"vllm_service_port": "eighty"}, "vllm_service_port", BAD),
        # a settings check in site.yml's preflight
        (
            "site.yml",
            {"vllm_service_kvcache_space_gib": 100000},
            ("does not fit", "lower vllm_service_kvcache_space_gib"),
            BAD,
        ),
        # a setting that must be the same on every host, given to one: the fleet cache's port
        ("site.yml", {"fleet_cache_port": 8071}, "The fleet cache settings differ", BAD),
        # a vLLM version without a lock (a stage after the toolchain and Python reads the lock)
        ("site.yml", {"vllm_install_version": "0.33.0"}, "No pinned requirements", BAD),
        # a node exporter setting on a server (the monitoring stage, the last, runs the exporter)
        ("site.yml", {"vllm_monitoring_node_exporter_port": "ninety"}, "node_exporter_port", BAD),
        # the memory budget (weights + KV cache + overhead), with its numbers: every server, before
        # the rollout (MEM-1: the host's memory less 1 GiB, which passes the settings check above)
        (
            "playbooks/serve.yml",
            {"vllm_service_kvcache_space_gib": "MEM-1"},
            (
                re.compile(r"weights [0-9.]+ GiB \+ KV cache [0-9]+ GiB \+ runtime overhead"),
                "does not fit in",
            ),
            BAD,
        ),
        # an API key of 30 characters on one server, and on the gateway
        ("site.yml", {"vllm_service_api_key": SHORT_KEY}, "has 30 characters", BAD),
        ("site.yml", {"vllm_gateway_api_key": SHORT_KEY}, "has 30 characters", GATEWAY),
        # the chat page's password, on the gateway host
        ("site.yml", {"vllm_webui_auth_password": SHORT_PASSWORD}, "has 9 characters", GATEWAY),
        # every address trusted to name the client (any client could choose its own)
        (
            "site.yml",
            {"vllm_gateway_real_ip_from": ["0.0.0.0/0"]},
            "(0.0.0.0/0): any client",
            GATEWAY,
        ),
        # an HSTS max-age that is not a number (its default is a template: the spec check skips it)
        (
            "site.yml",
            {"vllm_gateway_hsts_max_age": "1y"},
            "hsts_max_age must be a whole number",
            GATEWAY,
        ),
        # idle connections the servers would close before the gateway does (vLLM's 5 s)
        (
            "site.yml",
            {"vllm_gateway_upstream_keepalive_timeout": 5},
            "must be below 5 s",
            GATEWAY,
        ),
        # a unit name that would reach the firewall drop-in's shell command
        ("site.yml", {"vllm_service_name": "vllm;id"}, "_ . -; without .service", BAD),
        # a fleet-wide setting (fleet_common's spec), on a host that is no server
        (
            "site.yml",
            {"fleet_common_apt_lock_timeout": "15m"},
            "fleet_common_apt_lock_timeout",
            GATEWAY,
        ),
    ],
    ids=[
        "argument-spec",
        "settings",
        "fleet-agreement",
        "unlocked-version",
        "node-exporter-spec",
        "memory-budget",
        "short-api-key",
        "short-gateway-key",
        "short-page-password",
        "trust-everyone",
        "hsts-not-a-number",
        "keepalive-not-first",
        "unit-name-shell",
        "apt-lock-wait-spec",
    ],
)
def test_bad_value_on_one_host_leaves_every_host_unchanged(
    playbook: str, bad_value: dict, message: str | tuple[str | re.Pattern, ...], on: str
) -> None:
    if bad_value.get("vllm_service_kvcache_space_gib") == "MEM-1":
        total_gib = int(
            HOSTS[BAD].check_output("awk '/MemTotal/ {print int($2 / 1048576)}' /proc/meminfo")
        )
        bad_value = {"vllm_service_kvcache_space_gib": total_gib - 1}
    before = _state()
    rc = None  # (none if the run itself raised)
    try:
        rc, out = _playbook(playbook, host_vars=bad_value, on=on, **CHANGE)
        assert rc != 0
        for said in message if isinstance(message, tuple) else (message,):
            found = said.search(out) if isinstance(said, re.Pattern) else said in out
            assert found, out[-3000:]
        assert SHORT_KEY not in out and SHORT_PASSWORD not in out
        assert "Write the systemd unit" not in out
        assert _state() == before
        assert all(serving(host) for host in HOSTS.values())
    finally:
        if _state() != before or rc == 0:  # the run went on: every host as the scenario made it
            rc, out = _playbook("site.yml")
            assert rc == 0, out[-3000:]


@pytest.fixture
def vanished_model() -> Iterator[str]:
    """Move BAD's served model folder away; put it back and start vLLM again afterwards."""
    host = HOSTS[BAD]
    unit = host.file("/etc/systemd/system/vllm.service").content_string
    folder = unit.split(" serve ", 1)[1].split('"')[1]
    host.check_output("mv %s %s.aside", folder, folder)
    try:
        yield folder
    finally:
        host.run("mv %s.aside %s", folder, folder)
        host.run("systemctl reset-failed vllm")
        host.run("systemctl restart vllm")
        wait_until(lambda: serving(host), START_TIMEOUT, f"{BAD}: /health after the model is back")


def test_a_vanished_model_folder_is_named_and_the_restarts_stop(vanished_model: str) -> None:
    host = HOSTS[BAD]

    def show(prop: str) -> str:
        return host.check_output("systemctl show --property %s --value vllm", prop)

    host.run("systemctl restart vllm")
    # systemd 252 has no restart back-off: the start limit (5 starts) ends the loop within a minute
    wait_until(lambda: show("ActiveState") == "failed", 180, "vllm stopped restarting")
    restarts = int(show("NRestarts"))
    journal = host.check_output("journalctl --unit vllm --since '-5min' --no-pager --output cat")
    assert f"model folder {vanished_model} is missing" in journal
    assert "repo id" not in journal.lower()
    # half as long again as RestartSec (10 s): a loop would have started it again by now
    time.sleep(15)
    assert (show("ActiveState"), int(show("NRestarts"))) == ("failed", restarts)


PROBE_DIST = "fleet_gate_probe-1.0.dist-info"


@pytest.fixture
def new_package() -> Iterator[str]:
    """A new (metadata-only) distribution in BAD's Python environment, as a new vLLM or dependency
    would be; removed afterwards and the service stage run again, so the server is as before."""
    host = HOSTS[BAD]
    purelib = host.check_output(
        "%s -c %s", PYTHON, "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    )
    probe = f"{purelib}/{PROBE_DIST}"
    metadata = "Metadata-Version: 2.1\nName: fleet-gate-probe\nVersion: 1.0\n"
    write = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir();"
    write += " (p / 'METADATA').write_text(sys.argv[2]); (p / 'RECORD').write_text('')"
    host.check_output("%s -c %s %s %s", PYTHON, write, probe, metadata)
    try:
        yield probe
    finally:
        host.run("rm -rf %s", probe)
        rc, out = _playbook("playbooks/serve.yml", "--limit", BAD)
        assert rc == 0, out[-3000:]
        assert serving(host)


def test_a_new_package_restarts_the_server_through_the_rollout(new_package: str) -> None:
    # vllm_install put a new distribution into the environment: the next serve.yml restarts the
    # server, drained at the gateways and gated by a chat completion; the other server is untouched
    before = _state()
    rc, out = _playbook("playbooks/serve.yml", "--limit", BAD)
    assert rc == 0, out[-3000:]
    after = _state()
    assert after[BAD][1] != before[BAD][1]  # the environment file names the packages' hash
    assert after[BAD][2] != before[BAD][2]  # a new main pid
    assert after[GOOD] == before[GOOD]
    assert task_result(out, "Take the server out of rotation at the gateways", BAD) == "included"
    assert task_result(out, "Ask for one real chat completion", BAD) == "ok"
    assert serving(HOSTS[BAD])


def _cmdline(host) -> str:
    """The command line of BAD's running vLLM (its main process)."""
    pid = main_pid(host)
    return host.check_output("tr '\\0' ' ' < /proc/%s/cmdline", str(pid))


@pytest.fixture
def unit_behind_the_server() -> Iterator[dict[str, bool]]:
    """BAD runs a unit with --max-num-seqs 15 while its unit file is the usual one again: what a run
    leaves that wrote new files and stopped before the restart (here the other way round, so
    that the plain run below has nothing to write). A test that passed has restored it itself
    (it sets "restored"); otherwise a plain run of the service stage, then a restart by hand."""
    host = HOSTS[BAD]
    unit = "/etc/systemd/system/vllm.service"
    usual = host.file(unit).content
    done = {"restored": False}
    try:
        rc, out = _playbook("playbooks/serve.yml", "--limit", BAD, **CHANGE)
        assert rc == 0, out[-3000:]
        assert "--max-num-seqs 15 " in _cmdline(host)
        host.check_output("echo %s | base64 -d > %s", base64.b64encode(usual).decode(), unit)
        host.check_output("systemctl daemon-reload")
        yield done
    finally:
        if not done["restored"]:
            rc, out = _playbook("playbooks/serve.yml", "--limit", BAD)
            if not serving(host) or "--max-num-seqs 15 " in _cmdline(host):
                # the run above did not restart it (the property under test broke): do it by
                # hand, so that later tests find BAD as it was
                host.check_output("systemctl restart vllm")
                wait_until(
                    lambda: serving(host),
                    START_TIMEOUT,
                    f"{BAD}: /health after its restart, the run's rc {rc}: {out[-3000:]}",
                )
            assert rc == 0, out[-3000:]
            assert serving(host)


def test_a_server_not_running_its_files_is_restarted(unit_behind_the_server: dict) -> None:
    # The files on disk are what the role writes, so this run writes nothing; but the process was
    # started from other files: the run restarts it (drained, gated) instead of leaving it stale.
    before = _state()
    rc, out = _playbook("playbooks/serve.yml", "--limit", BAD)
    assert rc == 0, out[-3000:]
    after = _state()
    assert after[BAD][:2] == before[BAD][:2]  # nothing written
    assert after[BAD][2] != before[BAD][2]  # a new main pid
    assert "--max-num-seqs 15 " not in _cmdline(HOSTS[BAD])
    assert after[GOOD] == before[GOOD]
    assert task_result(out, "Take the server out of rotation at the gateways", BAD) == "included"
    assert task_result(out, "Ask for one real chat completion", BAD) == "ok"
    # the run passed its gate and put BAD back: it runs its usual files, as the scenario made it
    assert serving(HOSTS[BAD])
    unit_behind_the_server["restored"] = True


def test_the_gate_of_an_unchanged_server_asks_no_chat() -> None:
    # BAD restarted outside Ansible (as systemd restarts a crashed server): its new start has not
    # answered a chat, so the next run asks it one, however unchanged its files are
    HOSTS[BAD].check_output("systemctl restart vllm")
    # (every server in one batch: nothing restarts in these runs)
    rc, out = _playbook("playbooks/serve.yml", vllm_rollout_batch="100%")
    assert rc == 0, out[-3000:]
    assert task_result(out, "Ask for one real chat completion", BAD) == "ok"
    # now every server's current start passed the chat with these files: a warm run asks none, and
    # still checks /health and /v1/models; nothing restarts
    before = _state()
    rc, out = _playbook("playbooks/serve.yml", vllm_rollout_batch="100%")
    assert rc == 0, out[-3000:]
    assert _state() == before
    for name in SERVERS:
        assert re.search(rf"{re.escape(name)} : ok=\d+ changed=0 ", out), out[-3000:]
        assert task_result(out, "Ask for one real chat completion", name) == "skipping"
        assert task_result(out, "Ask /v1/models for the served model", name) == "ok"
