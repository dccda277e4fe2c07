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
cleanup() {
  local rc=$?
  if ((started_docker)); then
    # Containers of an aborted run go first, then the daemon.
    molecule destroy --all >/dev/null 2>&1 || true
    .ci/dockerd.sh stop || true
  fi
  exit "$rc"
}
trap cleanup EXIT

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
time molecule test "${args[@]}"
