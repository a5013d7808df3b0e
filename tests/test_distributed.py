"""torch.distributed: DDP and FSDP2 (DTensor parameters) with gloo, 2 processes on CPU.

Each test spawns two workers that compare, on every rank, the distributed result with the
same computation run in one process on the whole tensors / the whole batch; a failed
assert in a worker fails the test with the worker's traceback.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

import fastreg

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch was built without torch.distributed", allow_module_level=True)

import torch.distributed._functional_collectives as funcol  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor  # noqa: E402

WORLD = 2
SETTINGS = [
    dict(l1=0.02, l2=0.1),
    dict(l1=0.01, group_lasso=0.05),
    dict(l2=0.05, group_lasso=0.05, group_dim=0),
]


def spawn(worker, tmp_path, *args):
    mp.spawn(_init_and_run, args=(worker, str(tmp_path / "store"), sys.path, *args), nprocs=WORLD, join=True)


def _init_and_run(rank, worker, store, path, *args):
    sys.path[:] = path
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


class Net(torch.nn.Module):
    """Uneven shards on purpose: 5 rows on 2 ranks, and a 1-row weight (one rank holds none)."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(6, 5)
        self.out = torch.nn.Linear(5, 3)
        self.scale = torch.nn.Parameter(torch.ones(1, 3))

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x))) * self.scale


def net(seed=0):
    torch.manual_seed(seed)
    return Net().double()


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@contextmanager
def counting_all_reduces():
    calls = []
    real = funcol.all_reduce

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    with mock.patch.object(funcol, "all_reduce", counted):
        yield calls


def _functional_worker(rank, backend):
    mesh = init_device_mesh("cpu", (WORLD,))
    full = net()
    sharded = net()
    fully_shard(sharded, mesh=mesh)
    params = list(sharded.parameters())
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params)
    assert sharded.scale.to_local().numel() == (3 if rank == 0 else 0), "the 1-row weight lives on rank 0 only"
    reference = [p.detach().clone().requires_grad_() for p in full.parameters()]

    for coefs in SETTINGS:
        with counting_all_reduces() as calls:
            value = fastreg.penalty(params, **coefs, backend=backend)
        assert len(calls) == 1, f"one all-reduce for all tensors, got {len(calls)}"
        want = fastreg.penalty(reference, **coefs, backend=backend)
        close(value, want)
        value.backward()
        want.backward()
        for p, r in zip(params, reference):
            assert isinstance(p.grad, DTensor) and p.grad.placements == p.placements
            close(p.grad.full_tensor(), r.grad)
            p.grad, r.grad = None, None

        with counting_all_reduces() as calls:
            n = fastreg.norms(params, backend=backend)
        assert len(calls) == 1
        for got, expected in zip(n, fastreg.norms(reference, backend=backend)):
            close(got, expected)

        g = torch.Generator().manual_seed(7)
        grads = [torch.randn(r.shape, generator=g, dtype=r.dtype) for r in reference]
        for p, r, grad in zip(params, reference, grads):
            p.grad = distribute_tensor(grad.clone(), mesh, p.placements)
            r.grad = grad.clone()
        with counting_all_reduces() as calls:
            value = fastreg.add_penalty_grad_(params, **coefs, backend=backend)
        assert len(calls) == 1
        close(value, fastreg.add_penalty_grad_(reference, **coefs, backend=backend))
        for p, r in zip(params, reference):
            close(p.grad.full_tensor(), r.grad)

        fastreg.decay_(params, 0.3, **coefs, backend=backend)
        fastreg.decay_(reference, 0.3, **coefs, backend=backend)
        for p, r in zip(params, reference):
            close(p.detach().full_tensor(), r.detach())

    # a replicated tensor counts once, not once per rank
    w = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    replicated = distribute_tensor(w.clone(), mesh, [Replicate()])
    close(fastreg.penalty([replicated], l1=1.0, group_lasso=0.5, backend=backend), fastreg.penalty([w], l1=1.0, group_lasso=0.5))

    columns = distribute_tensor(w.clone(), mesh, [Shard(1)])
    with pytest.raises(ValueError, match=r"params\[0\] is sharded along dim 1"):
        fastreg.penalty([columns], group_lasso=0.1, group_dim=0)
    close(fastreg.penalty([columns], group_lasso=0.5), fastreg.penalty([w], group_lasso=0.5))
    with pytest.raises(ValueError, match="mixes DTensors"):
        fastreg.norms([columns, w])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_fsdp2_penalty_norms_grads_and_decay_equal_whole_tensors(tmp_path, backend):
    spawn(_functional_worker, tmp_path, backend)


def _train(model, optimizer, x, y, steps=4):
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _regularized(model, mode):
    if mode == "fused":
        return fastreg.Adam(model.parameters(), lr=0.05, weight_decay=0.05, l1=0.3, group_lasso=0.02)
    return fastreg.Regularized(torch.optim.Adam(model.parameters(), lr=0.05), l1=0.3, l2=0.05, group_lasso=0.02, mode=mode)


def _training_worker(rank, engine):
    x, y = data()
    half = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
    for mode in ("coupled", "decoupled", "fused"):
        single = net()
        _train(single, _regularized(single, mode), x, y)
        model = net()
        if engine == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
            wrapped = model
        optimizer = _regularized(model, mode)
        _train(wrapped, optimizer, x[half], y[half])
        zeros = 0
        for p, want in zip(model.parameters(), single.parameters()):
            got = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-11)
            assert torch.equal(got == 0, want.detach() == 0)
            zeros += int((got == 0).sum())
        assert optimizer.last_penalty is not None
        if mode != "coupled":
            assert zeros, "decoupled L1 leaves exact zeros"


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_regularized_training_equals_single_process_full_batch(tmp_path, engine):
    spawn(_training_worker, tmp_path, engine)
