"""Recognise activation modules that no class rule names, by what they compute.

:func:`invact.patch` knows torch.nn's, Hugging Face's and timm's activation classes by name. Any other
leaf module without parameters or buffers (transformers' ``BloomGelu``, a model's own ``GELU`` class) is
probed: a deep copy (without its hooks: :func:`probe_copy`) is called, without grad, on float64 values (a
2-d tensor) spread densely over [-8, 8] and logarithmically over every float32 magnitude in both signs,
from the largest finite float32 down through float32's and float64's subnormals to ±0 (inf and NaN are
bad input, whose handling is the table's own policy, not the formula's), and its output is compared with
each reference in :func:`references`. It matches when every output is within 2^-26 of the reference
relative to it — a quarter of float32's unit roundoff 2^-24, so the reference's table serves the module
as well as it serves the reference — plus 16 float64 ulps of 1 + min(|x|, 64), the two formulas' own
float64 rounding where they cancel (0.5x(1 + tanh(z)) for x < -4 keeps only an absolute error ~|x| *
2^-53, until tanh saturates near x = -10); equal infinities and NaNs at the same place match. BloomGelu's
and FastGELU's truncated sqrt(2/pi) change outputs by ~1e-9 relative; GELU's erf and tanh forms differ by
up to 0.64 relative (x = -4.7), so they never match each other; a clipped GELU differs beyond its clip.

The copy runs in eval mode and twice in training mode (torch's CPU RNG forked, so the caller's draws are
untouched): a module whose training-mode output differs from its eval-mode output or from one call to the
next (a dropout inside it) computes no fixed function, and is neither recognised nor reported.

A module whose probe runs and is elementwise (flipping the input flips the output) but matches no
reference is "activation-like, not recognised"; one whose probe fails or is not elementwise is not an
activation and is not reported, nor is one whose output equals its input (the identity: a DropPath with
drop_prob 0, a padding layer with nothing to remove).

:func:`state_mismatch` tells whether a replacement holds what a module holds (parameters, buffers, submodules
under the same names): :func:`invact.patch` swaps only where it does.
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
from typing import Callable

import torch
from torch import nn

from . import registry
from .common.catalog import CATALOG

__all__ = ["references", "probe", "is_candidate", "probe_copy", "extra_arguments", "state_mismatch",
           "fsdp_module_class", "own_class"]


def references() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each activation's forward at its table's parameters, which runs in float64: the catalog's first
    (the generated module's ``forward``: PyTorch's own expression,
    :data:`invact.common.catalog.Entry.torch_forward`), then the tables fitted from formulas under the
    roots in use (:func:`invact.use_root`; their printed formula), by name."""
    present = registry.names()
    catalog = [row.name for row in CATALOG if row.name in present]
    fitted = sorted(set(present) - set(catalog))
    # a fitted table's module is imported when the probe gets to it: one whose code cannot be imported (an
    # interrupted fit) matches nothing instead of failing patch
    refs = {name: registry.module(name).forward for name in catalog}
    refs.update({name: lambda x, n=name: registry.module(n).forward(x) for name in fitted})
    return refs


#: references whose usual torch forms already save their output (a custom class may not: measure it)
SAVES_OUTPUT = {row.name for row in CATALOG if row.saves_output == "always"}
_REL, _ULPS64 = 2.0 ** -26, 16 * torch.finfo(torch.float64).eps


def is_candidate(module: nn.Module) -> bool:
    """A leaf module with no parameters or buffers, from outside torch (torch.nn's classes are named), judged
    by its own class (FSDP2's dynamic subclass, defined in torch, looked through: :func:`own_class`)."""
    return (not own_class(module).__module__.startswith("torch.")
            and next(module.parameters(recurse=False), None) is None
            and next(module.buffers(recurse=False), None) is None and not module._modules)


def fsdp_module_class() -> type | None:
    """FSDP2's ``FSDPModule`` (the class ``fully_shard`` mixes into a module's), or None while
    ``torch.distributed.fsdp`` is not imported (nothing can be sharded by it then; it is never imported here)."""
    return getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)


def own_class(module: nn.Module) -> type:
    """``module``'s class as its model defined it: ``fully_shard`` turns an ``nn.LayerNorm`` into an instance of
    a dynamic subclass ``FSDPLayerNorm`` (defined in torch.distributed.fsdp), looked through here."""
    fsdp = fsdp_module_class()
    cls = type(module)
    if fsdp is None or not isinstance(module, fsdp):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, fsdp))


def extra_arguments(module: nn.Module) -> str | None:
    """What ``module``'s forward takes besides one input tensor (``"gate=None"``, ``"*args"``), or None: a
    replacement takes only the input, so a model that passes more (Mamba2's gated RMSNorm: ``norm(h, gate)``)
    would fail, or lose what it passed, after the swap."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]   # after self
    except (TypeError, ValueError):            # no signature to read: nothing known beyond the input
        return None
    if params and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        params = params[1:]                    # the input
    return ", ".join(str(p) for p in params) or None


def _probe_input() -> torch.Tensor:
    """Two rows whose length is a multiple of 64: flipped, every value still meets the vectorized loop of
    an elementwise kernel (a scalar remainder loop may round transcendental functions differently)."""
    f32 = torch.finfo(torch.float32)
    wide = torch.logspace(math.log10(8.0), math.log10(f32.max), 399, dtype=torch.float64) * (1 + math.pi * 1e-5)
    small = torch.logspace(-45.0, -3.0, 85, dtype=torch.float64)
    edges = torch.tensor([f32.max, f32.smallest_normal, f32.smallest_normal / 4, 2.0 ** -149, 1e-310, 5e-324, 0.0],
                         dtype=torch.float64)
    magnitudes = torch.cat([wide.clamp(max=f32.max), small, edges])   # each in both signs
    n = 4000 + (-(4000 + 2 * len(magnitudes))) % 128
    dense = torch.linspace(-8.0, 8.0, n, dtype=torch.float64) + math.pi * 1e-4  # off round numbers (kinks at 0)
    return torch.cat([dense, magnitudes, -magnitudes]).reshape(2, -1)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same values (NaN where NaN), shape and dtype."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _unsharded(module: nn.Module) -> nn.Module:
    """``module``, or where ``fully_shard`` was applied to it (FSDP2 refuses a deep copy), a shallow copy as its
    own class (:func:`own_class`) without the sharding's state: what a deep copy of it may take."""
    cls = own_class(module)
    if cls is type(module):
        return module
    plain = cls.__new__(cls)
    plain.__dict__.update((k, v) for k, v in vars(module).items() if not k.startswith("__composable_api_state"))
    return plain


def probe_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` to call on synthetic input: without hooks (the user's hooks never see a probe;
    the original keeps them), as its own class where ``fully_shard`` was applied to it (:func:`_unsharded`),
    and on the CPU where its parameters or buffers are on the meta device (``to_empty``: their values are
    unset, a probe sets those it needs)."""
    no_hooks = {id(hooks): type(hooks)() for m in module.modules() for name, hooks in vars(m).items()
                if "hooks" in name and isinstance(hooks, dict)}
    twin = copy.deepcopy(_unsharded(module), no_hooks)
    if any(t.is_meta for t in (*twin.parameters(), *twin.buffers())):
        twin.to_empty(device="cpu")
    return twin


def probe(module: nn.Module) -> tuple[str | None, bool]:
    """``(table, activation_like)``: the reference ``module`` computes (or None), and whether it looked
    like an elementwise activation at all (computing the same in training and eval mode, every call, and
    not the identity)."""
    try:   # on the CPU, also within a default-device context (torch.device("meta") around patch)
        with torch.device("cpu"), torch.no_grad(), torch.random.fork_rng(devices=[]):
            x, twin = _probe_input(), probe_copy(module)   # each call on a copy: an in-place module keeps x
            y, y_flipped = twin.eval()(x.clone()), twin(x.flip(-1))
            trained = [twin.train()(x.clone()) for _ in range(2)]
    except Exception:  # noqa: BLE001 - a module that cannot take one float64 tensor is not an activation
        return None, False
    if not (all(isinstance(t, torch.Tensor) for t in (y, y_flipped, *trained)) and y.shape == x.shape
            and y.dtype == x.dtype and same_values(y_flipped.flip(-1), y) and all(same_values(t, y) for t in trained)) \
            or same_values(y, x):  # the identity: no activation
        return None, False
    slack = _ULPS64 * (1 + x.abs().clamp(max=64))
    for name, ref in references().items():
        try:
            with torch.no_grad():
                want = ref(x)
        except Exception:  # noqa: BLE001 - a fitted table whose code or forward cannot take the probe matches nothing
            continue
        close = ((y - want).abs() <= _REL * want.abs() + slack) | (y == want) | (y.isnan() & want.isnan())
        if bool(close.all()):
            return name, True
    return None, True


_KINDS = (("parameter", "_parameters"), ("buffer", "_buffers"), ("submodule", "_modules"))


def _held(module: nn.Module) -> list[tuple[str, str]]:
    """(kind, name) of what ``module`` holds itself, in registration order (None-valued slots left out)."""
    return [(kind, name) for kind, attr in _KINDS for name, v in getattr(module, attr).items() if v is not None]


def state_mismatch(module: nn.Module, replacement: nn.Module) -> str | None:
    """Why ``replacement`` cannot stand in for ``module``: the parameters, buffers and submodules they hold
    differ by name (an observer child from ``torch.ao.quantization.prepare_qat``, a user's buffer, a weight
    that is a plain tensor computed by a hook, as ``torch.nn.utils.prune`` and ``weight_norm`` make it);
    None where they agree."""
    mine, theirs = _held(module), _held(replacement)
    extra = [f"{kind} {name!r}" for kind, name in mine if (kind, name) not in theirs]
    missing = [f"{kind} {name!r}" + (" (a plain tensor here: torch.nn.utils.prune and weight_norm compute it in a "
                                     "forward pre-hook)" if name in vars(module) else "")
               for kind, name in theirs if (kind, name) not in mine]
    new = f"invact's {type(replacement).__name__}"
    parts = ([f"holds {', '.join(extra)}, which {new} would drop"] if extra else []) + \
        ([f"has no registered {', '.join(missing)}, which {new} holds"] if missing else [])
    return "; ".join(parts) or None
