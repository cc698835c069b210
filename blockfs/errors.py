"""Exception types. Each subclasses the built-in a caller would catch anyway
(TypeError for a wrong definition, ValueError for a bad value, OSError for
the operating system saying no), so precise and generic handling both work."""

from __future__ import annotations


class BlockfsError(Exception):
    """Base of every error blockfs raises on purpose."""


class DefinitionError(BlockfsError, TypeError):
    """A device class or handler is defined wrongly (raised at class definition)."""


class GeometryError(BlockfsError, ValueError):
    """Block size or block count is not acceptable."""


class HandlerResultError(BlockfsError, TypeError):
    """A handler returned something the contract does not allow."""


class ProtocolError(BlockfsError, ValueError):
    """The peer broke the NBD protocol; that connection cannot continue."""


class HandshakeError(ProtocolError):
    """The peer broke the NBD newstyle handshake."""


class KernelDeviceError(BlockfsError, OSError):
    """The kernel NBD device cannot be used (base of the specific cases below)."""


class DeviceNotFoundError(KernelDeviceError, FileNotFoundError):
    """The device path does not exist."""


class NotAnNbdDeviceError(KernelDeviceError):
    """The path exists but is not an NBD block device."""


class DevicePermissionError(KernelDeviceError, PermissionError):
    """Attaching needs root (CAP_SYS_ADMIN)."""


class DeviceBusyError(KernelDeviceError):
    """Another process is serving this NBD device."""


class NbdDriverMissingError(KernelDeviceError):
    """This kernel has no NBD driver loaded."""
