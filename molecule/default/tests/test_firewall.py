"""Only the gateway reaches vLLM: each server's host firewall, probed from the outside.

vLLM's API key guards /v1/* only (/invocations, /tokenize, /metrics answer without it), so while the
servers listen on their network address the vllm_service role lets only loopback, the gateway hosts
and its allowlist (here: the controller, which stands for the monitoring hosts) reach port 8000.
Probes go from hf-standin (a host of the test network that is neither the gateway nor a server),
from the gateway, and from the server itself; one test reboots a server (restarts its container) and
probes again. Traffic stays inside the test containers.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
import testinfra.utils.ansible_runner
from helpers import api, api_key, host_named, run_playbook, wait_until

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
SERVERS = RUNNER.get_hosts("vllm_servers")
testinfra_hosts = SERVERS
GATEWAY = host_named(RUNNER.get_hosts("gateway")[0])
OUTSIDE = host_named("hf-standin")
# curl's exit code for "Failed to connect": the firewall answers with a TCP reset (not a time-out).
REFUSED = 7
BOOT_TIMEOUT = 600

# vLLM paths that answer without the key, and one that needs it.
PROBES = [
    ("POST", "/invocations"),
    ("POST", "/tokenize"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
]


def _probe(client, base: str, method: str, path: str, key: str | None = None) -> tuple[int, str]:
    """One bounded request from `client`; (curl's exit code, HTTP status)."""
    args = ["--silent", "--max-time", "20", "--output", "/dev/null"]
    args += ["--write-out", "%{http_code}", "--request", method]
    if method == "POST":
        args += ["--header", "Content-Type: application/json", "--data", '{"prompt": "hi"}']
    if key:
        args += ["--header", f"Authorization: Bearer {key}"]
    cmd = client.run("curl " + " ".join(["%s"] * (len(args) + 1)), *args, base + path)
    return cmd.rc, cmd.stdout


@pytest.mark.parametrize(("method", "path"), PROBES)
def test_a_host_that_is_not_the_gateway_is_refused(host, method: str, path: str) -> None:
    rc, status = _probe(OUTSIDE, api(host), method, path, key=api_key(host))
    assert (rc, status) == (REFUSED, "000")


@pytest.mark.parametrize(("method", "path"), PROBES)
def test_the_gateway_reaches_every_path(host, method: str, path: str) -> None:
    rc, status = _probe(GATEWAY, api(host), method, path, key=api_key(host))
    assert rc == 0
    # an HTTP answer from vLLM itself (a bad body may be refused, but the request got there)
    assert status != "000" and int(status) < 500, status
    if path in ("/v1/models", "/metrics"):
        assert status == "200"


def test_the_server_reaches_itself(host) -> None:
    # its own address goes through loopback (the role's health gate asks this way)
    assert _probe(host, api(host), "GET", "/health") == (0, "200")


def test_rules_are_the_roles_own_table_loaded_by_an_enabled_unit(host) -> None:
    firewall = host.service("vllm-firewall")
    assert firewall.is_enabled
    assert host.run("systemctl is-active vllm-firewall").stdout.strip() == "active"
    table = host.check_output("nft list table inet vllm")
    assert "tcp dport 8000" in table and "reject with tcp reset" in table
    # vLLM starts only after its firewall and checks the table is there (fail closed: fleet_common's
    # drop-in, the same that test_the_port_firewall_fails_closed_... proves on a probe service)
    unit = host.file("/etc/systemd/system/vllm.service").content_string
    assert "After=network-online.target vllm-firewall.service" in unit
    checks = host.check_output("systemctl show -p ExecStartPre vllm")
    assert "/usr/sbin/nft list table inet vllm " in checks


def test_stopping_the_firewall_unit_leaves_the_port_closed(host) -> None:
    # Fail closed: `systemctl stop vllm-firewall` (an operator, a package's script) must not open
    # the port while vLLM keeps listening; only the role removes the table (state absent).
    base = api(host)
    try:
        host.check_output("systemctl stop vllm-firewall")
        assert not host.service("vllm-firewall").is_running
        for method, path in PROBES:
            assert _probe(OUTSIDE, base, method, path)[0] == REFUSED, path
        assert _probe(GATEWAY, base, "GET", "/health") == (0, "200")
    finally:
        host.check_output("systemctl start vllm-firewall")


# fleet_common's port firewall on its own (the one of vllm_service, the node exporter and the fleet
# cache), on a probe port of the gateway host: loaded, the service behind it kept down while the
# table is not loaded, the table kept when its unit stops, all removed with state absent.
PROBE_FIREWALL = """
- hosts: {host}
  become: true
  gather_facts: false
  tasks:
    - ansible.builtin.include_role:
        name: fleet_common
        tasks_from: port_firewall.yml
      vars:
        fleet_common_firewall:
          table: fw_probe
          port: 9917
          sources: []
          rules_path: /etc/fw-probe.nft
          unit: fw-probe.service
          purpose: a probe port
          before: fw-probe-service.service
          state: "{{{{ probe_state }}}}"
"""

# Firewalls the role must refuse before it changes anything: a table name nft or a shell would take
# apart, and another firewall with the probe's table (say a vLLM service named vllm-monitoring
# beside the node exporter's), which would replace the probe's rules or, removed, unload them.
REFUSED_FIREWALLS = """
- hosts: {host}
  become: true
  gather_facts: false
  vars:
    other:
      table: fw_probe
      port: 9918
      sources: []
      rules_path: /etc/fw-other.nft
      unit: fw-other.service
      purpose: another port
      before: fw-other-service.service
  tasks:
    - block:
        - ansible.builtin.include_role:
            name: fleet_common
            tasks_from: port_firewall.yml
          vars:
            fleet_common_firewall: "{{{{ other | combine({{'table': 'fw-other; true'}}) }}}}"
      rescue:
        - ansible.builtin.debug:
            msg: refused the name
    - block:
        - ansible.builtin.include_role:
            name: fleet_common
            tasks_from: port_firewall.yml
          vars:
            fleet_common_firewall: "{{{{ other }}}}"
      rescue:
        - ansible.builtin.debug:
            msg: refused present
    - block:
        - ansible.builtin.include_role:
            name: fleet_common
            tasks_from: port_firewall.yml
          vars:
            fleet_common_firewall: "{{{{ other | combine({{'state': 'absent'}}) }}}}"
      rescue:
        - ansible.builtin.debug:
            msg: refused absent
"""


def test_the_port_firewall_fails_closed_and_is_removed_only_by_the_role() -> None:
    service = "/etc/systemd/system/fw-probe-service.service"  # the service behind the probe port
    files = ("/etc/fw-probe.nft", "/etc/systemd/system/fw-probe.service")
    dropins = (
        "/etc/systemd/system/nftables.service.d/fw_probe.conf",
        "/etc/systemd/system/fw-probe-service.service.d/fw-probe.conf",
    )

    def starts() -> bool:
        started = GATEWAY.run("systemctl start fw-probe-service").rc == 0
        GATEWAY.run("systemctl stop fw-probe-service")
        GATEWAY.run("systemctl reset-failed fw-probe-service")
        return started

    other = ("/etc/fw-other.nft", "/etc/systemd/system/fw-other.service")
    unit = "[Service]\nExecStart=/bin/sleep infinity\n"
    GATEWAY.check_output("printf '%%s' %s > %s && systemctl daemon-reload", unit, service)
    gateway = RUNNER.get_hosts("gateway")[0]
    with (
        tempfile.NamedTemporaryFile("w", suffix=".yml") as play,
        tempfile.NamedTemporaryFile("w", suffix=".yml") as refused,
    ):
        play.write(PROBE_FIREWALL.format(host=gateway))
        play.flush()
        refused.write(REFUSED_FIREWALLS.format(host=gateway))
        refused.flush()
        try:
            rc, out = run_playbook(play.name, extra_vars={"probe_state": "present"})
            assert rc == 0, out[-3000:]
            assert "table inet fw_probe" in GATEWAY.check_output("nft list tables")
            assert starts()
            # a bad name, and another firewall with this table (present, then absent): refused,
            # and the probe's rules, unit and table are as they were
            sha256 = "sha256sum" + " %s" * (len(files) + len(dropins))
            sums = GATEWAY.check_output(sha256, *files, *dropins)
            rules = GATEWAY.check_output("nft list table inet fw_probe")
            rc, out = run_playbook(refused.name)
            assert rc == 0, out[-3000:]
            for said in ("refused the name", "refused present", "refused absent"):
                assert said in out, out[-3000:]
            assert "needs a table name of letters, digits and _" in out
            assert "would replace another firewall of this host" in out
            assert "rescued=3" in out, out[-3000:]
            assert GATEWAY.check_output(sha256, *files, *dropins) == sums
            assert GATEWAY.check_output("nft list table inet fw_probe") == rules
            for path in other:
                assert not GATEWAY.file(path).exists, path
            # the table unloaded (its unit failed at boot, say): the service does not start
            GATEWAY.check_output("nft delete table inet fw_probe")
            assert not starts()
            journal = GATEWAY.check_output("journalctl -u fw-probe-service -n 20 --no-pager")
            assert "fw_probe is not loaded" in journal
            GATEWAY.check_output("systemctl restart fw-probe")
            assert starts()
            # its unit stopped: the table stays
            GATEWAY.check_output("systemctl stop fw-probe")
            assert "table inet fw_probe" in GATEWAY.check_output("nft list tables")
            rc, out = run_playbook(play.name, extra_vars={"probe_state": "absent"})
            assert rc == 0, out[-3000:]
            assert "table inet fw_probe" not in GATEWAY.check_output("nft list tables")
            for path in (*files, *dropins):
                assert not GATEWAY.file(path).exists, path
            # the service's drop-in folder held the guard alone; nftables.service's has the others'
            assert not GATEWAY.file(service + ".d").exists
            assert GATEWAY.file("/etc/systemd/system/nftables.service.d").listdir()
            assert starts()  # no longer held back by a table that is gone
        finally:
            GATEWAY.run("systemctl stop fw-probe-service fw-probe")
            GATEWAY.run("nft delete table inet fw_probe")
            GATEWAY.run("rm -rf %s %s %s %s %s %s.d", *files, *dropins, service, service)
            GATEWAY.run("rm -f %s %s", *other)
            GATEWAY.run("systemctl daemon-reload")
            GATEWAY.run("systemctl reset-failed fw-probe-service fw-probe")


def test_rules_coexist_with_a_table_of_the_host(host) -> None:
    # a table the host had before (or adds later) is left alone by a reload of the role's rules
    host.check_output("nft add table inet host_rules_probe")
    try:
        host.check_output("systemctl reload vllm-firewall")
        assert "table inet host_rules_probe" in host.check_output("nft list tables")
        assert "table inet vllm" in host.check_output("nft list tables")
    finally:
        host.run("nft delete table inet host_rules_probe")


# One server is rebooted (restarting both would double the wait on a 2-core machine).
REBOOTED = host_named(SERVERS[-1])


def _healthy_from_the_gateway(server) -> bool:
    return _probe(GATEWAY, api(server), "GET", "/health") == (0, "200")


def _reboot() -> None:
    """Restart the server's container (a reboot)."""
    run = subprocess.run(
        ["docker", "restart", "--time", "90", SERVERS[-1]],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr


def _wait_until_serving() -> None:
    wait_until(
        lambda: _healthy_from_the_gateway(REBOOTED), BOOT_TIMEOUT, f"{SERVERS[-1]}: /health at boot"
    )


@pytest.fixture
def rebooted() -> Iterator[str]:
    """Reboot the server; afterwards wait until it serves again, whatever the test found, so that
    the next test finds a serving fleet. Yields the server's base URL."""
    base = api(REBOOTED)
    _reboot()
    yield base
    _wait_until_serving()


@pytest.fixture
def rebooted_afterwards() -> Iterator[None]:
    """After the test, reboot the server and wait until it serves again: a flushed ruleset also
    took Docker's own table of the container (its DNS), which only a restart brings back."""
    yield
    _reboot()
    _wait_until_serving()


def test_the_hosts_own_nftables_service_leaves_the_port_closed(rebooted_afterwards: None) -> None:
    # The distribution's nftables.service flushes the whole ruleset when it starts and reloads (the
    # first line of Debian's and Ubuntu's /etc/nftables.conf) and when it stops (its ExecStop): an
    # operator turning on the host's own firewall. The roles' tables must be there after each.
    assert REBOOTED.file("/etc/nftables.conf").content_string.startswith(
        "#!/usr/sbin/nft -f\n\nflush ruleset"
    )
    assert not REBOOTED.service("nftables").is_running
    ours = sorted(
        t for t in REBOOTED.check_output("nft list tables").splitlines() if "inet vllm" in t
    )
    assert "table inet vllm" in ours, ours  # and the node exporter's and the cache's
    base = api(REBOOTED)
    for action in ("start", "reload", "restart", "stop"):
        REBOOTED.check_output("nft add table inet flush_probe")
        REBOOTED.check_output("systemctl %s nftables", action)
        tables = REBOOTED.check_output("nft list tables").splitlines()
        assert "table inet flush_probe" not in tables, action  # the ruleset was flushed
        assert sorted(t for t in tables if "inet vllm" in t) == ours, (action, tables)
        for method, path in PROBES:
            assert _probe(OUTSIDE, base, method, path)[0] == REFUSED, (action, path)
        assert _healthy_from_the_gateway(REBOOTED), action


def test_after_a_reboot_the_port_is_still_closed_to_others(rebooted: str) -> None:
    # the rules are loaded at boot, before vLLM listens: probe while it starts and once it serves
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not _healthy_from_the_gateway(REBOOTED):
        assert time.monotonic() < deadline, "vLLM did not come back after the reboot"
        assert _probe(OUTSIDE, rebooted, "GET", "/health")[0] == REFUSED
        time.sleep(5)
    for method, path in PROBES:
        assert _probe(OUTSIDE, rebooted, method, path)[0] == REFUSED, path
    assert REBOOTED.service("vllm-firewall").is_enabled
    assert "table inet vllm" in REBOOTED.check_output("nft list tables")
