"""The model stage alone (molecule/model): playbooks/model.yml against the Hugging Face stand-in.

Both servers publish the mirror's weights, verified, the second one through the fleet cache; a
download that breaks off is never published and is redone; a revision that does not exist is
refused before any download; a staging folder an earlier run left is removed; the model token goes
to the model's host only and is left nowhere. The model stage never stops or changes the service
(here an OpenAI stub run as vllm.service, tests/fixtures/openai_stub). Traffic stays inside the
test containers.
"""

from __future__ import annotations

import json
import os
import re

import testinfra.utils.ansible_runner
from helpers import address_of, host_named, recap_changed, run_playbook, server_state

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
SERVERS = RUNNER.get_hosts("vllm_servers")
HOST, CACHE_NAME = SERVERS[-1], SERVERS[0]
testinfra_hosts = [HOST]
MIRROR_NAME = RUNNER.get_hosts("model_mirror")[0]
MIRROR = host_named(MIRROR_NAME)
HUB = f"http://{MIRROR_NAME}:8080"  # the stand-in for https://huggingface.co
SRV = "/srv/hf-standin"
MODEL = "/opt/vllm/models/Qwen2.5-1.5B-Instruct"
CACHE_LOG = "/var/log/nginx/vllm-fleet-cache.access.log"


def _stage(playbook: str, **extra_vars: object) -> tuple[int, str]:
    """Run a stage playbook on HOST with extra variables."""
    return run_playbook(f"playbooks/{playbook}", "--limit", HOST, extra_vars=extra_vars)


def _oid(repo: str = "Qwen/Qwen2.5-1.5B-Instruct") -> str:
    """The sha256 of the weights as the mirror's git-lfs pointer names them."""
    oid = MIRROR.check_output(
        f"git --git-dir={SRV}/git/{repo} show main:model.safetensors | sed -n 's/^oid sha256://p'"
    )
    assert re.fullmatch("[0-9a-f]{64}", oid), f"no LFS pointer for model.safetensors in {repo}"
    return oid


def test_both_servers_publish_the_mirrors_weights_verified(host) -> None:
    for name in SERVERS:
        server = host_named(name)
        current = server.file(f"{MODEL}/current")
        assert current.is_symlink, name
        assert re.fullmatch(r"[0-9a-f]{40}", os.path.basename(current.linked_to)), current.linked_to
        assert server.file(f"{current.linked_to}/.vllm-model-verified").exists, name
        weights = server.file(f"{current.linked_to}/model.safetensors")
        assert weights.sha256sum == _oid(), name
        assert (weights.user, weights.group) == ("root", "root"), name


def test_the_second_server_took_the_weights_from_the_fleet_cache(host) -> None:
    # the cache host's nginx names each download by the peer's address (model-2's, on this network)
    cache = host_named(CACHE_NAME)
    peer = address_of(cache, HOST)
    log = cache.check_output("cat %s %s.1 2>/dev/null || true", CACHE_LOG, CACHE_LOG)  # logrotate
    fetched = re.findall(
        rf'^{re.escape(peer)} \S+ \S+ \[[^]]+\] "GET (\S+) HTTP/[\d.]+" 200 ', log, re.MULTILINE
    )
    weights = [path for path in fetched if path.endswith("/model.safetensors")]
    assert weights and all(path.startswith("/models/") for path in weights), fetched
    # and the peer's own record says so: its copy did not come from the hub
    served = host.file(f"{MODEL}/current").linked_to
    marker = json.loads(host.file(f"{served}/.vllm-model-verified").content_string)
    assert marker["fetched_from"].endswith(" (fleet cache)"), marker
    assert not host.file(f"{served}/.git").exists


def test_a_broken_off_model_download_is_never_served_and_is_redone(host) -> None:
    good = f"{SRV}/git/Qwen/Qwen2.5-1.5B-Instruct"
    oid = _oid()
    before = server_state(host)
    # A copy of the repository whose LFS store lacks the weights: git-lfs breaks off mid-checkout.
    MIRROR.check_output(
        f"rm -rf {SRV}/git/Qwen/Broken {SRV}/lfs/Qwen/Broken"
        f" && cp -a {good} {SRV}/git/Qwen/Broken"
        f" && cp -a {SRV}/lfs/Qwen/Qwen2.5-1.5B-Instruct {SRV}/lfs/Qwen/Broken"
        f" && rm {SRV}/lfs/Qwen/Broken/{oid}"
    )
    settings = {
        "vllm_model_repo_url": f"{HUB}/Qwen/Broken",
        "vllm_model_name": "Broken",
    }
    try:
        rc, out = _stage("model.yml", **settings)
        assert rc != 0
        # git-lfs's own report of this object missing on the LFS server, then git's abort
        assert f"Error downloading model.safetensors ({oid})" in out, out[-3000:]
        assert "smudge filter lfs failed" in out
        assert not host.file("/opt/vllm/models/Broken/current").exists
        entries = host.check_output("ls -A /opt/vllm/models/Broken").split()
        # the half-written clone stays in its staging folder; nothing is published under its sha
        assert any(name.startswith(".staging-") for name in entries)
        assert not any(re.fullmatch("[0-9a-f]{40}", name) for name in entries)
        assert server_state(host) == before
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


def test_a_revision_that_does_not_exist_is_refused_before_any_download(host) -> None:
    before = server_state(host)
    settings = {"vllm_model_revision": "a" * 40, "vllm_model_name": "NoSuchRevision"}
    try:
        rc, out = _stage("model.yml", **settings)
        assert rc != 0
        # the role's message (the YAML callback may double the quotes around the revision)
        refusal = rf"Revision '+a{{40}}'+ not found at {re.escape(HUB)}/"
        assert re.search(refusal, out), out[-3000:]
        assert "reference is not a tree" not in out
        assert "Clone the model with git-lfs" not in out
        # resolved before anything was created: no staging clone, no sha folder, no model folder
        assert not host.file("/opt/vllm/models/NoSuchRevision").exists
        assert host.run("ls -d /tmp/vllm-model-resolve-*").rc != 0
        assert server_state(host) == before
        assert host.service("vllm").is_running
    finally:
        host.run("rm -rf /opt/vllm/models/NoSuchRevision")


def test_a_staging_folder_left_by_an_earlier_run_is_removed_by_the_next(host) -> None:
    stale = f"{MODEL}/.staging-0123456789abcdef0123456789abcdef01234567"
    before = server_state(host)
    served = host.file(f"{MODEL}/current").linked_to
    try:
        host.check_output(f"mkdir -p {stale} && head -c 1M /dev/zero > {stale}/model.safetensors")
        rc, out = _stage("model.yml")
        assert rc == 0, out[-3000:]
        assert f"(item={stale})" in out, out[-3000:]
        assert recap_changed(out, HOST) == 1
        assert not host.file(stale).exists
        assert host.run(f"ls -d {MODEL}/.staging-*").rc != 0
        assert host.file(f"{MODEL}/current").linked_to == served
        assert server_state(host) == before
        assert host.service("vllm").is_running
    finally:
        host.run(f"rm -rf {stale}")


def test_the_model_token_is_sent_to_the_model_host_only_and_left_nowhere(host) -> None:
    token = "hf_vllmFleetTestToken0123456789"
    good = f"{SRV}/git/Qwen/Qwen2.5-1.5B-Instruct"
    repo = f"{SRV}/git/Qwen/Scoped"
    # The stand-in under a second name: git talks to HUB (the mirror by name), git-lfs (told so by
    # the repository's .lfsconfig, as a repository may) to the stand-in's address. The repository
    # is gated (git answers 401 without the token, as huggingface.co does) and the stand-in refuses
    # an LFS download that carries a bearer token it did not issue (403), so the clone succeeds
    # only if the token goes to git's host and stays there, as it must with presigned CDN links.
    settings = {
        "vllm_model_repo_url": f"{HUB}/Qwen/Scoped",
        "vllm_model_name": "Scoped",
        "vllm_model_token": token,
    }
    try:
        address = address_of(host, MIRROR_NAME)
        git = f"GIT_INDEX_FILE=/tmp/scoped.index git --git-dir={repo}"
        MIRROR.check_output(
            f"rm -rf {repo} {SRV}/lfs/Qwen/Scoped /tmp/scoped.*"
            f" && cp -a {good} {repo}"
            f" && cp -a {SRV}/lfs/Qwen/Qwen2.5-1.5B-Instruct {SRV}/lfs/Qwen/Scoped"
            f" && git config -f /tmp/scoped.lfsconfig lfs.url http://{address}:8080/Qwen/Scoped.git/info/lfs"
            f" && blob=$({git} hash-object -w /tmp/scoped.lfsconfig) && {git} read-tree main"
            f" && {git} update-index --add --cacheinfo 100644,$blob,.lfsconfig"
            f" && tree=$({git} write-tree)"
            f" && commit=$({git} -c user.name=test -c user.email=test@invalid"
            f" commit-tree $tree -p main -m 'LFS from a second host')"
            f" && {git} update-ref refs/heads/main $commit"
            " && rm /tmp/scoped.*"
            f" && mkdir -p {SRV}/tokens/Qwen && printf %s {token} > {SRV}/tokens/Qwen/Scoped"
        )
        refs = "http://127.0.0.1:8080/Qwen/Scoped/info/refs?service=git-upload-pack"
        status = "curl --silent --output /dev/null --write-out %{http_code} " + refs
        assert MIRROR.check_output(status) == "401"  # gated: without the token, no clone
        assert MIRROR.check_output(f"{status} --header 'Authorization: Bearer {token}'") == "200"
        rc, out = _stage("model.yml", **settings)
        assert rc == 0, out[-3000:]
        assert host.file("/opt/vllm/models/Scoped/current/model.safetensors").size > 1024
        assert token not in out
        # nowhere on the host: not in the clone's .git/config, no token file left behind
        found = host.run(f"grep -rlsF --devices=skip {token} /tmp /root /opt/vllm/models/Scoped")
        assert found.stdout.strip() == "", found.stdout
        assert host.run("ls /tmp/vllm-model-git-*").rc != 0
    finally:
        host.run("rm -rf /opt/vllm/models/Scoped")
        MIRROR.run(f"rm -rf {repo} {SRV}/lfs/Qwen/Scoped {SRV}/tokens /tmp/scoped.*")
