"""Bytes saved for backward by real architectures: baseline against invact.patch, fp32 and bf16 autocast.

    python benchmarks/models.py [--quick] [--models GPT-2,Llama] [--dtypes float32,bfloat16]
                                [--device cpu|cuda] [--json PATH]

Full run: 19 models x 2 dtypes at FULL sizes (Mamba always at QUICK sizes: at FULL its Python scan
took over 10 GiB; timm's ViT skipped where timm does not import), about 20 min on 2 shared cores (an
estimate from one row, Phi-3 float32, 36 s; the full run was not timed); --quick: 3 models at QUICK
sizes, about 15 s.

Hugging Face transformers models (and timm's ViT) are built from small configs with random weights
(no download). For each model and dtype, one training step (forward + backward) runs unpatched and
then patched; invact.memory counts the bytes saved for backward, each storage once, parameters apart.
Patching is ``invact.patch(model, example=step, functional=True)``, ``step`` being the row's forward
under its autocast: each swap is measured on it and kept only where it frees bytes (the report's reasons
name the others), and functional activation calls are routed when that frees bytes, so no column is
above its baseline (the norms columns measure their swaps the same way).

"theory" is what invact is designed to save: for every call of a replaced activation, its input's
bytes less its packed code's bytes, ceil(numel * code_bits / 8), read from forward hooks on the
replaced modules. Where the measured saving differs, the difference is split into its causes from
which module saved which storage in each run (see :func:`_explain`):

* the original activation saves more than its input (a formula of several torch ops);
* the input stays alive anyway (a slice of a fused projection that the next op also saves);
* no later op saves the activation's output, so invact's y is an extra tensor (e.g. dropout between).

Under the table, the activations + norms step's bytes by kind (:func:`_accounting`): what only invact's
modules save (codes, rstd), autocast's bf16 weight casts, and the rest by the module class that saved
it; the ratio without invact's own bytes is a floor for any replacement of the same modules, and the
ratio with the weight casts counted with the parameters is printed too.

With CUDA, each step also records torch.cuda.max_memory_allocated above the memory held before it.
:func:`run` returns the rows as dicts (for notebooks); ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import invact
from invact import ops
from invact.norms import SavingNorm
from invact.saved import SavedBytes

MiB = 2**20


@dataclass(frozen=True)
class Size:
    """Model and batch size. ``gated``: the SwiGLU/GeGLU width, Llama-7B's ratio 11008/4096."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    batch: int = 4
    seq: int = 256
    vocab: int = 1024
    image: int = 128            # ViT: (image / patch)^2 = seq tokens
    patch: int = 8

    @property
    def ffn(self) -> int:
        return 4 * self.hidden

    @property
    def gated(self) -> int:
        return self.hidden * 11008 // 4096


FULL = Size()
QUICK = Size(hidden=64, layers=2, heads=2, batch=2, seq=32, vocab=256, image=32, patch=8)


@dataclass(frozen=True)
class Spec:
    """A model: its builder, its inputs, a note on its configuration, and the size it always runs at
    (None: the run's, FULL or QUICK)."""

    name: str
    build: Callable[[Size], nn.Module]
    inputs: Callable[[Size, torch.Generator], dict[str, torch.Tensor]]
    note: str = ""
    size: Size | None = None


def _hf(config: str, model: str, fields: Callable[[Size], dict[str, Any]]) -> Callable[[Size], nn.Module]:
    def build(s: Size) -> nn.Module:
        import transformers
        transformers.logging.set_verbosity_error()
        return getattr(transformers, model)(getattr(transformers, config)(**fields(s)))
    return build


def _decoder(s: Size, ffn: int | None = None) -> dict[str, Any]:
    """Llama-style field names (Llama, Mistral, Qwen2, Phi, Phi-3, GPT-NeoX)."""
    return dict(hidden_size=s.hidden, intermediate_size=ffn or s.gated, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=s.heads, vocab_size=s.vocab,
                max_position_embeddings=max(s.seq, 64), pad_token_id=0)


def _tokens(s: Size, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def _seq2seq(s: Size, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, s.vocab, (s.batch, s.seq), generator=g),
            "labels": torch.randint(0, s.vocab, (s.batch, s.seq), generator=g)}


def _images(s: Size, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(s.batch, 3, s.image, s.image, generator=g),
            "labels": torch.randint(0, 10, (s.batch,), generator=g)}


def _timm_images(s: Size, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(s.batch, 3, s.image, s.image, generator=g)}    # timm's forward(x) -> logits


def _audio(s: Size, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Raw waveform: the convolutional front end (strides 5, 4, 4) makes s.seq frames of 80 samples."""
    return {"input_values": torch.randn(s.batch, 80 * s.seq, generator=g),
            "labels": torch.randint(0, 10, (s.batch,), generator=g)}


def _mel(s: Size, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Whisper: 80 mel bins, 2 * s.seq frames (its second convolution halves them), s.seq label tokens."""
    return {"input_features": torch.randn(s.batch, 80, 2 * s.seq, generator=g),
            "labels": torch.randint(0, s.vocab, (s.batch, s.seq), generator=g)}


def _timm_vit(s: Size) -> nn.Module:
    import timm     # timm 1.0 imports torchvision; see the skip reason where that fails
    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=s.image, patch_size=s.patch,
                             embed_dim=s.hidden, depth=s.layers, num_heads=s.heads, num_classes=10)


SPECS = [
    Spec("GPT-2", _hf("GPT2Config", "GPT2LMHeadModel", lambda s: dict(
        n_embd=s.hidden, n_layer=s.layers, n_head=s.heads, n_positions=s.seq, vocab_size=s.vocab)), _tokens),
    Spec("BERT", _hf("BertConfig", "BertForMaskedLM", lambda s: dict(
        hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads, intermediate_size=s.ffn,
        vocab_size=s.vocab, max_position_embeddings=s.seq)), _tokens),
    Spec("Llama", _hf("LlamaConfig", "LlamaForCausalLM", _decoder), _tokens),
    Spec("Mistral", _hf("MistralConfig", "MistralForCausalLM", _decoder), _tokens),
    Spec("Qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", _decoder), _tokens),
    Spec("Phi", _hf("PhiConfig", "PhiForCausalLM", lambda s: _decoder(s, s.ffn)), _tokens),
    Spec("Phi-3", _hf("Phi3Config", "Phi3ForCausalLM", _decoder), _tokens,
         "gate_up_proj computes gate and up in one Linear; the activation gets gate = a chunk of its output"),
    Spec("GPT-NeoX", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", lambda s: _decoder(s, s.ffn)), _tokens),
    Spec("Falcon", _hf("FalconConfig", "FalconForCausalLM", lambda s: dict(
        hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads, vocab_size=s.vocab)),
         _tokens),
    Spec("T5 v1.1", _hf("T5Config", "T5ForConditionalGeneration", lambda s: dict(
        d_model=s.hidden, d_ff=s.gated, d_kv=s.hidden // s.heads, num_layers=s.layers, num_heads=s.heads,
        vocab_size=s.vocab, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0)),
         _seq2seq, "gated-gelu (GeGLU) feed-forward, as T5 v1.1 / Flan-T5"),
    Spec("BART", _hf("BartConfig", "BartForConditionalGeneration", lambda s: dict(
        d_model=s.hidden, encoder_layers=s.layers, decoder_layers=s.layers, encoder_attention_heads=s.heads,
        decoder_attention_heads=s.heads, encoder_ffn_dim=s.ffn, decoder_ffn_dim=s.ffn, vocab_size=s.vocab,
        max_position_embeddings=s.seq, activation_dropout=0.1)), _seq2seq,
         "activation_dropout=0.1 as in facebook/bart-large: F.dropout between the activation and fc2, "
         "so fc2 saves the dropout's output"),
    Spec("ViT", _hf("ViTConfig", "ViTForImageClassification", lambda s: dict(
        hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads, intermediate_size=s.ffn,
        image_size=s.image, patch_size=s.patch, num_labels=10)), _images),
    Spec("Mamba", _hf("MambaConfig", "MambaForCausalLM", lambda s: dict(
        hidden_size=s.hidden, num_hidden_layers=s.layers, vocab_size=s.vocab, state_size=16, expand=2)), _tokens,
         "always at QUICK sizes (at FULL sizes its Python scan took over 10 GiB and minutes per step on 2 "
         "cores); without the CUDA kernels its slow path calls F.silu / F.softplus itself: its `act` modules "
         "are never called (restored); the functional route reaches the calls", size=QUICK),
    Spec("Bloom", _hf("BloomConfig", "BloomForCausalLM", lambda s: dict(
        hidden_size=s.hidden, n_layer=s.layers, n_head=s.heads, vocab_size=s.vocab)), _tokens,
         "BloomGelu (a custom autograd Function) is recognised by the probe as gelu_tanh"),
    Spec("Mixtral", _hf("MixtralConfig", "MixtralForCausalLM", lambda s: _decoder(s) | dict(
        num_local_experts=4, num_experts_per_tok=2)), _tokens,
         "4 experts, 2 per token; the experts' fused gate_up weights: chunks copied (see Phi-3)"),
    Spec("Wav2Vec2", _hf("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", lambda s: dict(
        hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads, intermediate_size=s.ffn,
        conv_dim=(s.hidden,) * 3, conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, num_labels=10, mask_time_prob=0.0)), _audio,
         "3-layer convolutional front end (strides 5, 4, 4); mask_time_prob=0 (SpecAugment draws its masks "
         "from NumPy's RNG, which would differ between the two steps); dropout after the feed-forward GELU"),
    Spec("ModernBERT", _hf("ModernBertConfig", "ModernBertForMaskedLM", lambda s: dict(
        hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        vocab_size=s.vocab, max_position_embeddings=s.seq, pad_token_id=0)), _tokens,
         "GeGLU with a fused Wi: chunks copied (see Phi-3)"),
    Spec("Whisper", _hf("WhisperConfig", "WhisperForConditionalGeneration", lambda s: dict(
        d_model=s.hidden, encoder_layers=s.layers, decoder_layers=s.layers, encoder_attention_heads=s.heads,
        decoder_attention_heads=s.heads, encoder_ffn_dim=s.ffn, decoder_ffn_dim=s.ffn, vocab_size=s.vocab,
        num_mel_bins=80, max_source_positions=s.seq, max_target_positions=s.seq, pad_token_id=0,
        decoder_start_token_id=1)), _mel, "the convolutional front end calls F.gelu: the functional route"),
    Spec("timm ViT", _timm_vit, _timm_images,
         "timm 1.0 imports torchvision (timm/layers/create_norm.py); skipped where that fails"),
]
QUICK_MODELS = ("Llama", "GPT-2", "Phi-3")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# one training step, with a record of which module saved which storage

class _Trace(SavedBytes):
    """invact.memory that also records every module saving each storage (not only the first).

    Extends SavedBytes through its private ``_pack``/``_key``/``_stack``: a public per-storage record in
    invact.saved would remove that coupling.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.savers: dict[tuple, set[str]] = defaultdict(set)
        self.casts: set[tuple] = set()           # storages that are copies of a parameter (autocast's casts)
        self._params = {id(p) for p in model.parameters()}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if key is not None and key not in self._param_keys:
            self.savers[key].add(self._stack[-1] if self._stack else "<outside>")
            if key not in self.casts and self._weight_cast(t):
                self.casts.add(key)
        return super()._pack(t)

    def _weight_cast(self, t: torch.Tensor) -> bool:
        """``t`` is a parameter cast to another dtype, possibly transposed or viewed: the copy autocast
        makes of each Linear's weight once per forward (the same bytes whatever the batch size)."""
        node = t.grad_fn
        while node is not None and type(node).__name__ in _CAST_NODES:
            inputs = [f for f, _ in node.next_functions if f is not None]
            node = inputs[0] if len(inputs) == 1 else None
        return node is not None and id(getattr(node, "variable", None)) in self._params

    def cast_bytes(self) -> int:
        """Bytes of the counted storages that are parameter casts (see :meth:`_weight_cast`)."""
        return sum(e.nbytes for k, e in self._storages.items() if k in self.casts and e.module != "<parameters>")


_CAST_NODES = {"ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0"}


@dataclass(frozen=True)
class _Call:
    """One call of a replaced activation: storage keys and bytes of its input x and output y."""

    x_key: tuple
    y_key: tuple
    x_bytes: int
    y_bytes: int
    code_bytes: int     # ceil(numel * code_bits / 8): the packed code invact adds


def _step(model: nn.Module, inputs: dict, autocast: torch.dtype | None, acts: dict[str, nn.Module],
          bits: dict[str, int]) -> tuple[_Trace, list[_Call], int | None]:
    """Forward + backward under invact.memory; forward hooks on ``acts`` (path -> module) record calls."""
    calls: list[_Call] = []

    def hook(path: str) -> Callable:
        def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0]
            calls.append(_Call(_Trace._key(x), _Trace._key(out), x.numel() * x.element_size(),
                               out.numel() * out.element_size(), math.ceil(x.numel() * bits[path] / 8)))
        return record

    handles = [m.register_forward_hook(hook(p)) for p, m in acts.items()]
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    cast = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    torch.manual_seed(0)                                       # the same dropout masks in both runs
    try:
        with _Trace(model) as trace, cast:
            loss = _loss(model(**inputs))
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() - before if cuda else None
    return trace, calls, peak


def _loss(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    return loss if loss is not None else out.float().pow(2).mean()     # timm: logits only


def _freed(trace: _Trace, acts: set[str]) -> dict[tuple, int]:
    """Storages saved only inside replaced activations: the bytes patching can change."""
    return {k: k[3] for k, who in trace.savers.items() if who <= acts}


def _short(paths: Iterable[str]) -> str:
    return ", ".join(sorted({p.rsplit(".", 1)[-1] for p in paths}))


def _explain(base: _Trace, pat: _Trace, calls: list[_Call], pcalls: list[_Call], acts: set[str],
             cls: str, routed: int = 0) -> tuple[int, list[str]]:
    """Split measured - theory into causes (bytes) with a sentence each; returns (unexplained, reasons).

    Patching changes only storages saved inside the activations, so measured = (freed in the baseline:
    x and any intermediates) - (kept by invact alone: code, and y where nothing else saves it).
    """
    freed_b, freed_p = _freed(base, acts), _freed(pat, acts)
    x_keys = {c.x_key for c in calls}
    reasons = []
    extra = sum(n for k, n in freed_b.items() if k not in x_keys)
    if extra:
        per_call = len(freed_b) / len(calls)
        ratio = sum(freed_b.values()) / sum(c.x_bytes for c in calls)
        reasons.append(f"+{extra / MiB:.2f} MiB: the original {cls} saves {per_call:g} tensors per call "
                       f"({ratio:g}x its input's bytes; it is a formula of several torch ops, each saving "
                       "its operands), all replaced by y and the code")
    # a chunk of a fused projection (x's storage larger than x) that patch copied: in the patched run the
    # activation's input is its own storage, saved by nobody, and the fused output is freed whole, the
    # multiply saving its own copy of the other half: x's bytes are freed after all (calls pair up in order)
    copied = [c for c, pc in zip(calls, pcalls) if c.x_key not in freed_b and c.x_key[3] > c.x_bytes
              and pc.x_key[3] == pc.x_bytes and pc.x_key not in pat.savers] if len(calls) == len(pcalls) else []
    kept = [c for c in calls if c.x_key not in freed_b and c not in copied]
    if kept:
        others = _short(set().union(*(base.savers[c.x_key] for c in kept)) - acts)
        ratio = kept[0].x_key[3] / kept[0].x_bytes
        what = (f"a slice (1/{ratio:g}) of a larger tensor that {others} also saves" if ratio > 1
                else f"also saved by {others}")
        reasons.append(f"-{sum(c.x_bytes for c in kept) / MiB:.2f} MiB: its input stays alive: it is {what}")
    view = sum(k[3] for k in x_keys & freed_b.keys()) - sum(c.x_bytes for c in calls if c.x_key in freed_b)
    if view:
        reasons.append(f"+{view / MiB:.2f} MiB: its input is a view; the whole storage is freed")
    lone = [c for c in pcalls if c.y_key in freed_p]
    if lone:
        reasons.append(f"-{sum(c.y_bytes for c in lone) / MiB:.2f} MiB: no later op saves its output y, "
                       "so invact's y is an extra tensor")
    lone_keys = {c.y_key for c in lone}
    code = sum(n for k, n in freed_p.items() if k not in lone_keys) - sum(c.code_bytes for c in pcalls)
    if code:
        reasons.append(f"{code:+d} B: the codes take other than ceil(numel * bits / 8) bytes")
    if routed:
        reasons.append(f"+{routed / MiB:.2f} MiB: functional activation calls routed to invact (measured by patch)")
    measured = base.total - pat.total
    unexplained = measured - (sum(freed_b.values()) - sum(freed_p.values())) - routed - sum(c.x_bytes for c in copied)
    if unexplained:
        reasons.append(f"{unexplained:+d} B unexplained: storages outside the activations differ between runs")
    return unexplained, reasons


def measure(spec: Spec, size: Size, dtype: str, device: str = "cpu", backend: str | None = None) -> dict[str, Any]:
    """One row: bytes saved for backward by one training step of ``spec``, baseline and patched.

    ``backend``: invact's; default "eager" on CPU (every backend saves the same y and code, and eager
    has no torch.compile start-up), invact's default elsewhere (Triton on CUDA, for the peak memory).
    """
    start = time.monotonic()
    size = spec.size or size
    backend = backend or ("eager" if device == "cpu" else None)
    torch.manual_seed(0)
    model = spec.build(size).to(device).train()
    inputs = {k: v.to(device) for k, v in spec.inputs(size, torch.Generator().manual_seed(0)).items()}
    patching = dict(backend=backend, norms=False, example=_example(inputs, DTYPES[dtype]), functional=True)
    report = invact.patch(model, **patching)
    tables = {r.path: model.get_submodule(r.path).name for r in report.replaced}
    classes = {r.old.rsplit(".", 1)[-1]: tables[r.path] for r in report.replaced}
    invact.unpatch(model)

    def unique(paths: Iterable[str]) -> dict[str, nn.Module]:   # a shared module is hooked once
        mods = {p: model.get_submodule(p) for p in paths}
        return {p: m for p, m in mods.items() if p == next(q for q in mods if mods[q] is m)}

    bits = {p: ops.info(t)["code_bits"] for p, t in tables.items()}
    base, calls, peak_b = _step(model, inputs, DTYPES[dtype], unique(tables), bits)
    invact.patch(model, **patching)
    pat, pcalls, peak_p = _step(model, inputs, DTYPES[dtype], unique(tables), bits)
    invact.unpatch(model)
    norms = _norm_columns(model, inputs, DTYPES[dtype], backend, base)
    theory = sum(c.x_bytes - c.code_bytes for c in calls)
    routed = report.measured["functional_bytes"]
    measured = base.total - pat.total
    unexplained, reasons = _explain(base, pat, calls, pcalls, set(tables), "/".join(sorted(classes)), routed) \
        if (calls or routed) and measured != theory else (0, [])
    return {
        "model": spec.name, "dtype": dtype, "device": device, "note": spec.note,
        "activations": ", ".join(f"{c} -> {t}" for c, t in sorted(classes.items())),
        "replaced": len(report.replaced), "left": [f"{left.cls}: {left.reason}" for left in report.left],
        "calls": len(calls), "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "baseline_bytes": base.total, "patched_bytes": pat.total, "measured_bytes": measured,
        "theory_bytes": theory, "measured_pct": 100 * measured / base.total, "theory_pct": 100 * theory / base.total,
        "agree": measured == theory, "unexplained_bytes": unexplained, "reasons": reasons,
        "cuda_peak_baseline": peak_b, "cuda_peak_patched": peak_p, **norms, "seconds": time.monotonic() - start,
        "skipped": None,
    }


def _example(inputs: dict, autocast: torch.dtype | None) -> Callable[[nn.Module], Any]:
    """The step patch measures its swaps on: the row's forward, under the row's autocast."""
    def step(model: nn.Module) -> Any:
        device = next(model.parameters()).device.type
        with torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
            return model(**inputs)
    return step


def _size(n: int) -> str:
    return f"{n / MiB:.2f} MiB" if n >= MiB // 100 else f"{n / 1024:.1f} KiB"


def _norm_columns(model: nn.Module, inputs: dict, autocast: torch.dtype | None, backend: str | None,
                  base: _Trace) -> dict[str, Any]:
    """Saved bytes with the norms replaced (alone, and with the activations), the theory, and why they differ.

    Theory: every call of a replaced norm frees its input x and keeps its per-row rstd (float32) and any
    kept x_hat columns; its output y is what the next Linears save anyway. Where the measurement differs:
    the original norm also saved intermediates (Hugging Face's RMSNorm: float32 copies), and under
    autocast each consumer Linear saved its own bf16 cast of the float32 output, which the norm's own
    bf16 output replaces (pre-norms: autocast_output).
    """
    example = _example(inputs, autocast)
    report = invact.patch(model, only=[], backend=backend, example=example)
    paths = [r.path for r in report.replaced if isinstance(model.get_submodule(r.path), SavingNorm)]
    invact.unpatch(model)
    mods = {p: model.get_submodule(p) for p in paths}
    xs: list[tuple[int, int]] = []                        # (x bytes, rows) per call, from the originals
    handles = [m.register_forward_hook(lambda m, a, out: xs.append((a[0].numel() * a[0].element_size(),
                                                                     a[0].numel() // a[0].shape[-1])))
               for m in {id(m): m for m in mods.values()}.values()]
    _step(model, inputs, autocast, {}, {})
    for h in handles:
        h.remove()
    invact.patch(model, only=[], backend=backend, example=example)
    kept = sum(len(model.get_submodule(p).recovery().columns) for p in paths)
    only, _, _ = _step(model, inputs, autocast, {}, {})
    invact.unpatch(model)
    replaced = {r.path for r in invact.patch(model, backend=backend, example=example, functional=True).replaced}
    both, _, _ = _step(model, inputs, autocast, {}, {})
    accounting = _accounting(model, both, replaced)
    invact.unpatch(model)
    theory = sum(x - 4 * rows for x, rows in xs)
    measured = base.total - only.total
    reasons = []
    extra = max(sum(base.by_module.get(p, 0) for p in paths) - sum(x for x, _ in xs), 0)
    if extra:
        reasons.append(f"+{_size(extra)}: the original norms save more than their input (statistics, "
                       "float32 intermediates)")
    rest = measured - theory - extra
    if rest > 0:
        reasons.append(f"+{_size(rest)}: the consumers' own casts of the output (one per autocast Linear) "
                       "replaced by the norm's output in the autocast dtype")
    elif rest < 0:
        reasons.append(f"-{_size(-rest)}: y kept where the next op does not save the norm's output "
                       "(e.g. a cast or a dropout between)")
    if kept:
        reasons.append(f"{kept} column(s) of x_hat kept where gamma is too small")
    return {"norms_replaced": len(paths), "norm_calls": len(xs), "norms_bytes": only.total,
            "norms_measured_bytes": measured, "norms_theory_bytes": theory, "norms_reasons": reasons,
            "both_bytes": both.total, "both_ratio": both.total / base.total,
            "norms_ratio": only.total / base.total, "both_accounting": accounting,
            "both_floor_ratio": (both.total - accounting.get(OWN, 0)) / base.total,
            "both_ratio_casts_apart": (both.total - both.cast_bytes()) / (base.total - base.cast_bytes())}


OWN, CASTS = "invact's own", "weight casts"


def _accounting(model: nn.Module, trace: _Trace, replaced: set[str]) -> dict[str, int]:
    """A patched step's saved bytes by kind, largest first: OWN (storages that only replaced modules save:
    packed codes, rstd, kept x_hat columns), CASTS (autocast's bf16 copies of the weights), then the rest by
    the class of the module that saved each storage first (a replaced module's output, which the next
    layer saves too, under the replaced module's class). Everything but OWN is saved by layers invact
    does not replace, so (total - OWN) / baseline is a floor no replacement of invact's can go below."""
    out: dict[str, int] = defaultdict(int)
    for key, entry in trace._storages.items():
        if entry.module == "<parameters>":
            continue
        if key in trace.casts:
            kind = CASTS
        elif trace.savers.get(key, {entry.module}) <= replaced:
            kind = OWN
        else:
            kind = (type(model).__name__ if entry.module == "<root>" else entry.module if entry.module.startswith("<")
                    else type(model.get_submodule(entry.module)).__name__)
        out[kind] += entry.nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def format_accounting(r: dict[str, Any]) -> str:
    """One row's activations + norms bytes by kind (see :func:`_accounting`) and the ratios they bound."""
    parts = ", ".join(f"{k} {_size(n)}" for k, n in r["both_accounting"].items())
    return (f"* {r['model']} {r['dtype']}, activations + norms, {r['both_bytes'] / MiB:.2f} MiB "
            f"({r['both_ratio']:.3f}x): {parts}. Without invact's own bytes: {r['both_floor_ratio']:.3f}x "
            f"(the floor for any replacement of the same modules); weight casts counted with the parameters: "
            f"{r['both_ratio_casts_apart']:.3f}x")


def run(quick: bool = False, models: Iterable[str] | None = None, dtypes: Iterable[str] = tuple(DTYPES),
        device: str | None = None, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows for each model and dtype (see :func:`measure`); a model that cannot be built gets a row per
    dtype with ``skipped`` set to the reason. ``quick``: tiny sizes and QUICK_MODELS unless ``models``."""
    names = list(models) if models is not None else (list(QUICK_MODELS) if quick else [s.name for s in SPECS])
    by_name = {s.name: s for s in SPECS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(by_name)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = list(dtypes)
    if not set(dtypes) <= set(DTYPES):
        raise ValueError(f"unknown dtype(s) {sorted(set(dtypes) - set(DTYPES))}; known: {', '.join(DTYPES)}")
    rows = []
    for name in names:
        for dtype in dtypes:
            try:
                row = measure(by_name[name], QUICK if quick else FULL, dtype, device)
            except ImportError as exc:          # an optional library (timm) that does not import here
                row = {"model": name, "dtype": dtype, "device": device, "note": by_name[name].note,
                       "skipped": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            if log:
                log(format_row(row))
    return rows


# ---------------------------------------------------------------------------------------------------
# output

_HEAD = ("| model | dtype | activations | params MiB | saved MiB, baseline | patched | reduction | theory | "
         "why they differ | norms: patched (reduction, theory) | activations + norms |\n"
         "|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict[str, Any]) -> str:
    """One markdown table row."""
    if r["skipped"]:
        return f"| {r['model']} | {r['dtype']} | skipped: {r['skipped']} | | | | | | | | |"
    peak = "" if r["cuda_peak_baseline"] is None else \
        f" (CUDA peak {r['cuda_peak_baseline'] / MiB:.1f} -> {r['cuda_peak_patched'] / MiB:.1f} MiB)"
    why = "; ".join(r["reasons"]) if not r["agree"] else "agree (to the byte)"
    return (f"| {r['model']} | {r['dtype']} | {r['activations'] or 'none replaced'} | "
            f"{r['parameter_bytes'] / MiB:.1f} | {r['baseline_bytes'] / MiB:.2f} | {r['patched_bytes'] / MiB:.2f} | "
            f"{r['measured_pct']:.1f} % | {r['theory_pct']:.1f} % | {why}{peak} | {_norm_cell(r)} | "
            f"{r['both_bytes'] / MiB:.2f} ({r['both_ratio']:.3f}x) |")


def _norm_cell(r: dict[str, Any]) -> str:
    if not r["norms_replaced"]:
        return "none replaced"
    b = r["baseline_bytes"]
    why = "" if r["norms_measured_bytes"] == r["norms_theory_bytes"] else ": " + "; ".join(r["norms_reasons"])
    return (f"{r['norms_replaced']} norms: {r['norms_bytes'] / MiB:.2f} ({100 * r['norms_measured_bytes'] / b:.1f} %, "
            f"theory {100 * r['norms_theory_bytes'] / b:.1f} %){why}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table, then each model's note."""
    notes = dict.fromkeys(f"* {r['model']}: {r['note']}" for r in rows if r.get("note"))
    return "\n".join([_HEAD, *map(format_row, rows), "", *notes])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"tiny sizes; models {', '.join(QUICK_MODELS)}")
    p.add_argument("--models", help=f"comma-separated, from: {', '.join(s.name for s in SPECS)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="float32,bfloat16 (bf16: autocast)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    a = p.parse_args(argv)
    size = QUICK if a.quick else FULL
    print(f"sizes: {size}; one training step, saved-for-backward bytes de-duplicated by storage, "
          "parameters apart; theory = replaced activations' input bytes - packed code bytes\n", flush=True)
    print(_HEAD, flush=True)
    start = time.monotonic()
    rows = run(a.quick, a.models.split(",") if a.models else None, a.dtypes.split(","), a.device,
               log=lambda line: print(line, flush=True))
    print("", *dict.fromkeys(f"* {r['model']}: {r['note']}" for r in rows if r.get("note")), sep="\n")
    print("\nSaved bytes with activations + norms patched, by kind:",
          *(format_accounting(r) for r in rows if not r["skipped"]), sep="\n")
    print(f"\n{time.monotonic() - start:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
