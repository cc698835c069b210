#!/usr/bin/env bash
# Idempotent set-up of a Debian bookworm machine (run as root) for blockfs's
# tests: system packages (user-mode Linux with its NBD module, NBD clients and
# servers, image and file-system tools, gcc for the UML XSAVE shim), then the
# repository installed editable, with its test extras, for the host's Python.
# Does nothing that is already done: no apt-get update when no package is
# missing, no pip when blockfs (this checkout), pytest, hypothesis and attrs
# already import.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

packages=(
    user-mode-linux kmod e2fsprogs fio qemu-utils libnbd-bin nbd-client
    nbdkit nbdkit-plugin-python python3-libnbd util-linux gcc openssl
)
missing=()
for package in "${packages[@]}"; do
    status="$(dpkg -s "$package" 2>/dev/null || true)"
    if ! grep -qx 'Status: install ok installed' <<<"$status"; then
        missing+=("$package")
    fi
done
if ((${#missing[@]})); then
    echo "setup.sh: installing ${missing[*]}" >&2
    if ((EUID != 0)); then
        echo "setup.sh: must run as root to install packages" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Recommends are wanted: gcc's (libc6-dev) is what the shim compiles against.
    apt-get install -y -qq "${missing[@]}"
fi

# The real interpreter: `python3` on PATH may be a wrapper (pyenv shim), and
# the tests run this interpreter inside UML guests where wrappers do not work.
python="$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')"

# Run from / so the checkout is not importable merely because it is the cwd.
if (cd / && "$python" - "$repo_root" <<'PY'
import os, sys
import attrs, blockfs, hypothesis, pytest
here = os.path.realpath(os.path.join(sys.argv[1], "blockfs"))
sys.exit(0 if [os.path.realpath(p) for p in blockfs.__path__] == [here] else 1)
PY
) >/dev/null 2>&1; then
    :
else
    echo "setup.sh: pip install -e '$repo_root[test]'" >&2
    "$python" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e "$repo_root[test]"
fi
