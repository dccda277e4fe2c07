#!/usr/bin/env bash
# Runs Molecule scenarios on systemd containers. Starts Docker when none answers and stops that
# Docker again (by its pid, see .ci/dockerd.sh) on exit, also on failure. Builds the test image
# and the test fixtures first (both are cached and rebuilt only when missing).
# Usage: tests/molecule.sh [--all | -s SCENARIO] [molecule test options]
#        tests/molecule.sh --exec COMMAND...   (run COMMAND with that Docker, e.g. a benchmark)
# The provisioning benchmark's scenarios live in benchmarks/molecule/ (MOLECULE_GLOB, set by
# `make bench-provision`), so --all runs the test scenarios of molecule/ only.
set -euo pipefail
cd "$(dirname "$0")/.."

started_docker=0
side=()
side_pids=()
cleanup() {
  local rc=$?
  # Scenarios still running beside the default one (an interrupted run): each runs in a session of
  # its own (setsid), so its process group (molecule, ansible-playbook, pytest) is stopped by that
  # pid, and its containers go with it.
  if ((${#side_pids[@]})); then
    kill -TERM "${side_pids[@]/#/-}" 2>/dev/null || true
    wait "${side_pids[@]}" 2>/dev/null || true
    for scenario in "${side[@]}"; do molecule destroy -s "$scenario" >/dev/null 2>&1 || true; done
  fi
  if ((started_docker)); then
    # Containers of an aborted run go first, then the daemon.
    molecule destroy --all >/dev/null 2>&1 || true
    .ci/dockerd.sh stop || true
  fi
  exit "$rc"
}
trap cleanup EXIT
# (a click program such as molecule exits 1 on Ctrl-C; the script stops rather than carry on)
trap 'exit 130' INT
trap 'exit 143' TERM

if ! .ci/dockerd.sh status >/dev/null 2>&1; then
  .ci/dockerd.sh start
  started_docker=1
fi
eval "$(.ci/dockerd.sh env)"
# Plain logs when nobody watches a terminal (CI): no colour codes, no box drawing.
if [[ ! -t 1 ]]; then
  export NO_COLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1
fi

bash tests/image/build-image.sh
bash tests/fixtures/build.sh

if [[ "${1:-}" == --exec ]]; then
  shift
  "$@"
  exit
fi
args=("$@")
((${#args[@]})) || args=(--all)
if [[ "${args[*]}" != --all ]]; then
  time molecule test "${args[@]}"
  exit
fi

# --all alone (make test): every scenario, side by side. The default one (by far the longest) runs in
# the foreground, the others in the background with their output in .cache/molecule/<scenario>.log,
# printed once all have ended. Measured once (conda the only other scenario then) on a 2-core Intel host: the conda scenario and the
# default one's create, prepare and converge took 943 s side by side against ~1135 s one after the
# other (~3 min saved; the cores were busy most of the time, so most of conda's time still adds up).
# Their containers, networks, ephemeral folders and controller archives are their own; a scenario
# that shared a controller archive (pip_wheelhouse publishes it by renaming) would race.
# With more options (--all --destroy=never, ...) molecule runs the scenarios one after the other.
mkdir -p .cache/molecule
for scenario in molecule/*/molecule.yml; do
  scenario=$(basename "$(dirname "$scenario")")
  [[ $scenario == default ]] && continue
  setsid --wait molecule test -s "$scenario" >".cache/molecule/$scenario.log" 2>&1 &
  side+=("$scenario")
  side_pids+=("$!")
done
rc=0
time molecule test -s default || rc=$?
for i in "${!side[@]}"; do
  side_rc=0
  wait "${side_pids[$i]}" || side_rc=$?
  echo "===== scenario ${side[$i]} (run beside the default one): exit code $side_rc ====="
  cat ".cache/molecule/${side[$i]}.log"
  ((side_rc == 0)) || rc=$side_rc
done
side_pids=()
exit "$rc"
