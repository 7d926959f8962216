"""SIGTERM as an interrupt: ``kill`` ends a run through the same save path as Ctrl-C; and a
write-out phase that an interrupt cannot cut.

Why: a run killed by a scheduler or ``timeout`` must still leave a consistent checkpoint and a
partial report, and the code that writes them already catches KeyboardInterrupt. While that code
runs (metrics, tables, report and plots), an interrupt is held until the files are written: raised
inside matplotlib's garbage collection it would otherwise be swallowed as "Exception ignored".
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any


class RunInterrupted(KeyboardInterrupt):
    """An interrupt that a mode has handled: ``saved`` says what it wrote (the CLI prints it, exit 130)."""

    def __init__(self, saved: str) -> None:
        super().__init__(saved)
        self.saved = saved


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_sigterm_interrupt() -> Any:
    """Make SIGTERM raise KeyboardInterrupt from now on; returns the previous handler.

    Raises ValueError outside the main thread (where Python cannot set signal handlers).
    """
    return signal.signal(signal.SIGTERM, _raise_interrupt)


@contextlib.contextmanager
def _handling(handlers: dict[int, Callable[[int, FrameType | None], Any]]) -> Iterator[None]:
    """``handlers`` installed for the block, the previous ones restored after it; outside the main thread
    (where Python cannot set signal handlers) signals are left alone."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block; outside the main thread signals are left alone."""
    with _handling({signal.SIGTERM: _raise_interrupt}):
        yield


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM inside the block are remembered, not raised; KeyboardInterrupt on leaving it
    if one arrived. Outside the main thread signals are left alone."""
    received: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    with _handling({signal.SIGINT: remember, signal.SIGTERM: remember}):
        yield
    if received:
        raise KeyboardInterrupt(f"signal {received[0]} (held while the run's files were written)")
