"""The web UI on the gateway host: the unit and its hardening, checked inside the host; then the
suites of tests/webui run from the controller against vllm-1's real server (chat logic, and headless
Chromium on the role's page with a recording proxy) and against the page the gateway serves.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from base64 import b64decode
from pathlib import Path

import testinfra.utils.ansible_runner
from helpers import api_key, host_named, main_pid, run_with_secret

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("gateway")
SERVER = host_named("vllm-1")
# The key the servers read from Vault; the login and prompt as in molecule.yml (group_vars).
API_KEY = api_key(SERVER)
USER, PASSWORD = "tester", 'pa ss"wo`rd$1\\x'
SYSTEM_PROMPT = 'You are a "helpful" assistant.\nPrices are in $USD.'
WHEELHOUSE = Path.home() / ".cache/vllm-fleet/wheelhouse/vllm-webui-cp311-x86_64"
# systemd-analyze security's exposure score of vllm-webui.service, at most (0 = locked down, 10 =
# fully exposed). The role README records the value measured on this scenario's running gateway
# (1.3, systemd 252); the bound leaves a little room for other systemd versions' weights.
RECORDED_EXPOSURE = 1.5


def _address(host) -> str:
    """The host's address on the scenario's network, as the controller reaches it."""
    return host.check_output("hostname -I").split()[0]


def test_service_user_cannot_log_in(host) -> None:
    user = host.user("vllm-webui")
    assert user.exists
    assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin")
    assert host.check_output("passwd --status vllm-webui").split()[1] == "L"


def test_service_user_cannot_write_its_code(host) -> None:
    for path in ("/opt/vllm-webui", "/opt/vllm-webui/venv/lib", "/opt/vllm-webui/app.py"):
        assert host.run("runuser -u vllm-webui -- test -w %s", path).rc != 0, path


def test_environment_file_is_private(host) -> None:
    env = host.file("/etc/vllm-webui/vllm-webui.env")
    assert (env.user, env.group, env.mode) == ("root", "vllm-webui", 0o640)


def test_unit_file_passes_systemd_analyze_verify(host) -> None:
    cmd = host.run("systemd-analyze verify /etc/systemd/system/vllm-webui.service")
    assert cmd.rc == 0
    assert cmd.stdout.strip() == "" and cmd.stderr.strip() == "", cmd.stderr


def test_security_exposure_is_no_worse_than_recorded(host) -> None:
    out = host.check_output("systemd-analyze security --no-pager vllm-webui.service 2>&1 | tail -1")
    score = float(re.search(r"exposure level for vllm-webui.service: ([0-9.]+)", out).group(1))
    assert score <= RECORDED_EXPOSURE, out


def test_unit_runs_as_its_user_on_loopback_only(host) -> None:
    service = host.service("vllm-webui")
    assert service.is_enabled and service.is_running
    assert host.check_output("ps -o user= -p %s", str(main_pid(host, "vllm-webui"))) == "vllm-webui"
    assert host.socket("tcp://127.0.0.1:7860").is_listening
    assert not host.socket("tcp://0.0.0.0:7860").is_listening


def _environ(host) -> dict[str, str]:
    """The page's environment as systemd gave it to the process."""
    raw = host.check_output("base64 -w0 /proc/%s/environ", str(main_pid(host, "vllm-webui")))
    return dict(item.split("=", 1) for item in b64decode(raw).decode().split("\0") if item)


def test_api_base_defaults_to_the_gateways_loopback_listener(host) -> None:
    # molecule.yml sets no vllm_webui_api_base: on a gateway host the default is the gateway's
    # internal listener (load-balanced, same key), and the page lists the models through it
    environ = _environ(host)
    assert environ["VLLM_WEBUI_API_BASE"] == "http://127.0.0.1:8090/v1"
    rc, status, _ = run_with_secret(
        host,
        "curl --silent --max-time 30 --output /dev/null --write-out '%%{http_code}'"
        " --header %s http://127.0.0.1:8090/v1/models",
        f"Authorization: Bearer {environ['VLLM_WEBUI_API_KEY']}",
    )
    assert (rc, status) == (0, "200")


def test_secrets_and_a_multi_line_prompt_reach_the_process_unchanged(host) -> None:
    # systemd's own reading of the environment file: quotes, $, backticks, newlines kept
    environ = _environ(host)
    assert environ["VLLM_WEBUI_AUTH_PASSWORD"] == PASSWORD
    assert environ["VLLM_WEBUI_SYSTEM_PROMPT"] == SYSTEM_PROMPT
    same_key = environ["VLLM_WEBUI_API_KEY"] == API_KEY  # a boolean: a failing == prints both
    assert same_key
    assert environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_page_answers_on_loopback(host) -> None:
    assert host.run("curl --silent --fail --output /dev/null http://127.0.0.1:7860/").rc == 0


def test_webui_suites_from_the_controller(host) -> None:
    made = subprocess.run(
        ["bash", str(PROJECT / "tests/webui/make-venv.sh")],
        env=dict(os.environ, WHEELHOUSE=str(WHEELHOUSE)),
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    env = dict(
        os.environ,
        VLLM_WEBUI_TEST_API_BASE=f"http://{_address(SERVER)}:8000/v1",
        VLLM_WEBUI_TEST_API_KEY=API_KEY,
        VLLM_WEBUI_TEST_PYTHON=made.stdout.split()[-1],
        VLLM_WEBUI_TEST_URL=f"https://{_address(host)}/",
        VLLM_WEBUI_TEST_USER=USER,
        VLLM_WEBUI_TEST_PASSWORD=PASSWORD,
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-v",
            "-rs",
            # no function arguments in a failure's frames: they hold the API key
            "--tb=short",
            "tests/webui",
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-4000:]
    assert "SKIPPED" not in run.stdout, run.stdout
