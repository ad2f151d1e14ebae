"""Shared tolerance logic for gradient parity against PyTorch (tests/test_ops.py, test_properties.py,
test_fuzz.py and benchmarks/fuzz.py, which loads this file by path).

An invact gradient differs from autograd on x for three reasons, and the bound adds one term for each
(docs/floors.md, "Information floor"; docs/table-format.md, "CERT"):

1. the information floor: y is stored rounded, and next to a branch point (f' = 0) many x share one
   stored y. No table can beat |f'(x) - g_b(round(y))| with g_b the exact inverse derivative on x's
   branch b; :func:`information_floor` computes it per element from an independent float64 reference
   (bracketed Newton, never the table). docs/floors.md measures it: GELU bf16 1.56e-2, fp16 6.57e-3,
   fp32 4.31e-5 next to x = -0.75, ~1e-4 (bf16) elsewhere;
2. the table: its certificate's approximation error (real arithmetic, proved) plus its float32
   evaluation error (every bf16/fp16 y, 2^24 fp32 samples), both absolute where |g| <= 1 and relative
   above, so scaled by max(1, |f'|); plus 4 float32 ulps of |f'| + 1 for libm differences
   (torch.sqrt/exp are not correctly rounded on CPU, and vector body and tail round differently);
3. rounding of the result: g * grad_out is computed in float32 and rounded once to the dtype (half an
   ulp of the result, plus 2^-24 for the float32 product), and a result below the smallest normal
   number carries at most half the subnormal spacing, below ``finfo.tiny``.

float64 runs the same scheme in float64: the certified approximation error, plus 1e-9 for float64
evaluation of float32-rounded coefficients and transforms (test_ops.test_float64_gradients), plus 16
float64 ulps of |f'| for exp/log/sqrt in the closed forms; the float64 floor (sqrt(2 f'' 1e-17) ~
3e-9 next to a branch point) is computed per element like the others.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from invact import ops
from invact.fitting.tables import load_table, table_path

__all__ = ["table", "torch_reference", "derivative64", "references", "information_floor", "gradient_bound",
           "break_points", "parity_mismatch", "torch_nan_derivatives", "nan_input_mismatch", "Deviation",
           "DEVIATIONS", "deviations", "deviation_mask", "Comparison", "compare"]


@functools.cache
def table(name: str) -> dict:
    return load_table(table_path(name))


def torch_reference(name: str, x: torch.Tensor, params: dict | None = None) -> torch.Tensor | None:
    """PyTorch's own forward of activation ``name`` (META torch_forward) at x, with ``params`` over the
    table's defaults; None for user tables without one (callers in tests skip those)."""
    meta = ops.info(name)
    if meta["torch_forward"] is None:
        return None
    names = {"F": F, "torch": torch, "x": x, **meta["params"], **(params or {})}
    return eval(meta["torch_forward"], names)  # noqa: S307


def derivative64(name: str, x: np.ndarray, params: dict | None = None) -> np.ndarray:
    """f'(x) by PyTorch's own float64 autograd (NaN where PyTorch's float64 backward is NaN)."""
    xt = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
    torch_reference(name, xt, params).sum().backward()
    return xt.grad.numpy()


def references(name: str, params: dict | None = None):
    """Per branch: a float64 reference of g on that branch (None for flat branches); ``params`` over
    the table's defaults (a parameter-generic table at other parameters)."""
    return _references(name, tuple(sorted((params or {}).items())))


@functools.cache
def _references(name: str, params: tuple):
    from invact.fitting.certify import branch_reference
    from invact.fitting.errors import SpecError
    t = table(name)
    if params:
        t = {**t, "params": {**t["params"], **dict(params)}}
    try:
        return [branch_reference(t, i) for i in range(len(t["branches"]))]
    except SpecError:    # e.g. softplus at a threshold whose jump is visible: no branch analysis
        if not params:
            raise
        return None


def _first_order_floor(name: str, x: np.ndarray, y_stored: np.ndarray, fp: np.ndarray,
                       params: dict | None) -> np.ndarray:
    """|g'| |y_stored - f(x)| with g' = f''/f' (float64 autograd), doubled for the second-order
    term: the floor of a monotone table (one branch, no f' = 0) from the stored y's measured error,
    for parameters whose formula the fitter's analysis refuses."""
    xt = torch.tensor(x, requires_grad=True)
    (d1,) = torch.autograd.grad(torch_reference(name, xt, params).sum(), xt, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), xt, allow_unused=True)
    d2 = np.zeros_like(x) if d2 is None else d2.numpy()
    with np.errstate(all="ignore"):
        out = 2 * np.abs(d2 / fp) * stored_error(name, x, y_stored, params)
    return np.where(np.isfinite(out), out, 0.0)


def stored_error(name: str, x: np.ndarray, y_stored: np.ndarray, params: dict | None = None) -> np.ndarray:
    """|y_stored - f(x)| per element, f(x) by PyTorch's float64 forward: how far the y that was stored
    (PyTorch's forward in a narrow dtype, on this CPU) is from the exact value. Correct rounding would
    keep it within half an ulp; PyTorch's float32 kernels do not (docs/floors.md, "Information floor" 3:
    2.15 half-ulps next to GELU's minimum, 36 relative ulps where y is tiny, on an AVX-512 EPYC)."""
    x64 = torch.tensor(np.asarray(x, dtype=np.float64))
    with torch.no_grad():
        exact = torch_reference(name, x64, params).numpy()
    with np.errstate(invalid="ignore"):
        return np.abs(np.asarray(y_stored, dtype=np.float64) - exact)


def information_floor(name: str, x: np.ndarray, y_stored: np.ndarray, fp: np.ndarray | None = None,
                      params: dict | None = None, tie: float = 0.0) -> np.ndarray:
    """|f'(x) - g_b(y_stored)| with g_b the float64 reference on x's own branch b (the branch's x range;
    both branches at a shared end): no table can do better from the stored y. It is measured from the
    y actually stored, never from an assumed rounding of it: whatever PyTorch's forward did to y on
    this CPU (see :func:`stored_error`) is in it. x = +-inf counts (its
    f' is PyTorch's limit there; a narrow dtype rounds y(-inf) of SELU to -1.7578125, whose exact
    preimage is x = -8.7); 0 where y or f'(x) is not finite (no value comparison is made there).
    ``fp``: f'(x) when the caller has it. ``tie``: x within ``tie * |end|`` of a branch end counts on
    that branch too (the forward code compares x with the end rounded to x's dtype, so the x next to
    it may take the other branch's code; with y off by many ulps there, the branches' g differ)."""
    x, y_stored = np.asarray(x, dtype=np.float64), np.asarray(y_stored, dtype=np.float64)
    fp = derivative64(name, x, params) if fp is None else fp
    floor = np.zeros_like(x)
    ok = ~np.isnan(x) & np.isfinite(y_stored) & np.isfinite(fp)
    refs = references(name, params)
    if refs is None:
        if ops.info(name)["code_bits"]:
            raise ValueError(f"no float64 reference of {name!r} at {params}")
        return np.where(ok, _first_order_floor(name, x, y_stored, fp, params), 0.0)
    for ref in refs:
        if ref is None:
            continue
        lo, hi = (float(v) for v in ref.branch.x_range)
        lo, hi = (v + d * tie * abs(v) if math.isfinite(v) else v for v, d in ((lo, -1), (hi, 1)))
        on = ok & (x >= lo) & (x <= hi)
        if on.any():
            floor[on] = np.maximum(floor[on], np.abs(ref(y_stored[on]) - fp[on]))
    return floor


def gradient_bound(name: str, dtype: torch.dtype, x: np.ndarray, y: np.ndarray, go: np.ndarray,
                   ours: np.ndarray, params: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exact, bound, floor): exact = go f'(x) in float64 and the bound on |ours - exact| per element
    (module docstring); all arrays float64, x/y/go/ours as stored in ``dtype``; y as stored (the floor
    is measured from it)."""
    cert = table(name)["certificate"]
    fp = derivative64(name, x, params)
    with np.errstate(over="ignore", invalid="ignore"):
        exact = go * fp
    fi = torch.finfo(dtype)
    floor = information_floor(name, x, y, fp, params, tie=fi.eps)
    afp = np.abs(fp)
    with np.errstate(invalid="ignore", over="ignore"):
        if dtype == torch.float64:
            table_err = cert["approx_error"] * np.maximum(1.0, afp) + 1e-9 + 16 * fi.eps * afp
            rounding = fi.eps * np.abs(ours)
        else:
            ulps = 4 * np.spacing(np.minimum(afp + 1, 3e38).astype(np.float32)).astype(np.float64)
            table_err = (cert["approx_error"] + cert["float32_eval_error"]) * np.maximum(1.0, afp) + ulps
            rounding = (fi.eps / 2 + 2.0**-24) * np.abs(ours)
        bound = np.abs(go) * (floor + table_err) + rounding + fi.tiny
    return exact, bound, floor


@functools.cache
def derivative_error(name: str, dtype: torch.dtype = torch.float32) -> float:
    """Largest per-element bound on |g~(y) - f'(x)| (:func:`gradient_bound` with grad_out = 1) over a
    dense sample of x in ``dtype``: 2^17 points on [-10, 10] and every representable value within
    2^14 of each branch point (not the point itself), y = PyTorch's own forward ON THIS CPU (so its rounding, correct or
    not, is in the floor). For whole-model tests (test_patching, test_distributed), whose tolerance
    is a per-element f' error times gradient norms: a measured maximum, not a proof (the sample
    covers the branch points, where the floor peaks)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty(0, dtype=dtype).element_size()]
    near = [torch.linspace(-10, 10, 1 << 17, dtype=torch.float64).to(dtype)]
    for p in break_points(name):
        if abs(p) < 10:                          # 2^14 neighbours on each side, by bit pattern of |p|
            start = torch.tensor([abs(p)], dtype=torch.float64).to(dtype).view(bits).to(torch.int64)
            steps = start + torch.arange(-(1 << 14), 1 << 14)
            values = steps[steps >= 0].to(bits).view(dtype)
            near += [values, -values] if p == 0 else [values if p > 0 else -values]
    x = torch.cat(near)
    kinks = torch.tensor(break_points(name), dtype=torch.float64).to(dtype)
    x = x[torch.isfinite(x) & ~torch.isin(x, kinks)]  # at a kink f' is a convention (test_properties)
    with torch.no_grad():
        y = torch_reference(name, x)
    x64, y64 = x.double().numpy(), y.double().numpy()
    _, bound, _ = gradient_bound(name, dtype, x64, y64, np.ones_like(x64), np.zeros_like(x64))
    return float(np.nanmax(bound[np.isfinite(bound)]))


def break_points(name: str) -> list[float]:
    """Finite x where the activation changes branch or formula piece: the forward-code breaks and the
    finite ends of every branch's x range (kinks of piecewise activations included), sorted."""
    t = table(name)
    points = {float(eval(str(b["value"]), {"__builtins__": {}}, dict(t["params"])))  # noqa: S307
              for b in t["forward_code"]["x_breaks"]}
    for b in t["branches"]:
        points.update(v for v in (float(e) for e in b["x_range"]) if np.isfinite(v))
    return sorted(points)


def ulps_moved(t: torch.Tensor, k: int) -> torch.Tensor:
    """t moved by k representable values of its dtype (toward +inf for k > 0)."""
    target = torch.full_like(t, math.copysign(math.inf, k))
    for _ in range(abs(k)):
        t = torch.nextafter(t, target)
    return t


def parity_mismatch(theirs: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """Elements where ``ours`` breaks PyTorch's non-finite pattern: NaN exactly where PyTorch's gradient
    is NaN, the same infinity where it is infinite, finite where it is finite (values are checked
    against :func:`gradient_bound` separately)."""
    theirs, ours = np.asarray(theirs, dtype=np.float64), np.asarray(ours, dtype=np.float64)
    nan_differs = np.isnan(theirs) != np.isnan(ours)
    inf_differs = np.isinf(theirs) & (theirs != ours)
    finite_lost = np.isfinite(theirs) & ~np.isfinite(ours)
    return nan_differs | inf_differs | finite_lost


# ------------------------------------------------------------------------------------------------
# NaN inputs: PyTorch's own answer depends on where the element sits

def torch_nan_derivatives(name: str, dtype: torch.dtype) -> tuple[float, ...]:
    """PyTorch's derivative at x = NaN in ``dtype``, on its scalar path (a 1-element tensor) and its
    vectorised path (element 0 of 64). They differ for elu, celu, selu and hardswish (vectorised
    blends give NaN, the scalar tail takes the x > 0 branch), so any of them is PyTorch's behaviour."""
    return _nan_derivatives(name, dtype)


@functools.cache
def _nan_derivatives(name: str, dtype: torch.dtype) -> tuple[float, ...]:
    out = []
    for n in (1, 64):
        x = torch.full((n,), float("nan"), dtype=dtype, requires_grad=True)
        torch_reference(name, x).sum().backward()
        out.append(float(x.grad[0]))
    return tuple(out)


def nan_input_mismatch(name: str, dtype: torch.dtype, go: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """For elements whose x is NaN: ours matches none of PyTorch's answers (torch_nan_derivatives)."""
    go, ours = np.asarray(go, dtype=np.float64), np.asarray(ours, dtype=np.float64)
    bad = np.ones(ours.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        for d in torch_nan_derivatives(name, dtype):
            bad &= parity_mismatch(go * d, ours)
    return bad


# ------------------------------------------------------------------------------------------------
# documented deviations from PyTorch's gradient (tests/test_properties.py pins each one)

_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Deviation:
    """Where invact's gradient knowingly differs from PyTorch's, and why.

    ``where(x, y, go, dtype, params)`` marks the elements (float64 arrays of the stored x, y and
    grad_out); ``examples(dtype)``: x values showing it
    with grad_out = ``grad_out`` on PyTorch's vectorised path (element 0 of 64); ``fixable``: a fix is
    proposed (its test is an xfail(strict=True) until the fix lands, then this entry goes).
    """

    key: str
    name: str
    dtypes: tuple[torch.dtype, ...]
    where: Callable[..., np.ndarray]
    examples: Callable[[torch.dtype], tuple[float, ...]]
    fixable: bool
    reason: str
    grad_out: float = 1.0


_ALL = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _overflowed_from_finite(x, y, go, dtype, params):
    return np.isfinite(x) & np.isinf(y)


def _softplus_overlap(x, y, go, dtype, params):
    cut = params["threshold"] / params["beta"]
    return (x <= cut) & (y > cut)          # PyTorch takes the linear piece where beta x > threshold


def _square_overflows(x, y, go, dtype, params):
    # PyTorch's tanh-GELU backward squares x in its opmath type (float32 for half types):
    # inf past sqrt(finfo.max) = 2**64 (float32) or 2**512 (float64)
    limit = 2.0**512 if dtype == torch.float64 else 2.0**64
    return np.isfinite(x) & (np.abs(x) >= limit * (1 - 2.0**-20))


def _product_overflows(x, y, go, dtype, params):
    # PyTorch's product rule for x * sigmoid(1.702 x) forms grad_out * x in dtype
    return np.isfinite(x) & (np.abs(go * x) > float(torch.finfo(dtype).max))


DEVIATIONS = (
    Deviation("gelu-overflow", "gelu", (torch.float32, torch.bfloat16), _overflowed_from_finite,
              lambda d: (2.0**127 * 1.5, 2.0**127 * 1.9921875), False,
              "PyTorch's vectorised float32 GELU overflows to y = inf for finite x >= 1.7e38 (its scalar "
              "path does not) and its backward gives 1 there; at x = +inf it gives NaN (x * pdf: inf * 0). "
              "The stored y = inf is the same for both, so invact follows x = +inf (NaN, as PyTorch). "
              "Not fixable from y"),
    Deviation("gelu_tanh-square-overflow", "gelu_tanh", (torch.float32, torch.bfloat16, torch.float64),
              _square_overflows,
              lambda d: (2.0**512, -(2.0**512), 1e300, -1e300) if d == torch.float64 else
              (2.0**64, -(2.0**64), 1e30, -1e30), False,
              "PyTorch's tanh-GELU backward squares x in float32 (float64): NaN for |x| >= 1.8e19 "
              "(1.3e154), where f' is 1 (x > 0) or 0 (x < 0) to every digit; invact gives those "
              "limits. Not fixable from y: y = -0.0 for x = -1e20 and for x = -20 alike"),
    Deviation("quick_gelu-product-overflow", "quick_gelu", _ALL, _product_overflows,
              lambda d: (-0.9 * float(torch.finfo(d).max), 0.9 * float(torch.finfo(d).max)), False,
              "PyTorch's backward of x * sigmoid(1.702 x) forms grad_out * x, which overflows for "
              "|x| > finfo.max / |grad_out|, and multiplies it by sigmoid' = 0 (saturated): inf * 0 = "
              "NaN; f' is 1 (x > 0) or 0 (x < 0), which invact gives. Not fixable from y (x < 0: "
              "y = -0.0 for every x < -60), nor wanted", grad_out=2.0),
    Deviation("relu2-overflow", "relu2", _ALL, _overflowed_from_finite,
              lambda d: (300.0, 1000.0) if d == torch.float16 else (3e19, 1e20) if d != torch.float64
              else (1e155, 1e200), False,
              "y = x**2 overflowed to inf (x > sqrt(finfo.max): 256 in float16): the stored y holds no "
              "x, and g(inf) = 2 sqrt(inf) = inf where PyTorch's 2x is finite. Inherent to saving y"),
    Deviation("softplus-threshold-overlap", "softplus", (torch.float64,), _softplus_overlap,
              lambda d: (19.99999999999999, 20.0 - 1e-9), False,
              "softplus switches to x at beta*x = threshold with a jump of log1p(exp(-20)) = 2.06e-9: "
              "y in (20, 20 + 2.06e-9] comes from both x < 20 (f' = 1 - 2.06e-9) and x >= 20 (f' = 1), "
              "and a 0-bit table cannot tell them apart; the error 2.06e-9 exceeds the float64 bound "
              "(the certificate says 0). Invisible in float32 and narrower (ulp(20) = 1.9e-6) at the "
              "default threshold; the jump log1p(exp(-threshold)) / beta grows as the threshold falls "
              "(2.27e-5 at beta = 2, threshold = 10: float32 then gives 1 for 0.99995). Fix: "
              "report the overlap in the certificate (or spend a code bit)"),
)


def deviations(name: str, dtype: torch.dtype, params: dict | None = None) -> list[Deviation]:
    """The deviations of ``name`` in ``dtype``; at parameters other than the table's defaults, those
    listed for any dtype (``dtypes`` says where the defaults show one; e.g. softplus's threshold jump,
    2.06e-9 at the defaults, is 2.27e-5 at beta = 2, threshold = 10, visible in float32)."""
    other = params is not None and {**ops.info(name)["params"], **params} != ops.info(name)["params"]
    return [d for d in DEVIATIONS if d.name == name and (dtype in d.dtypes or other)]


def deviation_mask(name: str, dtype: torch.dtype, x: np.ndarray, y: np.ndarray, go: np.ndarray,
                   params: dict | None = None) -> np.ndarray:
    """Elements covered by a documented deviation of ``name`` in ``dtype`` (at ``params``)."""
    x, y, go = (np.asarray(a, dtype=np.float64) for a in (x, y, go))
    mask = np.zeros(x.shape, dtype=bool)
    values = {**ops.info(name)["params"], **(params or {})}
    with np.errstate(invalid="ignore"):
        for d in deviations(name, dtype, params):
            mask |= d.where(x, y, go, dtype, values)
    return mask


# ------------------------------------------------------------------------------------------------
# one comparison, used by the property tests and the fuzzer

@dataclass
class Comparison:
    """Per element (flat, float64): what PyTorch and invact gave and which checks failed."""

    x: np.ndarray
    y: np.ndarray
    go: np.ndarray
    theirs: np.ndarray
    ours: np.ndarray
    exact: np.ndarray
    bound: np.ndarray
    floor: np.ndarray
    documented: np.ndarray      # a documented deviation covers the element
    pattern_bad: np.ndarray     # NaN/inf pattern differs from PyTorch's
    value_bad: np.ndarray       # finite, but outside the bound

    @property
    def bad(self) -> np.ndarray:
        return self.pattern_bad | self.value_bad

    def describe(self, name: str, dtype: torch.dtype, limit: int = 5) -> str:
        rows = []
        for i in np.flatnonzero(self.bad)[:limit]:
            rows.append(f"{name} {dtype} x={self.x[i]!r} y={self.y[i]!r} go={self.go[i]!r}: torch "
                        f"{self.theirs[i]!r}, invact {self.ours[i]!r}, exact {self.exact[i]!r}, "
                        f"bound {self.bound[i]:.3g} (floor {self.floor[i]:.3g})")
        return "\n".join(rows)


def compare(name: str, dtype: torch.dtype, x: np.ndarray, y: np.ndarray, go: np.ndarray,
            theirs: np.ndarray, ours: np.ndarray) -> Comparison:
    """Check invact's gradient ``ours`` against PyTorch's ``theirs`` (same dtype, same go) and against
    float64 autograd: NaN/inf exactly where PyTorch's (any of PyTorch's answers at NaN inputs), finite
    values within :func:`gradient_bound`, documented deviations set apart."""
    x, y, go, theirs, ours = (np.asarray(a, dtype=np.float64).ravel() for a in (x, y, go, theirs, ours))
    exact, bound, floor = gradient_bound(name, dtype, x, y, go, ours)
    documented = deviation_mask(name, dtype, x, y, go)
    nan_x = np.isnan(x)
    pattern = np.where(nan_x, nan_input_mismatch(name, dtype, go, ours), parity_mismatch(theirs, ours))
    with np.errstate(invalid="ignore"):
        value = (np.isfinite(theirs) & np.isfinite(exact) & np.isfinite(ours)
                 & ~(np.abs(ours - exact) <= bound))
    return Comparison(x, y, go, theirs, ours, exact, bound, floor, documented,
                      pattern & ~documented, value & ~documented)


@contextlib.contextmanager
def flushed_denormals(on: bool = True):
    """torch.set_flush_denormal(on) on ONE intra-op thread, then the caller's setting and thread count.

    The setting is per thread (x86 MXCSR), and torch's worker threads copy it from the thread that
    starts them: flushing with several threads would either leave workers unflushed (large tensors not
    actually flushed) or start workers that stay flushed for the rest of the session (later tests'
    arithmetic flushed). One thread keeps every operation on the thread whose setting is known.
    """
    from invact import bitpack
    was, threads = bitpack.denormals_flushed(), torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(on)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)
        torch.set_num_threads(threads)
