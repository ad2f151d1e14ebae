"""invact.patch(model, example=...): swaps are measured before they are kept (runtime/measure.py), modules
never called are restored, activation-like classes are recognised by a probe (runtime/recognise.py), and
functional calls are routed (functional=True).

Byte counts here are exact integer arithmetic on storages (no tolerance): a float32 activation input of
n elements is 4n bytes, its packed 1-bit code ceil(n / 8) bytes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invact
import tolerances as tol
from invact import measure, recognise
from invact.common.catalog import CATALOG
from invact.measure import remove_router


class GeluErf(nn.Module):
    """A model's own GELU class: no rule names it; the probe recognises it."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))


class Unknown(nn.Module):
    """Elementwise, parameter-free, but no invact table computes it."""

    def forward(self, x):
        return x * torch.sigmoid(1.5 * x)


class Net(nn.Module):
    """Four sites: act (dropout after it), act2 (frees its input), spare (never called), mine (probe)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, width), nn.Linear(width, 16)
        self.up2, self.down2 = nn.Linear(16, width), nn.Linear(width, 16)
        self.up3, self.down3 = nn.Linear(16, width), nn.Linear(width, 16)
        self.act, self.act2, self.spare, self.mine = nn.GELU(), nn.SiLU(), nn.GELU(), GeluErf()

    def forward(self, x):
        h = self.down(F.dropout(self.act(self.up(x)), 0.1, self.training))
        h = self.down2(self.act2(self.up2(h)))
        return self.down3(self.mine(self.up3(h)))


def _saved(model: nn.Module, x) -> int:
    """Bytes saved for backward by one training step on x (a tensor, or a dict of Hugging Face inputs
    with labels)."""
    torch.manual_seed(0)
    with invact.memory(model) as mem:
        (model(**x).loss if isinstance(x, dict) else model(x).sum()).backward()
    model.zero_grad(set_to_none=True)
    return mem.total


def test_measured_patch_keeps_only_what_frees_bytes():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 16)
    before = _saved(model, x)
    originals = {n: m for n, m in model.named_children()}
    report = invact.patch(model, example=x)
    replaced = {r.path: r for r in report.replaced}
    left = {entry.path: entry.reason for entry in report.left}
    assert set(replaced) == {"act2", "mine"} and set(left) == {"act", "spare"}, str(report)
    assert "dropout after it" in left["act"]
    assert "never called" in left["spare"]
    assert model.act is originals["act"] and model.spare is originals["spare"]   # the same objects back
    assert isinstance(model.act2, invact.SiLU) and isinstance(model.mine, invact.GELU)
    n = 8 * 64
    assert replaced["act2"].freed == 4 * n - n // 8           # its input freed, the 1-bit code added
    # GeluErf saves erf's input x / sqrt2, and 0.5x and 1 + erf(...) for their product: all three freed
    assert replaced["mine"].freed == 3 * 4 * n - n // 8
    after = _saved(model, x)
    assert report.measured == {"baseline_bytes": before, "patched_bytes": after, "functional_bytes": 0}
    assert after == before - replaced["act2"].freed - replaced["mine"].freed
    assert "measured on the example" in str(report)


def test_a_site_called_with_keyword_arguments_is_called():
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down, self.act = nn.Linear(8, 32), nn.Linear(32, 8), nn.SiLU()

        def forward(self, x):
            return self.down(self.act(input=self.up(x)))

    model = KW()
    report = invact.patch(model, example=torch.randn(4, 8))
    assert [r.path for r in report.replaced] == ["act"] and report.replaced[0].freed == 4 * 128 - 128 // 8


def test_without_example_the_report_says_not_measured():
    model = Net()
    report = invact.patch(model)
    assert {r.path for r in report.replaced} == {"act", "act2", "spare", "mine"}
    assert report.measured is None and "not measured" in str(report)
    assert all(r.freed is None for r in report.replaced)


def test_probe_recognises_and_lists_activation_like_classes():
    model = nn.Sequential(nn.Linear(4, 8), GeluErf(), nn.Linear(8, 8), Unknown(), nn.Linear(8, 4))
    report = invact.patch(model)
    assert [r.path for r in report.replaced] == ["1"] and "probe: computes gelu" in report.replaced[0].note
    assert [(entry.path, entry.reason.split(":")[0]) for entry in report.left] == [("3", "not recognised")]
    assert report.left[0].cls.endswith("Unknown")


@pytest.mark.parametrize("name", [row.name for row in CATALOG])
def test_probe_recognises_every_catalog_activation(name):
    """A custom class computing a catalog activation with PyTorch's own expression is recognised as it:
    the probe's references come from the catalog, so a new row is recognised without another list."""
    class Custom(nn.Module):
        def forward(self, x):
            return tol.torch_reference(name, x)

    found, activation_like = recognise.probe(Custom())
    assert activation_like and found is not None
    if found != name:            # an earlier row with the same function at the defaults (celu = elu at alpha 1)
        x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
        assert torch.equal(tol.torch_reference(found, x), tol.torch_reference(name, x)), (found, name)


def test_sequential_dropout_heuristic_is_replaced_by_the_measurement():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 8))
    report = invact.patch(seq, example=torch.randn(4, 8))
    assert len(report) == 0 and "dropout after it" in report.left[0].reason and "measured" in report.left[0].reason


class FusedGLU(nn.Module):
    """Phi-3's MLP: one Linear computes gate and up; the activation gets a chunk of its output."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up, self.down, self.act = nn.Linear(8, 64), nn.Linear(32, 8), nn.SiLU()

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * self.act(gate))


class SharedInput(nn.Module):
    """The activation's input is also the input of another Linear, which saves it."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.side, self.act = nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(32, 8), nn.GELU()

    def forward(self, x):
        h = self.up(x)
        return self.down(self.act(h)) + self.side(h)


class NotSaved(nn.Module):
    """The activation's output goes through a scalar multiply, which does not save it."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.act = nn.Linear(8, 32), nn.Linear(32, 8), nn.GELU()

    def forward(self, x):
        return self.down(self.act(self.up(x)) * 2.0 + 1.0)


@pytest.mark.parametrize("model, reason", [(SharedInput(), "input kept alive by another consumer (side)"),
                                           (NotSaved(), "y not saved by its consumer")])
def test_reasons_read_from_storages(model, reason):
    x = torch.randn(4, 8)
    before = _saved(model, x)
    report = invact.patch(model, example=x)
    assert len(report) == 0 and reason in report.left[0].reason, str(report)
    assert _saved(model, x) == before


def test_fused_projection_frees_its_storage_with_copied_chunks():
    """Phi-3's form: the gate half of gate_up's output is what the activation gets, the up half what the
    multiply saves. With the pieces copied (CopyChunks in the MLP's forward) the whole 2n storage is
    saved by nobody; the copied up (n) and invact's y (shared with the multiply) and code remain."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 8), FusedGLU()), torch.randn(4, 8)
    want = model(x)
    before = _saved(model, x)
    report = invact.patch(model, example=x)
    (r,) = report.replaced
    n = 4 * 32
    assert r.path == "1.act" and "fused projection" in r.note and r.freed == 4 * n - n // 8, str(report)
    assert _saved(model, x) == before - r.freed
    # the copies change no value: the output is the activation's own (within the forward's float32 rounding)
    torch.testing.assert_close(model(x), want)
    invact.unpatch(model)
    assert _saved(model, x) == before and "_invact_chunks" not in model[1].__dict__


def test_fused_projections_measured_together_report_the_unit_not_per_module():
    """Two fused MLPs measured as one unit: neither module's own bytes are known, so each says the unit's
    figure (which is what the two free together) instead of one taking it all and the other 'frees 0'."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 8), FusedGLU(), FusedGLU()), torch.randn(4, 8)
    before = _saved(model, x)
    report = invact.patch(model, example=x)
    assert [r.path for r in report.replaced] == ["1.act", "2.act"], str(report)
    freed = before - _saved(model, x)
    unit = f"measured as one unit of 2 site(s) freeing {freed} B together (not per module)"
    assert freed > 0 and all(r.freed is None and unit in r.note for r in report.replaced), str(report)
    assert "frees 0 bytes" not in str(report)


def test_a_reworded_reason_leaves_the_fused_projection_handled(monkeypatch):
    """Whether a site's input is a fused projection's chunk is read from the storages (measure._fused_input),
    not from the reason sentence: with the sentence reworded, the chunks are still copied and the swap kept,
    freeing what it frees unreworded (test_fused_projection_frees_its_storage_with_copied_chunks)."""
    real, said = measure._why, []
    monkeypatch.setattr(measure, "_why", lambda *a: said.append(real(*a).replace("fused projection", "joint one"))
                        or said[-1])
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 8), FusedGLU()), torch.randn(4, 8)
    before = _saved(model, x)
    report = invact.patch(model, example=x)
    assert any("(a joint one)" in why for why in said), said      # the sentence was reworded
    assert [r.path for r in report.replaced] == ["1.act"], str(report)
    r, n = report.replaced[0], 4 * 32
    assert r.note.startswith("fused projection: ") and r.freed == 4 * n - n // 8, str(report)
    assert _saved(model, x) == before - r.freed


def test_chained_activations_are_decided_together():
    """GELU -> SiLU: with both swapped GELU's y is saved by nobody else; one of the two is dropped."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.SiLU(), nn.Linear(32, 8)), torch.randn(4, 8)
    before = _saved(model, x)
    report = invact.patch(model, example=x)
    assert len(report) == 1 and [e.path for e in report.left] == ["1"], str(report)
    assert _saved(model, x) == before - report.replaced[0].freed and report.replaced[0].freed > 0


def test_measurement_leaves_rng_and_training_flags_alone():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    model, x = Net().eval(), torch.randn(2, 16)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    invact.patch(model, example=x)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert not any(m.training for m in model.modules())


def test_example_forms_and_bad_example():
    model = NotSaved()
    x = torch.randn(4, 8)
    for example in (x, (x,), [x], {"x": x}, lambda m: m(x).sum()):
        invact.unpatch(model)
        assert invact.patch(model, example=example).measured["baseline_bytes"] > 0
    with pytest.raises(TypeError, match="example must be"):
        invact.patch(model, example=3)


class Functional(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.up, self.down, self.p = nn.Linear(8, 64), nn.Linear(64, 8), dropout

    def forward(self, x):
        return self.down(F.dropout(F.gelu(self.up(x)), self.p, self.training))


def test_functional_route_frees_its_input_and_unpatch_removes_it():
    torch.manual_seed(0)
    model, x = Functional(), torch.randn(4, 8)
    before = _saved(model, x)
    report = invact.patch(model, functional=True)
    assert "not measured" in report.functional
    n = 4 * 64
    assert _saved(model, x) == before - (4 * n - n // 8)
    invact.unpatch(model)
    assert remove_router(model) is None and _saved(model, x) == before


@pytest.mark.parametrize("p, kept", [(0.0, True), (0.1, False)])
def test_functional_route_is_measured_as_one_unit(p, kept):
    torch.manual_seed(0)
    model, x = Functional(p), torch.randn(4, 8)
    before = _saved(model, x)
    report = invact.patch(model, functional=True, example=x)
    assert report.functional.startswith("routed" if kept else "left") and "one unit" in report.functional
    assert (_saved(model, x) < before) if kept else (_saved(model, x) == before)
    invact.unpatch(model)


@pytest.mark.slow
def test_functional_route_under_torch_compile():
    torch.manual_seed(0)
    model, x = Functional(), torch.randn(4, 8)
    invact.patch(model, functional=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        torch.compile(model, fullgraph=True)(x).sum().backward()
    assert torch.uint8 in saved          # invact's packed code: the compiled graph ran invact's op
    invact.unpatch(model)


# ---------------------------------------------------------------------------------------------------
# Hugging Face models from tiny configs (no download): never more saved bytes than unpatched

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
T = transformers


def _ids(s: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (2, s), generator=torch.Generator().manual_seed(0))


def _decoder(**extra):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=128, pad_token_id=0, **extra)


HF = {
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=128)),
    "mamba": lambda: T.MambaForCausalLM(T.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=128,
                                                      state_size=4, expand=2, conv_kernel=4)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_decoder())),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**_decoder(num_local_experts=4, num_experts_per_tok=2))),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, max_position_embeddings=64, activation_dropout=0.1)),
}


@pytest.mark.parametrize("name", sorted(HF))
def test_hugging_face_patched_never_above_unpatched(name):
    torch.manual_seed(0)
    model = HF[name]().train()
    inputs = {"input_ids": _ids(), "labels": _ids()}
    before = _saved(model, inputs)
    report = invact.patch(model, example=inputs, functional=True)
    after = _saved(model, inputs)
    measured = report.measured
    assert after <= before and (measured["baseline_bytes"], measured["patched_bytes"]) == (before, after), str(report)
    left = {e.path.rsplit(".", 1)[-1]: e.reason for e in report.left}
    if name == "bloom":      # BloomGelu: no rule names it; the probe finds gelu_tanh, and it frees bytes
        assert any(r.old.endswith("BloomGelu") and r.freed > 0 for r in report.replaced), str(report)
    elif name == "mamba":    # its slow path calls F.silu itself: the module is never called, the route is
        assert "never called" in left["act"] and report.functional.startswith("routed")
    elif name in ("phi3", "mixtral"):     # gate_up fused: kept, with the chunks copied
        fused = [r for r in report.replaced if "fused projection" in r.note]   # a unit's own bytes where it is one
        assert fused and all(r.freed > 0 if len(fused) == 1 else r.freed is None for r in fused), str(report)
    else:
        assert "dropout after it" in left["activation_fn"]
    invact.unpatch(model)
    assert _saved(model, inputs) == before


def test_copied_chunks_change_no_gradient():
    """The copies are exact: with the chunks copied (example=) and without (class rules, the same invact
    SiLU on the same values) every gradient is bit for bit the same."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    grads = []
    for example in (x, None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), FusedGLU())
        invact.patch(model, example=example)
        assert isinstance(model[1].act, invact.SiLU) and ("_invact_chunks" in model[1].__dict__) == (example is not None)
        model(x).pow(2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("made_inside", [False, True], ids=["example made before", "example made inside"])
def test_example_measured_under_inference_mode(made_inside):
    """patch(example=) called inside torch.inference_mode() measures the training forward as it does under
    no_grad (inference mode hid every save: 0 -> 0 bytes, GELU left); an input made inside inference mode
    is measured from a normal copy (autograd cannot save an inference tensor). Exact byte counts: the
    float32 GELU input of 4 x 32 elements (512 bytes) freed, its 1-bit code (16 bytes) added."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 8)
    with torch.inference_mode():
        report = invact.patch(model, example=torch.randn(4, 8) if made_inside else x)
    assert isinstance(model[1], invact.GELU) and not report.left
    assert report.replaced[0].freed == 4 * 32 * 4 - 16
    model(x).sum().backward()                     # the model trains afterwards, outside inference mode
    assert not any(p.is_inference() for p in model.parameters())
