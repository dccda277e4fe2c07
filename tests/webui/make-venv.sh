#!/usr/bin/env bash
# Makes the Python the browser test runs the web UI with (VLLM_WEBUI_TEST_PYTHON): a virtual
# environment with the role's lock installed, as the role makes it on a host. Prints its interpreter.
# Usage: tests/webui/make-venv.sh [DIR]            (default: .cache/webui-venv)
# Environment: PYTHON (default python3), and WHEELHOUSE to install offline from a wheel folder, e.g.
#   the one pip_wheelhouse fills on the controller: ~/.cache/vllm-fleet/wheelhouse/vllm-webui-cp311-x86_64
# Rebuilt only when the lock changed; an interrupted build has no stamp and is redone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
project=$(cd "$here/../.." && pwd)
lock=$project/roles/vllm_webui/files/vllm-webui.txt
dir=${1:-$project/.cache/webui-venv}
stamp=$dir/.lock-sha256
want=$(sha256sum "$lock" | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  rm -rf "$dir"
  "${PYTHON:-python3}" -m venv "$dir"
  args=(--quiet --disable-pip-version-check --no-deps --requirement "$lock")
  if [[ -n ${WHEELHOUSE:-} ]]; then
    args+=(--no-index --find-links "$WHEELHOUSE")
  fi
  "$dir/bin/python" -m pip install "${args[@]}" >&2
  echo "$want" >"$stamp"
fi
echo "$dir/bin/python"
