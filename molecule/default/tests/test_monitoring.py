"""Fleet metrics and alerts: Prometheus on the monitoring host (gw-1) scrapes both servers' vLLM
metrics and every host's node exporter, its rules passed promtool, and the server-down alert fires
when a server stops (the fixture starts it again). Exporter ports are refused to other hosts.
Traffic stays inside the test containers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import testinfra.utils.ansible_runner
from helpers import api, host_named, run_playbook, serving, wait_until

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
testinfra_hosts = RUNNER.get_hosts("monitoring")
SERVERS = RUNNER.get_hosts("vllm_servers")
OUTSIDE = host_named("hf-standin")
PROMETHEUS = "http://127.0.0.1:9090"
ALERT_TIMEOUT = 180


def _query(host, promql: str) -> list[dict]:
    out = host.check_output(
        "curl --silent --fail --max-time 10 %s", f"{PROMETHEUS}/api/v1/query?query={quote(promql)}"
    )
    return json.loads(out)["data"]["result"]


def test_prometheus_runs_on_loopback_only(host) -> None:
    assert host.service("prometheus").is_enabled
    assert host.service("prometheus").is_running
    assert host.socket("tcp://127.0.0.1:9090").is_listening
    assert not host.socket("tcp://0.0.0.0:9090").is_listening


def test_the_installed_rules_pass_promtool(host) -> None:
    out = host.check_output("promtool check rules /etc/prometheus/vllm-fleet.rules.yml")
    assert "5 rules found" in out
    assert host.run("promtool check config /etc/prometheus/prometheus.yml").rc == 0


def test_both_servers_vllm_metrics_are_scraped(host) -> None:
    def up() -> dict[str, str]:
        return {r["metric"]["host"]: r["value"][1] for r in _query(host, 'up{job="vllm"}')}

    wait_until(lambda: up() == dict.fromkeys(SERVERS, "1"), 120, lambda: f"both scraped: {up()}", 3)
    running = _query(host, "vllm:num_requests_running")
    assert {r["metric"]["host"] for r in running} == set(SERVERS)
    assert {r["metric"]["host"] for r in _query(host, "vllm:kv_cache_usage_perc")} == set(SERVERS)


def test_every_hosts_node_exporter_is_scraped(host) -> None:
    expected = set(SERVERS) | set(RUNNER.get_hosts("gateway"))

    def up() -> set[str]:
        return {r["metric"]["host"] for r in _query(host, 'up{job="node"} == 1')}

    wait_until(lambda: up() == expected, 120, lambda: f"{expected} scraped: {up()}", 3)


@pytest.mark.parametrize("server", SERVERS)
def test_node_exporter_is_refused_to_other_hosts(server: str) -> None:
    address = api(host_named(server))
    address = address.split("//")[1].rsplit(":", 1)[0]
    cmd = OUTSIDE.run(
        "curl --silent --max-time 10 --output /dev/null http://%s:9100/metrics", address
    )
    assert cmd.rc == 7  # a TCP reset from the firewall


@pytest.mark.parametrize("server", SERVERS[:1])
def test_node_exporter_does_not_start_without_its_firewall(host, server: str) -> None:
    # fail closed: a firewall that is not loaded (its unit failed at boot) keeps the exporter down
    target = host_named(server)
    address = api(target).split("//")[1].rsplit(":", 1)[0]
    metrics = f"curl --silent --fail --max-time 10 --output /dev/null http://{address}:9100/metrics"
    try:
        target.check_output("nft delete table inet vllm_monitoring")
        assert target.run("systemctl restart prometheus-node-exporter").rc != 0
        assert not target.service("prometheus-node-exporter").is_running
        journal = target.check_output("journalctl -u prometheus-node-exporter -n 20 --no-pager")
        assert "vllm_monitoring is not loaded" in journal
    finally:
        target.check_output("systemctl restart vllm-monitoring-firewall")
        target.check_output("systemctl reset-failed prometheus-node-exporter")  # its start limit
        target.check_output("systemctl start prometheus-node-exporter")
    # serving again: to the monitoring host, and to no other
    wait_until(lambda: host.run(metrics).rc == 0, 30, f"{server}'s exporter from {host}")
    test_node_exporter_is_refused_to_other_hosts(server)


def _server_down_alerts(host, *states: str) -> list[str]:
    """Hosts with a VllmServerDown alert in one of the given states, as Prometheus reports them."""
    out = host.check_output("curl --silent --fail --max-time 10 %s/api/v1/alerts", PROMETHEUS)
    return sorted(
        a["labels"].get("host", "")
        for a in json.loads(out)["data"]["alerts"]
        if a["labels"]["alertname"] == "VllmServerDown" and a["state"] in states
    )


@pytest.fixture
def stopped_server(host) -> Iterator[str]:
    """Stop vLLM on the last server; start it again and wait until it answers, whatever happened.

    An earlier test may have stopped a server: its alert resolves only at the rule evaluation
    after the next good scrape, so wait until no server-down alert is pending or firing first."""
    wait_until(
        lambda: not _server_down_alerts(host, "pending", "firing"),
        ALERT_TIMEOUT,
        lambda: f"no server-down alert: {_server_down_alerts(host, 'pending', 'firing')}",
        3,
    )
    name = SERVERS[-1]
    server = host_named(name)
    server.check_output("systemctl stop vllm")
    try:
        yield name
    finally:
        server.run("systemctl reset-failed vllm")
        server.check_output("systemctl start vllm")
        wait_until(lambda: serving(server), 600, f"{name}: /health after its restart")


def test_the_server_down_alert_fires_when_a_server_stops(host, stopped_server: str) -> None:
    firing = wait_until(
        lambda: _server_down_alerts(host, "firing"), ALERT_TIMEOUT, "a server-down alert firing", 3
    )
    assert firing == [stopped_server]


@pytest.fixture
def new_monitoring_host(host) -> Iterator[dict]:
    """The monitoring host without Prometheus and its node exporter (purged, with their settings),
    as a new host; "since": the time before. The test runs the monitoring stage; unless that run
    passed (the test sets "restored"), it runs here again afterwards."""
    # the packages start their services as they are installed, unless a policy-rc.d forbids it
    assert not host.file("/usr/sbin/policy-rc.d").exists
    state = {"since": host.check_output("date +%s"), "restored": False}
    try:
        host.check_output(
            "DEBIAN_FRONTEND=noninteractive apt-get purge --yes --quiet %s %s",
            "prometheus",
            "prometheus-node-exporter",
        )
        yield state
    finally:
        if not state["restored"]:
            rc, out = run_playbook(
                "playbooks/monitoring.yml", "--limit", host.backend.get_hostname()
            )
            assert rc == 0, out[-3000:]


def test_a_new_monitoring_host_never_listens_on_every_address(host, new_monitoring_host) -> None:
    # The packages start their services as they are installed: with Debian's defaults, on every
    # address, until the role had configured them (and for good, had the run failed in between).
    rc, out = run_playbook("playbooks/monitoring.yml", "--limit", host.backend.get_hostname())
    assert rc == 0, out[-3000:]
    new_monitoring_host["restored"] = True
    starts = {}
    for unit, message in (
        ("prometheus", "Start listening for connections"),
        ("prometheus-node-exporter", "Listening on"),
    ):
        journal = host.check_output(
            "journalctl --unit %s --since @%s --no-pager --output cat",
            unit,
            new_monitoring_host["since"],
        )
        starts[unit] = {
            line.split("address=")[1].split()[0] for line in journal.splitlines() if message in line
        }
    exporter_args = host.file("/etc/default/prometheus-node-exporter").content_string
    assert starts == {
        "prometheus": {"127.0.0.1:9090"},
        "prometheus-node-exporter": {exporter_args.split("--web.listen-address=")[1].split('"')[0]},
    }
    assert not starts["prometheus-node-exporter"] & {":9100", "[::]:9100", "0.0.0.0:9100"}
