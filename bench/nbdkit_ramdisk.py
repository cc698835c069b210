"""nbdkit's Python plugin peer: the same bytearray RAM disk as ramdisk_1g.py.

    nbdkit --foreground --exit-with-parent -U SOCK python bench/nbdkit_ramdisk.py size=1G
        [thread_model=parallel|serialize_requests|serialize_all_requests]

Thread model: nbdkit 1.32's Python plugin defaults to
serialize_all_requests; since nbdkit 1.22 a plugin may choose another with
thread_model(), and `nbdkit python --dump-plugin` reports
max_thread_model=parallel, so parallel is allowed. It is slower for this
plugin (16 worker threads fighting for the GIL instead of the connection's
own thread running the callback; numbers in docs/performance.md), so
bench/run.py passes thread_model=serialize_all_requests, and
thread_model=parallel for its extra server nbdkit-python-parallel. Without
the parameter this file asks for serialize_all_requests too. The GIL runs one
callback at a time, so the slice copies need no lock in any model.
"""

import nbdkit

API_VERSION = 2

size = 1 << 30
model = "serialize_all_requests"
disk = None
view = None


def config(key, value):
    global size
    global model
    if key == "size":
        size = nbdkit.parse_size(value)
    elif key == "thread_model":  # parallel, serialize_requests, serialize_all_requests, ...
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
