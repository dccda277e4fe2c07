"""Failure paths of the service and build stages, run with ansible-playbook against one server.

Bad input must fail in preflight with a clear message before anything changes (the settings'
refusals on every host: test_preflight_and_gate.py); a server that does not come up must fail the
play with the unit's journal in the message, also on the one-stage command (the configure tag), and
stop the rollout there (a good re-run restores it). The model stage's failure paths are proven in
molecule/model. Traffic stays inside the test containers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner
from helpers import (
    ENDED,
    api,
    api_key,
    cpuinfo_without,
    host_named,
    main_pid,
    recap_changed,
    run_playbook,
    run_with_secret,
    server_state,
    serving,
    wait_until,
)

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
SERVERS = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")
HOST, BUILDER = SERVERS[-1], SERVERS[0]
testinfra_hosts = [HOST]
BUILDER_HOST = host_named(BUILDER)
UNIT = "/etc/systemd/system/vllm.service"


def _serve(**extra_vars: object) -> tuple[int, str]:
    """Run the service stage on HOST with extra variables (see _stage)."""
    return _stage("serve.yml", **extra_vars)


def _stage(playbook: str, limit: str | None = HOST, **extra_vars: object) -> tuple[int, str]:
    """Run a stage playbook on HOST (or `limit`, None: every host) with extra variables."""
    return run_playbook(
        f"playbooks/{playbook}", *(["--limit", limit] if limit else []), extra_vars=extra_vars
    )


@pytest.fixture
def fleet_restored() -> Iterator[None]:
    """Whatever the test did to the servers, a good run of the service stage restores them: all in
    one batch (no load runs by then), every server restarted (a rolling restart), which also proves
    a batch of more than one restarting server on any CPU."""
    hosts = [host_named(n) for n in SERVERS]
    yield
    before = [main_pid(h) for h in hosts]
    rc, out = _stage(
        "serve.yml", limit=None, vllm_rollout_batch="100%", vllm_service_rolling_restart=True
    )
    assert rc == 0, out[-3000:]
    after = [main_pid(h) for h in hosts]
    assert all(old != new for old, new in zip(before, after, strict=True)), (before, after)
    assert all(serving(h) for h in hosts)


def test_rollout_stops_at_a_failing_batch_and_the_others_keep_serving(
    host, fleet_restored: None
) -> None:
    assert HOST != BUILDER
    before = host.file(UNIT).sha256sum
    # batches of one: the first server gets a setting vLLM rejects and never becomes healthy. Run
    # as the README's one-stage command (the configure tag): that path must not skip the gate.
    rc, out = run_playbook(
        "playbooks/serve.yml",
        "--tags",
        "vllm_service_configure",
        extra_vars={
            "vllm_rollout_batch": 1,
            "vllm_service_extra_args": ["--no-such-option"],
            # far longer than vLLM takes to refuse the flag: the gate must not wait for it
            "vllm_service_start_timeout": 300,
        },
    )
    assert rc != 0
    assert "Write the systemd unit" in out
    assert "did not answer" in out and "Last lines of its journal" in out
    # the gate saw the process end (systemd's state of the unit), not the end of the start timeout
    assert ENDED.search(out), out[-3000:]
    # vLLM's own complaint, read from the journal of the unit
    assert "--no-such-option" in out.split("Last lines of its journal", 1)[1]
    assert "--no-such-option" in BUILDER_HOST.file(UNIT).content_string
    # the rollout stopped there: the second batch was never touched and still serves
    assert host.file(UNIT).sha256sum == before
    assert host.service("vllm").is_running
    assert serving(host)


def _back_after(host, pid: int, what: str) -> None:
    """Wait until systemd has started a new server process (not `pid`) that answers /health."""
    wait_until(
        lambda: main_pid(host) not in (0, pid) and serving(host), 600, f"vllm back after {what}"
    )


def _serving(host) -> None:
    """Wait until the server runs and answers /health (no restart of an earlier test pending)."""
    wait_until(
        lambda: host.run("systemctl is-active --quiet vllm").rc == 0 and serving(host),
        600,
        "vllm serving",
    )


def test_server_is_restarted_when_its_engine_dies_and_its_first_request_may_be_a_short_prompt(
    host,
) -> None:
    # vLLM's engine core is a child of the API server; when it dies, the API server shuts down
    # cleanly and exits 0, which Restart=on-failure would leave stopped (a crash of the main
    # process, which exits on a signal, is restarted by either).
    _serving(host)
    pid = main_pid(host)
    assert pid > 0
    restarts = int(host.check_output("systemctl show --property NRestarts --value vllm"))
    engines = host.check_output("pgrep --parent %s", str(pid)).split()
    assert engines, f"no child process of the server {pid}"
    for engine in engines:
        host.run("kill -9 %s", engine)
    # Restart=always, after RestartSec: a new process, healthy again
    _back_after(host, pid, "its engine died")
    assert int(host.check_output("systemctl show --property NRestarts --value vllm")) > restarts
    # On an AMX CPU, vLLM 0.32's attention runs AMX instructions without asking Linux for them:
    # a fresh server whose first request was a 2-token prompt died of SIGILL (roles/vllm_install,
    # tasks/site_packages.yml). The first request of this fresh start (/health is no request) is
    # exactly that.
    pid = main_pid(host)
    request = {"model": "Qwen/Qwen2.5-1.5B-Instruct", "prompt": "hi", "max_tokens": 4}
    body = json.dumps(request | {"ignore_eos": True})
    rc, answer, _ = run_with_secret(
        host,
        "curl --silent --max-time 120 --header %s --header %s --data %s %s/v1/completions",
        f"Authorization: Bearer {api_key(host)}",
        "Content-Type: application/json",
        body,
        api(host),
    )
    assert rc == 0 and '"completion_tokens":4' in answer, answer[-500:]
    time.sleep(2)
    assert host.service("vllm").is_running and main_pid(host) == pid


def test_smoke_playbook_runs_the_recipes_two_clients_with_timings(host) -> None:
    rc, out = _stage("smoke.yml", vllm_smoke_max_tokens=8)
    assert rc == 0, out[-3000:]
    assert re.search(r"openai client: [0-9]+ tokens in [0-9.]+ s", out), out[-2000:]
    assert re.search(r"offline LLM.generate: model loaded in [0-9.]+ s", out), out[-2000:]
    leaked = api_key(host) in out  # a boolean: a failing `key not in out` would print the key
    assert not leaked


BUILD_FOLDERS = "ls -A /var/lib/vllm-build/work /var/lib/vllm-build/dist /var/lib/vllm-build/venvs"


@pytest.fixture(scope="module")
def full_compile() -> tuple[str, int, str]:
    """One run of the vLLM stage on the builder asking for a full compile, which Debian's gcc 12.2
    cannot do (refused, nothing changes): the builder's folders before it, its exit code, output."""
    before = BUILDER_HOST.check_output(BUILD_FOLDERS)
    rc, out = _stage("vllm.yml", limit=BUILDER, vllm_build_use_precompiled=False)
    return before, rc, out


def test_a_full_compile_with_debian_gcc_is_refused_before_anything_changes(
    host, full_compile: tuple[str, int, str]
) -> None:
    # (rerunning the build builds nothing: Molecule's idempotence step, changed=0 on every host)
    before, rc, out = full_compile
    assert rc != 0
    gcc = BUILDER_HOST.check_output("gcc -dumpfullversion")
    refusal = f"gcc {gcc} on builder {BUILDER} is older than 12.3, which vLLM v0.32.0 requires"
    assert refusal + " for x86 CPU builds" in out, out[-3000:]
    assert "vllm_build_use_precompiled: true" in out
    assert recap_changed(out, BUILDER) == 0
    assert "Install what the build needs" not in out
    assert BUILDER_HOST.check_output(BUILD_FOLDERS) == before
    assert host.service("vllm").is_running


def test_a_kept_wheel_that_needs_a_newer_c_library_is_refused_before_anything_changes(
    host, full_compile: tuple[str, int, str]
) -> None:
    # A full-compile wheel the controller keeps, compiled (says its build.json) on a builder whose
    # C library is newer than any server's: its kernels would not load on them. Faked here under the
    # id a full compile would have, and removed afterwards.
    plan = re.search(r"build ([0-9a-f]{16}) \(full compile\): to be built", full_compile[2])
    assert full_compile[1] != 0 and plan, full_compile[2][-3000:]
    kept = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "builds" / plan.group(1)
    assert not kept.exists()
    kept.mkdir(parents=True)
    try:
        manifest = {"wheel": "vllm-0.32.0+cpu-cp311-cp311-linux_x86_64.whl", "kernels": ["_C"]}
        manifest |= {"builder": "newer-builder", "glibc": "99.1", "build_id": plan.group(1)}
        (kept / "build.json").write_text(json.dumps(manifest))
        before = BUILDER_HOST.check_output(BUILD_FOLDERS)
        pid = main_pid(host)
        rc, out = _stage("vllm.yml", limit=BUILDER, vllm_build_use_precompiled=False)
        assert rc != 0
        glibc = host.check_output("getconf GNU_LIBC_VERSION").split()[-1]
        refusal = (
            f"{HOST} has glibc {glibc}, but the kernels of build {plan.group(1)} were compiled"
        )
        assert refusal + " on newer-builder (kept on the controller) against glibc 99.1" in out, (
            out[-3000:]
        )
        assert "Build the wheel with VLLM_TARGET_DEVICE=cpu" not in out
        assert recap_changed(out, BUILDER) == 0
        assert BUILDER_HOST.check_output(BUILD_FOLDERS) == before
        assert host.service("vllm").is_running and main_pid(host) == pid
    finally:
        shutil.rmtree(kept)


def test_a_server_without_avx2_is_refused_before_anything_changes(host) -> None:
    with cpuinfo_without(host, "avx2"):
        assert " avx2 " not in host.file("/proc/cpuinfo").content_string
        rc, out = _stage("vllm.yml", limit=BUILDER)
    assert rc != 0
    assert f"{HOST} cannot run vLLM's x86 CPU kernels: its CPU lacks avx2 (vLLM needs" in out, out[
        -3000:
    ]
    assert recap_changed(out, BUILDER) == 0


def test_a_lost_build_is_published_again_from_the_builder_without_compiling(host) -> None:
    # The controller lost the build (moved aside here). The next run finds the wheel the builder
    # already built under that id and publishes it again: nothing fetched, nothing compiled.
    builds = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "builds"
    [kept] = [d for d in builds.iterdir() if (d / "build.json").is_file()]
    moved = builds / f"moved-aside-{kept.name}"
    saved = (kept / "build.json").read_text()
    # dist (the wheel), logs (a build writes one) and work (a fetch fills it), with mtimes
    listing = "ls -l --time-style=+%s /var/lib/vllm-build/dist /var/lib/vllm-build/logs"
    listing += " /var/lib/vllm-build/work"
    dist = BUILDER_HOST.check_output(listing)
    try:
        kept.rename(moved)
        rc, out = _stage("vllm.yml", limit=BUILDER)
        assert rc == 0, out[-3000:]
        assert "to be built on" in out
        assert "Fetch the commit from git" not in out
        assert "Build the wheel with VLLM_TARGET_DEVICE=cpu" not in out
        # the same build id, the builder's wheel and log untouched, nothing fetched, published again
        assert BUILDER_HOST.check_output(listing) == dist
        assert (kept / "build.json").read_text() == saved
        wheels = list(moved.glob("*.whl"))
        assert wheels
        for wheel in wheels:
            assert (kept / wheel.name).read_bytes() == wheel.read_bytes()
    finally:
        if moved.exists():  # the set-aside build back, over whatever the run published
            shutil.rmtree(kept, ignore_errors=True)
            moved.rename(kept)


def test_a_build_that_fails_shows_the_end_of_its_log_and_publishes_nothing() -> None:
    # A build setting that breaks vLLM's setup.py: the kernels' wheel at a path it cannot open.
    # The run must fail with the build's own error (from the end of its log), publish no wheel on
    # the builder or the controller, and leave the builder's own server as it was.
    builds = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "builds"
    wheels = "ls -A /opt/vllm/wheels"
    kept, served = (
        sorted(builds.iterdir()),
        (BUILDER_HOST.check_output(wheels), server_state(BUILDER_HOST)),
    )
    broken = {"VLLM_PRECOMPILED_WHEEL_LOCATION": "/nonexistent.whl"}
    rc, out = _stage("vllm.yml", limit=BUILDER, vllm_build_environment=broken)
    plan = re.search(r"build ([0-9a-f]{16}) \(precompiled kernels\): to be built", out)
    assert plan, out[-3000:]
    build, root = plan.group(1), "/var/lib/vllm-build"
    try:
        assert rc != 0
        log = f"{root}/logs/{build}.log"
        assert f"Building vLLM 0.32.0 on {BUILDER} failed (exit 1 " in out, out[-3000:]
        assert f"Whole log: {log}. Its end:" in out
        # setup.py's own error, from the end of the log (the YAML callback may double the quotes)
        assert re.search(r"ValueError: unknown url type: '+/nonexistent\.whl'+", out), out[-3000:]
        assert "Failed to build vllm" in BUILDER_HOST.file(log).content_string
        assert not BUILDER_HOST.file(f"{root}/dist/{build}").exists
        assert sorted(builds.iterdir()) == kept
        assert (BUILDER_HOST.check_output(wheels), server_state(BUILDER_HOST)) == served
    finally:
        # (all of it, also what a build that wrongly succeeded would have published)
        BUILDER_HOST.run(
            "rm -rf %s %s %s %s",
            f"{root}/work/{build}",
            f"{root}/dist/{build}.partial",
            f"{root}/dist/{build}",
            f"{root}/logs/{build}.log",
        )
        shutil.rmtree(builds / build, ignore_errors=True)


def test_check_mode_previews_a_new_build_instead_of_failing(host) -> None:
    listing = "ls -A /var/lib/vllm-build/dist /opt/vllm/wheels"
    before = BUILDER_HOST.check_output(listing), host.check_output("ls -A /opt/vllm/wheels")
    # a setting that is part of the build id: a real run would build a new wheel
    rc, out = run_playbook(
        "playbooks/vllm.yml",
        "--check",
        extra_vars={"vllm_build_environment": {"VLLM_FLEET_CHECK_PROBE": "1"}},
        timeout=900,
    )
    assert rc == 0, out[-3000:]
    assert "Check mode: the controller has no wheel for build" in out
    assert "Build the wheel with VLLM_TARGET_DEVICE=cpu" not in out
    assert (
        BUILDER_HOST.check_output(listing),
        host.check_output("ls -A /opt/vllm/wheels"),
    ) == before


def test_a_quantization_the_cpu_cannot_run_is_refused_before_anything_changes(host) -> None:
    # the served model with Qwen's GPTQ-Int8 quantization_config: vLLM 0.32 has no CPU kernel for it
    probe = "/opt/vllm/models/Gptq8-probe"
    host.check_output("cp -a $(realpath /opt/vllm/models/Qwen2.5-1.5B-Instruct/current) %s", probe)
    try:
        host.check_output(
            "python3 -c %s %s",
            "import json, sys; p = sys.argv[1] + '/config.json'; c = json.load(open(p));"
            " c['quantization_config'] = {'quant_method': 'gptq', 'bits': 8};"
            " json.dump(c, open(p, 'w'))",
            probe,
        )
        before = server_state(host)
        rc, out = _serve(vllm_service_model_path=probe)
        assert rc != 0
        assert "GPTQ 8-bit weights have no CPU kernel in vLLM 0.32" in out, out[-3000:]
        assert "Write the systemd unit" not in out
        assert server_state(host) == before
        assert host.service("vllm").is_running
    finally:
        host.run("rm -rf %s", probe)
