"""DESIGN §2's bad-input matrix: a clear error naming the argument or tensor, and nothing changed."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastreg
from conftest import random_params

FUNCTIONS = {
    "penalty": lambda params, **kw: fastreg.penalty(params, **kw),
    "norms": lambda params, **kw: fastreg.norms(params, backend=kw.get("backend")),
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
def test_bad_coefficients(params, function, name, value, error, message):
    before = snapshot(params)
    with pytest.raises(error, match=f"{name} {message}"):
        FUNCTIONS[function](params, **{name: value})
    assert_unchanged(params, before)


@pytest.mark.parametrize("function", WITH_COEFFICIENTS)
def test_bad_group_dim(params, function):
    with pytest.raises(ValueError, match="group_dim must be None"):
        FUNCTIONS[function](params, group_lasso=0.1, group_dim=1)


@pytest.mark.parametrize("lr, error, message", [
    (-1.0, ValueError, "lr must be non-negative"),
    (float("nan"), ValueError, "lr must be finite"),
    ("fast", TypeError, "lr must be a real number"),
    (torch.tensor([0.1, 0.2]), TypeError, "lr given as a tensor must be one floating-point element"),
    (torch.tensor(1), TypeError, "lr given as a tensor must be one floating-point element"),
])
def test_bad_learning_rate(params, lr, error, message):
    before = snapshot(params)
    with pytest.raises(error, match=message):
        fastreg.decay_(params, lr, l2=0.1)
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
def test_bad_tensor_named_and_nothing_changed(params, function, kind, make, error, message):
    before = snapshot(params)
    with pytest.raises(error, match=message):
        FUNCTIONS[function](params + [make()], l1=0.1, l2=0.1) if function != "norms" else FUNCTIONS[function](params + [make()])
    assert_unchanged(params, before)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_duplicated_tensor(params, function):
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"params\[2\] is the same tensor as params\[0\]"):
        FUNCTIONS[function](params + [params[0]])
    assert_unchanged(params, before)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_mixed_devices(params, function):
    with FakeTensorMode(allow_non_fake_inputs=True):
        elsewhere = torch.empty(3, device="cuda")
        elsewhere.grad = torch.empty(3, device="cuda")
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"several devices \(cpu, cuda:0\)"):
        FUNCTIONS[function](params + [elsewhere], l1=0.1)
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


def test_sparse_gradient_is_refused_before_any_update():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Linear(3, 2)
    (embedding(torch.tensor([1, 2])).sum() + dense(torch.ones(3)).sum()).backward()
    params = list(dense.parameters()) + [embedding.weight]
    before = snapshot(params[:2])
    with pytest.raises(TypeError, match=r"params\[2\].grad has layout torch.sparse_coo"):
        fastreg.add_penalty_grad_(params, l2=0.1)
    assert_unchanged(params[:2], before)


def test_nan_weights_do_not_raise_or_hang():
    w = torch.tensor([float("nan"), 1.0], requires_grad=True)
    w.grad = torch.zeros(2)
    assert fastreg.add_penalty_grad_([w], l1=0.1, l2=0.1).isnan()
    assert fastreg.penalty([w], group_lasso=1.0).isnan()
