"""What every guest scenario file shares: paths and the check that reports."""

from __future__ import annotations

import os
from pathlib import Path

from blockfs.testing.guest import GuestFailure

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DEV = "/dev/nbd0"
TMP = Path(os.environ.get("TMPDIR", "/run/tmp"))
MNT = TMP / "mnt"


def check(cond: object, message: str) -> None:
    """Fail the scenario with `message`, or print it as a passed check."""
    if not cond:
        raise GuestFailure(message)
    print(f"ok: {message}", flush=True)
