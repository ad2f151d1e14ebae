"""An activation's parameters, checked, and the constants its kernels read for a dtype and device.

Documented internals (the ops, the implementations and generated code use them):
:func:`param_values` (a call's parameters against the table's), :class:`Constants`,
:func:`module_constants` (cached per generated module, dtype, device and parameter values) and
:func:`table_constants` (the same by activation name: what generated modules import).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from . import bitpack, registry
from .common import params as common_params
from .common.catalog import BY_NAME
from .norm_recovery import acc_dtype  # g's evaluation dtype: the dtype the norms compute in

__all__ = ["param_values", "holds", "Constants", "module_constants", "table_constants"]

# param_domain relations: compared by an ast walk, never eval'd (invact.common.params)
holds = common_params.holds


def _refit_command(name: str, meta: dict, values: dict[str, float]) -> str:
    """The `invact fit` command that refits table ``name`` for parameter ``values`` in the tree its code
    was generated in (the CLI takes a formula table's name and reuses its formula)."""
    root = Path(registry.generated_file(registry.module(name).__name__)[0]).parent.parent
    return f"invact fit {name}" + registry.fit_options(values, meta["tolerance"], root)


def _fitter_domain(name: str) -> tuple[str, ...]:
    """The relations `invact fit NAME --param ...` checks the values against before fitting: a built-in's
    catalog domain (the fitter refits its formula only there), none for a formula table (its refit derives
    the domain of the values it is given)."""
    entry = BY_NAME.get(name)
    return entry.domain if entry is not None else ()


def _refit_hint(name: str, meta: dict, values: dict[str, float]) -> str:
    """What `invact fit` does for ``values``, which table ``name`` does not hold: the command that tries a
    table for them where the fitter takes them for this formula, else that no refit can hold them. A
    built-in's own table keeps PyTorch's defaults (the fit is refused without ``--name NEW``); a formula
    table's refit without ``--name`` replaces it."""
    domain = _fitter_domain(name)
    if not all(holds(rel, values) for rel in domain):
        return f"no refit can hold these values: the fitter takes {name}'s parameters only where {' and '.join(domain)}"
    command = _refit_command(name, meta, values)
    if name in BY_NAME:
        return (f"`{command} --name NEW` tries a table of {name}'s formula for these values, activation NEW (the "
                f"built-in {name!r} keeps PyTorch's defaults: without --name the fit is refused)")
    replaced = "that set" if not meta["param_generic"] else \
        f"the table fitted at {meta['params']} for {' and '.join(meta['param_domain'])}"
    return (f"`{command}` refits it for these values, replacing {replaced} (add `--name NEW` to keep it and fit "
            "activation NEW)")


def param_values(name: str, params: dict[str, float] | None) -> tuple[float, ...]:
    """The values (defaults filled in, table order) for table ``name``; ParamError (a ValueError) naming
    the parameter otherwise, by the check the fitter makes too (invact.common.params)."""
    if not params and isinstance(name, str):
        return _default_values(name)  # every call without parameters: checked once per table
    return _checked(name, params)


@registry.per_root()
def _default_values(name: str) -> tuple[float, ...]:
    return _checked(name, None)


def _checked(name: str, params: dict[str, float] | None) -> tuple[float, ...]:
    """The values of ``params`` for table ``name``, checked; a refusal is checked again against the tables on
    disk when a fit (another process) changed them since they were read (a table refitted for these values)."""
    try:
        return _check(name, params)
    except common_params.ParamError:
        if not registry.refresh():
            raise
        return _check(name, params)


def _check(name: str, params: dict[str, float] | None, meta: dict | None = None) -> tuple[float, ...]:
    meta = registry.module(name).META if meta is None else meta
    fixed = None if meta["param_generic"] else lambda values: (
        f"params: the {name!r} table was fitted for {meta['params']} only (one table holds one parameter set); "
        + _refit_hint(name, meta, values))
    hint = lambda values: _refit_hint(name, meta, values)  # noqa: E731 - outside a generic table's domain
    return tuple(common_params.check_params(name, meta["params"], params, meta["param_domain"], fixed,
                                            hint).values())


_PROBE_X = (-1.0, 0.0, 1.0)   # where the parameters are probed: every activation is defined there


def _thresholds(mod: ModuleType, dtype: torch.dtype, params: dict[str, float]) -> tuple:
    """(x breaks with their sides, the forward code's x thresholds in ``dtype``, the y breaks rounded to the
    evaluation dtype first, as the certified evaluator does, with their sides, and their thresholds)."""
    ev = acc_dtype(dtype)
    xbreaks = mod.x_breaks(**params)
    xthr = tuple(bitpack.threshold(v, side, dtype) for v, side in xbreaks)
    rounded = [(torch.tensor(v, dtype=torch.float64).to(ev).item(), side) for v, side in mod.y_breaks(**params)]
    return xbreaks, xthr, rounded, tuple(bitpack.threshold(v, side, ev) for v, side in rounded)


def _generated_g(mod: ModuleType, x: Tensor, y: Tensor, params: dict[str, float], x_thresholds: tuple,
                 y_thresholds: tuple, ev: torch.dtype) -> Tensor:
    """g at ``y`` = forward(``x``) as the generated code computes it in ``ev``, in float64."""
    code = mod.code_kernel(x, x_thresholds) if mod.CODE_BITS else None
    poly = torch.tensor(mod.POLY, dtype=ev, device=x.device).T.contiguous()
    return mod.g_kernel(y, code, y_thresholds, poly, **params).double()


def _forward_with_derivative(mod: ModuleType, x: Tensor, params: dict[str, float]) -> tuple[Tensor, Tensor]:
    """(y = forward(``x``), f' at ``x`` by autograd of that same forward; NaN where autograd gives none: an op
    without a derivative, so nothing is refused by it). Whatever the caller runs in (inference mode, a
    dual level, saved-tensor hooks of checkpointing or invact.memory), the probe's graph is its own: its
    saved tensors go to hooks of its own, never to the caller's, and are freed by the backward."""
    x = x.detach().requires_grad_()
    with torch.inference_mode(False), torch.enable_grad(), _own_saved_tensors():
        y = mod.forward(x, **params)
        try:
            (grad,) = torch.autograd.grad(y.sum(), x, allow_unused=True) if y.requires_grad else (None,)
        except RuntimeError:   # an op of the forward without a derivative formula
            grad = None
    return y.detach(), torch.full_like(x.detach(), float("nan")) if grad is None else grad


def _own_saved_tensors() -> contextlib.AbstractContextManager:
    """Saved-tensor hooks that keep the tensors as they are, above the caller's (only the innermost hooks
    run); none where saved-tensor hooks are disabled (then no caller's run either)."""
    if not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_same, _same)


def _same(t: Tensor) -> Tensor:
    return t


def _reference_g(mod: ModuleType, x: Tensor, derivative: Tensor, params: dict[str, float], x_thresholds: tuple,
                 y_thresholds: tuple) -> Tensor:
    """Where this is finite, g at ``x`` must be: for float64 ``derivative`` (f' by autograd of the forward),
    for the other dtypes (g computed in float32) the same generated code in float64."""
    if x.dtype == torch.float64:
        return derivative
    wide = x.double()
    return _generated_g(mod, wide, mod.forward(wide, **params), params, x_thresholds, y_thresholds, torch.float64)


def _refuse_unusable(mod: ModuleType, dtype: torch.dtype, params: dict[str, float], values: tuple[float, ...]) -> tuple:
    """ParamError naming the parameters, ``dtype`` and the values at x = -1, 0, 1 where the parameters leave
    ``dtype``'s range there, from one evaluation of the forward in ``dtype``; else :func:`_thresholds` for
    the parameters, which the probe computes after the overflow check (for the caller's constants). Refused
    in this order:

    * y overflows (softplus with log(2)/beta beyond the dtype's largest value): y = inf, as in torch, has
      lost x, and the g of an infinite y (its limit, or NaN where the parameter itself rounds to 0) is not
      torch's gradient;
    * g is not finite where :func:`_reference_g` is: a parameter's expression beyond the range of g's
      evaluation dtype (tanh(a*x)/a's g = 1 - a^2 y^2: a^2 is inf in float32 for a = 1e20, in float64 for
      a = 1e200, so g is NaN at y = 0) would give silent NaN or zero gradients; a g infinite where the
      reference is too (a vertical tangent) is kept."""
    given = ", ".join(f"{k}={v!r}" for k, v in zip(mod.PARAMS, values))
    # a plain probe on the CPU, whatever modes run (no fake tensors: fakes never build constants)
    with torch._C.DisableTorchFunction(), torch.inference_mode(False), torch.no_grad():
        x = torch.tensor(_PROBE_X, dtype=dtype, device="cpu")
        # float64's reference is autograd's f' of this same forward
        y, derivative = _forward_with_derivative(mod, x, params) if dtype == torch.float64 else \
            (mod.forward(x, **params), None)
        if bool(torch.isinf(y).any()):
            raise common_params.ParamError(
                f"params: {mod.NAME} with {given} overflows {dtype} (y = inf already for x in [-1, 1]: y has lost "
                "x, and no gradient can be recovered from it); choose other values or compute in a wider dtype",
                "params")
        thresholds = _thresholds(mod, dtype, params)
        _, xthr, _, ythr = thresholds
        g = _generated_g(mod, x, y, params, xthr, ythr, acc_dtype(dtype))
        reference = _reference_g(mod, x, derivative, params, xthr, ythr)
    if bool((torch.isfinite(reference) & ~torch.isfinite(g)).any()):
        where = (f"where autograd of its forward gives f' = {reference.tolist()}: an expression of the parameters "
                 "beyond float64's range); choose other values" if dtype == torch.float64 else
                 f"computed in float32, where float64 gives {reference.tolist()}: f' or an expression of the "
                 "parameters beyond float32's range); choose other values or compute in float64")
        raise common_params.ParamError(f"params: {mod.NAME} with {given}: its gradient overflows in {dtype} (g is "
                                       f"{g.tolist()} for x in [-1, 0, 1], {where}", "params")
    return thresholds


@dataclass(frozen=True)
class Constants:
    """Per (activation, dtype, device, params): what the kernels read besides the tensors."""

    x_thresholds: tuple[float, ...]   # forward code, in x's dtype
    y_thresholds: Tensor              # concatenated y breaks, in the evaluation dtype
    y_threshold_values: tuple[float, ...]  # the same as floats (compile-time constants when compiled)
    poly: Tensor                      # POLY transposed: (row length, segments), evaluation dtype
    params: dict[str, float]          # keyword arguments of the module's functions (PARAM_ARGS: mangled names)
    x_threshold_tensor: Tensor        # x_thresholds on the device, evaluation dtype (Triton reads them)
    x_strict: tuple[bool, ...]        # per x threshold: `x > t` (a left-side break), else `x >= t`
    y_strict: tuple[bool, ...]        # per y threshold: `y > t`, else `y >= t` (bitpack.threshold)


def table_constants(name: str, dtype: torch.dtype, device: torch.device | str,
                    params: dict[str, float] | None = None) -> Constants:
    """Constants of activation ``name`` for tensors of ``dtype`` on ``device``."""
    values = param_values(name, params)
    return module_constants(registry.module(name), dtype, torch.device(device), values)


@registry.per_root(maxsize=256)
def module_constants(mod: ModuleType, dtype: torch.dtype, device: torch.device,
                     values: tuple[float, ...]) -> Constants:
    """Constants of a generated torch module for parameter ``values`` (in the module's PARAMS order); a
    table fitted for one parameter set refuses others here too (ParamError), where the op runs: a compiled
    graph checks parameters when it is traced, and the table may have been refitted since."""
    if not mod.META["param_generic"] and values:
        _check(mod.NAME, dict(zip(mod.PARAMS, values)), mod.META)
    params = dict(zip(mod.PARAM_ARGS, values))   # param_NAME: no parameter shadows a generated local
    # the probe's thresholds where there is a probe: computed once, after its overflow check as before
    thresholds = _refuse_unusable(mod, dtype, params, values) if values else _thresholds(mod, dtype, params)
    ev = acc_dtype(dtype)
    xbreaks, xthr, rounded, ythr_values = thresholds
    ythr = torch.tensor(ythr_values, dtype=ev, device=device)
    poly = torch.tensor(mod.POLY, dtype=ev, device=device).T.contiguous()
    return Constants(xthr, ythr, tuple(ythr.tolist()), poly, params, torch.tensor(xthr, dtype=ev, device=device),
                     tuple(side == "left" for _, side in xbreaks),
                     tuple(side == "left" for _, side in rounded))
