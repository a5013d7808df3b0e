"""penalty / norms / add_penalty_grad_ / decay_ of every usable backend against the naive fp64 loops."""
from __future__ import annotations

import pytest
import torch

import fastreg
from fastreg.backends import BACKENDS
from conftest import DTYPES, ODD_SHAPES, TENSOR_TOL, VALUE_RTOL, random_params
from reference import naive_decay, naive_value_and_grads

COEFFICIENTS = [
    dict(l1=0.3),
    dict(l2=0.7),
    dict(group_lasso=0.5),
    dict(l1=0.1, l2=0.2, group_lasso=0.3),
    dict(group_lasso=0.5, group_dim=0),
    dict(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0),
]
COEF_IDS = ["l1", "l2", "group_lasso", "elasticnet+group", "rows", "elasticnet+rows"]


def assert_value(got, want, dtype):
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=VALUE_RTOL[dtype], atol=1e-12)


def assert_tensors(got, want, dtype):
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, **TENSOR_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coefs", COEFFICIENTS, ids=COEF_IDS)
def test_penalty_value_and_backward(backend, dtype, coefs):
    params = random_params(ODD_SHAPES, dtype)
    value = fastreg.penalty(params, **coefs, backend=backend)
    value.backward()
    want_value, want_grads = naive_value_and_grads(params, **coefs)
    assert_value(value.detach(), want_value, dtype)
    assert_tensors([p.grad for p in params], want_grads, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coefs", COEFFICIENTS, ids=COEF_IDS)
def test_add_penalty_grad(backend, dtype, coefs):
    params = random_params(ODD_SHAPES, dtype, grad=True)
    start = [p.grad.double().clone() for p in params]
    value = fastreg.add_penalty_grad_(params, **coefs, backend=backend)
    want_value, want_grads = naive_value_and_grads(params, **coefs)
    assert_value(value, want_value, dtype)
    assert_tensors([p.grad for p in params], [g0 + g for g0, g in zip(start, want_grads)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coefs", COEFFICIENTS, ids=COEF_IDS)
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_decay(backend, dtype, coefs, lr_kind):
    params = random_params(ODD_SHAPES, dtype)
    lr = 0.4 if lr_kind == "float" else torch.tensor(0.4)  # an fp32 tensor: 0.4000000059604645
    want = naive_decay(params, float(lr), **coefs)
    fastreg.decay_(params, lr, **coefs, backend=backend)
    assert_tensors([p.detach() for p in params], want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms(backend, dtype):
    params = random_params(ODD_SHAPES, dtype)
    n = fastreg.norms(params, backend=backend)
    want_l1 = torch.stack([p.detach().double().abs().sum() for p in params])
    want_sq = torch.stack([p.detach().double().square().sum() for p in params])
    rtol = VALUE_RTOL[dtype]
    torch.testing.assert_close(n.tensor_l1.double(), want_l1, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(n.tensor_l2.double(), want_sq.sqrt(), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(n.l1.double(), want_l1.sum(), rtol=rtol, atol=0)
    torch.testing.assert_close(n.l2_squared.double(), want_sq.sum(), rtol=rtol, atol=0)
    torch.testing.assert_close(n.l2.double(), want_sq.sum().sqrt(), rtol=rtol, atol=0)


def test_norms_keep_order_across_dtypes(backend):
    params = [torch.full((3,), 1.0), torch.full((2,), 2.0, dtype=torch.float64), torch.full((4,), 3.0, dtype=torch.bfloat16)]
    n = fastreg.norms(params, backend=backend)
    assert n.tensor_l1.dtype == torch.float64
    assert n.tensor_l1.tolist() == [3.0, 4.0, 12.0]
    assert n.tensor_l2.tolist() == pytest.approx([3**0.5, 8**0.5, 6.0])


def test_mixed_dtypes_are_bucketed(backend):
    params = random_params([(5, 3)], torch.float32) + random_params([(4,)], torch.bfloat16, seed=1) + random_params([(6,)], torch.float64, seed=2)
    value = fastreg.penalty(params, l1=0.2, l2=0.3, group_lasso=0.1, backend=backend)
    assert value.dtype == torch.float64
    value.backward()
    want_value, want_grads = naive_value_and_grads(params, l1=0.2, l2=0.3, group_lasso=0.1)
    torch.testing.assert_close(value.detach(), want_value, rtol=2e-6, atol=0)
    for p, g in zip(params, want_grads):
        torch.testing.assert_close(p.grad.double(), g, **TENSOR_TOL[p.dtype])


def test_sign_of_zero_is_zero(backend):
    w = torch.tensor([0.0, 2.0, -3.0, 0.0], requires_grad=True)
    fastreg.penalty([w], l1=1.0, backend=backend).backward()
    assert w.grad.tolist() == [0.0, 1.0, -1.0, 0.0]


def test_all_zero_tensor_has_zero_group_lasso_gradient(backend):
    zero, other = torch.zeros(5, requires_grad=True), torch.tensor([3.0, 4.0], requires_grad=True)
    value = fastreg.penalty([zero, other], group_lasso=2.0, backend=backend)
    value.backward()
    assert value.item() == pytest.approx(10.0)
    assert zero.grad.tolist() == [0.0] * 5
    assert other.grad.tolist() == pytest.approx([0.6 * 2, 0.8 * 2])


def test_l1_prox_gives_exact_zeros(backend):
    w = torch.tensor([0.05, -0.05, 0.3, -0.3, 0.0])
    fastreg.decay_([w], lr=1.0, l1=0.1, backend=backend)
    assert w.tolist() == pytest.approx([0.0, 0.0, 0.2, -0.2, 0.0])
    assert (w[:2] == 0).all() and (w[4] == 0)


def test_group_lasso_prox_zeros_whole_tensors(backend):
    small, large = torch.full((4,), 0.1), torch.tensor([3.0, 4.0])  # norms 0.2 and 5
    fastreg.decay_([small, large], lr=1.0, group_lasso=1.0, backend=backend)
    assert (small == 0).all()
    assert large.tolist() == pytest.approx([3.0 * 0.8, 4.0 * 0.8])


def test_group_lasso_rows_zero_whole_rows(backend):
    w = torch.tensor([[0.1, 0.1], [3.0, 4.0]])
    fastreg.decay_([w], lr=1.0, group_lasso=1.0, group_dim=0, backend=backend)
    assert (w[0] == 0).all()
    assert w[1].tolist() == pytest.approx([2.4, 3.2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_long_sums_stay_accurate(backend, dtype):
    # 2e5 elements of a value a low-precision running sum could not hold: the sum must
    # be accumulated in fp32, not in the parameter dtype.
    w = torch.full((200_003,), 0.3, dtype=dtype)
    exact = 200_003 * w[0].double()
    n = fastreg.norms([w], backend=backend)
    assert abs(n.l1.double() - exact) / exact < 1e-6
    value = fastreg.penalty([w], l2=2.0, backend=backend)
    assert abs(value.double() - 200_003 * w[0].double() ** 2) / exact < 1e-6


def test_empty_inputs(backend):
    assert fastreg.penalty([], l1=1.0, backend=backend).item() == 0.0
    assert fastreg.add_penalty_grad_([], l2=1.0, backend=backend).item() == 0.0
    fastreg.decay_([], lr=0.1, l2=1.0, backend=backend)
    n = fastreg.norms([], backend=backend)
    assert n.l1.item() == 0.0 and n.tensor_l1.shape == (0,)
    empty = torch.zeros(0, 3, requires_grad=True)
    empty.grad = torch.zeros(0, 3)
    assert fastreg.penalty([empty], l1=1.0, l2=1.0, group_lasso=1.0, backend=backend).item() == 0.0
    assert fastreg.add_penalty_grad_([empty], l1=1.0, group_lasso=1.0, backend=backend).item() == 0.0


def test_zero_coefficients_change_nothing(backend):
    params = random_params([(4, 3)], grad=True)
    before = [(p.detach().clone(), p.grad.clone()) for p in params]
    assert fastreg.add_penalty_grad_(params, backend=backend).item() == 0.0
    fastreg.decay_(params, lr=0.5, backend=backend)
    for p, (w, g) in zip(params, before):
        assert torch.equal(p.detach(), w) and torch.equal(p.grad, g)


def test_tensors_without_grad_are_skipped(backend):
    with_grad, without = random_params([(3,), (4,)], grad=True)
    without.grad = None
    start = with_grad.grad.clone()
    value = fastreg.add_penalty_grad_([with_grad, without], l2=1.0, backend=backend)
    assert without.grad is None
    torch.testing.assert_close(with_grad.grad, start + with_grad.detach())
    torch.testing.assert_close(value, 0.5 * with_grad.detach().square().sum())


def test_params_without_requires_grad(backend):
    w = torch.tensor([1.0, -2.0])
    value = fastreg.penalty([w], l1=1.0, backend=backend)
    assert value.item() == 3.0 and not value.requires_grad


def test_non_contiguous_tensors(backend):
    base = torch.randn(6, 8, dtype=torch.float64)
    views = [base.t(), base[:, ::2], base[1:4, 2:7]]
    for v in views:
        assert not v.is_contiguous()
    want_value, _ = naive_value_and_grads(views, l1=0.2, l2=0.3, group_lasso=0.4, group_dim=0)
    torch.testing.assert_close(fastreg.penalty(views, l1=0.2, l2=0.3, group_lasso=0.4, group_dim=0, backend=backend), want_value)
    target = base.clone()
    want = naive_decay([target[:, ::2]], 0.5, l1=0.1, l2=0.2, group_lasso=0.3)[0]
    strided = base[:, ::2]
    fastreg.decay_([strided], lr=0.5, l1=0.1, l2=0.2, group_lasso=0.3, backend=backend)
    torch.testing.assert_close(base[:, ::2], want)
    torch.testing.assert_close(base[:, 1::2], target[:, 1::2])  # the other columns are untouched


def test_zero_dim_tensors(backend):
    w = torch.tensor(-2.0, requires_grad=True)
    value = fastreg.penalty(w, l1=1.0, l2=1.0, group_lasso=1.0, group_dim=0, backend=backend)
    value.backward()
    assert value.item() == pytest.approx(2.0 + 2.0 + 2.0)
    assert w.grad.item() == pytest.approx(-1.0 - 2.0 - 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_weights_propagate(backend, bad):
    w = torch.tensor([1.0, bad, -1.0])
    assert fastreg.penalty([w], l1=1.0, backend=backend).isnan().item() == (bad != bad)
    assert not fastreg.penalty([w], l2=1.0, backend=backend).isfinite().item()
    assert not fastreg.norms([w], backend=backend).l2.isfinite().item()
    u = torch.tensor([1.0, bad, -1.0])
    fastreg.decay_([u], lr=0.1, l1=0.1, l2=0.1, backend=backend)
    assert not u[1].isfinite().item()
    assert u[0].item() == pytest.approx(0.99 - 0.01) and u[2].item() == pytest.approx(-0.98)


def test_results_are_deterministic(backend):
    params = random_params([(257, 33), (1000,), (3, 5, 7)], grad=True)
    first = fastreg.penalty(params, l1=0.1, l2=0.2, group_lasso=0.3, backend=backend)
    for _ in range(3):
        again = fastreg.penalty(params, l1=0.1, l2=0.2, group_lasso=0.3, backend=backend)
        assert torch.equal(first, again)


def test_penalty_backward_is_one_backend_call_per_bucket(monkeypatch):
    calls = []
    torch_backend = BACKENDS["torch"]
    original = torch_backend.penalty_backward

    def counting(params, grad_output, coefs):
        calls.append(len(params))
        return original(params, grad_output, coefs)

    monkeypatch.setattr(torch_backend, "penalty_backward", counting)
    params = random_params([(3, 4)] * 10) + random_params([(2,)] * 5, torch.float64)
    value = fastreg.penalty(params, l1=0.1, l2=0.2, backend="torch")
    value.backward()
    assert sorted(calls) == [5, 10]


def test_accepts_generators_and_single_tensors(backend):
    model = torch.nn.Linear(4, 3)
    from_generator = fastreg.penalty(model.parameters(), l2=0.5, backend=backend)
    from_list = fastreg.penalty(list(model.parameters()), l2=0.5, backend=backend)
    assert torch.equal(from_generator, from_list)
    single = fastreg.penalty(model.weight, l2=0.5, backend=backend)
    torch.testing.assert_close(single, 0.25 * model.weight.detach().square().sum())


def test_backend_from_environment(monkeypatch):
    w = torch.randn(5)
    monkeypatch.setenv("FASTREG_BACKEND", "torch")
    assert torch.equal(fastreg.penalty(w, l1=1.0), fastreg.penalty(w, l1=1.0, backend="torch"))
    monkeypatch.setenv("FASTREG_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="FASTREG_BACKEND: unknown backend 'no-such-backend'"):
        fastreg.penalty(w, l1=1.0)
    assert fastreg.penalty(w, l1=1.0, backend="auto").item() == pytest.approx(w.abs().sum().item())


def test_l2_matches_sgd_weight_decay_convention(backend):
    # l2 carries the 1/2, so the gradient is l2 * w, what SGD(weight_decay=l2) adds.
    w = torch.randn(10, requires_grad=True)
    fastreg.penalty(w, l2=0.3, backend=backend).backward()
    torch.testing.assert_close(w.grad, 0.3 * w.detach())
