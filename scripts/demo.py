"""`make demo`: fit GELU from its formula, certify it, generate kernels, patch a small GPT-2, train it
a few steps on real text, and report saved memory, gradient agreement and an error-curve PNG.

Runs in a temporary tree for the fit (the repository's generated/ is never touched); the patched
model uses the committed tables. About 25 s on 2 cores after `make setup` (22-25 s measured, 86-100 s
while other jobs kept the load at 4-5).
"""

from __future__ import annotations

import argparse
import copy
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

GELU_FORMULA = "x*(1 + erf(x/sqrt(2)))/2"


def stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def fit_and_generate(out_dir: Path, samples: int) -> dict:
    from invact.fitting.codegen import generate_all
    from invact.fitting.formulas import get_spec
    from invact.fitting.pipeline import build_table
    from invact.fitting.tables import table_path, write_table

    t0 = stage(f"1. fit GELU from its formula  {GELU_FORMULA}")
    spec = get_spec(GELU_FORMULA, name="demo_gelu")
    table = build_table(spec, fp32_samples=samples, progress=lambda m: print("   ", m, flush=True))
    root = out_dir / "tree"
    write_table(table, table_path("demo_gelu", root=root))
    cert = table["certificate"]
    print(f"   branches {table['n_branches']}, code bits {table['code_bits']}, pieces "
          f"{[b['pieces'] for b in table['branches']]}, degrees {[b['degrees'] for b in table['branches']]}")
    print(f"   certified: approximation error {cert['approx_error']:.3g} (rigorous, Arb), float32 evaluation "
          f"{cert['float32_eval_error']:.3g} ({', '.join(cert['checks'])})  [{time.monotonic() - t0:.1f}s]")
    t0 = stage("2. generate torch and Triton code from the table")
    paths = generate_all(root)
    for p in paths:
        print("   wrote", p.relative_to(root))
    print(f"   [{time.monotonic() - t0:.1f}s]")
    return table


def text_corpus(n_chars: int) -> str:
    """Real text present on every machine: the Python standard library's own sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= n_chars:
            break
    return "".join(parts)[:n_chars]


def tiny_gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=128, n_layer=2, n_head=4,
                     activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def train_patched_gpt2(steps: int) -> None:
    import invact

    t0 = stage("3. patch a small GPT-2 and train it on the standard library's source text")
    text = text_corpus(400_000)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:200_000]], dtype=torch.long)
    base = tiny_gpt2(len(chars))
    patched = copy.deepcopy(base)
    report = invact.patch(patched)
    print("   " + str(report).replace("\n", "\n   "))

    gen = torch.Generator().manual_seed(1)
    batch = lambda: torch.stack([ids[i:i + 128] for i in torch.randint(0, len(ids) - 129, (16,), generator=gen)])  # noqa: E731

    x = batch()
    with invact.memory(base) as before:
        loss_b = base(x, labels=x).loss
    loss_b.backward()
    with invact.memory(patched) as after:
        loss_p = patched(x, labels=x).loss
    loss_p.backward()
    worst = max((pb.grad - pp.grad).abs().max().item() for pb, pp in zip(base.parameters(), patched.parameters()))
    scale = max(pb.grad.abs().max().item() for pb in base.parameters())
    print(f"   saved for backward: baseline {before.total / 2**20:.2f} MiB, patched {after.total / 2**20:.2f} MiB "
          f"({(after.total - before.total) / before.total:+.1%})")
    print(f"   largest gradient difference {worst:.3g} (largest gradient {scale:.3g}); loss "
          f"{loss_b.item():.6f} vs {loss_p.item():.6f}")

    opt_b = torch.optim.AdamW(base.parameters(), lr=3e-3)
    opt_p = torch.optim.AdamW(patched.parameters(), lr=3e-3)
    for step in range(steps):
        x = batch()
        for model, opt in ((base, opt_b), (patched, opt_p)):
            opt.zero_grad()
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            if model is base:
                lb = loss.item()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"   step {step:3d}  loss baseline {lb:.4f}  patched {loss.item():.4f}", flush=True)
    print(f"   [{time.monotonic() - t0:.1f}s]")


def error_curve_png(table: dict, path: Path) -> None:
    from invact.fitting.plot import plot_error_curves
    t0 = stage("4. error curve")
    plot_error_curves(table, path)
    print(f"   wrote {path}  [{time.monotonic() - t0:.1f}s]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    ap.add_argument("--samples", type=int, default=2**24, help="fp32 samples per branch in certification")
    ap.add_argument("--png", type=Path, default=Path("gelu_error_curve.png"), help="where to write the plot")
    args = ap.parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="invact-demo-") as tmp:
        table = fit_and_generate(Path(tmp), args.samples)
    train_patched_gpt2(args.steps)
    error_curve_png(table, args.png)
    print(f"\ndone in {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
