"""torch.compile: the public API and whole training steps compile without graph breaks or
recompiles and give the eager results.

Every test compiles, which takes seconds on CPU, so the file is in the slow tier. The
``triton`` backend's compiled case (the interpreter is slow) is
``test_triton.py::test_compiled_fullgraph_matches_eager``.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import fastreg
from conftest import random_params

pytestmark = pytest.mark.slow

CPU_BACKENDS = ["torch", "cpp"]
COEFS = dict(l1=0.01, l2=0.1, group_lasso=0.02, group_dim=0)
SHAPES = [(8, 6), (8,), (3, 8)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def no_recompiles():
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def clone(params):
    twins = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    for t, p in zip(twins, params):
        t.grad = None if p.grad is None else p.grad.clone()
    return twins


def assert_close_lists(got, want, rtol=1e-6, atol=1e-7):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_penalty_forward_and_backward(backend):
    def loss(params):
        return fastreg.penalty(params, **COEFS, backend=backend)

    compiled = torch.compile(loss, fullgraph=True)
    for seed in (0, 1):  # a second call with new values of the same shapes reuses the graph
        params, twins = random_params(SHAPES, seed=seed), random_params(SHAPES, seed=seed)
        with no_recompiles() if seed else contextlib.nullcontext():
            got = compiled(params)
        got.backward()
        want = loss(twins)
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert_close_lists([p.grad for p in params], [t.grad for t in twins])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_coupled_and_decoupled_updates_and_norms(backend):
    def update(params, lr):
        value = fastreg.add_penalty_grad_(params, **COEFS, backend=backend)
        fastreg.decay_(params, lr, **COEFS, backend=backend)
        return value, fastreg.norms(params, backend=backend).tensor_l2

    compiled = torch.compile(update, fullgraph=True)
    for seed, lr in ((0, 0.5), (1, 0.25)):  # a tensor lr: a new value is not a new graph
        params = random_params(SHAPES, seed=seed, grad=True)
        twins = clone(params)
        with no_recompiles() if seed else contextlib.nullcontext():
            got = compiled(params, torch.tensor(lr))
        want = update(twins, torch.tensor(lr))
        assert_close_lists(got, want)
        assert_close_lists([p.detach() for p in params], [t.detach() for t in twins])
        assert_close_lists([p.grad for p in params], [t.grad for t in twins])
    assert counters["graph_break"] == {}


class ForeachSGD(torch.optim.Optimizer):
    """Plain SGD whose step traces into one graph: torch.optim's own optimizers break the
    graph around ``step()`` on purpose (pytorch/pytorch#120814), so a fullgraph training
    step needs an inner optimizer without that break to show that fastreg adds none."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            torch._foreach_sub_(params, torch._foreach_mul([p.grad for p in params], group["lr"]))


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batches(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=generator), torch.randn(16, 3, generator=generator)) for _ in range(count)]


def trainer(model, optimizer):
    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_whole_training_step_fullgraph(backend, mode):
    models = make_model(), make_model()
    optimizers = [
        fastreg.Regularized(ForeachSGD(m.parameters(), lr=torch.tensor(0.2)), l1=0.02, l2=0.1, group_lasso=0.01, mode=mode, backend=backend)
        for m in models
    ]
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(trainer(models[0], optimizers[0]), fullgraph=True)
        eager = trainer(models[1], optimizers[1])
        for i, (x, y) in enumerate(batches(4)):
            for optimizer in optimizers:
                optimizer.zero_grad()
            with no_recompiles() if i else contextlib.nullcontext():
                got = compiled(x, y)
            torch.testing.assert_close(got, eager(x, y), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(optimizers[0].last_penalty, optimizers[1].last_penalty, rtol=1e-6, atol=0)
    assert_close_lists(list(models[0].parameters()), list(models[1].parameters()))
    if mode == "decoupled":
        assert any((p == 0).any() for p in models[0].parameters()), "decoupled L1 leaves exact zeros"


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_compiled_adamw_step_with_scheduler(mode):
    """The PyTorch recipe for compiled optimizers (tensor lr, ``torch.compile(opt.step)``),
    with a scheduler acting on the decay: eager results, no recompile after the first step."""
    models = make_model(), make_model()
    optimizers, schedulers = [], []
    for m in models:
        inner = torch.optim.AdamW(m.parameters(), lr=torch.tensor(0.05), weight_decay=0.0)
        optimizers.append(fastreg.Regularized(inner, l1=0.01, l2=0.1, mode=mode, backend="cpp"))
        schedulers.append(torch.optim.lr_scheduler.StepLR(optimizers[-1], step_size=1, gamma=0.5))
    compiled = torch.compile(optimizers[0].step)
    for i, (x, y) in enumerate(batches(4)):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
        # the first call compiles both the wrapper's and the inner optimizer's frames
        with no_recompiles() if i else contextlib.nullcontext():
            compiled()
        optimizers[1].step()
        for scheduler in schedulers:
            scheduler.step()
        # inductor's AdamW rounds differently from eager's: looser than fastreg's own ops
        torch.testing.assert_close(optimizers[0].last_penalty, optimizers[1].last_penalty, rtol=1e-5, atol=0)
    assert_close_lists(list(models[0].parameters()), list(models[1].parameters()), rtol=1e-4, atol=1e-6)

    # torch.optim breaks the graph around its step on purpose (explicit
    # torch._dynamo.graph_break() calls), and dynamo skips the step counter a scheduler
    # wraps around optimizer.step; any other break would be fastreg's
    reasons = list(counters["graph_break"])
    assert reasons, "the count must see torch.optim's own breaks"
    assert all("torch._dynamo.graph_break()" in r or "lr_scheduler.py" in r for r in reasons), reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (mode='reduce-overhead') need a CUDA device")
@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_reduce_overhead_cuda_graphs(mode):
    """CUDA-graph capture of the fused ops: no host sync or per-call host-to-device copy
    inside the step, so replays give the eager results."""
    device = torch.device("cuda")
    models = make_model().to(device), make_model().to(device)
    optimizers = [
        fastreg.Regularized(ForeachSGD(m.parameters(), lr=torch.tensor(0.2, device=device)), l1=0.02, l2=0.1, group_lasso=0.01, mode=mode)
        for m in models
    ]
    update = torch.compile(optimizers[0].step, mode="reduce-overhead", fullgraph=True)
    loss = torch.compile(lambda m, x, y: torch.nn.functional.mse_loss(m(x), y) + fastreg.penalty(m.parameters(), l1=0.01, l2=0.05),
                         mode="reduce-overhead", fullgraph=True)
    for i, (x, y) in enumerate(batches(5)):  # warm-up, record, then replays
        x, y = x.to(device), y.to(device)
        for model, optimizer in zip(models, optimizers):
            # grads zeroed in place keep their addresses, as a captured graph needs
            optimizer.zero_grad(set_to_none=False)
        with no_recompiles() if i else contextlib.nullcontext():
            got = loss(models[0], x, y)
            got.backward()
            update()
        want = torch.nn.functional.mse_loss(models[1](x), y) + fastreg.penalty(models[1].parameters(), l1=0.01, l2=0.05)
        want.backward()
        optimizers[1].step()
        torch.testing.assert_close(got.detach().clone(), want.detach(), rtol=1e-5, atol=1e-6)
    assert_close_lists(list(models[0].parameters()), list(models[1].parameters()))


FUSED = [
    ("AdamW", dict(lr=torch.tensor(0.05), amsgrad=True, weight_decay=0.1, l1=0.01, group_lasso=0.02, group_dim=0)),
    ("Adam", dict(lr=0.05, maximize=True, weight_decay=0.1, l1=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.1, l1=0.01, group_lasso=0.02)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, l1=0.01)),
]


@pytest.mark.parametrize("name, options", FUSED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FUSED)])
def test_fused_optimizer_step_fullgraph(name, options):
    """fastreg's fused optimizers under ``torch.compile(fullgraph=True)``: each group's step is
    one custom op, with the kernel of the eager step, so the weights, state and penalty are the
    eager ones to the bit; fp32 and fp64 params in one group (two buckets), state made on the
    first compiled step, a tensor lr, no recompile after the first steps."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3).double())
        options_ = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
        return model, getattr(fastreg, name)(model.parameters(), **options_)

    (compiled_model, compiled_opt), (eager_model, eager_opt) = build(), build()
    compiled_step = torch.compile(compiled_opt.step, fullgraph=True)
    for i, (x, _) in enumerate(batches(4)):
        for model, optimizer in ((compiled_model, compiled_opt), (eager_model, eager_opt)):
            optimizer.zero_grad()
            model[1](model[0](x).double()).square().mean().backward()
        with no_recompiles() if i > 1 else contextlib.nullcontext():
            compiled_step()
        eager_opt.step()
        for got, want in zip(compiled_model.parameters(), eager_model.parameters()):
            assert torch.equal(got, want), i
        assert torch.equal(compiled_opt.last_penalty, eager_opt.last_penalty)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        for key, value in eager_opt.state[q].items():
            assert torch.equal(compiled_opt.state[p][key], value), key
