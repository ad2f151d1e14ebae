"""An activation's parameters, checked, and the constants its kernels read for a dtype and device.

Documented internals (the ops, the implementations and generated code use them):
:func:`param_values` (a call's parameters against the table's), :class:`Constants`,
:func:`module_constants` (cached per generated module, dtype, device and parameter values) and
:func:`table_constants` (the same by activation name: what generated modules import).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from . import bitpack, registry
from .common import params as common_params

__all__ = ["param_values", "holds", "Constants", "module_constants", "table_constants"]

# param_domain relations: compared by an ast walk, never eval'd (invact.common.params)
holds = common_params.holds


def _refit_command(name: str, meta: dict, values: dict[str, float]) -> str:
    """The `invact fit` command that refits table ``name`` for parameter ``values`` in the tree its code
    was generated in (the CLI takes a formula table's name and reuses its formula)."""
    root = Path(registry.generated_file(registry.module(name).__name__)[0]).parent.parent
    return f"invact fit {name}" + registry.fit_options(values, meta["tolerance"], root)


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
        f"`{_refit_command(name, meta, values)}` refits it for these values, replacing that set (add `--name NEW` "
        "to keep it and fit activation NEW)")
    hint = lambda values: (  # noqa: E731 - outside a generic table's domain: a table fitted for them may hold
        f"`{_refit_command(name, meta, values)} --name NEW` tries a table for these values, activation NEW "
        "(without --name it would replace this one)")
    return tuple(common_params.check_params(name, meta["params"], params, meta["param_domain"], fixed,
                                            hint).values())


def _refuse_overflow(mod: ModuleType, dtype: torch.dtype, params: dict[str, float], values: tuple[float, ...]) -> None:
    """ParamError naming the parameters and ``dtype`` where y overflows at x = -1, 0 or 1 (softplus with
    log(2)/beta beyond the dtype's largest value): y = inf there, as in torch, has lost x, and the g of an
    infinite y (its limit, or NaN where the parameter itself rounds to 0) is not torch's gradient."""
    with torch._C.DisableTorchFunction(), torch.no_grad():  # a plain probe on the CPU, whatever modes run
        y = mod.forward(torch.tensor([-1.0, 0.0, 1.0], dtype=dtype, device="cpu"), **params)
    if bool(torch.isinf(y).any()):
        given = ", ".join(f"{k}={v!r}" for k, v in zip(mod.PARAMS, values))
        raise common_params.ParamError(
            f"params: {mod.NAME} with {given} overflows {dtype} (y = inf already for x in [-1, 1]: y has lost x, "
            "and no gradient can be recovered from it); choose other values or compute in a wider dtype", "params")


def _refuse_unfinite_g(mod: ModuleType, dtype: torch.dtype, params: dict[str, float], values: tuple[float, ...],
                       x_thresholds: tuple[float, ...], y_thresholds: tuple[float, ...]) -> None:
    """ParamError where g, as the generated code computes it in float32 (any dtype but float64), is not
    finite at x = -1, 0 or 1 while the same code in float64 is: a parameter's expression beyond float32's
    range (tanh(a*x)/a's g = 1 - a^2 y^2 with a = 1e20: a^2 is inf in float32, so g is NaN at y = 0 and 0
    elsewhere), which would give silent NaN or zero gradients."""
    if dtype == torch.float64:
        return
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)

    def g_at(x: Tensor, ev: torch.dtype) -> Tensor:
        code = mod.code_kernel(x, x_thresholds) if mod.CODE_BITS else None
        poly = torch.tensor(mod.POLY, dtype=ev).T.contiguous()
        return mod.g_kernel(mod.forward(x, **params), code, y_thresholds, poly, **params).double()

    with torch._C.DisableTorchFunction(), torch.no_grad():  # a plain probe on the CPU (no fake tensors:
        g, wide = g_at(x.to(dtype), torch.float32), g_at(x, torch.float64)  # fakes never build constants)
    if bool((torch.isfinite(wide) & ~torch.isfinite(g)).any()):
        given = ", ".join(f"{k}={v!r}" for k, v in zip(mod.PARAMS, values))
        raise common_params.ParamError(
            f"params: {mod.NAME} with {given}: its gradient overflows in {dtype} (g is {g.tolist()} for x in "
            f"[-1, 0, 1], computed in float32, where float64 gives {wide.tolist()}: f' or an expression of the "
            "parameters beyond float32's range); choose other values or compute in float64", "params")


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
    if values:
        _refuse_overflow(mod, dtype, params, values)
    ev = torch.float64 if dtype == torch.float64 else torch.float32
    xbreaks = mod.x_breaks(**params)
    xthr = tuple(bitpack.threshold(v, side, dtype) for v, side in xbreaks)
    # y breaks are rounded to the evaluation dtype first, as the certified evaluator does
    rounded = [(torch.tensor(v, dtype=torch.float64).to(ev).item(), side) for v, side in mod.y_breaks(**params)]
    ythr_values = tuple(bitpack.threshold(v, side, ev) for v, side in rounded)
    ythr = torch.tensor(ythr_values, dtype=ev, device=device)
    poly = torch.tensor(mod.POLY, dtype=ev, device=device).T.contiguous()
    if values:
        _refuse_unfinite_g(mod, dtype, params, values, xthr, ythr_values)
    return Constants(xthr, ythr, tuple(ythr.tolist()), poly, params, torch.tensor(xthr, dtype=ev, device=device),
                     tuple(side == "left" for _, side in xbreaks),
                     tuple(side == "left" for _, side in rounded))
