"""The README's demo command works and tells its story."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from blockfs.testing.uml import uml_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.uml
@pytest.mark.skipif(uml_unavailable_reason() is not None, reason=f"user-mode Linux: {uml_unavailable_reason()}")
def test_demo_runs_the_xor_mirror_and_survives_a_lost_file() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "made ext4, mounted it" in out
    assert "destroyed backing file" in out
    assert "all identical" in out and "MISMATCH" not in out
    assert "stopped cleanly (exit status 0)" in out
    assert out.strip().endswith("demo: done")
