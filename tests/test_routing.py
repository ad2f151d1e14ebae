"""invact.route_functional: functional activation calls inside a forward run through invact.

Gradients are compared with PyTorch's own in float64 at the activation's input, where the tables'
certified approximation error of g (<= 5e-8, the default tolerance every certificate meets:
tests/test_certificates.py) times |grad_out| bounds the difference, plus float64 rounding.
Memory: the routed activation's input is no longer saved.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import invact
from invact.routing import ROUTED

CALLS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": lambda x: F.silu(x),
    "mish": lambda x: F.mish(x),
    "softplus": lambda x: F.softplus(x, 2.0, 20.0),
    "elu": lambda x: F.elu(x, 1.0),
    "celu": lambda x: F.celu(x, alpha=1.0),
    "selu": lambda x: F.selu(x),
    "hardswish": lambda x: F.hardswish(x),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
}
G_ERROR = 5e-8  # certified |g~(y) - f'(x)|, see the module docstring


class Block(torch.nn.Module):
    def __init__(self, act, width=16):
        super().__init__()
        self.up, self.down, self.act = torch.nn.Linear(8, width), torch.nn.Linear(width, 8), act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_routed_call_matches_pytorch(name):
    torch.manual_seed(0)
    x = (torch.randn(4096, dtype=torch.float64) * 3).requires_grad_()
    go = torch.randn(4096, dtype=torch.float64)
    with invact.route_functional() as router:
        (routed,) = torch.autograd.grad(CALLS[name](x), x, go)
    (reference,) = torch.autograd.grad(CALLS[name](x), x, go)
    assert sum(router.routed.values()) == 1, router.routed
    bound = G_ERROR * go.abs() + 4 * torch.finfo(torch.float64).eps * reference.abs()
    assert ((routed - reference).abs() <= bound).all()


def test_every_routed_function_is_tested():
    names = {name for name, _ in ROUTED.values()}
    assert names <= {c.split("_tanh")[0] for c in CALLS} | {"leaky_relu"}


def test_routing_frees_the_input():
    """Linear -> F.gelu -> Linear: the gelu input is no longer saved (bytes counted per storage)."""
    torch.manual_seed(0)
    model, x = Block(F.gelu, width=256), torch.randn(64, 8)
    with invact.memory(model) as before:
        model(x).sum().backward()
    with invact.route_functional() as router, invact.memory(model) as after:
        model(x).sum().backward()
    assert router.routed["gelu"] == 1
    freed = before.total - after.total
    act_bytes = 64 * 256 * 4
    code_bytes = act_bytes // 32  # one bit per float32 element
    assert freed == act_bytes - code_bytes, (before.total, after.total)


@pytest.mark.parametrize("case", ["no_grad", "inplace", "input_without_grad", "not_selected"])
def test_calls_that_gain_nothing_run_untouched(case):
    x = torch.randn(16, requires_grad=True)
    router = invact.route_functional(only={"silu"} if case == "not_selected" else None)
    with router:
        if case == "no_grad":
            with torch.no_grad():
                F.gelu(x)
        elif case == "inplace":
            F.silu(x.clone(), inplace=True)
        elif case == "input_without_grad":
            F.gelu(x.detach())
        else:
            F.gelu(x)
    assert not router.routed


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="only:.*relu6"):
        invact.route_functional(only={"relu6"})


@pytest.mark.slow
def test_routing_under_torch_compile():
    torch.manual_seed(0)
    model, x = Block(F.silu), torch.randn(8, 8)
    compiled = torch.compile(model, fullgraph=True)
    saved = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t)
    with invact.route_functional(), hooks:
        compiled(x).sum().backward()
    assert torch.uint8 in saved  # invact's packed code: the compiled graph runs invact's op


def test_a_routed_model_called_from_two_threads_routes_each():
    """torch's mode stack is per thread, and the router's depth count was one for all: the thread that
    entered first kept the router on its stack for good (every later F.gelu there routed, even after
    unpatch) and the other raised "pop from empty mode stack" or ran unrouted. Now each thread enters and
    leaves it (T1 enters first and leaves first, forced by events), and a model carrying it still pickles."""
    import copy
    import pickle
    import threading

    from torch.overrides import _get_current_function_mode_stack

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, hold):
            h = F.gelu(self.lin(x))
            hold()
            return h

    model, x = Block(), torch.randn(4, 8)
    invact.patch(model, functional=True)
    t1_inside, t2_inside, t1_left, seen = threading.Event(), threading.Event(), threading.Event(), {}

    def run(name, hold, after=None):
        try:
            y = model(x, hold)
            seen[name] = (type(y.grad_fn).__name__, list(_get_current_function_mode_stack()),
                          type(F.gelu(torch.randn(3, requires_grad=True)).grad_fn).__name__)
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            seen[name] = repr(exc)
        if after:
            after.set()

    first = threading.Thread(target=run, args=("T1", lambda: (t1_inside.set(), t2_inside.wait(30)), t1_left))
    second = threading.Thread(target=run, args=("T2", lambda: (t2_inside.set(), t1_left.wait(30))))
    first.start()
    assert t1_inside.wait(30)
    second.start()
    for t in (first, second):
        t.join(60)
    for name in ("T1", "T2"):
        grad_fn, stack, later = seen[name]
        assert grad_fn != "GeluBackward0" and stack == [] and later == "GeluBackward0", (name, seen[name])
    twin = copy.deepcopy(model)            # its scope's per-thread depths are not copied (nor pickled)
    assert type(twin(x, lambda: None).grad_fn).__name__ == seen["T1"][0]
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())   # module-level classes: pickles
    invact.patch(plain, functional=True)
    plain(x)
    assert torch.equal(pickle.loads(pickle.dumps(plain))(x), plain(x))
