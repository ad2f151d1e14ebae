"""Training is unchanged: a byte-level GPT-2 trained on the Python standard library's own sources,
baseline against invact.patch, in float32 and under CPU bfloat16 autocast.

    python benchmarks/train.py [--steps 300] [--dtypes float32,bfloat16] [--seeds 0,1,2] [--quick]
                              [--margin 0] [--threads N] [--no-norms]

Per dtype, one baseline run per seed (the seed sets the initial weights and the batch order) gives
the spread of the final losses; the patched run repeats the first seed exactly (same weights, same
batches). Final losses: the mean training loss of the last 20 steps and the loss on fixed held-out
text. Verdict per dtype: each patched final loss lies in the baseline [min, max] (widened by
--margin x (max - min) on each side if asked; see MARGIN), and the step-0 gradients (same weights,
same batch) differ by no more than the information floor allows (FloorProbe). Final losses alone
cannot judge gradients: with every branch code inverted (f' wrong on half the elements) the patched
final losses of --quick still fall inside the spread; the gradient check fails it. Exit status 1 if any
check fails. Tests: tests/test_train.py (a shorter run, plus a step-by-step bound on the loss curve).
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

# Widening of the baseline range, as a fraction of its width, on each side; 0 (the issue's
# criterion: the patched final loss lies within the seed spread) unless --margin asks for more. For n
# exchangeable runs a further independent one falls outside their [min, max] with probability
# 2/(n+1), so the bare range only works because the patched run is not independent: it shares the
# first seed's weights and batches and differs from it only by the backward's error, ~1e-7 relative
# in fp32 (information floor, design.md), which training's sensitivity then amplifies (AdamW, 300
# steps: the curves part by up to 0.06 in fp32, 0.3 in bf16). Seed 0 sets the max of the default
# run, so that drift alone can leave the bare range: with the tables before commit 4a9b3f1 the
# patched final loss landed 0.003 (fp32) and 0.005 (bf16) above it. --margin 0.5 allows such drift
# and still rejects a final loss more than half the seed spread beyond the range. Six seeds, each
# trained unpatched and patched (README, "Training is unchanged"): the differences split 3 / 3 in sign,
# and moving every unpatched weight by one float32 ulp moves a bf16 final loss as far (+0.24) as the
# largest patched difference: drift, no bias.
MARGIN = 0.0
LAST = 20                     # training steps averaged for the final training loss
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Setup:
    """Model size, data and optimiser of one comparison."""

    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    ctx: int = 128
    batch: int = 16
    steps: int = 300
    lr: float = 3e-3
    optimizer: str = "adamw"          # "adamw" or "sgd" (plain SGD: a linear update, used by the test)
    activation: str = "gelu"          # GPT2Config.activation_function (gelu, gelu_new, silu, ...)
    eval_batches: int = 8
    train_bytes: int = 1_000_000


QUICK = Setup(n_embd=64, n_layer=2, n_head=2, ctx=64, batch=8, steps=60, train_bytes=200_000, eval_batches=4)


@dataclass
class Run:
    """One training run: per-step losses and gradient norms, the held-out loss, wall time."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    first_grad: Tensor | None = None            # all parameters' gradients of step 0, flattened
    eval_loss: float = math.nan
    seconds: float = 0.0

    def final(self, last: int = LAST) -> float:
        """Mean training loss of the last ``last`` steps."""
        tail = self.losses[-last:]
        return sum(tail) / len(tail)


def corpus(train_bytes: int, eval_bytes: int) -> tuple[Tensor, Tensor]:
    """(train, held-out) byte tensors from the standard library's top-level ``*.py`` files in name
    order; the held-out text follows the training text. The sources are almost all ASCII, so bytes
    are characters (vocabulary 256, no tokenizer)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    need, parts, size = train_bytes + eval_bytes, [], 0
    for path in sorted(stdlib.glob("*.py")):
        parts.append(path.read_bytes())
        size += len(parts[-1])
        if size >= need:
            break
    data = b"".join(parts)
    if len(data) < need:
        raise ValueError(f"the standard library at {stdlib} has {len(data)} bytes of *.py, need {need}")
    ids = torch.frombuffer(bytearray(data[:need]), dtype=torch.uint8).long()
    return ids[:train_bytes], ids[train_bytes:]


def gpt2(setup: Setup, seed: int) -> nn.Module:
    """A random-init Hugging Face GPT2LMHeadModel (dropout off, so runs are deterministic)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=256, n_positions=setup.ctx, n_embd=setup.n_embd, n_layer=setup.n_layer,
                     n_head=setup.n_head, activation_function=setup.activation, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def batches(data: Tensor, setup: Setup, seed: int) -> Iterator[Tensor]:
    """Random windows of ``ctx`` bytes, in an order fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - setup.ctx, (setup.batch,), generator=gen)
        yield torch.stack([data[s:s + setup.ctx] for s in starts.tolist()])


def _autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


def evaluate(model: nn.Module, data: Tensor, setup: Setup, dtype: torch.dtype) -> float:
    """Mean loss over consecutive held-out windows (the same for every run)."""
    n = setup.eval_batches * setup.batch
    windows = data[:n * setup.ctx].view(n, setup.ctx)
    with torch.no_grad(), _autocast(dtype):
        losses = [model(x, labels=x).loss.float().item() for x in windows.split(setup.batch)]
    return sum(losses) / len(losses)


def train(model: nn.Module, setup: Setup, train_data: Tensor, eval_data: Tensor, seed: int,
          dtype: torch.dtype) -> Run:
    """Train ``model`` for ``setup.steps`` steps on batches ordered by ``seed``; loss under autocast
    when ``dtype`` is not float32 (weights and optimiser stay float32)."""
    if setup.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=setup.lr)
    elif setup.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=setup.lr)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {setup.optimizer!r}")
    run, start = Run(), time.perf_counter()
    model.train()
    for _, x in zip(range(setup.steps), batches(train_data, setup, seed)):
        opt.zero_grad(set_to_none=True)
        with _autocast(dtype):
            loss = model(x, labels=x).loss
        loss.backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        run.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        if run.first_grad is None:
            run.first_grad = torch.cat(grads)
        run.losses.append(loss.float().item())
        opt.step()
    run.eval_loss = evaluate(model, eval_data, setup, dtype)
    run.seconds = time.perf_counter() - start
    return run


class FloorProbe:
    """Hooks on a baseline model's activation modules (``paths``) for its first ``steps`` backward
    passes: the relative gradient error that the information floor (design.md) allows invact there.

    An activation input x whose output y is stored in y's dtype is known only within dy = ulp(y) plus
    the stored y's own error |y - f(x)| measured in float64 (PyTorch's forward is not correctly
    rounded on every CPU: design.md, "Information floor" 3), so f'(x) rebuilt from y may be off by delta(x) = min(|f''| dy / |f'|, sqrt(2 |f''| dy)) (first order;
    the square root next to a branch point, where f' = 0) plus the table's certified float32 evaluation
    error plus 16 eps |f'| (rounding of g and of PyTorch's own backward, as in tests/test_modules.py).
    Per layer that is ||delta * grad_y|| / ||grad_x|| relative to the gradient the layer sends back;
    summed over layers it bounds the relative error of the whole gradient if the backward maps do not
    amplify it (an estimate, as in tests/test_patching.py).
    """

    def __init__(self, model: nn.Module, paths: list[str], eval_error: float, steps: int | None = None) -> None:
        self.acts = [model.get_submodule(p) for p in paths]
        self.eval_error, self.limit = eval_error, None if steps is None else steps * len(paths)
        self.inputs: dict[int, Tensor] = {}
        self.ratios: list[float] = []
        self.handles = [h for m in self.acts for h in (m.register_forward_hook(self._forward),
                                                       m.register_full_backward_hook(self._backward))]

    def _forward(self, mod: nn.Module, args: tuple, out: Tensor) -> None:
        if self.limit is not None and len(self.ratios) >= self.limit:
            for h in self.handles:
                h.remove()
        elif torch.is_grad_enabled():
            self.inputs[id(mod)] = args[0].detach()

    def _backward(self, mod: nn.Module, grad_x: tuple, grad_y: tuple) -> None:
        x = self.inputs.pop(id(mod), None)
        if x is None:
            return
        f = mod.forward                                      # not mod(...): that would run these hooks
        x64 = x.double().requires_grad_()
        with torch.enable_grad():
            (d1,) = torch.autograd.grad(f(x64).sum(), x64, create_graph=True)
            (d2,) = torch.autograd.grad(d1.sum(), x64)
        y = f(x)
        with torch.no_grad():
            off = (y.double() - f(x.double())).abs()                 # the stored y's own error, measured
        y = y.abs()
        dy = (torch.nextafter(y, y.new_tensor(math.inf)) - y).double() + off             # ulp(y) + error
        d1, d2 = d1.detach().abs(), d2.abs()
        eps = torch.finfo(x.dtype).eps
        delta = torch.minimum(d2 * dy / d1, (2 * d2 * dy).sqrt()) + self.eval_error + 16 * eps * d1
        gy, gx = grad_y[0].double(), grad_x[0].double()
        self.ratios.append(((delta * gy).norm() / gx.norm()).item())

    def per_step(self) -> list[float]:
        """Allowed relative error of the whole gradient, per recorded step."""
        n = len(self.acts)
        return [sum(self.ratios[i:i + n]) for i in range(0, len(self.ratios), n)]


class NormProbe:
    """Hooks on a baseline model's norm modules (``dtypes``: path -> the dtype invact's replacement stores
    y in) for their first backward pass: the relative gradient error invact.norms.error_bound allows
    there (recovering x_hat from y rounded to that dtype): invact.norms.relative_bound, the sum over dx,
    dgamma and dbeta of ||bound|| / ||gradient||, summed over layers like FloorProbe's ratios (an estimate
    of the whole gradient's)."""

    def __init__(self, model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
        self.mods = {model.get_submodule(p): dt for p, dt in dtypes.items()}
        self.inputs: dict[int, Tensor] = {}
        self.ratios: list[float] = []
        self.handles = [h for m in self.mods for h in (m.register_forward_hook(self._forward),
                                                       m.register_full_backward_hook(self._backward))]

    def _forward(self, mod: nn.Module, args: tuple, out: Tensor) -> None:
        if torch.is_grad_enabled() and id(mod) not in self.inputs and len(self.ratios) < len(self.mods):
            self.inputs[id(mod)] = (args[0].detach(), out.detach())

    def _backward(self, mod: nn.Module, grad_x: tuple, grad_y: tuple) -> None:
        from invact.norms import relative_bound
        saved = self.inputs.pop(id(mod), None)
        if saved is not None:
            x, y = saved
            self.ratios.append(relative_bound(mod, x, y.to(self.mods[mod]), grad_y[0]))

    def bound(self) -> float:
        """Allowed relative error of the first step's gradient from the norms; hooks removed."""
        for h in self.handles:
            h.remove()
        return sum(self.ratios[:len(self.mods)])


def relative_difference(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@dataclass
class Comparison:
    """Baseline runs (one per seed) and the patched run of the first seed, for one dtype."""

    dtype: str
    baseline: list[Run]
    patched: Run
    replaced: int
    grad_bound: float = math.inf         # FloorProbe's allowance for the first step's gradient

    @property
    def grad_error(self) -> float:
        """Relative difference of the first step's gradients (same weights, same batch)."""
        return relative_difference(self.patched.first_grad, self.baseline[0].first_grad)

    def spread(self, metric: str) -> tuple[float, float]:
        values = [getattr(r, metric)() if metric == "final" else getattr(r, metric) for r in self.baseline]
        return min(values), max(values)

    margin: float = MARGIN               # widening of the spread on each side, x (max - min)

    def inside(self, metric: str, margin: float | None = None) -> bool:
        margin = self.margin if margin is None else margin
        lo, hi = self.spread(metric)
        value = self.patched.final() if metric == "final" else self.patched.eval_loss
        return lo - margin * (hi - lo) <= value <= hi + margin * (hi - lo)

    @property
    def ok(self) -> bool:
        return (self.replaced > 0 and self.grad_error <= self.grad_bound
                and self.inside("final") and self.inside("eval_loss"))


def compare(setup: Setup, seeds: list[int], dtype: str, data: tuple[Tensor, Tensor],
            norms: bool = True) -> Comparison:
    """Baseline runs for every seed (the first probed at step 0), then the patched run of the first
    (activations, and LayerNorms unless ``norms`` is False)."""
    import invact
    from invact import ops
    model = gpt2(setup, seeds[0])
    report = invact.patch(model, norms=norms)
    paths = [r.path for r in report.replaced if isinstance(model.get_submodule(r.path), invact.modules.Activation)]
    cast = DTYPES[dtype] if dtype != "float32" else None
    stored = {r.path: cast if cast and model.get_submodule(r.path).autocast_output else torch.float32
              for r in report.replaced if r.path not in paths}           # the norms' y dtype
    eval_error = max((ops.info(model.get_submodule(p).name)["certificate"]["float32_eval_error"] for p in paths),
                     default=0.0)
    first = gpt2(setup, seeds[0])
    probe = FloorProbe(first, paths, eval_error, steps=1)
    norm_probe = NormProbe(first, stored)
    runs = [train(first, setup, *data, seeds[0], DTYPES[dtype])]
    bound = (probe.per_step()[0] if paths else 0.0) + norm_probe.bound()
    runs += [train(gpt2(setup, s), setup, *data, s, DTYPES[dtype]) for s in seeds[1:]]
    patched = train(model, setup, *data, seeds[0], DTYPES[dtype])
    return Comparison(dtype, runs, patched, len(report), bound if report.replaced else math.inf)


def _print(c: Comparison, seeds: list[int]) -> None:
    steps = len(c.patched.losses)
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    print(f"\n== {c.dtype}: invact.patch replaced {c.replaced} module(s)")
    print("   training loss at step " + "  ".join(f"{m:>7d}" for m in marks))
    for name, run in [(f"baseline seed {s}", r) for s, r in zip(seeds, c.baseline)] + [("patched", c.patched)]:
        print(f"   {name:<20s} " + "  ".join(f"{run.losses[m]:7.4f}" for m in marks)
              + f"   final {run.final():.4f}  held-out {run.eval_loss:.4f}  [{run.seconds:.0f}s]")
    same = max(abs(a - b) for a, b in zip(c.baseline[0].losses, c.patched.losses))
    print(f"   largest |patched - baseline seed {seeds[0]}| over the curve: {same:.3g}")
    print(f"   step-0 gradient (same weights and batch): relative difference {c.grad_error:.3g}, "
          f"information-floor bound {c.grad_bound:.3g}  {'inside' if c.grad_error <= c.grad_bound else 'OUTSIDE'}")
    for metric, label, value in (("final", f"last-{LAST} mean", c.patched.final()),
                                 ("eval_loss", "held-out", c.patched.eval_loss)):
        lo, hi = c.spread(metric)
        w = c.margin * (hi - lo)
        print(f"   {label:<13s} baseline [{lo:.4f}, {hi:.4f}] (+-{w:.4f} margin)  patched {value:.4f}  "
              f"{'inside' if c.inside(metric) else 'OUTSIDE'}")
    print(f"   verdict {c.dtype}: {'PASS' if c.ok else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, help=f"training steps (default {Setup.steps}; --quick {QUICK.steps})")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--seeds", default="0,1,2", help="baseline seeds; the patched run uses the first")
    ap.add_argument("--activation", default=Setup.activation, help="GPT2Config.activation_function")
    ap.add_argument("--quick", action="store_true", help="a tiny model and 60 steps (about a minute)")
    ap.add_argument("--margin", type=float, default=MARGIN,
                    help="widen the baseline spread by this fraction of its width on each side (default 0)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a busy machine)")
    ap.add_argument("--no-norms", action="store_true", help="patch the activations only (not the LayerNorms)")
    args = ap.parse_args(argv)
    setup = replace(QUICK if args.quick else Setup(), activation=args.activation)
    if args.steps is not None:
        setup = replace(setup, steps=args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or len(seeds) < 2 or setup.steps < LAST or args.margin < 0:
        ap.error(f"need dtypes from {list(DTYPES)} (got {unknown}), >= 2 seeds, >= {LAST} steps and --margin >= 0")
    print(f"{setup}\nseeds {seeds}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    data = corpus(setup.train_bytes, setup.eval_batches * setup.batch * setup.ctx)
    start, results = time.perf_counter(), []
    for dtype in dtypes:
        results.append(replace(compare(setup, seeds, dtype, data, not args.no_norms), margin=args.margin))
        _print(results[-1], seeds)
    print(f"\n{'PASS' if all(c.ok for c in results) else 'FAIL'} in {time.perf_counter() - start:.0f}s")
    return 0 if all(c.ok for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
