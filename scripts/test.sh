#!/usr/bin/env bash
# The project's test command: set the machine up (idempotent, see setup.sh),
# then run pytest from the repository root with any extra arguments, e.g.
#   scripts/test.sh -q tests/test_uml.py
# Exits with pytest's exit status.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
bash "$repo_root/scripts/setup.sh"

cd "$repo_root"
python="$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')"
exec "$python" -m pytest "$@"
