"""Where invact keeps the C kernels it compiles, and what it will load from there (a trust boundary).

Loading a shared object runs its constructors, so only a file this process can vouch for is loaded:
a build records the sha256 of the ``.so`` it made in a manifest next to it (``<key>.json``, written
atomically after the build, under a fresh random ``.so`` name), and a later process loads the file the
manifest names only if the directory, the manifest and the file are owned by this user and writable
by no one else, and the file's sha256 matches. Every folder above the cache must be owned by this
user or root and, where group or others may write it, sticky (as /tmp), so that no one else can rename
the cache or a folder above it and put their own in its place (these checks of the folders, and where
the cache is, are :mod:`invact.cache_dirs`'s). The ``.so`` itself is opened once,
without following a link; its owner and mode are checked and its bytes hashed through that descriptor,
and the loader maps the file of that descriptor (``/proc/self/fd/N``, where there is one), so that a
file swapped in by path meanwhile is never loaded. A build runs in a fresh 0700 folder inside the cache
on a copy of the exact source bytes its key was made of (:class:`Source`), and is checked and hashed
through its descriptor the same way before it is renamed into place, recorded and loaded.

The cache is ``$INVACT_CACHE``, else ``$XDG_CACHE_HOME/invact``, else ``~/.cache/invact``
(:func:`cache_dir`), created 0700 (and any folder above it that it creates). Where it cannot serve:

* no home directory, or a cache that cannot be created, is not a directory, is a symbolic link, is
  owned by someone else or is writable by group or others, or lies below a folder that someone else
  owns (root aside) or that group or others may write without the sticky bit: one warning naming it
  and why, and the kernels are cached in this user's private fallback, :func:`private_cache_dir`,
  verified the same way;
* a read-only cache, or one where a build cannot be written (a full disk, a quota, a path too long):
  its verified entries are loaded; a kernel it lacks is built into the fallback (one warning);
* a fallback that cannot serve either: one warning, and each kernel is built in a private temporary
  directory (removed once loaded) in every process;
* a ``.so`` whose hash does not match (changed after it was written) or that does not load: rebuilt
  under a fresh name and the manifest replaced, so the next process loads the new one.
A file with a predictable name planted in the cache is never loaded: only the manifest names files.
Builds into the cache hold an exclusive lock on its directory, so threads and processes that start at
once build each kernel once and load that build; recording a build removes the key's other builds
(without a lock, as on some NFS mounts, only those older than an hour: others may be in progress).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from .cache_dirs import CACHE_ENV, cache_dir, private_cache_dir, unsafe, unsafe_above as _unsafe_above, unsafe_stat

__all__ = ["CACHE_ENV", "OPENMP_RUNTIME", "Source", "cache_dir", "private_cache_dir", "unsafe", "load",
           "threading_flags", "load_first", "headers_of"]

OPENMP_RUNTIME = "libgomp.so.1"   # the OpenMP runtime PyTorch's Linux wheels load (by this soname)


class Source(NamedTuple):
    """A C file of a build command given by its bytes (those the cache key was made of): written into the
    build's private folder, where the compiler reads this copy, not a path someone may change meanwhile.
    The folder holds nothing else, so a quoted ``#include`` finds only the ``-I`` folders' headers."""

    name: str
    text: bytes


_QUOTED_INCLUDE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)


def headers_of(text: bytes, folder: Path) -> tuple[Path, ...]:
    """The headers of ``folder`` that C source ``text`` includes (``#include "..."``), directly or
    through one another, sorted: what a build's cache key hashes with the source, so that an edit of
    any header the compiler reads makes a new key. A name not in ``folder`` is a ValueError (the
    build's only ``-I`` folder would not find it either)."""
    found: dict[str, Path] = {}
    pending = [text]
    while pending:
        for name in _QUOTED_INCLUDE.findall(pending.pop()):
            name = name.decode()
            if name not in found:
                path = folder / name
                if not path.is_file():
                    raise ValueError(f"#include \"{name}\": no such header in {folder}")
                found[name] = path
                pending.append(path.read_bytes())
    return tuple(found[name] for name in sorted(found))


class _Refused(Exception):
    """A file that :func:`_opened` would not hand out (why: the message)."""


class _Verified(NamedTuple):
    """A ``.so`` checked through ``fd`` (open, the one to load): ``path`` where it lies, ``sha256`` of
    the bytes read from ``fd``."""

    path: Path
    fd: int
    sha256: str

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


_OPEN = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _opened(path: Path | str, dir_fd: int | None = None, directory: bool = False, built: bool = False) -> int:
    """A descriptor of ``path`` (relative to ``dir_fd`` where given) opened without following a link
    (nor waiting on a FIFO), which :func:`unsafe`'s checks pass on the open file itself, so that no
    rename or link can change what it reads; raises :class:`_Refused` where they fail. ``built``: a
    compiler's output in a private folder, made unwritable by others first (the umask may allow it)."""
    flags = _OPEN | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK) and hasattr(os, "O_NOFOLLOW"):
            raise _Refused("it is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if built and unsafe_stat(st) and stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o022)
            st = os.fstat(fd)
        reason = unsafe_stat(st, directory)
    except BaseException:
        os.close(fd)
        raise
    if reason:
        os.close(fd)
        raise _Refused(reason)
    return fd


def _read(fd: int) -> bytes:
    with open(fd, "rb", closefd=False) as f:
        return f.read()


def _verified(path: Path, sha256: str | None = None, dir_fd: int | None = None, built: bool = False) -> _Verified:
    """``path`` open (:func:`_opened`) and hashed through its descriptor; raises :class:`_Refused` where
    the checks fail or its sha256 is not ``sha256`` (where given)."""
    fd = _opened(path.name if dir_fd is not None else path, dir_fd, built=built)
    try:
        digest = hashlib.sha256(_read(fd)).hexdigest()
    except BaseException:
        os.close(fd)
        raise
    if sha256 is not None and digest != sha256:
        os.close(fd)
        raise _Refused("its sha256 differs from the one recorded when it was built")
    return _Verified(path, fd, digest)


def _cached(directory: Path, key: str, folder: int) -> tuple[_Verified | None, str | None]:
    """(the ``.so`` the manifest of ``key`` names, open, if every check passes, else None; why an entry
    that exists was refused, else None). Both files are opened in ``folder``, the cache ``directory``'s
    descriptor, whatever its path leads to meanwhile."""
    manifest = directory / f"{key}.json"
    so = None
    try:
        fd = _opened(manifest.name, folder)
        try:
            entry = json.loads(_read(fd))
        finally:
            os.close(fd)
        so = directory / Path(str(entry["so"])).name          # a bare name inside the directory
        return _verified(so, str(entry["sha256"]), folder), None
    except _Refused as refused:
        return None, f"{so or manifest}: {refused}"
    except FileNotFoundError:
        return None, None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:       # its path is too long: no entry, none can be written
            return None, None
        return None, f"{manifest}: unreadable ({error})"
    except (ValueError, KeyError, TypeError) as error:
        return None, f"{manifest}: unreadable ({error})"


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG)  # a directory that cannot take a build


def _compile(command: list[str | Source], directory: Path, key: str, folder: int) -> _Verified:
    """Build in a fresh 0700 folder in ``directory`` (the :class:`Source` items written there), check and
    hash the output through its descriptor (made unwritable by others), then rename it to a fresh random
    name in ``directory``; returned open. ``folder``: ``directory``'s descriptor, in which the build is
    looked for and renamed, whatever the path leads to meanwhile."""
    fd, out = tempfile.mkstemp(prefix=f"{key}-", suffix=".so", dir=directory)   # the name it will have
    os.close(fd)
    built = None
    try:
        with _private_dir(f".{key}-build-", directory) as build:
            argv = [str(_written(part, build)) if isinstance(part, Source) else part for part in command]
            target = build / f"{key}.so"
            done = subprocess.run([*argv, "-o", str(target)], capture_output=True, text=True)
            if done.returncode:
                for code in _FULL:           # the output could not be written there: an OSError of ``out``
                    if os.strerror(code) in done.stderr:
                        raise OSError(code, os.strerror(code), out)
                raise RuntimeError(f"{Path(argv[0]).name} exited with {done.returncode}: {done.stderr.strip()[:500]}")
            built = _built(folder, build, target, Path(out).name)
    except BaseException:
        if built is not None:
            built.close()
        with contextlib.suppress(OSError):
            os.unlink(out)
        raise
    return built._replace(path=Path(out))


def _written(source: Source, folder: Path) -> Path:
    path = folder / Path(source.name).name
    with _named(path), open(path, "xb") as f:
        f.write(source.text)
    return path


@contextlib.contextmanager
def _named(path: Path):
    """An OSError of writing ``path`` named by it: a failed write or flush (a full disk, a quota) has no
    filename, and :func:`_served` falls back to another cache only for errors inside its folder."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


def _built(folder: int, build: Path, target: Path, name: str) -> _Verified:
    """The compiler's output ``target`` in the private folder ``build`` in ``folder`` (a descriptor),
    open, renamed to ``name`` in ``folder``: the build folder checked through its own descriptor (ours,
    writable by no one else), the file opened and renamed relative to it."""
    try:
        private = _opened(build.name, folder, directory=True)
        try:
            built = _verified(target, dir_fd=private, built=True)
            try:
                os.replace(target.name, name, src_dir_fd=private, dst_dir_fd=folder)
            except BaseException:
                built.close()
                raise
            return built
        finally:
            os.close(private)
    except _Refused as refused:
        raise RuntimeError(f"invact: refusing the build {target}: {refused}") from None
    except OSError as error:                  # named by its full path (a vanished build is built again)
        raise type(error)(error.errno, error.strerror, str(target)) from None


def _record(directory: Path, key: str, so: _Verified, folder: int) -> None:
    """Write the manifest atomically (renamed into ``folder``, ``directory``'s descriptor): a reader sees
    the old entry or the new one, never half. The sha256 is the one read through the build's
    descriptor, the file that is loaded."""
    fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".json", dir=directory)
    try:
        with _named(Path(tmp)), os.fdopen(fd, "w") as f:
            json.dump({"so": so.path.name, "sha256": so.sha256}, f)
        os.replace(tmp, f"{key}.json", dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_PROC_FD = "/proc/self/fd"
_mapped: dict[tuple[int, int], int] = {}  # (device, inode) of each library loaded here -> its handle


def _dlopen(so: _Verified) -> ctypes.CDLL:
    """The library of ``so``'s descriptor: the loader opens ``/proc/self/fd/N``, the very file checked
    and hashed (the path, after the same checks, where there is no /proc/self/fd). The descriptor stays
    open while the library is mapped (for the process's life): the loader knows the library by that
    name, and a later library at the same descriptor number would otherwise be taken for it. A file
    already loaded is not opened again."""
    try:
        st = os.fstat(so.fd)
        handle = _mapped.get((st.st_dev, st.st_ino))
        if handle is not None:
            so.close()
            return ctypes.CDLL(str(so.path), handle=handle)
        if not os.path.isdir(_PROC_FD):
            so.close()
            return ctypes.CDLL(str(so.path))
        by_fd = f"{_PROC_FD}/{so.fd}"
        try:
            handle = ctypes.CDLL(by_fd)._handle
        except OSError as error:                    # named by its path, not the descriptor's
            raise OSError(str(error).replace(by_fd, str(so.path))) from None
    except BaseException:
        so.close()
        raise
    _mapped.setdefault((st.st_dev, st.st_ino), handle)
    return ctypes.CDLL(str(so.path), handle=handle)


def _open(so: _Verified, check: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    lib = _dlopen(so)
    check(lib)
    return lib


@contextlib.contextmanager
def _private_dir(prefix: str = "invact-kernel-", parent: Path | None = None) -> Iterator[Path]:
    """A fresh 0700 temporary directory of this user (in ``parent``, default the temporary directory),
    removed afterwards (a loaded library stays mapped)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _prepared(directory: Path) -> str | None:
    """Why ``directory`` cannot hold the cache (:func:`unsafe`, :func:`_unsafe_above`, or it cannot be
    created), else None; created 0700 where missing, as are the missing folders above it (whatever the
    umask)."""
    try:
        reason = _unsafe_above(directory)
        if reason:
            return reason
        created = False
        for path in reversed((directory, *directory.parents)):
            if not os.path.lexists(path):
                path.mkdir(mode=0o700, exist_ok=True)
                created = True
        if created and (reason := _unsafe_above(directory)):  # a folder another made first (in /tmp)
            return reason
        return unsafe(directory, directory=True)
    except OSError as error:
        return f"it cannot be created ({error.strerror or error})"


_warned: set[str] = set()


def warn_once(message: str, key: str | None = None, stacklevel: int = 1) -> None:
    """A RuntimeWarning once a process per ``key`` (the message itself by default); ``stacklevel`` counts
    from the caller, as :func:`warnings.warn`'s does."""
    if (key := message if key is None else key) not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


_held: set[int] = set()  # descriptors of the locks this process holds or waits for now
_held_guard = threading.Lock()  # held while a descriptor opens or closes, and across a fork


def _close_held() -> None:
    """In a forked child: close the copies of the lock descriptors, taken or awaited (a flock lasts while
    any descriptor of its open file is open, so a child that kept them would hold the lock for the life
    of the child: a thread blocked in flock when the fork came takes it later on that open file)."""
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()
    _held_guard.release()


if hasattr(os, "register_at_fork"):   # no fork between a descriptor's open (or close) and its record
    os.register_at_fork(before=_held_guard.acquire, after_in_parent=_held_guard.release,
                        after_in_child=_close_held)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[bool]:
    """An exclusive flock on the cache directory itself (no file is created), so that threads and
    processes starting at once (ranks on one node, a fresh container) build each kernel once and load
    that build; unlocked where flock is unavailable. Yields whether it locked."""
    try:
        import fcntl
        with _held_guard:
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
            _held.add(fd)
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released with the descriptor (and by the kernel if we die)
        except OSError:                     # a file system without locks (ENOLCK on some NFS): unlocked
            locked = False
        else:
            locked = True
        yield locked
    finally:
        with _held_guard:
            os.close(fd)
            _held.discard(fd)


_STALE_S = 3600  # without the lock, another process's build in progress is younger than this


def _remove_stale(directory: Path, key: str, kept: Path, locked: bool) -> None:
    """Remove this key's other builds (an interrupted build's, a replaced one's) and an interrupted
    build's folder: files of our naming that are ours, and without the lock only those older than
    :data:`_STALE_S` (another process may be building the others); one mapped by a running process
    stays mapped."""
    for pattern, folder in ((f"{key}-*.so", False), (f".{key}-build-*", True)):
        for path in directory.glob(pattern):
            with contextlib.suppress(OSError):
                if path != kept and unsafe(path, folder) is None and \
                        (locked or time.time() - path.stat().st_mtime > _STALE_S):
                    shutil.rmtree(path) if folder else path.unlink()


def load(command: list[str | Source], key: str, check: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    """The library that ``command`` (a compiler command line without ``-o``; a :class:`Source` item is a
    file given by its bytes) builds, from the cache
    (:func:`cache_dir`, else :func:`private_cache_dir`, warning once) under ``key`` (a name made of the
    inputs' hash) when a verified entry is there, else built and recorded there, one build at a time
    per cache (:func:`_locked`, taken where no verified entry loads); built in a private temporary
    directory where neither cache can serve.
    ``check(lib)`` raises RuntimeError for a library that loads but is not the expected one (treated
    like one that does not load). Raises RuntimeError, OSError or SubprocessError where a fresh build
    fails."""
    configured = cache_dir()
    why = _no_home() if configured is None else ""
    if configured is not None:
        lib, reason = _from_cache(command, configured, key, check)
        if lib is not None:
            return lib
        why = f"{configured}: {reason}"
    fallback = private_cache_dir()
    if fallback != configured:
        lib, reason = _from_cache(command, fallback, key, check)
        if lib is not None:
            warn_once(f"invact: not using the kernel cache {why}; caching the CPU kernels in {fallback} "
                      f"instead (set ${CACHE_ENV} to a directory only you can write)", stacklevel=4)
            return lib
        why += f"; nor {fallback}: {reason}"
    warn_once(f"invact: not using the kernel cache {why}; building each CPU kernel in a private temporary "
              f"directory, again in every process (set ${CACHE_ENV} to a directory only you can write)",
              stacklevel=4)
    with _private_dir() as private:
        folder = _opened(private, directory=True)
        try:
            return _open(_compile(command, private, key, folder), check)
        finally:
            os.close(folder)


def _no_home() -> str:
    uid = os.getuid() if hasattr(os, "getuid") else "?"
    return (f"~/.cache/invact: there is no home directory ($HOME is unset, empty or relative, and uid {uid} "
            "has no passwd entry)")


_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, *_FULL)


def _from_cache(command: list[str | Source], directory: Path, key: str,
                check: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL | None, str]:
    """(the library from the cache ``directory``: its verified entry, else built and recorded there;
    "") or (None, why the directory cannot serve: not safe, not creatable, read-only)."""
    reason = _prepared(directory)
    if reason:
        return None, reason
    try:                                            # what the path leads to now, checked: used from here on
        folder = _opened(directory, directory=True)
    except _Refused as refused:
        return None, str(refused)
    except OSError as error:
        return None, f"it cannot be opened ({error.strerror})"
    try:
        return _served(command, directory, key, check, folder)
    finally:
        os.close(folder)


def _served(command: list[str | Source], directory: Path, key: str, check: Callable[[ctypes.CDLL], None],
            folder: int) -> tuple[ctypes.CDLL | None, str]:
    """:func:`_from_cache` in the checked cache ``directory``, open as ``folder``."""
    so, _ = _cached(directory, key, folder)
    if so is not None:                              # the usual case: a verified build, no lock
        with contextlib.suppress(OSError, RuntimeError):
            return _open(so, check), ""
    if not os.access(directory, os.W_OK | os.X_OK):
        return None, "it is read-only"
    try:
        with _locked(directory) as locked:          # checked again: another may have built it
            return _load_or_build(command, directory, key, check, locked, folder), ""
    except OSError as error:             # writing there refused or failed (not the compiler's own error)
        if error.errno not in _UNWRITABLE or not str(error.filename).startswith(str(directory)):
            raise
        return None, f"it cannot be written ({error.strerror})"


def _load_or_build(command: list[str | Source], directory: Path, key: str, check: Callable[[ctypes.CDLL], None],
                   locked: bool, folder: int) -> ctypes.CDLL:
    """:func:`load` in the cache ``directory`` (open as ``folder``): its verified entry, else a build
    recorded there (:func:`_locked` held, ``locked`` where it locked)."""
    so, refused = _cached(directory, key, folder)
    if so is not None:
        try:
            return _open(so, check)
        except (OSError, RuntimeError) as error:    # unloadable: rebuilt under a fresh name below
            refused = f"{so.path}: it does not load ({error})"
    if refused:
        warnings.warn(f"invact: not loading the cached CPU kernel, {refused}; rebuilding it",
                      RuntimeWarning, stacklevel=6)
    fresh = _recorded(command, directory, key, folder)
    _remove_stale(directory, key, fresh.path, locked)     # the bad one too (still mapped where loaded)
    return _open(fresh, check)


def _recorded(command: list[str | Source], directory: Path, key: str, folder: int, retry: bool = True) -> _Verified:
    """A fresh build in ``directory``, recorded under ``key`` (removed where recording fails), open;
    built again once where it vanished meanwhile (a process that could not lock removed it)."""
    fresh = None
    try:
        fresh = _compile(command, directory, key, folder)
        _record(directory, key, fresh, folder)
    except BaseException as error:
        if fresh is not None:
            fresh.close()
            with contextlib.suppress(OSError):
                fresh.path.unlink()
        if retry and isinstance(error, FileNotFoundError) and str(error.filename).startswith(str(directory)):
            return _recorded(command, directory, key, folder, retry=False)
        raise
    return fresh


_libgomp_seen = False


def _runs_libgomp() -> bool:
    """Whether this process has loaded ``libgomp.so.1`` (PyTorch's OpenMP runtime, by that name); once
    seen it stays loaded, so /proc/self/maps is read again only until it is."""
    global _libgomp_seen
    if not _libgomp_seen:
        try:
            with open("/proc/self/maps") as maps:
                _libgomp_seen = any(line.rstrip().endswith("/" + OPENMP_RUNTIME) for line in maps)
        except OSError:
            pass
    return _libgomp_seen


@functools.cache
def _is_gcc(compiler: str) -> bool:
    """Whether ``compiler`` is GCC (whose -fopenmp links libgomp; clang's links LLVM's libomp)."""
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in done.stdout and "clang" not in done.stdout


def threading_flags(compiler: str) -> tuple[tuple[str, ...], ...]:
    """How the kernels ``compiler`` builds may run threads (csrc/invact_threads.h's ``spawn``), best first.
    OpenMP where this process already runs ``libgomp.so.1`` and the compiler is GCC: a kernel built
    with -fopenmp needs that soname, so it joins the same runtime, and its parallel regions run on
    ATen's intra-op workers, which spin for a while after each of ATen's loops (a fresh pthread waits
    for the core such a worker holds: twice the time with 2 cores). Then plain pthreads, which every
    build can fall back to (and the only way elsewhere: a second OpenMP runtime would compete with
    PyTorch's for the cores)."""
    if _runs_libgomp() and _is_gcc(compiler):
        return (("-fopenmp", "-pthread"), ("-pthread",))
    return (("-pthread",),)


def load_first(builds: list[tuple[list[str | Source], str]], check: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    """:func:`load` of the first (command, key) of ``builds`` that builds and loads; raises the last
    one's error where none does."""
    failure: Exception = RuntimeError("no build to try")
    for command, key in builds:
        try:
            return load(command, key, check)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            failure = error
    raise failure
