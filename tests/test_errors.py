"""The bad-input matrix: a clear error naming the argument or tensor, and nothing changed.

Every case runs on every backend usable here (the ``backend`` fixture), as each backend must
refuse the same inputs before it writes anything."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastreg
from conftest import random_params

FUNCTIONS = {
    "penalty": lambda params, **kw: fastreg.penalty(params, **kw),
    "norms": lambda params, backend=None, **coefficients: fastreg.norms(params, backend=backend),
    "add_penalty_grad_": lambda params, **kw: fastreg.add_penalty_grad_(params, **kw),
    "decay_": lambda params, **kw: fastreg.decay_(params, 0.1, **kw),
}
WITH_COEFFICIENTS = ["penalty", "add_penalty_grad_", "decay_"]


@pytest.fixture
def params():
    return random_params([(4, 3), (5,)], grad=True)


def snapshot(tensors):
    return [(t.detach().clone(), None if t.grad is None else t.grad.clone()) for t in tensors]


def assert_unchanged(tensors, before):
    for t, (w, g) in zip(tensors, before):
        assert torch.equal(t.detach(), w)
        assert (t.grad is None and g is None) or torch.equal(t.grad, g)


@pytest.mark.parametrize("function", WITH_COEFFICIENTS)
@pytest.mark.parametrize("name", ["l1", "l2", "group_lasso"])
@pytest.mark.parametrize("value, error, message", [
    (-0.1, ValueError, "must be non-negative"),
    (float("nan"), ValueError, "must be finite"),
    (float("inf"), ValueError, "must be finite"),
    ("0.1", TypeError, "must be a real number"),
    (True, TypeError, "must be a real number"),
    (torch.tensor(0.1), TypeError, "must be a real number"),
])
def test_bad_coefficients(params, backend, function, name, value, error, message):
    before = snapshot(params)
    with pytest.raises(error, match=f"{name} {message}"):
        FUNCTIONS[function](params, **{name: value}, backend=backend)
    assert_unchanged(params, before)


@pytest.mark.parametrize("function", WITH_COEFFICIENTS)
def test_bad_group_dim(params, backend, function):
    with pytest.raises(ValueError, match="group_dim must be None"):
        FUNCTIONS[function](params, group_lasso=0.1, group_dim=1, backend=backend)


@pytest.mark.parametrize("lr, error, message", [
    (-1.0, ValueError, "lr must be non-negative"),
    (float("nan"), ValueError, "lr must be finite"),
    ("fast", TypeError, "lr must be a real number"),
    (torch.tensor([0.1, 0.2]), TypeError, "lr given as a tensor must be one floating-point element"),
    (torch.tensor(1), TypeError, "lr given as a tensor must be one floating-point element"),
])
def test_bad_learning_rate(params, backend, lr, error, message):
    before = snapshot(params)
    with pytest.raises(error, match=message):
        fastreg.decay_(params, lr, l2=0.1, backend=backend)
    assert_unchanged(params, before)


BAD_TENSORS = [
    ("int", lambda: torch.ones(3, dtype=torch.int64), TypeError, r"params\[2\] has dtype torch.int64"),
    ("bool", lambda: torch.ones(3, dtype=torch.bool), TypeError, r"params\[2\] has dtype torch.bool"),
    ("complex", lambda: torch.ones(3, dtype=torch.complex64), TypeError, r"params\[2\] has dtype torch.complex64"),
    ("sparse", lambda: torch.eye(3).to_sparse(), TypeError, r"params\[2\] has layout torch.sparse_coo"),
    ("meta", lambda: torch.ones(3, device="meta"), ValueError, r"params\[2\] is on the meta device"),
    ("not a tensor", lambda: [1.0, 2.0], TypeError, r"params\[2\] is a list, not a torch.Tensor"),
]


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("kind, make, error, message", BAD_TENSORS, ids=[b[0] for b in BAD_TENSORS])
def test_bad_tensor_named_and_nothing_changed(params, backend, function, kind, make, error, message):
    before = snapshot(params)
    with pytest.raises(error, match=message):
        FUNCTIONS[function](params + [make()], l1=0.1, l2=0.1, backend=backend)
    assert_unchanged(params, before)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_duplicated_tensor(params, backend, function):
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"params\[2\] is the same tensor as params\[0\]"):
        FUNCTIONS[function](params + [params[0]], l1=0.1, backend=backend)
    assert_unchanged(params, before)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_mixed_devices(params, backend, function):
    with FakeTensorMode(allow_non_fake_inputs=True):
        elsewhere = torch.empty(3, device="cuda")
        elsewhere.grad = torch.empty(3, device="cuda")
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"several devices \(cpu, cuda:0\)"):
        FUNCTIONS[function](params + [elsewhere], l1=0.1, backend=backend)
    assert_unchanged(params, before)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_not_an_iterable_of_tensors(function):
    with pytest.raises(TypeError, match="params must be a tensor or an iterable of tensors, got int"):
        FUNCTIONS[function](3)
    with pytest.raises(TypeError, match="got a dict"):
        FUNCTIONS[function]({"params": []})


@pytest.mark.parametrize("function", FUNCTIONS)
def test_unknown_backend(params, function):
    before = snapshot(params)
    with pytest.raises(ValueError, match="unknown backend 'fast'; choose one of auto, "):
        FUNCTIONS[function](params, l1=0.1, backend="fast")
    with pytest.raises(TypeError, match="backend must be a string"):
        FUNCTIONS[function](params, l1=0.1, backend=3)
    assert_unchanged(params, before)


def test_unknown_backend_rejected_even_for_empty_input():
    with pytest.raises(ValueError, match="unknown backend"):
        fastreg.penalty([], l1=0.1, backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        fastreg.decay_([], 0.1, l1=0.1, backend="fast")


def test_sparse_gradient_is_refused_before_any_update(backend):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Linear(3, 2)
    (embedding(torch.tensor([1, 2])).sum() + dense(torch.ones(3)).sum()).backward()
    params = list(dense.parameters()) + [embedding.weight]
    before = snapshot(params[:2])
    with pytest.raises(TypeError, match=r"params\[2\].grad has layout torch.sparse_coo"):
        fastreg.add_penalty_grad_(params, l2=0.1, backend=backend)
    assert_unchanged(params[:2], before)


def test_nan_weights_do_not_raise_or_hang(backend):
    w = torch.tensor([float("nan"), 1.0], requires_grad=True)
    w.grad = torch.zeros(2)
    assert fastreg.add_penalty_grad_([w], l1=0.1, l2=0.1, backend=backend).isnan()
    assert fastreg.penalty([w], group_lasso=1.0, backend=backend).isnan()
    inf = torch.tensor([float("inf"), 1.0])
    assert fastreg.penalty([inf], l2=0.1, backend=backend).isinf()
    fastreg.decay_([w.detach(), inf], 0.1, l1=0.1, l2=0.1, backend=backend)
    assert w.detach()[0].isnan() and inf[0].isinf() and inf[1] < 1.0


def test_grad_of_another_dtype_is_refused_before_any_update(params, backend):
    odd = torch.ones(3, requires_grad=True)
    if hasattr(odd, "grad_dtype"):  # torch >= 2.10 checks .grad's dtype unless this is None
        odd.grad_dtype = None
    odd.grad = torch.ones(3, dtype=torch.float64)
    before = snapshot(params)
    with pytest.raises(TypeError, match=r"params\[2\].grad is torch.float64 \(3,\) on cpu, but the tensor is torch.float32"):
        fastreg.add_penalty_grad_(params + [odd], l1=0.1, backend=backend)
    assert_unchanged(params, before)


def test_tensors_without_grad_are_skipped_by_updates_and_counted_by_penalty(params, backend):
    frozen = torch.full((3,), 2.0)  # requires_grad=False, no .grad
    value = fastreg.add_penalty_grad_(params + [frozen], l2=0.5, backend=backend)
    torch.testing.assert_close(value, fastreg.penalty(params, l2=0.5, backend="torch"))
    assert frozen.grad is None
    total = fastreg.penalty(params + [frozen], l2=0.5, backend=backend)
    torch.testing.assert_close(total, value + 0.25 * 12.0)
    fastreg.decay_([frozen], 0.1, l2=0.5, backend=backend)  # decay_ writes any tensor it is given
    torch.testing.assert_close(frozen, torch.full((3,), 2.0 * (1 - 0.05)))


OVERLAPPING = {
    "same elements": lambda w: [w[:6], w[4:]],
    "a view and its base": lambda w: [w, w[2:5]],
    "another dtype": lambda w: [w[:6], w.view(torch.float64)[2:4]],
}


@pytest.mark.parametrize("views", OVERLAPPING.values(), ids=OVERLAPPING.keys())
def test_decay_refuses_overlapping_views_before_any_write(backend, views):
    flat = torch.randn(12)
    untouched = torch.randn(5)
    before = flat.clone(), untouched.clone()
    with pytest.raises(ValueError, match=r"params\[\d\] shares memory with params\[\d\]; tensors written in place must not overlap"):
        fastreg.decay_([untouched] + views(flat), 0.1, l1=0.1, l2=0.1, backend=backend)
    assert torch.equal(flat, before[0]) and torch.equal(untouched, before[1])


def test_decay_refuses_memory_shared_by_two_storages(backend):
    """Two tensors over one numpy array have storages of their own but the same memory:
    overlap is found by address, not by storage."""
    array = np.arange(12, dtype=np.float32)
    views = [torch.from_numpy(array[:8]), torch.from_numpy(array[6:])]
    assert views[0].untyped_storage().data_ptr() != views[1].untyped_storage().data_ptr()
    before = array.copy()
    with pytest.raises(ValueError, match=r"params\[1\] shares memory with params\[0\]"):
        fastreg.decay_(views, 0.1, l1=0.1, backend=backend)
    np.testing.assert_array_equal(array, before)
    disjoint = [torch.from_numpy(array[:6]), torch.from_numpy(array[6:])]
    fastreg.decay_(disjoint, 0.5, l2=1.0, backend=backend)
    np.testing.assert_allclose(array, before * 0.5)


def test_add_penalty_grad_refuses_shared_grads_before_any_write(backend):
    a, b, c = (torch.randn(4, requires_grad=True) for _ in range(3))
    a.grad = torch.zeros(4)
    shared = torch.zeros(4)
    b.grad = c.grad = shared  # one gradient buffer behind two parameters
    with pytest.raises(ValueError, match=r"params\[2\].grad shares memory with params\[1\].grad"):
        fastreg.add_penalty_grad_([a, b, c], l1=0.1, backend=backend)
    assert torch.equal(a.grad, torch.zeros(4)) and torch.equal(shared, torch.zeros(4))


def test_disjoint_views_of_one_buffer_are_written_like_separate_tensors(backend):
    """Slices of a flat buffer (DDP's gradient_as_bucket_view) and interleaved views that share
    no element are accepted, and give what the same tensors give as separate copies."""
    generator = torch.Generator().manual_seed(0)
    flat, rows = torch.randn(20, generator=generator), torch.randn(6, 8, generator=generator)
    views = [flat[:7], flat[7:].view(13), rows[:, ::2], rows[:, 1::2]]
    copies = [v.clone() for v in views]
    fastreg.decay_(views, 0.3, l1=0.2, l2=0.1, group_lasso=0.4, group_dim=0, backend=backend)
    fastreg.decay_(copies, 0.3, l1=0.2, l2=0.1, group_lasso=0.4, group_dim=0, backend=backend)
    for view, copy in zip(views, copies):
        torch.testing.assert_close(view, copy, rtol=0, atol=0)

    params = [torch.randn(6, 5, generator=generator).requires_grad_() for _ in range(2)]
    grad_buffer = torch.randn(60, generator=generator)
    params[0].grad, params[1].grad = grad_buffer[:30].view(6, 5), grad_buffer[30:].view(6, 5)
    want = [p.grad.clone() + 0.1 * p.detach() for p in params]
    fastreg.add_penalty_grad_(params, l2=0.1, backend=backend)
    torch.testing.assert_close(grad_buffer, torch.cat([w.view(-1) for w in want]))


def test_penalty_counts_each_listed_view(backend):
    """P is a function of the list as given: overlapping views are read, never written, so each counts."""
    w = torch.randn(10)
    torch.testing.assert_close(
        fastreg.penalty([w, w[:4]], l1=0.1, l2=0.2, backend=backend),
        fastreg.penalty([w.clone(), w[:4].clone()], l1=0.1, l2=0.2, backend="torch"),
    )
