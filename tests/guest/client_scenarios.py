"""Client scenarios, run inside a UML guest by tests/test_clients.py:
    python tests/guest/client_scenarios.py NAME
The kernel reaches blockfs through the *network* path: `blockfs serve` listens
on a Unix socket and nbd-client (not blockfs) hands a connected socket to the
kernel's NBD driver. Each scenario prints what it did and exits 0 only if
every check held. Guest work is batched into this one process (every
fork+exec costs ~0.15 s in UML)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from common import DEV, EXAMPLES, MNT, TMP, check

from blockfs.testing.guest import (
    terminate,
    GuestFailure,
    drop_caches,
    is_live,
    sh,
    tree_digest,
    wait_down,
    wait_live,
    write_tree,
)

SOCK = TMP / "blockfs.sock"
EXPORT = "disk"


def start_blockfs(image: Path, size: str, *where: str) -> tuple[subprocess.Popen[bytes], str]:
    """`blockfs serve` the sparse-file example (on SOCK unless `where` says
    otherwise); returns it and the URI it printed."""
    argv = [sys.executable, "-m", "blockfs", "-v", "serve", f"{EXAMPLES / 'sparse_file.py'}:SparseFile",
            "--arg", f"path={image}", "--arg", f"size={size}", *(where or ("--socket", str(SOCK))),
            "--export-name", EXPORT, "--description", "ext4 over nbd-client"]
    print(f"$ {' '.join(argv)} &", flush=True)
    log = open(TMP / "server.log", "w+b")  # noqa: SIM115 - closed in stop_blockfs
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
    proc.log = log  # type: ignore[attr-defined]
    assert proc.stdout is not None
    uri = proc.stdout.readline().decode().strip()  # printed once listening
    check(uri.startswith("nbd") and uri.endswith((f"/{EXPORT}?socket={SOCK}", f"/{EXPORT}")),
          f"blockfs serve is listening: {uri}")
    return proc, uri


def server_log(proc: subprocess.Popen[bytes]) -> str:
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    return str(log.read().decode(errors="replace"))


def stop_blockfs(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        status = terminate(proc)
    except GuestFailure as exc:
        raise GuestFailure(f"{exc}:\n{server_log(proc)}") from None
    assert proc.stdout is not None
    proc.stdout.close()
    text = server_log(proc)
    proc.log.close()  # type: ignore[attr-defined]
    return status, text


@contextlib.contextmanager
def cleanup_on_failure(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """On any failure: detach the device, kill the server, show its log."""
    try:
        yield
    except BaseException:
        if is_live(DEV):
            subprocess.run(["nbd-client", "-d", DEV], check=False)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        print(server_log(proc))
        raise


def nbd_client_connect() -> None:
    sh("nbd-client", "-unix", str(SOCK), DEV, "-N", EXPORT, "-b", "4096", "-t", "30")
    wait_live(DEV)


def nbd_client_disconnect() -> None:
    sh("nbd-client", "-d", DEV)
    wait_down(DEV)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def scenario_nbd_client_ext4() -> None:
    """nbd-client -> kernel -> blockfs serve (Unix socket) -> sparse-file example:
    ext4 round trip, fsck clean, reconnect and compare, disconnect, SIGTERM -> 0."""
    image = TMP / "disk.img"
    proc, _ = start_blockfs(image, "96M")
    with cleanup_on_failure(proc):
        nbd_client_connect()
        size = int(Path(f"/sys/block/{Path(DEV).name}/size").read_text()) * 512
        check(size == 96 << 20, f"the kernel sees the export's size ({size} bytes)")
        bs = int(Path(f"/sys/block/{Path(DEV).name}/queue/logical_block_size").read_text())
        check(bs == 4096, f"logical block size {bs}")

        MNT.mkdir(parents=True, exist_ok=True)
        sh("mkfs.ext4", "-q", "-F", DEV)
        sh("mount", DEV, str(MNT))
        src = TMP / "src"
        write_tree(str(src), files=40, seed=21)
        want = tree_digest(str(src))
        shutil.copytree(src, MNT / "tree")
        sh("umount", str(MNT))
        sh("e2fsck", "-fn", DEV)  # raises unless it exits 0: no errors found
        print("ok: e2fsck -fn found the file system clean", flush=True)
        sh("mount", DEV, str(MNT))
        drop_caches()
        got = tree_digest(str(MNT / "tree"))
        check(got == want, f"all {len(want)} files read back identical after remount")
        (MNT / "marker").write_bytes(b"written before disconnect\n" * 1000)
        sh("umount", str(MNT))
        nbd_client_disconnect()
        check(proc.poll() is None, "blockfs serve still running after nbd-client -d")

        # A second connection to the same, still running server sees it all.
        nbd_client_connect()
        sh("mount", "-o", "ro", DEV, str(MNT))
        check(tree_digest(str(MNT / "tree")) == want, "files intact over a second nbd-client connection")
        check((MNT / "marker").read_bytes() == b"written before disconnect\n" * 1000, "marker intact")
        sh("umount", str(MNT))
        nbd_client_disconnect()
        check(proc.poll() is None, "blockfs serve still running after the second disconnect")
    status, log = stop_blockfs(proc)
    print(log)
    check(status == 0, f"blockfs serve exited 0 on SIGTERM (got {status})")
    check(log.count("export 'disk'") == 2, "the server logged both nbd-client connections")
    check("unexpected error" not in log and "Traceback" not in log, "no errors in the server log")
    check(not SOCK.exists(), "the server removed its socket")
    # The backing file on its own: still a clean ext4 with the files.
    sh("e2fsck", "-fn", str(image))
    print("ok: the backing file alone is a clean ext4", flush=True)
    check(image.stat().st_size == 96 << 20, "backing file keeps its size")


def scenario_nbd_client_tls_tcp(certs: str) -> None:
    """nbd-client over TCP with TLS and a client certificate (nbd-client runs
    a TLS proxy for the kernel); a client certificate from the wrong CA is
    refused; data written through the kernel is read back after reconnecting."""
    pki = Path(certs)
    sh("ip", "link", "set", "lo", "up")
    image = TMP / "tls.img"
    proc, uri = start_blockfs(
        image, "32M", "--listen", "127.0.0.1:10809", "--tls", "require",
        "--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem"),
        "--tls-ca", str(pki / "ca-cert.pem"))
    check(uri == f"nbds://127.0.0.1:10809/{EXPORT}", f"TLS URI {uri}")

    def connect(client_dir: Path, check_status: bool = True) -> str:
        return sh("nbd-client", "127.0.0.1", "10809", DEV, "-N", EXPORT, "-b", "4096", "-t", "30",
                  "-certfile", str(client_dir / "client-cert.pem"), "-keyfile", str(client_dir / "client-key.pem"),
                  "-cacertfile", str(client_dir / "ca-cert.pem"), "-tlshostname", "localhost", check=check_status)

    with cleanup_on_failure(proc):
        connect(pki / "wrong", check_status=False)
        check(not is_live(DEV), "nbd-client with a certificate from the wrong CA did not bring the device up")
        check(proc.poll() is None, "blockfs serve still running after refusing it")
        connect(pki)
        wait_live(DEV)
        payload = os.urandom(8 << 20)
        fd = os.open(DEV, os.O_RDWR)
        try:
            os.pwrite(fd, payload, 4 << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
        nbd_client_disconnect()
        connect(pki)
        wait_live(DEV)
        drop_caches()
        fd = os.open(DEV, os.O_RDONLY)
        try:
            back = os.pread(fd, len(payload), 4 << 20)
        finally:
            os.close(fd)
        check(hashlib.sha256(back).digest() == hashlib.sha256(payload).digest(),
              "8 MiB written over TLS read back identical after reconnecting")
        nbd_client_disconnect()
    status, log = stop_blockfs(proc)
    print(log)
    check(status == 0, f"blockfs serve exited 0 on SIGTERM (got {status})")
    check("certificate verify failed" in log, "the server refused the wrong client's certificate")
    check(log.count(f"export '{EXPORT}'") == 2, "the server served both good connections")
    with open(image, "rb") as f:
        f.seek(4 << 20)
        check(f.read(len(payload)) == payload, "the data is in the backing file")


if __name__ == "__main__":
    name = sys.argv[1]
    globals()[f"scenario_{name}"](*sys.argv[2:])
    print(f"scenario {name}: passed")
