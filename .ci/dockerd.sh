#!/usr/bin/env bash
# Run Debian's dockerd (docker.io 20.10) in the background on a host without
# systemd, for Molecule's docker driver, and prepare the cgroup folder that
# systemd-in-container test hosts mount as their /sys/fs/cgroup.
#
# Usage: .ci/dockerd.sh start|stop|status|env
#   start   start dockerd (no-op when ours already answers), wait for `docker info`
#   stop    stop dockerd by the pid in its pidfile (never by name), wait for exit,
#           then unmount the cgroup folder
#   status  exit 0 when our dockerd answers
#   env     print the shell exports a client needs: eval "$(.ci/dockerd.sh env)"
#
# Environment (all optional):
#   VLLM_FLEET_CI_STATE   state dir, holds --data-root and the log
#                         (default /var/lib/vllm-fleet-ci)
#   VLLM_FLEET_CI_RUN     runtime dir, holds --exec-root and --pidfile
#                         (default /run/vllm-fleet-ci)
#   VLLM_FLEET_CGROUP_DIR cgroup folder for the containers
#                         (default /run/vllm-fleet-cgroup)
#   DOCKERD_START_TIMEOUT seconds to wait for `docker info` (default 60)
#   DOCKERD_STOP_TIMEOUT  seconds to wait for dockerd to exit (default 60)
#   DOCKER_SOCKET         API socket (default /var/run/docker.sock, the clients' default)
#   DOCKERD_EXTRA_ARGS    more dockerd arguments, word-split (default none); e.g. a
#                         second, isolated daemon for testing this script:
#                         "--bridge=none --iptables=false" with its own dirs and socket
#
# cgroups: this host has a cgroup v1 hybrid layout. Bind-mounting the host's
# /sys/fs/cgroup into a systemd container makes the container's systemd remount
# the host's tmpfs read-only. So `start` mounts a private tmpfs at
# $VLLM_FLEET_CGROUP_DIR and binds each host cgroup hierarchy into it; a
# container mounts that folder as /sys/fs/cgroup:rw (with --cgroupns=host and
# --cap-add SYS_ADMIN; --privileged fails here). On a pure cgroup v2 host the
# folder is a bind of /sys/fs/cgroup itself (not exercised here).
#
# Client/daemon API versions: the docker client first on PATH may be newer than
# the daemon (here /usr/local/bin/docker 28.x against dockerd 20.10, API 1.41).
# The 28.x client negotiates down to the daemon's API version by itself, but
# `env` also pins DOCKER_API_VERSION to the daemon's version so that every client
# (CLI of any version, Python docker SDK, community.docker) agrees without
# negotiation. It is read from the daemon's socket with curl, not guessed.
set -euo pipefail

STATE_DIR=${VLLM_FLEET_CI_STATE:-/var/lib/vllm-fleet-ci}
RUN_DIR=${VLLM_FLEET_CI_RUN:-/run/vllm-fleet-ci}
CGROUP_DIR=${VLLM_FLEET_CGROUP_DIR:-/run/vllm-fleet-cgroup}
START_TIMEOUT=${DOCKERD_START_TIMEOUT:-60}
STOP_TIMEOUT=${DOCKERD_STOP_TIMEOUT:-60}

DATA_ROOT="$STATE_DIR/docker"
LOG_FILE="$STATE_DIR/dockerd.log"
EXEC_ROOT="$RUN_DIR/exec"
PID_FILE="$RUN_DIR/dockerd.pid"
SOCKET=${DOCKER_SOCKET:-/var/run/docker.sock}
read -r -a EXTRA_ARGS <<<"${DOCKERD_EXTRA_ARGS:-}"
DOCKER_HOST_URL="unix://$SOCKET"

log() { printf 'dockerd.sh: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Pid from our pidfile when that process is alive and is a dockerd; else empty.
our_pid() {
  local pid
  [[ -s "$PID_FILE" ]] || return 0
  pid=$(<"$PID_FILE")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  [[ -d "/proc/$pid" ]] || return 0
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]] || return 0
  printf '%s\n' "$pid"
}

# API version of the daemon on our socket, e.g. 1.41 (empty when it does not answer).
daemon_api_version() {
  curl -fsS --max-time 5 --unix-socket "$SOCKET" http://localhost/version 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["ApiVersion"])' 2>/dev/null || true
}

docker_answers() {
  DOCKER_HOST="$DOCKER_HOST_URL" docker info >/dev/null 2>&1
}

prepare_cgroup_dir() {
  local fstype src name
  mkdir -p "$CGROUP_DIR"
  fstype=$(findmnt -no FSTYPE /sys/fs/cgroup)
  if [[ "$fstype" == cgroup2 ]]; then
    # Pure cgroup v2 host: no tmpfs to protect, bind the unified hierarchy.
    mountpoint -q "$CGROUP_DIR" || mount --bind /sys/fs/cgroup "$CGROUP_DIR"
    return 0
  fi
  [[ "$fstype" == tmpfs ]] || die "unexpected /sys/fs/cgroup type '$fstype'"
  if ! mountpoint -q "$CGROUP_DIR"; then
    mount -t tmpfs -o mode=0755,nosuid,nodev,noexec,size=64k vllm-fleet-cgroup "$CGROUP_DIR"
    mount --make-private "$CGROUP_DIR"
  fi
  # Every cgroup / cgroup2 hierarchy mounted directly below /sys/fs/cgroup.
  while read -r src; do
    name=${src#/sys/fs/cgroup/}
    mkdir -p "$CGROUP_DIR/$name"
    mountpoint -q "$CGROUP_DIR/$name" || mount --bind "$src" "$CGROUP_DIR/$name"
  done < <(findmnt -rn -t cgroup,cgroup2 -o TARGET | grep -E '^/sys/fs/cgroup/[^/]+$')
  # Symlinks such as cpu -> cpu,cpuacct on hosts that co-mount controllers.
  while read -r src; do
    name=${src##*/}
    [[ -e "$CGROUP_DIR/$name" || -L "$CGROUP_DIR/$name" ]] \
      || ln -s "$(readlink "$src")" "$CGROUP_DIR/$name"
  done < <(find /sys/fs/cgroup -mindepth 1 -maxdepth 1 -type l)
}

release_cgroup_dir() {
  if mountpoint -q "$CGROUP_DIR"; then
    umount -R "$CGROUP_DIR"
  fi
}

start() {
  local pid waited=0
  command -v dockerd >/dev/null || die "dockerd not found (apt-get install docker.io)"
  command -v docker >/dev/null || die "docker client not found"
  prepare_cgroup_dir
  pid=$(our_pid)
  if [[ -n "$pid" ]] && docker_answers; then
    log "already running (pid $pid)"
    return 0
  fi
  if [[ -z "$pid" && -S "$SOCKET" ]] && docker_answers; then
    die "another docker daemon already answers on $SOCKET (not ours; no pidfile $PID_FILE)"
  fi
  if [[ -z "$pid" ]]; then
    rm -f "$PID_FILE"
    mkdir -p "$DATA_ROOT" "$EXEC_ROOT" "$RUN_DIR"
    log "starting dockerd (data-root $DATA_ROOT, log $LOG_FILE)"
    # setsid: own session, so the daemon outlives the shell that started it.
    setsid dockerd \
      --data-root "$DATA_ROOT" \
      --exec-root "$EXEC_ROOT" \
      --pidfile "$PID_FILE" \
      --host "$DOCKER_HOST_URL" \
      "${EXTRA_ARGS[@]}" \
      </dev/null >>"$LOG_FILE" 2>&1 &
  else
    log "dockerd pid $pid is up but does not answer yet; waiting"
  fi
  until docker_answers; do
    if (( waited >= START_TIMEOUT )); then
      tail -n 30 "$LOG_FILE" >&2 || true
      die "dockerd did not answer within ${START_TIMEOUT}s (log: $LOG_FILE)"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  log "dockerd ready after ${waited}s (pid $(our_pid), API $(daemon_api_version))"
}

stop() {
  local pid waited=0
  pid=$(our_pid)
  if [[ -z "$pid" ]]; then
    log "not running (no live dockerd in $PID_FILE)"
  else
    log "stopping dockerd pid $pid"
    kill -TERM "$pid"
    while [[ -d "/proc/$pid" ]]; do
      if (( waited >= STOP_TIMEOUT )); then
        log "dockerd pid $pid still alive after ${STOP_TIMEOUT}s; sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 1
        break
      fi
      sleep 1
      waited=$((waited + 1))
    done
    log "dockerd stopped after ${waited}s"
  fi
  rm -f "$PID_FILE"
  release_cgroup_dir
}

print_env() {
  local api
  printf 'export DOCKER_HOST=%q\n' "$DOCKER_HOST_URL"
  api=$(daemon_api_version)
  if [[ -n "$api" ]]; then
    printf 'export DOCKER_API_VERSION=%q\n' "$api"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) [[ -n "$(our_pid)" ]] && docker_answers ;;
  env) print_env ;;
  *) printf 'usage: %s start|stop|status|env\n' "$0" >&2; exit 2 ;;
esac
