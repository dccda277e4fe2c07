"""What a user of the fleet cares about, checked on each vLLM server of the default scenario.

Every check runs inside the systemd test hosts; HTTP requests go to the server's own loopback.
"""

from __future__ import annotations

import json
import os

import pytest
import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("vllm_servers")

SERVED_NAME = "Qwen/Qwen2.5-1.5B-Instruct"
API = "http://127.0.0.1:8000"
MODEL_DIR = "/opt/vllm/models/Qwen2.5-1.5B-Instruct/current"
LFS_POINTER_PREFIX = "version https://git-lfs.github.com/spec/v1"


def _post(host, path: str, body: dict) -> str:
    """POST a JSON body to the server on the host's loopback and return the response text."""
    cmd = host.run(
        "curl --silent --show-error --fail --max-time 300"
        " -H 'Content-Type: application/json' -d %s %s",
        json.dumps(body),
        API + path,
    )
    assert cmd.rc == 0, cmd.stderr
    return cmd.stdout


@pytest.mark.parametrize("compiler", ["gcc", "g++", "cc", "c++"])
def test_gcc_12_is_the_default_compiler(host, compiler: str) -> None:
    version = host.check_output("%s -dumpfullversion", compiler)
    assert version.split(".")[0] == "12"
    assert host.file(f"/usr/bin/{compiler}").is_symlink


def test_gcc_is_managed_by_update_alternatives(host) -> None:
    out = host.check_output("update-alternatives --query gcc")
    assert "Value: /usr/bin/gcc-12" in out


@pytest.mark.parametrize(
    "package", ["cmake", "make", "libnuma-dev", "git", "git-lfs", "python3-dev", "python3-venv"]
)
def test_build_packages_are_installed(host, package: str) -> None:
    assert host.package(package).is_installed


def test_tcmalloc_is_installed(host) -> None:
    assert host.run("ldconfig -p | grep -q libtcmalloc_minimal.so.4").rc == 0


def test_git_lfs_is_initialised_system_wide(host) -> None:
    assert host.check_output("git config --system filter.lfs.process") == "git-lfs filter-process"


def test_service_user_cannot_log_in(host) -> None:
    user = host.user("vllm")
    assert user.exists
    assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin")
    assert user.uid < 1000
    assert host.check_output("passwd --status vllm").split()[1] == "L"


def test_service_user_cannot_write_the_model_or_the_environment(host) -> None:
    for path in ("/opt/vllm/venv", "/opt/vllm/venv/lib", MODEL_DIR + "/"):
        assert host.run("runuser -u vllm -- test -w %s", path).rc != 0, path


def test_environment_file_is_private(host) -> None:
    env = host.file("/etc/vllm/vllm.env")
    assert env.user == "root"
    assert env.group == "vllm"
    assert env.mode == 0o640


def test_unit_is_enabled_active_and_runs_as_the_service_user(host) -> None:
    service = host.service("vllm")
    assert service.is_enabled
    assert service.is_running
    pid = host.check_output("systemctl show --property MainPID --value vllm")
    assert int(pid) > 0
    assert host.check_output("ps -o user= -p %s", pid) == "vllm"


def test_unit_file_passes_systemd_analyze_verify(host) -> None:
    cmd = host.run("systemd-analyze verify /etc/systemd/system/vllm.service")
    assert cmd.rc == 0
    # unknown keys are only warnings: any output is a failure
    assert cmd.stdout.strip() == "" and cmd.stderr.strip() == "", cmd.stderr


def test_port_8000_listens(host) -> None:
    assert host.socket("tcp://0.0.0.0:8000").is_listening


def test_health_answers(host) -> None:
    assert host.run("curl --silent --fail %s/health", API).rc == 0


def test_models_lists_the_served_name(host) -> None:
    models = json.loads(host.check_output("curl --silent --fail %s/v1/models", API))
    assert SERVED_NAME in [m["id"] for m in models["data"]]


def test_chat_completion_returns_generated_text(host) -> None:
    body = {
        "model": SERVED_NAME,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me something about large language models."},
        ],
        "max_tokens": 16,
        # random weights may pick end-of-sequence first: generate at least a few tokens regardless
        "min_tokens": 4,
        "ignore_eos": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "repetition_penalty": 1.05,
    }
    reply = json.loads(_post(host, "/v1/chat/completions", body))
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip() != ""
    assert reply["usage"]["completion_tokens"] > 0


def test_streaming_chat_completion_sends_chunks_and_done(host) -> None:
    body = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "Count to five."}],
        "max_tokens": 12,
        "min_tokens": 4,
        "ignore_eos": True,
        "stream": True,
    }
    events = [line for line in _post(host, "/v1/chat/completions", body).splitlines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert len(chunks) >= 2
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text != ""


def test_model_folder_holds_real_weights_not_lfs_pointers(host) -> None:
    weights = host.check_output("find -L %s -maxdepth 1 -name '*.safetensors'", MODEL_DIR).split()
    assert weights
    for path in weights:
        f = host.file(path)
        assert f.size > 1024, path
        head = host.check_output("head -c 64 %s | tr -c '[:print:]' '.'", path)
        assert not head.startswith(LFS_POINTER_PREFIX), path
    assert host.file(MODEL_DIR + "/.vllm-model-verified").exists
    assert not host.file(MODEL_DIR + "/.git/lfs/objects").exists
