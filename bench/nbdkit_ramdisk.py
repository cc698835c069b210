"""nbdkit's Python plugin peer: the same bytearray RAM disk as ramdisk_1g.py.

    nbdkit --foreground --exit-with-parent -U SOCK python bench/nbdkit_ramdisk.py size=1G
        [thread_model=parallel|serialize_requests|serialize_all_requests]

Thread model: nbdkit 1.32's Python plugin defaults to
serialize_all_requests; since nbdkit 1.22 a plugin may raise it with
thread_model(), and `nbdkit python --dump-plugin` reports
max_thread_model=parallel, so this plugin asks for parallel (the most
nbdkit allows it). The GIL still runs one callback at a time; the slice copies
are done under it, so no locks are needed.
"""

import nbdkit

API_VERSION = 2

size = 1 << 30
model = "parallel"
disk = None
view = None


def config(key, value):
    global size
    global model
    if key == "size":
        size = nbdkit.parse_size(value)
    elif key == "thread_model":  # for comparing models; bench/run.py uses the default
        model = value
    else:
        raise RuntimeError(f"unknown parameter {key!r}")


def config_complete():
    global disk, view
    disk = bytearray(size)
    view = memoryview(disk)


def thread_model():
    return getattr(nbdkit, "THREAD_MODEL_" + model.upper())


def open(readonly):
    return 1


def get_size(h):
    return size


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = view[offset : offset + len(buf)]  # one copy, as blockfs's RamDisk1G


def pwrite(h, buf, offset, flags):
    disk[offset : offset + len(buf)] = buf
