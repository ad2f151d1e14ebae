"""invact.memory: bytes saved for backward, de-duplicated by storage, split per module.

Expected figures are computed from the arithmetic, not copied from a run: for
Linear(256, 1024) -> act -> Linear(1024, 256) on a (64, 256) float32 input (docs/floors.md):
  baseline nn.GELU: x for Linear1 (64*256*4) + h for GELU (64*1024*4) + GELU's output for Linear2
                    (64*1024*4) = 64 + 256 + 256 = 576 KiB;
  invact: x + y (saved by the activation and by Linear2: one storage) + the packed code,
          ceil(n * code_bits / 8) bytes for n = 64*1024 elements = 64 + 256 + 8 = 328 KiB for 1 bit.
Parameters are counted apart (here only W2, which Linear2 needs for the gradient of its input).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import invact
from invact import ops
from invact.saved import format_bytes

B, D, H = 64, 256, 1024
F32 = 4


def _mlp(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), act, nn.Linear(H, D))


def _measure(model, x):
    with invact.memory(model) as m:
        out = model(x)
    return m, out


def test_baseline_gelu_576_kib():
    m, _ = _measure(_mlp(nn.GELU()), torch.randn(B, D))
    assert m.total == B * D * F32 + 2 * B * H * F32 == 576 * 1024
    assert m.by_module == {"1": B * H * F32, "2": B * H * F32, "0": B * D * F32}
    assert m.parameters == D * H * F32              # W2 only: x needs no grad, so Linear1 keeps no W1
    assert m.count == 3


@pytest.mark.parametrize("table", ["gelu", "gelu_tanh", "silu", "mish", "softplus", "elu", "hardswish",
                                   "leaky_relu", "quick_gelu", "relu2"])
def test_patched_saves_output_plus_code(table):
    if table not in ops.names():
        pytest.skip(f"no table {table!r}")
    n = B * H
    bits = ops.info(table)["code_bits"]
    bits = next(b for b in (0, 1, 2, 4, 8) if b >= bits)     # codes are packed at 1, 2, 4 or 8 bits
    m, out = _measure(_mlp(invact.activation(table, backend="eager")), torch.randn(B, D))  # no compile per table
    code = math.ceil(n * bits / 8)
    assert m.total == B * D * F32 + n * F32 + code
    # the activation is charged with y (first saved there) and its code; Linear2's save of y is shared
    assert m.by_module["1"] == n * F32 + code and "2" not in m.by_module
    if table == "gelu":
        assert m.total == 328 * 1024                          # docs/floors.md's figure
    out.sum().backward()                                      # the counted graph is usable


def test_patch_changes_the_count():
    model, x = _mlp(nn.GELU()), torch.randn(B, D)
    if "gelu" not in ops.names():
        pytest.skip("no gelu table")
    base, _ = _measure(model, x)
    invact.patch(model, backend="eager")
    patched, _ = _measure(model, x)
    code = math.ceil(B * H * ops.info("gelu")["code_bits"] / 8)
    assert base.total - patched.total == B * H * F32 - code
    text = patched.compare(base)
    assert "576.00 KiB" in text and "total" in text


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.50 KiB"), (-256 * 1024, "-256.00 KiB"),
                                     (3 * 2**20, "3.00 MiB"), (3 * 2**30, "3.00 GiB")])
def test_one_byte_format(n, text):
    assert format_bytes(n) == text


def test_patch_reasons_write_bytes_as_memory_does():
    """A GELU before a dropout is left by invact.patch, its reason quoting what it frees (its input h, B*H*4 =
    256 KiB) and adds (its output y plus a 1-bit code, 264 KiB) in invact.memory's units; patch's reasons wrote
    "256.0 KiB" where invact.memory wrote "256.00 KiB"."""
    if "gelu" not in ops.names() or ops.info("gelu")["code_bits"] != 1:
        pytest.skip("needs a gelu table of 1-bit codes")
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Dropout(0.1), nn.Linear(H, D)), torch.randn(B, D)
    swapped = copy.deepcopy(model)
    invact.patch(swapped, backend="eager", force=True)    # left without force: a dropout follows it
    before, _ = _measure(model, x)
    after, _ = _measure(swapped, x)
    freed, added = format_bytes(before.by_module["1"]), format_bytes(after.by_module["1"])
    assert (freed, added) == ("256.00 KiB", "264.00 KiB")
    assert freed in str(before) and added in str(after)
    report = invact.patch(model, example=x, backend="eager")
    assert [l.path for l in report.left] == ["1"], report
    assert f"frees {freed}, adds {added}" in report.left[0].reason, report


def test_dedup_by_storage_and_views():
    a = torch.randn(1000, requires_grad=True)
    with invact.memory() as m:
        b = a * 2                       # a product with a Python number saves nothing
        c = b * b                       # saves b (twice: the same storage)
        keep = [b[10:20].exp(),             # saves its output (a new storage of 10 floats)
                b.view(10, 100) * c.view(10, 100)]  # saves views of b and c: b counted once
    assert m.total == 1000 * F32 * 2 + 10 * F32
    assert m.tensors >= 5 and m.count == 3
    assert all(t.requires_grad for t in keep)       # the graphs (and their saved storages) are alive


def test_parameters_apart_without_model():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    h = x * torch.ones(3, 8, requires_grad=True)     # needs grad, not a leaf: Linear saves W for it
    with invact.memory() as m:
        lin(h)
    assert m.parameters == 8 * 4 * F32              # the weight (a leaf that requires grad), via its view
    assert m.total == 3 * 8 * F32
    assert list(m.by_module) == ["Linear#0"]


def test_outside_modules_and_hooks_removed():
    model = _mlp(nn.GELU())
    x = torch.randn(B, D, requires_grad=True)
    with invact.memory(model) as m:
        y = model(x)
        loss = (y * y).sum()                    # outside any module: saves y (a new storage)
    assert m.by_module["<outside>"] == B * D * F32 and loss.requires_grad
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert "saved for backward" in str(m) and "<outside>" in str(m)
    with invact.memory(model) as m2:
        with torch.no_grad():
            model(x)
    assert m2.total == 0 and m2.count == 0


def test_exception_inside_forward_unwinds():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")
    model = nn.Sequential(nn.Linear(2, 2), Boom())
    with pytest.raises(RuntimeError, match="boom"):
        with invact.memory(model) as m:
            model(torch.randn(1, 2))
    packed = m.tensors
    a = torch.randn(3, requires_grad=True)
    (a * a).sum()                                   # the saved-tensor hooks are gone too
    assert m.tensors == packed
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    with pytest.raises(TypeError, match="model"):
        invact.memory("model")
