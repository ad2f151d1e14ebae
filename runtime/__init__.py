"""invact — memory-efficient activations that save their output instead of their input.

An activation's backward needs ``f'(x)``; PyTorch's GELU, SiLU, Mish, ... save ``x`` for it. invact saves
the output ``y`` (which the next layer usually saves anyway) plus a packed code of ``ceil(log2 k)``
bits per element, rounded up to 0, 1, 2, 4 or 8 (``k`` distinct codes of its monotone branches: branches
whose y ranges only touch share one), and computes ``f'(x) = g(y, code)`` from certified fitted tables.

Public API:

* modules with torch.nn's names and signatures — :class:`GELU`, :class:`SiLU`, :class:`Mish`,
  :class:`Softplus`, :class:`ELU`, :class:`CELU`, :class:`SELU`, :class:`Hardswish`, :class:`LeakyReLU`,
  :class:`ReLU`, :class:`Sigmoid`, :class:`Tanh`, plus :class:`QuickGELU`, :class:`ReLU2` and the generic
  :class:`Activation`; :func:`activation` builds one for any table by name;
* :class:`LayerNorm`, :class:`RMSNorm` — torch.nn's norms saving their output (:mod:`invact.norms`);
* :mod:`invact.functional` — torch.nn.functional's names and signatures;
* :func:`patch` / :func:`unpatch` — swap a model's activation modules in place (torch.nn, Hugging Face
  transformers, timm) and back, with a report;
* :func:`memory` — a context manager counting the bytes saved for backward, per module.

transformers and timm are never imported by invact: their classes are recognised in ``sys.modules``.
"""

import warnings
from importlib import import_module

from .common.after_import import after_import as _after_import, import_first as _import_first
from .common.catalog import group as _group

# one module class per `module` name of the activation catalog (invact.common.catalog; torch-free)
_MODULE_CLASSES = tuple(_group("module"))

# Names are imported on first use, so `import invact.fitting` and the `invact` CLI do not pay for
# torch; `invact.GELU` etc. import it then.
_LAZY = {
    "memory": "saved", "SavedBytes": "saved", "use_root": "ops",
    "PatchReport": "patching", "patch": "patching", "unpatch": "patching",
    "LayerNorm": "norms", "RMSNorm": "norms",
    "route_functional": "routing", "FunctionalRouter": "routing",
    **{name: "modules" for name in ("Activation", "activation", *_MODULE_CLASSES)},
}


_SUBMODULES = {"functional", "modules", "patching", "saved", "ops", "backends", "bitpack", "routing", "norms",
               "norm_bounds", "measure", "recognise", "modes"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module 'invact' has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _register_ops() -> None:
    """Import the modules that define the custom ops (invact::forward, invact::norm_forward, ...), which
    must exist before a program calling them is loaded (torch.export.load, torch.jit.load)."""
    try:
        import_module(".ops", __name__)
        import_module(".norms", __name__)
    except Exception as error:  # noqa: BLE001 - never fail the import that triggered this
        warnings.warn(f"invact: its custom ops could not be registered ({type(error).__name__}: {error}); "
                      "programs saved with them will not load", RuntimeWarning, stacklevel=2)


# at once where torch is imported, else right after torch's own import (the fitter's command line,
# which never loads such a program, cancels this: invact.common.after_import)
_after_import("torch", _register_ops)
# torch before the first of invact's submodules that import it (all but these), so that the line above
# never runs while one of them is half imported
_TORCH_FREE = {"fitting", "common", "generated", "registry", "kernel_cache", "cache_dirs", "u_clamp", "act_triton"}
_import_first("torch", __name__, _TORCH_FREE)


from .common import VERSION as __version__  # noqa: E402 - defined once, in invact.common

__all__ = [
    "Activation", "activation", *_MODULE_CLASSES, "LayerNorm", "RMSNorm",
    "functional", "patch", "unpatch", "PatchReport", "memory", "SavedBytes", "use_root", "__version__",
    "route_functional", "FunctionalRouter",
]
