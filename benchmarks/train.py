"""Training is unchanged: a byte-level GPT-2 trained on the Python standard library's own sources,
baseline against invact.patch, in float32 and under CPU bfloat16 autocast.

    python benchmarks/train.py [--steps N] [--dtypes float32,bfloat16] [--seeds 0,...,11] [--quick | --full]
                              [--threads N] [--no-norms] [--bias-dgamma FACTOR]

Per dtype and seed (the seed sets the initial weights and the batch order) three runs: the baseline,
the patched model and the nudged baseline (every weight moved one ulp: see ALPHA). Final losses: the
mean training loss of the last 20 steps and the loss on fixed held-out text. Verdict per dtype: the
paired signed-rank tests (ALPHA) find the patched runs' final losses neither further from the
baseline's than the nudged runs' nor shifted either way, and in every seed the step-0 gradients (same
weights, same batch) differ by no more than the information floor allows (FloorProbe, NormProbe).
Final losses alone cannot judge gradients: with every branch code inverted (f' wrong on half the
elements) final losses stay within the seed spread, and under AdamW a gradient tensor scaled by a
constant leaves training unchanged (the update divides by the gradient's own scale); the gradient
check fails both. ``--bias-dgamma 1.01`` shows it: the verdict FAILs. Exit status 1 if any check
fails. Tests: tests/test_train.py (shorter runs, a step-by-step bound on the loss curve, the tests'
exact p-values).
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

# Verdict on the final losses, paired per seed. Training is chaotic: a rounding-level change (one
# float32 ulp on every weight) moves a final loss by up to the seed spread (README, "Training is
# unchanged"), so a single patched copy of one seed falls outside n seeds' [min, max] with probability
# about 2 / (n + 1) whatever invact does. Instead, per seed, the patched run and a "nudged" baseline
# (every weight moved one float32 ulp, up or down at random: a change with no direction) are
# compared with the same baseline: d = patched - baseline, p = nudged - baseline. The null hypothesis
# is that invact's backward acts like such a rounding-level change, i.e. that d and p are exchangeable
# within each seed; then |d| - |p| and d - p are symmetric about 0 and the exact Wilcoxon signed-rank
# test applies with no assumption on the (heavy-tailed) distribution of the drift:
#   size: |d| - |p| not shifted upwards (one-sided), so the patched runs drift no further than nudged ones;
#   bias: d - p not shifted either way (two-sided), so invact moves the loss neither up nor down.
# Each test rejects at ALPHA; with 2 tests x 2 losses x 2 dtypes, a correct backward FAILs with
# probability <= 8 ALPHA. An exact signed-rank test over n pairs cannot reach p < 2^-n (one-sided), so
# ALPHA needs n >= 10 pairs (11 for the two-sided test): MIN_SEEDS.
ALPHA = 1e-3
MIN_SEEDS = 11
LAST = 20                     # training steps averaged for the final training loss
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Setup:
    """Model size, data and optimiser of one comparison (the default run's)."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 2
    ctx: int = 64
    batch: int = 16
    steps: int = 150
    lr: float = 3e-3
    optimizer: str = "adamw"          # "adamw" or "sgd" (plain SGD: a linear update, used by the test)
    activation: str = "gelu"          # GPT2Config.activation_function (gelu, gelu_new, silu, ...)
    eval_batches: int = 8
    train_bytes: int = 500_000


QUICK = replace(Setup(), batch=8, steps=60, train_bytes=200_000, eval_batches=4)
FULL = Setup(n_embd=128, n_head=4, ctx=128, steps=300, train_bytes=1_000_000)    # the README's earlier runs


@dataclass
class Run:
    """One training run: per-step losses and gradient norms, the held-out loss, wall time."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    first_grads: list[Tensor] = field(default_factory=list)     # each parameter's gradient of step 0
    eval_loss: float = math.nan
    seconds: float = 0.0

    @property
    def first_grad(self) -> Tensor:
        """All parameters' gradients of step 0, flattened."""
        return torch.cat([g.flatten() for g in self.first_grads])

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
        if not run.first_grads:
            run.first_grads = [g.clone() for g in grads]
        run.losses.append(loss.float().item())
        opt.step()
    run.eval_loss = evaluate(model, eval_data, setup, dtype)
    run.seconds = time.perf_counter() - start
    return run


class FloorProbe:
    """Hooks on a baseline model's activation modules (``paths``) for its first ``steps`` backward
    passes: the relative gradient error that the information floor (docs/floors.md) allows invact there.

    An activation input x whose output y is stored in y's dtype is known only within dy = ulp(y) plus
    the stored y's own error |y - f(x)| measured in float64 (PyTorch's forward is not correctly
    rounded on every CPU: docs/floors.md, "Information floor" 3), so f'(x) rebuilt from y may be off by delta(x) = min(|f''| dy / |f'|, sqrt(2 |f''| dy)) (first order;
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
    y in) for their first backward pass: the relative gradient error invact.norm_bounds.error_bound allows
    there (recovering x_hat from y rounded to that dtype): invact.norm_bounds.relative_bound, the sum over dx,
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
        from invact.norm_bounds import relative_bound
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
    """||a - b|| / ||b|| in float64 (0 where both are 0)."""
    diff, ref = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return diff / ref if ref else (math.inf if diff else 0.0)


def nudge(model: nn.Module, seed: int) -> nn.Module:
    """Move every floating-point weight of ``model`` by one ulp of its dtype, up or down at random (a
    generator seeded by ``seed``): a rounding-level change with no direction, the verdict's reference."""
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    with torch.no_grad():
        for w in model.parameters():
            if w.is_floating_point():
                up = torch.rand(w.shape, generator=gen) < 0.5
                w.copy_(torch.nextafter(w, torch.where(up, math.inf, -math.inf).to(w.dtype)))
    return model


def signed_rank(diffs: list[float]) -> tuple[float, float]:
    """Exact Wilcoxon signed-rank test of "``diffs`` are symmetric about 0": (P[W >= w], P[W <= w]) for the
    observed sum w of the ranks of the positive differences, W its null distribution (each sign + or -
    with probability 1/2, independently). Zeros are dropped, tied |diffs| share their mean rank."""
    nz = sorted((abs(v), v > 0) for v in diffs if v != 0)
    ranks: list[int] = []                         # twice the mid-ranks, so that they are integers
    i = 0
    while i < len(nz):
        j = i
        while j < len(nz) and nz[j][0] == nz[i][0]:
            j += 1
        ranks += [i + j + 1] * (j - i)            # 2 x mean of the ranks i+1..j
        i = j
    observed = sum(r for r, (_, pos) in zip(ranks, nz) if pos)
    counts = {0: 1}
    for r in ranks:
        nxt = dict(counts)
        for w, c in counts.items():
            nxt[w + r] = nxt.get(w + r, 0) + c
        counts = nxt
    total = 2 ** len(ranks)
    return (sum(c for w, c in counts.items() if w >= observed) / total,
            sum(c for w, c in counts.items() if w <= observed) / total)


@dataclass
class Pair:
    """One seed: the baseline, the patched and the nudged run (same data order, same initial weights up
    to the nudge) and the step-0 gradient check's bound."""

    seed: int
    baseline: Run
    patched: Run
    nudged: Run
    grad_bound: float = math.inf           # FloorProbe + NormProbe: allowance for the first step's gradient

    @property
    def grad_error(self) -> float:
        """The largest relative difference of one parameter's gradient at step 0 (same weights, same batch).
        Per parameter, not of the whole gradient: a 1 % error in one norm's dgamma moves the whole
        gradient by 0.01 x its share, 6e-6 to 9e-5 here, inside the bound; per parameter it is 0.01. The
        whole gradient's bound serves each parameter (the same estimate: a relative error of the gradient
        flowing into a layer is at most the sum of the layers' below it, and moves that layer's
        parameter gradients relatively as much); measured, patched fp32 runs stay under 1e-6 per
        parameter against bounds of ~1e-4, bf16 under 3e-3 against ~0.3."""
        return max(relative_difference(a, b) for a, b in zip(self.patched.first_grads, self.baseline.first_grads))

    def diffs(self, metric: str) -> tuple[float, float]:
        """(patched - baseline, nudged - baseline) of ``metric``: "final" or "eval_loss"."""
        value = (lambda r: r.final()) if metric == "final" else (lambda r: r.eval_loss)
        return value(self.patched) - value(self.baseline), value(self.nudged) - value(self.baseline)


METRICS = {"final": f"last-{LAST} mean", "eval_loss": "held-out"}


@dataclass
class Comparison:
    """All seeds' pairs for one dtype, and the verdict."""

    dtype: str
    pairs: list[Pair]
    replaced: int
    alpha: float = ALPHA

    def tests(self, metric: str) -> tuple[float, float]:
        """p-values (size, bias) of the paired signed-rank tests (see ALPHA) on ``metric``."""
        d, p = zip(*(pair.diffs(metric) for pair in self.pairs))
        size = signed_rank([abs(a) - abs(b) for a, b in zip(d, p)])[0]
        bias = min(1.0, 2 * min(signed_rank([a - b for a, b in zip(d, p)])))
        return size, bias

    @property
    def gradients_ok(self) -> bool:
        return all(p.grad_error <= p.grad_bound for p in self.pairs)

    @property
    def ok(self) -> bool:
        return (self.replaced > 0 and self.gradients_ok
                and all(v >= self.alpha for m in METRICS for v in self.tests(m)))


def compare(setup: Setup, seeds: list[int], dtype: str, data: tuple[Tensor, Tensor], norms: bool = True,
            bias_dgamma: float | None = None, backend: str | None = None) -> Comparison:
    """For every seed: the baseline (probed at step 0), the patched model (activations, and LayerNorms
    unless ``norms`` is False; invact's ``backend``) and the nudged baseline. ``bias_dgamma``: a deliberate
    error to show that the verdict catches it: the first patched norm's dgamma is multiplied by it."""
    import invact
    from invact import ops
    pairs, replaced = [], 0
    for seed in seeds:
        model = gpt2(setup, seed)
        report = invact.patch(model, norms=norms, backend=backend)
        acts = [r.path for r in report.replaced
                if isinstance(model.get_submodule(r.path), invact.modules.Activation)]
        norm_paths = [r.path for r in report.replaced if r.path not in acts]
        if bias_dgamma is not None:
            if not norm_paths:
                raise ValueError("bias_dgamma needs a patched norm (norms=True)")
            model.get_submodule(norm_paths[0]).weight.register_hook(lambda g: g * bias_dgamma)
        cast = DTYPES[dtype] if dtype != "float32" else None
        stored = {p: cast if cast and model.get_submodule(p).autocast_output else torch.float32 for p in norm_paths}
        eval_error = max((ops.info(model.get_submodule(p).name)["certificate"]["float32_eval_error"] for p in acts),
                         default=0.0)
        first = gpt2(setup, seed)
        probe, norm_probe = FloorProbe(first, acts, eval_error, steps=1), NormProbe(first, stored)
        base = train(first, setup, *data, seed, DTYPES[dtype])
        bound = (probe.per_step()[0] if acts else 0.0) + norm_probe.bound()
        pairs.append(Pair(seed, base, train(model, setup, *data, seed, DTYPES[dtype]),
                          train(nudge(gpt2(setup, seed), seed), setup, *data, seed, DTYPES[dtype]),
                          bound if report.replaced else math.inf))
        replaced = len(report)
    return Comparison(dtype, pairs, replaced)


def _print(c: Comparison) -> None:
    print(f"\n== {c.dtype}: invact.patch replaced {c.replaced} module(s) per model; d = patched - baseline, "
          "p = nudged - baseline")
    print("   seed  baseline final  held-out    d final  d held-out    p final  p held-out   "
          "step-0 gradient difference (bound)")
    for q in c.pairs:
        (df, pf), (de, pe) = q.diffs("final"), q.diffs("eval_loss")
        print(f"   {q.seed:4d}  {q.baseline.final():14.4f}  {q.baseline.eval_loss:8.4f}  {df:+9.2e}  {de:+10.2e}  "
              f"{pf:+9.2e}  {pe:+10.2e}   {q.grad_error:.2g} ({q.grad_bound:.2g})"
              f"{'' if q.grad_error <= q.grad_bound else '  OUTSIDE'}  [{q.baseline.seconds:.0f}s]")
    for metric, label in METRICS.items():
        d, p = zip(*(q.diffs(metric) for q in c.pairs))
        size, bias = c.tests(metric)
        mean = lambda v: sum(v) / len(v)                                    # noqa: E731
        print(f"   {label:<13s} mean |d| {mean([abs(v) for v in d]):.2e} (max {max(map(abs, d)):.2e}), "
              f"mean |p| {mean([abs(v) for v in p]):.2e} (max {max(map(abs, p)):.2e}); mean d {mean(d):+.2e}, "
              f"mean p {mean(p):+.2e}; d != p in {sum(a != b for a, b in zip(d, p))} seeds; "
              f"size test p = {size:.3g}, bias test p = {bias:.3g}  "
              f"{'ok' if min(size, bias) >= c.alpha else 'REJECTED'} (alpha {c.alpha:g})")
    print(f"   step-0 gradients within the bound in every seed: {'yes' if c.gradients_ok else 'NO'}")
    print(f"   verdict {c.dtype}: {'PASS' if c.ok else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, help=f"training steps (default {Setup.steps}; --full {FULL.steps})")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--seeds", default=",".join(map(str, range(12))),
                    help=f"seeds, >= {MIN_SEEDS}; each trains a baseline, a patched and a nudged model")
    ap.add_argument("--activation", default=Setup.activation, help="GPT2Config.activation_function")
    ap.add_argument("--quick", action="store_true", help=f"a tinier model, {QUICK.steps} steps (a minute)")
    ap.add_argument("--full", action="store_true", help=f"a larger model, {FULL.steps} steps (about 35 min "
                    "for the default 72 runs: 25-31 s a run measured on an idle machine)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a busy machine)")
    ap.add_argument("--no-norms", action="store_true", help="patch the activations only (not the LayerNorms)")
    ap.add_argument("--bias-dgamma", type=float, metavar="FACTOR",
                    help="a deliberate error: multiply the first patched norm's dgamma by FACTOR (e.g. 1.01); "
                         "the verdict must FAIL")
    args = ap.parse_args(argv)
    if args.quick and args.full:
        ap.error("--quick and --full exclude each other")
    setup = replace(QUICK if args.quick else FULL if args.full else Setup(), activation=args.activation)
    if args.steps is not None:
        setup = replace(setup, steps=args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or len(set(seeds)) < MIN_SEEDS or setup.steps < LAST:
        ap.error(f"need dtypes from {list(DTYPES)} (got {unknown}), >= {MIN_SEEDS} distinct seeds "
                 f"(got {len(set(seeds))}) and >= {LAST} steps")
    print(f"{setup}\nseeds {seeds}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    data = corpus(setup.train_bytes, setup.eval_batches * setup.batch * setup.ctx)
    start, results = time.perf_counter(), []
    for dtype in dtypes:
        results.append(compare(setup, seeds, dtype, data, not args.no_norms, args.bias_dgamma))
        _print(results[-1])
    ok = all(c.ok for c in results)
    print(f"\n{'PASS' if ok else 'FAIL'} in {time.perf_counter() - start:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
