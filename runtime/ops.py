"""The custom-op layer: one forward and one backward ``torch.library`` op for every generated activation.

``invact::forward(x, name, params, backend) -> (y, code)`` computes y = f(x) and the packed branch
code; its autograd saves ONLY y and the code (nothing when x does not require grad).
``invact::backward(grad, y, code, name, params, backend) -> grad_x`` is a separate op with its own fake,
so the backward traces under torch.compile. Both work element by element in y's memory order (y keeps
x's memory format, as torch.nn.functional's ops do; :mod:`invact.layout`), and the code is packed in
that order. ``invact::value(x, name, params, backend) -> y`` is the forward without the code:
:func:`apply` runs it when nothing will differentiate y (no_grad, inference_mode, x not requiring
grad). Under torch.func transforms and forward-mode AD :func:`apply` wraps the same ops in an
autograd.Function with a jvp (tangent * g(y, code)) and vmap rules; in plain eager training it runs
the same implementations from an autograd.Function (:class:`_Direct`), skipping the ops' dispatch.

The ops compute nothing themselves: each tries the implementations of its backend in order
(:class:`Implementation`; Triton, the C kernels, Inductor's code, eager torch ops), the first that
takes the tensors answering. The generated modules and their registry are :mod:`invact.registry`'s;
parameters and constants :mod:`invact.constants`'s.

Public API: :func:`apply`, :func:`info`, :func:`names`, :func:`use_root` (and :func:`table_constants`,
:func:`module_constants`, :class:`Constants`, re-exported from :mod:`invact.constants`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._C._functorch import TransformType
from torch.fx.experimental.symbolic_shapes import guard_scalar

from . import backends, bitpack, dtensor, layout, registry
from .arguments import ArgumentTypeError, ShapeError
from .constants import Constants, module_constants, param_values, table_constants
from .impl_compiled import COMPILED
from .impl_cpu import CPU
from .impl_eager import EAGER
from .impl_table_c import TABLE_C
from .impl_triton import TRITON
from .registry import info, names, use_root

__all__ = ["apply", "differentiating", "info", "names", "use_root", "table_constants", "module_constants", "Constants",
           "Implementation", "implementations", "plain_eager", "recording", "script_refused"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# implementations, tried in order

class Implementation(Protocol):
    """One way to compute the ops. Each method answers None where it does not take these tensors
    (then the next implementation runs); ``params`` are the checked values in the table's order."""

    def forward(self, x: Tensor, name: str, params: list[float]) -> tuple[Tensor, Tensor] | None:
        """(y, packed code), y laid out like x (:func:`invact.layout.like`)."""

    def value(self, x: Tensor, name: str, params: list[float]) -> Tensor | None:
        """y alone."""

    def backward(self, grad: Tensor, y: Tensor, code: Tensor, name: str, params: list[float]) -> Tensor | None:
        """grad * g(y, code), laid out like y."""


_TRITON, _EAGER, _COMPILED, _CPU_COMPILED = (TRITON,), (EAGER,), (COMPILED,), (CPU, TABLE_C, COMPILED)
_CPU_COMPILED_64 = (TABLE_C, COMPILED)  # float64: the C kernels take 32 and 16 bits; TABLE_C runs eager code


def implementations(backend: str, t: Tensor) -> tuple[Implementation, ...]:
    """What runs ``backend`` for tensor ``t``, in order. float64 runs on the torch code (Triton's
    kernels compute in float32; the C kernels take 32 and 16 bits). Where Triton declines (its kernel
    failed, now or before), :func:`_first` runs the backend used instead."""
    if backend == "compiled":
        return (_CPU_COMPILED if t.dtype != torch.float64 else _CPU_COMPILED_64) if t.is_cpu else _COMPILED
    if backend == "triton":
        return _EAGER if t.dtype == torch.float64 else _TRITON
    return _EAGER


def _untraced(backend: str) -> str:
    """torch.compile refuses to run inside an FX trace (make_fx, torch.func.linearize): eager there."""
    return "eager" if backend == "compiled" and torch.fx._symbolic_trace.is_fx_symbolic_tracing() else backend


def _first(method: str, backend: str, t: Tensor, *args):
    """The answer of the first of ``backend``'s implementations for tensor ``t`` that takes ``args``."""
    for impl in implementations(_untraced(backend), t):
        done = getattr(impl, method)(*args)
        if done is not None:
            return done
    return _first(method, backends.instead_of_triton(t.device.type), t, *args)  # only Triton declines


# ----------------------------------------------------------------------------------------------
# the custom ops

@torch.library.custom_op("invact::forward", mutates_args=())
def _forward(x: Tensor, name: str, params: list[float], backend: str) -> tuple[Tensor, Tensor]:
    return _first("forward", backend, x, x, name, params)


@_forward.register_fake
def _forward_fake(x, name, params, backend):
    return layout.like(x), layout.empty_code(x, registry.module(name).CODE_BITS)


def _y_only(x: Tensor, name: str, params: list[float], backend: str) -> Tensor:
    """y of invact::forward without the code: what apply runs when nothing will differentiate y."""
    return _first("value", backend, x, x, name, params)


_value = torch.library.custom_op("invact::value", _y_only, mutates_args=())


@_value.register_fake
def _value_fake(x, name, params, backend):
    return layout.like(x)


def _check_backward(grad: Tensor, y: Tensor, code: Tensor, name: str) -> None:
    """Refuse arguments of invact::backward that do not belong together (metadata only, no tensor op):
    :class:`ShapeError` where ``grad_output`` has not y's shape or ``code`` is not the 1-d packed code of
    y's elements (:func:`invact.bitpack.packed_bytes`; no bytes without a code), :class:`ArgumentTypeError`
    where ``code`` is not uint8. The kernels read as many of each as y has elements."""
    if grad.shape != y.shape:
        raise ShapeError(f"invact::backward of {name!r}: grad_output must have y's shape {tuple(y.shape)}, "
                         f"got {tuple(grad.shape)}")
    if code.dtype != torch.uint8:
        raise ArgumentTypeError(f"invact::backward of {name!r}: code must be the uint8 code that "
                                f"invact::forward returned, got {code.dtype}")
    bits = registry.module(name).CODE_BITS
    want = bitpack.packed_bytes(y.numel(), bits) if bits else 0
    if code.shape != (want,):
        raise ShapeError(f"invact::backward of {name!r}: code must hold {want} bytes ({bits}-bit codes of "
                         f"y's {y.numel()} elements, as invact::forward packed them), got shape {tuple(code.shape)}")


@torch.library.custom_op("invact::backward", mutates_args=())
def _backward(grad: Tensor, y: Tensor, code: Tensor, name: str, params: list[float], backend: str) -> Tensor:
    _check_backward(grad, y, code, name)
    return _first("backward", backend, y, grad, y, code, name, params)


@_backward.register_fake
def _backward_fake(grad, y, code, name, params, backend):
    return layout.like(y)


def _save(ctx, y: Tensor, code: Tensor) -> None:
    """What every activation context keeps for its backward: y and the packed code (nothing else), y's
    strides (:func:`_packed`) and the sha of the table it computed with (:func:`_same_table`)."""
    ctx.save_for_backward(y, code)
    ctx.strides = y.stride()
    ctx.table = registry.module(ctx.invact[0]).TABLE_SHA256


def _setup_context(ctx, inputs, output) -> None:
    ctx.invact = tuple(inputs[1:])
    if ctx.needs_input_grad[0]:
        _save(ctx, *output)


def _same_table(ctx) -> None:
    """Refuse a backward whose table is not the one its forward computed with (refitted on disk and read
    again in between: `invact fit NAME --param ...` while this process trains): y and the code would be
    read with another table's g."""
    if torch.compiler.is_compiling():  # a compiled backward (compiled autograd too) is traced once: no check
        return
    name, table = ctx.invact[0], getattr(ctx, "table", None)
    if table is not None and registry.module(name).TABLE_SHA256 != table:
        raise registry.TableRefittedError(
            f"activation {name!r}: its table changed on disk (refitted) between this forward and its backward, so "
            "the saved y would be read with the new table's gradient; run the forward again (or fit the new table "
            "under another --name)")


def _packed(ctx) -> tuple[Tensor, Tensor]:
    """(y, code) as the forward packed them: y in its forward layout (``ctx.strides``) whatever a saved-tensor
    hook returned (:func:`invact.layout.as_packed`)."""
    _same_table(ctx)
    y, code = ctx.saved_tensors
    return layout.as_packed(y, ctx.strides), code


def _saved(ctx) -> tuple[Tensor, Tensor]:
    """:func:`_packed`; where the backward builds a graph (create_graph=True), y through
    :class:`RefuseSecondDerivative`, so that only differentiating through y (a second derivative of f) is refused."""
    y, code = _packed(ctx)
    return (RefuseSecondDerivative.apply(y) if torch.is_grad_enabled() and y.requires_grad else y), code


def _grad(ctx, grad_y, grad_code):
    y, code = _saved(ctx)
    return torch.ops.invact.backward(grad_y, y, code, *ctx.invact), None, None, None


def _second_order(mode: str) -> RuntimeError:
    return RuntimeError(
        f"invact activations have no second derivative ({mode}): their backward rebuilds f'(x) from a "
        "table, so double backward and second-order transforms (torch.func.hessian, jacrev or jacfwd of "
        "a derivative, jvp of a jvp) are refused; use torch.nn.functional's activation where "
        "higher-order gradients are needed")


class RefuseSecondDerivative(torch.autograd.Function):
    """y unchanged, refusing a gradient: y's part of a double backward would need f'' (the grad_output part,
    d(grad * f'(x)) / d grad = f'(x), is first order and runs: torch.autograd.functional.jvp takes it)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad):
        raise _second_order("double backward")

    @staticmethod
    def jvp(ctx, tangent):
        raise _second_order("forward mode of the derivative: jacfwd or jvp of a derivative, or hessian")


def _backward_setup(ctx, inputs, output) -> None:
    """Setup of a differentiated backward, grad * g(y, code) (the op's inputs): y and the code where grad
    needs a gradient, with y's strides (:func:`_packed`)."""
    ctx.invact = tuple(inputs[3:])
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(*inputs[1:3])
        ctx.strides = inputs[1].stride()


def _by_grad(ctx, gg: Tensor, backward: Callable) -> tuple:
    """Gradients of grad * g(y, code): d / d grad = g(y, code), so ``backward(gg, y, code, ...)``; y's part
    reaches :class:`RefuseSecondDerivative`, which refuses it."""
    y, code = _packed(ctx) if ctx.needs_input_grad[0] else (None, None)
    return (backward(gg, y, code, *ctx.invact) if ctx.needs_input_grad[0] else None,
            torch.zeros_like(gg) if ctx.needs_input_grad[1] else None, None, None, None, None)


def _grad_of_backward(ctx, gg):
    return _by_grad(ctx, gg, torch.ops.invact.backward)


_forward.register_autograd(_grad, setup_context=_setup_context)
_backward.register_autograd(_grad_of_backward, setup_context=_backward_setup)
dtensor.register_when_imported("value", "forward", "backward")


# torch.func transforms and forward-mode AD. The custom ops' own autograd is reverse mode only and not
# functorch-aware (tangents would be dropped: a zero jvp), so under those apply runs _Activation: the
# same two ops, still saving only y and the code. Dynamo refuses a Function with a jvp, which is why
# plain and compiled calls keep the ops' own autograd.

class _Derivative(torch.autograd.Function):
    """grad * g(y, code) by invact::backward, refusing to be differentiated (in either mode)."""

    @staticmethod
    def forward(grad: Tensor, y: Tensor, code: Tensor, name: str, params: list[float], backend: str) -> Tensor:
        return torch.ops.invact.backward(grad, y, code, name, params, backend)

    setup_context = staticmethod(_backward_setup)

    @staticmethod
    def backward(ctx, gg):
        return _by_grad(ctx, gg, _Derivative.apply)

    @staticmethod
    def jvp(ctx, *tangents):
        raise _second_order("forward mode of the derivative: jacfwd or jvp of a derivative, or hessian")

    @staticmethod
    def vmap(info, in_dims, grad, y, code, name, params, backend):
        return _batched_backward(_Derivative.apply, in_dims, grad, y, code, name, params, backend)


class _Activation(torch.autograd.Function):
    """(y, code) by invact::forward; backward and jvp are both tangent * g(y, code) (invact::backward).
    Under vmap it runs on the physical tensor (elementwise), and the code, which covers all of it, is
    not batched: PyTorch's generated vmap rule cannot return the code's None tangent."""

    @staticmethod
    def forward(x: Tensor, name: str, params: list[float], backend: str) -> tuple[Tensor, Tensor]:
        return torch.ops.invact.forward(x, name, params, backend)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.invact = tuple(inputs[1:])
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_forward(*output)  # for jvp, which runs inside apply: kept no longer
        if ctx.needs_input_grad[0]:
            _save(ctx, *output)

    @staticmethod
    def backward(ctx, grad_y, grad_code):
        y, code = _saved(ctx)
        return _Derivative.apply(grad_y, y, code, *ctx.invact), None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        # y through RefuseSecondDerivative: _Derivative gives y's part as zeros, which is f''
        y, code = ctx.saved_tensors
        return _Derivative.apply(tangent, RefuseSecondDerivative.apply(y), code, *ctx.invact), None

    @staticmethod
    def vmap(info, in_dims, x, name, params, backend):
        return _Activation.apply(x, name, params, backend), (in_dims[0], None)


@_forward.register_vmap
def _forward_vmap(info, in_dims, x, name, params, backend):
    """Elementwise: run on the physical tensor. The code covers all of it, so it is not batched."""
    return torch.ops.invact.forward(x, name, params, backend), (in_dims[0], None)


@_value.register_vmap
def _value_vmap(info, in_dims, x, name, params, backend):
    return torch.ops.invact.value(x, name, params, backend), in_dims[0]


def _batched_backward(backward: Callable, in_dims: tuple, grad: Tensor, y: Tensor, code: Tensor,
                      *rest) -> tuple[Tensor, int]:
    """vmap of grad * g(y, code). y batched: the physical y is the one the code was packed for, so grad
    goes alongside it. y shared by the batch (jacrev, a vmapped vjp): one call per batch entry, the
    same bits as unbatched."""
    gdim, ydim, cdim = in_dims[:3]
    if cdim is not None:
        raise NotImplementedError("invact::backward under vmap: the code must not be batched (one code is "
                                  "packed for the whole physical y that invact::forward returned)")
    if ydim is not None:
        grad = grad.movedim(gdim, ydim) if gdim is not None else grad.unsqueeze(ydim).expand(y.shape)
        return backward(grad, y, code, *rest), ydim
    if grad.shape[gdim] == 0:  # no entries (jacrev of an empty y): nothing to stack
        return y.new_empty((0, *y.shape)), 0
    return torch.stack([backward(g, y, code, *rest) for g in grad.unbind(gdim)]), 0


@_backward.register_vmap
def _backward_vmap(info, in_dims, grad, y, code, name, params, backend):
    return _batched_backward(torch.ops.invact.backward, in_dims, grad, y, code, name, params, backend)


# ----------------------------------------------------------------------------------------------
# public entry point

@torch._dynamo.assume_constant_result
def _prepare(name: str, params: tuple, backend: str | None, device_type: str) -> tuple[list[float], str]:
    return list(param_values(name, dict(params))), backends.resolve(backend, device_type)


def _constant(params: dict[str, float] | None) -> dict[str, float] | None:
    """``params`` with each number a Python constant. Under torch.compile Dynamo makes a float parameter
    symbolic (``dynamic=True``, or automatic dynamic once a module attribute or an argument has taken a
    second value), which the table's checks and the ops' ``float[]`` cannot take: the value is specialised
    with a guard on it, so another value recompiles (as Dynamo does for a float it keeps static)."""
    if not params or not torch.compiler.is_compiling():
        return params
    return {k: guard_scalar(v) if isinstance(v, (int, float)) else v for k, v in params.items()}


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for device types that have autocast (meta tensors have none)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


def fx_call(fn: Callable, x: torch.fx.Proxy, *args, **kwargs) -> torch.fx.Proxy:
    """``fn(x, *args, **kwargs)`` recorded by torch.fx.symbolic_trace (x is its Proxy) as one call of ``fn``,
    which the traced GraphModule runs on real tensors (a Proxy has no data to run on). Also the norms'."""
    return x.tracer.create_proxy("call_function", fn, (x, *args), kwargs)


def apply(x: Tensor, name: str, params: dict[str, float] | None = None, backend: str | None = None) -> Tensor:
    """y = f(x) for activation ``name``, saving only y and a packed branch code for backward.

    ``params``: the activation's parameters (defaults from the table; see :func:`info`).
    ``backend``: "triton", "compiled", "eager" or None (default: $INVACT_BACKEND, else the best
    available; see :mod:`invact.backends`). Under torch.autocast the activation runs in x's dtype, as
    GELU and SiLU do (autocast is switched off inside, so every dtype the op sees is concrete). A jagged
    nested x: y = f(x.values()) with x's structure (:func:`invact.layout.on_jagged_values`); other nested
    and sparse layouts are refused.
    """
    if isinstance(x, torch.fx.Proxy):
        return fx_call(apply, x, name, params, backend)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if layout.is_jagged(x):  # elementwise: on the values, rewrapped
        return layout.on_jagged_values(lambda values: apply(values, name, params, backend), x)
    if dtensor.is_dtensor(x):  # elementwise: on each rank's shard, rewrapped (invact.dtensor)
        return dtensor.pointwise(x, lambda local: apply(local, name, params, backend))
    if x.dtype not in DTYPES:
        raise TypeError(f"invact activation {name!r}: x must be float16, bfloat16, float32 or float64, "
                        f"got {x.dtype} (as torch.nn.functional, no integer, bool or complex inputs)")
    layout.require_strided(x, f"invact activation {name!r}: x")
    values, chosen = _prepare(name, tuple(sorted((_constant(params) or {}).items())), backend, x.device.type)
    if _autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _run(x, name, values, chosen)
    return _run(x, name, values, chosen)


_DIFFERENTIATING = (TransformType.Grad, TransformType.Jvp)  # torch.func's vmap and functionalize run the ops


def _kinds() -> set:
    return {i.key() for i in torch._C._functorch.get_interpreter_stack() or ()}


@torch._dynamo.assume_constant_result  # Dynamo runs the transforms' levels for real while it traces, and guards them
def _functorch_differentiating() -> bool:
    return bool(_kinds().intersection(_DIFFERENTIATING))


def differentiating() -> bool:
    """Forward-mode AD is on (a dual level is open) or torch.func differentiates (grad, vjp, jvp, jac*):
    where the custom ops' reverse-only autograd would drop the derivative (the norms ask too). The dual
    level is read in the traced code, not assumed constant: Dynamo guards the module attribute it reads,
    so a graph compiled outside ``dual_level`` is not reused inside one (it recompiles, and breaks there)."""
    return fwAD._current_level >= 0 or _functorch_differentiating()


@torch._dynamo.assume_constant_result
def _functionalizing() -> bool:
    return TransformType.Functionalize in _kinds()


def _transformed() -> bool:
    """:func:`differentiating`; NotImplementedError where functionalize is in the stack too (PyTorch has
    no functionalize rule for the autograd.Function that carries an activation's derivative)."""
    if not differentiating():
        return False
    if _functionalizing():
        raise NotImplementedError("invact activations under torch.func.functionalize together with a "
                                  "derivative (grad, vjp, jvp, jacrev, jacfwd, forward-mode AD): PyTorch has "
                                  "no functionalize rule for the autograd.Function that carries their "
                                  "derivative; functionalize without differentiating, or differentiate "
                                  "without functionalize")
    return True


@functools.partial(torch.compiler.disable, reason=(
    "invact activations under torch.func transforms or forward-mode AD run eagerly: Dynamo inlines an "
    "autograd.Function's forward without its jvp (a zero tangent) and cannot trace its functorch rules"))
def _differentiated(x: Tensor, name: str, values: list[float], chosen: str) -> Tensor:
    return _Activation.apply(x, name, values, chosen)[0]


def _requires_grad(x: Tensor) -> bool:
    """x.requires_grad, looking through vmap's and functionalize's wrappers (which report False; what
    Dynamo traces of them: a batched x counts as requiring grad)."""
    if torch.compiler.is_compiling():
        return x.requires_grad or torch._C._functorch.is_batchedtensor(x)
    while torch._C._functorch.is_functorch_wrapped_tensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x.requires_grad


class _Direct(torch.autograd.Function):
    """Plain eager training (:func:`plain_eager` x, every backend): what invact::forward's autograd does — the
    same implementations, saving only y and the code, refusing a double backward — without the custom
    ops' dispatch, which cost ~120 us of a 256-element forward + backward (measured: 275 -> 160 us,
    PyTorch's GELU 83 us). A backward that builds a graph (create_graph=True) goes through
    :class:`_Derivative`, so that differentiating it is refused as the op's autograd refuses it."""

    @staticmethod
    def forward(ctx, x: Tensor, name: str, params: list[float], backend: str) -> Tensor:
        y, code = _first("forward", backend, x, x, name, params)
        ctx.invact = (name, params, backend)
        _save(ctx, y, code)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, code = _saved(ctx)
        if torch.is_grad_enabled():
            return _Derivative.apply(grad_y, y, code, *ctx.invact), None, None, None
        if not plain_eager(grad_y):  # batched (is_grads_batched, jacobian(vectorize=True)): the op's vmap rule
            return torch.ops.invact.backward(grad_y, y, code, *ctx.invact), None, None, None
        name, params, backend = ctx.invact
        return _first("backward", backend, y, grad_y, y, code, name, params), None, None, None


def recording() -> bool:
    """torch.jit.trace or torch.export is recording a program (whose grad mode at recording time says
    nothing about how it will be run): the activations record ``invact::forward``, which trains, and the
    functional router routes whatever the grad mode (the norms record their one op anyway)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def _run(x: Tensor, name: str, values: list[float], chosen: str) -> Tensor:
    if recording():  # one op whatever the grad mode or requires_grad, so the saved program trains
        return torch.ops.invact.forward(x, name, values, chosen)[0]
    if _transformed():
        return _differentiated(x, name, values, chosen)
    if torch.is_grad_enabled() and _requires_grad(x):
        if plain_eager(x):
            return _Direct.apply(x, name, values, chosen)
        return torch.ops.invact.forward(x, name, values, chosen)[0]
    # nothing differentiates y: no code
    if plain_eager(x):  # the op's dispatch costs more than the work at small sizes
        return _y_only(x, name, values, chosen)
    return torch.ops.invact.value(x, name, values, chosen)


def plain_eager(*tensors: Tensor | None) -> bool:
    """Ordinary tensors with data (or None), outside torch.compile, transforms, dispatch modes and
    torch.jit.trace: where the ops' implementations may run without their custom-op dispatch (meta and
    fake tensors, torch.func's wrappers and tracing modes take the ops and their fake or vmap rules; a
    TorchScript trace records the ops, which it can save, where an autograd.Function it cannot). Also
    used by the norms."""
    return (not torch.compiler.is_compiling() and torch.utils._python_dispatch._get_current_dispatch_mode() is None
            and not torch.jit.is_tracing()
            and all(t is None or (type(t) in (Tensor, torch.nn.Parameter) and not t.is_meta
                                  and not torch._C._functorch.is_functorch_wrapped_tensor(t)
                                  and torch._C._has_storage(t)) for t in tensors))  # not: autograd's batched grads


def script_refused(module: torch.nn.Module) -> NotImplementedError:
    """What torch.jit.script of an invact module raises (TorchScript compiles forward's source, and
    invact's is Python that picks kernels at run time; PyTorch deprecates torch.jit.script)."""
    return NotImplementedError(
        f"torch.jit.script cannot compile invact.{type(module).__name__}: torch.compile, torch.export and "
        "torch.jit.trace take it (their programs call invact's custom ops, and save and load after "
        "`import invact`); or script the model with its original modules back (invact.unpatch(model))")
