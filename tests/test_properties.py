"""Property-based: random tensor lists and coefficients, every usable backend vs the naive fp64 loop."""
from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

import fastreg
from conftest import TENSOR_TOL, usable_backends
from reference import naive_decay, naive_value_and_grads

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
