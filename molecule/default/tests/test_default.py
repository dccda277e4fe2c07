"""What a user of the fleet cares about, checked on each vLLM server of the default scenario.

Every check runs inside the systemd test hosts; HTTP requests go to the server's own loopback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from base64 import b64decode

import pytest
import testinfra.utils.ansible_runner
from helpers import PYTHON, api, api_key, main_pid, run_with_secret, zen_cpu

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("vllm_servers")

SERVED_NAME = "Qwen/Qwen2.5-1.5B-Instruct"
MODEL_DIR = "/opt/vllm/models/Qwen2.5-1.5B-Instruct/current"
LFS_POINTER_PREFIX = "version https://git-lfs.github.com/spec/v1"


# systemd-analyze security's exposure score of vllm.service as recorded in the vllm_service README
# (0 = locked down, 10 = fully exposed): a change to the unit must not make it worse.
RECORDED_EXPOSURE = 1.6


def _curl(host, path: str, *args: str, key: str | None = None) -> tuple[int, str]:
    """curl the server with the right key (or `key`); return the HTTP status and the body.
    `args` are extra curl arguments, already shell-quoted."""
    auth = shlex.quote(f"Authorization: Bearer {api_key(host) if key is None else key}")
    rc, out, err = run_with_secret(
        host,
        f"curl --silent --show-error --max-time 300 --write-out '\\n%{{http_code}}'"
        f" -H {auth} {' '.join(args)} {shlex.quote(api(host) + path)}",
    )
    assert rc == 0, err
    body, _, status = out.rpartition("\n")
    return int(status), body


def _post(host, path: str, body: dict) -> str:
    """POST a JSON body to the server with the API key and return the response text."""
    status, text = _curl(
        host, path, "-H 'Content-Type: application/json'", "-d " + shlex.quote(json.dumps(body))
    )
    assert status == 200, text
    return text


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


def test_environment_values_cannot_inject_a_variable(host) -> None:
    # molecule.yml's probe value holds quotes, a backtick, a dollar, a backslash and a newline
    # followed by VLLM_API_KEY=injected: systemd must read it back as one value, the key unchanged
    environ = _env(host)
    assert environ["VLLM_FLEET_QUOTING_PROBE"] == (
        'a "quoted" `word` $HOME \\ end\nVLLM_API_KEY=injected'
    )
    key = api_key(host)
    kept = environ["VLLM_API_KEY"] == key != "injected"  # a boolean: a failing == prints both keys
    assert kept


def test_unit_is_enabled_active_and_runs_as_the_service_user(host) -> None:
    service = host.service("vllm")
    assert service.is_enabled
    assert service.is_running
    pid = main_pid(host)
    assert pid > 0
    assert host.check_output("ps -o user= -p %s", str(pid)) == "vllm"


def test_the_server_runs_on_zendnn_exactly_on_an_amd_cpu_with_avx512(host) -> None:
    # vllm_install_zendnn (default true) installs zentorch where vLLM 0.32 takes its ZenDNN path;
    # vLLM loads zentorch's library there and only there. Read from the running server's memory
    # maps, whatever kind of CPU runs the test.
    zen = zen_cpu(host)
    pid = main_pid(host)
    assert pid > 0, "vllm is not running"
    pids = [pid, *host.run("ps -o pid= --ppid %s", str(pid)).stdout.split()]
    maps = "".join(host.file(f"/proc/{p}/maps").content_string for p in pids)
    installed = host.run(f"{PYTHON} -m pip show --quiet zentorch").rc == 0
    assert (installed, "libzentorch.so" in maps) == (zen, zen)


def test_unit_file_passes_systemd_analyze_verify(host) -> None:
    cmd = host.run("systemd-analyze verify /etc/systemd/system/vllm.service")
    assert cmd.rc == 0
    # unknown keys are only warnings: any output is a failure
    assert cmd.stdout.strip() == "" and cmd.stderr.strip() == "", cmd.stderr


def test_port_8000_listens_on_the_address_the_gateway_reaches_not_everywhere(host) -> None:
    address = api(host).split("//")[1].rsplit(":", 1)[0]
    # a gateway fronts the servers in this scenario: the host's own address, not 0.0.0.0
    assert (
        address
        == host.ansible("setup", "filter=ansible_default_ipv4")["ansible_facts"][
            "ansible_default_ipv4"
        ]["address"]
    )
    assert host.socket(f"tcp://{address}:8000").is_listening
    assert not host.socket("tcp://0.0.0.0:8000").is_listening


def test_health_answers_without_a_key(host) -> None:
    assert host.run("curl --silent --fail %s/health", api(host)).rc == 0


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions", "/v1/completions"])
def test_v1_answers_401_without_the_api_key(host, path: str) -> None:
    assert (
        host.check_output(
            "curl --silent --output /dev/null --write-out '%%{http_code}' %s", api(host) + path
        )
        == "401"
    )
    status, _ = _curl(host, path, key="wrong-key")
    assert status == 401


def test_models_answers_200_with_the_api_key_and_lists_the_served_name(host) -> None:
    status, body = _curl(host, "/v1/models")
    assert status == 200
    assert SERVED_NAME in [m["id"] for m in json.loads(body)["data"]]


def test_api_key_never_reaches_the_command_line_the_unit_or_the_journal(host) -> None:
    key = api_key(host)
    length = len(key)  # a plain number: a failing len(key) would print the key
    assert length >= 16
    pid = main_pid(host)
    # booleans, not the texts: a failing `key not in text` would print the key
    in_cmdline = key in host.check_output("tr '\\0' ' ' < /proc/%s/cmdline", str(pid))
    in_unit = key in host.file("/etc/systemd/system/vllm.service").content_string
    in_journal = run_with_secret(host, "journalctl --no-pager | grep -qF -- %s", key)[0] == 0
    assert (in_cmdline, in_unit, in_journal) == (False, False, False)


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


def _env(host) -> dict[str, str]:
    """The environment vLLM runs with, as systemd read it from the environment file."""
    pid = main_pid(host)
    raw = host.check_output("base64 -w0 /proc/%s/environ", str(pid))
    return dict(i.split("=", 1) for i in b64decode(raw).decode().split("\0") if "=" in i)


def test_tuning_is_computed_from_the_host(host) -> None:
    env = _env(host)
    flags = host.check_output("grep -m1 ^flags /proc/cpuinfo").split()
    cores = int(host.check_output("lscpu --parse=CORE | grep -v '^#' | sort -u | wc -l"))
    # one OpenMP thread per physical core; from 8 cores on, the first left to the API front end
    reserved = 1 if cores >= 8 else 0
    expected_bind = str(reserved) if cores - reserved == 1 else f"{reserved}-{cores - 1}"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == expected_bind
    unit = host.file("/etc/systemd/system/vllm.service").content_string
    expected_dtype = "bfloat16" if "avx512f" in flags else "float32"
    assert f"--dtype {expected_dtype}" in unit
    # this scenario pins the KV cache and context (two servers share a small test machine)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "--max-num-seqs 16" in unit


def test_each_server_runs_the_executor_it_is_set_to(host) -> None:
    # vllm-2 keeps the role's default (vLLM's multiprocess executor: a worker process beside the
    # engine core, inside the sandboxed unit); vllm-1 turns it off (molecule.yml): the model in the
    # engine-core process, no worker
    default = host.backend.get_hostname() == "vllm-2"
    titles = host.run("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n'").stdout.splitlines()
    assert len([t for t in titles if t.startswith("VLLM::EngineCore")]) == 1, titles
    assert (len([t for t in titles if t.startswith("VLLM::Worker")]) == 1) == default, titles
    assert ("VLLM_ENABLE_V1_MULTIPROCESSING" not in _env(host)) == default


def test_tcmalloc_and_intel_openmp_are_preloaded(host) -> None:
    preload = _env(host)["LD_PRELOAD"].split(":")
    assert any(p.endswith("libtcmalloc_minimal.so.4") for p in preload)
    assert any(p.endswith("/lib/libiomp5.so") for p in preload)
    pid = main_pid(host)
    maps = host.check_output("cat /proc/%s/maps", str(pid))
    assert "libtcmalloc_minimal.so.4" in maps and "libiomp5.so" in maps


@pytest.mark.parametrize(
    ("prop", "value"),
    [
        ("User", "vllm"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("CapabilityBoundingSet", ""),
        ("Restart", "always"),
        # deliberately off: oneDNN's JIT writes executable code
        ("MemoryDenyWriteExecute", "no"),
    ],
)
def test_unit_sandboxing(host, prop: str, value: str) -> None:
    assert host.check_output("systemctl show --property %s --value vllm", prop) == value


def test_unit_allows_thread_binding_and_caps_memory(host) -> None:
    filtered = host.check_output("systemctl show --property SystemCallFilter --value vllm")
    assert "sched_setaffinity" in filtered.split()  # an allow-list: binding must stay allowed
    memory_max = int(host.check_output("systemctl show --property MemoryMax --value vllm"))
    total = int(host.check_output("grep MemTotal /proc/meminfo").split()[1]) * 1024
    assert 0 < memory_max < total


def test_security_exposure_is_no_worse_than_recorded(host) -> None:
    out = host.check_output("systemd-analyze security --no-pager vllm.service 2>&1 | tail -1")
    score = float(re.search(r"exposure level for vllm.service: ([0-9.]+)", out).group(1))
    assert score <= RECORDED_EXPOSURE, out


def test_service_user_owns_only_its_state_and_cache(host) -> None:
    owned = host.check_output(
        "find / -xdev -user vllm -not -path '/var/lib/vllm*' -not -path '/var/cache/vllm*'"
        " -not -path '/proc/*' -print"
    )
    assert owned == ""
    for path in ("/var/lib/vllm", "/var/cache/vllm"):
        assert host.file(path).user == "vllm"
    # caches and temporary files in its own folders, nothing under /root or a shared /tmp
    env = _env(host)
    assert env["TMPDIR"].startswith("/var/lib/vllm")
    assert env["HOME"] == "/var/lib/vllm"
    assert all(env[k].startswith("/var/cache/vllm") for k in ("VLLM_CACHE_ROOT", "HF_HOME"))
