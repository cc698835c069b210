"""Declaring a device: handler marks, the class decorator and the dispatch table.

The handler decorators (`on_read`, `on_write`, ...) only put a mark on the
function. `@device(...)` walks the class's MRO, collects the marks into a
frozen `DispatchTable`, and checks everything that can be checked before an
instance exists: geometry, handler signatures, duplicate handlers. What can
only be known per instance (a disk over a file whose size is read in
`__init__`) is checked by `bind()` with the same rules, before any ioctl or
network traffic.
"""

from __future__ import annotations

import enum
import inspect
import os
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import attrs

from ..errors import DefinitionError, GeometryError
from ..protocol.constants import TransmissionFlag

__all__ = [
    "Operation",
    "Geometry",
    "DispatchTable",
    "BoundDevice",
    "device",
    "on_read",
    "on_write",
    "on_trim",
    "on_flush",
    "on_unmount",
    "dispatch_table",
    "bind",
]

_MARK = "__blockfs_operation__"
_TABLE = "__blockfs_dispatch__"
MAX_SIZE = 2**63 - 1  # the kernel keeps the size in a signed 64-bit loff_t
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIN_BLOCK_SIZE = 512

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Operation(enum.Enum):
    """What a handler does, and the arguments it is called with (after self)."""

    READ = ("on_read", ("offset", "buf"))
    WRITE = ("on_write", ("offset", "data"))
    TRIM = ("on_trim", ("offset", "length"))
    FLUSH = ("on_flush", ())
    UNMOUNT = ("on_unmount", ())

    @property
    def decorator(self) -> str:
        return self.value[0]

    @property
    def arguments(self) -> tuple[str, ...]:
        return self.value[1]


# --- geometry -----------------------------------------------------------------
@attrs.frozen
class Geometry:
    """Block size and count of a device, validated on construction."""

    block_size: int
    blocks: int

    def __attrs_post_init__(self) -> None:
        check_block_size(self.block_size)
        check_blocks(self.blocks, self.block_size)

    @property
    def size(self) -> int:
        return self.block_size * self.blocks


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_block_size(value: object) -> None:
    if not _is_int(value):
        raise GeometryError(f"block_size: expected an int, got {value!r} ({type(value).__name__})")
    assert isinstance(value, int)
    if value < MIN_BLOCK_SIZE or value > PAGE_SIZE or value & (value - 1):
        raise GeometryError(
            f"block_size: expected a power of two from {MIN_BLOCK_SIZE} to {PAGE_SIZE} "
            f"(the page size), got {value}"
        )


def check_blocks(value: object, block_size: int) -> None:
    if not _is_int(value):
        raise GeometryError(f"blocks: expected a positive int, got {value!r} ({type(value).__name__})")
    assert isinstance(value, int)
    if value <= 0:
        raise GeometryError(f"blocks: expected a positive int, got {value}")
    if value * block_size > MAX_SIZE:
        raise GeometryError(
            f"blocks: {value} blocks of {block_size} bytes is {value * block_size} bytes, "
            f"more than the largest device size {MAX_SIZE} (2**63-1)"
        )


# --- handler marks --------------------------------------------------------------
def _mark(operation: Operation, func: F) -> F:
    name = f"@blockfs.{operation.decorator}"
    if isinstance(func, (staticmethod, classmethod)):
        raise DefinitionError(
            f"{name}: expected a plain method def f(self, {', '.join(operation.arguments)}), "
            f"got a {type(func).__name__}"
        )
    if not inspect.isfunction(func):
        raise DefinitionError(f"{name}: expected a function defined in a class, got {func!r}")
    qualname = func.__qualname__.split(".")
    if len(qualname) < 2 or qualname[-2] == "<locals>":
        raise DefinitionError(
            f"{name}: expected a method of a @blockfs.device class, got the function "
            f"{func.__qualname__!r} defined outside a class"
        )
    previous = getattr(func, _MARK, None)
    if previous is not None and previous is not operation:
        raise DefinitionError(
            f"{name}: {func.__qualname__} is already marked @blockfs.{previous.decorator}; "
            "one function handles one operation"
        )
    setattr(func, _MARK, operation)
    return func


def on_read(func: F) -> F:
    """Mark `read(self, offset, buf)`: fill the writable memoryview `buf`
    (or return exactly len(buf) bytes)."""
    return _mark(Operation.READ, func)


def on_write(func: F) -> F:
    """Mark `write(self, offset, data)`: `data` is a read-only memoryview."""
    return _mark(Operation.WRITE, func)


def on_trim(func: F) -> F:
    """Mark `trim(self, offset, length)`: the range's contents may be discarded."""
    return _mark(Operation.TRIM, func)


def on_flush(func: F) -> F:
    """Mark `flush(self)`: make every completed write durable."""
    return _mark(Operation.FLUSH, func)


def on_unmount(func: F) -> F:
    """Mark `unmount(self)`: called once when serving ends."""
    return _mark(Operation.UNMOUNT, func)


# --- the dispatch table ------------------------------------------------------------
@attrs.frozen
class DispatchTable:
    """What @device collected from a class: attribute name per operation,
    geometry (None where it is read from each instance) and options."""

    cls: type
    handlers: Mapping[Operation, str]
    block_size: int | None
    blocks: int | None
    concurrency: int
    multi_conn: bool

    @property
    def read_only(self) -> bool:
        return Operation.WRITE not in self.handlers


def _collect(cls: type) -> dict[Operation, str]:
    """Walk the MRO from the most basic class to `cls`; a later class's mark
    for an operation replaces an earlier one, a plain override of a marked
    name keeps the mark, and `name = None` removes the handler."""
    handlers: dict[Operation, str] = {}
    for klass in reversed(cls.__mro__):
        found: dict[Operation, str] = {}
        for attr, value in vars(klass).items():
            if value is None and attr in handlers.values():
                handlers = {op: n for op, n in handlers.items() if n != attr}
                continue
            op = getattr(value, _MARK, None)
            if not isinstance(op, Operation):
                continue
            if op in found:
                raise DefinitionError(
                    f"{klass.__name__}: two handlers for {op.decorator}: "
                    f"{found[op]!r} and {attr!r}; expected at most one"
                )
            found[op] = attr
        for op, attr in found.items():
            # The name may have handled another operation in a base class.
            handlers = {o: n for o, n in handlers.items() if n != attr}
            handlers[op] = attr
    return handlers


def _check_signature(cls: type, op: Operation, attr: str) -> None:
    func = inspect.getattr_static(cls, attr)
    if not callable(func):
        raise DefinitionError(
            f"{cls.__name__}.{attr}: the {op.decorator} handler must be a method, got {func!r}"
        )
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    try:
        sig.bind(None, *range(len(op.arguments)))
    except TypeError:
        expected = ", ".join(("self", *op.arguments))
        given = ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in sig.parameters.values())
        raise DefinitionError(
            f"{cls.__name__}.{attr}: the {op.decorator} handler must accept ({expected}); got {attr}({given})"
        ) from None


@overload
def device(cls: type[T], /) -> type[T]: ...
@overload
def device(
    *,
    block_size: int | None = 4096,
    blocks: int | None = None,
    concurrency: int = 1,
    multi_conn: bool = False,
) -> Callable[[type[T]], type[T]]: ...
def device(
    cls: type[T] | None = None,
    /,
    *,
    block_size: int | None = 4096,
    blocks: int | None = None,
    concurrency: int = 1,
    multi_conn: bool = False,
) -> type[T] | Callable[[type[T]], type[T]]:
    """Make a class a block device.

    block_size: bytes per block, a power of two from 512 to the page size.
    blocks: the device's size in blocks. None: each instance says, through
        its own `blocks` (and `block_size`) attribute, set in `__init__`.
    concurrency: how many handler calls may run at once. 1 (the default)
        means handlers never overlap, safe for code that is not thread-safe.
    multi_conn: the device is safe to serve over several connections at once
        (a flush on one makes writes from all durable): advertised to clients
        and used by the kernel transport for several queues.
    """
    if block_size is not None:
        check_block_size(block_size)
        if blocks is not None:
            check_blocks(blocks, block_size)
    elif blocks is not None:
        check_blocks(blocks, MIN_BLOCK_SIZE)
    if not _is_int(concurrency) or concurrency < 1:
        raise DefinitionError(f"concurrency: expected an int >= 1, got {concurrency!r}")
    if not isinstance(multi_conn, bool):
        raise DefinitionError(f"multi_conn: expected a bool, got {multi_conn!r}")

    def decorate(klass: type[T]) -> type[T]:
        if not isinstance(klass, type):
            raise DefinitionError(f"@blockfs.device: expected a class, got {klass!r}")
        handlers = _collect(klass)
        for op, attr in handlers.items():
            _check_signature(klass, op, attr)
        if Operation.READ not in handlers:
            raise DefinitionError(
                f"{klass.__qualname__}: a device needs a read handler; mark one with @blockfs.on_read"
            )
        table = DispatchTable(
            cls=klass,
            handlers=types.MappingProxyType(handlers),
            block_size=block_size,
            blocks=blocks,
            concurrency=concurrency,
            multi_conn=multi_conn,
        )
        setattr(klass, _TABLE, table)
        return klass

    if cls is not None:
        return decorate(cls)
    return decorate


def dispatch_table(obj: object) -> DispatchTable:
    """The table of a device class or instance, or a clear error."""
    klass = obj if isinstance(obj, type) else type(obj)
    table = vars(klass).get(_TABLE)
    if table is None:
        marked = sorted(a for k in klass.__mro__ for a, v in vars(k).items() if hasattr(v, _MARK))
        hint = f" (it has handlers marked: {', '.join(marked)})" if marked else ""
        if getattr(klass, _TABLE, None) is not None:
            hint = " (it inherits from a device class: decorate the subclass too)"
        raise DefinitionError(
            f"{klass.__qualname__} is not a @blockfs.device class{hint}; "
            "decorate it with @blockfs.device(block_size=..., blocks=...)"
        )
    assert isinstance(table, DispatchTable)
    return table


# --- binding a table to an instance ---------------------------------------------------
Handler = Callable[..., Any]


@attrs.frozen
class BoundDevice:
    """An instance with its handlers resolved and its geometry validated:
    what the serve loop works with."""

    instance: object
    table: DispatchTable
    geometry: Geometry
    read: Handler
    write: Handler | None
    trim: Handler | None
    flush: Handler | None
    unmount: Handler | None
    read_only: bool

    @property
    def size(self) -> int:
        return self.geometry.size

    @property
    def transmission_flags(self) -> int:
        """What a client is told about this device."""
        flags = TransmissionFlag.HAS_FLAGS
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= TransmissionFlag.SEND_WRITE_ZEROES
            if self.trim is not None:
                flags |= TransmissionFlag.SEND_TRIM
        if self.flush is not None:
            flags |= TransmissionFlag.SEND_FLUSH
            if not self.read_only:
                flags |= TransmissionFlag.SEND_FUA
        if self.table.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        return int(flags)


def _instance_value(instance: object, name: str, declared: int | None) -> object:
    if declared is not None:
        return declared
    if not hasattr(instance, name):
        raise GeometryError(
            f"{name}: {type(instance).__qualname__} declares no {name} in @blockfs.device, "
            f"so the instance must set self.{name}; it has none"
        )
    return getattr(instance, name)


def bind(instance: object, *, read_only: bool = False) -> BoundDevice:
    """Resolve an instance's handlers and geometry; `read_only` forces a
    read-only view of a writable device."""
    if isinstance(instance, type):
        raise DefinitionError(
            f"expected an instance of a device class, got the class {instance.__qualname__}; "
            f"call it first: {instance.__qualname__}()"
        )
    table = dispatch_table(instance)
    block_size = _instance_value(instance, "block_size", table.block_size)
    check_block_size(block_size)
    assert isinstance(block_size, int)
    blocks = _instance_value(instance, "blocks", table.blocks)
    geometry = Geometry(block_size, blocks)  # type: ignore[arg-type]

    def handler(op: Operation) -> Handler | None:
        attr = table.handlers.get(op)
        return None if attr is None else getattr(instance, attr)

    write = None if read_only else handler(Operation.WRITE)
    read = handler(Operation.READ)
    assert read is not None
    return BoundDevice(
        instance=instance,
        table=table,
        geometry=geometry,
        read=read,
        write=write,
        trim=None if write is None else handler(Operation.TRIM),
        flush=handler(Operation.FLUSH),
        unmount=handler(Operation.UNMOUNT),
        read_only=write is None,
    )
