"""Every fast backend against the ``reference`` backend: one harness, op by op.

Parametrized by *target* (a backend on a device, with the settings that reach its code paths),
dtype and coefficients. Tolerances come from each dtype's eps (``reference.elementwise_tol`` /
``reduction_tol``), tensors from ``reference.make_params``. A target that cannot run here skips
with the reason; a backend that must work here (``cpp`` where a compiler exists) fails in its
own file.

Targets:
- ``cpp``: the C++ CPU kernels;
- ``torch``: the fast pure-PyTorch backend, as shipped;
- ``torch-small-batches``: the same with batches of 64 elements and runs of tensors up to 16
  elements, so that the shapes of ``make_params`` cross every path of its layout (slices of
  large tensors, rows longer than a batch, runs of small tensors of one shape, 0-d and empty
  tensors) as a large model does with the real limits;
- ``cuda``: the CUDA kernels, on a GPU.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

from fastreg.backends import BACKENDS
from fastreg.backends import torch_backend
from fastreg.backends.base import accumulate_dtype
from reference import (
    COEFS,
    assert_bitwise_equal,
    assert_lists_close,
    check_nan_inf_propagation,
    elementwise_tol,
    make_grads,
    make_params,
    noncontiguous_params,
    reduction_tol,
    run_all_ops,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REF = BACKENDS["reference"]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    backend: str
    device: str
    batch_limits: Optional[tuple] = None  # (batch, small) of the torch backend on this device


TARGETS = [
    Target("cpp", "cpp", "cpu"),
    Target("torch", "torch", "cpu"),
    Target("torch-small-batches", "torch", "cpu", batch_limits=(64, 16)),
    Target("cuda", "cuda", "cuda"),
]


@pytest.fixture(params=TARGETS, ids=lambda t: t.name)
def target(request, monkeypatch):
    t: Target = request.param
    if t.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU: the cuda target runs on CUDA tensors only")
    reason = BACKENDS[t.backend].unavailable_reason(torch.device(t.device), torch.float32)
    if reason is not None:
        pytest.skip(f"{t.backend} cannot run here: {reason}")
    if t.batch_limits is not None:
        monkeypatch.setattr(torch_backend, "_CPU_LIMITS", t.batch_limits)
    return t


def params_on(target: Target, dtype, **kwargs):
    return make_params(dtype, device=target.device, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms(target, dtype):
    params = params_on(target, dtype)
    abs_sums, sq_sums = BACKENDS[target.backend].norms(params)
    ref_abs, ref_sq = REF.norms(params)
    assert abs_sums.dtype == sq_sums.dtype == accumulate_dtype(dtype) and abs_sums.shape == (len(params),)
    torch.testing.assert_close(abs_sums, ref_abs, **reduction_tol(dtype))
    torch.testing.assert_close(sq_sums, ref_sq, **reduction_tol(dtype))


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value(target, dtype, coefs):
    params = params_on(target, dtype)
    value = BACKENDS[target.backend].value(params, coefs)
    assert value.shape == () and value.dtype == accumulate_dtype(dtype)
    torch.testing.assert_close(value, REF.value(params, coefs), **reduction_tol(dtype))


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_grad(target, dtype, coefs):
    backend = BACKENDS[target.backend]
    params = params_on(target, dtype)
    before = [p.clone() for p in params]
    grads, ref_grads = make_grads(params), make_grads(params)
    value = backend.add_grad_(params, grads, coefs)
    torch.testing.assert_close(value, REF.add_grad_(params, ref_grads, coefs), **reduction_tol(dtype))
    torch.testing.assert_close(value, backend.value(params, coefs), **reduction_tol(dtype))
    assert_lists_close(grads, ref_grads, **elementwise_tol(dtype))
    assert_bitwise_equal(params, before)


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_penalty_backward(target, dtype, coefs):
    params = params_on(target, dtype)
    grad_output = torch.tensor(1.75, dtype=accumulate_dtype(dtype), device=target.device)
    out = BACKENDS[target.backend].penalty_backward(params, grad_output, coefs)
    assert [(g.shape, g.dtype) for g in out] == [(p.shape, p.dtype) for p in params]
    assert_lists_close(out, REF.penalty_backward(params, grad_output, coefs), **elementwise_tol(dtype))


@pytest.mark.parametrize("lr_kind", ["float", "tensor", "cpu_tensor"])
@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decay(target, dtype, coefs, lr_kind):
    lr = {"float": 0.5, "tensor": torch.tensor(0.5, dtype=torch.float64, device=target.device),
          "cpu_tensor": torch.tensor(0.5)}[lr_kind]
    params, ref_params = params_on(target, dtype), params_on(target, dtype)
    BACKENDS[target.backend].decay_(params, lr, coefs)
    REF.decay_(ref_params, lr, coefs)
    assert_lists_close(params, ref_params, **elementwise_tol(dtype))
    for p, r in zip(params, ref_params):  # exact zeros where the reference has them
        assert torch.equal(p == 0, r == 0)


@pytest.mark.parametrize("coefs", [COEFS["all"], COEFS["all_rows"], COEFS["elastic_net"]], ids=["all", "all_rows", "elastic_net"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous(target, dtype, coefs):
    backend = BACKENDS[target.backend]
    params = noncontiguous_params(dtype, device=target.device)
    assert not any(p.is_contiguous() for p in params)
    tol = elementwise_tol(dtype)
    torch.testing.assert_close(backend.value(params, coefs), REF.value(params, coefs), **reduction_tol(dtype))
    assert_lists_close(backend.norms(params), REF.norms(params), **reduction_tol(dtype))

    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(*p.shape, 2, generator=gen).to(dtype).to(target.device)[..., 0] for p in params]
    assert not any(g.is_contiguous() for g in grads)
    ref_grads = [g.clone() for g in grads]
    value = backend.add_grad_(params, grads, coefs)
    torch.testing.assert_close(value, REF.add_grad_(params, ref_grads, coefs), **reduction_tol(dtype))
    assert_lists_close(grads, ref_grads, **tol)

    go = torch.tensor(0.5, device=target.device)
    assert_lists_close(backend.penalty_backward(params, go, coefs), REF.penalty_backward(params, go, coefs), **tol)

    ref_params = [p.clone() for p in params]
    backend.decay_(params, 0.5, coefs)
    REF.decay_(ref_params, 0.5, coefs)
    assert_lists_close(params, ref_params, **tol)


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_inf_propagate_like_reference(target, dtype, coefs):
    check_nan_inf_propagation(BACKENDS[target.backend], dtype, coefs, device=target.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_across_runs(target, dtype):
    backend = BACKENDS[target.backend]
    params = params_on(target, dtype, shapes=[(300, 1000), (100_003,), (77,), (5, 20_000), (3, 4)])
    for coefs in COEFS.values():
        first = run_all_ops(backend, params, coefs)
        assert_bitwise_equal(run_all_ops(backend, params, coefs), first)


def test_many_small_tensors_of_many_shapes(target):
    """Runs of small tensors interleaved with large ones, shapes repeating out of order: each
    result lands on its own tensor."""
    shapes = [(3,), (4, 2), (3,), (70_001,), (4, 2), (1,), (3,), (2, 2, 2), (300, 5)] * 7
    for coefs in (COEFS["elastic_net"], COEFS["all_rows"], COEFS["all"]):
        for dtype in (torch.float32, torch.bfloat16):
            params = params_on(target, dtype, shapes=shapes)
            got, want = run_all_ops(BACKENDS[target.backend], params, coefs), run_all_ops(REF, params, coefs)
            values = 4  # value, norms (2), add_grad_'s value
            assert_lists_close(got[:values], want[:values], **reduction_tol(dtype))
            assert_lists_close(got[values:], want[values:], **elementwise_tol(dtype))
