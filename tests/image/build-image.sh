#!/usr/bin/env bash
# Build a systemd-capable Debian/Ubuntu root filesystem with mmdebstrap and
# `docker import` it as a test-host image for Molecule (no registry needed).
#
# Usage: tests/image/build-image.sh            (Debian 12, the default)
#        SUITE=noble MIRROR=http://archive.ubuntu.com/ubuntu \
#          TAG=vllm-fleet-test/ubuntu:24.04 tests/image/build-image.sh
#
# Environment:
#   SUITE           release codename                 (default bookworm)
#   MIRROR          archive URL, plain http           (default http://deb.debian.org/debian)
#   TAG             image tag                         (default vllm-fleet-test/debian:12)
#   COMPONENTS      archive components, comma/space separated
#                   (default "main" for Debian, "main,universe" for Ubuntu)
#   DISTRO          debian|ubuntu (default: guessed from MIRROR, then from SUITE)
#   SECURITY_MIRROR archive of the SUITE-security pocket
#                   (default MIRROR-security for Debian, MIRROR for Ubuntu; "none" skips it)
#   EXTRA_PACKAGES  more packages to include, comma/space separated (default none)
#   KEYRING         archive keyring file for mmdebstrap (default: mmdebstrap's own
#                   choice; on a Debian 12 host an Ubuntu build needs the keyring
#                   file from Ubuntu's ubuntu-keyring package)
#   MASK_UNITS      systemd units to mask in the image, space separated (default none)
#   FORCE=1         rebuild even if TAG already exists (the old image is removed)
#
# The image's apt sources use plain http, so a container can apt-get without
# trusting any extra CA. It has no /etc/machine-id content (systemd makes one at
# boot), no apt lists (run apt-get update / update_cache first; the empty lists
# folder is dated 1970 so cache_valid_time never skips that) and it boots
# /sbin/init with STOPSIGNAL SIGRTMIN+3. Needs root, mmdebstrap and a docker
# daemon (see .ci/dockerd.sh).
set -euo pipefail

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}
TAG=${TAG:-vllm-fleet-test/debian:12}
FORCE=${FORCE:-0}
EXTRA_PACKAGES=${EXTRA_PACKAGES:-}
KEYRING=${KEYRING:-}

if [[ -z "${DISTRO:-}" ]]; then
  case "$MIRROR" in
    *ubuntu*) DISTRO=ubuntu ;;
    *debian*) DISTRO=debian ;;
    *)
      case "$SUITE" in
        bionic|focal|jammy|noble|oracular|plucky|questing|resolute) DISTRO=ubuntu ;;
        *) DISTRO=debian ;;
      esac ;;
  esac
fi
case "$DISTRO" in
  debian)
    COMPONENTS=${COMPONENTS:-main}
    SECURITY_MIRROR=${SECURITY_MIRROR:-${MIRROR}-security} ;;
  ubuntu)
    COMPONENTS=${COMPONENTS:-main,universe}
    SECURITY_MIRROR=${SECURITY_MIRROR:-$MIRROR} ;;
  *) echo "build-image.sh: DISTRO must be debian or ubuntu, not '$DISTRO'" >&2; exit 2 ;;
esac
COMPONENTS=${COMPONENTS//,/ }

# What Ansible's apt/user/systemd/service modules and become need, and little
# else: python3-apt (apt module), sudo + acl (become_user), dbus (systemctl
# talking to PID 1), iproute2/procps (facts, ss/ps in tests), curl + gpg + CA
# bundle (fetching keys and files), passwd comes with minbase (user module).
PACKAGES="systemd,systemd-sysv,dbus,python3,python3-apt,ca-certificates,sudo,acl,curl,gpg,iproute2,procps"
if [[ -n "$EXTRA_PACKAGES" ]]; then
  PACKAGES="$PACKAGES,${EXTRA_PACKAGES// /,}"
fi

# Units to mask (space separated) when they cannot work in an unprivileged
# container. Measured here: Debian 12 reaches "running" with no unit masked and
# no failed unit (systemd skips gettys, udev and kernel mounts in a container by
# itself), so the default is none. Example: MASK_UNITS="console-getty.service".
MASK_UNITS=${MASK_UNITS:-}

log() { printf 'build-image.sh: %s\n' "$*" >&2; }

for tool in mmdebstrap docker; do
  command -v "$tool" >/dev/null || { log "ERROR: $tool not found"; exit 1; }
done

if [[ "$FORCE" != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "image $TAG exists; skipping build (FORCE=1 rebuilds)"
  exit 0
fi

old_image=$(docker image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
SECONDS=0
workdir=$(mktemp -d "${TMPDIR:-/tmp}/build-image.XXXXXX")
trap 'rm -rf "$workdir"' EXIT
rootfs_tar="$workdir/rootfs.tar"

# Final touches to the rootfs (mmdebstrap passes its path as $1).
cat >"$workdir/customize.sh" <<HOOK
#!/bin/sh
set -eu
root="\$1"
# Empty machine-id: systemd makes a fresh one at each container boot (no
# first-boot logic, no id shared by all containers of the image).
rm -f "\$root/var/lib/dbus/machine-id"
: > "\$root/etc/machine-id"
# No apt lists are shipped. Date the empty lists folder to 1970 so that
# Ansible's apt module with update_cache + cache_valid_time (which trusts that
# folder's mtime) really runs apt-get update on a fresh container.
# (mmdebstrap's own apt cleanup is skipped, done here instead: it runs after
# this hook and its apt calls would touch the folder again.)
find "\$root/var/lib/apt/lists" -mindepth 1 -maxdepth 1 -type f ! -name lock -delete
find "\$root/var/cache/apt" -type f \( -name '*.bin' -o -name '*.deb' \) -delete
rm -f "\$root/var/lib/apt/periodic/update-success-stamp"
touch -d @0 "\$root/var/lib/apt/lists"
if [ -n "$MASK_UNITS" ]; then chroot "\$root" systemctl mask $MASK_UNITS; fi
HOOK
chmod +x "$workdir/customize.sh"

sources=("deb $MIRROR $SUITE $COMPONENTS" "deb $MIRROR $SUITE-updates $COMPONENTS")
if [[ "$SECURITY_MIRROR" != none ]]; then
  sources+=("deb ${SECURITY_MIRROR%/} $SUITE-security $COMPONENTS")
fi

mm_args=(
  --variant=minbase
  --include="$PACKAGES"
  --components="${COMPONENTS// /,}"
  --format=tar
  # merged /usr via symlinks + usr-is-merged instead of the usrmerge package,
  # which pulls in perl (~45 MB); works for Debian 12 and Ubuntu 24.04.
  --hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr
  # No docs/man/locales beyond what is needed: smaller image, faster import.
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-include=/usr/share/locale/locale.alias'
  # Runs on the host after all packages are in, with the rootfs as $1.
  --customize-hook="$workdir/customize.sh"
  --skip=cleanup/apt
)
if [[ -n "$KEYRING" ]]; then
  mm_args+=(--keyring="$KEYRING")
elif [[ "$DISTRO" == ubuntu && ! -e /usr/share/keyrings/ubuntu-archive-keyring.gpg ]]; then
  log "ERROR: no /usr/share/keyrings/ubuntu-archive-keyring.gpg on this host: install" \
    "Ubuntu's ubuntu-keyring package or set KEYRING=/path/to/ubuntu-archive-keyring.gpg"
  exit 1
fi

log "mmdebstrap $DISTRO $SUITE ($COMPONENTS) -> $TAG; apt sources:"
printf '    %s\n' "${sources[@]}" >&2
mmdebstrap "${mm_args[@]}" "$SUITE" "$rootfs_tar" "${sources[@]}"
build_s=$SECONDS

# `docker import --change` on dockerd 20.10 refuses STOPSIGNAL ("stopsignal is
# not a valid change command"), so a one-line legacy build (no buildx plugin
# here, and the base image is local) adds it on top of the imported rootfs.
rootfs_id=$(docker import \
  --change 'CMD ["/sbin/init"]' \
  --change 'ENV container=docker' \
  --change 'ENV LANG=C.UTF-8' \
  --change "LABEL org.vllm-fleet.distro=$DISTRO org.vllm-fleet.suite=$SUITE" \
  --message "mmdebstrap $DISTRO $SUITE from $MIRROR" \
  "$rootfs_tar")
printf 'FROM %s\nSTOPSIGNAL SIGRTMIN+3\n' "$rootfs_id" \
  | DOCKER_BUILDKIT=0 docker build --quiet --tag "$TAG" - >/dev/null

# A rebuilt tag leaves the old image dangling: drop it (kept if a container uses it).
if [[ -n "$old_image" ]]; then
  docker image rm "$old_image" >/dev/null 2>&1 || true
fi

log "built $TAG: $(du -h "$rootfs_tar" | cut -f1) rootfs," \
  "mmdebstrap ${build_s}s + import $((SECONDS - build_s))s = ${SECONDS}s total"
