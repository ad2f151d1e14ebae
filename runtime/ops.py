"""The custom-op layer: one forward and one backward ``torch.library`` op for every generated activation.

``invact::forward(x, name, params, backend) -> (y, code)`` computes y = f(x) and the packed branch
code; its autograd saves ONLY y and the code (nothing when x does not require grad).
``invact::backward(grad, y, code, name, params, backend) -> grad_x`` is a separate op with its own fake,
so the backward traces under torch.compile. Both work element by element in y's memory order (y keeps
x's memory format, as torch.nn.functional's ops do), and the code is packed in that order.
``invact::value(x, name, params, backend) -> y`` is the forward without the code: :func:`apply` runs
it when nothing will differentiate y (no_grad, inference_mode, x not requiring grad). Under
torch.func transforms and forward-mode AD :func:`apply` wraps the same ops in an autograd.Function
with a jvp (tangent * g(y, code)) and vmap rules.

Public API: :func:`apply`, :func:`info`, :func:`names` (and :func:`table_constants` for generated code).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._C._functorch import TransformType

from . import backends, bitpack, cpu_kernel
from .common.params import check_params, holds

__all__ = ["apply", "info", "names", "use_root", "table_constants", "module_constants", "Constants"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EAGER_CHUNK = 1 << 16  # eager backward works on chunks of this many elements (bounded temporaries)


# ----------------------------------------------------------------------------------------------
# the generated modules

ROOT_ENV = "INVACT_ROOT"  # the fitter's --root: a tree whose generated/ holds tables and code


_ENV_APPLIED = False  # $INVACT_ROOT is layered once per process, at first use


@functools.cache
def _registry() -> ModuleType:
    """TORCH / TRITON: activation name -> generated module, merged over every folder of
    ``invact.generated``'s path, the first folder's entry winning: a root given to :func:`use_root`
    (or $INVACT_ROOT) is layered over the installed tables, never hiding them. A registry file is
    read as data (``ast.literal_eval``), not imported."""
    global _ENV_APPLIED
    root = os.environ.get(ROOT_ENV)
    if root and not _ENV_APPLIED:
        use_root(root)        # a root that is not a project tree raises here, at every use
        _ENV_APPLIED = True
    import invact.generated as pkg
    merged = ModuleType("invact.generated.registry")
    merged.TORCH, merged.TRITON = {}, {}
    for folder in reversed(list(pkg.__path__)):
        path = Path(folder) / "registry.py"
        if path.is_file():
            entries = _read_registry(path)
            merged.TORCH.update(entries["TORCH"])
            merged.TRITON.update(entries["TRITON"])
    return merged


def _read_registry(path: Path) -> dict[str, dict[str, str]]:
    """The TORCH and TRITON dicts of a generated registry.py, as literals; ImportError otherwise."""
    import ast
    found: dict[str, dict[str, str]] = {"TORCH": {}, "TRITON": {}}
    try:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] in (["TORCH"], ["TRITON"]):
                value = ast.literal_eval(node.value)
                if not isinstance(value, dict) or not all(
                        isinstance(k, str) and k.isidentifier() and isinstance(v, str)
                        and v.startswith("invact.generated.") and v.count(".") == 2 for k, v in value.items()):
                    raise ValueError(f"{node.targets[0].id} is not a dict of names to invact.generated modules")
                found[node.targets[0].id] = value
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError) as error:
        raise ImportError(f"generated registry {path} cannot be read ({type(error).__name__}: {error}); "
                          f"run `invact generate{_root_option(path.parent.parent)}` to rebuild it") from error
    return found


def use_root(root: str | os.PathLike) -> None:
    """Layer ``root``/generated (what ``invact fit --root ROOT`` wrote) over the installed activations
    (and over roots used before): its names win, every other name stays available. $INVACT_ROOT does
    the same at first use.

    Trust: this IMPORTS PYTHON CODE from ``root``/generated (the torch_*.py and triton_*.py modules),
    like unpickling a file: use only roots you would run code from. Raises FileNotFoundError naming
    the folder when ``root`` is not a project tree (``generated/registry.py`` and ``generated/tables/``:
    run ``invact generate --root ROOT``)."""
    import invact.generated as pkg
    base = Path(root).resolve()
    if not base.is_dir():
        raise FileNotFoundError(f"root {root}: no such folder (a root holds generated/registry.py and "
                                f"generated/tables/, as `invact fit NAME --root {root}` writes them)")
    folder = base / "generated"
    if not (folder / "registry.py").is_file() or not (folder / "tables").is_dir():
        raise FileNotFoundError(f"root {root}: {folder} has no registry.py and tables/; run "
                                f"`invact generate --root {root}` (or fit into it with `invact fit NAME --root {root}`)")
    if str(folder) in pkg.__path__:
        pkg.__path__.remove(str(folder))
    pkg.__path__.insert(0, str(folder))
    for mod in [m for m in sys.modules if m.startswith("invact.generated.")]:
        del sys.modules[mod]  # re-import from the new path
    for cached in (_registry, _module, _triton_module, _kernels, module_constants, _fused_table,
                   _lookup_table, _code_map):
        cached.cache_clear()


def _root_option(root: Path) -> str:
    """`` --root ROOT`` for a hint about generated code in ``root``, "" for the installed tree."""
    import invact.generated as pkg
    installed = root.resolve() == Path(pkg.__file__).resolve().parent.parent
    return "" if installed else f" --root {shlex.quote(str(root))}"


def names() -> list[str]:
    """Names of the activations with generated code, sorted."""
    return sorted(getattr(_registry(), "TORCH", {}))


@functools.cache
def _module(name: str) -> ModuleType:
    table = getattr(_registry(), "TORCH", {})
    if not isinstance(name, str) or name not in table:
        import invact.generated as pkg
        roots = [str(Path(p).parent) for p in pkg.__path__[:-1]]
        where = f"; roots in use: {', '.join(roots)}" if roots else ""
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(names()) or 'none (run `invact generate`)'}"
                         + where)
    return _import_generated(table[name], TORCH_API)


# what invact.ops uses of a generated torch module; one from another invact version may lack it
TORCH_API = ("META", "NAME", "PARAMS", "PARAM_ARGS", "CODE_BITS", "CLASSES", "POLY", "forward", "code_kernel",
             "g_kernel", "code_packed", "grad_kernel", "TABLE_SHA256")
TRITON_API = ("forward", "backward", "TABLE_SHA256")


def _import_generated(module: str, api: tuple[str, ...]) -> ModuleType:
    """Import generated code; broken or stale files raise ImportError naming the file and the fix."""
    try:
        mod = importlib.import_module(module)
    except (ImportError, SyntaxError) as error:
        where, fix = _generated_file(module)
        raise ImportError(f"generated code {where} cannot be imported ({type(error).__name__}: {error}); "
                          f"{fix} to rebuild it from its table") from error
    missing = [a for a in api if not hasattr(mod, a)]
    if missing:
        where, fix = _generated_file(module)
        raise ImportError(f"generated code {where} lacks {', '.join(missing)} (made by another invact "
                          f"version?); {fix} to rebuild it from its table")
    _check_table(mod, module)
    return mod


def _check_table(mod: ModuleType, module: str) -> None:
    """Generated code must come from the table file next to it (generated/tables/NAME.json): its
    TABLE_SHA256 is the sha256 of that table's content, recomputed here (docs/table-format.md). A
    mismatch (a fit interrupted between the table and its code, a table edited or restored without
    `invact generate`) raises ImportError with the fix, never computes with the other table."""
    import json

    from .common.table_hash import canonical_sha256
    short = module.rsplit(".", 1)[-1]
    table = Path(mod.__file__).parent / "tables" / f"{short.split('_', 1)[1]}.json"
    where, fix = _generated_file(module)
    try:
        body = json.loads(table.read_text(encoding="utf-8"))
        body.pop("sha256")
        digest = canonical_sha256(body)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise ImportError(f"generated code {where} has no readable table {table} ({type(error).__name__}: "
                          f"{error}); {fix} to rebuild the code from the tables there") from None
    if digest != mod.TABLE_SHA256:
        raise ImportError(f"generated code {where} was made from another version of {table} (the table "
                          f"changed after the code was generated, e.g. a fit was interrupted); {fix} to "
                          "rebuild the code from the table")


def _generated_file(module: str) -> tuple[str, str]:
    """(the file behind generated ``module``, the command that rebuilds it), for error messages."""
    import invact.generated as pkg
    short = module.rsplit(".", 1)[-1]
    where = next((str(Path(p) / f"{short}.py") for p in pkg.__path__ if (Path(p) / f"{short}.py").is_file()),
                 f"{short}.py in {list(pkg.__path__)}")
    fix = f"run `invact generate{_root_option(Path(where).parent.parent)}`"
    return where, fix


@functools.cache
def _triton_module(name: str) -> ModuleType:
    _module(name)
    return _import_generated(_registry().TRITON[name], TRITON_API)


def info(name: str) -> dict:
    """The META dict of activation ``name`` (a copy); unknown names raise ValueError listing the known."""
    return dict(_module(name).META)


# ----------------------------------------------------------------------------------------------
# parameters and constants

# param_domain relations: compared by an ast walk, never eval'd (invact.common.params)
_holds = holds


def _refit_command(name: str, meta: dict, values: dict[str, float]) -> str:
    """The `invact fit` command that refits table ``name`` for parameter ``values`` in the tree its code
    was generated in (the CLI takes a formula table's name and reuses its formula)."""
    root = Path(_generated_file(_registry().TORCH[name])[0]).parent.parent
    tolerance = "" if meta["tolerance"] == 5e-8 else f" --tolerance {meta['tolerance']!r}"  # the CLI default
    return (f"invact fit {name} " + " ".join(f"--param {k}={v!r}" for k, v in values.items())
            + tolerance + _root_option(root))


def _check_params(name: str, params: dict[str, float] | None) -> tuple[float, ...]:
    """The values (defaults filled in, table order) for table ``name``; ParamError (a ValueError) naming
    the parameter otherwise, by the check the fitter makes too (invact.common.params)."""
    meta = _module(name).META
    fixed = None if meta["param_generic"] else lambda values: (
        f"params: the {name!r} table was fitted for {meta['params']} only (one table holds one parameter set); "
        f"`{_refit_command(name, meta, values)}` refits it for these values, replacing that set (add `--name NEW` "
        "to keep it and fit activation NEW)")
    return tuple(check_params(name, meta["params"], params, meta["param_domain"], fixed).values())


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
    values = _check_params(name, params)
    return module_constants(_module(name), dtype, torch.device(device), values)


@functools.lru_cache(maxsize=256)
def module_constants(mod: ModuleType, dtype: torch.dtype, device: torch.device,
                     values: tuple[float, ...]) -> Constants:
    """Constants of a generated torch module for parameter ``values`` (in the module's PARAMS order)."""
    params = dict(zip(mod.PARAM_ARGS, values))   # param_NAME: no parameter shadows a generated local
    ev = torch.float64 if dtype == torch.float64 else torch.float32
    xbreaks = mod.x_breaks(**params)
    xthr = tuple(bitpack.threshold(v, side, dtype) for v, side in xbreaks)
    # y breaks are rounded to the evaluation dtype first, as the certified evaluator does
    rounded = [(torch.tensor(v, dtype=torch.float64).to(ev).item(), side) for v, side in mod.y_breaks(**params)]
    ythr = torch.tensor([bitpack.threshold(v, side, ev) for v, side in rounded], dtype=ev, device=device)
    poly = torch.tensor(mod.POLY, dtype=ev, device=device).T.contiguous()
    return Constants(xthr, ythr, tuple(ythr.tolist()), poly, params, torch.tensor(xthr, dtype=ev, device=device),
                     tuple(side == "left" for _, side in xbreaks),
                     tuple(side == "left" for _, side in rounded))


# ----------------------------------------------------------------------------------------------
# memory order: kernels run over y's elements in storage order

def _order(t: Tensor) -> list[int]:
    """Dimensions from outermost to innermost in memory, ordered as TensorIterator orders an
    elementwise op's output (so y gets PyTorch's strides): an insertion sort by stride, innermost
    first, where a comparison with a stride-0 (expanded) dimension is ambiguous and leaves the pair
    in place, and equal strides put the smaller size inside. For a dense t, t.permute(order) is
    contiguous."""
    def after(d0: int, d1: int) -> int:       # 1: d0 goes outside d1, -1: inside, 0: ambiguous
        s0, s1 = t.stride(d0), t.stride(d1)
        if s0 == 0 or s1 == 0:
            return 0
        if s0 != s1:
            return 1 if s0 > s1 else -1
        return 1 if t.size(d0) > t.size(d1) else 0
    perm = list(range(t.dim() - 1, -1, -1))
    for i in range(1, len(perm)):
        d1 = i
        for d0 in range(i - 1, -1, -1):
            c = after(perm[d0], perm[d1])
            if c > 0:
                perm[d0], perm[d1] = perm[d1], perm[d0]
                d1 = d0
            elif c < 0:
                break
    return perm[::-1]


def _dense_strides(x: Tensor) -> tuple[int, ...]:
    """Strides of a dense tensor shaped like x in :func:`_order`'s memory order (no allocation)."""
    strides, step = [0] * x.dim(), 1
    for d in reversed(_order(x)):
        strides[d] = step
        step *= max(x.size(d), 1)
    return tuple(strides)


def _like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A new dense tensor shaped like x with x's memory order (what TensorIterator gives an output)."""
    return torch.empty_strided(x.shape, _dense_strides(x), dtype=dtype or x.dtype, device=x.device)


def _flat(t: Tensor, order: list[int]) -> Tensor:
    return t.permute(order).reshape(-1)


# ----------------------------------------------------------------------------------------------
# implementations

@functools.lru_cache(maxsize=256)
def _fused_table(mod: ModuleType, values: tuple[float, ...]) -> cpu_kernel.Table | None:
    """The fused CPU backward's table of a generated module (None where it does not cover it)."""
    k = module_constants(mod, torch.float32, torch.device("cpu"), values)
    return cpu_kernel.kernel_table(mod, k.y_threshold_values, k.y_strict)


@functools.lru_cache(maxsize=256)
def _code_map(mod: ModuleType, dtype: torch.dtype, values: tuple[float, ...]) -> cpu_kernel.CodeMap | None:
    """The forward code of a generated module as the C kernel takes it (invact.cpu_kernel.code_map)."""
    k = module_constants(mod, dtype, torch.device("cpu"), values)
    return cpu_kernel.code_map(mod.code_kernel, k.x_thresholds, k.x_strict, dtype)


def _flushed(t: Tensor) -> bool:
    """Whether arithmetic on ``t`` reads subnormals as 0 now (torch.set_flush_denormal: CPU only)."""
    return t.device.type == "cpu" and bitpack.denormals_flushed()


@functools.lru_cache(maxsize=32)
def _lookup_table(mod: ModuleType, dtype: torch.dtype, values: tuple[float, ...], device: torch.device,
                  flushed: bool = False) -> Tensor:
    """g of every 16-bit y and code, by the generated eager g_kernel (invact.cpu_kernel.lookup_table),
    as it computes with denormals flushed or not (``flushed``: the caller's current setting)."""
    k = module_constants(mod, dtype, torch.device("cpu"), values)
    lut = cpu_kernel.lookup_table(mod.g_kernel, dtype, mod.CODE_BITS, k.y_thresholds, k.poly, flushed=flushed,
                                  **k.params)
    return lut.to(device)


def _lookup_grad(out: Tensor, go: Tensor, y: Tensor, packed: Tensor, shift: int, bits: int, lut: Tensor) -> None:
    """out = lut[code << 16 | bits of y] * go in torch ops, for flat 16-bit y in one bit plane (the
    eager backward of bfloat16/float16: the table holds what g_kernel computes, so the result is the
    same bit for bit, from six whole-chunk ops instead of a Horner chain of them)."""
    index = y.view(torch.uint16).to(torch.int32)
    if bits:
        index += (packed.to(torch.int32) << (16 - shift)) & (((1 << bits) - 1) << 16)
    torch.mul(lut.index_select(0, index), go, out=out)


def _fused_backward(name: str, params: list[float], out: Tensor, grad: Tensor, y: Tensor, code: Tensor) -> bool:
    """The compiled backend's C kernels on flat CPU tensors: a lookup table for 16-bit y, the
    polynomial kernel for float32 y of FUSED_CPU tables. False where neither runs (then Inductor's)."""
    mod = _module(name)
    if cpu_kernel.library() is None:
        return False
    if y.dtype in (torch.bfloat16, torch.float16):
        lut = _lookup_table(mod, y.dtype, tuple(params), y.device, _flushed(y))
        return cpu_kernel.run_lookup(lut, out, grad, y, code, mod.CODE_BITS)
    table = _fused_table(mod, tuple(params)) if y.dtype == torch.float32 else None
    return table is not None and cpu_kernel.run(table, out, grad, y, code, mod.CODE_BITS)


@functools.cache
def _kernels(name: str, backend: str) -> tuple:
    """(packed forward code, flat gradient) of the generated module; compiled for "compiled"."""
    mod = _module(name)
    if backend == "compiled":
        return backends.compiled(mod.code_packed), backends.compiled(mod.grad_kernel)
    return mod.code_packed, mod.grad_kernel


def _device_guard(device: torch.device):
    """Make ``device`` current while a Triton kernel launches: Triton launches on the current CUDA
    device and stream, not on its arguments' device (a tensor on cuda:1 while cuda:0 is current
    would be read from the wrong device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_triton(device: torch.device, launch: Callable[[], None]) -> str | None:
    """Run a Triton ``launch`` with ``device`` current; None when it ran, else the backend to run
    instead: a kernel that fails to build or launch warns once, and Triton is not tried again."""
    if "triton" not in backends.available(device.type):
        return backends.instead_of_triton(device.type)  # failed before
    try:
        with _device_guard(device):
            launch()
    except Exception as error:  # noqa: BLE001 - any failure of the kernel falls back
        return backends.after_triton_failed(error, device.type)
    return None


def _empty_code(x: Tensor, bits: int) -> Tensor:
    return x.new_empty((bitpack.packed_bytes(x.numel(), bits) if bits else 0,), dtype=torch.uint8)


def _triton_forward(x: Tensor, name: str, params: list[float], backend: str) -> tuple[tuple[Tensor, Tensor] | None, str]:
    """((y, code), "triton") from the Triton kernel where it runs, else (None, the backend to use)."""
    if backend == "triton" and x.dtype != torch.float64:
        y, code = _like(x), _empty_code(x, _module(name).CODE_BITS)
        order = _order(y)
        tk = module_constants(_module(name), torch.float32, x.device, tuple(params))
        backend = _launch_triton(x.device, lambda: _triton_module(name).forward(
            _flat(x, order).contiguous(), _flat(y, order), code, tk.x_threshold_tensor, list(params)))
        if backend is None:
            return (y, code), "triton"
    return None, "eager" if backend == "triton" else backend  # float64: the torch code


def _output(x: Tensor, mod: ModuleType, k: Constants) -> Tensor:
    """y = f(x) by the generated torch forward, in the layout the fakes promise."""
    y = mod.forward(x, **k.params)
    if y.stride() != _dense_strides(x):
        y = _like(x).copy_(y)
    return y


def _untraced(backend: str) -> str:
    """torch.compile refuses to run inside an FX trace (make_fx, torch.func.linearize): eager there."""
    return "eager" if backend == "compiled" and torch.fx._symbolic_trace.is_fx_symbolic_tracing() else backend


@torch.library.custom_op("invact::forward", mutates_args=())
def _forward(x: Tensor, name: str, params: list[float], backend: str) -> tuple[Tensor, Tensor]:
    backend = _untraced(backend)
    mod = _module(name)
    k = module_constants(_module(name), x.dtype, x.device, tuple(params))
    bits = mod.CODE_BITS
    done, backend = _triton_forward(x, name, params, backend)
    if done is not None:
        return done
    y = _output(x, mod, k)
    if not bits:
        return y, _empty_code(x, 0)
    flat = _flat(x, _order(y))
    if backend == "compiled" and x.device.type == "cpu" and x.dtype != torch.float64:
        cmap = _code_map(mod, x.dtype, tuple(params))
        packed = cpu_kernel.pack_code(flat, cmap, bits) if cmap else None
        if packed is not None:
            return y, packed
    code_fn, _ = _kernels(name, backend)
    return y, code_fn(flat, k.x_thresholds)


@_forward.register_fake
def _forward_fake(x, name, params, backend):
    return _like(x), _empty_code(x, _module(name).CODE_BITS)


def _y_only(x: Tensor, name: str, params: list[float], backend: str) -> Tensor:
    """y of invact::forward without the code: what apply runs when nothing will differentiate y."""
    done, _ = _triton_forward(x, name, params, backend)  # the Triton kernel packs the code as it goes
    if done is not None:
        return done[0]
    return _output(x, _module(name), module_constants(_module(name), x.dtype, x.device, tuple(params)))


_value = torch.library.custom_op("invact::value", _y_only, mutates_args=())


@_value.register_fake
def _value_fake(x, name, params, backend):
    return _like(x)


@torch.library.custom_op("invact::backward", mutates_args=())
def _backward(grad: Tensor, y: Tensor, code: Tensor, name: str, params: list[float], backend: str) -> Tensor:
    backend = _untraced(backend)
    order = _order(y)
    out = _like(y)
    yf, gf, of = _flat(y, order), _flat(grad, order).contiguous(), _flat(out, order)
    if backend == "triton" and y.dtype != torch.float64:
        k = module_constants(_module(name), torch.float32, y.device, tuple(params))
        backend = _launch_triton(y.device, lambda: _triton_module(name).backward(
            gf, yf, code, of, k.y_thresholds, k.poly, list(params)))
        if backend is None:
            return out
    if backend == "triton":
        backend = "eager"  # float64: the torch code
    if backend == "compiled" and y.device.type == "cpu":
        if _fused_backward(name, params, of, gf, yf.contiguous(), code):
            return out
    mod = _module(name)
    k = module_constants(mod, y.dtype, y.device, tuple(params))
    _, grad_fn = _kernels(name, backend)
    thr = k.y_threshold_values if backend == "compiled" else k.y_thresholds
    lut = None
    if backend == "eager" and y.dtype in (torch.bfloat16, torch.float16):
        lut = _lookup_table(mod, y.dtype, tuple(params), y.device, _flushed(y))
    # compiled: whole bit planes (contiguous code bytes); eager: bounded temporaries as well
    size = yf.numel() if backend == "compiled" else _EAGER_CHUNK
    for a, b, first, shift in bitpack.plane_chunks(yf.numel(), mod.CODE_BITS, size):
        codes = code[first:first + b - a]
        if lut is not None:
            _lookup_grad(of[a:b], gf[a:b], yf[a:b], codes, shift, mod.CODE_BITS, lut)
        else:
            grad_fn(of[a:b], gf[a:b], yf[a:b], codes, torch.tensor(shift, dtype=torch.int32), thr, k.poly, **k.params)
    return out


@_backward.register_fake
def _backward_fake(grad, y, code, name, params, backend):
    return _like(y)


def _setup_context(ctx, inputs, output) -> None:
    _, name, params, backend = inputs
    ctx.invact = (name, params, backend)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(*output)  # y and the packed code: nothing else


def _grad(ctx, grad_y, grad_code):
    y, code = ctx.saved_tensors
    return torch.ops.invact.backward(grad_y, y, code, *ctx.invact), None, None, None


def _second_order(mode: str) -> RuntimeError:
    return RuntimeError(
        f"invact activations have no second derivative ({mode}): their backward rebuilds f'(x) from a "
        "table, so double backward and second-order transforms (torch.func.hessian, jacrev or jacfwd of "
        "a derivative, jvp of a jvp) are refused; use torch.nn.functional's activation where "
        "higher-order gradients are needed")


def _no_double_backward(ctx, grad):
    raise _second_order("double backward")


_forward.register_autograd(_grad, setup_context=_setup_context)
_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# torch.func transforms and forward-mode AD. The custom ops' own autograd is reverse mode only and not
# functorch-aware (tangents would be dropped: a zero jvp), so under those apply runs _Activation: the
# same two ops, still saving only y and the code. Dynamo refuses a Function with a jvp, which is why
# plain and compiled calls keep the ops' own autograd.

class _Derivative(torch.autograd.Function):
    """grad * g(y, code) by invact::backward, refusing to be differentiated (in either mode)."""

    @staticmethod
    def forward(grad: Tensor, y: Tensor, code: Tensor, name: str, params: list[float], backend: str) -> Tensor:
        return torch.ops.invact.backward(grad, y, code, name, params, backend)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad):
        raise _second_order("reverse mode of the derivative: double backward, hessian or jacrev of a derivative")

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
            ctx.save_for_backward(*output)  # y and the packed code: nothing else

    @staticmethod
    def backward(ctx, grad_y, grad_code):
        y, code = ctx.saved_tensors
        return _Derivative.apply(grad_y, y, code, *ctx.invact), None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        y, code = ctx.saved_tensors
        return _Derivative.apply(tangent, y, code, *ctx.invact), None

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
    return torch.stack([backward(g, y, code, *rest) for g in grad.unbind(gdim)]), 0


@_backward.register_vmap
def _backward_vmap(info, in_dims, grad, y, code, name, params, backend):
    return _batched_backward(torch.ops.invact.backward, in_dims, grad, y, code, name, params, backend)


# ----------------------------------------------------------------------------------------------
# public entry point

@torch._dynamo.assume_constant_result
def _prepare(name: str, params: tuple, backend: str | None, device_type: str) -> tuple[list[float], str]:
    return list(_check_params(name, dict(params))), backends.resolve(backend, device_type)


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for device types that have autocast (meta tensors have none)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


def apply(x: Tensor, name: str, params: dict[str, float] | None = None, backend: str | None = None) -> Tensor:
    """y = f(x) for activation ``name``, saving only y and a packed branch code for backward.

    ``params``: the activation's parameters (defaults from the table; see :func:`info`).
    ``backend``: "triton", "compiled", "eager" or None (default: $INVACT_BACKEND, else the best
    available; see :mod:`invact.backends`). Under torch.autocast the activation runs in x's dtype, as
    GELU and SiLU do (autocast is switched off inside, so every dtype the op sees is concrete).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"invact activation {name!r}: x must be float16, bfloat16, float32 or float64, "
                        f"got {x.dtype} (as torch.nn.functional, no integer, bool or complex inputs)")
    values, chosen = _prepare(name, tuple(sorted((params or {}).items())), backend, x.device.type)
    if _autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _run(x, name, values, chosen)
    return _run(x, name, values, chosen)


_DIFFERENTIATING = (TransformType.Grad, TransformType.Jvp)  # torch.func's vmap and functionalize run the ops


@torch._dynamo.assume_constant_result  # Dynamo runs the transforms' levels for real while it traces
def _transformed() -> bool:
    """Forward-mode AD is on (a dual level is open) or torch.func differentiates (grad, vjp, jvp, jac*);
    NotImplementedError where functionalize is in the stack too (PyTorch has no functionalize rule for
    an autograd.Function)."""
    kinds = {i.key() for i in torch._C._functorch.get_interpreter_stack() or ()}
    if fwAD._current_level < 0 and not kinds.intersection(_DIFFERENTIATING):
        return False
    if TransformType.Functionalize in kinds:
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


def _run(x: Tensor, name: str, values: list[float], chosen: str) -> Tensor:
    if _transformed():
        return _differentiated(x, name, values, chosen)
    if torch.is_grad_enabled() and _requires_grad(x):
        return torch.ops.invact.forward(x, name, values, chosen)[0]
    # nothing differentiates y: no code
    if chosen != "triton" and _plain(x):  # the op's dispatch costs more than the work at small sizes
        return _y_only(x, name, values, chosen)
    return torch.ops.invact.value(x, name, values, chosen)


def _plain(x: Tensor) -> bool:
    """x is an ordinary tensor with data, outside torch.compile, transforms and dispatch modes (meta
    and fake tensors, vmap's wrappers and tracing modes take the op and its fake or vmap rule)."""
    return (type(x) is Tensor and not x.is_meta and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and torch.utils._python_dispatch._get_current_dispatch_mode() is None)
