"""Interoperability: blockfs served to NBD clients we did not write.

qemu-img / qemu-io (QEMU's NBD client), nbdinfo / nbdcopy / nbdsh (libnbd),
and nbd-client handing the connection to the Linux kernel (inside user-mode
Linux). Servers run either as `python -m blockfs serve ...` child processes
(blockfs.testing.server.ServerProcess) or in this process (blockfs.Server),
where the test can also look at what the device's handlers saw.

Every client command and its output is printed (`pytest -rP` or `-s` shows
them). nbdsh and libnbd's Python module exist only for Debian's
/usr/bin/python3, so nbdsh runs with /usr/bin first on PATH while the blockfs
servers run under the interpreter that runs pytest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest

import blockfs
from blockfs.cli import load_class
from blockfs.testing.certs import TlsCerts, make_tls_certs, openssl_unavailable_reason
from blockfs.testing.server import ServerProcess, python_executable
from blockfs.testing.uml import run_python_in_guest, uml_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RAMDISK = f"{EXAMPLES / 'ramdisk.py'}:RamDisk"
SPARSE = f"{EXAMPLES / 'sparse_file.py'}:SparseFile"
SCENARIOS = Path(__file__).parent / "guest" / "client_scenarios.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # the one python3-libnbd (nbdsh, `import nbd`) is built for
MiB = 1 << 20

pytestmark = pytest.mark.clients


def needs(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)} "
                              "(Debian: qemu-utils, libnbd-bin, nbd-client, python3-libnbd)")


def _system_python_has_nbd() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    done = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


needs_nbdsh = pytest.mark.skipif(
    shutil.which("nbdsh") is None or not _system_python_has_nbd(),
    reason=f"nbdsh or libnbd's Python module for {SYSTEM_PYTHON} not installed (Debian: libnbd-bin, python3-libnbd)",
)
needs_openssl = pytest.mark.skipif(openssl_unavailable_reason() is not None,
                                   reason=f"TLS certificates: {openssl_unavailable_reason()}")


# --------------------------------------------------------------------------- running clients
@attrs.frozen
class Ran:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float = 60, env: Mapping[str, str] | None = None,
        check: bool = True, echo_stderr: str | None = None) -> Ran:
    """Run a client with a timeout; print the exact command (with any
    environment it adds) and everything it said (of stderr, with
    `echo_stderr`, only the lines containing it)."""
    args = [os.fspath(a) for a in argv]
    shown_env = {k: v for k, v in (env or {}).items() if k not in ("PATH", "PYTHONPATH")}
    print("$ " + "".join(f"{k}={shlex.quote(v)} " for k, v in shown_env.items()) + shlex.join(args))
    try:
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              env=None if env is None else {**os.environ, **env}, check=False)
    except subprocess.TimeoutExpired as exc:  # run() has killed and reaped it
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"{args[0]} did not finish within {timeout} s: {shlex.join(args)}\n{out}")
    ran = Ran(args, done.returncode, done.stdout, done.stderr)
    if ran.stdout:
        print(ran.stdout, end="" if ran.stdout.endswith("\n") else "\n")
    if ran.stderr:
        lines = [line for line in ran.stderr.splitlines() if echo_stderr is None or echo_stderr in line]
        print("\n".join(f"[stderr] {line}" for line in lines))
    print(f"[exit status {ran.returncode}]")
    if check:
        assert ran.returncode == 0, f"{shlex.join(args)} exited with {ran.returncode}:\n{ran.output}"
    return ran


def nbdsh_env() -> dict[str, str]:
    """nbdsh is `exec python3 -m nbd`: put Debian's python3 first on PATH; give
    commands it spawns (connect_command) the repository on PYTHONPATH."""
    return {"PATH": f"/usr/bin:/bin:{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT)}


def nbdsh(args: Sequence[str], code: str, *, timeout: float = 60, check: bool = True) -> Ran:
    return run(["nbdsh", *args, "-c", textwrap.dedent(code)], timeout=timeout, env=nbdsh_env(), check=check)


def json_lines(text: str, tag: str = "RESULT ") -> dict[str, Any]:
    """The one line `tag{json}` a client script printed."""
    lines = [line[len(tag):] for line in text.splitlines() if line.startswith(tag)]
    assert len(lines) == 1, f"expected one {tag.strip()} line in:\n{text}"
    return json.loads(lines[0])  # type: ignore[no-any-return]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def random_image(path: Path, size: int, *, zeroes: bool = False) -> Path:
    """`size` bytes of os.urandom. With `zeroes`, MiBs 3, 10-13 and the last
    are holes and MiB 20 is written zeroes, so copying tools send zero
    requests (write-zeroes / trim) for them instead of data."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // MiB):
            if zeroes and (i in (3, 10, 11, 12, size // MiB - 1)):
                continue  # a hole
            f.seek(i * MiB)
            f.write(bytes(MiB) if zeroes and i == 20 else os.urandom(MiB))
    return path


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path holds only 108 bytes;
    pytest's tmp_path can be longer than that with a long test name)."""
    d = Path(tempfile.mkdtemp(prefix="bfs-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    if openssl_unavailable_reason() is not None:
        pytest.skip(f"TLS certificates: {openssl_unavailable_reason()}")
    return make_tls_certs(tmp_path_factory.mktemp("pki"))


@contextmanager
def serving(args: Sequence[str | os.PathLike[str]], **kw: object) -> Iterator[ServerProcess]:
    """`python -m blockfs serve ARGS` for the block; on leaving it must exit 0 on
    SIGTERM (checked only if the block itself succeeded). Its log is printed."""
    server = ServerProcess(args, cwd=ROOT, **kw)  # type: ignore[arg-type]
    print(f"$ {shlex.join(server.argv)} &")
    server.start()
    print(f"[server printed] {' '.join(server.uris)}")
    try:
        yield server
    except BaseException:
        server.stop(check=False)
        print(f"[server log]\n{server.final_log()}")
        raise
    alive = server.alive()
    status = server.stop(check=False)
    print(f"[server log]\n{server.final_log()}[server exit status {status}]")
    assert alive, f"blockfs serve exited by itself (status {status}) during the test:\n{server.final_log()}"
    assert status == 0, f"blockfs serve exited with {status} on SIGTERM:\n{server.final_log()}"


@contextmanager
def in_process(devices: object, address: str, **kw: object) -> Iterator[blockfs.Server]:
    server = blockfs.Server(devices, address, **kw)  # type: ignore[arg-type]
    try:
        server.start()
        print(f"[in-process blockfs.Server] {' '.join(server.uris())}")
        yield server
    finally:
        server.close()


def unix_uri(sock: Path, export: str = "", scheme: str = "nbd+unix", **query: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return f"{scheme}:///{export}?socket={sock}{extra}"


# --------------------------------------------------------------------------- devices
RamDisk = load_class(RAMDISK)
SparseFile = load_class(SPARSE)


@blockfs.device(block_size=4096, blocks=16384, multi_conn=True)
class RecordingRamDisk(RamDisk):  # type: ignore[misc, valid-type]
    """The ramdisk example, also recording trims (to see qemu-io's discard arrive)."""

    def __init__(self) -> None:
        super().__init__()
        self.trims: list[tuple[int, int]] = []

    @blockfs.on_trim
    def trim(self, offset: int, length: int) -> None:
        self.trims.append((offset, length))
        super().trim(offset, length)


BAD_READ = 100 * 4096  # reading this block fails with ENOSPC
BAD_WRITE = 200 * 4096  # writing this block fails with EDQUOT (not an NBD errno: EIO on the wire)


@blockfs.device(block_size=4096, blocks=256)
class Faulty:
    """A small disk with one unreadable and one unwritable block, recording
    every successful write, trim and flush in order (FUA shows up as the
    operation followed by a flush)."""

    def __init__(self) -> None:
        self.data = bytearray(256 * 4096)
        self.ops: list[tuple[object, ...]] = []

    @staticmethod
    def _hits(offset: int, length: int, block: int) -> bool:
        return offset < block + 4096 and block < offset + length

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        if self._hits(offset, len(buf), BAD_READ):
            raise OSError(errno.ENOSPC, "simulated: no space to read from")
        buf[:] = self.data[offset : offset + len(buf)]

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        if self._hits(offset, len(data), BAD_WRITE):
            raise OSError(errno.EDQUOT, "simulated: quota exceeded")
        self.data[offset : offset + len(data)] = data
        self.ops.append(("write", offset, len(data)))

    @blockfs.on_trim
    def trim(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)
        self.ops.append(("trim", offset, length))

    @blockfs.on_flush
    def flush(self) -> None:
        self.ops.append(("flush",))


@blockfs.device(block_size=512, blocks=2048)
class ReadOnlyPattern:
    """No write handler: a read-only device (1 MiB of a byte pattern)."""

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes((offset + i) % 251 for i in range(len(buf)))


TiB = 1 << 40


@blockfs.device(block_size=4096, blocks=(16 * TiB) // 4096)
class HugeSparse:
    """16 TiB, nothing stored but the 4 KiB blocks written (64-bit offsets)."""

    def __init__(self) -> None:
        self.blocks_written: dict[int, bytes] = {}

    def _span(self, offset: int, length: int) -> tuple[int, bytearray]:
        first = offset - offset % 4096
        blocks = bytearray()
        for b in range(first, offset + length, 4096):
            blocks += self.blocks_written.get(b, bytes(4096))
        return first, blocks

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        first, blocks = self._span(offset, len(buf))  # handlers get any byte range
        buf[:] = blocks[offset - first : offset - first + len(buf)]

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        first, blocks = self._span(offset, len(data))
        blocks[offset - first : offset - first + len(data)] = data
        for i in range(0, len(blocks), 4096):
            self.blocks_written[first + i] = bytes(blocks[i : i + 4096])


# =========================================================================== QEMU
@needs("qemu-img")
@pytest.mark.parametrize(
    ("args", "export", "size"),
    [
        ([RAMDISK], "", 64 * MiB),
        ([SPARSE, "--arg", "size=40M", "--export-name", "vol"], "vol", 40 * MiB),
    ],
    ids=["ramdisk-64M", "sparse-40M-named"],
)
def test_qemu_img_info(sock_dir: Path, args: list[str], export: str, size: int) -> None:
    sock = sock_dir / "s"
    if args[0] == SPARSE:
        args = [*args, "--arg", f"path={sock_dir / 'disk.img'}"]
    with serving([*args, "--socket", sock]) as srv:
        assert srv.uri == unix_uri(sock, export)
        text = run(["qemu-img", "info", srv.uri], timeout=30).stdout
        assert "file format: raw" in text.splitlines()
        assert f"virtual size: {size // MiB} MiB ({size} bytes)" in text.splitlines()
        info = json.loads(run(["qemu-img", "info", "--output=json", srv.uri], timeout=30).stdout)
        assert (info["format"], info["virtual-size"]) == ("raw", size)


@needs("qemu-img")
def test_qemu_img_convert_round_trip(sock_dir: Path, tmp_path: Path) -> None:
    first = random_image(tmp_path / "first.img", 64 * MiB)
    src = random_image(tmp_path / "src.img", 64 * MiB, zeroes=True)
    back, back2 = tmp_path / "back.img", tmp_path / "back2.img"
    sock = sock_dir / "s"
    with serving([RAMDISK, "--socket", sock]) as srv:
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, srv.uri], timeout=60)
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, back], timeout=60)
        # Over data that is all non-zero, the zero ranges of src must really be written as zeroes;
        # -W -m 16: 16 requests in flight, completing out of order.
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", first, srv.uri], timeout=60)
        run(["qemu-img", "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", src, srv.uri], timeout=60)
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, back2], timeout=60)
    assert back.stat().st_size == back2.stat().st_size == 64 * MiB
    want = sha256(src)
    assert sha256(back) == want
    assert sha256(back2) == want, "zero ranges were not zeroed over earlier data"


@needs("qemu-io")
def test_qemu_io_patterns_and_discard(sock_dir: Path) -> None:
    sock = sock_dir / "s"
    disk = RecordingRamDisk()
    with in_process(disk, str(sock)):
        uri = unix_uri(sock)
        ran = run(["qemu-io", "-f", "raw",
                   "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
                   "-c", "discard 0 64k", "-c", "read -P 0 0 64k", "-c", "read -P 0xab 64k 960k",
                   "-c", "write -z 512k 64k", "-c", "read -P 0 512k 64k",
                   "-c", "write -P 0x5a -f 2M 4k", "-c", "read -P 0x5a 2M 4k", "-c", "flush",
                   uri], timeout=60)
        lines = ran.stdout.splitlines()
        assert "Pattern verification failed" not in ran.output
        assert not [l for l in lines if "fail" in l.lower() or "error" in l.lower()], ran.output
        for want in ("wrote 1048576/1048576 bytes at offset 0", "read 1048576/1048576 bytes at offset 0",
                     "discard 65536/65536 bytes at offset 0", "read 65536/65536 bytes at offset 0",
                     "read 983040/983040 bytes at offset 65536", "wrote 65536/65536 bytes at offset 524288",
                     "read 65536/65536 bytes at offset 524288", "wrote 4096/4096 bytes at offset 2097152",
                     "read 4096/4096 bytes at offset 2097152"):
            assert want in lines, f"{want!r} missing from qemu-io's output"
        # Control: qemu-io does report a mismatch, so its silence above means something.
        control = run(["qemu-io", "-f", "raw", "-c", "read -P 0xcd 128k 4k", uri], timeout=30, check=False)
        assert "Pattern verification failed at offset 131072, 4096 bytes" in control.output
    # What the device itself holds.
    data = disk.data
    assert data[: 64 << 10] == bytes(64 << 10), "the discarded range reads back as zeroes"
    assert data[64 << 10 : 512 << 10] == b"\xab" * (448 << 10)
    assert data[512 << 10 : 576 << 10] == bytes(64 << 10), "write -z wrote zeroes"
    assert data[576 << 10 : 1 << 20] == b"\xab" * (448 << 10)
    assert data[2 << 20 : (2 << 20) + 4096] == b"\x5a" * 4096
    assert data[1 << 20 : 2 << 20] == bytes(1 << 20), "nothing written outside the ranges"
    assert disk.trims == [(0, 64 << 10)], f"qemu-io's discard reached on_trim: {disk.trims}"


@needs("qemu-io", "qemu-img", "nbdinfo")
def test_huge_device_64bit_offsets(sock_dir: Path) -> None:
    sock = sock_dir / "s"
    disk = HugeSparse()
    end = 16 * TiB
    with in_process(disk, str(sock)):
        uri = unix_uri(sock)
        assert run(["nbdinfo", "--size", uri], timeout=30).stdout.strip() == str(end)
        assert f"virtual size: 16 TiB ({end} bytes)" in run(["qemu-img", "info", uri], timeout=30).stdout
        ran = run(["qemu-io", "-f", "raw", "-c", f"write -P 0xee {end - 8192} 8k", "-c", f"read -P 0xee {end - 8192} 8k",
                   "-c", f"write -P 0x77 {5 << 30} 4k", "-c", f"read -P 0x77 {5 << 30} 4k",
                   "-c", f"read -P 0 {(5 << 30) + 4096} 4k", uri], timeout=30)
        assert "Pattern verification failed" not in ran.output
        assert f"read 8192/8192 bytes at offset {end - 8192}" in ran.stdout.splitlines()
        beyond = run(["qemu-io", "-f", "raw", "-c", f"read {end - 4096} 8k", uri], timeout=30, check=False)
        assert "read 8192/8192 bytes" not in beyond.stdout
    assert disk.blocks_written == {end - 8192: b"\xee" * 4096, end - 4096: b"\xee" * 4096, 5 << 30: b"\x77" * 4096}


@needs("nbd-client", "nbdinfo", "qemu-img")
def test_tcp_listen_nbd_client_list_nbdinfo_qemu(sock_dir: Path) -> None:
    """--listen 127.0.0.1:0: the printed URI has the real port; nbd-client -l
    (NBD_OPT_LIST over TCP, no kernel needed) shows name and description."""
    with serving([RAMDISK, "--listen", "127.0.0.1:0", "--export-name", "ram", "--description", "RAM over TCP"]) as srv:
        host_port = srv.uri.removeprefix("nbd://").removesuffix("/ram")
        host, _, port = host_port.rpartition(":")
        assert host == "127.0.0.1" and port.isdigit() and int(port) > 0, srv.uri
        listing = run(["nbd-client", "-l", host, port], timeout=30).stdout
        assert "ram: RAM over TCP" in listing.splitlines()
        assert run(["nbdinfo", "--size", srv.uri], timeout=30).stdout.strip() == str(64 * MiB)
        assert "virtual size: 64 MiB (67108864 bytes)" in run(["qemu-img", "info", srv.uri], timeout=30).stdout


# =========================================================================== nbdinfo
@needs("nbdinfo")
def test_nbdinfo_list_shows_every_export_with_description(sock_dir: Path) -> None:
    sock = sock_dir / "s"
    alpha, beta = RamDisk(), SparseFile(str(sock_dir / "beta.img"), "16M")
    descriptions = {"alpha": "Alpha: 64 MiB in RAM", "beta": "Beta: sparse file, 16 MiB"}
    with in_process({"alpha": alpha, "beta": beta}, str(sock), description=descriptions):
        text = run(["nbdinfo", "--list", unix_uri(sock)], timeout=30).stdout
        assert 'export="alpha":' in text and 'export="beta":' in text
        assert f"description: {descriptions['alpha']}" in text
        assert f"description: {descriptions['beta']}" in text
        assert "export-size: 67108864 (64M)" in text and "export-size: 16777216 (16M)" in text
        listing = json.loads(run(["nbdinfo", "--list", "--json", unix_uri(sock)], timeout=30).stdout)
        beta_size = run(["nbdinfo", "--size", unix_uri(sock, "beta")], timeout=30).stdout
        unknown = run(["nbdinfo", unix_uri(sock, "gamma")], timeout=30, check=False)
    assert beta_size.strip() == str(16 * MiB)
    assert unknown.returncode != 0 and "export-size" not in unknown.stdout
    assert "No such file or directory for export: gamma" in unknown.stderr, unknown.stderr  # NBD_REP_ERR_UNKNOWN
    got = {e["export-name"]: e for e in listing["exports"]}
    assert sorted(got) == ["alpha", "beta"]
    assert {n: e["description"] for n, e in got.items()} == descriptions
    assert got["alpha"]["export-size"] == 64 * MiB and got["beta"]["export-size"] == 16 * MiB
    assert got["alpha"]["uri"] == unix_uri(sock, "alpha")


@needs("nbdinfo")
def test_nbdinfo_json_shows_advertised_flags(sock_dir: Path) -> None:
    sock = sock_dir / "s"
    devices = {
        "ram": RamDisk(),  # write + trim, multi_conn, no flush
        "sparse": SparseFile(str(sock_dir / "sparse.img"), "8M"),  # write + trim + flush
        "pattern": ReadOnlyPattern(),  # no write handler
    }
    with in_process(devices, str(sock)):
        listing = json.loads(run(["nbdinfo", "--list", "--json", unix_uri(sock)], timeout=30).stdout)
        single = json.loads(run(["nbdinfo", "--json", unix_uri(sock, "sparse")], timeout=30).stdout)
    assert listing["protocol"] == "newstyle-fixed" and listing["TLS"] is False and listing["structured"] is True
    got = {e["export-name"]: e for e in listing["exports"]}
    keys = ("is_read_only", "can_trim", "can_zero", "can_flush", "can_fua", "can_multi_conn")

    def flags(name: str) -> dict[str, bool]:
        return {k: got[name][k] for k in keys}

    assert flags("ram") == dict(is_read_only=False, can_trim=True, can_zero=True, can_flush=False, can_fua=False,
                                can_multi_conn=True)
    assert flags("sparse") == dict(is_read_only=False, can_trim=True, can_zero=True, can_flush=True, can_fua=True,
                                   can_multi_conn=False)
    assert flags("pattern") == dict(is_read_only=True, can_trim=False, can_zero=False, can_flush=False,
                                    can_fua=False, can_multi_conn=False)
    assert got["pattern"]["block_size_preferred"] == 512 and got["sparse"]["block_size_preferred"] == 4096
    assert got["pattern"]["export-size"] == 1 * MiB
    (one,) = single["exports"]
    assert {k: one[k] for k in keys} == flags("sparse")


@needs("nbdinfo")
def test_nbdinfo_json_read_only_server(sock_dir: Path) -> None:
    """read_only=True (and the CLI's --read-only) hide write, trim and zero."""
    sock = sock_dir / "s"
    with in_process(RamDisk(), str(sock), read_only=True):
        (e,) = json.loads(run(["nbdinfo", "--json", unix_uri(sock)], timeout=30).stdout)["exports"]
    assert (e["is_read_only"], e["can_trim"], e["can_zero"], e["can_multi_conn"]) == (True, False, False, True)
    sock2 = sock_dir / "s2"
    with serving([SPARSE, "--arg", f"path={sock_dir / 'ro.img'}", "--arg", "size=4M", "--read-only",
                  "--socket", sock2]) as srv:
        (e,) = json.loads(run(["nbdinfo", "--json", srv.uri], timeout=30).stdout)["exports"]
    assert (e["is_read_only"], e["can_trim"], e["can_zero"], e["can_flush"], e["can_fua"]) == (
        True, False, False, True, False)


# =========================================================================== nbdcopy
@needs("nbdcopy")
@pytest.mark.parametrize("device", ["ramdisk", "sparse_file"])
def test_nbdcopy_round_trip(sock_dir: Path, tmp_path: Path, device: str) -> None:
    """ramdisk: multi_conn, handlers one at a time; sparse_file: concurrency=4
    (the concurrent serve path), flush, one connection."""
    first = random_image(tmp_path / "first.img", 64 * MiB)
    src = random_image(tmp_path / "src.img", 64 * MiB, zeroes=True)
    back = tmp_path / "back.img"
    sock = sock_dir / "s"
    image = tmp_path / "backing.img"
    args = [RAMDISK] if device == "ramdisk" else [SPARSE, "--arg", f"path={image}", "--arg", "size=64M"]
    flush = [] if device == "ramdisk" else ["--flush"]
    with serving([*args, "--socket", sock], verbose=1) as srv:
        run(["nbdcopy", *flush, first, srv.uri], timeout=60)
        run(["nbdcopy", srv.uri, back], timeout=60)
        assert sha256(back) == sha256(first)
        # Holes in src become zero requests; they must zero the earlier data.
        run(["nbdcopy", *flush, src, srv.uri], timeout=60)
        back.unlink()
        run(["nbdcopy", srv.uri, back], timeout=60)
    assert sha256(back) == sha256(src)
    connections = srv.final_log().count("export ''")
    if device == "ramdisk":  # it advertises multi_conn, so nbdcopy opens several connections
        assert connections >= 8, f"nbdcopy used {connections} connections for 4 copies"
    else:
        assert connections == 4, f"{connections} connections for 4 copies without multi_conn"
        assert sha256(image) == sha256(src), "the backing file holds the copy"


# =========================================================================== nbdsh
NBDSH_SCRIPT = """
import errno, json
out = {}
h.set_strict_mode(0)  # let requests through to the server unchecked
out["size"] = h.get_size()
out["structured"] = h.get_structured_replies_negotiated()
out["can_flush"], out["can_fua"], out["can_trim"] = h.can_flush(), h.can_fua(), h.can_trim()
h.pwrite(b"\\x11" * 8192, 0)
h.pwrite(b"\\x22" * 4096, 8192, nbd.CMD_FLAG_FUA)
out["read_back"] = h.pread(12288, 0) == b"\\x11" * 8192 + b"\\x22" * 4096
h.trim(4096, 4096)
out["after_trim"] = h.pread(8192, 0) == b"\\x11" * 4096 + bytes(4096)
h.flush()
h.pwrite(b"\\x33" * 16384, 16384)
h.zero(8192, 20480, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
out["zeroed"] = h.pread(16384, 16384) == b"\\x33" * 4096 + bytes(8192) + b"\\x33" * 4096
h.trim(4096, 40960, nbd.CMD_FLAG_FUA)

def err(f, *a):
    try:
        f(*a)
    except nbd.Error as e:
        return [e.errnum, e.errno, e.string]
    return None

out["bad_read"] = err(h.pread, 4096, {bad_read})
out["bad_read_part"] = err(h.pread, 16384, {bad_read} - 8192)
out["after_bad_read"] = h.pread(4096, {bad_read} + 4096) == bytes(4096)
out["bad_write"] = err(h.pwrite, b"x" * 4096, {bad_write})
out["past_end"] = err(h.pread, 4096, h.get_size())
out["write_past_end"] = err(h.pwrite, b"x" * 4096, h.get_size())
out["fast_zero"] = err(h.zero, 4096, 16384, nbd.CMD_FLAG_FAST_ZERO)  # not advertised
out["still_fine"] = h.pread(4096, 8192) == b"\\x22" * 4096
h.shutdown()
print("RESULT " + json.dumps(out))
"""


@needs_nbdsh
@pytest.mark.parametrize("structured", [True, False], ids=["structured-replies", "simple-replies"])
def test_nbdsh_io_and_handler_errnos(sock_dir: Path, structured: bool) -> None:
    sock = sock_dir / "s"
    disk = Faulty()
    script = NBDSH_SCRIPT.replace("{bad_read}", str(BAD_READ)).replace("{bad_write}", str(BAD_WRITE))
    connect = f"h.connect_uri({unix_uri(sock)!r})\n"
    if not structured:
        connect = "h.set_request_structured_replies(False)\n" + connect
    with in_process(disk, str(sock)):
        ran = nbdsh([], connect + script)
    out = json_lines(ran.stdout)
    enospc = [errno.ENOSPC, "ENOSPC"]
    eio = [errno.EIO, "EIO"]
    einval = [errno.EINVAL, "EINVAL"]
    assert out["size"] == 256 * 4096 and out["structured"] is structured
    assert (out["can_flush"], out["can_fua"], out["can_trim"]) == (True, True, True)
    assert out["read_back"] and out["after_trim"] and out["zeroed"] and out["after_bad_read"] and out["still_fine"]
    assert out["fast_zero"] is not None and out["fast_zero"][1] in ("EINVAL", "ENOTSUP"), out["fast_zero"]
    assert out["bad_read"][:2] == enospc, f"the handler's ENOSPC reached libnbd: {out['bad_read']}"
    assert out["bad_read_part"][:2] == enospc
    assert out["bad_write"][:2] == eio, f"EDQUOT (no NBD errno) arrives as EIO: {out['bad_write']}"
    assert out["past_end"][:2] == einval
    assert out["write_past_end"][:2] == [errno.ENOSPC, "ENOSPC"]
    # And on the device's side, in order: each FUA operation is followed by a
    # flush, failed and refused requests never reached a handler, and the
    # disconnect (h.shutdown) ends with a flush.
    assert disk.ops == [
        ("write", 0, 8192),
        ("write", 8192, 4096), ("flush",),  # pwrite FUA
        ("trim", 4096, 4096),
        ("flush",),  # h.flush()
        ("write", 16384, 16384),
        ("write", 20480, 8192), ("flush",),  # zero NO_HOLE|FUA (emulated with the write handler)
        ("trim", 40960, 4096), ("flush",),  # trim FUA
        ("flush",),  # at disconnect
    ], disk.ops
    assert disk.data[:4096] == b"\x11" * 4096 and disk.data[8192:12288] == b"\x22" * 4096
    assert disk.data[BAD_WRITE : BAD_WRITE + 4096] == bytes(4096)
    assert disk.data[16384:32768] == b"\x33" * 4096 + bytes(8192) + b"\x33" * 4096


@needs_nbdsh
@needs("nbdinfo")
def test_client_vanishing_mid_request_leaves_server_healthy(sock_dir: Path) -> None:
    """A client that dies with requests (and write payloads) in flight."""
    sock = sock_dir / "s"
    with serving([RAMDISK, "--socket", sock], verbose=1) as srv:
        for _ in range(3):
            nbdsh(["-u", srv.uri], """
                import os
                buf = b"v" * (4 << 20)
                for i in range(12):
                    h.aio_pwrite(buf, i << 22)
                    h.aio_pread(nbd.Buffer(1 << 20), i << 20)
                h.poll(0)
                os._exit(0)  # no NBD_CMD_DISC, no waiting for replies
            """)
        assert srv.alive()
        ok = run(["nbdinfo", "--size", srv.uri], timeout=30)
        assert ok.stdout.strip() == str(64 * MiB)
    log = srv.final_log()
    assert log.count("export ''") == 4
    assert "Traceback" not in log and "unexpected error" not in log, log


@needs_nbdsh
def test_nbdsh_read_only_export_refuses_writes_with_eperm(sock_dir: Path) -> None:
    sock = sock_dir / "s"
    with in_process(ReadOnlyPattern(), str(sock)):
        ran = nbdsh(["-u", unix_uri(sock)], """
            import json
            h.set_strict_mode(0)  # send the write anyway: the server must refuse it
            out = {"ro": h.is_read_only(), "data": list(h.pread(8, 250))}
            try:
                h.pwrite(b"x" * 512, 0)
                out["write"] = None
            except nbd.Error as e:
                out["write"] = e.errno
            out["data_after"] = list(h.pread(4, 0))
            print("RESULT " + json.dumps(out))
        """)
    out = json_lines(ran.stdout)
    assert out == {"ro": True, "data": [250, 0, 1, 2, 3, 4, 5, 6], "write": "EPERM", "data_after": [0, 1, 2, 3]}


@needs_nbdsh
def test_nbdsh_stdio_mode() -> None:
    """libnbd spawns `python -m blockfs serve ... --stdio` on a socketpair."""
    server = [python_executable(), "-m", "blockfs", "serve", RAMDISK, "--stdio", "--description", "over stdio"]
    ran = nbdsh([], f"""
        import json
        h.set_full_info(True)
        h.connect_command({server!r})
        out = {{"size": h.get_size(), "desc": h.get_export_description(), "multi": h.can_multi_conn(),
               "trim": h.can_trim(), "ro": h.is_read_only()}}
        h.pwrite(b"stdio!" * 1000, 4096 * 7)
        out["read"] = h.pread(6000, 4096 * 7) == b"stdio!" * 1000
        h.trim(4096, 4096 * 7)
        out["trimmed"] = h.pread(4096, 4096 * 7) == bytes(4096)
        out["tail"] = h.pread(1904, 4096 * 8) == (b"stdio!" * 1000)[4096:]
        big = bytes(range(256)) * (32 * 4096)  # 32 MiB, the largest request blockfs takes
        h.pwrite(big, 16 << 20)
        out["big"] = h.pread(len(big), 16 << 20) == big
        h.shutdown()
        print("RESULT " + json.dumps(out))
    """)
    out = json_lines(ran.stdout)
    assert out == {"size": 64 * MiB, "desc": "over stdio", "multi": True, "trim": True, "ro": False,
                   "read": True, "trimmed": True, "tail": True, "big": True}
    assert "Traceback" not in ran.stderr and "error" not in ran.stderr.lower(), ran.stderr


# =========================================================================== nbd-client + kernel (UML)
@pytest.mark.uml
@needs("nbd-client")
@pytest.mark.skipif(uml_unavailable_reason() is not None, reason=f"user-mode Linux: {uml_unavailable_reason()}")
def test_nbd_client_in_uml_ext4() -> None:
    name = "nbd_client_ext4"
    print(f"[UML guest] python {SCENARIOS} {name}")
    result = run_python_in_guest(script=SCENARIOS, args=[name], timeout=180, mem="768M")
    print(result.output)
    assert result.returncode == 0, f"scenario {name} failed:\n{result.output}\n--- console ---\n{result.console[-3000:]}"
    assert f"scenario {name}: passed" in result.output
    assert "ok: all 40 files read back identical after remount" in result.output
    assert "ok: blockfs serve exited 0 on SIGTERM (got 0)" in result.output


@pytest.mark.uml
@needs_openssl
@needs("nbd-client")
@pytest.mark.skipif(uml_unavailable_reason() is not None, reason=f"user-mode Linux: {uml_unavailable_reason()}")
def test_nbd_client_in_uml_tls_over_tcp(certs: TlsCerts) -> None:
    name = "nbd_client_tls_tcp"
    print(f"[UML guest] python {SCENARIOS} {name} {certs.dir}")
    result = run_python_in_guest(script=SCENARIOS, args=[name, str(certs.dir)], timeout=180, mem="768M")
    print(result.output)
    assert result.returncode == 0, f"scenario {name} failed:\n{result.output}\n--- console ---\n{result.console[-3000:]}"
    assert f"scenario {name}: passed" in result.output
    assert "ok: the server refused the wrong client's certificate" in result.output
    assert "ok: 8 MiB written over TLS read back identical after reconnecting" in result.output


# =========================================================================== TLS
def tls_args(certs: TlsCerts, mode: str = "require", ca: bool = True) -> list[str | os.PathLike[str]]:
    args: list[str | os.PathLike[str]] = ["--tls", mode, "--tls-cert", certs.server_cert,
                                          "--tls-key", certs.server_key]
    return [*args, "--tls-ca", certs.ca_cert] if ca else args


def qemu_tls(certs_dir: Path, sock: Path, export: str = "") -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs_dir}", "--image-opts",
            f"driver=nbd,path={sock},export={export},tls-creds=tls0,tls-hostname=localhost"]


@needs_openssl
@needs_nbdsh
@needs("nbdinfo", "qemu-img")
def test_tls_client_certificate_accepted(sock_dir: Path, certs: TlsCerts) -> None:
    sock = sock_dir / "s"
    with serving([RAMDISK, "--socket", sock, *tls_args(certs)], verbose=1) as srv:
        assert srv.uri == unix_uri(sock, scheme="nbds+unix")
        uri = unix_uri(sock, scheme="nbds+unix", **{"tls-certificates": str(certs.dir)})
        info = json.loads(run(["nbdinfo", "--json", uri], timeout=30).stdout)
        assert info["TLS"] is True
        (e,) = info["exports"]
        text = run(["nbdinfo", uri], timeout=30).stdout
        assert "protocol: newstyle-fixed with TLS" in text
        assert e["export-size"] == 64 * MiB
        qinfo = run(["qemu-img", "info", *qemu_tls(certs.dir, sock)], timeout=30).stdout
        assert "virtual size: 64 MiB (67108864 bytes)" in qinfo
        ran = nbdsh([], f"h.set_uri_allow_local_file(True)\nh.connect_uri({uri!r})\n" + textwrap.dedent("""
            import json, os
            big = os.urandom(32 << 20)  # large requests over TLS: many TLS records each way
            h.pwrite(big, 8 << 20)
            small = [h.pread(4096, (8 << 20) + i * 4096) for i in range(16)]
            print("RESULT " + json.dumps({"tls": h.get_tls_negotiated(),
                                         "big": h.pread(len(big), 8 << 20) == big,
                                         "small": b"".join(small) == big[: 16 * 4096]}))
        """))
        assert json_lines(ran.stdout) == {"tls": True, "big": True, "small": True}
    assert srv.final_log().count("TLS failed") == 0


@needs_openssl
@needs("nbdinfo")
def test_tls_wrong_ca_client_refused_and_server_keeps_serving(sock_dir: Path, certs: TlsCerts) -> None:
    sock = sock_dir / "s"
    no_cert = sock_dir / "no-client-cert"
    no_cert.mkdir()
    shutil.copyfile(certs.ca_cert, no_cert / "ca-cert.pem")  # trusts the server, has no certificate of its own
    with serving([RAMDISK, "--socket", sock, *tls_args(certs)]) as srv:
        bad = run(["nbdinfo", unix_uri(sock, scheme="nbds+unix",
                                       **{"tls-certificates": str(certs.wrong_client_dir)})],
                  timeout=30, check=False)
        assert bad.returncode != 0
        assert "export-size" not in bad.stdout
        anonymous = run(["nbdinfo", unix_uri(sock, scheme="nbds+unix", **{"tls-certificates": str(no_cert)})],
                        timeout=30, check=False)
        assert anonymous.returncode != 0 and "export-size" not in anonymous.stdout
        assert srv.alive()
        good = run(["nbdinfo", "--size", unix_uri(sock, scheme="nbds+unix",
                                                  **{"tls-certificates": str(certs.dir)})], timeout=30)
        assert good.stdout.strip() == str(64 * MiB)
        log = srv.log()
    # It was the server that refused them, for their certificates:
    failures = [l for l in log.splitlines() if "TLS failed" in l]
    assert len(failures) == 2, log
    assert "certificate verify failed" in failures[0]
    assert "certificate" in failures[1]


@needs_openssl
@needs("nbdinfo")
def test_tls_require_refuses_plain_client(sock_dir: Path, certs: TlsCerts) -> None:
    sock = sock_dir / "s"
    with serving([RAMDISK, "--socket", sock, *tls_args(certs)]) as srv:
        plain = run(["nbdinfo", unix_uri(sock)], timeout=30, check=False)
        assert plain.returncode != 0
        assert "export-size" not in plain.stdout
        assert "server replied with error to opt_go request" in plain.stderr
        # libnbd's debug log has the server's reason.
        debug = run(["nbdinfo", unix_uri(sock)], timeout=30, check=False, env={"LIBNBD_DEBUG": "1"},
                    echo_stderr="server error message")
        assert debug.returncode != 0
        assert "server error message: TLS is required" in debug.stderr
        assert srv.alive()
        # TLS clients are still served.
        ok = run(["nbdinfo", "--size", unix_uri(sock, scheme="nbds+unix", **{"tls-certificates": str(certs.dir)})],
                 timeout=30)
        assert ok.stdout.strip() == str(64 * MiB)


@needs_openssl
@needs("nbdinfo")
def test_tls_on_offers_tls_and_allows_plain(sock_dir: Path, certs: TlsCerts) -> None:
    sock = sock_dir / "s"
    with serving([RAMDISK, "--socket", sock, *tls_args(certs, mode="on", ca=False)]):
        plain = run(["nbdinfo", unix_uri(sock)], timeout=30).stdout
        assert "without TLS" in plain and "export-size: 67108864" in plain
        secure = run(["nbdinfo", unix_uri(sock, scheme="nbds+unix", **{"tls-certificates": str(certs.dir)})],
                     timeout=30).stdout
        assert "with TLS" in secure and "export-size: 67108864" in secure


@blockfs.device(block_size=4096, blocks=256)
class SlowFirstBlock:
    """Reading block 0 takes 0.5 s (a request still in flight when the server
    is told to stop); counts flushes."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.flushes = 0

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        if offset == 0:
            self.reading.set()
            time.sleep(0.5)
        buf[:] = b"\x07" * len(buf)

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        pass

    @blockfs.on_flush
    def flush(self) -> None:
        self.flushes += 1


@needs_openssl
@needs_nbdsh
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_server_close_answers_in_flight_request(sock_dir: Path, certs: TlsCerts, tls: bool) -> None:
    """Server.close() (what SIGTERM does) while a libnbd client waits for a
    read: the reply still arrives, intact, and the device is flushed at the
    disconnect, over TLS as over a plain socket."""
    sock = sock_dir / "s"
    disk = SlowFirstBlock()
    server = blockfs.Server(disk, str(sock), tls=blockfs.TLS(
        cert=str(certs.server_cert), key=str(certs.server_key), ca=str(certs.ca_cert)) if tls else None)
    uri = unix_uri(sock, scheme="nbds+unix", **{"tls-certificates": str(certs.dir)}) if tls else unix_uri(sock)
    code = textwrap.dedent(f"""
        import json
        h.set_uri_allow_local_file(True)
        h.connect_uri({uri!r})
        buf = nbd.Buffer(65536)
        cookie = h.aio_pread(buf, 0)
        try:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
            result = buf.to_bytearray() == b"\\x07" * 65536
        except nbd.Error as e:
            result = str(e)
        print("RESULT " + json.dumps({{"read": result}}))
    """)
    argv = ["nbdsh", "-c", code]
    try:
        server.start()
        print(f"[in-process blockfs.Server] {' '.join(server.uris())}\n$ {shlex.join(argv)} &")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, **nbdsh_env()})
        try:
            assert disk.reading.wait(20), "the read never reached the handler"
            t0 = time.monotonic()
            server.close()
            closed_in = time.monotonic() - t0
            print(f"[server.close() returned after {closed_in:.2f} s]")
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        server.close()
    print(out + "".join(f"[stderr] {line}\n" for line in err.splitlines()) + f"[exit status {proc.returncode}]")
    assert json_lines(out) == {"read": True}, "the in-flight read was not answered intact"
    assert disk.flushes == 1, f"the device was flushed {disk.flushes} times at the disconnect"
    assert closed_in < 5


@needs_openssl
@needs("nbdcopy", "qemu-img")
def test_tls_data_round_trip(sock_dir: Path, tmp_path: Path, certs: TlsCerts) -> None:
    src = random_image(tmp_path / "src.img", 64 * MiB)  # the whole export
    sock = sock_dir / "s"
    uri = unix_uri(sock, scheme="nbds+unix", **{"tls-certificates": str(certs.dir)})
    with serving([RAMDISK, "--socket", sock, *tls_args(certs)]):
        run(["nbdcopy", src, uri], timeout=60)
        run(["nbdcopy", uri, tmp_path / "nbdcopy.img"], timeout=60)
        # Back out through QEMU's TLS client as well.
        run(["qemu-img", "convert", "-O", "raw", *qemu_tls(certs.dir, sock), tmp_path / "qemu.img"], timeout=60)
    want = sha256(src)
    assert sha256(tmp_path / "nbdcopy.img") == want
    assert sha256(tmp_path / "qemu.img") == want
