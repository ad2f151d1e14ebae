"""Backends: which implementation runs an activation, and compile-once caching with a safe fallback.

- ``"triton"``: fused Triton kernels; CUDA tensors with triton importable (CPU tensors only when
  asked for explicitly and ``TRITON_INTERPRET=1``). float64 always runs on the torch code.
- ``"compiled"``: the generated torch code compiled by ``torch.compile`` (dynamic in the element
  count; needs a working C++ compiler on CPU); compiled once per activation and dtype. On AVX-512
  CPUs :mod:`invact.cpu_kernel`'s C kernels take over the forward code, the backward of 16-bit y and
  the float32 backward of the fitted tables (the same results, bit for bit, faster, and no compile).
- ``"eager"``: the generated torch code as plain torch ops (always available).

The default is the first available of triton (CUDA only), compiled, eager; ``INVACT_BACKEND`` (read in
any case) or the ``backend=`` argument (lower case; its name checked where it is given, by
:func:`check_name`, its availability at the forward) choose one. A backend that fails to compile falls
back with one warning: compiled to eager, triton to the default among the others.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
import warnings
from collections.abc import Callable

import torch

from .arguments import ArgumentTypeError

__all__ = ["BACKENDS", "ENV", "available", "check_name", "resolve", "compiled", "fallback_used", "instead_of_triton",
           "after_triton_failed", "INDUCTOR_OPTIONS", "inductor_options", "env_flag"]

BACKENDS = ("triton", "compiled", "eager")
ENV = "INVACT_BACKEND"
_broken: set[str] = set()
_FLAG_VALUES = {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable ``name`` (every ``INVACT_*`` switch is read through this):
    1/true/yes/on or 0/false/no/off, in any case, spaces around ignored; unset or empty: ``default``.
    Raises :class:`ValueError` naming the variable and the accepted values for anything else."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    value = _FLAG_VALUES.get(text.lower())
    if value is None:
        raise ValueError(f"{name} must be one of {', '.join(_FLAG_VALUES)} (any case) or empty for the default "
                         f"({'on' if default else 'off'}), got {os.environ[name]!r}")
    return value


@functools.cache
def triton_import_error() -> Exception | None:
    """Why an installed Triton does not import (the exception its import raised); None where it
    imports or is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as error:  # a broken install: absent, and said so where Triton would run
        return error
    return None


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None and triton_import_error() is None


@functools.cache
def compiler_available() -> bool:
    """Whether the C++ compiler Inductor's CPU code calls is on PATH: ``torch._inductor.config.cpp.cxx``
    where that config is loaded (a user may have set it), else its default, $CXX or g++ (clang++ on
    macOS). Inductor tries no other name: a machine with clang++ alone, or CXX set empty, has none."""
    config = sys.modules.get("torch._inductor.config")
    names = config.cpp.cxx if config is not None else (
        os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++"),)
    names = names if isinstance(names, (tuple, list)) else (names,)
    return any(isinstance(n, str) and n and shutil.which(n) for n in names)


def available(device_type: str) -> list[str]:
    """Backends usable for tensors on ``device_type`` ("cpu", "cuda", ...), in order of preference."""
    out = []
    if "triton" not in _broken and (device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        if triton_importable():
            out.append("triton")
        elif triton_import_error() is not None:   # installed but broken: warn once, as a failed kernel
            fallback_used("triton", triton_import_error(), "next available")
    if "compiled" not in _broken and (device_type == "cuda" or compiler_available()):
        out.append("compiled")
    out.append("eager")
    return out


def _default(device_type: str) -> str:
    usable = [b for b in available(device_type) if b != "triton" or device_type == "cuda"]
    return usable[0]


def check_name(backend: object, argument: str = "backend") -> str | None:
    """``backend`` if it is None or one of :data:`BACKENDS` (lower case, as written there; only
    ``INVACT_BACKEND`` is read in any case): the check constructors and :func:`invact.patch` make up front,
    before a device is known (:func:`resolve` checks availability at the forward). Raises ValueError (a
    TypeError too for a non-str) naming ``argument``."""
    if backend is None or (isinstance(backend, str) and backend in BACKENDS):
        return backend
    if not isinstance(backend, str):
        raise ArgumentTypeError(f"{argument} must be a str ({', '.join(BACKENDS)}) or None, got "
                                f"{type(backend).__name__} {backend!r}")
    hint = "; names are lower case" if backend.strip().lower() in BACKENDS else ""
    raise ValueError(f"{argument} must be one of {', '.join(BACKENDS)} (or None for the default{hint}), "
                     f"got {backend!r}")


@torch._dynamo.assume_constant_result
def resolve(backend: str | None, device_type: str) -> str:
    """The backend to run: ``backend`` (argument), else $INVACT_BACKEND, else the default.

    Unknown names (:func:`check_name`) and backends not available for ``device_type`` raise :class:`ValueError`
    naming the argument (or the environment variable, read in any case) and the available backends.
    """
    source = "backend"
    if backend is None:   # the variable, like every INVACT_* switch: any case, spaces around ignored
        backend, source = os.environ.get(ENV, "").strip().lower() or None, ENV
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{ENV} must be one of {', '.join(BACKENDS)} (unset or empty for the default; any "
                             f"case), got {os.environ[ENV]!r}")
    if check_name(backend) is None:
        return _default(device_type)
    usable = available(device_type)
    if backend == "compiled" and "compiled" in _broken:
        return "eager"  # already warned once
    if backend == "triton" and "triton" in _broken:
        return instead_of_triton(device_type)  # already warned once
    if backend not in usable:
        error = triton_import_error() if backend == "triton" else None
        why = f" (Triton does not import: {type(error).__name__}: {error})" if error is not None else ""
        raise ValueError(f"{source}={backend!r} is not available for {device_type} tensors{why}; available: "
                         f"{', '.join(usable)}")
    return backend


def fallback_used(backend: str, error: BaseException, instead: str = "eager") -> None:
    """Record that ``backend`` failed to compile; warn once (the caller then runs ``instead``)."""
    if backend in _broken:
        return
    _broken.add(backend)
    warnings.warn(f"invact: the {backend!r} backend failed ({type(error).__name__}: {error}); "
                  f"falling back to the {instead} backend", RuntimeWarning, stacklevel=3)


def instead_of_triton(device_type: str) -> str:
    """The backend that runs where Triton does not: the first available of the others."""
    return next(b for b in available(device_type) if b != "triton")


def after_triton_failed(error: BaseException, device_type: str) -> str:
    """Record a Triton kernel that failed to build or launch (warning once) and return the backend
    to run instead."""
    instead = instead_of_triton(device_type)
    fallback_used("triton", error, instead)
    return instead


# Inductor's options for the generated functions. Indirect-indexing asserts are off: segment indices
# are bounded by construction (a count of thresholds), and the asserts block vectorisation. Values
# reused by several later operations are written out above 30 operations, Inductor's threshold off the
# CPU: its CPU default (50, torch 2.13) kept a user-fitted power tail's Newton steps inlined into every
# use, and lowering its backward took 421 s where it takes 28 s at 30 (the same code, bit for bit).
INDUCTOR_OPTIONS = {"assert_indirect_indexing": False, "realize_opcount_threshold": 30}


def inductor_options() -> dict[str, object]:
    """:data:`INDUCTOR_OPTIONS` and ``cpp.simdlen``, the vector width of Inductor's CPU code (its own
    pick: the CPU's widest ISA, or ``$ATEN_CPU_CAPABILITY``'s).

    Left unset, the width is not in Inductor's FX graph cache key: a graph cached under AVX-512 and
    reused under avx2 had its 512-bit C++ rebuilt with AVX2 flags (wrong gradients, no warning). Set,
    each width gets its own cache entries and the on-disk cache stays on.
    """
    from torch._inductor import config, cpu_vec_isa
    simdlen = config.cpp.simdlen
    if simdlen is None:
        simdlen = cpu_vec_isa.pick_vec_isa().bit_width()  # 0 where no vector ISA builds (scalar code)
    return {**INDUCTOR_OPTIONS, "cpp.simdlen": simdlen}


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled by torch.compile; on any compile failure: warn once, run ``fn`` eagerly.

    Tensor arguments are marked dynamic in their first dimension (element counts vary), while ints
    and floats (bit widths, thresholds, parameters) stay compile-time constants, guarded: one
    compilation per dtype and parameter set.
    Compiled with :func:`inductor_options` (made at the first call).
    """
    compiled_fn = None  # made at the first call: torch.compile imports Inductor (~1 s), which
                        # importing invact.norm_math (whose passes these are) should not pay

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled_fn
        if "compiled" not in _broken:
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim():
                    torch._dynamo.maybe_mark_dynamic(a, 0)
            try:
                if compiled_fn is None:
                    compiled_fn = torch.compile(fn, dynamic=None, options=inductor_options())
                # floats (parameters, thresholds) as guarded constants: torch 2.13 made a float that
                # changed between calls dynamic and then baked its traced value into a torch.where
                # (SELU's g kept a stale scale: a wrong gradient, no recompile)
                with torch._dynamo.config.patch(specialize_float=True):
                    return compiled_fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back ...
                result = fn(*args, **kwargs)  # ... unless eager fails too: then it is not the compiler
                fallback_used("compiled", exc)
                return result
        return fn(*args, **kwargs)

    return run
