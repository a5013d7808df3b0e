from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when its kernels are defined: set it before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fastreg.backends import BACKENDS

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# How far a result in a given parameter dtype may be from the fp64 reference.
# Values accumulate in fp32/fp64, so they are tight for every dtype; tensors written back
# in the parameter dtype are rounded once, so their tolerance is that dtype's resolution.
VALUE_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
TENSOR_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-15),
    torch.float32: dict(rtol=2e-6, atol=1e-7),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-6),
}


def usable_backends(device=CPU, dtype=torch.float32):
    return [name for name, b in BACKENDS.items() if b.unavailable_reason(device, dtype) is None]


@pytest.fixture(params=usable_backends())
def backend(request):
    """Every backend that can run on CPU here; a backend that must work has its own test file
    that fails (not skips) when it cannot run."""
    return request.param


def random_params(shapes, dtype=torch.float32, seed=0, zero_fraction=0.1, grad=False):
    """Leaf tensors with some exact zeros (sign(0) = 0 matters) and, optionally, random grads."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        w = torch.randn(shape, generator=generator, dtype=torch.float64)
        w[torch.rand(shape, generator=generator) < zero_fraction] = 0
        p = w.to(dtype).requires_grad_()
        if grad:
            p.grad = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        params.append(p)
    return params


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml's addopts): a worker per core, at most 8. Most tests are
    small and host-bound, so they scale with processes; past 8 workers, importing torch in each
    costs more than it gains."""
    return max(1, min(len(os.sched_getaffinity(0)), 8))


ODD_SHAPES = [(7, 13), (1,), (), (3, 1, 5), (0,), (2, 0, 3), (129,), (65, 3)]
