"""Provisioning benchmark: cold `site.yml` on 1, 3 and 5 fresh hosts, then the warm re-run.

Run it with `make bench-provision` (Docker started by tests/molecule.sh --exec, stopped by its pid).
For each fleet size N it creates N fresh systemd containers plus the Hugging Face stand-in
(Molecule scenario benchmarks/molecule/provision-N, found through MOLECULE_GLOB; group_vars
in benchmarks/molecule/group_vars/), and times:

- cold: `molecule converge` = `ansible-playbook site.yml` on the fresh hosts, from the controller's
  wheelhouses (warm: filled by earlier runs) and the local model mirror; vLLM is built from source
  once for the fleet (a fresh controller build folder per run, so every cold run builds);
- warm: `molecule idempotence` = the same playbook again, which must report changed=0.

With more than one host the first server is the fleet cache (roles/fleet_cache): each phase also
records the bytes its nginx served to the other hosts (from its access log) and the bytes of the
controller's files it holds (what the controller sent once, not once per host).

Ansible's profile_roles callback gives the time per role, so the build's share is known: the
saving of building once is (N - 1) x that share, the cost building on every host would add.
Appends one JSON line per (N, phase) to benchmarks/results/provision.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "benchmarks" / "results"
ROLE_LINE = re.compile(r"^(\S+) -+ ?(\d+\.\d+)s$")


def molecule(action: str, scenario: str, log: Path, env: dict[str, str]) -> float:
    """Run one molecule action, its output to `log`; return its wall time (fails loudly)."""
    start = time.monotonic()
    with log.open("w") as out:
        run = subprocess.run(
            ["molecule", action, "-s", scenario],
            cwd=PROJECT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    seconds = time.monotonic() - start
    if run.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"molecule {action} -s {scenario} failed (log {log}):\n{tail}")
    return seconds


def role_seconds(log: Path) -> dict[str, float]:
    """Seconds per role from profile_roles' recap (the last one in the log)."""
    text = log.read_text(errors="replace")
    recap = text.rsplit("ROLES RECAP", 1)[-1]
    roles: dict[str, float] = {}
    for line in recap.splitlines():
        found = ROLE_LINE.match(line.strip())
        if found and found.group(1) != "total":
            roles[found.group(1)] = float(found.group(2))
    return roles


def changed_counts(log: Path) -> dict[str, int]:
    """changed= per host from the last PLAY RECAP."""
    recap = log.read_text(errors="replace").rsplit("PLAY RECAP", 1)[-1]
    return {h: int(c) for h, c in re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", recap, re.M)}


def cache_bytes() -> tuple[int, int]:
    """(bytes the fleet cache on vllm-1 has served, bytes of controller files it holds); (0, 0)
    when it has none (a fleet of one host)."""
    script = (
        "log=/var/log/nginx/vllm-fleet-cache.access.log; files=/var/cache/vllm-fleet/files;"
        # %.0f: a sum of several GB, which awk would print as 2.4e+09 with print or cap with %d
        " served=0; test -f $log &&"
        " served=$(awk '$9 == 200 {s += $10} END {printf \"%.0f\", s}' $log);"
        " held=0; test -d $files && held=$(du -sbL $files | cut -f1); echo $served $held"
    )
    run = subprocess.run(
        ["docker", "exec", "vllm-1", "sh", "-c", script], capture_output=True, text=True, check=True
    )
    served, held = run.stdout.split()
    return int(served), int(held)


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON object of a JSON-lines file (also plot.py's reader)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def newest(records: list[dict]) -> list[dict]:
    """The newest record of each (fleet size, phase): a fleet size run again replaces its earlier
    figures, and the others stay (`--hosts 5` alone adds to the 1- and 3-host results)."""
    latest: dict[tuple[int, str], dict] = {}
    for r in records:
        key = (r["hosts"], r["phase"])
        if key not in latest or r["date"] >= latest[key]["date"]:
            latest[key] = r
    return [latest[key] for key in sorted(latest)]


def isa(host: dict) -> str:
    """The recorded instruction sets, or why there are none."""
    if "isa" not in host:
        return "instruction sets not recorded"
    return ", ".join(host["isa"]) or "no AVX2"


def summary(records: list[dict], command: str) -> str:
    """Markdown table of the newest record of each fleet size and phase, with the saving of
    building once computed."""
    rows = [
        "| hosts | cold site.yml (s) | of which vllm_build (s) | warm re-run (s) | changed (warm) |"
        " building on every host adds (s of build work) | controller files on the cache (MB) |"
        " cache served, cold / warm (MB) | run (date, commit) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_hosts: dict[int, dict[str, dict]] = {}
    for r in records:
        by_hosts.setdefault(r["hosts"], {})[r["phase"]] = r
    for n in sorted(by_hosts):
        cold, warm = by_hosts[n].get("cold"), by_hosts[n].get("warm")
        build = cold["roles_seconds"].get("vllm_build", 0.0) if cold else 0.0
        mb = "{:.0f}".format
        # Records from before the fleet cache have no byte counts; a fleet of one host has no cache.
        counted = n > 1 and cold and warm and "cache_files_bytes" in cold
        files = mb(cold["cache_files_bytes"] / 1e6) if counted else "-"
        served = (
            f"{mb(cold['cache_served_bytes'] / 1e6)} / {mb(warm['cache_served_bytes'] / 1e6)}"
            if counted
            else "-"
        )
        run = cold or warm
        rows.append(
            f"| {n} | {cold['seconds'] if cold else '-'} | {build:.0f} | "
            f"{warm['seconds'] if warm else '-'} | "
            f"{sum(warm['changed'].values()) if warm else '-'} | "
            f"{f'{(n - 1) * build:.0f}' if cold else '-'} | {files} | {served} |"
            f" {run['date']}, {run['commit']} |"
        )
    machines = sorted(
        {
            f"{h.get('cpu')} ({isa(h)}), {h.get('cores')} cores, {h.get('memory_gib')} GiB"
            for h in (r.get("host", {}) for r in records)
        }
    )
    return "\n".join(
        [
            "# Provisioning benchmark",
            "",
            "The newest run of each fleet size (`provision.jsonl` keeps them all). Controller and",
            f"hosts on one machine: {'; '.join(machines)}.",
            "",
            *rows,
            "",
            "cold = `molecule converge` (site.yml on fresh systemd containers), warm =",
            "`molecule idempotence` (the same playbook again, changed=0 required). vllm_build =",
            "profile_roles' time of the build role, which runs once per fleet; the sixth column is",
            "computed, not measured: (hosts - 1) x vllm_build, the build work that building on",
            "every host would repeat. The seventh and eighth: what the fleet cache (vllm-1) holds",
            "of the controller's files (sent once), and what its nginx served the other hosts (its",
            "access log's bytes of answers 200), in the cold run and in the warm re-run.",
            "",
            f"Command of the newest run: `{command}`",
            "(`make bench-provision` runs 1, 3 and 5 hosts).",
            "",
        ]
    )


def git_commit() -> str:
    run = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
    )
    return run.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[1, 3, 5], choices=[1, 3, 5])
    ap.add_argument("--out", type=Path, default=RESULTS / "provision.jsonl")
    args = ap.parse_args()

    logs = PROJECT / ".cache" / "bench" / "provision-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_roles,ansible.posix.timer",
        ANSIBLE_NOCOLOR="1",
        NO_COLOR="1",
        PY_COLORS="0",
    )
    # The benchmark's scenarios are not in molecule/ (make test runs every scenario there).
    env.setdefault("MOLECULE_GLOB", "benchmarks/molecule/*/molecule.yml")
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []
    )
    host = {
        "cpu": next(
            (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
            platform.processor(),
        ),
        # The instruction sets that decide vLLM's CPU kernels, recorded with every result.
        "isa": [
            f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags
        ],
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.hosts:
        scenario = f"provision-{n}"
        print(f"== {n} fresh host(s): scenario {scenario}", flush=True)
        try:
            molecule("destroy", scenario, logs / f"{scenario}-destroy0.log", env)
            molecule("create", scenario, logs / f"{scenario}-create.log", env)
            molecule("prepare", scenario, logs / f"{scenario}-prepare.log", env)
            records = []
            served_before = 0
            for phase, action in (("cold", "converge"), ("warm", "idempotence")):
                log = logs / f"{scenario}-{phase}.log"
                seconds = molecule(action, scenario, log, env)
                changed = changed_counts(log)
                if not changed or (phase == "cold" and "vllm_build" not in role_seconds(log)):
                    sys.exit(f"no PLAY RECAP or no profile_roles recap with vllm_build in {log}")
                record = {
                    "benchmark": "provision",
                    "date": stamp,
                    "commit": git_commit(),
                    "host": host,
                    "hosts": n,
                    "phase": phase,
                    "seconds": round(seconds, 1),
                    "roles_seconds": role_seconds(log),
                    "changed": changed,
                }
                served, held = cache_bytes()
                record["cache_served_bytes"] = served - served_before
                record["cache_files_bytes"] = held
                served_before = served
                if phase == "warm" and any(changed.values()):
                    sys.exit(f"the warm re-run changed something: {changed} (log {log})")
                records.append(record)
                print(
                    f"   {phase}: {seconds:.0f} s, changed {sum(changed.values())}, "
                    f"build {record['roles_seconds'].get('vllm_build', 0):.0f} s",
                    flush=True,
                )
            with args.out.open("a") as out:
                for record in records:
                    out.write(json.dumps(record) + "\n")
        finally:
            molecule("destroy", scenario, logs / f"{scenario}-destroy.log", env)
    everything = read_jsonl(args.out)
    table = summary(
        newest(everything), " ".join(["python", "benchmarks/provision.py", *sys.argv[1:]])
    )
    args.out.with_suffix(".md").write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
