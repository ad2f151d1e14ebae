"""The kernel cache against path swaps and planted headers (hunt_D): a cache below a folder that someone
else may write (who could rename the cache and put their own in its place), files swapped by path
between their checks and their load (the load maps the file it checked, through its descriptor), and
a per-table C file compiled in place (a header planted next to it was included, and the file was read
again by path after its bytes were hashed). Another user is simulated with modes and links (and, as
root, chown to uid 65534); the races with hooks between a check and what follows it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from invact import cache_dirs, cpu_kernel, kernel_cache, registry, table_c

NEEDS_CC = pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler")
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NEEDS_ROOT = pytest.mark.skipif(not ROOT, reason="giving a file to another user (chown) needs root")
OTHER_UID = 65534                                       # nobody
KEY = "answer-0123"
ANSWER_C = "int answer(void) { return 42; }\n"
PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen(MARKER, "w"); if (f) fclose(f); }
"""


def _check_answer(lib) -> None:
    if lib.answer() != 42:
        raise RuntimeError("wrong library")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """tmp_path, with the private fallback cache in tmp_path/tmp, no warning given yet, and the C file
    of a tiny library (answer() == 42). Skipped where tmp_path itself lies below a folder that others could
    swap (a TMPDIR writable by a group): no cache there could serve."""
    if (why := getattr(kernel_cache, "_unsafe_above", lambda path: None)(tmp_path / "cache")) is not None:
        pytest.skip(f"{tmp_path} cannot hold a kernel cache: {why}")
    (tmp_path / "tmp").mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(kernel_cache, "_warned", set())
    monkeypatch.delenv(cpu_kernel.SWITCH_ENV, raising=False)
    (tmp_path / "answer.c").write_text(ANSWER_C)
    return tmp_path


def _command(tmp_path: Path) -> list[str]:
    return [cpu_kernel._compiler(), "-shared", "-fPIC", str(tmp_path / "answer.c")]


def _planted(tmp_path: Path) -> tuple[Path, Path]:
    """(a library that also answers 42 but whose constructor creates the marker, the marker)."""
    marker, source, so = tmp_path / "PWNED", tmp_path / "planted.c", tmp_path / "planted.so"
    source.write_text(PLANTED_C + ANSWER_C)
    done = subprocess.run([cpu_kernel._compiler(), "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source),
                           "-o", str(so)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return so, marker


def _give_away(path: Path) -> None:
    """``path`` owned by uid :data:`OTHER_UID` (root only), skipping where that uid cannot own files here
    (a user namespace that does not map it)."""
    try:
        os.chown(path, OTHER_UID, OTHER_UID)
    except OSError as error:
        pytest.skip(f"cannot give {path} to uid {OTHER_UID}: {error}")


def _swap(path: Path, planted: Path) -> None:
    """Put a copy of ``planted`` at ``path`` by a rename, as someone who may write its folder would."""
    shutil.copy(planted, path.with_name(path.name + ".swap"))
    os.replace(path.with_name(path.name + ".swap"), path)


def _quiet_load(tmp_path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return kernel_cache.load(_command(tmp_path), KEY, _check_answer)


# --- folders above the cache -----------------------------------------------------------------------

def _refused_below(fresh: Path, monkeypatch, cache: Path, folder: Path, why: str) -> None:
    """A load with $INVACT_CACHE = ``cache``: one warning naming the cache, ``folder`` and ``why``; the
    library is built in the private fallback, and nothing is created at ``cache``."""
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    match = f"not using the kernel cache {re.escape(str(cache))}: the folder {re.escape(str(folder))} above it {why}"
    with pytest.warns(RuntimeWarning, match=match):
        lib = kernel_cache.load(_command(fresh), KEY, _check_answer)
    assert lib.answer() == 42 and Path(lib._name).parent == kernel_cache.private_cache_dir()
    assert not os.path.lexists(cache)


@NEEDS_CC
@pytest.mark.parametrize("mode", [0o777, 0o770], ids=["0777", "0770"])
@pytest.mark.parametrize("depth", [1, 2])
def test_a_cache_below_a_folder_others_may_write_is_refused(fresh, monkeypatch, mode, depth):
    """INVACT_CACHE=/tmp/team/cache with /tmp/team writable by others (or a group) and not sticky: the
    cache itself passed its checks, but whoever may write /tmp/team could rename `cache` between those
    checks and the load and put their own there. Refused like an unsafe cache (one warning naming the
    folder; the private fallback), also where that folder is further up."""
    team = fresh / "team"
    team.mkdir(mode=0o700)
    below = team / "sub" if depth == 2 else team
    below.mkdir(mode=0o700, exist_ok=True)
    team.chmod(mode)
    if mode == 0o770:
        _shared_group(team)
    _refused_below(fresh, monkeypatch, below / "cache", team,
                   rf"is writable by group or others without the sticky bit \(mode {mode:o}")


def _shared_group(folder: Path) -> None:
    """Give ``folder`` a group that is not this user's private one (root: chgrp to nogroup), or skip."""
    if ROOT:
        os.chown(folder, -1, OTHER_UID)
    if cache_dirs.is_private_group(folder.stat().st_gid):
        pytest.skip("no group but this user's private one to give a folder (chgrp needs root)")


@NEEDS_CC
def test_a_folder_writable_by_the_users_private_group_is_accepted(fresh, monkeypatch):
    """umask 002 systems (a private group per user: Debian's and Ubuntu's USERGROUPS_ENAB) make
    ``~/.cache`` group-writable; that group holds this user alone, so the cache below it serves, quietly."""
    if not cache_dirs.is_private_group(os.getgid()):
        pytest.skip(f"this user's group {os.getgid()} is shared with other users")
    home = fresh / "home"
    home.mkdir(mode=0o700)
    os.chown(home, -1, os.getgid())
    home.chmod(0o775)
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(home / "cache"))
    lib = _quiet_load(fresh)
    assert lib.answer() == 42 and Path(lib._name).parent == home / "cache"


@NEEDS_CC
@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_a_link_above_the_cache_is_followed_to_the_folder_it_names(fresh, monkeypatch, target):
    """A symbolic link on the way to the cache is resolved as the kernel resolves it: the folder it
    names, writable by others without the sticky bit, is refused."""
    team = fresh / "team"
    team.mkdir(mode=0o700)
    team.chmod(0o777)
    (fresh / "link").symlink_to(team if target == "absolute" else Path("team"))
    _refused_below(fresh, monkeypatch, fresh / "link" / "cache", team,
                   r"is writable by group or others without the sticky bit \(mode 777")


@NEEDS_CC
@NEEDS_ROOT
def test_a_cache_below_another_users_folder_is_refused(fresh, monkeypatch):
    """A folder above the cache owned by someone else (root aside), even one only its owner may write:
    its owner could swap the cache."""
    team = fresh / "team"
    team.mkdir(mode=0o755)
    _give_away(team)
    _refused_below(fresh, monkeypatch, team / "cache", team,
                   rf"is owned by uid {OTHER_UID}, neither this user \({os.getuid()}\) nor root")


@NEEDS_CC
@pytest.mark.parametrize("link", [False, True])
def test_a_sticky_folder_above_the_cache_is_accepted(fresh, monkeypatch, link):
    """A folder that everyone may write but with the sticky bit (as /tmp), reached directly or through a
    link: only an entry's owner may rename it there, so the cache below it serves, quietly."""
    shared = fresh / "shared"
    shared.mkdir(mode=0o700)
    shared.chmod(0o1777)
    if link:
        (fresh / "link").symlink_to(shared)
    cache = (fresh / "link" if link else shared) / "cache"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    lib = _quiet_load(fresh)
    assert lib.answer() == 42 and Path(lib._name).parent == cache
    assert json.loads((shared / "cache" / f"{KEY}.json").read_text())["so"] == Path(lib._name).name


# --- swaps between a check and the load ------------------------------------------------------------

@NEEDS_CC
def test_a_build_swapped_before_its_load_is_not_the_one_loaded(fresh, monkeypatch):
    """The fresh build, renamed over by another file after it was recorded and before the load (the
    compiler's exit and ctypes.CDLL were milliseconds apart, and every step went by path): the loaded
    library is the build that was checked and hashed (through its descriptor), the planted one's
    constructor never runs; the next load refuses the swapped file (its hash) and rebuilds."""
    cache = fresh / "cache"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    planted, marker = _planted(fresh)
    real = kernel_cache._record

    def record(*args, **kwargs):
        real(*args, **kwargs)
        _swap(cache / json.loads((cache / f"{KEY}.json").read_text())["so"], planted)

    monkeypatch.setattr(kernel_cache, "_record", record)
    lib = kernel_cache.load(_command(fresh), KEY, _check_answer)
    assert lib.answer() == 42 and not marker.exists()
    monkeypatch.setattr(kernel_cache, "_record", real)
    with pytest.warns(RuntimeWarning, match="sha256 differs"):
        again = kernel_cache.load(_command(fresh), KEY, _check_answer)
    assert again.answer() == 42 and not marker.exists()


@NEEDS_CC
def test_a_cached_library_swapped_after_its_check_is_not_the_one_loaded(fresh, monkeypatch):
    """A recorded build whose file is renamed over after its hash was checked and before the load: the
    checked file is loaded, not the planted one. (The entry is made here, not by a load in this process:
    the loader would take a path it loaded before for that library.)"""
    cache = fresh / "cache"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    cache.mkdir(mode=0o700)
    so = cache / f"{KEY}-built.so"
    done = subprocess.run([*_command(fresh), "-o", str(so)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    so.chmod(0o755)
    sha = kernel_cache.hashlib.sha256(so.read_bytes()).hexdigest()
    (cache / f"{KEY}.json").write_text(json.dumps({"so": so.name, "sha256": sha}))
    planted, marker = _planted(fresh)
    real = kernel_cache._cached

    def cached(*args, **kwargs):
        so, why = real(*args, **kwargs)
        if so is not None:
            _swap(Path(getattr(so, "path", so)), planted)
        return so, why

    monkeypatch.setattr(kernel_cache, "_cached", cached)
    lib = kernel_cache.load(_command(fresh), KEY, _check_answer)
    assert lib.answer() == 42 and not marker.exists()


@NEEDS_CC
@pytest.mark.parametrize("swap", ["link", pytest.param("owner", marks=NEEDS_ROOT)])
def test_a_build_swapped_as_the_compiler_exits_is_refused(fresh, monkeypatch, swap):
    """The compiler's output replaced, as it exits, by a link to another library or by another user's
    file: the build is refused loudly (named, and why), nothing of it is loaded or recorded."""
    cache = fresh / "cache"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    planted, marker = _planted(fresh)
    real = subprocess.run

    def run(argv, *args, **kwargs):
        done = real(argv, *args, **kwargs)
        if "-o" in argv and done.returncode == 0:
            out = Path(argv[argv.index("-o") + 1])
            out.unlink()
            if swap == "link":
                out.symlink_to(planted)
            else:
                shutil.copy(planted, out)
                _give_away(out)
        return done

    monkeypatch.setattr(kernel_cache.subprocess, "run", run)
    why = "it is a symbolic link" if swap == "link" else f"it is owned by uid {OTHER_UID}"
    with pytest.raises(RuntimeError, match=f"refusing the build .*{why}"):
        kernel_cache.load(_command(fresh), KEY, _check_answer)
    assert not marker.exists() and not (cache / f"{KEY}.json").exists()
    assert not [p for p in cache.iterdir()]                       # no build left behind


@NEEDS_CC
def test_a_cache_swapped_after_its_checks_is_not_read(fresh, monkeypatch):
    """The cache renamed after its checks and another folder put in its place (writable by others:
    another user's), holding a manifest and a library that match: what the path leads to is checked
    again through the descriptor the cache is then used by, so the planted pair is refused (one
    warning, the private fallback) and never loaded."""
    cache = fresh / "cache"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    planted, marker = _planted(fresh)
    real = kernel_cache._prepared

    def prepared(directory):
        reason = real(directory)
        if reason is None and directory == cache:
            cache.rename(fresh / "cache.victim")
            cache.mkdir()
            cache.chmod(0o777)
            shutil.copy(planted, cache / f"{KEY}-planted.so")
            sha = kernel_cache.hashlib.sha256(planted.read_bytes()).hexdigest()
            (cache / f"{KEY}.json").write_text(json.dumps({"so": f"{KEY}-planted.so", "sha256": sha}))
        return reason

    monkeypatch.setattr(kernel_cache, "_prepared", prepared)
    with pytest.warns(RuntimeWarning, match=f"not using the kernel cache {re.escape(str(cache))}: .*writable by"):
        lib = kernel_cache.load(_command(fresh), KEY, _check_answer)
    assert lib.answer() == 42 and not marker.exists()


@NEEDS_CC
def test_libraries_loaded_one_after_another_are_each_their_own(fresh, monkeypatch):
    """Libraries are loaded through /proc/self/fd/N, a name the loader remembers: a later library given
    the same descriptor number must not be taken for an earlier one (each answers its own value)."""
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(fresh / "cache"))
    libs = []
    for value in range(5):
        source = fresh / f"value{value}.c"
        source.write_text(f"int value(void) {{ return {value}; }}\n")
        libs.append(kernel_cache.load([cpu_kernel._compiler(), "-shared", "-fPIC", str(source)], f"value{value}-0123",
                                      lambda lib: None))
    assert [lib.value() for lib in libs] == list(range(5))
    assert len({lib._handle for lib in libs}) == 5


# --- what the compiler reads -----------------------------------------------------------------------

@pytest.fixture
def c_root(fresh, monkeypatch):
    """A root whose generated/c_gelu.c is byte for byte the installed one, a fresh kernel cache, and a
    module standing for the root's torch_gelu.py."""
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(fresh / "cache"))
    table_c._load.cache_clear()
    gelu = registry.module("gelu")
    generated = fresh / "root" / "generated"
    generated.mkdir(parents=True)
    shutil.copy(table_c.source(gelu), generated / "c_gelu.c")
    yield SimpleNamespace(__file__=str(generated / "torch_gelu.py"), TABLE_SHA256=gelu.TABLE_SHA256)
    table_c._load.cache_clear()


@NEEDS_CC
def test_a_header_planted_next_to_a_generated_c_file_is_not_compiled(fresh, c_root):
    """A root whose generated C file is invact's own, plus a generated/invact_table.h that also runs a
    constructor: the C file was compiled where it lies, so its quoted #include found the planted header
    first. Now the checked bytes are compiled in a private folder, with the package's headers: the
    kernel builds and loads, and the planted code never runs."""
    marker = fresh / "PWNED"
    header = table_c.CSRC / "invact_table.h"
    planted = PLANTED_C.replace("MARKER", json.dumps(str(marker))) + header.read_text()
    (Path(c_root.__file__).parent / "invact_table.h").write_text(planted)
    lib = table_c.library(c_root)
    assert lib is not None and lib.invact_table_abi() == table_c.ABI_VERSION and not marker.exists()


@NEEDS_CC
def test_a_generated_c_file_changed_after_it_was_read_is_not_compiled(fresh, c_root, monkeypatch):
    """The C file's bytes were checked (its table's sha256) and hashed into the cache key, then the
    compiler read the file again by path: one changed meanwhile was compiled and cached under the key of
    the checked bytes. The compiler now gets the checked bytes themselves."""
    marker = fresh / "PWNED"
    path = table_c.source(c_root)
    real = kernel_cache.load_first

    def load_first(*args, **kwargs):
        path.write_text(path.read_text() + PLANTED_C.replace("MARKER", json.dumps(str(marker))))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_cache, "load_first", load_first)
    lib = table_c.library(c_root)
    assert lib is not None and lib.invact_table_abi() == table_c.ABI_VERSION and not marker.exists()


@NEEDS_CC
def test_the_package_sources_compiled_are_the_bytes_hashed(fresh, monkeypatch):
    """invact.cpu_kernel.builds: the source compiled is the one whose bytes made the cache key, not
    whatever the file holds when the compiler runs."""
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(fresh / "cache"))
    source = fresh / "answer.c"
    builds = cpu_kernel.builds("answer", source, (), cpu_kernel._compiler(), ("-shared", "-fPIC"))
    source.write_text("int answer(void) { return 13; }\n")
    assert kernel_cache.load_first(builds, lambda lib: None).answer() == 42


class _FullDisk:
    """A file whose writes fail as on a full disk: errno ENOSPC and, as for any write or flush, no filename."""

    def __init__(self, path, mode):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        import errno
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@NEEDS_CC
def test_a_full_cache_falls_back_to_the_private_cache(fresh, monkeypatch):
    """Writing the private copy of the source into a full (or over-quota) cache failed with an OSError
    that names no file, which the fallback did not recognise as the cache's: the kernels were switched
    off ("could not be built") instead of built in the private cache with one warning."""
    cache = fresh / "cache"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    command = [cpu_kernel._compiler(), "-shared", "-fPIC", kernel_cache.Source("answer.c", ANSWER_C.encode())]
    real_open = open
    monkeypatch.setattr(kernel_cache, "open",
                        lambda path, mode="r", *a, **k: _FullDisk(path, mode) if str(path).startswith(str(cache))
                        else real_open(path, mode, *a, **k), raising=False)
    with pytest.warns(RuntimeWarning, match=f"not using the kernel cache {re.escape(str(cache))}: it cannot be "
                                            r"written \(No space left on device\)"):
        lib = kernel_cache.load(command, KEY, _check_answer)
    assert lib.answer() == 42 and Path(lib._name).parent == kernel_cache.private_cache_dir()


@NEEDS_CC
def test_dot_dot_after_a_link_is_the_targets_parent(fresh, monkeypatch):
    """``home/link/..`` is, for the kernel, the parent of the link's target (here a folder anyone may
    write), not ``home``; the walk took ``os.path.abspath``'s textual reading and checked ``home``."""
    (fresh / "home").mkdir(mode=0o700)
    evil = fresh / "evil"
    (evil / "sub").mkdir(parents=True, mode=0o700)
    evil.chmod(0o777)
    (fresh / "home" / "link").symlink_to(Path("..") / "evil" / "sub")
    cache = Path(str(fresh / "home" / "link") + "/../cache")
    why = kernel_cache._unsafe_above(cache)     # (as $XDG_CACHE_HOME's folder is used, not normalised)
    assert why is not None and why.startswith(f"the folder {evil} above it is writable by group or others"), why
