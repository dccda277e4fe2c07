"""needrestart never restarts a vLLM server behind the rollout's back.

Ubuntu's server images install needrestart. It runs after every apt transaction, unattended upgrades
included, and on Ubuntu 24.04 it restarts at once, without asking, every service that still maps a
library the transaction replaced. A restart there would cut the server's requests outside the
drained, health-gated rollout. The service stage tells needrestart to defer it.

The test installs Debian's needrestart (3.6, the version Ubuntu 24.04 patches) on one server and
runs it in upstream's automatic mode (`-r a`). Ubuntu's apt hook runs its own mode (`-m u`), which
is not tested here: the rule is needrestart's per-service exception (`$nrconf{override_rc}`), which
the automatic mode honours. The test replaces a library the server maps (tcmalloc, which the unit
preloads) with a copy of itself, a new file as a package update writes. needrestart must then list
the server under its deferred restarts, and the server must keep its main pid. needrestart finds a
process's program through `/proc/<pid>/exe`, which root reads for another user's process only with
CAP_SYS_PTRACE: a host's root has it, a container only when given it (molecule.yml gives it to this
server), and the test first checks that root can read it. It may restart other services of that test
host which it finds outdated; none is asserted on. Afterwards the packages the test installed are
purged. The server keeps mapping the old file, whose content is the same. Traffic stays inside the
test containers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import testinfra.utils.ansible_runner
from helpers import host_named, main_pid, serving, wait_until

SERVER = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("vllm_servers")[-1]
PACKAGES = "dpkg-query --show --showformat '${Package}\\n' | sort"


@pytest.fixture
def needrestart() -> Iterator[object]:
    """needrestart installed on SERVER (its own apt hook held back while it installs); afterwards
    the packages it brought are purged, and the server serves again (should needrestart have
    restarted it, the property under test broken)."""
    host = host_named(SERVER)
    before = host.check_output(PACKAGES).split()
    install = (
        "NEEDRESTART_SUSPEND=1 DEBIAN_FRONTEND=noninteractive"
        " apt-get install --yes --no-install-recommends needrestart"
    )
    try:
        # (tried again: the mirror has had hiccups)
        runs = []
        wait_until(
            lambda: runs.append(host.run(install)) or runs[-1].rc == 0,
            120,
            lambda: f"needrestart installed: {runs[-1].stdout[-1000:]} {runs[-1].stderr[-1000:]}",
            10,
        )
        yield host
    finally:
        added = sorted(set(host.check_output(PACKAGES).split()) - set(before))
        if added:
            host.check_output(
                "NEEDRESTART_SUSPEND=1 DEBIAN_FRONTEND=noninteractive apt-get purge --yes"
                + " %s" * len(added),
                *added,
            )
        wait_until(lambda: serving(host), 600, f"{SERVER}: /health after the needrestart test")


def test_needrestart_defers_the_servers_restart_after_a_library_update(needrestart) -> None:
    host = needrestart
    pid = main_pid(host)
    # without it needrestart skips the server's processes as kernel threads, and sees nothing to do
    exe = host.run("readlink /proc/%s/exe", str(pid))
    assert exe.rc == 0, f"root cannot read /proc/{pid}/exe (no CAP_SYS_PTRACE?): {exe.stderr}"
    maps = host.check_output("grep -m1 -o '/[^ ]*libtcmalloc[^ ]*' /proc/%s/maps", str(pid))
    library = host.check_output("readlink -f %s", maps)
    host.check_output("cp -p %s %s.new && mv -f %s.new %s", library, library, library, library)
    # the server now maps a file that is gone: what needrestart looks for
    assert "(deleted)" in host.check_output("grep libtcmalloc /proc/%s/maps", str(pid))
    # (one stream: its notices and the commands under them come in order)
    run = host.run("needrestart -r a -l 2>&1")
    out = run.stdout
    assert run.rc == 0, out
    deferred = out.split("Service restarts being deferred:", 1)
    assert len(deferred) == 2 and "systemctl restart vllm.service" in deferred[1], out
    assert main_pid(host) == pid, out
    assert serving(host)
