"""The `blockfs` command (also `python -m blockfs`).

    blockfs serve FILE.py:Class [--arg k=v ...] --socket PATH | --listen HOST:PORT | --stdio
    blockfs run   FILE.py:Class [--arg k=v ...] /dev/nbdX
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .dispatch.declare import dispatch_table
from .errors import BlockfsError
from .transports.kernel import run
from .transports.network import TLS, Server, serve, serve_stdio

log = logging.getLogger("blockfs.cli")


class UsageError(BlockfsError, ValueError):
    """The command line names something that cannot be used."""


def load_class(spec: str) -> type:
    """'path/to/file.py:Class' or 'package.module:Class' -> the class."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UsageError(f"device: expected FILE.py:Class or module:Class, got {spec!r}")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"device: no such file {target!r}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    cls = getattr(module, name, None)
    if cls is None:
        raise UsageError(f"device: {target} has no {name!r}")
    dispatch_table(cls)  # a clear error if it is not a device class
    return cls  # type: ignore[no-any-return]


def make_device(spec: str, args: Sequence[str]) -> Any:
    kwargs = {}
    for item in args:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--arg: expected NAME=VALUE, got {item!r}")
        kwargs[key] = value
    cls = load_class(spec)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"{cls.__name__}({', '.join(f'{k}=...' for k in kwargs)}): {exc}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockfs", description="Serve a Python block device.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True)

    def device_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("device", help="FILE.py:Class or module:Class (a @blockfs.device class)")
        sp.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                        help="keyword argument for the class (repeatable; values are strings)")
        sp.add_argument("--read-only", action="store_true", help="serve read-only even if writable")

    s = sub.add_parser("serve", help="serve over the NBD network protocol (no root needed)")
    device_args(s)
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="listen on a Unix socket")
    where.add_argument("--listen", metavar="HOST:PORT", help="listen on TCP (default host 127.0.0.1)")
    where.add_argument("--stdio", action="store_true", help="one connection on stdin/stdout (like nbdkit -s)")
    s.add_argument("--export-name", default="", help="the export's name (default: empty)")
    s.add_argument("--description", help="the export's description, shown by nbdinfo --list")
    s.add_argument("--max-clients", type=int, default=64)
    s.add_argument("--handshake-timeout", type=float, default=10.0)
    s.add_argument("--tls", choices=["on", "require"], help="offer or demand TLS (needs --tls-cert/--tls-key)")
    s.add_argument("--tls-cert", help="server certificate (PEM)")
    s.add_argument("--tls-key", help="server private key (PEM)")
    s.add_argument("--tls-ca", help="CA (PEM) that client certificates must be signed by")

    r = sub.add_parser("run", help="attach to a kernel NBD device (root)")
    device_args(r)
    r.add_argument("path", help="the NBD device, e.g. /dev/nbd0")
    r.add_argument("--timeout", type=int, help="seconds the kernel waits for a reply")
    r.add_argument("--connections", type=int, default=1, help="sockets (kernel queues); needs multi_conn")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, stream=sys.stderr, format="blockfs: %(name)s: %(message)s")
    try:
        device = make_device(args.device, args.arg)
        if args.command == "run":
            run(device, args.path, timeout=args.timeout, connections=args.connections, read_only=args.read_only)
            return 0
        if args.stdio:
            serve_stdio(device, export_name=args.export_name, read_only=args.read_only,
                        description=args.description)
            return 0
        tls = None
        if args.tls or args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key):
                raise UsageError("--tls: expected both --tls-cert and --tls-key")
            tls = TLS(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, mode=args.tls or "require")

        def ready(server: Server) -> None:
            for uri in server.uris():
                print(uri, flush=True)  # the one line of output: what clients connect to

        serve(device, args.socket or args.listen, export_name=args.export_name, read_only=args.read_only,
              description=args.description, tls=tls, max_clients=args.max_clients,
              handshake_timeout=args.handshake_timeout, on_ready=ready)
        return 0
    except (BlockfsError, OSError, ValueError) as exc:
        print(f"blockfs: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
