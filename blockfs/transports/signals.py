"""SIGINT/SIGTERM as a clean stop, for the blocking entry points."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("blockfs")


def stop_on_signals(stop: Callable[[], None], what: str) -> Callable[[], None]:
    """Install handlers that call `stop` on SIGINT/SIGTERM; returns a function
    that restores the previous handlers. Only possible in the main thread.

    `stop` runs in a new thread, never in the handler itself: it may block on
    the kernel or on other threads that the interrupted main thread holds up."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("%s: %s, stopping", what, signal.Signals(signum).name)
        threading.Thread(target=stop, name="blockfs-stop", daemon=True).start()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
