"""LayerNorm and RMSNorm that save their output ``y`` (the tensor the next Linear keeps) instead of ``x``.

``y = gamma * x_hat + beta`` with ``x_hat = (x - mean) * rstd`` (RMSNorm: ``x * rstd``, no beta). The
backward needs ``x_hat``, ``gamma`` and the per-row ``rstd``; it recovers ``x_hat = (y - beta) / gamma``
from the saved ``y``, and uses ``y`` directly where no division is needed:
``sum(dy * gamma * x_hat) = sum(dy * (y - beta))``. With ``dxhat = dy * gamma``::

    dx     = rstd * (dxhat - mean(dxhat) - x_hat * mean(dxhat * x_hat))    (RMSNorm: no mean(dxhat))
    dgamma = sum_rows(dy * x_hat),   dbeta = sum_rows(dy)

Small gamma. Where y cannot give a column's ``x_hat`` back within one unit of y's rounding (exact zeros, tiny
gamma, beta larger than gamma: the rule, :data:`RATIO` and :func:`recovery_floor` are in
:mod:`invact.norm_recovery`), the norm keeps that column's ``x_hat``, or every column's where more than half are
such. :func:`recovery` says which, and why.

Output dtype. Under torch.autocast a Hugging Face norm returns float32 and each following Linear saves
its own bf16 copy; ``autocast_output=True`` makes the norm return the autocast dtype itself (the same
bits the Linear's cast makes: float32 rounded once), so the saved ``y`` is the Linear's input.

Layers, in order: the ``invact::norm_forward`` / ``invact::norm_backward`` custom ops with fakes and autograd,
dtypes and autocast, the argument checks, the functional wrappers, the modules. The reference math (eager torch,
also the fallback) and the CPU backward paths are in :mod:`invact.norm_math`, the Triton kernels (CUDA) in
:mod:`invact.norm_triton`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from . import backends, dtensor, layout, norm_cpu, ops
from .arguments import ArgumentTypeError, ShapeError, flag
from .common.params import real
from .norm_math import backward_torch, forward_eager
from .norm_recovery import (RATIO, Recovery, acc_dtype, default_eps, floor_in, gamma, kept_columns, recoverable,
                            recovery, recovery_floor, weight_offset)

__all__ = ["layer_norm", "rms_norm", "LayerNorm", "RMSNorm", "recovery", "Recovery", "STYLES", "LAYER_STYLES", "RATIO",
           "recovery_floor"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Hugging Face forms of RMSNorm (see style_dtypes): where x_hat is rounded, the output dtype, gamma = offset + w
STYLES = ("torch", "llama", "t5", "gemma")
# LayerNorm's: torch's, "llama": ``F.layer_norm(x.float(), shape, w.float(), b.float()).to(x.dtype)``, in float32
# whatever the dtypes of x and the parameters (OLMo's, Cohere's; CLIP's with float32 weights), or "gemma":
# gamma = 1 + w, ``F.layer_norm(x, shape, w + 1, b)`` (Nemotron's LayerNorm1P)
LAYER_STYLES = ("torch", "llama", "gemma")


# ----------------------------------------------------------------------------------------------
# the custom ops

def _rows(x: Tensor, n: int) -> Tensor:
    return x.reshape(-1, n) if n else x.reshape(-1, 0)


def _use_triton(backend: str, t: Tensor) -> bool:
    return backend == "triton" and t.dtype != torch.float64 and "triton" in backends.available(t.device.type)


def _forward_columns(weight: Tensor | None, bias: Tensor | None, n: int, offset: float, acc: torch.dtype,
                     y_dtype: torch.dtype, device: torch.device) -> Tensor:
    """The columns a forward keeps x_hat for (int64 indices), with one check and no ``nonzero`` where every
    column is recoverable (per-call work that matters next to a norm's single pass)."""
    if weight is not None or bias is not None:    # y = gamma x_hat + beta: gamma 1 without a weight
        ok = weight is not None and norm_cpu.all_recoverable(weight, bias, offset, RATIO,
                                                             floor_in(y_dtype, torch.float32))  # float32 C
        good = None if ok else recoverable(gamma(weight, offset, n, acc, device),
                                           None if bias is None else bias.reshape(n), y_dtype)
        if good is not None and not bool(good.all()):
            return kept_columns(~good)
    return torch.empty(0, dtype=torch.int64, device=device)


def _norm_forward_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, n: int, eps: float, rms: bool,
                  offset: float, norm_dtype: torch.dtype | None, out_dtype: torch.dtype,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x2 = _rows(x, n).contiguous()
    acc = acc_dtype(x.dtype)
    out = None
    if _use_triton(backend, x2):
        from . import impl_triton, norm_triton
        out = impl_triton.launched(x2.device, lambda: norm_triton.forward(x2, weight, bias, eps, rms, offset,
                                                                          norm_dtype, out_dtype))
    y, mean, rstd = out if out is not None else forward_eager(x2, weight, bias, eps, rms, offset, norm_dtype,
                                                               out_dtype, x)
    cols = _forward_columns(weight, bias, n, offset, acc, out_dtype, x.device)
    if not cols.numel():                                   # the usual case: y alone recovers every column
        return _shaped(y, x.shape), rstd.view(-1), x.new_empty(x2.shape[0], 0), cols
    xk = x2.index_select(1, cols).to(acc)
    xhat = xk * rstd.reshape(-1, 1) if rms else (xk - mean.reshape(-1, 1)) * rstd.reshape(-1, 1)
    if norm_dtype is not None:
        xhat = xhat.to(norm_dtype)                         # the x_hat the forward multiplied by gamma
    return _shaped(y, x.shape), rstd.reshape(-1).to(acc), xhat.to(x.dtype), cols


def _shaped(y: Tensor, shape: torch.Size) -> Tensor:
    """``y`` in x's shape and not a view: autograd refuses any in-place op on a view a custom Function returns,
    with a message naming neither invact nor the saved y; on a plain tensor an in-place op (ReLU(inplace=True)
    after the norm) bumps the saved y's version, and backward raises PyTorch's usual error, as after an
    invact activation."""
    return y.reshape(shape).detach()


_norm_forward = torch.library.custom_op("invact::norm_forward", _norm_forward_impl, mutates_args=())


@_norm_forward.register_fake
def _norm_forward_fake(x, weight, bias, n, eps, rms, offset, norm_dtype, out_dtype, backend):
    rows = x.numel() // n if n else 0
    # the kept columns depend on gamma's and beta's values: a symbol under FakeTensors with a shape environment
    # (torch.compile, export); meta tensors (shape inference, models built on the meta device) and a plain
    # FakeTensorMode (memory estimators) have no values nor symbols: none kept, the usual case
    ctx = None if x.is_meta else torch.library.get_ctx()    # (meta tensors have no context to ask)
    shapes = getattr(ctx, "_shape_env", None)
    k = ctx.new_dynamic_size() if shapes is not None and shapes.allow_dynamic_output_shape_ops else 0
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(rows, dtype=acc_dtype(x.dtype)),
            x.new_empty(rows, k), x.new_empty(k, dtype=torch.int64))


def _norm_backward_impl(dy: Tensor, y: Tensor, rstd: Tensor, extra: Tensor, cols: Tensor, weight: Tensor | None,
                   bias: Tensor | None, n: int, rms: bool, offset: float, x_dtype: torch.dtype,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    y2, dy2 = _rows(y, n).contiguous(), _rows(dy, n).contiguous()
    out = None
    if _use_triton(backend, y2):
        from . import impl_triton, norm_triton
        out = impl_triton.launched(y2.device, lambda: norm_triton.backward(dy2, y2, rstd, extra, cols, weight, bias,
                                                                           rms, offset, x_dtype))
    if out is None:
        out = backward_torch(dy2, y2, rstd, extra, cols, weight, bias, rms, offset,
                             backend == "compiled" and y2.device.type == "cpu", x_dtype)
    dx, dg, db = out
    return (dx.to(x_dtype).reshape(y.shape),
            y.new_empty(0) if weight is None else dg.to(weight.dtype).reshape(weight.shape),
            y.new_empty(0) if bias is None else db.to(bias.dtype).reshape(bias.shape))


_norm_backward = torch.library.custom_op("invact::norm_backward", _norm_backward_impl, mutates_args=())


@_norm_backward.register_fake
def _norm_backward_fake(dy, y, rstd, extra, cols, weight, bias, n, rms, offset, x_dtype, backend):
    return (y.new_empty(y.shape, dtype=x_dtype), y.new_empty(0) if weight is None else torch.empty_like(weight),
            y.new_empty(0) if bias is None else torch.empty_like(bias))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, n, eps, rms, offset, norm_dtype, out_dtype, backend = inputs
    ctx.invact = (n, rms, offset, x.dtype, backend)
    if any(ctx.needs_input_grad[:3]):
        y, rstd, extra, cols = output
        ctx.save_for_backward(y, rstd, extra, cols, weight, bias)   # y, not x: the next layer keeps y


def _second_order() -> RuntimeError:
    return RuntimeError("invact norms have no second derivative (double backward): their backward recovers "
                        "x_hat from the saved output; use torch.nn.functional's norm where it is needed")


class _Refused(ops.RefuseSecondDerivative):
    """A saved tensor unchanged, refusing a gradient: the backward's derivative in y, rstd, the kept x_hat,
    weight or bias is a second derivative of the norm (the one in dy, first order, runs)."""

    @staticmethod
    def backward(ctx, grad):
        raise _second_order()

    @staticmethod
    def jvp(ctx, tangent):
        raise _second_order()


def _saved(ctx) -> tuple[Tensor | None, ...]:
    """(y, rstd, extra, cols, weight, bias); where the backward builds a graph (create_graph=True), each
    that requires grad through :class:`_Refused`, so that only a true second derivative is refused."""
    saved = ctx.saved_tensors
    if not torch.is_grad_enabled():
        return saved
    return tuple(_Refused.apply(t) if t is not None and t.requires_grad else t for t in saved)


def _grad(ctx, dy, d_rstd, d_extra, d_cols):
    dx, dw, db = torch.ops.invact.norm_backward(dy, *_saved(ctx), *ctx.invact)
    return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
            db if ctx.needs_input_grad[2] else None, None, None, None, None, None, None, None)


def _tangent(gdx: Tensor | None, gdw: Tensor | None, gdb: Tensor | None, y: Tensor, rstd: Tensor, extra: Tensor,
             cols: Tensor, weight: Tensor | None, bias: Tensor | None, n: int, rms: bool,
             offset: float) -> Tensor:
    """The backward's derivative in dy (it is linear in dy) applied to the gradients of (dx, dgamma, dbeta):
    the forward's Jacobian times them, ``gamma rstd (gdx - mean(gdx) - x_hat mean(gdx x_hat)) + x_hat gdw
    + gdb`` (RMSNorm: no mean(gdx)), rows (rows, n) in the accumulation dtype, x_hat recovered as the
    backward recovers it (kept columns from ``extra``). Eager torch ops: torch.autograd.functional.jvp's
    double-vjp, not a training path."""
    acc = acc_dtype(rstd.dtype)
    g = gamma(weight, offset, n, acc, y.device)
    divisor = g.index_fill(0, cols, 1.0) if cols.numel() else g
    t = _rows(y, n).to(acc)
    xhat = (t if bias is None else t - bias.reshape(n).to(acc)) / divisor
    if cols.numel():
        xhat.index_copy_(1, cols, extra.to(acc))
    out = torch.zeros_like(xhat)
    if gdx is not None:
        v = _rows(gdx, n).to(acc)
        inner = v - xhat * (v * xhat).mean(-1, keepdim=True)
        out = g * (inner if rms else inner - v.mean(-1, keepdim=True)) * rstd.to(acc).reshape(-1, 1)
    if gdw is not None and weight is not None:
        out = out + xhat * gdw.reshape(n).to(acc)
    if gdb is not None and bias is not None:
        out = out + gdb.reshape(n).to(acc)
    return out


def _backward_setup(ctx, inputs, output) -> None:
    dy, saved = inputs[0], inputs[1:7]
    ctx.invact, ctx.dy = inputs[7:10], (dy.dtype, dy.shape)
    if any(ctx.needs_input_grad[:7]):
        ctx.save_for_backward(*saved)


def _grad_of_backward(ctx, gdx, gdw, gdb):
    """Gradients of the backward (dx, dgamma, dbeta)(dy, y, rstd, extra, cols, weight, bias): in dy,
    :func:`_tangent`; zeros for the others, which a backward building a graph passes through :class:`_Refused`
    (:func:`_saved`), so that differentiating through them is refused."""
    saved = ctx.saved_tensors
    ddy = None
    if ctx.needs_input_grad[0]:
        dtype, shape = ctx.dy
        ddy = _tangent(gdx, gdw, gdb, *saved, *ctx.invact).to(dtype).reshape(shape)
    need = ctx.needs_input_grad[1:7]
    rest = (torch.zeros_like(t) if wanted and t is not None else None for wanted, t in zip(need, saved))
    return (ddy, *rest, None, None, None, None, None)


_norm_forward.register_autograd(_grad, setup_context=_setup_context)
_norm_backward.register_autograd(_grad_of_backward, setup_context=_backward_setup)
dtensor.register_when_imported("norm_forward", "norm_backward")


class _Direct(torch.autograd.Function):
    """Plain eager calls (:func:`invact.ops.plain_eager` tensors, every backend): what
    invact::norm_forward's autograd does — the same code, saving y, rstd and the kept columns — without
    the custom ops' dispatch (~30 us a call). A backward that builds a graph (create_graph=True) runs
    invact::norm_backward, differentiable in dy only (:func:`_grad_of_backward`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, n, eps, rms, offset, norm_dtype, out_dtype, backend):
        output = _norm_forward_impl(x, weight, bias, n, eps, rms, offset, norm_dtype, out_dtype, backend)
        _setup_context(ctx, (x, weight, bias, n, eps, rms, offset, norm_dtype, out_dtype, backend), output)
        return output[0]

    @staticmethod
    def backward(ctx, dy):
        backward = torch.ops.invact.norm_backward if torch.is_grad_enabled() else _norm_backward_impl
        # batched dy (is_grads_batched, jacobian(vectorize=True)): torch ops
        args = ctx.invact if ops.plain_eager(dy) else (*ctx.invact[:-1], "eager")
        dx, dw, db = backward(dy, *_saved(ctx), *args)
        return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
                db if ctx.needs_input_grad[2] else None, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# dtypes and autocast, decided once here so the ops see concrete dtypes

def style_dtypes(style: str, x: torch.dtype, w: torch.dtype | None) -> tuple[torch.dtype | None, torch.dtype]:
    """(dtype x_hat is rounded to before gamma, output dtype) of each form of RMSNorm / LayerNorm:
    torch: none, x's; llama (Mistral, Qwen2, Phi-3, ...): ``weight * x_hat.to(x.dtype)``; t5:
    ``weight * x_hat.to(weight.dtype)`` for half weights; gemma: ``(x_hat * (1 + w)).type_as(x)``."""
    half = (torch.float16, torch.bfloat16)
    w = w or x
    if style == "llama":
        return (x if x != acc_dtype(x) else None), torch.promote_types(w, x)
    if style == "t5":
        if w in half:
            return w, w
        return None, torch.promote_types(w, torch.promote_types(x, torch.float32))
    return None, x


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:            # a device type without autocast
        return None


@torch._dynamo.assume_constant_result  # Dynamo calls it (its arguments are guarded constants), not tracing the cache
def _autocast_upcasts(device_type: str, dtype: torch.dtype, cast: torch.dtype, rms: bool) -> bool:
    """Does torch.autocast(device_type, cast) run F.layer_norm / F.rms_norm of ``dtype`` in float32 (CUDA:
    yes, CPU: no)? Asked of PyTorch itself on an empty tensor, once per configuration."""
    return _asked_autocast(device_type, dtype, cast, rms)


@functools.cache
def _asked_autocast(device_type: str, dtype: torch.dtype, cast: torch.dtype, rms: bool) -> bool:
    x = torch.empty(0, 4, dtype=dtype, device=device_type)
    with torch.autocast(device_type, dtype=cast):
        out = torch.nn.functional.rms_norm(x, (4,)) if rms else torch.nn.functional.layer_norm(x, (4,))
    return out.dtype != dtype


def _check(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None,
           fn: str) -> tuple[int, ...]:
    if not torch.jit.is_tracing():
        return _checked_shape(x, normalized_shape, weight, bias, fn)
    with warnings.catch_warnings():  # torch.jit.trace: sizes are traced values, and it warns that these
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # checks of the fixed shape are constants
        return _checked_shape(x, normalized_shape, weight, bias, fn)


def _jagged(x: Any, normalized_shape: Any, fn: str) -> bool:
    """Whether x is a jagged nested tensor, normalized on ``x.values()`` (as torch's norms take it); a
    ShapeError where ``normalized_shape`` reaches its ragged dimension, whose size differs per row."""
    if not isinstance(x, Tensor) or not layout.is_jagged(x):
        return False
    try:
        dims = len(normalized_shape)         # its sizes are checked on the values
    except TypeError:                        # an integer
        dims = 1
    if x.dim() - dims <= x._ragged_idx:
        raise ShapeError(f"invact.functional.{fn}: normalized_shape must be dimensions of a jagged nested input "
                         f"after its ragged dimension {x._ragged_idx}, got normalized_shape={normalized_shape!r} "
                         f"for an input of shape {tuple(x.shape)}")
    return True


def int_tuple(shape: Any) -> tuple[int, ...] | None:
    """``shape`` (an integer or a sequence of them: Python's, NumPy's, 0-d integer tensors, as torch takes
    them) as a tuple of ints; None where it is not one."""
    try:
        return (operator.index(shape),)
    except TypeError:
        pass
    try:
        return tuple(operator.index(s) for s in shape)
    except TypeError:
        return None


def _checked_shape(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None,
                   fn: str) -> tuple[int, ...]:
    if not isinstance(x, Tensor):
        raise TypeError(f"invact.functional.{fn}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"invact.functional.{fn}: input must be float16, bfloat16, float32 or float64, got {x.dtype}")
    layout.require_strided(x, f"invact.functional.{fn}: input")
    shape = int_tuple(normalized_shape)
    if shape is None or not all(s >= 0 for s in shape) or tuple(x.shape[x.dim() - len(shape):]) != shape \
            or len(shape) > x.dim() or not shape:   # torch: TypeError for a non-integer shape, else RuntimeError
        error = ArgumentTypeError if shape is None else ShapeError
        raise error(f"invact.functional.{fn}: normalized_shape must be the input's trailing dimensions; got "
                    f"normalized_shape={normalized_shape!r} for an input of shape {tuple(x.shape)}")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
            error = ShapeError if isinstance(t, Tensor) else ArgumentTypeError
            raise error(f"invact.functional.{fn}: {arg} must be a tensor of shape normalized_shape={shape}, "
                        f"got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t is not None and t.device != x.device:  # as torch's norms refuse (a kernel would read a wrong pointer)
            raise RuntimeError(f"invact.functional.{fn}: {arg} must be on the input's device {x.device}, "
                               f"got {arg} on {t.device}")
    return shape


def _apply(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool,
           style: str, autocast_output: bool, backend: str | None) -> Tensor:
    if any(dtensor.is_dtensor(t) for t in (x, weight, bias)):  # on each rank's rows (invact.dtensor)
        def local(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
            return _apply(x, shape, weight, bias, eps, rms, style, autocast_output, backend)
        return dtensor.norm(x, weight, bias, len(shape), "rms_norm" if rms else "layer_norm", local)
    _check_style(style, rms)
    autocast_output = flag(autocast_output, "autocast_output")
    chosen = backends.resolve(backend, x.device.type)
    cast = _autocast_dtype(x.device.type)
    if cast is not None and style == "torch" and x.dtype != torch.float32 \
            and _autocast_upcasts(x.device.type, x.dtype, cast, rms):
        x = x.float()                                       # as autocast runs torch's norm
    norm_dtype, out_dtype = style_dtypes(style, x.dtype, None if weight is None else weight.dtype)
    if not rms and style == "llama":         # F.layer_norm(x.float(), shape, w.float(), b.float()).to(x.dtype)
        weight, bias = (None if p is None else p.float() for p in (weight, bias))
        norm_dtype, out_dtype, x = None, x.dtype, x.float()
    if cast is not None and autocast_output and out_dtype == torch.float32:
        out_dtype = cast                                    # what the next autocast-lowered Linear saves
    offset = weight_offset(style) if weight is not None else 0.0    # gamma = offset + w; 1 without a weight
    n = math.prod(shape)
    eps = real(eps, "eps")
    if x.dtype == torch.float64 and style != "torch" and (rms or style == "llama"):  # HF's forms: float64 x in float32
        if style == "t5":
            return _t5_float64(x, shape, weight, eps)
        norm_dtype, x = (torch.float64 if style == "llama" else None), x.float()   # llama: weight * x_hat.to(x.dtype)
    if n == 0:  # nothing to normalise nor save: torch's own norm (empty y; the gradients are empty tensors)
        fn = torch.nn.functional
        return (fn.rms_norm(x, shape, weight, eps) if rms else fn.layer_norm(x, shape, weight, bias, eps)).to(out_dtype)
    args = (x, weight, bias, n, eps, rms, offset, norm_dtype, out_dtype, chosen)
    with torch.autocast(x.device.type, enabled=False) if cast is not None else contextlib.nullcontext():
        if ops.differentiating() or _vmapped(weight, bias):  # functionalize too: these are plain torch ops
            # forward-mode AD or torch.func differentiating: the custom op's autograd is reverse mode only
            # and not functorch-aware (a zero tangent), so torch's own math runs, the same y, saving x
            y = forward_eager(_rows(x, n), weight, bias, eps, rms, offset, norm_dtype, out_dtype, x)[0]
            return y.reshape(x.shape)
        if ops.plain_eager(x, weight, bias):
            return _Direct.apply(*args)
        return torch.ops.invact.norm_forward(*args)[0]


def _vmapped(*params: Tensor | None) -> bool:
    """Whether a parameter is batched by torch.func.vmap at some level (an ensemble's stacked weights,
    torch.func.stack_module_state): the custom op has no vmap rule, and its per-member fallback cannot stack
    kept columns whose number differs between members."""
    functorch = torch._C._functorch
    for t in params:
        while t is not None:
            if functorch.is_batchedtensor(t):
                return True
            # Dynamo traces the outermost wrapper only (as invact.ops reads x's)
            t = None if torch.compiler.is_compiling() or not functorch.is_functorch_wrapped_tensor(t) \
                else functorch.get_unwrapped(t)
    return False


def _check_style(style: str, rms: bool) -> None:
    styles = STYLES if rms else LAYER_STYLES
    if style not in styles:
        raise ValueError(f"style must be one of {', '.join(styles)}, got {style!r}")


def _t5_float64(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, eps: float) -> Tensor:
    """T5LayerNorm of float64 x, in torch ops (autograd saves x): its variance is of x in float32 but x_hat
    is float64 x times that float32 rstd, which no form of the custom op computes."""
    dims = tuple(range(-len(shape), 0))
    xhat = x * torch.rsqrt(x.float().pow(2).mean(dims, keepdim=True) + eps)
    if weight is None:
        return xhat
    return weight * (xhat.to(weight.dtype) if weight.dtype in (torch.float16, torch.bfloat16) else xhat)


# ----------------------------------------------------------------------------------------------
# functional

def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5, *, style: str = "torch", autocast_output: bool = False,
               backend: str | None = None) -> Tensor:
    """``F.layer_norm`` that saves its output (and the per-row rstd) instead of its input.

    ``autocast_output``: under torch.autocast, return the autocast dtype where torch would return
    float32 (for a norm whose consumers are autocast-lowered Linears). ``style``: "torch", or "llama":
    ``F.layer_norm(x.float(), shape, w.float(), b.float()).to(x.dtype)`` (OLMo's, Cohere's: x and the
    parameters of any dtype computed in float32, see :data:`LAYER_STYLES`). ``backend``: "triton" (CUDA),
    "compiled" (CPU default: the backward by the C kernel of :mod:`invact.norm_cpu`, else Inductor), "eager",
    or None (see :mod:`invact.backends`).
    """
    if isinstance(input, torch.fx.Proxy):
        return ops.fx_call(layer_norm, input, normalized_shape, weight, bias, eps, style=style,
                           autocast_output=autocast_output, backend=backend)
    if _jagged(input, normalized_shape, "layer_norm"):
        return layout.on_jagged_values(lambda v: layer_norm(v, normalized_shape, weight, bias, eps, style=style,
                                                            autocast_output=autocast_output, backend=backend), input)
    shape = _check(input, normalized_shape, weight, bias, "layer_norm")
    return _apply(input, shape, weight, bias, eps, False, style, autocast_output, backend)


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
             eps: float | None = None, *, style: str = "torch", autocast_output: bool = False,
             backend: str | None = None) -> Tensor:
    """``F.rms_norm`` that saves its output (and the per-row rstd) instead of its input.

    ``eps=None``: the epsilon of the dtype torch computes in, as torch (float32's for bfloat16 and
    float16 input, whose own would be 1e4-6e4x larger). ``style``: the formula's rounding, one of
    :data:`STYLES` ("llama", "t5", "gemma": the Hugging Face forms, see :func:`style_dtypes`).
    """
    if isinstance(input, torch.fx.Proxy):
        return ops.fx_call(rms_norm, input, normalized_shape, weight, eps, style=style,
                           autocast_output=autocast_output, backend=backend)
    if _jagged(input, normalized_shape, "rms_norm"):
        return layout.on_jagged_values(lambda v: rms_norm(v, normalized_shape, weight, eps, style=style,
                                                          autocast_output=autocast_output, backend=backend), input)
    shape = _check(input, normalized_shape, weight, None, "rms_norm")
    if eps is None:
        eps = default_eps(input.dtype)
    return _apply(input, shape, weight, None, eps, True, style, autocast_output, backend)


# ----------------------------------------------------------------------------------------------
# modules

class SavingNorm:
    """The base of :class:`LayerNorm` and :class:`RMSNorm` (``isinstance`` tells invact's norms from others
    inside the package), and what they add to torch.nn's: ``backend``, ``autocast_output``, :meth:`recovery`,
    and ``normalized_shape=None`` without affine parameters: the last dimension, of any size."""

    backend: str | None
    autocast_output: bool
    _invact_replaced: tuple[nn.Module, ...] | None = None    # set by invact.patch: (original,)

    def _shape_for(self, input: Tensor) -> Any:
        """The normalized shape for ``input``: the module's, or its last dimension where that is None."""
        if self.normalized_shape is not None:
            return self.normalized_shape
        if isinstance(input, torch.fx.Proxy):  # fx.symbolic_trace: a node the traced graph evaluates
            return input.shape[-1:]
        if not isinstance(input, Tensor):      # (the functional's check names it)
            return None
        if input.dim() == 0:
            raise ShapeError(f"{type(self).__name__}(normalized_shape=None) normalizes the input's last dimension: "
                             "input must have at least one, got a 0-d tensor")
        return tuple(input.shape[-1:])

    def __prepare_scriptable__(self) -> nn.Module:
        raise ops.script_refused(self)

    def _configure(self, any_size: bool, style: Any, rms: bool, autocast_output: Any, backend: Any) -> None:
        """Set what the invact norms add, after torch's ``__init__`` (given a placeholder shape of 1
        where ``any_size``)."""
        if any_size:
            self.normalized_shape = None  # type: ignore[assignment]
        _check_style(style, rms)
        self.style, self.backend = style, backends.check_name(backend)
        self.autocast_output = flag(autocast_output, "autocast_output")

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]  # type: ignore[misc]  (torch's LayerNorm / RMSNorm's)
        parts += [f"style={self.style!r}"] if self.style != "torch" else []
        parts += [f"backend={self.backend!r}"] if self.backend is not None else []
        return ", ".join(p for p in parts + (["autocast_output=True"] if self.autocast_output else []) if p)

    def recovery(self, y_dtype: torch.dtype | None = None) -> Recovery:
        """Which columns this layer keeps x_hat for with its current parameters (``y_dtype``: the
        output dtype, by default the weight's)."""
        w = getattr(self, "weight", None)
        dtype = y_dtype or (w.dtype if w is not None else torch.float32)
        return recovery(w, getattr(self, "bias", None), dtype, weight_offset(getattr(self, "style", "torch")))


def _any_size(normalized_shape: Any, elementwise_affine: Any) -> bool:
    """Whether a module normalizes the last dimension of any size: ``normalized_shape=None``, which
    needs ``elementwise_affine=False`` (a weight has one size)."""
    if normalized_shape is not None:
        return False
    if elementwise_affine is not False:
        raise ArgumentTypeError("normalized_shape=None (the last dimension, of any size) needs "
                                f"elementwise_affine=False, got elementwise_affine={elementwise_affine!r}")
    return True


class LayerNorm(SavingNorm, nn.LayerNorm):
    """torch.nn.LayerNorm (same signature, parameters, state_dict keys) that saves its output.

    ``style`` (keyword-only): "torch", "llama": ``F.layer_norm(x.float(), ...).to(x.dtype)`` with the
    parameters in float32 too, whatever their dtype (OLMo's, Cohere's), or
    "gemma": gamma = 1 + w, ``F.layer_norm(x, shape, w + 1, b)`` (Nemotron's LayerNorm1P; its weight
    starts at zeros).
    ``normalized_shape=None`` with ``elementwise_affine=False``: the last dimension, of any size.
    """

    def __init__(self, normalized_shape: int | Sequence[int] | None, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *, style: str = "torch", autocast_output: bool = False,
                 backend: str | None = None) -> None:
        any_size = _any_size(normalized_shape, elementwise_affine)
        super().__init__(1 if any_size else normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._configure(any_size, style, False, autocast_output, backend)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self._shape_for(input), self.weight, self.bias, self.eps, style=self.style,
                          autocast_output=self.autocast_output, backend=self.backend)


class RMSNorm(SavingNorm, nn.RMSNorm):
    """torch.nn.RMSNorm (same signature, parameters, state_dict keys) that saves its output.

    ``style`` (keyword-only): "torch", or a Hugging Face form ("llama", "t5", "gemma" with gamma = 1 + w).
    ``normalized_shape=None`` with ``elementwise_affine=False``: the last dimension, of any size (Llama 4's
    weight-less qk norm).
    """

    def __init__(self, normalized_shape: int | Sequence[int] | None, eps: float | None = None,
                 elementwise_affine: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, style: str = "torch", autocast_output: bool = False,
                 backend: str | None = None) -> None:
        any_size = _any_size(normalized_shape, elementwise_affine)
        super().__init__(1 if any_size else normalized_shape, eps, elementwise_affine, device, dtype)
        self._configure(any_size, style, True, autocast_output, backend)

    def forward(self, input: Tensor) -> Tensor:
        return rms_norm(input, self._shape_for(input), self.weight, self.eps, style=self.style,
                        autocast_output=self.autocast_output, backend=self.backend)
