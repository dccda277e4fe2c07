"""Helpers shared by the scenarios' tests: where a server listens, whether it serves, a wait
for a condition, its API key, a server's state seen from outside, a server's CPU flags hidden, a
project playbook run against the scenario's hosts, and where the servers' Python is."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import testinfra

PYTHON = "/opt/vllm/venv/bin/python"  # the servers' Python environment (roles/python_env's venv)

# the gate's message when the server's process ended during its start, as the rescue renders it
ENDED = re.compile(
    r"its process ended during the start \(vllm\.service: \w+/[\w-]+, \d+ automatic restarts\)"
)


def host_named(name: str) -> testinfra.host.Host:
    """The scenario's host `name`, reached as the tests' own hosts are (Ansible's connection)."""
    return testinfra.get_host(
        f"ansible://{name}?ansible_inventory={os.environ['MOLECULE_INVENTORY_FILE']}"
    )


def address_of(host, name: str) -> str:
    """The IPv4 address of host `name` on the test network, as `host` resolves the name."""
    return host.check_output("getent ahostsv4 %s", name).split()[0]


def api(host) -> str:
    """Base URL of the server: the address its unit listens on (see vllm_service_host)."""
    unit = host.file("/etc/systemd/system/vllm.service").content_string
    address = re.search(r'--host "([^"]+)"', unit).group(1)
    return f"http://{'127.0.0.1' if address == '0.0.0.0' else address}:8000"


def serving(host) -> bool:
    """The server answers /health, asked on the server itself at the address its unit listens on."""
    return host.run("curl --silent --fail --max-time 5 %s/health", api(host)).rc == 0


T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float, interval: float = 5) -> T:
    """Call `check` every `interval` s until it returns a true value, and return that value; after
    `timeout` s, return its last (false) value. For a thread or a cleanup, where a failed test
    would not reach pytest or would skip what comes after; elsewhere wait_until."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() <= deadline:
        time.sleep(interval)
    return value


def wait_until(
    check: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 5
) -> T:
    """Call `check` every `interval` s until it returns a true value, and return that value; after
    `timeout` s, fail the test with `what`: what was waited for (or a function that says it)."""
    if not (value := poll(check, timeout, interval)):
        pytest.fail(f"not within {timeout:.0f} s: {what() if callable(what) else what}")
    return value


def run_with_secret(host, command: str, *args: str) -> tuple[int, str, str]:
    """Run a command on `host` whose arguments hold a secret (the API key); its exit code, output
    and errors as plain values. Never assert on testinfra's result itself, nor use check_output, for
    such a command: their failure messages print the command, with the secret, into the CI log.
    (A failure's frames print no function arguments: the verifier runs pytest with --tb=short.)"""
    result = host.run(command, *args)
    return result.rc, result.stdout, result.stderr


def api_key(host) -> str:
    """The API key, as the service reads it from its environment file."""
    # written double-quoted, with \\ " ` $ backslash-escaped (systemd's EnvironmentFile syntax); a
    # value of another variable may hold "VLLM_API_KEY=" after a newline (test_default.py's probe)
    env = host.file("/etc/vllm/vllm.env").content_string
    found = re.search(r'^VLLM_API_KEY="((?:[^"\\]|\\.)*)"$', env, re.MULTILINE)
    assert found, "no VLLM_API_KEY in /etc/vllm/vllm.env"
    return re.sub(r"\\(.)", r"\1", found.group(1))


def main_pid(host, unit: str = "vllm") -> int:
    """The main pid of the systemd unit `unit` on `host`, 0 when it runs no process."""
    return int(host.check_output("systemctl show --property MainPID --value %s", unit))


def server_state(host) -> tuple[str, str, int]:
    """The sha256 of the server's unit and of its environment file, and vLLM's main pid."""
    return (
        host.file("/etc/systemd/system/vllm.service").sha256sum,
        host.file("/etc/vllm/vllm.env").sha256sum,
        main_pid(host),
    )


def cpu_flags(host) -> list[str]:
    """The CPU flags `host` sees in /proc/cpuinfo (its first CPU's)."""
    return host.check_output("grep -m1 '^flags' /proc/cpuinfo").split()


def zen_cpu(host) -> bool:
    """vLLM 0.32's rule for its ZenDNN path (_is_amd_zen_cpu): an AMD CPU whose /proc/cpuinfo says
    avx512. There the vllm_install role installs zentorch (vllm_install_zendnn, its default)."""
    cpuinfo = host.file("/proc/cpuinfo").content_string
    return "AuthenticAMD" in cpuinfo and "avx512" in cpuinfo


# the copy cpuinfo_without mounts over /proc/cpuinfo (its presence: a killed test left it mounted)
CPUINFO_COPY = "/run/cpuinfo-without-flags"


@contextmanager
def cpuinfo_without(host, flags: str) -> Iterator[None]:
    """`host`'s /proc/cpuinfo without the CPU flags that match the regular expression `flags`: a
    copy bind-mounted over it inside the host's container (a running process is not affected),
    unmounted afterwards. (A container may mount with CAP_SYS_ADMIN unless an AppArmor profile
    forbids it; the test machines run none.)"""
    copy = CPUINFO_COPY
    # (the flags read below must be the CPU's)
    assert not host.file(copy).exists, f"{copy} is left mounted by a killed test: umount it"
    real = cpu_flags(host)
    mounted = False
    try:
        host.check_output(f"sed -E '/^flags/ s/ ({flags})\\b//g' /proc/cpuinfo > {copy}")
        host.check_output(f"mount --bind {copy} /proc/cpuinfo")
        mounted = True
        yield
    finally:
        if mounted:
            host.check_output("umount /proc/cpuinfo")
        host.check_output(f"rm -f {copy}")
        assert cpu_flags(host) == real


def task_result(out: str, task: str, host: str) -> str:
    """What the run printed for `host` under the task named `task` (ok, changed, skipping,
    included, ...), in whichever batch of the rollout `host` was."""
    sections = [part.split("TASK [", 1)[0] for part in out.split(f"{task}]")[1:]]
    for section in sections:
        found = [
            word
            for word in ("ok", "changed", "skipping", "fatal")
            if f"{word}: [{host}]" in section
        ]
        if re.search(rf"included: \S+ for ([^ ]+, )*{re.escape(host)}\b", section):
            found.append("included")
        if found:
            return found[0]
    raise AssertionError(f"no result of {task!r} for {host}: {sections}")


def recap_changed(out: str, name: str) -> int:
    """How many tasks changed `name`, as the run's recap counts them."""
    found = re.search(rf"{re.escape(name)}\s*: ok=\d+\s+changed=(\d+)", out)
    assert found, out[-2000:]
    return int(found.group(1))


def run_playbook(
    playbook: str,
    *args: str,
    extra_vars: dict | None = None,
    host_vars: dict[str, dict] | None = None,
    timeout: int = 1800,
    watch: Callable[[str], None] | None = None,
) -> tuple[int, str]:
    """Run a playbook of the project (path from the project root) on the scenario's hosts, with more
    ansible-playbook arguments, extra variables and variables per host (`{host: {name: value}}`, in
    a second inventory source that is removed afterwards); return its exit code and its output with
    white space folded (the YAML callback wraps long messages). `watch` is called with each line of
    the output as it comes (stdout and stderr together, then)."""
    project = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
    sources = [os.environ["MOLECULE_INVENTORY_FILE"]]
    with tempfile.TemporaryDirectory() as scratch:
        if host_vars:
            sources.append(f"{scratch}/host_vars.yml")
            Path(sources[-1]).write_text(json.dumps({"all": {"hosts": host_vars}}))
        command = [
            "ansible-playbook",
            *(arg for source in sources for arg in ("-i", source)),
            *(["-e", json.dumps(extra_vars)] if extra_vars is not None else []),
            *args,
            str(project / playbook),
        ]
        env = dict(os.environ, ANSIBLE_ROLES_PATH=str(project / "roles"), ANSIBLE_NOCOLOR="1")
        if watch is None:
            run = subprocess.run(
                command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout
            )
            return run.returncode, " ".join((run.stdout + run.stderr).split())
        lines: list[str] = []
        timed_out = threading.Event()
        with subprocess.Popen(
            command,
            cwd=project,
            env=dict(env, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            encoding="utf-8",
            errors="replace",
        ) as running:

            def stop() -> None:
                timed_out.set()
                running.kill()

            timer = threading.Timer(timeout, stop)
            timer.start()
            try:
                for line in running.stdout:
                    lines.append(line)
                    watch(line)
            except BaseException:
                running.kill()
                raise
            finally:
                timer.cancel()
        if timed_out.is_set():
            raise subprocess.TimeoutExpired(command, timeout, output="".join(lines))
    return running.returncode, " ".join("".join(lines).split())
