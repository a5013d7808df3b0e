"""Property-based: random tensor lists and coefficients, every usable backend vs the naive fp64
loop, and a fuzz of every fast backend against the ``reference`` backend."""
from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import fastreg
from conftest import TENSOR_TOL, usable_backends
from reference import assert_lists_close, elementwise_tol, naive_decay, naive_value_and_grads, reduction_tol

shapes = st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple), min_size=0, max_size=6)
coefficient = st.one_of(st.just(0.0), st.floats(1e-4, 10.0))
settings.register_profile("fastreg", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("fastreg")


def build(shapes, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        w = torch.randn(shape, generator=generator, dtype=torch.float64)
        w[torch.rand(shape, generator=generator) < 0.2] = 0.0
        params.append(w.to(dtype).requires_grad_())
    return params


@given(
    shapes=shapes,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    l1=coefficient, l2=coefficient, group_lasso=coefficient,
    group_dim=st.sampled_from([None, 0]),
    backend=st.sampled_from(usable_backends()),
    seed=st.integers(0, 2**16),
)
def test_penalty_and_gradient_match_naive(shapes, dtype, l1, l2, group_lasso, group_dim, backend, seed):
    params = build(shapes, dtype, seed)
    value = fastreg.penalty(params, l1, l2, group_lasso, group_dim=group_dim, backend=backend)
    want_value, want_grads = naive_value_and_grads(params, l1, l2, group_lasso, group_dim)
    torch.testing.assert_close(value.double(), want_value, rtol=2e-6, atol=1e-6)
    if value.requires_grad:
        value.backward()
        for p, g in zip(params, want_grads):
            torch.testing.assert_close(p.grad.double(), g, **TENSOR_TOL[dtype])


@given(
    shapes=shapes,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    lr=st.floats(1e-3, 1.0),
    l1=coefficient, l2=st.one_of(st.just(0.0), st.floats(1e-4, 0.9)), group_lasso=coefficient,
    group_dim=st.sampled_from([None, 0]),
    backend=st.sampled_from(usable_backends()),
    seed=st.integers(0, 2**16),
)
def test_decay_matches_naive(shapes, dtype, lr, l1, l2, group_lasso, group_dim, backend, seed):
    params = [p.detach() for p in build(shapes, dtype, seed)]
    want = naive_decay(params, lr, l1, l2, group_lasso, group_dim)
    fastreg.decay_(params, lr, l1, l2, group_lasso, group_dim=group_dim, backend=backend)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.double(), w, **TENSOR_TOL[dtype])


# ---------------------------------------------------------------------------------------------
# Fuzz: every fast backend against the ``reference`` backend on the same random calls, all dtypes,
# every public op. A small set runs by default; the slow tier draws 1,000 calls per backend.

FAST_BACKENDS = [name for name in usable_backends() if name != "reference"]
FUZZ_OPS = ("penalty", "add_penalty_grad_", "decay_", "norms")
fuzz_shapes = st.lists(
    st.one_of(st.lists(st.integers(0, 9), max_size=3).map(tuple), st.integers(0, 3000).map(lambda n: (n,))),
    max_size=12,
)


@st.composite
def fuzz_calls(draw):
    return dict(
        op=draw(st.sampled_from(FUZZ_OPS)),
        shapes=draw(fuzz_shapes),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
        coefficients=dict(l1=draw(coefficient), l2=draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.9))),
                          group_lasso=draw(coefficient), group_dim=draw(st.sampled_from([None, 0]))),
        lr=draw(st.one_of(st.floats(1e-3, 1.0), st.floats(1e-3, 1.0).map(lambda lr: torch.tensor(lr)))),
        seed=draw(st.integers(0, 2**16)),
    )


def run_call(call, backend):
    """The call's outputs on ``backend``, on a fresh copy of its inputs."""
    params = build(call["shapes"], call["dtype"], call["seed"])
    grads = build(call["shapes"], call["dtype"], call["seed"] + 1)
    op, coefficients = call["op"], call["coefficients"]
    if op == "penalty":
        value = fastreg.penalty(params, **coefficients, backend=backend)
        grads = torch.autograd.grad(value, params, allow_unused=True) if value.requires_grad else []
        return [value.detach()], [g for g in grads if g is not None]
    if op == "norms":
        norms = fastreg.norms(params, backend=backend)
        return [norms.l1, norms.l2_squared, norms.tensor_l1, norms.tensor_l2], []
    params = [p.detach() for p in params]
    if op == "add_penalty_grad_":
        for p, g in zip(params, grads):
            p.grad = g.detach()
        value = fastreg.add_penalty_grad_(params, **coefficients, backend=backend)
        return [value], [p.grad for p in params]
    fastreg.decay_(params, call["lr"], **coefficients, backend=backend)
    return [], params


def check_fuzz_call(call, backend):
    values, tensors = run_call(call, backend)
    want_values, want_tensors = run_call(call, "reference")
    dtype = call["dtype"]
    assert_lists_close(values, want_values, **reduction_tol(dtype))
    assert_lists_close(tensors, want_tensors, **elementwise_tol(dtype))


@pytest.mark.skipif(not FAST_BACKENDS, reason="no backend besides reference can run here")
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(call=fuzz_calls())
def test_fuzz_against_reference_backend(backend, call):
    check_fuzz_call(call, backend)


@pytest.mark.slow
@pytest.mark.skipif(not FAST_BACKENDS, reason="no backend besides reference can run here")
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@settings(max_examples=1000, deadline=None, derandomize=True)
@given(call=fuzz_calls())
def test_fuzz_thousand_calls_against_reference_backend(backend, call):
    check_fuzz_call(call, backend)
