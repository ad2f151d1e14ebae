"""The per-table C kernels (generated/c_NAME.c, invact.table_c) against the eager backend.

Each C file holds the statements of the table's generated eager g_kernel, translated with torch's
float32 semantics and built without FMA contraction, so where the torch code is plain arithmetic the
gradients must equal the eager backend's bit for bit (NaN where it is NaN): no tolerance. Where it
calls torch.exp/log/log1p/tanh the C code calls csrc/invact_libm.h's versions of SLEEF's u10 functions:
in the build with FMA those are ATen's Vectorized<float> functions bit for bit (tested on every input
class below), so the gradients are the eager backend's wherever ATen computes the function by SLEEF
(torch.log1p; torch.exp/log/tanh in an ATen built without MKL, whose VML it calls otherwise); elsewhere,
and for the C library's erff etc., the two functions are about an ulp apart and the tolerance is
derived below (:func:`_libm_bound`).
"""

import ctypes
import functools
import importlib.util
import math
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from invact import bitpack, cpu_kernel, impl_compiled, impl_cpu, impl_eager, kernel_cache, ops, table_c
from invact.fitting.codegen import generate_all

from invact.registry import module as _module

sys.path.insert(0, str(Path(__file__).parent / "data"))
import make_tables  # noqa: E402

needs_c = pytest.mark.skipif(cpu_kernel._compiler() is None or not cpu_kernel.enabled(),
                             reason="no C compiler, or INVACT_CPU_KERNEL=0 (Inductor's code by request)")
SIZES = (1, 15, 17, 1003, 40_001, 3 * 32768 + 5)   # partial vectors, bit planes, the split over threads


def _defaults(name: str) -> tuple[float, ...]:
    return tuple(float(v) for v in ops.info(name)["params"].values())


def _other(name: str) -> tuple[float, ...] | None:
    """Another parameter set inside the table's domain (every built-in domain is `p > 0`), or None."""
    meta = ops.info(name)
    if not (meta["params"] and meta["param_generic"]):
        return None
    return tuple(1.7 * float(v) + 0.1 for v in meta["params"].values())


CASES = [(n, _defaults(n)) for n in ops.names()] + [(n, p) for n in ops.names() if (p := _other(n)) is not None]


def _inputs(n: int, seed: int) -> torch.Tensor:
    """Random x over both branches and the tails, led by NaN, +-inf, +-0, subnormals and huge values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 4
    x[torch.rand(n, generator=g) < 0.1] *= 10
    special = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-40, 1e30, -1e30]
    x[: min(n, len(special))] = torch.tensor(special[:n], dtype=torch.float64)
    return x.float()


def _math_calls(mod) -> set[str]:
    """The torch names of the math functions the table's C file calls, the C library's (erff, ...) or
    csrc/invact_libm.h's (invact_expf, ...): the functions whose results may differ from ATen's."""
    text = table_c.source(mod).read_text()
    return set(re.findall(r"\b(?:invact_)?(exp|log|log1p|tanh|erf|atan|sinh|cosh|asinh)f\(", text))


def _calls_math(mod) -> bool:
    return bool(_math_calls(mod))


LIBM = ("exp", "log", "log1p", "tanh")   # csrc/invact_libm.h's functions, by torch name


def _aten_sleef() -> set[str]:
    """The functions of LIBM that torch computes on float32 CPU tensors by SLEEF (ATen's
    Vectorized<float>): log1p always; exp, log and tanh call MKL's VML where ATen has MKL (vml.h)."""
    return {"log1p"} | (set() if torch.backends.mkl.is_available() else {"exp", "log", "tanh"})


def _exact(mod, use_fma: bool) -> bool:
    """Whether the C kernel's gradient must be the eager backend's bit for bit: plain arithmetic, or
    (build with FMA) calls of invact_libm.h only, of functions ATen computes by SLEEF here."""
    calls = _math_calls(mod)
    return not calls or (use_fma and calls <= _aten_sleef())


def _libm_bound(eager: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    """|C - eager| allowed per element where g calls a math function whose result may differ from
    ATen's: invact_libm.h's SLEEF u10 (within 1 ulp; ATen's bits with FMA) or the C library's scalar
    erff/atanf/sinhf/coshf/asinhf (glibc's: 1 or 2 ulps) for ATen's SLEEF u10 or MKL VML (within 1 ulp),
    so their results are a few ulps apart at most; the few roundings after (a product, a quotient,
    1 - e with e <= 1) keep g within 4 float32 ulps of |g| + 1, the libm term of tests/tolerances.py's
    bound. The product g * grad then differs by |grad| times that, plus the rounding of either product
    (an ulp of the result)."""
    g = (eager / go).abs().nan_to_num(0.0, 0.0, 0.0)
    return go.abs() * 4 * torch.finfo(torch.float32).eps * (g + 1) + eager.abs() * torch.finfo(torch.float32).eps


def _same_or_within(eager: torch.Tensor, got: torch.Tensor, bound: torch.Tensor | None) -> bool:
    nan = eager.isnan()
    if not torch.equal(nan, got.isnan()):
        return False
    a, b = eager[~nan], got[~nan]
    if bound is None:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    both_inf = a.isinf() & (a == b)
    return bool(((a - b).abs()[~both_inf] <= bound[~nan][~both_inf]).all())


def _run_c(mod, y, code, go, params, use_fma: bool = False) -> torch.Tensor:
    k = ops.module_constants(mod, torch.float32, torch.device("cpu"), params)
    out = torch.empty_like(y)
    assert table_c.run(mod, out, go, y, code, k.y_thresholds, k.poly, params, use_fma=use_fma)
    return out


def _builds(mod) -> tuple[bool, ...]:
    """The builds to compare with eager: without FMA, and with FMA where it runs for a file without
    fused steps (those are the FMA scheme, not the eager code: tests/test_fma_c.py)."""
    fused = "INVACT_FMA(" in table_c.source(mod).read_text()
    return (False, True) if table_c.fma() and not fused else (False,)


@needs_c
@pytest.mark.parametrize("name, params", CASES)
def test_c_backward_equals_eager(name, params):
    """Every table, default parameters and (parameter-generic tables) another set: the C kernel's
    float32 gradient is the eager backend's, bit for bit unless the C code calls a math function that
    ATen computes otherwise (:func:`_exact`), in either build."""
    mod = _module(name)
    for use_fma in _builds(mod):
        exact = _exact(mod, use_fma)
        for n in SIZES:
            x = _inputs(n, seed=n)
            y, code = torch.ops.invact.forward(x, name, list(params), "eager")
            go = torch.randn(n, generator=torch.Generator().manual_seed(n))
            eager = torch.ops.invact.backward(go, y, code, name, list(params), "eager")
            got = _run_c(mod, y, code, go, params, use_fma)
            assert _same_or_within(eager, got, None if exact else _libm_bound(eager, go)), (name, params, use_fma, n)


@needs_c
def test_plain_arithmetic_tables_are_bitwise():
    """The bitwise comparison covers the closed forms without library calls and the fitted tables
    (their float32 log and sqrt are invact.fastmath's, reproduced operation for operation); a closed
    form's square root is the correctly rounded one in every generated language (hardswish, relu2)."""
    plain = {n for n in ops.names() if not _calls_math(_module(n))}
    assert {"elu", "celu", "selu", "leaky_relu", "relu", "sigmoid", "tanh", "gelu", "silu", "hardswish",
            "relu2"} <= plain


@needs_c
def test_threads_agree(monkeypatch):
    """The work is split over threads at 16-element boundaries, across bit planes: same bits."""
    name = next(n for n in ops.names() if _module(n).CODE_BITS)
    x = _inputs(3 * 32768 + 5, seed=1)
    y, code = torch.ops.invact.forward(x, name, [], "eager")
    go = torch.randn_like(y)
    outs = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        outs.append(_run_c(_module(name), y, code, go, ()))
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))


def _compile(folder: Path, name: str, text: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """``text`` built as a shared library with ``flags`` (the test's own, outside the kernel cache)."""
    (folder / f"{name}.c").write_text(text)
    subprocess.run([cpu_kernel._compiler(), *flags, str(folder / f"{name}.c"), "-o", str(folder / f"{name}.so"),
                    "-lm"], check=True, capture_output=True)
    return ctypes.CDLL(str(folder / f"{name}.so"))


def _apply(lib: ctypes.CDLL, symbol: str, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    getattr(lib, symbol)(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(x.numel()))
    return out


# invact_libm.h's functions over arrays in `omp simd` loops, as the tables' g_loop calls them
_LIBM_LOOPS = "\n".join(["#include <stdint.h>", '#include "invact_libm.h"', *(
    f"void loop_{f}(const float *restrict x, float *restrict y, int64_t n) {{\n#pragma omp simd\n"
    f"    for (int64_t i = 0; i < n; i++) y[i] = invact_{f}f(x[i]);\n}}" for f in LIBM)])
# csrc/invact_sleef.h's 16-lane SLEEF (the one-pass forwards' reproduction of libtorch's), masked at the end
_SLEEF_LOOPS = "\n".join(["#include <math.h>", "#include <stdint.h>", '#include "invact_torch_math.h"', *(
    f"void ref_{f}(const float *x, float *y, int64_t n) {{\n    for (int64_t i = 0; i < n; i += 16) {{\n"
    f"        __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);\n"
    f"        _mm512_mask_storeu_ps(y + i, m, sleef_{f}16(_mm512_maskz_loadu_ps(m, x + i)));\n"
    "    }\n}" for f in LIBM)])


@pytest.fixture(scope="module")
def libm(tmp_path_factory) -> dict[bool, ctypes.CDLL]:
    """invact_libm.h's loops built as invact.table_c builds the tables (its flags), without FMA and,
    where table_c runs it, with: {use_fma: library}."""
    if cpu_kernel._compiler() is None:
        pytest.skip("no C compiler")
    folder = tmp_path_factory.mktemp("libm")
    return {fma: _compile(folder, f"libm_{int(fma)}", _LIBM_LOOPS, table_c._flags(fma))
            for fma in ((False, True) if table_c.fma() else (False,))}


@pytest.fixture(scope="module")
def aten_sleef(tmp_path_factory) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """ATen's Vectorized<float> function (SLEEF u10 with FMA) of each of LIBM where this process can
    compute it: torch's where ATen calls SLEEF for it (:func:`_aten_sleef`), else invact_sleef.h's
    16-lane steps where ATen's capability is AVX-512 (they give libtorch's bits: invact.impl_cpu's
    probes)."""
    ref = {f: getattr(torch, f) for f in _aten_sleef()}
    if set(LIBM) - set(ref) and torch.backends.cpu.get_cpu_capability() == "AVX512" and cpu_kernel._compiler():
        lib = _compile(tmp_path_factory.mktemp("sleef"), "sleef16", _SLEEF_LOOPS,
                       ("-O2", *cpu_kernel.ISA_FLAGS["AVX512"], "-mfma", "-ffp-contract=off", "-shared", "-fPIC",
                        f"-I{table_c.CSRC}"))
        ref.update({f: functools.partial(_apply, lib, f"ref_{f}") for f in set(LIBM) - set(ref)})
    return ref


def _libm_inputs() -> list[torch.Tensor]:
    """float32 x for invact_libm.h's functions: the edges (exp's overflow and underflow thresholds and
    SLEEF's cut-offs at 100 and -104, tanh's at 8.664339742, log1p's -1 and 1e38, binade ends, 0.75 and
    1.5 where log's reduction switches) with their neighbours two float32 steps either way, both zeros,
    subnormals, FLT_MIN, FLT_MAX, the infinities and NaNs with payloads; then random bit patterns and
    N(0, 64) values. The edges come alone (one element: the loop's remainder) and in the whole,
    whose length is no multiple of 16, at its start (the vectorised body) and its end."""
    edges = torch.tensor([0.0, 1.0, 2.0, 0.5, 0.75, 1.5, math.log(2), 88.7228317, 88.72283935546875, -87.336544,
                          -103.972084, -104.0, 100.0, 8.664339742, 9.0, 20.0, 89.0, 1e38, 1e-7, 1e-45, 1.1754942e-38,
                          1.17549435e-38, 3.4028235e38])
    near = (torch.cat([edges, -edges]).view(torch.int32)[:, None] + torch.arange(-2, 3, dtype=torch.int32)).flatten()
    # NaNs: 7FC00000, 7F800001, 7FC12345, FFC00000, FF812345
    nans = torch.tensor([0x7FC00000, 0x7F800001, 0x7FC12345, -0x400000, -0x7EDCBB]).to(torch.int32)
    specials = torch.cat([near.view(torch.float32), torch.tensor([math.inf, -math.inf, -0.0]),
                          nans.view(torch.float32)])
    g = torch.Generator().manual_seed(5)
    random = torch.randint(-(1 << 31), 1 << 31, (1 << 18,), generator=g, dtype=torch.int64).to(torch.int32)
    whole = torch.cat([specials, random.view(torch.float32), torch.randn(1 << 18, generator=g) * 8, specials])
    assert whole.numel() % 16
    return [whole, *specials.split(1)]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


@needs_c
@pytest.mark.parametrize("name", LIBM)
def test_libm_with_fma_is_atens_sleef(name, libm, aten_sleef):
    """invact_libm.h's function in the build with FMA (the per-table kernels' float32 build where
    table_c.fma) gives ATen's Vectorized<float> function's bits (SLEEF u10), NaN payloads included, on
    every input class, in the vectorised loop and alone. (Checked offline on all 2^32 float32 against
    invact_sleef.h's 16-lane steps, AVX-512 and AVX2 builds: no difference but AVX2's NaNs, which are
    its SLEEF's.)"""
    if True not in libm or name not in aten_sleef:
        pytest.skip("no build with FMA here (table_c.fma), or no SLEEF reference (MKL's VML and no AVX-512)")
    for x in _libm_inputs():
        got, want = _apply(libm[True], f"loop_{name}", x), aten_sleef[name](x)
        assert torch.equal(_bits(got), _bits(want)), (name, x[_bits(got) != _bits(want)][:8].tolist())


@needs_c
@pytest.mark.parametrize("name", LIBM)
def test_libm_without_fma_within_one_ulp(name, libm):
    """Without FMA (SLEEF's algorithms as its builds without FMA run them: unfused steps, Dekker's
    products) each function is within 1 float32 ulp of the exact value, SLEEF's u10 bound, which the
    tables' certificates allow a library: float64's value stands in for the exact one (its error, about
    2^-29 float32 ulps, is inside the 2^-20 slack), the ulp that of its binade (2^-149 below FLT_MIN).
    Where float64's value rounds to no finite float32 (NaN, an infinity, past FLT_MAX) the result is
    that non-finite value."""
    for x in _libm_inputs():
        got, ref = _apply(libm[False], f"loop_{name}", x), getattr(torch, name)(x.double())
        rounded = ref.float()
        special = ~torch.isfinite(rounded)
        assert torch.equal(got[special].isnan(), rounded[special].isnan()), name
        assert torch.equal(got[special & ~rounded.isnan()], rounded[special & ~rounded.isnan()]), name
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0 ** -126))) - 23)
        err = (got.double() - ref).abs()[~special] / ulp[~special]
        worst = x[~special][err.argmax()].item() if err.numel() else None
        assert err.numel() == 0 or err.max() <= 1 + 2.0 ** -20, (name, float(err.max()), worst)


@needs_c
def test_softplus_g_at_the_libmvec_point(aten_sleef):
    """softplus's g = 1 - exp(-y) (beta = 1) at y = 0.346537321805954 and the block of 16 float32 around
    it, in the vectorised loop and its remainder: glibc's vector expf (libmvec), which the C kernels
    called before, gave g 1.47e-7 from the exact value there (beyond the table's certified error),
    depending on the element's place. With exp within 1 ulp, 1 - e (exact: e in [1/2, 1]) is within
    ulp(e) = 2^-24 of the exact g, in either build; the build with FMA gives ATen's SLEEF bits."""
    mod = _module("softplus")
    params = _defaults("softplus")
    assert params[0] == 1.0
    block = (_bits(torch.tensor([0.346537321805954])) + torch.arange(-8, 8, dtype=torch.int32)).view(torch.float32)
    exact = -torch.expm1(-block.double())
    for n, at in ((16, 0), (17, 1), (40, 20)):   # the block in one vector, across one, into the remainder
        y = torch.full((n,), 0.5)
        y[at:at + 16] = block
        for use_fma in _builds(mod):
            g = _run_c(mod, y, torch.empty(0, dtype=torch.uint8), torch.ones(n), params, use_fma)[at:at + 16]
            assert ((g.double() - exact).abs() <= 2.0 ** -24).all(), (n, use_fma, g.tolist())
            if use_fma and "exp" in aten_sleef:
                assert torch.equal(_bits(g), _bits(1 - aten_sleef["exp"](-block))), (n, g.tolist())


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"_c_tables_{path.stem}_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _user_tables(tmp_path: Path) -> list[tuple[object, tuple[float, ...]]]:
    """tests/data/make_tables.py's tables, generated into another root: (torch module, default parameters)."""
    make_tables.write_all(tmp_path / "generated" / "tables")
    generate_all(tmp_path)
    mods = [_import(path) for path in sorted((tmp_path / "generated").glob("torch_*.py"))]
    return [(mod, tuple(float(v) for v in mod.META["params"].values())) for mod in mods]


@needs_c
def test_user_tables_exact_constant_and_poly_segments(tmp_path):
    """Tables as a user's fit writes them (tests/data/make_tables.py: exact segments in parameters,
    constant segments, sqrt-transform polynomials, two codes), generated into another root: the C
    kernel next to each torch module equals that module's eager g_kernel."""
    for mod, params in _user_tables(tmp_path):
        k = ops.module_constants(mod, torch.float32, torch.device("cpu"), params)
        y = torch.cat([torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40]), torch.randn(5000) * 3])
        for c in range(mod.META["n_codes"]):
            codes = torch.full(y.shape, c, dtype=torch.int32)
            packed = bitpack.pack(codes, mod.CODE_BITS) if mod.CODE_BITS else torch.empty(0, dtype=torch.uint8)
            go = torch.randn_like(y)
            want = mod.g_kernel(y, codes, k.y_thresholds, k.poly, **k.params) * go
            got = torch.empty_like(y)
            assert table_c.run(mod, got, go, y, packed, k.y_thresholds, k.poly, params, use_fma=False), mod.NAME
            assert _same_or_within(want, got, _libm_bound(want, go) if _calls_math(mod) else None), (mod.NAME, c)


def test_translation_follows_torch_semantics():
    """Python scalars meet float32 tensors rounded to float32; parameter arithmetic stays double;
    `scalar / tensor` is torch's reciprocal-then-product; unknown constructs are refused."""
    from invact.fitting.codegen.c_gen import _Translator
    import ast
    t = _Translator(("param_a",))
    assert t.expr(ast.parse("2.0 / y", mode="eval").body) == ("((1.0f / y) * (float)(2.0))", "f")
    assert t.expr(ast.parse("param_a * 3.0 + y", mode="eval").body) == ("((float)((param_a * 3.0)) + y)", "f")
    assert t.expr(ast.parse("y / 6.0", mode="eval").body) == ("(y / (float)(6.0))", "f")
    assert t.expr(ast.parse("torch.exp(-param_a * y)", mode="eval").body) == ("invact_expf(((float)((-param_a)) * y))",
                                                                             "f")
    assert t.expr(ast.parse("torch.erf(y)", mode="eval").body) == ("erff(y)", "f")
    with pytest.raises(ValueError, match="unsupported"):
        t.expr(ast.parse("y ** 2", mode="eval").body)
    with pytest.raises(ValueError, match="unknown name"):
        t.expr(ast.parse("x + 1.0", mode="eval").body)


def test_poly_columns_are_constants_selected_per_block():
    """Fitted tables' C code reads no POLY value at run time: the columns that vary with the segment
    are float32 constants (COLUMNS, permuted per block), the others literals in the statements."""
    for name in ops.names():
        mod = _module(name)
        text = table_c.source(mod).read_text()
        if mod.POLY and len({tuple(r) for r in mod.POLY}) > 1:
            assert "invact_col(" not in text and "static const float COLUMNS[N_COLUMNS]" in text, name


def test_every_table_has_its_c_file():
    """Every table's g_kernel translates, and `invact generate` wrote it next to the torch module."""
    for name in ops.names():
        mod = _module(name)
        assert table_c.source(mod).is_file(), name
        assert f'#define TABLE_SHA256 "{mod.TABLE_SHA256}"' in table_c.source(mod).read_text(), name


def _fake_module(tmp_path: Path, text: str | None, sha: str = "0" * 64) -> SimpleNamespace:
    torch_file = tmp_path / "torch_fake.py"
    if text is not None:
        (tmp_path / "c_fake.c").write_text(text)
    return SimpleNamespace(__file__=str(torch_file), TABLE_SHA256=sha, PARAMS=(), CODE_BITS=0)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A fresh kernel cache and no memory of earlier loads or warnings."""
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_kernel.SWITCH_ENV, raising=False)
    table_c._load.cache_clear()
    monkeypatch.setattr(kernel_cache, "_warned", set())
    yield tmp_path
    table_c._load.cache_clear()


def _declines_with_one_warning(mod, match: str) -> None:
    y = torch.zeros(4)
    args = (mod, torch.empty(4), y, y, torch.empty(0, dtype=torch.uint8), torch.zeros(0), torch.zeros(5, 1), ())
    with pytest.warns(RuntimeWarning, match=match):
        assert not table_c.run(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not table_c.run(*args)          # declined again, silently


@pytest.fixture
def named_compiler(monkeypatch):
    """A C compiler name for table_c._load, which declines silently (nothing to warn about: the
    compiled backend runs Inductor's code) where there is none, before it reads the C file. The C file
    is checked (missing, stale, an #error line) before anything is built, so where no compiler is on
    PATH a name that would never run stands in for one: the checks and their warnings run everywhere."""
    if cpu_kernel._compiler() is None:
        monkeypatch.setattr(cpu_kernel, "_compiler", lambda: "/nonexistent/cc")


def test_no_compiler_declines_silently(fresh, monkeypatch):
    """No C compiler: None without a warning, whatever the C file (the runtime's documented answer)."""
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table_c.library(_fake_module(fresh, None)) is None


def test_missing_c_file_declines(fresh, named_compiler):
    _declines_with_one_warning(_fake_module(fresh, None), "no C kernel for fake")


def test_stale_c_file_declines(fresh, named_compiler):
    """A C file generated from another table than the torch module's is never built."""
    _declines_with_one_warning(_fake_module(fresh, '#define TABLE_SHA256 "' + "1" * 64 + '"\n'), "stale C kernel")


@needs_c
def test_failed_build_warns_once_and_declines(fresh, monkeypatch):
    """A source the compiler rejects (or a compiler that fails): one warning, nothing left behind in
    the cache, and the caller runs Inductor's code."""
    mod = _fake_module(fresh, '#define TABLE_SHA256 "' + "0" * 64 + '"\nint broken = ;\n')
    _declines_with_one_warning(mod, "per-table C kernels could not be built")
    assert not list((fresh / "cache").glob("*.so"))


def test_switched_off(fresh, monkeypatch):
    monkeypatch.setenv(cpu_kernel.SWITCH_ENV, "0")
    assert table_c.library(_module(ops.names()[0])) is None


@needs_c
def test_built_once_into_the_cache(fresh):
    """The build is recorded in the kernel cache (manifest + sha256, invact.kernel_cache) and reused."""
    mod = _module("elu")
    assert table_c.library(mod) is not None
    manifests = list((fresh / "cache").glob("table-c_elu-*.json"))
    assert len(manifests) == 1
    table_c._load.cache_clear()
    before = sorted((fresh / "cache").iterdir())
    assert table_c.library(mod) is not None
    assert sorted((fresh / "cache").iterdir()) == before   # loaded, not rebuilt



@needs_c
@pytest.mark.parametrize("name, params", CASES)
def test_first_call_compiles_nothing(name, params, monkeypatch):
    """The compiled backend's first float32 forward + backward on CPU, for every table (closed forms
    included) and parameter set: no torch.compile call, no Dynamo frame compiled, no Inductor code
    run (the gradient comes from the C kernels). Not timed: benchmarks/first_call.py times it."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    monkeypatch.setattr(impl_compiled, "kernels", lambda *a: pytest.fail("Inductor's code ran"))
    before = {k: dict(v) for k, v in counters.items()}
    x = _inputs(1003, seed=3).requires_grad_()
    y = ops.apply(x, name, dict(zip(ops.info(name)["params"], params)), backend="compiled")
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad[torch.isfinite(x)]).any()
    assert {k: dict(v) for k, v in counters.items()} == before, "Dynamo compiled a frame"


def _no_avx512(monkeypatch) -> None:
    """As on a CPU without AVX-512: invact.cpu_kernel's kernels decline, invact.table_c's run alone."""
    monkeypatch.setattr(cpu_kernel, "library", lambda: None)


def _edges(name: str, dtype: torch.dtype, params: tuple[float, ...]) -> torch.Tensor:
    """The x thresholds of the forward code, their neighbours, NaN, the infinities and both zeros."""
    k = ops.module_constants(_module(name), dtype, torch.device("cpu"), params)
    t = torch.tensor(k.x_thresholds, dtype=dtype)
    below, above = (torch.nextafter(t, torch.full_like(t, v)) for v in (-math.inf, math.inf))
    return torch.cat([t, below, above, torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0], dtype=dtype)])


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ops.names())
def test_without_avx512_forward_and_backward_equal_eager(name, dtype, monkeypatch):
    """Without AVX-512 the packed forward code (portable C) and the 16-bit backward (a gather from the
    eager g_kernel's table, rounded as torch.mul) are the eager backend's bytes; float32 gradients as
    in test_c_backward_equals_eager, with INVACT_FMA=0 (the FMA kernel: tests/test_fma_c.py). Sizes end
    mid-byte, mid-plane and span several threads."""
    _no_avx512(monkeypatch)
    monkeypatch.setenv("INVACT_FMA", "0")
    monkeypatch.setattr(impl_compiled, "kernels", lambda *a: pytest.fail("Inductor's code ran"))
    params = _defaults(name)
    libm = dtype == torch.float32 and _calls_math(_module(name))
    for n in (1, 9, 1003, 3 * 32768 + 5):
        x = _inputs(n, seed=n).to(dtype)
        edges = _edges(name, dtype, params)
        x[: min(n, edges.numel())] = edges[:n]
        y, code = torch.ops.invact.forward(x, name, list(params), "eager")
        yc, codec = torch.ops.invact.forward(x, name, list(params), "compiled")
        assert _same_or_within(y.float(), yc.float(), None) and torch.equal(code, codec), (name, dtype, n)
        go = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
        eager = torch.ops.invact.backward(go, y, code, name, list(params), "eager")
        got = torch.ops.invact.backward(go, y, code, name, list(params), "compiled")
        bound = _libm_bound(eager, go) if libm else None   # 16-bit: the same table, the same rounding
        assert _same_or_within(eager.float(), got.float(), bound), (name, dtype, n)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["gelu", "elu"])
def test_without_avx512_first_call_compiles_nothing(name, dtype, monkeypatch):
    """Without AVX-512, and for float64 (the eager torch code), the compiled backend's first forward +
    backward compiles nothing either."""
    from torch._dynamo.utils import counters

    _no_avx512(monkeypatch)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    monkeypatch.setattr(impl_compiled, "kernels", lambda *a: pytest.fail("Inductor's code ran"))
    before = {k: dict(v) for k, v in counters.items()}
    x = _inputs(1003, seed=4).to(dtype).requires_grad_()
    ops.apply(x, name, backend="compiled").backward(torch.ones_like(x))
    assert torch.isfinite(x.grad[torch.isfinite(x)]).all()
    assert {k: dict(v) for k, v in counters.items()} == before, "Dynamo compiled a frame"


@needs_c
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_portable_16_bit_conversions_every_pattern(dtype):
    """The portable kernels convert 16-bit floats themselves: every bit pattern as x of the forward code
    (against the generated code_packed) and as grad of the lookup backward, with table values over the
    whole float32 range (overflow to inf, subnormal and zero results, NaN), against torch's rounding."""
    name = next(n for n in ops.names() if _module(n).CODE_BITS)
    mod = _module(name)
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    k = ops.module_constants(mod, dtype, torch.device("cpu"), ())
    cmap = impl_cpu.code_map(mod, dtype, ())
    assert torch.equal(table_c.pack(mod, x, cmap), mod.code_packed(x, k.x_thresholds))
    g = torch.Generator().manual_seed(0)
    lut = torch.randn(1 << (16 + mod.CODE_BITS), generator=g) * torch.exp2(
        torch.randint(-40, 40, (1 << (16 + mod.CODE_BITS),), generator=g).float())
    lut[:4] = torch.tensor([math.nan, math.inf, -math.inf, 0.0])
    codes = torch.randint(0, 1 << mod.CODE_BITS, x.shape, generator=g, dtype=torch.int32)
    y = x[torch.randperm(x.numel(), generator=g)]
    index = (y.view(torch.int16).to(torch.int32) & 0xFFFF) | (codes << 16)
    want = (lut[index] * x.float()).to(dtype)
    got = torch.empty_like(x)
    assert table_c.run_lookup(mod, got, x, y, bitpack.pack(codes, mod.CODE_BITS), lut)
    assert _same_or_within(want.float(), got.float(), None)


@needs_c
@pytest.mark.parametrize("flushed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lookup_tables_filled_by_c_equal_eager(dtype, flushed):
    """The 16-bit backward's tables (g of every 16-bit y and code) are filled by the C kernel where its
    file calls no math function (EAGER_BITS): every entry equals the eager g_kernel's, bit for bit,
    with denormals flushed and not. Elsewhere g_kernel fills them (table_c.g_kernel is None)."""
    for name in ops.names():
        mod = _module(name)
        g = table_c.g_kernel(mod)
        assert (g is None) == _calls_math(mod), name
        if g is None:
            continue
        params = _defaults(name)
        k = ops.module_constants(mod, dtype, torch.device("cpu"), params)
        want, got = (cpu_kernel.lookup_table(fn, dtype, mod.CODE_BITS, k.y_thresholds, k.poly, flushed=flushed,
                                             **k.params) for fn in (mod.g_kernel, g))
        assert _same_or_within(want, got, None), (name, dtype, flushed)


def _direct16_tables(tmp_path: Path) -> list[tuple[object, tuple[float, ...]]]:
    """The built-in and the tests/data tables whose 16-bit backward table_c computes itself."""
    mods = [(_module(n), _defaults(n)) for n in ops.names()] + _user_tables(tmp_path)
    return [(mod, params) for mod, params in mods if table_c.direct16(mod)]


@needs_c
@pytest.mark.parametrize("flushed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_direct_16_bit_backward_equals_the_lookup(dtype, flushed, tmp_path):
    """Tables whose g is plain arithmetic (square roots included) on y with no POLY column
    (table_c.direct16: relu, sigmoid, tanh, the ELUs, hardswish, relu2, and tests/data's fold, which
    has two codes) compute the 16-bit backward from y converted to float32 instead of gathering g
    from the lookup table (float16 in blocks of 128, bfloat16 of 1024); the result must be the
    lookup's, lut[code << 16 | bits of y] * grad rounded as torch rounds it, bit for bit (NaN where it
    is NaN), with denormals flushed and not. Every 16-bit y for every code, grads from every 16-bit
    pattern (subnormals, infinities, NaNs), sizes ending mid-vector, mid-block and mid-plane."""
    tables = _direct16_tables(tmp_path)
    names = {mod.NAME for mod, _ in tables}
    direct = {"relu", "sigmoid", "tanh", "elu", "hardswish", "relu2", "fold"}
    assert direct <= names and not names & {"gelu", "silu", "softplus"}, names
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    gen = torch.Generator().manual_seed(1)
    for mod, params in tables:
        n_codes = mod.META["n_codes"]
        k = ops.module_constants(mod, dtype, torch.device("cpu"), params)
        with cpu_kernel._denormals(flushed):
            lut = impl_eager.lookup_table(mod, dtype, params, torch.device("cpu"), flushed)
        y_all = patterns.repeat(n_codes)
        codes_all = torch.arange(n_codes, dtype=torch.int32).repeat_interleave(1 << 16)
        order = torch.randperm(y_all.numel(), generator=gen)
        y_all, codes_all = y_all[order], codes_all[order]
        go_all = patterns.repeat(n_codes)[torch.randperm(y_all.numel(), generator=gen)]
        for n in (*SIZES, y_all.numel()):
            y, codes, go = y_all[:n], codes_all[:n], go_all[:n]
            packed = bitpack.pack(codes, mod.CODE_BITS) if mod.CODE_BITS else torch.empty(0, dtype=torch.uint8)
            index = (y.view(torch.int16).to(torch.int32) & 0xFFFF) | (codes << 16)
            got = torch.empty_like(y)
            with cpu_kernel._denormals(flushed):  # products in chunks below ATen's grain size: on this
                want = torch.cat([(lut[i] * g.float()).to(dtype)  # thread, whose denormal setting it is
                                  for i, g in zip(index.split(16384), go.split(16384))])
                assert table_c.run(mod, got, go, y, packed, k.y_thresholds, k.poly, params), (mod.NAME, n)
            assert _same_or_within(want.float(), got.float(), None), (mod.NAME, dtype, flushed, n)


@needs_c
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_16_bit_backward_of_closed_forms_is_direct(dtype, monkeypatch):
    """The compiled backend's 16-bit backward of a table_c.direct16 table runs table_c's direct loop,
    not the AVX-512 gather (invact.impl_cpu declines it), and equals the eager backend's; the fitted
    tables keep the gather."""
    gathered = []
    real = cpu_kernel.run_lookup
    monkeypatch.setattr(cpu_kernel, "run_lookup", lambda *a: gathered.append(1) or real(*a))
    monkeypatch.setattr(impl_compiled, "kernels", lambda *a: pytest.fail("Inductor's code ran"))
    x = _inputs(3 * 32768 + 5, seed=7).to(dtype)
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    for name, direct in (("sigmoid", True), ("leaky_relu", True), ("hardswish", True), ("gelu", False)):
        params = list(_defaults(name))
        y, code = torch.ops.invact.forward(x, name, params, "eager")
        gathered.clear()
        got = torch.ops.invact.backward(go, y, code, name, params, "compiled")
        want = torch.ops.invact.backward(go, y, code, name, params, "eager")
        assert _same_or_within(want.float(), got.float(), None), name
        assert table_c.direct16(_module(name)) == direct, name
        if cpu_kernel.library() is not None:
            assert bool(gathered) != direct, name


def test_untranslatable_table_still_generates_and_declines(fresh, monkeypatch, named_compiler):
    """Generated code the C translator does not take does not fail `invact generate` (or the fit that
    runs it): the C file says why, and the runtime declines it with one warning (Inductor's code runs)."""
    from invact.fitting.codegen import c_gen, plan_table
    from invact.fitting.tables import load_table, table_path
    def refuse(plan):
        raise ValueError("unsupported call in generated code: torch.frobnicate(y)")
    monkeypatch.setattr(c_gen, "_translator", refuse)
    plan = plan_table(load_table(table_path("elu")), "generated/tables/elu.json")
    text = c_gen.generate_c(plan)
    assert "#error no C kernel: unsupported call" in text
    mod = _fake_module(fresh, text, sha=plan.meta["sha256"])
    _declines_with_one_warning(mod, "no C kernel for fake.*torch.frobnicate")
