"""Patched models under DistributedDataParallel and FSDP2 (``fully_shard``): gloo, 2 processes on CPU.

Two worker processes (this file run as a script, rendezvous through a FileStore in a temporary
directory: no ports) train a small MLP (nn.GELU, nn.SiLU), the same MLP with an nn.LayerNorm and an
nn.RMSNorm in front of its second and third Linears ("norm", patched with ``norms=True``: activations
and norms), and a tiny Hugging Face GPT-2 (NewGELU, patched with ``norms=False``) for two SGD steps,
each rank on its half of the batch, unpatched and ``invact.patch``-ed, wrapped in DDP and in FSDP2
(FSDP1 refuses CPU-only machines: "FSDP needs a non-CPU accelerator device").
Every rank records, per step, the full parameters before the step and the full (all-reduced,
for FSDP2 gathered) gradients. The parent checks against a single-process full-batch reference
computed from the same parameters with the unpatched model (the mean loss over the full batch is
the mean of the two ranks' mean losses, which is what DDP's and FSDP2's averaging computes):

* ranks agree bitwise: parameters before each step and gradients (one all-reduce result, applied by
  identical optimisers);
* unpatched, distributed vs reference: only fp32 rounding differs — the batch reduction split in two
  halves plus the all-reduce's single addition (the division by the world size 2 is exact), and GEMM
  blocking for other shapes. Each gradient element is a sum of at most N = 128 products (batch rows
  or features), so we allow gamma_N = N * u = 7.6e-6 of the gradient's norm (u = 2^-24) plus the
  per-module absolute floor of tests/test_patching.py (1e-6 of the module's largest gradient norm)
  for gradients that are zero in exact arithmetic, pure rounding noise;
* patched, distributed vs reference: additionally the activations' f' error, bounded as in
  tests/test_patching.py by DELTA * sum_l ||grad_y_l|| / ||grad_x_l|| of the gradient's norm
  (DELTA = tests/tolerances.py's derivative_error: the per-element f' bound of gelu, gelu_tanh and
  silu measured from the y PyTorch's forward stores on this CPU, 1.45e-4 on an AVX-512 EPYC), the ratios
  measured on the reference; for the "norm" model plus the norms' share, summed the same way over the
  norm layers: ||bound(dx)|| / ||dx|| + ||bound(dgamma)|| / ||dgamma|| (+ dbeta) with the per-element
  bounds of invact.norm_bounds.error_bound (tests/test_norms.py's bound: recovering x_hat from the stored y),
  evaluated on the reference's x, gamma, beta, incoming gradient and y (as benchmarks/train.py's
  NormProbe). A distributed fault (a missing or doubled all-reduce, a wrong shard,
  unsynchronised ranks) is off by O(1) and fails by orders of magnitude;
* memory: the patched MLP saves, per rank, exactly 2 * (4n - n/8) bytes fewer (n = rows * hidden:
  each activation keeps y, shared with the next Linear, plus a 1-bit code, instead of its input);
  the patched "norm" model saves exactly what the patched MLP saves plus, per norm, its y (the next
  Linear's input, one storage) and a float32 rstd per row, and the LayerNorm's one kept column (x_hat
  in float32 and its int64 index: gamma_0 = 0 cannot be recovered from y), never the norms' inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

WORLD = 2
STEPS = 2
LR = 0.1
U32 = 2.0 ** -24                 # fp32 unit roundoff
N_RED = 128                      # longest reduction (rows or features) in these models
DELTA_TABLES = ("gelu", "gelu_tanh", "silu")  # DELTA: their per-element f' bound (tolerances.derivative_error)
TIMEOUT = 120                    # seconds for all workers (they take ~10 s); gloo's own timeout is 60 s
MLP_ROWS, MLP_IN, MLP_HIDDEN = 64, 16, 64
GPT_BATCH, GPT_SEQ, GPT_VOCAB = 4, 16, 101
KINDS = ("mlp", "norm", "gpt2")  # gpt2 only where transformers is installed (a dev dependency)
WRAPS = ("ddp", "fsdp2")


# -- models and data (identical in the workers and the parent) -----------------------------------

def _build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(MLP_IN, MLP_HIDDEN), nn.GELU(), nn.Linear(MLP_HIDDEN, MLP_HIDDEN),
                             nn.SiLU(), nn.Linear(MLP_HIDDEN, MLP_IN))
    if kind == "norm":                                       # pre-norms: each norm's y is the next Linear's input
        model = nn.Sequential(nn.Linear(MLP_IN, MLP_HIDDEN), nn.GELU(), nn.LayerNorm(MLP_HIDDEN),
                              nn.Linear(MLP_HIDDEN, MLP_HIDDEN), nn.SiLU(), nn.RMSNorm(MLP_HIDDEN),
                              nn.Linear(MLP_HIDDEN, MLP_IN))
        with torch.no_grad():                                # trained-like gamma and beta, not the init's 1, 0
            for norm in (model[2], model[5]):
                norm.weight.copy_(1 + 0.3 * torch.randn(MLP_HIDDEN))
            model[2].bias.copy_(0.1 * torch.randn(MLP_HIDDEN))
            model[2].weight[0] = 0.0                         # a kept column (x_hat saved) across ranks
        return model
    import transformers
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=GPT_SEQ, vocab_size=GPT_VOCAB,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _batch(kind: str, step: int, rank: int | None = None):
    """The full batch of ``step``, or rank ``rank``'s contiguous half of it."""
    g = torch.Generator().manual_seed(1000 + step)
    if kind in ("mlp", "norm"):
        data = (torch.randn(MLP_ROWS, MLP_IN, generator=g), torch.randn(MLP_ROWS, MLP_IN, generator=g))
    else:
        data = (torch.randint(0, GPT_VOCAB, (GPT_BATCH, GPT_SEQ), generator=g),)
    if rank is None:
        return data
    return tuple(t.chunk(WORLD)[rank] for t in data)


def _loss(kind: str, model: nn.Module, batch) -> torch.Tensor:
    """Mean loss over the batch: the mean over ranks of equal halves is the full-batch mean."""
    if kind in ("mlp", "norm"):
        x, target = batch
        return (model(x) - target).square().mean()
    return model(input_ids=batch[0], labels=batch[0]).loss


def _activation_kinds(kind: str) -> tuple[type, ...]:
    if kind in ("mlp", "norm"):
        return nn.GELU, nn.SiLU
    from transformers.activations import NewGELUActivation
    return (NewGELUActivation,)


# -- the worker: `python tests/test_distributed.py RANK DIR mlp,gpt2` ------------------------------------

def _wrap(kind: str, wrap: str, model: nn.Module) -> nn.Module:
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    blocks = [m for m in model if isinstance(m, nn.Linear)] if kind != "gpt2" else list(model.transformer.h)
    for block in blocks:
        fully_shard(block)
    return fully_shard(model)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's shard) gathered to the full tensor; plain tensors copied."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _run_case(kind: str, wrap: str, patched: bool, rank: int) -> dict:
    import invact
    model = _build(kind)
    if patched:
        norms = kind == "norm"                               # activations, and the norms where there are
        report = invact.patch(model, backend="eager", norms=norms)
        assert len(report) == (4 if norms else 2), str(report)
    wrapped = _wrap(kind, wrap, model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for step in range(STEPS):
        before = {n: _full(p) for n, p in model.named_parameters()}
        opt.zero_grad(set_to_none=True)
        _loss(kind, wrapped, _batch(kind, step, rank)).backward()
        grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        steps.append((before, grads))
    try:                                                     # an error here fails only the memory test
        with invact.memory(wrapped) as saved:
            loss = _loss(kind, wrapped, _batch(kind, 0, rank))
        loss.backward()                                      # completes DDP's / FSDP2's iteration
        total = saved.total
    except Exception:                                        # noqa: BLE001 - reported by the test
        total = traceback.format_exc(limit=-4)
    return {"steps": steps, "saved": total}


def _worker(rank: int, directory: Path, kinds: list[str]) -> None:
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)                                 # two workers share the machine
    dist.init_process_group("gloo", init_method=f"file://{directory / 'store'}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results = {(k, w, p): _run_case(k, w, p, rank) for k in kinds for w in WRAPS for p in (False, True)}
    torch.save(results, directory / f"rank{rank}.tmp")
    os.replace(directory / f"rank{rank}.tmp", directory / f"rank{rank}.pt")
    dist.destroy_process_group()                             # on errors: no teardown, the caller exits


# -- the parent ------------------------------------------------------------------------------------

def _launch(directory: Path, kinds: list[str]) -> list[dict] | str:
    """Run the workers, killing all of them on the first failure or after TIMEOUT seconds.

    Returns the ranks' results, or a message with the workers' output tails if they failed.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"                     # loopback: no dependence on the host's name
    procs, logs = [], []
    for rank in range(WORLD):
        log = open(directory / f"rank{rank}.log", "wb")
        logs.append(log)
        cmd = [sys.executable, __file__, str(rank), str(directory), ",".join(kinds)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * WORLD:
        tails = "\n".join(f"--- rank {r} (exit {c}) ---\n" + (directory / f"rank{r}.log").read_text()[-3000:]
                          for r, c in enumerate(codes))
        why = f"timed out after {TIMEOUT} s" if time.monotonic() > deadline else "failed"
        return f"distributed workers {why}:\n{tails}"
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The workers' results (or their failure), computed once per pytest session, also under xdist."""
    import importlib.util

    import torch.distributed as dist
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    kinds = [k for k in KINDS if k != "gpt2" or importlib.util.find_spec("transformers")]
    from invact import ops
    missing = {"gelu", "silu", "gelu_tanh"} - set(ops.names())
    if missing:
        pytest.skip(f"tables not generated: {sorted(missing)}")
    from filelock import FileLock                            # a torch dependency
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):                # shared by the session's xdist workers
        root = root.parent
    directory = root / "invact_distributed"
    with FileLock(str(root / "invact_distributed.lock")):
        if not (directory / "done").exists():
            directory.mkdir()
            start = time.monotonic()
            out = {"ranks": _launch(directory, kinds), "seconds": time.monotonic() - start, "kinds": kinds}
            torch.save(out, directory / "done")                # a failure too: it is not rerun
        out = torch.load(directory / "done", weights_only=False)
    if isinstance(out["ranks"], str):
        pytest.fail(out["ranks"], pytrace=False)
    return out


def _reference(kind: str, params: dict, step: int):
    """Full-batch gradients of the unpatched model at ``params``, and DELTA * sum of the ratios (plus the
    norms' share: invact.norm_bounds.relative_bound of each with the unpatched forward's y; invact's LayerNorm
    forward is the same bits (test_norms.py), its RMSNorm's within y's rounding, which the bound's
    measured k_y of the stored y covers)."""
    from invact.norm_bounds import relative_bound
    model = _build(kind)
    own = dict(model.named_parameters())
    assert set(own) == set(params)
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(params[n])
    ratios, norm_share = [], []
    for m in model.modules():
        if isinstance(m, _activation_kinds(kind)):
            m.register_full_backward_hook(lambda mod, gin, gout: ratios.append(
                (gout[0].norm() / gin[0].norm().clamp_min(1e-30)).item()))
        if kind == "norm" and isinstance(m, (nn.LayerNorm, nn.RMSNorm)):     # gpt2's: not patched
            m.register_forward_hook(lambda mod, args, out: setattr(mod, "_seen", (args[0].detach(), out.detach())))
            m.register_full_backward_hook(lambda mod, gin, gout: norm_share.append(
                relative_bound(mod, *mod.__dict__.pop("_seen"), gout[0])))
    _loss(kind, model, _batch(kind, step)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert len(ratios) == 2 and len(norm_share) == (2 if kind == "norm" else 0)
    import tolerances
    delta = max(tolerances.derivative_error(name) for name in DELTA_TABLES)
    return grads, delta * sum(ratios) + sum(norm_share)


def _module_floor(grads):
    """1e-6 x the largest gradient norm among the parameters of the same module (test_patching)."""
    best = {}
    for n, g in grads.items():
        owner = n.rpartition(".")[0]
        best[owner] = max(best.get(owner, 0.0), g.norm().item())
    return {n: 1e-6 * best[n.rpartition(".")[0]] for n in grads}


@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_single_process(results, kind, wrap):
    """Per rank and step, distributed gradients (unpatched and patched) against the full-batch reference."""
    if kind not in results["kinds"]:
        pytest.skip("transformers is not installed")
    ranks = results["ranks"]
    worst = {}
    for patched in (False, True):
        per_rank = [r[(kind, wrap, patched)]["steps"] for r in ranks]
        for step in range(STEPS):
            (before, grads), (before1, grads1) = per_rank[0][step], per_rank[1][step]
            for n in grads:                                  # ranks agree bitwise
                assert torch.equal(before[n], before1[n]) and torch.equal(grads[n], grads1[n]), (n, step)
            ref, act_tol = _reference(kind, before, step)
            assert set(ref) == set(grads)
            tol = N_RED * U32 + (act_tol if patched else 0.0)
            assert tol < 1e-2                                # the check can fail: O(1) faults, O(1e-2) tables
            floor = _module_floor(ref)
            for n in ref:
                err = (grads[n] - ref[n]).norm().item()
                scale = ref[n].norm().item()
                assert err <= tol * scale + floor[n], (kind, wrap, patched, step, n, err, scale, tol)
                worst[(patched, n)] = max(worst.get((patched, n), 0.0), err / max(scale, 1e-30))
    print(f"{kind}/{wrap}: max relative gradient error unpatched "
          f"{max(v for (p, _), v in worst.items() if not p):.2e}, patched "
          f"{max(v for (p, _), v in worst.items() if p):.2e}; workers {results['seconds']:.1f} s")


@pytest.mark.parametrize("wrap", WRAPS)
def test_memory_saving_persists(results, wrap):
    """Under DDP and FSDP2 each patched activation still drops its input and adds only a 1-bit code; each
    patched norm keeps only its y (shared with the next Linear), rstd and its kept columns."""
    n = MLP_ROWS // WORLD * MLP_HIDDEN                       # elements per activation per rank
    per_activation = 4 * n - n // 8                          # input (fp32) dropped, 1-bit code added
    for r in results["ranks"]:
        for case, value in r.items():
            if case[1] == wrap and isinstance(value["saved"], str):
                pytest.fail(f"invact.memory failed on {case}:\n{value['saved']}", pytrace=False)
        assert r[("mlp", wrap, False)]["saved"] - r[("mlp", wrap, True)]["saved"] == 2 * per_activation
        rows = MLP_ROWS // WORLD                             # each norm adds its y (fp32), rstd (fp32 per row),
        kept = rows * 4 + 8                                  # LayerNorm its kept column's x_hat (fp32), index (int64)
        per_norm = 4 * n + 4 * rows
        assert r[("norm", wrap, True)]["saved"] - r[("mlp", wrap, True)]["saved"] == 2 * per_norm + kept
        assert r[("norm", wrap, True)]["saved"] < r[("norm", wrap, False)]["saved"]
        if "gpt2" in results["kinds"]:
            assert r[("gpt2", wrap, True)]["saved"] < r[("gpt2", wrap, False)]["saved"]


if __name__ == "__main__":
    try:
        _worker(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)                                          # do not wait for a peer stuck in a collective
