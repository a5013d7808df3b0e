"""What the backends' tests share: the fp64 loops of :mod:`fastreg.naive` every fast path is
tested against, and the inputs, tolerances and comparisons of the kernel backends' tests."""
from __future__ import annotations


import torch

from fastreg.backends import Coefficients
from fastreg.naive import naive_decay, naive_penalty, naive_value_and_grads  # noqa: F401 (the tests' oracle)


# ---------------------------------------------------------------------------------------------
# Inputs and comparisons shared by the kernel backends' tests (test_cpp.py, test_cuda.py): every
# backend is checked against the ``reference`` backend on the same inputs with the same tolerances.

COEFS = {
    "l1": Coefficients(l1=0.3),
    "l2": Coefficients(l2=0.7),
    "group_lasso": Coefficients(group_lasso=0.5),
    "elastic_net": Coefficients(l1=0.3, l2=0.7),
    "all": Coefficients(l1=0.3, l2=0.7, group_lasso=0.5),
    "group_lasso_rows": Coefficients(group_lasso=0.5, group_dim=0),
    "all_rows": Coefficients(l1=0.3, l2=0.7, group_lasso=0.5, group_dim=0),
    "zero": Coefficients(),
}

# Odd sizes, 0-d and empty tensors, tensors smaller and larger than one 64K-element chunk,
# rows longer than a chunk (split groups) and many short rows (several groups per chunk).
SHAPES = [(3, 5), (70001,), (257, 300), (), (0,), (2, 0, 3), (0, 4), (5, 3, 4), (3, 70000), (40000, 3), (1,)]


def elementwise_tol(dtype):
    eps = torch.finfo(dtype).eps
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=eps, atol=eps)
    return dict(rtol=4 * eps, atol=4 * eps)


def reduction_tol(dtype):
    return dict(rtol=1e-12, atol=1e-300) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-30)


def make_params(dtype, seed=0, shapes=SHAPES, device="cpu"):
    """Random weights with exact zeros, an all-zero tensor, near-zero rows (so prox steps zero some
    groups) and elements under the soft threshold; drawn on the CPU, so every device gets the
    same values."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        if w.numel():
            w.view(-1)[:: 7] = 0.0
        if w.dim() >= 2 and w.shape[0] > 2:
            w[1] *= 1e-3
            w[2] = 0.0
        if i == len(shapes) - 1:
            w.zero_()
        params.append(w.to(dtype).to(device))
    return params


def make_grads(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device) for p in params]


def noncontiguous_params(dtype, device="cpu"):
    """Transposed, strided and permuted views, one with rows longer than a chunk."""
    base = make_params(dtype, shapes=[(64, 40), (9, 70000), (30, 20, 4), (1000,)], device=device)
    return [base[0].t(), base[1][:, ::2], base[2].permute(2, 0, 1), base[3][::3]]


def assert_lists_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"tensor {i}: {m}", **tol)


def assert_bitwise_equal(actual, expected):
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a, e.view(-1).view(torch.uint8) if e.numel() else e)


def check_nan_inf_propagation(backend, dtype, coefs, device="cpu"):
    """NaN and Inf through every op of ``backend`` follow the ``reference`` backend exactly:
    sign(NaN) = 0, a zero coefficient adds nothing (no 0 * inf), a NaN group norm gives the
    group a zero group-lasso scale."""
    from fastreg.backends import BACKENDS

    reference = BACKENDS["reference"]
    params = make_params(dtype, shapes=[(4, 6), (5,), (3, 70000), (8, 8)], device=device)
    params[0][0, 1] = float("nan")
    params[0][2, 3] = float("inf")
    params[1][2] = float("-inf")
    params[2][1, 65537] = float("nan")
    grads, ref_grads = make_grads(params), make_grads(params)

    value, ref_value = backend.add_grad_(params, grads, coefs), reference.add_grad_(params, ref_grads, coefs)
    torch.testing.assert_close(value, ref_value, equal_nan=True, **reduction_tol(dtype))
    if not coefs.is_zero():
        assert torch.isnan(value)
    assert_lists_close(grads, ref_grads, **elementwise_tol(dtype))
    torch.testing.assert_close(backend.value(params, coefs), ref_value, equal_nan=True, **reduction_tol(dtype))
    assert_lists_close(backend.norms(params), reference.norms(params), **reduction_tol(dtype))

    go = torch.tensor(2.0, device=device)
    assert_lists_close(backend.penalty_backward(params, go, coefs), reference.penalty_backward(params, go, coefs),
                       **elementwise_tol(dtype))

    ref_params = [p.clone() for p in params]
    backend.decay_(params, 0.25, coefs)
    reference.decay_(ref_params, 0.25, coefs)
    assert_lists_close(params, ref_params, **elementwise_tol(dtype))


def run_all_ops(backend, params, coefs):
    """Every op of ``backend`` on ``params`` (copies for the in-place ones), outputs in one list."""
    grads = make_grads(params)
    out = [backend.value(params, coefs), *backend.norms(params), backend.add_grad_(params, grads, coefs), *grads]
    out += backend.penalty_backward(params, torch.tensor(0.75, device=params[0].device), coefs)
    decayed = [p.clone() for p in params]
    backend.decay_(decayed, 0.1, coefs)
    return out + decayed


def check_int64_indexing(backend, device="cpu"):
    """Elements past index 2**31 are read and written where they are (int32 offsets would
    wrap): norms, decay, row-group value and add_grad_ on a 4 GiB bf16 tensor (8 GiB with its grad)."""
    import pytest

    n = 2**31 + 70_000
    try:
        w = torch.zeros(n, dtype=torch.bfloat16, device=device)
    except RuntimeError as error:  # out of memory
        pytest.skip(f"not enough memory on {device} for a {n}-element tensor: {error}")
    try:
        w[5] = 1.0
        w[2**31 + 3] = 3.0
        w[n - 1] = -4.0
        abs_sums, sq_sums = backend.norms([w])
        assert abs_sums.item() == 8.0 and sq_sums.item() == 26.0
        backend.decay_([w], 1.0, Coefficients(l1=0.5))
        assert w[5].item() == 0.5 and w[2**31 + 3].item() == 2.5 and w[n - 1].item() == -3.5
        assert w[2**31 + 2].item() == 0.0 and w[n - 2].item() == 0.0
        rows = w[: 2**31 + 65536].view(2, -1)  # two groups of 2**30 + 32768 elements
        value = backend.value([rows], Coefficients(group_lasso=1.0, group_dim=0))
        assert value.item() == pytest.approx(0.5 + 2.5)
        grad = torch.zeros_like(rows)
        assert backend.add_grad_([rows], [grad], Coefficients(l1=1.0)).item() == 3.0
        flat = grad.view(-1)
        assert flat[5].item() == 1.0 and flat[2**31 + 3].item() == 1.0
        assert flat[2**31 + 2].item() == 0.0 and torch.count_nonzero(flat).item() == 2
        del grad, flat
    finally:
        del w


# Every fastreg op and schema option, by name: (op, arguments from (params, grads, device)).
_OPCHECK = {
    "norms": ("norms", lambda P, G, d: (P,)),
    "value": ("value", lambda P, G, d: (P, 0.1, 0.2, 0.3, None)),
    "value_rows": ("value", lambda P, G, d: (P, 0.1, 0.2, 0.3, 0)),
    "add_grad_": ("add_grad_", lambda P, G, d: (P, G, 0.1, 0.2, 0.3, None)),
    "add_grad_rows": ("add_grad_", lambda P, G, d: (P, G, 0.1, 0.2, 0.3, 0)),
    "add_grad_elastic_net": ("add_grad_", lambda P, G, d: (P, G, 0.1, 0.2, 0.0, None)),
    "decay_": ("decay_", lambda P, G, d: (P, 0.1, None, 0.1, 0.2, 0.3, 0)),
    "decay_lr_tensor": ("decay_", lambda P, G, d: (P, 0.0, torch.tensor(0.1, device=d), 0.1, 0.2, 0.3, None)),
    "decay_lr_cpu_tensor": ("decay_", lambda P, G, d: (P, 0.0, torch.tensor(0.1), 0.1, 0.2, 0.0, None)),
    "penalty_backward": ("penalty_backward", lambda P, G, d: (P, torch.tensor(1.5, device=d), 0.1, 0.2, 0.3, 0)),
    "penalty_backward_bf16": ("penalty_backward",
                              lambda P, G, d: ([p.bfloat16() for p in P], torch.tensor(1.5, device=d), 0.1, 0.0, 0.3, None)),
}
OPCHECK_NAMES = tuple(_OPCHECK)


def opcheck_case(name, device="cpu"):
    """(op overload, args) of the opcheck case ``name`` of ``torch.ops.fastreg``."""
    d = torch.device(device)
    params = [torch.randn(3, 5, device=d), torch.randn(7, device=d), torch.randn(2, 3, 4, device=d), torch.randn((), device=d)]
    grads = [torch.randn_like(p) for p in params]
    op, arguments = _OPCHECK[name]
    return getattr(torch.ops.fastreg, op).default, arguments(params, grads, d)


def opcheck_cases(device="cpu"):
    """(name, op overload, args) of every case of :data:`OPCHECK_NAMES`."""
    return [(name, *opcheck_case(name, device)) for name in OPCHECK_NAMES]
