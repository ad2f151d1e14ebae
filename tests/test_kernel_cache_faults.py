"""The kernel cache and the C kernels' threads under process and machine faults (hunt_E): a fork while
a thread waits for the cache's lock, the forward's per-thread buffer of threads that exit, a file
system without locks, a full disk, a umask of 000."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from invact import cpu_kernel, kernel_cache

NEEDS_CC = pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler")
ANSWER_C = "int answer(void) { return 42; }\n"


def _check_answer(lib: ctypes.CDLL) -> None:
    if lib.answer() != 42:
        raise RuntimeError("wrong library")


# --- a fork while a thread waits for the lock ------------------------------------------------------

FORK_WAITING_SCRIPT = r"""
import fcntl, os, signal, sys, threading, time
from pathlib import Path
from invact import kernel_cache
directory = Path(sys.argv[1])
other = os.open(directory, os.O_RDONLY)     # another process building there: its own open file
fcntl.flock(other, fcntl.LOCK_EX)

def build():
    with kernel_cache._locked(directory):
        pass

def free():
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)

waiter = threading.Thread(target=build)
waiter.start()
time.sleep(0.5)                             # the waiter is blocked in flock
child = os.fork()                           # as a DataLoader worker or a Pool may be
if child == 0:
    os.close(other)
    time.sleep(60)
    os._exit(0)
os.close(other)                             # the other build is done: the waiter locks, then unlocks
waiter.join()
print("free" if free() else "held by the child")
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
"""


def test_a_child_forked_while_a_thread_waits_for_the_lock_does_not_keep_it(tmp_path):
    """A thread blocked in the cache's flock when the process forks takes the lock later on the open
    file the child copied: the child used to keep that copy (it was recorded only once locked), so
    after the thread's build the lock stayed held for the child's life (every later build, the
    child's own included, blocked). The lock is free once the thread is done."""
    done = subprocess.run([sys.executable, "-c", FORK_WAITING_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "free"


# --- the forward's per-thread buffer ---------------------------------------------------------------

class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _allocated() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2, over all arenas)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


LIBRARIES = {"cpu_kernels": ("AVX512", cpu_kernel.SOURCE, cpu_kernel.HEADERS, None),
             "cpu_avx2": ("AVX2", cpu_kernel.AVX2_SOURCE, cpu_kernel.AVX2_HEADERS, cpu_kernel.AVX2_FLAGS)}


def _runs(isa: str) -> bool:
    here = torch.backends.cpu.get_cpu_capability()
    return here == "AVX512" or here == isa


@pytest.fixture(scope="module")
def pthread_builds(tmp_path_factory):
    """Each forward library's build with plain pthreads (csrc/invact_threads.h's other spawn: a compiler
    that is not GCC, a PyTorch without libgomp), unoptimised, in a cache of its own."""
    cache = tmp_path_factory.mktemp("pthread-cache")
    built = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kernel_cache.CACHE_ENV, str(cache))
        mp.setattr(kernel_cache, "threading_flags", lambda compiler: (("-pthread",),))
        for name, (isa, source, headers, flags) in LIBRARIES.items():
            if _runs(isa):
                flags = tuple("-O0" if f == "-O3" else f for f in (flags or cpu_kernel.FLAGS))
                builds = cpu_kernel.builds(name, source, headers, cpu_kernel._compiler(), flags)
                built[name] = cpu_kernel._bind(kernel_cache.load_first(builds, cpu_kernel._check_abi))
    return built


@NEEDS_CC
@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc's mallinfo2")
@pytest.mark.parametrize("threads", ["default", "pthread"])
@pytest.mark.parametrize("name", list(LIBRARIES))
def test_forward_buffers_of_exited_threads_are_freed(name, threads, pthread_builds):
    """300 one-pass forwards (hardswish, float32, 2 jobs), each from a new thread: every thread that ran
    a job used to keep its 512 KiB step buffer after it exited (a Python thread per task, and in the
    pthread build every call's spawned thread: 150-300 MiB here, without bound in training). Memory
    in use now grows by less than 32 MiB."""
    isa = LIBRARIES[name][0]
    if not _runs(isa):
        pytest.skip(f"no {isa} CPU (as ATen sees it)")
    lib = pthread_builds[name] if threads == "pthread" else \
        cpu_kernel.library() if name == "cpu_kernels" else cpu_kernel._avx2_library()
    if lib is None:
        pytest.skip("the kernel is switched off or could not be built")
    n = 65536                                        # 2 jobs of csrc/invact_threads.h's MIN_PER_THREAD bytes
    x = torch.linspace(-4.0, 4.0, n)
    y, packed = torch.empty(n), torch.empty(n // 8, dtype=torch.uint8)
    thr, codes = (ctypes.c_float * 1)(0.0), (ctypes.c_int32 * 2)(0, 1)
    results = []

    def forward():
        results.append(lib.invact_forward_code(cpu_kernel.FORWARDS["F.hardswish(x)"], n, 0, n, x.data_ptr(),
                                               y.data_ptr(), 1, thr, 0, codes, 0, 1, packed.data_ptr(), 2))

    def on_new_threads(calls: int) -> None:
        for _ in range(calls):
            thread = threading.Thread(target=forward)
            thread.start()
            thread.join()

    on_new_threads(20)                               # arenas and pools warmed up
    before = _allocated()
    on_new_threads(300)
    grown = _allocated() - before
    assert results == [0] * 320
    assert torch.equal(y, torch.nn.functional.hardswish(x))
    assert grown < 32 << 20, f"{grown / 2**20:.0f} MiB more in use after 300 threads"


# --- a file system without locks -------------------------------------------------------------------

@NEEDS_CC
def test_builds_without_locks_keep_each_others_files(fresh_cache, tmp_path, monkeypatch):
    """Where flock fails (ENOLCK on some NFS mounts) builds run at once: the first to record its build
    used to remove the others' files still in their compilers ("stale" builds of the key), and they
    failed with FileNotFoundError (a worse build variant, or Inductor, for that process). Four
    concurrent loads of one key (the first compiler exits at once, the others 1.5 s after writing
    their file) now all load their own build."""
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    source, first = tmp_path / "answer.c", tmp_path / "first"
    source.write_text(ANSWER_C)
    wrapper = tmp_path / "cc"
    wrapper.write_text(f"#!/bin/sh\n{cpu_kernel._compiler()} \"$@\" || exit 1\n"
                       f"mkdir {first} 2>/dev/null || sleep 1.5\n")
    wrapper.chmod(0o755)
    command = [str(wrapper), "-shared", "-fPIC", str(source)]
    with ThreadPoolExecutor(4) as pool:
        libs = list(pool.map(lambda _: kernel_cache.load(command, "answer-0123", _check_answer), range(4)))
    assert [lib.answer() for lib in libs] == [42] * 4
    manifest = json.loads((fresh_cache / "answer-0123.json").read_text())
    assert (fresh_cache / manifest["so"]).exists()


@NEEDS_CC
def test_a_build_removed_before_it_is_recorded_is_built_again(fresh_cache, tmp_path):
    """A fresh build that vanishes before its manifest is written (a process without the lock removed
    it) is built once more, not reported as a failed build."""
    source, log = tmp_path / "answer.c", tmp_path / "builds.log"
    source.write_text(ANSWER_C)
    wrapper = tmp_path / "cc"                # its first build removes its own output after writing it
    wrapper.write_text(f"#!/bin/sh\n{cpu_kernel._compiler()} \"$@\" || exit 1\necho built >> {log}\n"
                       f"[ $(wc -l < {log}) -gt 1 ] || rm -f \"$(echo \"$@\" | sed 's/.* -o //')\"\n")
    wrapper.chmod(0o755)
    lib = kernel_cache.load([str(wrapper), "-shared", "-fPIC", str(source)], "answer-0123", _check_answer)
    assert lib.answer() == 42 and log.read_text().count("built") == 2


# --- a full disk -----------------------------------------------------------------------------------

@NEEDS_CC
@pytest.mark.parametrize("fails", ["manifest", "link"])
def test_a_full_cache_directory_uses_the_private_fallback(fresh_cache, tmp_path, monkeypatch, fails):
    """No space left in the cache directory (the manifest's write, or the linker's output) was raised as
    a failed build, so every process fell back to Inductor (tens of seconds each) and left the fresh
    .so on the full disk. Now one warning names the directory and why, the kernel is cached in the
    private fallback, and nothing is left in the full directory."""
    fresh_cache.mkdir(mode=0o700)
    source = tmp_path / "answer.c"
    source.write_text(ANSWER_C)
    compiler = cpu_kernel._compiler()
    if fails == "manifest":
        real = kernel_cache.tempfile.mkstemp

        def mkstemp(*args, dir=None, suffix=None, **kwargs):
            if dir is not None and Path(dir) == fresh_cache and suffix == ".json":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(dir) / "x.json"))
            return real(*args, dir=dir, suffix=suffix, **kwargs)

        monkeypatch.setattr(kernel_cache.tempfile, "mkstemp", mkstemp)
    else:
        wrapper = tmp_path / "cc"
        wrapper.write_text(f"#!/bin/sh\ncase \"$*\" in *'-o {fresh_cache}/'*)\n"
                           f"  echo '/usr/bin/ld: final link failed: {os.strerror(errno.ENOSPC)}' >&2; exit 1;;\nesac\n"
                           f"exec {compiler} \"$@\"\n")
        wrapper.chmod(0o755)
        compiler = str(wrapper)
    with pytest.warns(RuntimeWarning, match=f"not using the kernel cache {fresh_cache}: .*No space left"):
        lib = kernel_cache.load([compiler, "-shared", "-fPIC", str(source)], "answer-0123", _check_answer)
    assert lib.answer() == 42 and Path(lib._name).parent == kernel_cache.private_cache_dir()
    assert list(fresh_cache.iterdir()) == []


# --- umask 000 -------------------------------------------------------------------------------------

def test_folders_created_above_the_cache_are_private(tmp_path):
    """With umask 000 the missing folders above $INVACT_CACHE were created 0777 (only the cache itself
    0700), so another user could swap the cache between its checks and the load. All are 0700."""
    cache = tmp_path / "a" / "b" / "cache"
    old = os.umask(0)
    try:
        assert kernel_cache._prepared(cache) is None
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a", tmp_path / "a" / "b", cache)] == [0o700] * 3


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """$INVACT_CACHE = tmp_path/cache (not created yet); the private fallback cache in tmp_path."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return cache
