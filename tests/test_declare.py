"""Declaring devices: every check happens at class definition (or at bind()
for per-instance geometry), and every error names the parameter, what was
expected and what was given."""

from __future__ import annotations

import os

import pytest

import blockfs
from blockfs import DefinitionError, GeometryError, Operation
from blockfs.protocol.constants import TransmissionFlag as F

PAGE = os.sysconf("SC_PAGE_SIZE")


def make(**kw: object) -> type:
    @blockfs.device(**kw)  # type: ignore[arg-type]
    class D:
        @blockfs.on_read
        def read(self, offset: int, buf: memoryview) -> None: ...

    return D


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"block_size": 1000, "blocks": 1}, "block_size: expected a power of two from 512 to"),
        ({"block_size": 256, "blocks": 1}, "got 256"),
        ({"block_size": PAGE * 2, "blocks": 1}, f"(the page size), got {PAGE * 2}"),
        ({"block_size": "4096", "blocks": 1}, "block_size: expected an int, got '4096' (str)"),
        ({"block_size": True, "blocks": 1}, "block_size: expected an int, got True (bool)"),
        ({"block_size": 4096, "blocks": 0}, "blocks: expected a positive int, got 0"),
        ({"block_size": 4096, "blocks": -5}, "blocks: expected a positive int, got -5"),
        ({"block_size": 4096, "blocks": 1.5}, "blocks: expected a positive int, got 1.5 (float)"),
        ({"block_size": 4096, "blocks": 2**52}, "more than the largest device size"),
    ],
)
def test_geometry_is_checked_at_definition(kw: dict[str, object], message: str) -> None:
    with pytest.raises(GeometryError) as info:
        make(**kw)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_valid_geometry_and_largest_size() -> None:
    for bs in (512, 1024, 2048, PAGE):
        make(block_size=bs, blocks=1)
    make(block_size=512, blocks=(2**63 - 1) // 512)


def test_options_are_checked() -> None:
    with pytest.raises(DefinitionError, match="concurrency: expected an int >= 1, got 0"):
        make(block_size=512, blocks=1, concurrency=0)
    with pytest.raises(DefinitionError, match="multi_conn: expected a bool, got 'yes'"):
        make(block_size=512, blocks=1, multi_conn="yes")


def test_handler_signatures_are_checked() -> None:
    with pytest.raises(DefinitionError) as info:

        @blockfs.device(block_size=512, blocks=1)
        class Bad:
            @blockfs.on_read
            def read(self, offset: int) -> None: ...

    assert "Bad.read: the on_read handler must accept (self, offset, buf); got read(self, offset)" in str(info.value)
    assert isinstance(info.value, TypeError)

    with pytest.raises(DefinitionError, match=r"must accept \(self\); got flush\(self, force\)"):

        @blockfs.device(block_size=512, blocks=1)
        class Bad2:
            @blockfs.on_read
            def read(self, offset: int, buf: memoryview) -> None: ...

            @blockfs.on_flush
            def flush(self, force: bool) -> None: ...


def test_extra_defaulted_and_star_arguments_are_fine() -> None:
    @blockfs.device(block_size=512, blocks=1)
    class Ok:
        @blockfs.on_read
        def read(self, *args: object) -> None: ...

        @blockfs.on_write
        def write(self, offset: int, data: memoryview, extra: int = 0) -> None: ...

    assert blockfs.dispatch_table(Ok).handlers == {Operation.READ: "read", Operation.WRITE: "write"}


def test_two_handlers_for_one_operation() -> None:
    with pytest.raises(DefinitionError, match="two handlers for on_read: 'a' and 'b'; expected at most one"):

        @blockfs.device(block_size=512, blocks=1)
        class Twice:
            @blockfs.on_read
            def a(self, offset: int, buf: memoryview) -> None: ...

            @blockfs.on_read
            def b(self, offset: int, buf: memoryview) -> None: ...


def test_one_function_two_operations() -> None:
    with pytest.raises(DefinitionError, match="already marked @blockfs.on_read"):

        class C:
            @blockfs.on_write
            @blockfs.on_read
            def f(self, offset: int, buf: memoryview) -> None: ...


def test_decorator_on_a_non_method() -> None:
    with pytest.raises(DefinitionError, match="defined outside a class"):

        @blockfs.on_read
        def loose(offset: int, buf: memoryview) -> None: ...

    with pytest.raises(DefinitionError, match="got a staticmethod"):

        class C:
            @blockfs.on_read
            @staticmethod
            def read(offset: int, buf: memoryview) -> None: ...

    with pytest.raises(DefinitionError, match="expected a function defined in a class, got 42"):
        blockfs.on_read(42)  # type: ignore[type-var]


def test_marked_class_without_device_decorator_is_a_clear_error() -> None:
    class NotDecorated:
        @blockfs.on_read
        def read(self, offset: int, buf: memoryview) -> None: ...

    with pytest.raises(DefinitionError, match=r"NotDecorated is not a @blockfs.device class \(it has handlers marked: read\)"):
        blockfs.bind(NotDecorated())


def test_device_needs_a_read_handler_and_a_class() -> None:
    with pytest.raises(DefinitionError, match="needs a read handler"):

        @blockfs.device(block_size=512, blocks=1)
        class NoRead:
            pass

    with pytest.raises(DefinitionError, match="expected a class"):
        blockfs.device(block_size=512, blocks=1)(lambda: None)  # type: ignore[arg-type]


def test_bare_decorator_uses_defaults_and_per_instance_size() -> None:
    @blockfs.device
    class Bare:
        def __init__(self, blocks: int) -> None:
            self.blocks = blocks

        @blockfs.on_read
        def read(self, offset: int, buf: memoryview) -> None: ...

    assert blockfs.bind(Bare(10)).geometry == blockfs.Geometry(4096, 10)


def test_per_instance_geometry_is_validated_at_bind() -> None:
    @blockfs.device(block_size=4096)
    class FileDisk:
        def __init__(self, blocks: object) -> None:
            if blocks is not None:
                self.blocks = blocks

        @blockfs.on_read
        def read(self, offset: int, buf: memoryview) -> None: ...

    with pytest.raises(GeometryError, match="blocks: expected a positive int, got 0"):
        blockfs.bind(FileDisk(0))
    with pytest.raises(GeometryError, match="the instance must set self.blocks; it has none"):
        blockfs.bind(FileDisk(None))

    @blockfs.device(block_size=None, blocks=8)
    class SizedByInstance:
        block_size = 3000

        @blockfs.on_read
        def read(self, offset: int, buf: memoryview) -> None: ...

    with pytest.raises(GeometryError, match="got 3000"):
        blockfs.bind(SizedByInstance())


def test_bind_wants_an_instance() -> None:
    with pytest.raises(DefinitionError, match="got the class RO; call it first"):
        blockfs.bind(RO)


@blockfs.device(block_size=512, blocks=8)
class RO:
    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None: ...


@blockfs.device(block_size=512, blocks=8)
class RW(RO):
    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None: ...

    @blockfs.on_trim
    def trim(self, offset: int, length: int) -> None: ...

    @blockfs.on_flush
    def flush(self) -> None: ...


def test_advertised_flags_follow_the_handlers() -> None:
    ro = blockfs.bind(RO())
    assert ro.read_only and ro.transmission_flags == F.HAS_FLAGS | F.READ_ONLY
    rw = blockfs.bind(RW())
    assert not rw.read_only
    assert rw.transmission_flags == F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM | F.SEND_WRITE_ZEROES
    forced = blockfs.bind(RW(), read_only=True)
    assert forced.read_only and forced.write is None and forced.trim is None
    assert forced.transmission_flags & F.READ_ONLY


def test_subclasses_inherit_override_and_remove_handlers() -> None:
    calls: list[str] = []

    @blockfs.device(block_size=512, blocks=8)
    class Child(RW):
        def write(self, offset: int, data: memoryview) -> None:  # plain override keeps the mark
            calls.append("child write")

        @blockfs.on_read
        def fetch(self, offset: int, buf: memoryview) -> None:  # a new name replaces read
            calls.append("fetch")

        trim = None  # removes the trim handler

    table = blockfs.dispatch_table(Child)
    assert table.handlers == {Operation.READ: "fetch", Operation.WRITE: "write", Operation.FLUSH: "flush"}
    bound = blockfs.bind(Child())
    bound.write(0, memoryview(b""))
    bound.read(0, memoryview(bytearray(1)))
    assert calls == ["child write", "fetch"]
    assert bound.trim is None and not bound.transmission_flags & F.SEND_TRIM


def test_undecorated_subclass_of_a_device_is_explained() -> None:
    class Sub(RO):
        pass

    with pytest.raises(DefinitionError, match="inherits from a device class: decorate the subclass too"):
        blockfs.bind(Sub())


def test_the_table_is_frozen() -> None:
    table = blockfs.dispatch_table(RW)
    with pytest.raises(TypeError):
        table.handlers[Operation.READ] = "x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        table.concurrency = 3  # type: ignore[misc]


def test_public_api_is_exported() -> None:
    for name in blockfs.__all__:
        assert hasattr(blockfs, name), name
    assert os.path.exists(os.path.join(os.path.dirname(blockfs.__file__), "py.typed"))


def test_parse_size() -> None:
    assert blockfs.parse_size("10G") == 10 << 30
    assert blockfs.parse_size("64KiB") == 64 << 10
    assert blockfs.parse_size("4096") == 4096
    with pytest.raises(ValueError, match="got 'ten'"):
        blockfs.parse_size("ten")
