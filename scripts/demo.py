"""The blockfs demo: the XOR mirror example as a real disk.

    bash scripts/demo.sh          (sets the machine up, then runs this)

Attaches examples/xor_mirror.py to /dev/nbd0, makes and mounts ext4, copies
files in, destroys one of the three backing files while mounted, reads
everything back and says what happened. Runs on this host when it has an
NBD driver and root; otherwise inside user-mode Linux (a kernel as a process).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV = "/dev/nbd0"


def say(line: str) -> None:
    print(line, flush=True)


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def quiet(*argv: str) -> None:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"demo: {' '.join(argv)} failed:\n{proc.stdout.decode(errors='replace')}")


def demo_here() -> int:
    sys.path.insert(0, str(ROOT))
    from blockfs.testing.guest import drop_caches, start_server, stop_server

    work = Path(tempfile.mkdtemp(prefix="blockfs-demo-"))
    mirror, mnt, src = work / "mirror", work / "mnt", ROOT / "blockfs"
    mnt.mkdir()
    server = start_server([str(ROOT / "examples" / "xor_mirror.py"), str(mirror), "64M", DEV], DEV)
    mounted = False
    try:
        say(f"  attached a 64 MiB XOR mirror to {DEV}: data striped over {mirror}/data0 and data1, parity in parity")
        quiet("mkfs.ext4", "-q", "-F", DEV)
        quiet("mount", DEV, str(mnt))
        mounted = True
        shutil.copytree(src, mnt / "blockfs", ignore=shutil.ignore_patterns("__pycache__"))
        want = digest(mnt / "blockfs")
        size = sum((mnt / "blockfs" / f).stat().st_size for f in want)
        say(f"  made ext4, mounted it at {mnt}, copied in {len(want)} files ({size / 1024:.0f} KiB: blockfs's own source)")
        os.sync()
        victim = random.choice(["data0", "data1", "parity"])
        (mirror / victim).unlink()
        say(f"  destroyed backing file {victim} (deleted it) while the file system was mounted")
        drop_caches()  # make every read below go to the device, not the page cache
        got = digest(mnt / "blockfs")
        same = sum(got.get(k) == v for k, v in want.items())
        rebuilt = {"data0": "data1 XOR parity", "data1": "data0 XOR parity", "parity": "data0 and data1"}[victim]
        say(f"  read back {same} of {len(want)} files: {'all identical' if same == len(want) else 'MISMATCH'} "
            f"(the lost half rebuilt from {rebuilt})")
        quiet("umount", str(mnt))
        mounted = False
        status, out = stop_server(server)
        say(f"  unmounted; the device server stopped cleanly (exit status {status})")
        return 0 if same == len(want) and status == 0 else 1
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        if server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if "--here" in sys.argv:
        return demo_here()
    say("blockfs demo: a block device written in Python (examples/xor_mirror.py), used as a real disk")
    if os.path.exists(DEV) and os.geteuid() == 0:
        say(f"  this kernel has an NBD driver: running on the host ({DEV})")
        return demo_here()
    sys.path.insert(0, str(ROOT))
    from blockfs.testing.uml import run_python_in_guest, uml_unavailable_reason

    reason = uml_unavailable_reason()
    if reason is not None:
        say(f"  this kernel has no NBD driver, and user-mode Linux is not usable: {reason}")
        return 1
    say("  this kernel has no NBD driver: booting user-mode Linux (a 6.1 kernel as a process) with nbd.ko")
    result = run_python_in_guest(script=Path(__file__), args=["--here"], mem="512M", timeout=300)
    sys.stdout.write(result.output)
    say("demo: " + ("done" if result.returncode == 0 else f"FAILED (status {result.returncode})"))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
