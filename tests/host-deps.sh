#!/usr/bin/env bash
# Debian packages the test machine needs (Docker engine, rootfs builder, git-lfs, shellcheck).
# Installs only what is missing, so it is quick on a prepared machine.
set -euo pipefail
packages=(docker.io mmdebstrap git git-lfs shellcheck curl chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "host-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
git lfs install --skip-repo >/dev/null
