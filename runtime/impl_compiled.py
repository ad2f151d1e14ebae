"""The compiled implementation: the generated torch code compiled by ``torch.compile`` (Inductor).

y is the generated forward as in :mod:`invact.impl_eager`; the forward code and the backward are the
generated ``code_packed`` and ``grad_kernel`` compiled once per activation (dynamic in the element
count, thresholds as compile-time constants; :func:`invact.backends.compiled` falls back to eager
with one warning where compiling fails). The backward runs on whole bit planes (contiguous code bytes).
On CPUs where :mod:`invact.cpu_kernel` runs, :mod:`invact.impl_cpu` comes first.

Documented internals: :class:`Compiled` / :data:`COMPILED` and :func:`kernels`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from . import backends, registry
from .constants import Constants, module_constants
from .impl_eager import Eager, run_planes

__all__ = ["Compiled", "COMPILED", "kernels"]


@registry.per_root()
def kernels(name: str) -> tuple[Callable, Callable]:
    """(packed forward code, flat gradient) of activation ``name``, compiled."""
    mod = registry.module(name)
    return backends.compiled(mod.code_packed), backends.compiled(mod.grad_kernel)


class Compiled(Eager):
    """Eager's y; Inductor's code and backward. Takes every tensor (never answers None)."""

    def code(self, flat_x: Tensor, name: str, k: Constants) -> Tensor:
        return kernels(name)[0](flat_x, k.x_thresholds)

    def backward(self, grad: Tensor, y: Tensor, code: Tensor, name: str, params: list[float]) -> Tensor:
        mod = registry.module(name)
        k = module_constants(mod, y.dtype, y.device, tuple(params))
        return run_planes(grad, y, code, mod, k, kernels(name)[1], k.y_threshold_values, y.numel())


COMPILED = Compiled()
