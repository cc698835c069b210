"""blockfs: write Linux block devices in Python.

Mark a class's handlers, decorate the class, and serve it to the kernel
(`run`, a real /dev/nbdX) or to NBD clients over the network (`serve`)."""

from __future__ import annotations

from .dispatch.declare import (
    BoundDevice,
    DispatchTable,
    Geometry,
    Operation,
    bind,
    device,
    dispatch_table,
    on_flush,
    on_read,
    on_trim,
    on_unmount,
    on_write,
)
from .errors import (
    BlockfsError,
    DefinitionError,
    DeviceBusyError,
    DeviceNotFoundError,
    DevicePermissionError,
    GeometryError,
    HandlerResultError,
    HandshakeError,
    KernelDeviceError,
    NbdDriverMissingError,
    NotAnNbdDeviceError,
    ProtocolError,
)
from .transports.kernel import Mount, run
from .transports.network import TLS, Server, serve, serve_stdio
from .units import parse_size

__version__ = "0.1.0"

__all__ = [
    "BlockfsError",
    "BoundDevice",
    "DefinitionError",
    "DeviceBusyError",
    "DeviceNotFoundError",
    "DevicePermissionError",
    "DispatchTable",
    "Geometry",
    "GeometryError",
    "HandlerResultError",
    "HandshakeError",
    "KernelDeviceError",
    "Mount",
    "NbdDriverMissingError",
    "NotAnNbdDeviceError",
    "Operation",
    "Server",
    "TLS",
    "ProtocolError",
    "bind",
    "device",
    "dispatch_table",
    "on_flush",
    "on_read",
    "on_trim",
    "on_unmount",
    "on_write",
    "parse_size",
    "run",
    "serve",
    "serve_stdio",
]
