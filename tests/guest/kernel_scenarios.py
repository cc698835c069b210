"""Kernel scenarios, run inside a UML guest by tests/test_kernel.py:
    python tests/guest/kernel_scenarios.py NAME
Each prints what it did and exits 0 only if every check held. Guest work is
batched into this one process (every fork+exec costs ~0.15 s in UML)."""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import DEV, EXAMPLES, MNT, TMP, check

import blockfs
from blockfs.testing.devices import FaultyDisk, RecordingDisk
from blockfs.testing.guest import (
    GuestFailure,
    drop_caches,
    is_live,
    sh,
    start_server,
    stop_server,
    tree_digest,
    wait_down,
    write_tree,
)

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(levelname)s: %(message)s")


def ext4_round_trip(dev: str, files: int = 40) -> None:
    """mkfs, mount, write a tree, umount, fsck clean, mount again, compare."""
    MNT.mkdir(parents=True, exist_ok=True)
    sh("mkfs.ext4", "-q", "-F", dev)
    sh("mount", dev, str(MNT))
    src = TMP / "src"
    write_tree(str(src), files=files)
    want = tree_digest(str(src))
    shutil.copytree(src, MNT / "tree")
    sh("umount", str(MNT))
    sh("e2fsck", "-fn", dev)
    sh("mount", dev, str(MNT))
    drop_caches()
    got = tree_digest(str(MNT / "tree"))
    check(got == want, f"all {len(want)} files read back identical after remount")
    sh("umount", str(MNT))


def aligned_buffer(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # page aligned, as O_DIRECT needs


# --- scenarios ------------------------------------------------------------------------
def scenario_ext4() -> None:
    """The sparse-file example under ext4, ended by SIGTERM with status 0."""
    image = TMP / "disk.img"
    proc = start_server([str(EXAMPLES / "sparse_file.py"), str(image), "96M", DEV], DEV)
    ext4_round_trip(DEV)
    used = image.stat().st_blocks * 512
    sh("blkdiscard", DEV)  # trim the whole device: the example punches holes
    freed = used - image.stat().st_blocks * 512
    check(used > 4 << 20 and image.stat().st_blocks * 512 < used // 10,
          f"blkdiscard punched holes in the backing file ({used >> 20} MiB -> {(used - freed) >> 20} MiB allocated)")
    status, out = stop_server(proc)
    print(out)
    check(status == 0, f"server exited 0 after SIGTERM (got {status})")
    wait_down(DEV)
    check(image.stat().st_size == 96 << 20, "backing file keeps its size")
    check(image.stat().st_blocks * 512 < 96 << 20, "backing file is sparse")


def scenario_fio_verify() -> None:
    """fio random writes over the whole ramdisk example with crc32c verify."""
    proc = start_server([str(EXAMPLES / "ramdisk.py"), DEV], DEV)
    out = sh(
        "fio", "--name=verify", f"--filename={DEV}", "--rw=randwrite", "--bs=4k", "--direct=1",
        "--ioengine=libaio", "--iodepth=16", "--size=100%", "--verify=crc32c", "--verify_fatal=1",
        "--do_verify=1", "--verify_state_save=0", "--output-format=json",
    )
    result = json.loads(out[out.index("{"):])
    job = result["jobs"][0]
    check(job["error"] == 0, "fio reports no error (verify errors are fatal)")
    check(job["write"]["io_bytes"] >= 64 << 20, f"fio wrote the whole device ({job['write']['io_bytes']} bytes)")
    check(job["read"]["io_bytes"] >= 64 << 20, f"fio read everything back to verify ({job['read']['io_bytes']} bytes)")
    status, _ = stop_server(proc)
    check(status == 0, "server exited 0")


@blockfs.device(block_size=4096)
class ImageReader:
    """A read-only device: only a read handler."""

    def __init__(self, path: str) -> None:
        self.data = Path(path).read_bytes()
        self.blocks = len(self.data) // 4096

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]


def scenario_read_only() -> None:
    src = TMP / "ro-src"
    write_tree(str(src), files=10, seed=7)
    image = TMP / "ro.img"
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(src), str(image), "16M")
    mounted = threading.Event()
    errors: list[BaseException] = []

    def on_mount(m: blockfs.Mount) -> None:
        try:
            check(sh("blockdev", "--getro", DEV).strip() == "1", "the kernel sees a read-only device")
            fd = os.open(DEV, os.O_RDONLY)
            os.close(fd)
            try:
                fd = os.open(DEV, os.O_WRONLY)
                try:
                    os.write(fd, b"x" * 4096)
                    os.fsync(fd)
                    raise GuestFailure("a write to the read-only device succeeded")
                finally:
                    os.close(fd)
            except OSError as exc:
                check(exc.errno in (errno.EROFS, errno.EPERM, errno.EIO, errno.EACCES), f"writing fails: {exc}")
            MNT.mkdir(parents=True, exist_ok=True)
            sh("mount", "-o", "ro", DEV, str(MNT))
            check(tree_digest(str(MNT)) == tree_digest(str(src)), "mount -o ro shows every file intact")
            sh("umount", str(MNT))
            mounted.set()
        except BaseException as exc:
            errors.append(exc)
        finally:
            m.unmount()

    blockfs.run(ImageReader(str(image)), DEV, on_mount=on_mount)
    if errors:
        raise errors[0]
    check(mounted.is_set(), "on_mount ran to the end")


BAD = 100


def BadBlockDisk() -> FaultyDisk:
    disk = FaultyDisk(4096 * 1024, bad={BAD})
    disk.data[:] = random.Random(3).randbytes(len(disk.data))
    return disk


def scenario_bad_block() -> None:
    disk = BadBlockDisk()
    result: list[str] = []

    def on_mount(m: blockfs.Mount) -> None:
        try:
            fd = os.open(DEV, os.O_RDONLY | os.O_DIRECT)
            buf = aligned_buffer(4096)
            try:
                os.preadv(fd, [buf], BAD * 4096)
                result.append("bad block read succeeded")
            except OSError as exc:
                print(f"reading block {BAD}: {exc}")
                if exc.errno != errno.EIO:
                    result.append(f"wrong errno {exc.errno}")
            for block in range(1024):
                if block == BAD:
                    continue
                n = os.preadv(fd, [buf], block * 4096)
                if n != 4096 or buf[:] != disk.data[block * 4096 : (block + 1) * 4096]:
                    result.append(f"block {block} wrong after the error")
                    break
            os.close(fd)
            print("every other block read back correctly")
        except BaseException as exc:
            result.append(repr(exc))
        finally:
            m.unmount()

    blockfs.run(disk, DEV, on_mount=on_mount)
    check(not result, f"no desync after a failed read: {result or 'all good'}")


def Recorder() -> RecordingDisk:
    return RecordingDisk(4096 * 4096)


def scenario_trim_flush() -> None:
    disk = Recorder()
    seen: dict[str, object] = {}

    def on_mount(m: blockfs.Mount) -> None:
        try:
            sh("blkdiscard", "-o", str(1 << 20), "-l", str(2 << 20), DEV)
            seen["trims"] = list(disk.trims)
            before = disk.flushes
            fd = os.open(DEV, os.O_RDWR)
            os.pwrite(fd, b"sync me" * 100, 8192)
            os.fsync(fd)
            os.close(fd)
            seen["flushes"] = disk.flushes - before
        finally:
            m.unmount()

    blockfs.run(disk, DEV, on_mount=on_mount)
    trimmed = sum(length for _, length in seen["trims"])  # type: ignore[union-attr]
    check(trimmed == 2 << 20 and min(o for o, _ in seen["trims"]) == 1 << 20,  # type: ignore[union-attr]
          f"blkdiscard reached the trim handler: {seen['trims']}")
    check(seen["flushes"] >= 1, f"fsync reached the flush handler ({seen['flushes']} flushes)")
    check(disk.data[8192 : 8192 + 7] == b"sync me", "the fsynced write is in the device")
    check(disk.unmounted == 1, "unmount handler called once")


def scenario_unmount_and_reuse() -> None:
    """unmount() from on_mount ends run() cleanly; the device is reusable at once,
    also after the server was killed with SIGKILL."""
    seen: list[str] = []

    def on_mount(m: blockfs.Mount) -> None:
        seen.append(m.path)
        m.set_timeout(45)  # NBD_SET_TIMEOUT on the live device
        m.unmount()

    for attempt in range(2):
        disk = Recorder()
        t0 = time.monotonic()
        blockfs.run(disk, DEV, on_mount=on_mount, timeout=30)
        check(disk.unmounted == 1, f"run {attempt + 1}: run() returned after unmount() in {time.monotonic() - t0:.2f} s")
        check(not is_live(DEV), "the device is down")
    check(seen == [DEV, DEV], f"on_mount got the path and set a timeout both times: {seen}")
    # An unclean exit: kill -9 the server, then attach again right away.
    proc = start_server([str(EXAMPLES / "ramdisk.py"), DEV], DEV)
    proc.kill()
    proc.wait()
    wait_down(DEV)
    disk = Recorder()
    blockfs.run(disk, DEV, on_mount=lambda m: m.unmount())
    check(disk.unmounted == 1, "after SIGKILL of a server the device attaches again")


def scenario_errors() -> None:
    """Clear errors: missing path, not an NBD device, busy, not permitted."""
    def expect(exc_type: type[BaseException], path: str, text: str) -> None:
        try:
            blockfs.run(Recorder(), path)
        except exc_type as exc:
            check(text in str(exc), f"{exc_type.__name__}: {exc}")
        else:
            raise GuestFailure(f"no {exc_type.__name__} for {path}")

    expect(blockfs.DeviceNotFoundError, "/dev/nbd99", "no such NBD device")
    expect(blockfs.NotAnNbdDeviceError, "/dev/null", "not an NBD block device")
    busy = threading.Event()

    def on_mount(m: blockfs.Mount) -> None:
        try:
            expect(blockfs.DeviceBusyError, DEV, "device is in use (served by pid")
            busy.set()
        finally:
            m.unmount()

    blockfs.run(Recorder(), DEV, on_mount=on_mount)
    check(busy.is_set(), "a second run() on a live device is refused")
    code = (
        "import os, blockfs, sys\n"
        "from blockfs.testing.devices import RecordingDisk\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n    blockfs.run(RecordingDisk(1 << 20), %r)\n"
        "except blockfs.DevicePermissionError as e:\n    print('refused:', e); sys.exit(0)\n"
        "sys.exit(1)\n"
    ) % (DEV,)
    out = sh(sys.executable, "-c", code)
    check("needs root" in out, "an unprivileged user is told that root is needed")


def scenario_sigterm_under_load() -> None:
    """SIGTERM during heavy I/O: exit 0, every fsynced write survives a restart,
    and the device is attached again right away."""
    image = TMP / "durable.img"
    server = start_server([str(EXAMPLES / "sparse_file.py"), str(image), "64M", DEV], DEV)
    # Heavy background I/O on one half of the device...
    load = subprocess.Popen(
        ["fio", "--name=load", f"--filename={DEV}", "--rw=randrw", "--bs=64k", "--direct=1",
         "--ioengine=libaio", "--iodepth=32", "--offset=32M", "--size=32M", "--time_based", "--runtime=60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # ...while this process writes records with fsync to the other half and
    # remembers each one that completed.
    rng = random.Random(11)
    acknowledged: dict[int, bytes] = {}
    fd = os.open(DEV, os.O_RDWR)
    deadline = time.monotonic() + 2.0
    signalled = False
    try:
        while True:
            block = rng.randrange(0, 8192)
            payload = rng.randbytes(4096)
            try:
                os.pwrite(fd, payload, block * 4096)
                os.fsync(fd)
            except OSError as exc:
                print(f"write after SIGTERM failed as expected: {exc}")
                break
            acknowledged[block] = payload
            if not signalled and time.monotonic() > deadline:
                server.send_signal(signal.SIGTERM)
                signalled = True
                print(f"SIGTERM sent after {len(acknowledged)} acknowledged writes")
            if signalled and not is_live(DEV):
                break
    finally:
        os.close(fd)
    load.kill()
    load.wait()
    status, out = stop_server(server, sig=signal.SIGTERM)
    print(out[-2000:])
    check(status == 0, f"server exited 0 after SIGTERM during I/O (got {status})")
    wait_down(DEV)
    # Restart on the same file, right away, and check every acknowledged write.
    server = start_server([str(EXAMPLES / "sparse_file.py"), str(image), "-", DEV], DEV)
    fd = os.open(DEV, os.O_RDONLY | os.O_DIRECT)
    buf = aligned_buffer(4096)
    lost = [b for b, data in acknowledged.items() if os.preadv(fd, [buf], b * 4096) != 4096 or buf[:] != data]
    os.close(fd)
    check(not lost, f"all {len(acknowledged)} fsynced writes read back after the restart (lost: {lost[:5]})")
    status, _ = stop_server(server)
    check(status == 0, "second server exited 0")


def scenario_xor_mirror() -> None:
    """The teaching example: lose one of three backing files while mounted."""
    directory = TMP / "mirror"
    proc = start_server([str(EXAMPLES / "xor_mirror.py"), str(directory), "48M", DEV], DEV)
    MNT.mkdir(parents=True, exist_ok=True)
    sh("mkfs.ext4", "-q", "-F", DEV)
    sh("mount", DEV, str(MNT))
    src = TMP / "src"
    write_tree(str(src), files=30, seed=5)
    shutil.copytree(src, MNT / "tree")
    os.sync()
    victim = directory / random.Random().choice(["data0", "data1", "parity"])
    victim.unlink()
    print(f"removed {victim.name} while mounted")
    drop_caches()
    check(tree_digest(str(MNT / "tree")) == tree_digest(str(src)), "every file reads back intact from two of three")
    (MNT / "after.txt").write_text("written while degraded\n")
    sh("umount", str(MNT))
    sh("e2fsck", "-fn", DEV)
    status, out = stop_server(proc)
    print(out)
    check(status == 0, "server exited 0")
    check("was removed" in out, "the mirror logged the lost file")


def fio_verify(dev: str, *, jobs: int = 1, depth: int = 16, size: str = "100%") -> None:
    out = sh(
        "fio", "--name=verify", f"--filename={dev}", "--rw=randwrite", "--bs=4k", "--direct=1",
        "--ioengine=libaio", f"--iodepth={depth}", f"--numjobs={jobs}", f"--size={size}",
        f"--offset_increment={size}",  # each job verifies its own region
        "--verify=crc32c",
        "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--group_reporting", "--output-format=json",
    )
    job = json.loads(out[out.index("{"):])["jobs"][0]
    check(job["error"] == 0, f"fio verify: no errors ({jobs} jobs, depth {depth})")
    check(job["read"]["io_bytes"] > 0 and job["read"]["io_bytes"] >= job["write"]["io_bytes"],
          f"fio verified everything it wrote ({job['write']['io_bytes']} bytes)")


def scenario_multi_queue() -> None:
    """Four sockets (kernel hardware queues) to one multi_conn device, from the CLI,
    and fio verify across all of them; then a thread-pool device under fio verify."""
    proc = start_server(["-m", "blockfs", "-v", "run", f"{EXAMPLES}/ramdisk.py:RamDisk", DEV, "--connections", "4"], DEV)
    # blk-mq makes at most one hardware queue per CPU, and this guest has one,
    # so the kernel sends through the first socket and keeps the rest for failover.
    queues = sorted(p.name for p in Path("/sys/block/nbd0/mq").iterdir())
    print(f"hardware queues: {queues} on {os.cpu_count()} CPU(s)")
    fio_verify(DEV, jobs=4, depth=32, size="16M")
    status, out = stop_server(proc, sig=signal.SIGINT)  # Ctrl-C, as a user at a terminal
    print(out)
    check(status == 0, "multi-queue server exited 0 after SIGINT")
    ended = [line for line in out.splitlines() if "serve loop ended (disconnect)" in line]
    check(len(ended) == 4, f"all 4 connections were attached and ended with a disconnect: {ended}")
    wait_down(DEV)
    # Concurrency on: the sparse-file example runs its handlers on a pool of 4.
    image = TMP / "pool.img"
    proc = start_server([str(EXAMPLES / "sparse_file.py"), str(image), "64M", DEV], DEV)
    fio_verify(DEV, jobs=2, depth=64, size="32M")
    status, _ = stop_server(proc)
    check(status == 0, "thread-pool server exited 0")


if __name__ == "__main__":
    name = sys.argv[1]
    globals()[f"scenario_{name}"]()
    print(f"scenario {name}: passed")
