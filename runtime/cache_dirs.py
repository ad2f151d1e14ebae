"""Where invact's kernel cache is, and whether a folder may hold it: the folders' half of the trust boundary
that :mod:`invact.kernel_cache` describes (which loads from the cache only what passes these checks).

The cache is ``$INVACT_CACHE`` (a relative path made absolute against the working directory at its
first use), else ``$XDG_CACHE_HOME/invact`` (an absolute ``XDG_CACHE_HOME`` only), else
``~/.cache/invact`` (``$HOME`` where it is an absolute path, else the passwd entry's home): :func:`cache_dir`;
this user's fallback is ``invact-cache-<uid>`` in the temporary directory: :func:`private_cache_dir`.
A folder may hold either where it is a directory (not a symbolic link), owned by this user and writable
by no one else (:func:`unsafe`; :func:`unsafe_stat` makes the same checks of an open descriptor's status), and
where every folder above it is owned by this user or root and, where group or others may write it,
sticky (as /tmp), so that no one else can rename the cache or a folder above it and put their own in
its place (:func:`unsafe_above`). Nothing here creates a folder or imports torch.
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir", "private_cache_dir", "unsafe", "unsafe_stat", "unsafe_above", "is_private_group"]

CACHE_ENV = "INVACT_CACHE"


def cache_dir() -> Path | None:
    """``$INVACT_CACHE``, else ``$XDG_CACHE_HOME/invact``, else ``~/.cache/invact``; None where no home
    directory is known. Empty variables count as unset; a relative ``XDG_CACHE_HOME`` is ignored (the XDG
    spec), as is a relative ``HOME``; a relative ``INVACT_CACHE`` is made absolute at its first use."""
    given = os.environ.get(CACHE_ENV, "")
    if given.strip():
        return _absolute(given)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "invact"
    home = _home()
    return None if home is None else home / ".cache" / "invact"


@functools.cache
def _absolute(path: str) -> Path:
    """``path`` against the working directory of its first use (a later chdir keeps the cache)."""
    return Path(os.path.abspath(path))


def _home() -> Path | None:
    """``$HOME`` where it is an absolute path, else this uid's passwd entry's home (``%USERPROFILE%``
    without a passwd database), else None (``docker run --user N`` with HOME unset)."""
    home = os.environ.get("HOME", "")
    if not os.path.isabs(home):
        try:
            import pwd
            home = pwd.getpwuid(os.getuid()).pw_dir
        except ImportError:
            home = os.environ.get("USERPROFILE", "")
        except KeyError:                       # a uid with no passwd entry
            return None
    return Path(home) if os.path.isabs(home) else None


def private_cache_dir() -> Path:
    """This user's fallback cache, used where :func:`cache_dir` cannot serve: ``invact-cache-<uid>`` in
    the temporary directory (``tempfile.gettempdir()``), created 0700 and verified like the cache (so a
    directory someone else made there first is refused)."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"invact-cache-{user}"


def unsafe_stat(st: os.stat_result, directory: bool = False) -> str | None:
    """:func:`unsafe`'s checks of a file's status (of the path itself, or of an open descriptor)."""
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if directory != stat.S_ISDIR(st.st_mode) or not (directory or stat.S_ISREG(st.st_mode)):
        return "it is not a directory" if directory else "it is not a regular file"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}, not by this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def unsafe(path: Path, directory: bool = False) -> str | None:
    """Why ``path`` cannot be trusted (a link, not ours, writable by group or others, the wrong
    kind), or None. Not following links: the check is of the path itself."""
    return unsafe_stat(os.lstat(path), directory)


_MAX_LINKS = 40  # as Linux's path resolution


@functools.cache
def is_private_group(gid: int) -> bool:
    """Whether group ``gid`` is this user's alone: their primary group, with no other member and no other
    user's primary group (a user private group: umask 002 systems make ``~/.cache`` group-writable)."""
    try:
        import grp
        import pwd
        me = pwd.getpwuid(os.getuid())
        members = set(grp.getgrgid(gid).gr_mem)
        users = pwd.getpwall()
    except (ImportError, KeyError, OSError):
        return False
    return (gid == me.pw_gid and members <= {me.pw_name}
            and all(u.pw_gid != gid or u.pw_uid == me.pw_uid for u in users))


def unsafe_above(directory: Path) -> str | None:
    """Why a folder above ``directory`` would let someone else swap it (rename it, or a folder on the way,
    and put their own in its place), or None: each folder that resolving the path passes through (links
    followed as the kernel follows them) must be owned by this user or root and, where others (or a group
    that is not this user's private one) may write it, sticky (as /tmp: there only an entry's owner renames
    or removes it). A folder that does not exist yet ends the walk (:func:`invact.kernel_cache`'s load creates it 0700).
    The path is walked as written, not normalised: ``..`` after a link is the parent of the link's
    target, as the kernel reads it (``os.path.abspath`` would take it as the link's own folder)."""
    if not hasattr(os, "getuid"):
        return None
    pending = list(Path(os.getcwd(), directory).parts)
    here, links = Path(pending.pop(0)), 0
    while True:
        while pending and pending[0] in (".", ""):
            pending.pop(0)
        if not pending:
            return None                               # ``here`` is the directory itself: see unsafe()
        st = os.stat(here)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (0, os.getuid()):
            return f"the folder {here} above it is owned by uid {st.st_uid}, neither this user ({os.getuid()}) nor root"
        shared = mode & 0o002 or (mode & 0o020 and not is_private_group(st.st_gid))
        if shared and not mode & stat.S_ISVTX:
            return (f"the folder {here} above it is writable by group or others without the sticky bit "
                    f"(mode {mode:o}, group {st.st_gid}), so someone else could put another folder in its place")
        name = pending.pop(0)
        if name == "..":
            here = here.parent
            continue
        try:
            is_link = stat.S_ISLNK(os.lstat(here / name).st_mode)
        except FileNotFoundError:
            return None
        if not is_link:
            here = here / name
            continue
        links += 1
        if links > _MAX_LINKS:
            return f"resolving {here / name} passes through more than {_MAX_LINKS} symbolic links"
        target = Path(os.readlink(here / name))       # resolved from the link's folder, checked above
        if target.is_absolute():
            here = Path(target.anchor)
            pending[:0] = target.parts[1:]
        else:
            pending[:0] = target.parts
