"""Machines and environments no other test names (hunt_c): Inductor's on-disk cache shared between
vector ISAs, no home directory, an unusable kernel cache, boolean switches, relative cache paths."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from invact import backends, cpu_kernel, kernel_cache

NEEDS_CC = pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler")
LOWER_ISA = {"AVX512": "avx2", "AVX2": "default"}  # ATen's capability -> a narrower one to rerun under

COMPILE_SCRIPT = r"""
import torch
from torch._dynamo.utils import counters
from invact import backends

def affine(x):
    return x * 2.0 + 1.0

x = torch.arange(1003, dtype=torch.float32)
y = backends.compiled(affine)(x)
print(torch.backends.cpu.get_cpu_capability(), counters["inductor"]["fxgraph_cache_hit"],
      torch.equal(y, affine(x)))
"""


def _compile_in_subprocess(script: Path, inductor_cache: Path, capability: str | None) -> list[str]:
    """(capability, FX graph cache hits, result correct) printed by COMPILE_SCRIPT in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "TORCHINDUCTOR_FORCE_DISABLE_CACHES")}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(inductor_cache), TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "falling back" not in done.stderr, done.stderr[-3000:]
    return done.stdout.split()


@pytest.mark.slow
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in LOWER_ISA or not backends.compiler_available(),
                    reason="needs a C++ compiler and ATen running AVX2 or AVX-512 code (to rerun under a narrower ISA)")
def test_inductor_cache_shared_between_isas(tmp_path):
    """A graph compiled under the CPU's ISA, then under a narrower ``ATEN_CPU_CAPABILITY`` with the same
    Inductor cache: it was served from the cache and rebuilt with the narrower flags (under avx2 half
    of each 512-bit vector computed: GELU's gradient off by 4.4; under default a build error). Each
    width now has its own entries, and a rerun under the first width still hits the cache."""
    script, cache = tmp_path / "compile.py", tmp_path / "inductor"
    script.write_text(COMPILE_SCRIPT)
    native = torch.backends.cpu.get_cpu_capability()
    assert _compile_in_subprocess(script, cache, None) == [native, "0", "True"]
    assert _compile_in_subprocess(script, cache, LOWER_ISA[native]) == [LOWER_ISA[native].upper(), "0", "True"]
    assert _compile_in_subprocess(script, cache, None) == [native, "1", "True"]


def test_inductor_options_name_the_vector_width():
    from torch._inductor import config, cpu_vec_isa
    with config.patch({"cpp.simdlen": 256}):               # a width the user chose is kept (no build probe)
        options = backends.inductor_options()
        assert options["cpp.simdlen"] == 256
        assert {k: v for k, v in options.items() if k != "cpp.simdlen"} == backends.INDUCTOR_OPTIONS
    # Inductor's own pick builds a probe per vector ISA with the C++ compiler (pick_vec_isa raises
    # InvalidCxxCompiler without one; the compiled backend is then not offered for CPU tensors at all)
    if not backends.compiler_available():
        pytest.skip("no C++ compiler: Inductor cannot pick a vector width (the user's choice is checked above)")
    assert backends.inductor_options()["cpp.simdlen"] == cpu_vec_isa.pick_vec_isa().bit_width()


# --- boolean switches ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("0", False), ("false", False), ("No", False), (" OFF ", False),
                                         ("1", True), ("TRUE", True), ("yes", True), (" on", True)])
def test_boolean_switches_accept_the_usual_spellings(monkeypatch, text, value):
    """``INVACT_CPU_KERNEL=off`` used to switch the kernels on (every value but "0" did)."""
    monkeypatch.setenv(cpu_kernel.SWITCH_ENV, text)
    monkeypatch.setenv(cpu_kernel.FMA_ENV, text)
    assert cpu_kernel.enabled() is value and cpu_kernel.fma_allowed() is value


@pytest.mark.parametrize("text", ["", "  "])
def test_empty_boolean_switch_is_the_default(monkeypatch, text):
    monkeypatch.setenv(cpu_kernel.SWITCH_ENV, text)
    monkeypatch.setenv(cpu_kernel.FMA_ENV, text)
    assert cpu_kernel.enabled() and cpu_kernel.fma_allowed()
    assert backends.env_flag("INVACT_TEST_UNSET_FLAG", False) is False


@pytest.mark.parametrize("name, check", [(cpu_kernel.SWITCH_ENV, cpu_kernel.enabled),
                                         (cpu_kernel.FMA_ENV, cpu_kernel.fma_allowed)])
@pytest.mark.parametrize("text", ["maybe", "2", "enable"])
def test_unknown_boolean_switch_is_refused(monkeypatch, name, check, text):
    monkeypatch.setenv(name, text)
    with pytest.raises(ValueError, match=f"{name} must be one of 1, true, yes, on, 0, false, no, off.*'{text}'"):
        check()


# --- where the kernel cache is ------------------------------------------------------------------

@pytest.fixture
def cache_env(monkeypatch, tmp_path):
    """No cache variables; HOME = tmp_path/home; the private fallback under tmp_path/tmp; no warning
    given yet in this "process"."""
    for name in (kernel_cache.CACHE_ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(kernel_cache, "_warned", set(), raising=False)
    return tmp_path


def test_relative_xdg_cache_home_is_ignored(cache_env, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert kernel_cache.cache_dir() == cache_env / "home" / ".cache" / "invact"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_env / "xdg"))
    assert kernel_cache.cache_dir() == cache_env / "xdg" / "invact"


def test_empty_home_is_unset(cache_env, monkeypatch):
    """HOME= (empty) gave ./.cache/invact (root's /.cache/invact); now the passwd entry's home."""
    pwd = pytest.importorskip("pwd")
    entry = pwd.struct_passwd(("u", "x", os.getuid(), 0, "", str(cache_env / "pw"), "/bin/sh"))
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: entry)
    for home in ("", "relative"):
        monkeypatch.setenv("HOME", home)
        assert kernel_cache.cache_dir() == cache_env / "pw" / ".cache" / "invact"


def test_relative_invact_cache_is_made_absolute_at_first_use(cache_env, monkeypatch):
    name = f"cache-{cache_env.name}"                      # a value no other test used
    monkeypatch.chdir(cache_env)
    monkeypatch.setenv(kernel_cache.CACHE_ENV, name)
    assert kernel_cache.cache_dir() == cache_env / name
    monkeypatch.chdir(cache_env / "tmp")
    assert kernel_cache.cache_dir() == cache_env / name     # the same cache after a chdir
    monkeypatch.setenv(kernel_cache.CACHE_ENV, "")
    assert kernel_cache.cache_dir() == cache_env / "home" / ".cache" / "invact"


# --- kernel loads where the cache cannot serve ----------------------------------------------------

@pytest.fixture
def answer_build(cache_env):
    """(command, key) of a tiny library built by a compiler wrapper that logs each run, and the log."""
    source, log, wrapper = cache_env / "answer.c", cache_env / "builds.log", cache_env / "cc"
    source.write_text("int answer(void) { return 42; }\n")
    wrapper.write_text(f"#!/bin/sh\necho built >> '{log}'\nexec '{cpu_kernel._compiler()}' \"$@\"\n")
    wrapper.chmod(0o755)
    log.write_text("")
    return [str(wrapper), "-shared", "-fPIC", str(source)], "answer-0123", log


def _load(build, match: str | None = None):
    """kernel_cache.load of ``build``: with one RuntimeWarning matching ``match``, or none."""
    command, key, _ = build
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = kernel_cache.load(command, key, lambda lib: None)
    messages = [str(w.message) for w in caught]
    assert len(messages) == (match is not None), messages
    if match is not None:
        assert all(part in messages[0] for part in match.split("|")), messages[0]
    assert lib.answer() == 42
    return lib


def _fallback() -> Path:
    return kernel_cache.private_cache_dir()


def _new_process():
    kernel_cache._warned.clear()


@NEEDS_CC
def test_no_home_directory_uses_the_private_cache(answer_build, monkeypatch):
    """``docker run --user N`` with HOME unset: Path.home() raised RuntimeError, so every C kernel
    "could not be built" and Inductor compiled for minutes. Now one warning, the private cache, and a
    later process loads the build."""
    pwd = pytest.importorskip("pwd")

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME")
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert kernel_cache.cache_dir() is None
    first = _load(answer_build, f"no home directory|{_fallback()}")
    assert Path(first._name).parent == _fallback() and stat.S_IMODE(_fallback().stat().st_mode) == 0o700
    _load(answer_build)                                   # warned once
    _new_process()
    assert _load(answer_build, "no home directory")._name == first._name
    assert answer_build[2].read_text().count("built") == 1


def _regular_file(path: Path) -> str:
    path.write_text("")
    return "it is not a directory"


def _symbolic_link(path: Path) -> str:
    (path.parent / "real").mkdir(mode=0o700)
    path.symlink_to(path.parent / "real")
    return "it is a symbolic link"


def _read_only(path: Path, monkeypatch) -> str:
    """Mode 0500, and file creation there refused as it would be for another user (root ignores
    modes)."""
    path.mkdir(mode=0o500)
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == path:
            raise PermissionError(13, "Permission denied", str(Path(dir) / "x"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(kernel_cache.tempfile, "mkstemp", mkstemp)
    return "read-only" if not os.access(path, os.W_OK) else "cannot be written"


@NEEDS_CC
@pytest.mark.parametrize("make", [_regular_file, _symbolic_link, _read_only])
def test_unusable_cache_falls_back_to_the_private_cache(answer_build, monkeypatch, cache_env, make):
    """A cache that is a regular file, a symbolic link or read-only: every process rebuilt the kernels
    (30-60 CPU-seconds), silently but for the link. Now one warning naming it, why and the private
    cache used instead, and later processes load from there."""
    cache = cache_env / "cache"
    why = make(cache, monkeypatch) if make is _read_only else make(cache)
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    first = _load(answer_build, f"{cache}|{why}|{_fallback()}")
    assert Path(first._name).parent == _fallback()
    _new_process()
    assert _load(answer_build, f"{cache}|{why}")._name == first._name
    assert answer_build[2].read_text().count("built") == 1
    if make is _read_only:
        assert list(cache.iterdir()) == []
        cache.chmod(0o700)


@NEEDS_CC
def test_read_only_cache_with_the_kernel_loads_it_quietly(answer_build, monkeypatch, cache_env):
    """A read-only cache that holds a verified build (an image's baked cache) serves it, no warning."""
    cache = cache_env / "cache"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    built = _load(answer_build)._name
    cache.chmod(0o500)
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != cache and real(path, mode, **kw))
    try:
        assert _load(answer_build)._name == built and not _fallback().exists()
    finally:
        cache.chmod(0o700)


@NEEDS_CC
def test_unusable_private_cache_builds_privately(answer_build, monkeypatch, cache_env):
    """Where the private cache cannot serve either (a link planted at its name): one warning naming both,
    a build in a temporary directory, and nothing written to either."""
    cache = cache_env / "cache"
    cache.write_text("")
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    (cache_env / "elsewhere").mkdir(mode=0o700)
    _fallback().symlink_to(cache_env / "elsewhere")
    _load(answer_build, f"{cache}|{_fallback()}: it is a symbolic link|temporary directory")
    assert list((cache_env / "elsewhere").iterdir()) == [] and cache.read_text() == ""


@pytest.mark.parametrize("cxx", ["", "no-such-compiler-invact"], ids=["empty", "missing"])
def test_compiled_backend_offered_only_with_the_compiler_inductor_calls(cxx):
    """Inductor calls $CXX (else g++) and no other name: CXX set empty or to a missing program left
    "compiled" offered (c++ or clang++ were taken as a compiler), and its first call fell back with a
    warning naming PermissionError or InvalidCxxCompiler. Now only eager is offered, quietly."""
    code = ("import warnings; warnings.simplefilter('error'); import torch, invact; from invact import backends; "
            "x = torch.randn(8, requires_grad=True); invact.ops.apply(x, 'silu').sum().backward(); "
            "print(backends.compiler_available(), backends.available('cpu'))")
    # a hang guard: ~10 s here (importing torch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CXX": cxx})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("False ") and "'compiled'" not in out.stdout, out.stdout


def test_compiled_backend_offered_with_the_compiler_inductor_calls():
    """The positive side of the test above: where Inductor's compiler (its config's, else $CXX or g++)
    is on PATH, "compiled" is offered (were it not, the compiled-backend tests would skip silently)."""
    import shutil
    config = sys.modules.get("torch._inductor.config")
    names = config.cpp.cxx if config is not None else (os.environ.get("CXX", "g++"),)
    names = names if isinstance(names, (tuple, list)) else (names,)
    present = any(isinstance(n, str) and n and shutil.which(n) for n in names)
    assert backends.compiler_available() == present
    assert ("compiled" in backends.available("cpu")) == (present and "compiled" not in backends._broken)
