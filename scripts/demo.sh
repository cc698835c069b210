#!/usr/bin/env bash
# The demo command: set the machine up (idempotent), then run the XOR-mirror
# demo (inside user-mode Linux when this kernel has no NBD driver).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
bash "$repo_root/scripts/setup.sh"
python="$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')"
exec "$python" "$repo_root/scripts/demo.py" "$@"
