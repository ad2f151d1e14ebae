"""SIGINT and SIGTERM in the command line: raised as :class:`KeyboardInterrupt`, held where raising
would do harm.

Python runs a signal's handler at the next bytecode of the main thread, which may be Python code that
a C++ extension called (a pybind11 module's initialisation): an exception raised there can reach C++
where nothing catches it, and the process aborts (SIGABRT, "terminate called after throwing an
instance of 'pybind11::error_already_set'"), as torch's import did when a SIGTERM landed in
``torch._C._c10d_init``. Such imports (torch, matplotlib, the fitter modules that import scipy), and
the writes that must not stop half way, run with the signals held (:func:`signals_deferred`); a
signal that came is delivered when they end.

Holding is done by the handlers, not by the thread's signal mask: with the main thread's mask set,
the kernel hands a process-directed signal to another thread (numpy's BLAS starts one at import),
whose C handler flags it for the main thread, which then runs the Python handler at its next
switch of the GIL, inside the block.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "raise_interrupted", "signals_deferred"]

HELD = frozenset({signal.SIGINT, signal.SIGTERM})


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler; carries the signal number for the exit status."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def raise_interrupted(signum: int, frame) -> None:
    """A signal handler: raise :class:`Interrupted` for ``signum``."""
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver the first that came to the handler that
    was in place (raising, exiting, or whatever it does). Outside the main thread, where no handler
    runs, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: came.append(signum)) for sig in HELD}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if came:
            signal.raise_signal(came[0])

