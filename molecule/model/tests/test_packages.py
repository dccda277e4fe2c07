"""A package installation waits for the dpkg lock another apt holds (molecule/model).

Right after an Ubuntu VM's first boot, unattended upgrades hold dpkg's lock for minutes; Ansible's
apt module gives up after 60 s by default. Here a process on HOST holds the lock as apt does (an
fcntl lock on /var/lib/dpkg/lock-frontend) while the toolchain stage installs one package more, and
lets it go 75 s after the stage's `apt-get` began to wait for it. The stage must wait (not fail, not
try again) and install the package once the lock is free. The package comes from the test image's
mirror (Debian's; Ubuntu's with SUITE=noble).
"""

from __future__ import annotations

import os
import threading

import testinfra.utils.ansible_runner
from helpers import main_pid, poll, run_playbook, wait_until

HOST = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("vllm_servers")[-1]
testinfra_hosts = [HOST]

PACKAGE = "hello"  # small, in Debian's and Ubuntu's main archive, installed by no role
WAIT = 75  # s the lock stays held once apt-get waits for it: more than the apt module's default 60
UNIT = "fleet-test-dpkg-lock"
HELD, RELEASE = "/run/fleet-test-dpkg-held", "/run/fleet-test-dpkg-release"
LOCK = "/var/lib/dpkg/lock-frontend"
HOLDER = f"""
import fcntl, os, time
lock = open("{LOCK}", "w")
fcntl.lockf(lock, fcntl.LOCK_EX)
open("{HELD}", "w").close()
while not os.path.exists("{RELEASE}"):
    time.sleep(0.2)
"""
PROBE = f'import fcntl; fcntl.lockf(open("{LOCK}", "w"), fcntl.LOCK_EX | fcntl.LOCK_NB)'
# the apt module's apt-get, waiting for the lock (anchored: the shell running pgrep does not match)
APT_GET = f"^/usr/bin/apt-get .*DPkg::Lock::Timeout=.* install .*{PACKAGE}"


def test_a_package_installation_waits_for_the_dpkg_lock_another_apt_holds(host) -> None:
    assert host.run("dpkg-query --show %s", PACKAGE).rc != 0, f"{PACKAGE} is installed already"
    waited: list[bool] = []  # whether apt-get was seen waiting
    released: list[int] = []  # when the lock was let go (the host's clock)
    done = threading.Event()  # the stage run has returned (or the test is ending)

    def gone() -> bool:
        return host.run("systemctl is-active --quiet %s", UNIT).rc != 0

    def hold_then_release() -> None:
        """Once the stage's apt-get waits for the lock (within 420 s), let it go WAIT s later;
        at once if the stage run returns first (a failure shows without waiting out the window)."""
        try:
            seen = poll(lambda: done.is_set() or host.run("pgrep -f %s", APT_GET).rc == 0, 420, 1)
            if seen and not done.is_set():
                waited.append(True)
                done.wait(WAIT)
        finally:
            released.append(int(host.check_output("touch %s && date +%%s", RELEASE)))

    host.check_output("rm -f %s %s", HELD, RELEASE)  # (what an interrupted run may have left)
    # (bounded: should this test be killed, the lock goes within 10 minutes all the same)
    host.check_output(
        "systemd-run --unit %s --collect --property RuntimeMaxSec=600 python3 -c %s", UNIT, HOLDER
    )
    releaser = threading.Thread(target=hold_then_release)
    try:
        wait_until(lambda: host.file(HELD).exists, 30, f"{UNIT} holding dpkg's lock", 1)
        assert host.run("python3 -c %s", PROBE).rc != 0, "the lock is not held"
        releaser.start()
        rc, out = run_playbook(
            "playbooks/toolchain.yml",
            "--limit",
            HOST,
            extra_vars={"build_toolchain_extra_packages": [PACKAGE]},
            timeout=900,
        )
        done.set()
        releaser.join()
        assert waited, f"apt-get never waited for the lock: {out[-3000:]}"
        assert rc == 0, out[-3000:]
        assert "RETRYING" not in out, out[-3000:]  # it waited; it did not fail and try again
        # when dpkg installed it, by dpkg's log (the host's own clock, as `released`)
        log = f"grep ' status installed {PACKAGE}:' /var/log/dpkg.log | tail -n 1 | cut -c1-19"
        installed = int(host.check_output(f'date -d "$({log})" +%s'))
        assert installed >= released[0] - 1, (installed, released)
    finally:
        done.set()
        host.run("touch %s", RELEASE)
        if releaser.is_alive():
            releaser.join()
        # the holder ends once it sees RELEASE; else it is killed by its pid
        if not poll(gone, 30, 1):
            if pid := main_pid(host, UNIT):
                host.run("kill %s", str(pid))
            wait_until(gone, 30, f"{UNIT} gone")
        host.run("rm -f %s %s", HELD, RELEASE)
        host.check_output(
            "DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 purge --yes %s",
            PACKAGE,
        )
