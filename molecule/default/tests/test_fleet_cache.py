"""Artifacts fetched once per fleet: the other servers take the wheelhouse archive, the built
vLLM wheel and the model from the fleet cache host (the first server), not from the controller or
the hub.

Checked from the outside: the cache host's nginx access log names each download by the peer's
address; the peer's files have the sha256 of the cache host's; the cache port refuses hosts
outside the fleet (hf-standin, the gateway) and never serves a clone's .git or a file through a
symbolic link; and with the peer cut off from the hub (an nftables table on the peer itself,
removed afterwards) the model stage still publishes a fresh copy there while nobody clones. A
host that stops being the cache host removes the cache's site, firewall and folders, nothing else.
Traffic stays inside the test containers.
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import unquote

import testinfra.utils.ansible_runner
from helpers import host_named, run_playbook

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
SERVERS = RUNNER.get_hosts("vllm_servers")
CACHE_NAME, PEER_NAME = SERVERS[0], SERVERS[-1]
testinfra_hosts = [PEER_NAME]
CACHE = host_named(CACHE_NAME)
GATEWAY = host_named(RUNNER.get_hosts("gateway")[0])
OUTSIDE = host_named("hf-standin")
MODEL = "/opt/vllm/models/Qwen2.5-1.5B-Instruct"
ROOT = "/var/cache/vllm-fleet"
LOG = "/var/log/nginx/vllm-fleet-cache.access.log"
PORT = 8070
NGINX_DROPIN = "/etc/systemd/system/nginx.service.d"
REFUSED = 7  # curl: "Failed to connect" (the firewall answers with a TCP reset)


def _address(host) -> str:
    return host.check_output("hostname -I").split()[0]


def _sums(host, folder: str) -> dict[str, str]:
    """sha256 of every file of a model folder but git's own and the role's marker."""
    out = host.check_output(
        "cd %s && find . -path ./.git -prune -o -type f ! -name .vllm-model-verified"
        " -printf '%%P\\0' | sort -z | xargs -0 sha256sum --",
        folder,
    )
    return {line[66:]: line[:64] for line in out.splitlines()}


def _curl(client, url: str) -> tuple[int, str]:
    cmd = client.run(
        "curl --silent --max-time 20 --output /dev/null --write-out %%{http_code} %s", url
    )
    return cmd.rc, cmd.stdout


def test_the_peer_serves_the_cache_host_s_model_byte_for_byte(host) -> None:
    served = host.file(f"{MODEL}/current").linked_to
    assert served == CACHE.file(f"{MODEL}/current").linked_to
    marker = json.loads(host.file(f"{served}/.vllm-model-verified").content_string)
    assert marker["fetched_from"] == f"http://{_address(CACHE)}:{PORT} (fleet cache)"
    assert not host.file(f"{served}/.git").exists
    sums = _sums(host, served)
    assert "model.safetensors" in sums
    assert sums == _sums(CACHE, served)


def test_the_peer_downloaded_its_wheelhouse_wheel_and_model_from_the_cache(host) -> None:
    peer = re.escape(_address(host))
    log = CACHE.check_output("cat %s %s.1 2>/dev/null || true", LOG, LOG)  # logrotate may have run
    fetched = set(re.findall(rf'^{peer} \S+ \S+ \[[^]]+\] "GET (\S+) HTTP/[\d.]+" 200 ', log, re.M))
    wheelhouses = [p for p in fetched if p.startswith("/files/wheelhouse/") and p.endswith(".tar")]
    wheels = [p for p in fetched if p.startswith("/files/wheels/") and p.endswith(".whl")]
    assert wheelhouses and wheels, sorted(fetched)
    assert any(p.endswith("/model.safetensors") for p in fetched if p.startswith("/models/"))
    # what the peer holds is what the cache host received from the controller
    for path in map(unquote, wheelhouses + wheels):  # the log has the URL: "+" as %2B
        name = path.rsplit("/", 1)[1]
        local = host.check_output("find /opt/vllm -name %s -type f", name).splitlines()
        assert local, name
        assert host.file(local[0]).sha256sum == CACHE.file(f"{ROOT}{path}").sha256sum


def test_the_cache_port_refuses_hosts_outside_the_fleet(host) -> None:
    url = f"http://{_address(CACHE)}:{PORT}/files/"
    assert _curl(OUTSIDE, url) == (REFUSED, "000")
    assert _curl(GATEWAY, url) == (REFUSED, "000")
    rc, status = _curl(host, url)
    assert rc == 0 and status in ("403", "404"), (rc, status)


def test_the_cache_never_serves_a_clone_s_git_folder_or_a_link_out_of_it(host) -> None:
    commit = CACHE.file(f"{MODEL}/current").linked_to.rsplit("/", 1)[1]
    base = f"http://{_address(CACHE)}:{PORT}/models/Qwen2.5-1.5B-Instruct/{commit}"
    assert CACHE.file(f"{MODEL}/{commit}/.git/config").exists
    assert _curl(host, f"{base}/.git/config") == (0, "403")
    assert _curl(host, f"{base}/config.json") == (0, "200")
    # a symbolic link inside a model repository that names a world-readable file of the cache host
    link = f"{MODEL}/{commit}/leak.txt"
    CACHE.check_output("ln -sfn /etc/hostname %s", link)
    try:
        rc, status = _curl(host, f"{base}/leak.txt")
        assert rc == 0 and status in ("403", "404"), status
    finally:
        CACHE.run("rm -f %s", link)


def test_a_peer_cut_off_from_the_hub_gets_the_model_from_the_cache(host) -> None:
    served = host.file(f"{MODEL}/current").linked_to
    aside = "/opt/vllm/model-aside"
    hub = _address(OUTSIDE)
    cache_before = CACHE.check_output("ls -l --time-style=+%%s %s", MODEL)
    host.check_output("rm -rf %s", aside)
    try:
        host.check_output(
            "nft add table inet vllm_test_nohub && nft add chain inet vllm_test_nohub out"
            " '{ type filter hook output priority 0; policy accept; }'"
            " && nft add rule inet vllm_test_nohub out"
            " ip daddr %s tcp dport 8080 reject with tcp reset",
            hub,
        )
        assert _curl(host, "http://hf-standin:8080/")[0] == REFUSED
        host.check_output("mv %s %s", served, aside)
        rc, out = run_playbook("playbooks/model.yml")
        assert rc == 0, out[-3000:]
        assert "Download the files from the fleet cache" in out
        assert host.file(f"{MODEL}/current").linked_to == served
        marker = json.loads(host.file(f"{served}/.vllm-model-verified").content_string)
        assert marker["fetched_from"].endswith("(fleet cache)")
        assert _sums(host, served) == _sums(CACHE, served)
        # nobody cloned; the cache host's models are as they were
        assert "Clone the model with git-lfs" not in out
        assert CACHE.check_output("ls -l --time-style=+%%s %s", MODEL) == cache_before
    finally:
        host.run("nft delete table inet vllm_test_nohub")
        # the set-aside copy back, over whatever the run published
        host.run("if test -d %s; then rm -rf %s && mv %s %s; fi", aside, served, aside, served)


def test_a_file_that_differs_in_the_cache_is_never_published(host) -> None:
    served = host.file(f"{MODEL}/current").linked_to
    commit = served.rsplit("/", 1)[1]
    aside = "/opt/vllm/model-aside"
    original = CACHE.file(f"{served}/config.json")
    mode = original.mode
    host.check_output("rm -rf %s", aside)
    CACHE.check_output("cp -a %s/config.json /tmp/config.json.orig", served)
    try:
        # the cache host's file changes after its manifest was written (bit rot, tampering)
        CACHE.check_output("printf ' ' >> %s/config.json", served)
        host.check_output("mv %s %s", served, aside)
        rc, out = run_playbook("playbooks/model.yml")
        assert rc != 0
        assert "config.json" in out and "checksum" in out.lower(), out[-3000:]
        # nothing was published under the commit; the partial copy stays in its staging folder
        assert not host.file(served).exists
        assert host.file(f"{MODEL}/.staging-{commit}").is_directory
    finally:
        CACHE.check_output("cp -a /tmp/config.json.orig %s/config.json", served)
        CACHE.run("rm -f /tmp/config.json.orig")
        host.run("rm -rf %s/.staging-%s", MODEL, commit)
        # the set-aside copy back, over whatever the run published
        host.run("if test -d %s; then rm -rf %s && mv %s %s; fi", aside, served, aside, served)
    assert CACHE.file(f"{served}/config.json").mode == mode


def test_a_host_that_stops_being_the_cache_host_keeps_only_what_was_not_the_cache_s(host) -> None:
    """vllm-2 alone (--limit) made the cache host, then not: its cache is served to vllm-1 (the
    play asks vllm-1, outside the limit, for its address), then its site, firewall and the cache's
    own folders go, while a file of someone else's in the same root stays."""
    root = "/srv/vllm-test-cache"
    keep = f"{root}/someone-elses.txt"
    packages = (
        "dpkg-query --show --showformat '${db:Status-Abbrev} ${Package}\\n' 'nginx*' 'libnginx*'"
        " 2>/dev/null | awk '$1 == \"ii\" {print $2}'"
    )
    before = host.run(packages).stdout.split()
    host.check_output("mkdir -p %s && echo kept > %s", root, keep)
    try:
        rc, out = run_playbook(
            "playbooks/cache.yml",
            "--limit",
            PEER_NAME,
            extra_vars={"fleet_cache_host": PEER_NAME, "fleet_cache_root": root},
        )
        assert rc == 0, out[-3000:]
        assert host.file(f"{root}/.vllm-fleet-cache").exists
        # nginx does not start while the cache's table is not loaded (fleet_common's drop-in)
        assert "nft list table inet vllm_fleet_cache" in host.check_output(
            "systemctl show -p ExecStartPre nginx"
        )
        assert _curl(CACHE, f"http://{_address(host)}:{PORT}/files/")[1] in ("403", "404")
        assert _curl(OUTSIDE, f"http://{_address(host)}:{PORT}/files/")[0] == REFUSED

        rc, out = run_playbook(
            "playbooks/cache.yml", "--limit", PEER_NAME, extra_vars={"fleet_cache_root": root}
        )
        assert rc == 0, out[-3000:]
        assert not host.file("/etc/nginx/conf.d/vllm-fleet-cache.conf").exists
        assert host.run("nft list table inet vllm_fleet_cache").rc != 0
        assert not host.file(f"{NGINX_DROPIN}/vllm-fleet-cache-firewall.conf").exists
        assert host.run(f"ss -Htln 'sport = :{PORT}'").stdout.strip() == ""
        assert sorted(host.check_output("ls -A %s", root).split()) == ["someone-elses.txt"]
        assert host.file(keep).content_string == "kept\n"
    finally:
        # whatever a failed run left: the site, the firewall (its unit, rules and table), the root
        host.run(
            "systemctl disable --now vllm-fleet-cache-firewall.service;"
            " rm -f /etc/systemd/system/vllm-fleet-cache-firewall.service"
            f" {NGINX_DROPIN}/vllm-fleet-cache-firewall.conf"
            " /etc/nftables-vllm-fleet-cache.nft /etc/nginx/conf.d/vllm-fleet-cache.conf;"
            " systemctl daemon-reload; nft delete table inet vllm_fleet_cache"
        )
        host.run("rm -rf %s", root)
        added = sorted(set(host.run(packages).stdout.split()) - set(before))
        if added:
            host.check_output(
                "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q" + " %s" * len(added), *added
            )
