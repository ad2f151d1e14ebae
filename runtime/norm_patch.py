"""How :func:`invact.patch` recognises normalization layers and builds their replacements.

* ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` (exact classes): :class:`invact.LayerNorm` /
  :class:`invact.RMSNorm` with the same configuration.
* Subclasses of torch's norms outside torch (``class QKNorm(nn.RMSNorm)``, its forward overridden or not) and
  other classes named ``...RMSNorm`` / ``...LayerNorm`` (Hugging Face's LlamaRMSNorm, MistralRMSNorm,
  Qwen2RMSNorm, Phi3RMSNorm, GemmaRMSNorm with its ``1 + w`` weight, T5LayerNorm, ...) are recognised by
  what they compute, not by name: holding only ``weight`` of the normalized shape (and ``bias``), no buffers
  or submodules, an ``eps`` / ``variance_epsilon`` attribute (``eps=None``, nn.RMSNorm's default: the RMSNorm
  forms with eps=None) and a forward that takes only the input, each invact form
  (:data:`invact.norms.STYLES`, LayerNorm with or without bias) is tried on random input (rows of
  variance 4 down to eps/10: :func:`_probe_input`) with random weights in the configurations of
  :data:`_CONFIGS`, and the first whose output has the same dtype and bits (or within 2 ulps of each row's
  largest output, said in the report) and the same gradients for a random dy (:func:`_gradient_difference`:
  a weight read through ``.data`` or statistics detached do not match; a float16 gradient of the module's own
  that overflows where the form's, computed in float32, is finite is compared where it is finite, and the
  report says so: :func:`_own_overflow`) is used (:func:`_verdict`: float32 must run; a 16-bit or mixed
  configuration the class cannot run is skipped; float64 is reported). A class computing otherwise in training
  mode than in eval mode (a dropout on its output; statistics detached or another dtype only while training)
  matches nothing, in either mode (:func:`_mode_difference` on float32 outputs, then the matched form's whole
  probe in the mode the module is not in: :func:`_other_mode`). (The mixed probe, float32 weights and bfloat16
  input, tells Llama's from T5's rounding; the upcast probe, bfloat16 weights and float32 input, leaves torch's
  LayerNorm, which refuses it, to a class that computes it, as Cohere's does in float32.)
  A class nothing matches is left, with each form's difference (and the dtypes it shows on) as the reason. One
  probe per class and configuration (:func:`_configuration`: the weight's shape and dtype, and the instance's
  attributes: numbers, strings and tuples by value, so Qwen's grouped and ungrouped RMSNorm are probed
  apart, any other object by identity). A weight with a size-1 dimension that broadcasts over the input
  (``nn.Parameter(torch.ones(1, d))``) is left (:func:`_broadcast_weight`). An eps attribute of None is
  F.rms_norm's default for the RMSNorm forms; the LayerNorm forms take the eps inferred from the output
  (:func:`_inferred_eps`, on a copy with weight 1 and bias 0).
* Such classes with no parameters, buffers or submodules (OLMo's LayerNorm, Llama 4's weight-less RMSNorm):
  the same probe (:func:`_weightless`) with the input's dtypes alone (:data:`_PLAIN_CONFIGS`) against
  invact's norms without affine parameters in the forms of :data:`_PLAIN_FORMS` (RMSNorm's "llama", "torch",
  "t5"; LayerNorm's "llama", ``F.layer_norm(x.float()).to(x.dtype)``, and torch's). The size comes from
  ``normalized_shape`` / ``hidden_size``; a class stating none (Llama 4's) is probed on several sizes
  (:func:`_match_any_size`) and, where one form matches on each, becomes an invact norm with
  ``normalized_shape=None``, which normalizes the last dimension of any size. eps comes from the attribute, or is
  inferred from the output (:func:`_inferred_eps`: a row of variance far below eps, snapped to a short
  decimal, or float32's epsilon: F.rms_norm's eps=None or that number, the float64 probe choosing) and kept
  only if the full probe then matches (an eps attribute of None is F.rms_norm's default, as for nn.RMSNorm); a
  form without eps, with eps outside the square root, clamped or over another axis matches nothing and is left.

The replacement shares the original's Parameter objects, registered in the original's order (same
``state_dict`` keys, optimizer state, also loaded by position, and later ``.to()`` conversions), and only where
the two hold the same parameters, buffers and submodules (:func:`_adopt`: a QAT observer child, a user's buffer,
a weight computed by a ``torch.nn.utils.prune`` hook leave the norm); :func:`invact.unpatch` puts the original
back.

Autocast output: a norm whose consumers are Linears (pre-norm) returns the autocast dtype under torch.autocast,
so the Linear saves the norm's own output instead of a cast copy. Which norms those are is read from the parent
(:func:`feeds_linears`): a parent with a ``norm_first`` flag (torch's TransformerEncoderLayer /
TransformerDecoderLayer) says it, the final ``norm`` of torch's TransformerEncoder / TransformerDecoder is the
stack's output, and otherwise the attribute name decides (:data:`PRE_NORM`), except that without ``example=`` a
norm directly in the model being patched (inside a ``torch.compile`` / DDP / DataParallel wrapper) with no
nn.Linear registered after it there (LlamaModel's final ``norm``: its ``last_hidden_state``) is taken for the
model's output and keeps torch's dtype. A module cannot see who uses its output, and a post-norm layer's output
(BERT's ``LayerNorm``, Gemma 2's sandwich ``post_attention_layernorm``, torch's layers with
``norm_first=False``, a tutorial's ``self.norm1(x + self.attn(x))``) also feeds the float32 residual stream,
which must not be rounded: the name alone cannot tell, and the report's note says when the name decided. With
``example=``, :mod:`invact.autocast_check` checks it: a norm whose autocast output changes the model's output
under autocast keeps torch's dtype, and where the check compares nothing, the rule without ``example=`` decides
(:func:`checked_autocast`, which writes the note after the check).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch import nn

from .norm_recovery import default_eps
from .norms import LayerNorm, RMSNorm, SavingNorm, int_tuple
from .patch_swaps import unwrapped
from . import recognise
from .recognise import probe_copy

__all__ = ["is_candidate", "replacement", "feeds_linears", "checked_autocast", "Patching", "PRE_NORM"]

# attribute names of norms whose output feeds only Linears (Llama/Mistral/Qwen2/Phi-3/Gemma, GPT-2, ViT, T5)
PRE_NORM = {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "ln_1", "ln_2", "ln_f",
            "layernorm_before", "layernorm_after", "norm", "final_layernorm", "layer_norm", "norm1", "norm2",
            "attention_norm", "ffn_norm"}
_NAME = re.compile(r"(RMS|Layer)Norm")


def is_candidate(module: nn.Module) -> bool:
    """A norm :func:`replacement` may swap (invact's own norms are not), judged by its own class (FSDP2's
    dynamic subclass looked through: :func:`invact.recognise.own_class`): torch's LayerNorm and RMSNorm,
    and outside torch their subclasses (``class QKNorm(nn.RMSNorm)``) and classes named ``...RMSNorm`` /
    ``...LayerNorm``; all but torch's exact classes are probed."""
    cls = recognise.own_class(module)
    if isinstance(module, SavingNorm):
        return False
    if cls in (nn.LayerNorm, nn.RMSNorm):
        return True
    if cls.__module__.startswith("torch."):    # torch's own subclasses (quantized LayerNorm) are no user norms
        return False
    return issubclass(cls, (nn.LayerNorm, nn.RMSNorm)) or bool(_NAME.search(cls.__name__))


class _Unstated:
    """No eps attribute: the weight-less probe infers eps from the output (:func:`_inferred_eps`)."""

    def __repr__(self) -> str:
        return "UNSTATED"


_UNSTATED = _Unstated()
_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")


def _eps(module: nn.Module) -> float | None | _Unstated:
    """The module's eps attribute: a number, None where it is None (``eps=None``: F.rms_norm's default, the
    epsilon of the dtype it computes in, as nn.RMSNorm's), or :data:`_UNSTATED` where it has none."""
    values = [getattr(module, name) for name in _EPS_NAMES if hasattr(module, name)]
    number = next((v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
    if number is not None:
        return float(number)
    return None if any(v is None for v in values) else _UNSTATED


def _eps_text(eps: float | None) -> str:
    return "eps=None (F.rms_norm's default)" if eps is None else f"eps {eps:g}"


class Patching(NamedTuple):
    """What :func:`invact.patch` tells :func:`replacement` about its call: the model it patches, and whether an
    ``example=`` step will measure the swaps (and check the norms' autocast outputs)."""

    model: nn.Module | None = None
    measured: bool = False


def feeds_linears(parent: nn.Module, attr: str, call: Patching = Patching()) -> bool:
    """Heuristic: the norm is a pre-norm (its consumers are Linears), judged by its parent's ``norm_first``
    flag where it has one, else by its attribute name (:data:`PRE_NORM`), except where it is taken for the
    output of the model ``call`` patches without ``example=`` (:func:`_model_output`)."""
    return _pre_norm(parent, attr, call)[0]


def _pre_norm(parent: nn.Module, attr: str, call: Patching) -> tuple[bool, str]:
    """(:func:`feeds_linears`' answer, what decided it: "structure", "name" (the attribute name alone) or
    "output" (a pre-norm's name, but the patched model's output))."""
    norm_first = getattr(parent, "norm_first", None)
    if isinstance(norm_first, bool):           # torch's Transformer{Encoder,Decoder}Layer: post-norm by default
        return norm_first, "structure"
    if isinstance(parent, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return False, "structure"              # the final norm: the stack's output, to any consumer
    if attr == "post_attention_layernorm" and "pre_feedforward_layernorm" in parent._modules:
        return False, "structure"              # Gemma 2/3: a sandwich norm feeding the residual
    if attr not in PRE_NORM:
        return False, "name"
    return (False, "output") if _model_output(parent, attr, call) else (True, "name")


def _model_output(parent: nn.Module, attr: str, call: Patching) -> bool:
    """Whether the norm at ``parent.attr`` is taken for the output of the model ``call`` patches without
    ``example=`` (with it, the autocast check measures the output): a direct child of it (of the model a
    ``torch.compile`` / DDP / DataParallel wrapper holds: :func:`invact.patch_swaps.unwrapped`) with no nn.Linear
    registered after it (LlamaModel's final ``norm``, its ``last_hidden_state``; GPT2Model's ``ln_f``), which
    returned torch's dtype to the caller."""
    if call.measured or call.model is None or parent is not unwrapped(call.model):
        return False
    after = list(parent._modules.values())[list(parent._modules).index(attr) + 1:]
    return not any(isinstance(m, nn.Linear) for m in after)


def _autocast(parent: nn.Module, attr: str, autocast_output: bool | None, call: Patching) -> tuple[bool, str]:
    """(the replacement's ``autocast_output``, the report's note on it): patch's argument where given, else
    :func:`_pre_norm`'s answer, whose note says whether the structure or the attribute name alone decided
    (with ``example=``, before its check: :func:`checked_autocast` then decides the note)."""
    if autocast_output is not None:
        return autocast_output, "autocast output (autocast_output=True)" if autocast_output else ""
    cast, how = _pre_norm(parent, attr, call)
    check = "to be checked by example= under bf16 autocast" if call.measured else \
        "not checked: pass example= to check it, or autocast_output=False"
    return cast, _cast_note(attr, how, cast, check)


def _cast_note(attr: str, how: str, cast: bool, check: str) -> str:
    """The note on a norm's autocast output decided by ``how`` (:func:`_pre_norm`); ``check``: what checked a
    decision by the attribute name alone."""
    if how == "output":
        return (f"torch's dtype under autocast: `{attr}`, a pre-norm's attribute name, has no Linear registered "
                "after it in the patched model: taken for its output, torch's dtype kept")
    if not cast:
        return ""
    if how == "structure":
        return "autocast output (a pre-norm: its consumers are Linears)"
    return f"autocast output (a pre-norm by its attribute name `{attr}`, {check})"


def checked_autocast(parent: nn.Module, attr: str, model: nn.Module, unchecked: str | None) -> tuple[bool, str]:
    """(``autocast_output``, the note) of the norm at ``parent.attr`` that had the autocast output before
    ``example=``'s check (:mod:`invact.autocast_check`) and that the check did not refuse: ``unchecked`` None
    where the check compared the model's outputs (the same with it); else why it compared nothing, and the
    rule without ``example=`` decides (:func:`_model_output`: the patched model's final norm keeps torch's dtype)."""
    if unchecked is None:
        cast, how = _pre_norm(parent, attr, Patching(model, True))
        return cast, _cast_note(attr, how, cast, "checked by example=: the model's outputs under bf16 autocast "
                                                  "are the same with it")
    cast, how = _pre_norm(parent, attr, Patching(model, False))
    note = _cast_note(attr, how, cast, f"not checked by example=, whose model {unchecked}: pass autocast_output=False "
                                       "to keep torch's dtype")
    return cast, note + (f" (not checked by example=, whose model {unchecked})" if how == "output" else "")


def _size(module: nn.Module) -> tuple[int, ...] | None:
    """The normalized shape a module without weight states (``normalized_shape``, ``hidden_size``), or None."""
    for name in ("normalized_shape", "hidden_size"):
        value = getattr(module, name, None)
        shape = None if isinstance(value, bool) else int_tuple(value)
        if shape and all(s > 0 for s in shape):
            return shape
    return None


def _build(kind: str, shape: int | tuple[int, ...] | None, eps: float | None, bias: bool, backend: str | None,
           autocast_output: bool, affine: bool = True) -> nn.Module:
    if kind.startswith("layer"):         # "layer": torch's; "layer-llama": F.layer_norm(x.float()).to(x.dtype)
        return LayerNorm(shape, eps, affine, bias and affine, device="meta", style=kind[6:] or "torch",
                         backend=backend, autocast_output=autocast_output)
    return RMSNorm(shape, eps, affine, device="meta", style=kind, backend=backend, autocast_output=autocast_output)


def _share(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` holding ``old``'s Parameters (the same objects), registered in ``old``'s order (an optimizer's
    state, saved by position, then loads into either)."""
    names = [name for name, p in new._parameters.items() if p is not None]
    for name in names:
        setattr(new, name, getattr(old, name))
    order = list(old._parameters)
    for name in sorted(new._parameters, key=lambda n: order.index(n) if n in order else len(order)):
        new._parameters[name] = new._parameters.pop(name)      # re-inserted: the dict's order is old's
    return new


def _adopt(new: nn.Module, old: nn.Module, *parts: str) -> tuple[nn.Module | None, str]:
    """(``new`` sharing ``old``'s Parameters, its note from ``parts``), or (None, why not): the two do not hold
    the same parameters, buffers and submodules (:func:`invact.recognise.state_mismatch`)."""
    why = recognise.state_mismatch(old, new)
    if why is not None:
        return None, why
    return _share(new, old), _note(new, *parts)


def _configuration(module: nn.Module) -> tuple:
    """What may set a forward's behaviour besides the tensors: the weight's shape and dtype, and the
    attributes beyond nn.Module's own, by name: numbers, strings, dtypes and tuples of them by value
    (Qwen's ``group_size``), any other object by identity (a config or a function shared by every layer
    still gives one probe; objects that differ, even if equal, are probed apart)."""
    weight = module._parameters.get("weight")
    attrs = tuple(sorted(((k, _attribute_key(v)) for k, v in vars(module).items() if k not in _MODULE_STATE),
                         key=lambda item: item[0]))
    return (type(module), None if weight is None else (tuple(weight.shape), weight.dtype), attrs)


_MODULE_STATE = frozenset(vars(nn.Module()))


def _attribute_key(value: object) -> object:
    """``value`` if it is a number, string, dtype or None, a tuple of such for a tuple or list, else
    ("object", id(value)): the probes' cache lives for one patch, while the modules keep their objects."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_attribute_key(v) for v in value)
    return ("object", id(value))


def _probe_input(n: int, eps: float | None, g: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(3, 5, n) rows of random values at five scales each: 2 (the usual), 0.01, and 0.3, 1 and 3 times
    sqrt(eps), where eps is 10, 1 and 1/9 times the variance, so a form that adds eps elsewhere (outside
    the square root, a clamp) or another eps shows; each row's mean is 0.15 of its scale. ``eps=None``:
    F.rms_norm's default for float32. The scales stay at or above sqrt of ``dtype``'s smallest normal
    number: float16 rows at sqrt(1e-12) are subnormal, where torch's own backward gives NaN (a BERT-style
    eps of 1e-12 then left every subclass of LayerNorm that a probe decides)."""
    root = max(math.sqrt(eps if eps is not None else default_eps(torch.float32)), 1e-6,
               math.sqrt(torch.finfo(dtype).tiny))
    scales = torch.tensor([2.0, 0.01, 0.3 * root, root, 3 * root], dtype=torch.float64).repeat(3).reshape(3, 5, 1)
    return ((torch.randn(3, 5, n, generator=g, dtype=torch.float64) + 0.15) * scales).float()


# (name, weights' dtype, input's dtype, whether it decides a match (see _verdict), whose ulps count: None for
# the output's). "upcast", bf16 weights and float32 x, which torch's LayerNorm refuses and Cohere's computes in
# float32: does the form run and give the same dtype and values to bf16's ulps (float32's rounding is the
# float32 configuration's to decide: each new float32 sample is another draw of two float32 forms' ~1-2 ulps)
_CONFIGS = (("float32", torch.float32, torch.float32, True, None),
            ("bfloat16", torch.bfloat16, torch.bfloat16, True, None),
            ("float16", torch.float16, torch.float16, True, None),
            ("mixed", torch.float32, torch.bfloat16, True, None),   # float32 weights, bf16 x: Llama's vs T5's rounding
            ("upcast", torch.bfloat16, torch.float32, True, torch.bfloat16),
            ("float64", torch.float64, torch.float64, False, None))
_PLAIN_CONFIGS = tuple(c for c in _CONFIGS if c[1] == c[2])     # no weights: the input's dtype alone
_MATCH = 2.0     # the most ulps of the row's largest output a matching form may differ by (_row_ulps)
# the most a matching form's gradients (dx, dw, db for a random dy) may differ by, in ulps of each row's largest
# dx (of the largest dw, db): two backwards that round float32 sums in their own order, one recovering x_hat
# from the rounded y, differ by a few ulps times |x_hat| + 1 (invact.norm_bounds.error_bound; measured: at
# most 1.7 over the 258 transformers norm classes the probe swaps); a gradient through other math (statistics
# detached: ~1e6 float32 ulps) is far beyond
_GRAD_MATCH = 16.0
_DECIDING = tuple(name for name, _, _, decides, _ in _CONFIGS if decides)
_RAISED = "its forward raised"   # how _probe says the module itself cannot run a configuration
_NOTE = "note"   # _probe's key (no configuration) for what the report says of a match (:func:`_compared`)


def _probe(module: nn.Module, kind: str, eps: float | None, bias: bool, shape: tuple[int, ...] | None = None,
           training: bool | None = None) -> dict[str, float | str]:
    """Per configuration of :data:`_CONFIGS` (weights' and input's dtypes), the largest difference in ulps
    of the output dtype (of each row's largest output: :func:`_row_ulps`) between ``module`` and form
    ``kind`` on random input (:func:`_probe_input`) and weights, or why they cannot be compared (the forward
    raised, the form failed, another dtype or shape) or do not match (their gradients differ:
    :func:`_gradient_difference`). It runs a copy (:func:`invact.recognise.probe_copy`: without hooks, on the
    CPU where the module is on the meta device) and sets the copy's weights; ``training``: the copy's mode (by
    default the module's; torch's CPU RNG forked, so a forward drawing random numbers leaves the caller's draws
    as they were). ``shape``: a module without weight, normalizing that shape, compared with the form without
    weight in :data:`_PLAIN_CONFIGS`."""
    affine = shape is None
    shape = tuple(module.weight.shape) if affine else shape
    n = math.prod(shape)
    out: dict[str, float | str] = {}
    g, g_dy = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    notes = []
    for config, dtype, x_dtype, _, unit in _CONFIGS if affine else _PLAIN_CONFIGS:
        # on the CPU, also within torch.device("meta") around patch; with autograd, also under no_grad
        with torch.device("cpu"), torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
            try:
                probe = _random_copy(module, dtype, affine, bias, g, training)
            except Exception as exc:  # noqa: BLE001 - a module that cannot be copied and set is not probed
                out[config] = f"no {config} copy with random weights ({type(exc).__name__}: {exc})"[:200]
                continue
            x = _probe_input(n, eps, g, x_dtype).reshape(3, 5, *shape).to(x_dtype).requires_grad_()
            dy = torch.randn(x.shape, generator=g_dy)
            try:
                want = probe(x)
            except Exception as exc:  # noqa: BLE001 - a configuration the module cannot run is not compared
                out[config] = (f"{_RAISED} {type(exc).__name__} on {config} (shape {tuple(x.shape)}, the normalized "
                               "dimensions last, as invact's norms take them: a norm over another layout, "
                               "such as channels_first, is left)")
                continue
            try:
                form = _build(kind, shape, eps, bias, "eager", False, affine)
                got = (_share(form, probe) if affine else form)(x)
            except Exception:  # noqa: BLE001 - a form that cannot run this input does not match
                out[config] = "fails"
                continue
            if not isinstance(want, torch.Tensor) or want.dtype != got.dtype or want.shape != got.shape:
                out[config] = (f"returns {type(want).__name__}" if not isinstance(want, torch.Tensor) else
                               f"returns {want.dtype} {tuple(want.shape)}, the form {got.dtype} {tuple(got.shape)}"
                               ) + f" on {_dtypes_text(config)}"
                continue
            out[config] = _row_ulps(want.detach(), got.detach(), len(shape), unit)
            if out[config] <= _MATCH:     # a matching output: its gradients too (one backward each)
                params = {name: p for name, p in probe.named_parameters(recurse=False) if affine}
                why, note = _gradient_difference(want, got, x, params, dy.to(want.dtype), len(shape), config)
                out[config] = why or out[config]
                if note:
                    notes.append(note)
    if notes:
        out[_NOTE] = "; ".join(notes)
    return out


def _random_copy(module: nn.Module, dtype: torch.dtype, affine: bool, bias: bool, g: torch.Generator,
                 training: bool | None = None) -> nn.Module:
    """A probe copy of ``module`` in ``dtype`` with random weight (and bias), each requiring grad, in mode
    ``training`` (by default ``module``'s)."""
    probe = probe_copy(module).to(device="cpu", dtype=dtype)
    if training is not None:
        probe.train(training)
    with torch.no_grad():
        if affine:
            probe.weight.copy_((torch.randn(probe.weight.numel(), generator=g) * 0.5 + 0.2).reshape(probe.weight.shape))
        if bias:
            probe.bias.copy_((torch.randn(probe.bias.numel(), generator=g) * 0.2).reshape(probe.bias.shape))
    for p in probe.parameters(recurse=False):
        p.requires_grad_(True)   # a frozen weight too: whether the forward lets a gradient reach it shows
    return probe


def _gradient_difference(want: torch.Tensor, got: torch.Tensor, x: torch.Tensor, params: dict[str, torch.Tensor],
                         dy: torch.Tensor, dims: int, config: str) -> tuple[str | None, str]:
    """(why the gradients of the module's output ``want`` and the form's ``got`` for ``dy`` do not match, or
    None; where they match, a note for the report, or ""): a gradient one side gives and the other does not (a
    weight read through ``.data``), or a difference beyond :data:`_GRAD_MATCH` ulps of each row's largest dx, of
    the largest dw, db, counted in the coarsest dtype of x, y, the parameters and float32 (a gradient is no finer
    than the y it is recovered from, and Hugging Face's forms compute float64 x in float32). A float16 gradient of
    the module's that is inf or NaN where the form's is finite is compared where it is finite
    (:func:`_own_overflow`), and the note says so. ``config``: the probe's configuration, named in both."""
    names, inputs = ("input", *params), (x, *params.values())
    unit = max((torch.float32, want.dtype, *(t.dtype for t in inputs)), key=lambda dtype: torch.finfo(dtype).eps)
    try:
        ours = _gradients(want, inputs, dy)
    except Exception as exc:  # noqa: BLE001 - a backward that raises is not one invact's can stand in for
        return f"its backward raised {type(exc).__name__}", ""
    theirs = _gradients(got, inputs, dy)
    notes, on = [], _dtypes_text(config)
    for name, a, b in zip(names, ours, theirs):
        if a is None and b is not None:
            return (f"same output, but no gradient reaches its {name} (detached, or read through .data); the "
                    "form's does"), ""
        if b is None and a is not None:
            return f"same output, but the form gives no gradient in its {name}", ""
        if a is None:
            continue
        rows = dims if name == "input" else 0
        finite = _own_overflow(a, b)
        kept = (a, b) if finite is None else (a.where(finite, 0.0), b.where(finite, 0.0))
        ulps = _row_ulps(*kept, rows or a.dim(), unit)
        if ulps > _GRAD_MATCH:
            return (f"same output, but its {name}'s gradient differs by {ulps:.3g} ulps of the largest "
                    f"{'' if finite is None else 'where it is finite '}on {on}" + _not_finite(a, b, x, rows)), ""
        if finite is not None:
            notes.append(f"on {on} its own {name} gradient overflows (inf or NaN {_elements(~finite, x, rows)}) "
                         "where invact's, computed in float32, is finite: the gradients compared where its is finite")
    return None, "; ".join(notes)


def _own_overflow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Where the module's gradient ``a`` is finite, where the rest is taken for its own float16 arithmetic
    overflowing (a norm computing in float16 without upcasting: ``rsqrt``'s derivative ``rms**-3`` passes
    float16's largest, 65504, on rows of root mean square below 0.0248; invact's norms compute in float32): ``a``
    float16, inf or NaN somewhere, and the form's ``b`` finite everywhere. The swap then gives finite gradients
    where the module's are not, and the same elsewhere: never worse. None otherwise (compared whole: an inf or
    NaN in float32 or bfloat16, which have float32's range, is no overflow the form avoids)."""
    finite = a.isfinite()
    return None if a.dtype != torch.float16 or bool(finite.all()) or not bool(b.isfinite().all()) else finite


def _dtypes_text(config: str) -> str:
    """The dtypes of configuration ``config`` of :data:`_CONFIGS` in words: "float16 input", "float32 weights
    with bfloat16 input" (a module without weight is probed on the configurations of one dtype alone)."""
    dtypes = next(dtypes for name, *dtypes, _, _ in _CONFIGS if name == config)
    weight, x = (str(dtype).removeprefix("torch.") for dtype in dtypes)
    return f"{x} input" if weight == x else f"{weight} weights with {x} input"


def _not_finite(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, dims: int) -> str:
    """Where the module's gradient ``a`` is inf or NaN and the form's ``b`` finite (or the other way), in words
    (:func:`_elements`); and where ``a`` is float16: its own float16 arithmetic overflows there, where invact's
    norms compute in float32 (:func:`_own_overflow`). "" where each is finite wherever the other is."""
    for theirs, ours, whose, other in ((a, b, "it is", "the form's is"), (b, a, "the form's is", "its is")):
        bad = ~theirs.isfinite() & ours.isfinite()
        if bool(bad.any()):
            break
    else:
        return ""
    text = f": {whose} inf or NaN {_elements(bad, x, dims)}, where {other} finite"
    if theirs is a and a.dtype == torch.float16:
        text += ("; its own float16 arithmetic overflows (float16's largest is 65504) or divides by zero there, "
                 "where invact's norms compute in float32")
    return text


def _elements(bad: torch.Tensor, x: torch.Tensor, dims: int) -> str:
    """How many elements ``bad`` marks, in words, and for an input's gradient (``dims``: a row's dimensions; 0
    for a parameter's) on rows of ``x`` of which root mean square."""
    text = f"at {int(bad.sum())} of {bad.numel()} elements"
    if not dims:
        return text
    rms = x.detach().double().square().flatten(-dims).mean(-1).sqrt()
    hit = rms[bad.flatten(-dims).any(-1)]
    return f"{text}, on rows of x with root mean square {hit.min().item():.2g} to {hit.max().item():.2g}"


def _gradients(y: torch.Tensor, inputs: tuple[torch.Tensor, ...], dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """d(y . dy) / d inputs (None for those y does not depend on)."""
    if not y.requires_grad:
        return (None,) * len(inputs)
    return torch.autograd.grad(y, inputs, dy, allow_unused=True)


_ULPS = "ulps of the row's largest output"


def _row_ulps(want: torch.Tensor, got: torch.Tensor, dims: int, unit: torch.dtype | None = None) -> float:
    """The largest difference between ``want`` and ``got`` in ulps of each row's largest ``|want|`` (a row:
    the last ``dims`` dimensions, one normalization): two forms that round ``gamma * x_hat + beta`` in
    another order differ by about an ulp of the row's scale, which near a zero element is many of its own.
    ``unit``: the dtype whose ulps count (by default want's). Equal values (the same inf, NaN in both)
    differ by 0; a NaN or inf in one of them only, by inf."""
    fi = torch.finfo(unit or want.dtype)
    w, g = want.double(), got.double()
    same = (w == g) | (w.isnan() & g.isnan())
    magnitude = torch.where(w.isfinite(), w.abs(), 0.0)
    scale = magnitude.flatten(-dims).amax(-1).reshape(*w.shape[:-dims], *(1,) * dims)
    diff = torch.where(same, 0.0, (w - g).abs().nan_to_num(nan=math.inf))
    return (diff / (fi.eps * scale + torch.finfo(want.dtype).tiny)).max().item()


def _verdict(results: dict[str, float | str]) -> float | str:
    """The largest difference over the configurations that decide, where it is within :data:`_MATCH`, or why
    the form does not match (an output beyond it: by how much, on which dtypes): float32 must run; a 16-bit or
    mixed configuration the module's own forward cannot run (CLIP's LayerNorm casts x to float32 but not
    bfloat16 weights; torch's LayerNorm refuses bf16 weights with float32 x) is skipped; float64 is reported,
    not decided on (a class computing float64 x in float32, as CLIP's does, differs there by float32's
    rounding)."""
    worst, at = 0.0, "float32"
    for config in (c for c in _DECIDING if c in results):
        r = results[config]
        if isinstance(r, str):
            if config != "float32" and r.startswith(_RAISED):
                continue
            return r
        if r > worst:
            worst, at = r, config
    return worst if worst <= _MATCH else f"its output differs by {worst:.3g} {_ULPS} on {_dtypes_text(at)}"


def _compared(results: dict[str, float | str]) -> str:
    """Which configurations the probe compared, for the report, and its note on them (:data:`_NOTE`: a float16
    gradient compared where the module's is finite)."""
    ran = [c for c in _DECIDING if c in results and not isinstance(results[c], str)]
    f64, note = results["float64"], results.get(_NOTE)
    tail = ("" if f64 == 0 else f"; float64: {f64:.3g} ulps apart" if isinstance(f64, float) else f"; float64: {f64}")
    return f"{', '.join(ran)}; rows of variance 4 down to eps/10{tail}" + (f"; {note}" if note else "")


def replacement(parent: nn.Module, attr: str, module: nn.Module, backend: str | None,
                autocast_output: bool | None, cache: dict, call: Patching = Patching()) -> tuple[nn.Module | None, str]:
    """(new module, note) to replace ``module``, or (None, the reason it is left)."""
    cls = type(module)
    cast, cast_note = _autocast(parent, attr, autocast_output, call)
    if cls is nn.LayerNorm or cls is nn.RMSNorm:
        if not module.elementwise_affine:
            return _adopt(_plain(module, backend, cast), module, "no affine parameters: x_hat = y")
        new = (LayerNorm(module.normalized_shape, module.eps, True, module.bias is not None, device="meta",
                         backend=backend, autocast_output=cast) if cls is nn.LayerNorm else
               RMSNorm(module.normalized_shape, module.eps, True, device="meta", backend=backend, autocast_output=cast))
        return _adopt(new, module, cast_note)
    extra = recognise.extra_arguments(module)
    if extra is not None:
        return None, f"its forward takes more than the input ({extra}); invact's norms take one tensor"
    if list(module.buffers()) or list(module.children()):
        return None, "not a recognised norm: holds buffers or submodules"
    params = dict(module.named_parameters(recurse=False))
    if not params:
        return _weightless(module, backend, cast, cast_note, cache)
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None or weight.dim() == 0 or set(params) - {"weight", "bias"}:
        return None, "not a recognised norm: needs a weight of the normalized shape (and bias), or no parameters"
    eps = _eps(module)
    if eps is _UNSTATED:
        return None, "no eps / variance_epsilon attribute"
    why = _broadcast_weight(module, tuple(weight.shape))
    if why is not None:
        return None, why
    key = (_configuration(module), eps, bias is not None)
    if key not in cache:
        kinds = _LAYER_FORMS if bias is not None else ("llama", "t5", "gemma", "torch", *_LAYER_FORMS)
        cache[key] = _match(module, kinds, eps, bias is not None, tuple(weight.shape), affine=True)
    kind, eps_used, text = cache[key]
    if kind is None:
        return None, text
    new = _build(kind, tuple(weight.shape), eps_used, bias is not None, backend, cast)
    return _adopt(new, module, f"probe: same output as form {kind!r} {text}", cast_note)


_LAYER_FORMS = ("layer", "layer-llama", "layer-gemma")


def _broadcast_weight(module: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why a weight of ``shape`` with a size-1 dimension (``nn.Parameter(torch.ones(1, d))``, applied as
    ``weight * x_hat``: it broadcasts over inputs of any leading size) cannot be swapped, or None: invact's
    norms take a weight of exactly the normalized shape, so ``(1, d)`` would refuse the model's ``(n, d)``
    input, and a ``(d,)`` weight would change the ``state_dict``. A module stating that shape as its
    ``normalized_shape`` (a subclass of nn.LayerNorm over ``(1, d)``) takes only such inputs itself."""
    if len(shape) < 2 or 1 not in shape or _size(module) == shape:
        return None
    return (f"its weight has shape {shape}, whose size-1 dimensions broadcast over the input: invact's norms take a "
            "weight of exactly the normalized shape, and holding it in another shape would change the state_dict")


def _unmatched(tried: dict[str, float | str]) -> str:
    """Why no form matched: the module's forward raised, or each form's difference (forms with the same
    difference named together)."""
    failed = next((d for d in tried.values() if isinstance(d, str) and d.startswith(_RAISED)), None)
    if failed is not None:
        return f"probe: {failed}"
    diffs = "; ".join(f"{', '.join(k for k, d in tried.items() if d == text)}: {text}"
                      for text in dict.fromkeys(tried.values()))
    return f"probe: no invact norm computes the same output ({diffs})"


# forms a norm without weight may compute: gemma's (1 + w) needs a weight; ties go to the float64 match
_PLAIN_FORMS = ("llama", "torch", "t5", "layer-llama", "layer")
_ANY_SIZES = (64, 24, 3)   # the probe's sizes for a module that states none


def _weightless(module: nn.Module, backend: str | None, cast: bool, cast_note: str,
                cache: dict) -> tuple[nn.Module | None, str]:
    """A module without parameters (OLMo's LayerNorm, Llama 4's weight-less RMSNorm): invact's norm
    without affine parameters, where one of :data:`_PLAIN_FORMS` computes the same (:func:`_match_plain`)."""
    if any(isinstance(v, torch.Tensor) for v in vars(module).values()):
        return None, "not a recognised norm: holds a tensor that is no parameter or buffer"
    size = _size(module)
    key = (_configuration(module), _eps(module), size)
    if key not in cache:
        cache[key] = _match_plain(module, key[1], size) if size else _match_any_size(module, key[1])
    kind, eps, text = cache[key]
    if kind is None:
        return None, text
    new = _build(kind, size, eps, False, backend, cast, affine=False)
    return _adopt(new, module, f"no weight: probe: same output as form {kind!r} without weight {text}", cast_note)


def _match_any_size(module: nn.Module, eps: float | None | _Unstated) -> tuple[str | None, float | None, str]:
    """:func:`_match_plain` for a module that states no size (Llama 4's weight-less RMSNorm normalizes
    whatever last dimension it gets): the same form and eps on each of :data:`_ANY_SIZES`, or none."""
    found = [_match_plain(module, eps, (n,)) for n in _ANY_SIZES]
    (kind, eps_used, text), others = found[0], found[1:]
    if kind is None:
        return found[0]
    for n, (other, other_eps, other_text) in zip(_ANY_SIZES[1:], others):
        if (other, other_eps) != (kind, eps_used):
            return None, 0.0, (f"no normalized size (normalized_shape / hidden_size attribute), and not one form "
                               f"on every size: on size {_ANY_SIZES[0]} form {kind!r}, on size {n} "
                               f"{other_text if other is None else repr(other)}")
    return kind, eps_used, f"{text}; no size stated: on sizes {', '.join(map(str, _ANY_SIZES))}, any size kept"


def _match_plain(module: nn.Module, eps: float | None | _Unstated,
                 shape: tuple[int, ...]) -> tuple[str | None, float | None, str]:
    """:func:`_match` for a module without weight normalizing ``shape``, against :data:`_PLAIN_FORMS`."""
    return _match(module, _PLAIN_FORMS, eps, False, shape, affine=False)


def _match(module: nn.Module, kinds: tuple[str, ...], eps: float | None | _Unstated, bias: bool,
           shape: tuple[int, ...], affine: bool) -> tuple[str | None, float | None, str]:
    """(form, eps, how it matched) of the first of ``kinds`` that computes what ``module`` does on
    ``shape`` (its weight's, where ``affine``), or (None, 0, why none does). ``eps``: the module's attribute
    (None: F.rms_norm's default, for the RMSNorm forms), or :data:`_UNSTATED`: inferred per family
    (:func:`_family_eps`); where a family has two candidates (float32's epsilon: the number, or eps=None)
    and without weight, ties go to the float64 match. A module computing otherwise in training mode than in
    eval mode matches nothing (:func:`_mode_difference`: float32 outputs, every mode; :func:`_other_mode`: the
    matched form's whole probe in the mode the module is not in)."""
    why = _mode_difference(module, shape, affine, bias)
    if why is not None:
        return None, 0.0, f"probe: {why}"
    epss: dict[bool, tuple[float | None, ...] | str] = {}
    tried: dict[str, float | str] = {}
    results: dict[str, dict[str, float | str]] = {}
    forms: dict[str, tuple[str, float | None]] = {}
    for kind in kinds:
        rms = not kind.startswith("layer")
        if rms not in epss:
            epss[rms] = _family_eps(module, eps, rms, shape)
        if isinstance(epss[rms], str):
            tried["RMSNorm forms" if rms else "LayerNorm forms"] = epss[rms]
            continue
        for e in epss[rms]:
            label = kind if len(epss[rms]) == 1 else f"{kind} with {_eps_text(e)}"
            forms[label] = kind, e
            results[label] = _probe(module, kind, e, bias, None if affine else shape)
            tried[label] = _verdict(results[label])
    matches = sorted((k for k, d in tried.items() if isinstance(d, float) and d <= _MATCH),
                     key=lambda k: (tried[k], _float64_ulps(results[k])))
    if not matches:
        return None, 0.0, _unmatched(tried) + _inferred_text(eps, epss)
    label, worst, why = _other_mode(module, matches, forms, tried, bias, None if affine else shape)
    if label is None:
        return None, 0.0, f"probe: {why}"
    kind, eps_used = forms[label]
    probe = "bit for bit" if worst == 0 else f"within {worst:.2g} {_ULPS}"
    return kind, eps_used, f"{probe} ({_compared(results[label])}; {_MODES})" + _eps_how(eps, eps_used)


_MODES = "in eval and training mode"


def _other_mode(module: nn.Module, matches: list[str], forms: dict[str, tuple[str, float | None]],
                tried: dict[str, float | str], bias: bool,
                shape: tuple[int, ...] | None) -> tuple[str | None, float, str]:
    """(the first of ``matches`` whose whole probe (:func:`_probe`: dtypes, outputs, gradients) also matches in
    the mode the module is not in, the larger difference of the two modes, ""), or (None, 0, why none does): the
    module computes one function in eval mode and another in training mode (its statistics detached, or another
    dtype, only while training), where invact's norms compute one. The probe ran in the module's mode (Hugging
    Face's ``from_pretrained`` returns eval mode); :func:`_mode_difference` compared float32 outputs only."""
    other = not module.training
    first = ""
    for label in matches:
        kind, eps = forms[label]
        verdict = _verdict(_probe(module, kind, eps, bias, shape, training=other))
        if isinstance(verdict, float) and verdict <= _MATCH:
            return label, max(verdict, float(tried[label])), ""
        modes = ("eval mode", "training mode") if other else ("training mode", "eval mode")
        first = first or f"form {label!r} computes what it does in {modes[0]}; in {modes[1]}: {verdict}"
    return None, 0.0, (f"it computes differently in training mode (.train()) than in eval mode (.eval()): {first} "
                       "(statistics detached, or another dtype, in one mode only); invact's norms compute one "
                       "function in both modes")


def _mode_difference(module: nn.Module, shape: tuple[int, ...], affine: bool, bias: bool) -> str | None:
    """Why ``module`` computes another function in training mode than in eval mode (a dropout on its output,
    ``y * 2 if self.training else y``), or None: a copy with random weights (:func:`_random_copy`) is called on
    float32 probe rows in eval mode and twice in training mode (torch's CPU RNG forked: the caller's draws are
    untouched), and the three outputs must be the same bits. invact's norms compute one function in both modes;
    the probe itself runs in the module's current mode (Hugging Face's ``from_pretrained`` returns eval mode),
    and the form it matches is probed again, whole, in the other mode (:func:`_other_mode`: gradients, dtypes).
    A module that cannot run the rows is left to the probe to say so."""
    outs: list[object] = []
    with torch.device("cpu"), torch.no_grad(), torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(2)
        try:
            twin = _random_copy(module, torch.float32, affine, bias, g)
        except Exception:  # noqa: BLE001 - the probe reports a module it cannot copy
            return None
        x = _probe_input(math.prod(shape), None, g).reshape(3, 5, *shape)
        for mode in (False, True, True):
            try:
                outs.append(twin.train(mode)(x.clone()))
            except Exception as exc:  # noqa: BLE001 - a mode the module cannot run: compared as its error
                outs.append(type(exc))
    if all(isinstance(o, type) for o in outs):
        return None
    same = [isinstance(o, torch.Tensor) and isinstance(outs[0], torch.Tensor) and recognise.same_values(o, outs[0])
            for o in outs[1:]]
    if all(same):
        return None
    return ("it computes differently in training mode (.train()) than in eval mode (.eval())" if not same[0] else
            "its training-mode output differs from one call to the next") + \
        " (a dropout, or a branch on self.training): invact's norms compute one function in both modes"


def _inferred_text(eps: float | None | _Unstated, epss: dict[bool, tuple[float | None, ...] | str]) -> str:
    """The eps values inferred from the output, for a reason (none where the attribute gave them)."""
    if eps is not None and eps is not _UNSTATED:
        return ""
    found = [f"{'None' if e is None else f'{e:g}'} ({'RMSNorm' if rms else 'LayerNorm'})"
             for rms, es in epss.items() if not isinstance(es, str) and (eps is _UNSTATED or not rms) for e in es]
    return ("; eps=None attribute (F.rms_norm's default for the RMSNorm forms; the LayerNorm forms take the "
            "number in its output)" if eps is None else "") + \
        ("; eps inferred from its output: " + ", ".join(found) if found else "")


def _eps_how(eps: float | None | _Unstated, used: float | None) -> str:
    """The note's words on eps where the attribute gave no number: ``used`` inferred, or F.rms_norm's default."""
    if eps is _UNSTATED:
        return f"; {_eps_text(used)} inferred from its output"
    if eps is None:
        return ("; eps=None attribute: F.rms_norm's default" if used is None else
                f"; eps=None attribute: eps {used:g} inferred from its output")
    return ""


def _family_eps(module: nn.Module, eps: float | None | _Unstated, rms: bool,
                shape: tuple[int, ...]) -> tuple[float | None, ...] | str:
    """The eps values the RMSNorm (``rms``) or LayerNorm forms are probed with: the module's attribute (None:
    F.rms_norm's default, or float32's epsilon, which a forward may state for it: the float64 probe decides), or
    inferred from its output (:func:`_inferred_eps`) where it has none or, for the
    LayerNorm forms (F.layer_norm takes a number), where it is None; or why there is none."""
    if eps is _UNSTATED or eps is None and not rms:
        return _inferred_eps(module, rms, shape)
    if eps is None:   # F.rms_norm's default, or float32's epsilon stated for it: they differ on float64 alone
        return None, float(torch.finfo(torch.float32).eps)
    return (eps,)


def _float64_ulps(results: dict[str, float | str]) -> float:
    f64 = results["float64"]
    return f64 if isinstance(f64, float) else math.inf


_EPS_ROWS = 13      # float32 rows of variance 1 down to 1e-24, each a decade of scale below the last


def _inferred_eps(module: nn.Module, rms: bool, shape: tuple[int, ...]) -> tuple[float | None, ...] | str:
    """The eps candidates of a module without an eps number, from its float32 output (a copy: weight 1, bias 0):
    on its row of smallest variance ``var`` (of ``x`` for RMSNorm, else of ``x - mean``),
    ``y = x_c / sqrt(var + eps)`` gives ``eps = var / mean(y^2) - var`` (float64), snapped to a decimal of 1 to
    3 significant digits within 1e-5 relative, or float32's epsilon within that: for the RMSNorm forms both
    F.rms_norm's eps=None (the epsilon of the dtype it computes in) and the number itself, which differ on
    float64 input only (:func:`_match` lets the float64 probe choose); or why there is none (the probe then
    decides whether the module computes that)."""
    n = math.prod(shape)
    g = torch.Generator().manual_seed(1)
    scales = torch.logspace(0, -(_EPS_ROWS - 1), _EPS_ROWS, dtype=torch.float64).reshape(-1, 1)
    x = ((torch.randn(_EPS_ROWS, n, generator=g, dtype=torch.float64) + 0.15) * scales).float()
    with torch.device("cpu"), torch.no_grad():
        try:
            twin = probe_copy(module).to(device="cpu", dtype=torch.float32)
            for name, p in twin.named_parameters(recurse=False):
                p.fill_(1.0 if name == "weight" else 0.0)
            y = twin(x.reshape(_EPS_ROWS, *shape))
        except Exception as exc:  # noqa: BLE001 - a module that cannot run float32 rows is not a norm
            return f"{_RAISED} {type(exc).__name__} on float32 (shape {(_EPS_ROWS, *shape)})"
    if not isinstance(y, torch.Tensor) or y.shape != (_EPS_ROWS, *shape) or not y.is_floating_point():
        return "returns another type or shape than its input"
    xc = x.double() if rms else x.double() - x.double().mean(-1, keepdim=True)
    var, mean_square = xc.square().mean(-1)[-1].item(), y.double().reshape(_EPS_ROWS, n).square().mean(-1)[-1].item()
    estimate = var / mean_square - var if math.isfinite(mean_square) and mean_square > 0 else math.nan
    if not estimate > 1e-3 * var:       # nothing (or noise) added to the variance: no eps
        return f"no eps number, and no eps in its output ({estimate:.2g} on a row of variance {var:.1e})"
    default = torch.finfo(torch.float32).eps
    if abs(estimate - default) <= 1e-5 * default:   # F.rms_norm's eps=None (its float32 epsilon), or that number
        return (None, default) if rms else (default,)
    for digits in range(3):
        snapped = float(f"{estimate:.{digits}e}")
        if abs(snapped - estimate) <= 1e-5 * snapped:
            return (snapped,)
    return f"no eps number; its output gives eps {estimate:.7g}, no decimal of up to 3 significant digits"


def _plain(module: nn.Module, backend: str | None, cast: bool) -> nn.Module:
    """A torch.nn norm without affine parameters: x_hat = y exactly, nothing to recover."""
    cls = LayerNorm if isinstance(module, nn.LayerNorm) else RMSNorm
    kwargs = {"bias": False} if cls is LayerNorm else {}
    return cls(module.normalized_shape, module.eps, False, backend=backend, autocast_output=cast, **kwargs)


def _note(new: nn.Module, *parts: str) -> str:
    rec = new.recovery()
    kept = "" if not rec.columns else rec.reason
    return "; ".join(p for p in (*parts, kept) if p)

