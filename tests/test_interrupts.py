"""SIGINT/SIGTERM held by ``invact.fitting.interrupts``: delivered after the block, never inside it.

Each case runs in a fresh interpreter (its own signal handlers and threads), which prints what its
handler saw; the test reads that.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import os, signal, sys, time
import numpy                                  # its BLAS starts a thread: signals can land there
from invact.fitting.interrupts import Interrupted, raise_interrupted, signals_deferred

def in_import(frame):
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False

def handler(signum, frame):
    print("handler ran", "inside an import" if in_import(frame) else "outside imports", flush=True)
    raise_interrupted(signum, frame)

signal.signal(signal.SIGINT, handler)
signal.signal(signal.SIGTERM, handler)
"""


def child(body: str) -> list[str]:
    code = PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[:-1]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_in_the_block_is_delivered_when_it_ends(sig):
    """Sleeping releases the GIL: with the main thread's signal mask as the only guard, the BLAS thread
    took the signal and the handler ran at the first sleep (the bug this module fixes)."""
    lines = child(f"""
        try:
            with signals_deferred():
                os.kill(os.getpid(), signal.{sig})
                for _ in range(50):
                    time.sleep(0.002)
                print("block ended", flush=True)
        except Interrupted as exc:
            print("interrupted", signal.Signals(exc.signum).name)
        """)
    assert lines == ["block ended", "handler ran outside imports", f"interrupted {sig}"]


def test_nested_blocks_deliver_at_the_outer_end():
    lines = child("""
        try:
            with signals_deferred():
                with signals_deferred():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.01)
                print("inner ended", flush=True)
                time.sleep(0.01)
                print("outer ended", flush=True)
        except Interrupted:
            print("interrupted")
        """)
    assert lines == ["inner ended", "outer ended", "handler ran outside imports", "interrupted"]


def test_handlers_are_restored_and_a_quiet_block_delivers_nothing():
    lines = child("""
        with signals_deferred():
            time.sleep(0.01)
        print(signal.getsignal(signal.SIGINT) is handler, signal.getsignal(signal.SIGTERM) is handler)
        """)
    assert lines == ["True True"]


def test_a_signal_during_a_held_import_runs_the_handler_after_it():
    """The signal is sent from inside the import (a finder on sys.meta_path, at torch's first
    submodule): its handler must not run in any import frame, where torch's pybind11 code can be
    the caller and an exception aborts the process. It runs as the block ends."""
    lines = child("""
        class SendOnce:
            sent = False
            def find_spec(self, name, path=None, target=None):
                if name.startswith("torch.") and not self.sent:
                    SendOnce.sent = True
                    os.kill(os.getpid(), signal.SIGTERM)
                return None
        sys.meta_path.insert(0, SendOnce())
        try:
            with signals_deferred():
                import torch
            print("imported", flush=True)
            time.sleep(0.01)
        except Interrupted:
            print("interrupted, torch imported:", "torch.nn.functional" in sys.modules)
        """)
    assert lines == ["handler ran outside imports", "interrupted, torch imported: True"]
