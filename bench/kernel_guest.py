"""The kernel part of the benchmark; runs inside one user-mode Linux boot.

    python bench/kernel_guest.py --runs N --runtime S --ramp S --size-mib M

bench/run.py boots the guest (blockfs.testing.uml.run_python_in_guest) and
parses the JSON this prints on its last line (prefixed RESULT_MARKER).

Each run starts both sides fresh, side by side:

  blockfs   `python -m blockfs run bench/ramdisk_1g.py:RamDisk1G /dev/nbd0`
            (blockfs.run(): ioctls, one socket; the same bytearray RAM disk
            as the network part, BLOCKFS_BENCH_BLOCKS sized to --size-mib)
  nbdkit    `nbdkit memory SIZE -U SOCK` + `nbd-client -unix SOCK /dev/nbd1
            -b 4096` (one connection)

then runs one fio process (every fork+exec costs ~0.15 s in UML) whose job
file fills both devices once (untimed) and then runs each workload on one
device and at once on the other (A B, A B, ...; B A in odd runs), all jobs
libaio, direct=1, separated by stonewall. Measuring the two sides seconds
apart matters: how fast UML runs swings by 2-4x with the host's load. The
guest has one CPU, which fio, the kernel's NBD driver and both servers share
(the idle server only sleeps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from blockfs.testing.guest import terminate, wait_connectable, wait_down, wait_live

BENCH = Path(__file__).resolve().parent
TMP = Path(os.environ.get("TMPDIR", "/run/tmp"))
RESULT_MARKER = "BLOCKFS-BENCH-RESULT "
SIDES = {"blockfs": "/dev/nbd0", "nbdkit-memory": "/dev/nbd1"}

# (name, rw, bs, iodepth): the network part's workloads, on a block device.
WORKLOADS = [
    ("seq write 1M QD16", "write", "1m", 16),
    ("seq read 1M QD16", "read", "1m", 16),
    ("rand read 4K QD1", "randread", "4k", 1),
    ("rand read 4K QD16", "randread", "4k", 16),
    ("rand write 4K QD16", "randwrite", "4k", 16),
    ("rand write 4K QD1", "randwrite", "4k", 1),
]


def log(msg: str) -> None:
    print(f"[guest {time.monotonic():8.2f}] {msg}", flush=True)


def job_file(order: list[str], runtime: float, ramp: float) -> tuple[str, list[tuple[str, str]]]:
    """The job file, and (side, workload) for each job after the fills. Each
    device is written once first (untimed), so that neither server pays
    first-touch page faults, which are slow in UML, during a timed job."""
    lines = ["[global]", "ioengine=libaio", "direct=1", "norandommap=1", "randrepeat=0", "numjobs=1", ""]
    for side in order:
        lines += [f"[fill-{side}]", f"filename={SIDES[side]}", "rw=write", "bs=1m", "iodepth=16", "size=100%",
                  "stonewall", ""]
    jobs = []
    for i, (name, rw, bs, qd) in enumerate(WORKLOADS):
        for side in order:
            lines += [f"[w{i}-{side}]", f"filename={SIDES[side]}", f"rw={rw}", f"bs={bs}", f"iodepth={qd}",
                      "time_based=1", f"runtime={runtime}", f"ramp_time={ramp}", "stonewall", ""]
            jobs.append((side, name))
    return "\n".join(lines), jobs


def run_fio(order: list[str], runtime: float, ramp: float, run: int) -> dict[str, dict[str, dict[str, float]]]:
    path = TMP / f"run{run}.fio"
    out = TMP / f"run{run}.json"
    text, jobs = job_file(order, runtime, ramp)
    path.write_text(text)
    done = subprocess.run(["fio", f"--output={out}", "--output-format=json", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"fio failed ({done.returncode}):\n{done.stdout.decode(errors='replace')}")
    raw = out.read_text()
    data = json.loads(raw[raw.index("{"):])
    fills = len(order)
    if len(data["jobs"]) != fills + len(jobs):
        raise RuntimeError(f"fio: expected {fills + len(jobs)} jobs, got {len(data['jobs'])}")
    results: dict[str, dict[str, dict[str, float]]] = {side: {} for side in order}
    rw_of = {w[0]: w[1] for w in WORKLOADS}
    for (side, name), job in zip(jobs, data["jobs"][fills:]):
        if job.get("error"):
            raise RuntimeError(f"fio job {name} on {SIDES[side]}: error {job['error']}")
        part = job["write"] if "write" in rw_of[name] else job["read"]
        results[side][name] = {"iops": part["iops"], "bw_mib": part["bw_bytes"] / 2**20}
    return results


def one_run(args: argparse.Namespace, run: int) -> dict[str, dict[str, dict[str, float]]]:
    logf = open(TMP / f"run{run}.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "BLOCKFS_BENCH_BLOCKS": str(args.size_mib * 256)}
    blockfs = subprocess.Popen(
        [sys.executable, "-m", "blockfs", "run", f"{BENCH / 'ramdisk_1g.py'}:RamDisk1G", SIDES["blockfs"]],
        stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env)
    sock = TMP / f"nbdkit-{run}.sock"
    nbdkit = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock), "memory", f"{args.size_mib}M"],
        stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    attached = False
    try:
        wait_connectable(sock, nbdkit)
        subprocess.run(["nbd-client", "-unix", str(sock), SIDES["nbdkit-memory"], "-b", "4096"], check=True,
                       stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        attached = True
        wait_live(SIDES["nbdkit-memory"], timeout=60)
        wait_live(SIDES["blockfs"], blockfs, timeout=120)
        order = list(SIDES) if run % 2 == 0 else list(reversed(SIDES))
        log(f"run {run + 1}/{args.runs}: blockfs.run() on /dev/nbd0 (pid {blockfs.pid}), nbd-client + nbdkit memory "
            f"on /dev/nbd1 (pid {nbdkit.pid}); order {' '.join(order)}")
        return run_fio(order, args.runtime, args.ramp, run)
    finally:
        if attached:
            subprocess.run(["nbd-client", "-d", SIDES["nbdkit-memory"]], stdin=subprocess.DEVNULL, stdout=logf,
                           stderr=subprocess.STDOUT, check=False)
            wait_down(SIDES["nbdkit-memory"])
        terminate(blockfs)
        terminate(nbdkit)
        wait_down(SIDES["blockfs"])
        logf.close()
        log(f"run {run + 1}: stopped (blockfs status {blockfs.returncode}, nbdkit status {nbdkit.returncode})")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--runtime", type=float, default=2)
    p.add_argument("--ramp", type=float, default=0.5)
    p.add_argument("--size-mib", type=int, default=256)
    args = p.parse_args()
    TMP.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, dict[str, float]]]] = {side: [] for side in SIDES}
    for run in range(args.runs):
        per_side = one_run(args, run)
        for side in SIDES:
            results[side].append(per_side[side])
    out = {"workloads": [w[0] for w in WORKLOADS], "size_mib": args.size_mib, "runs": args.runs,
           "runtime": args.runtime, "ramp": args.ramp, "results": results}
    print(RESULT_MARKER + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
