"""The ``cpp`` backend against the ``reference`` backend, op by op, plus its registration.

Tolerances are per dtype and tight: elementwise results (gradients, decayed weights) may differ
from the reference by an ulp or so of their dtype (the reference rounds some group norms and
scale factors through a different sequence of fp32 operations); reductions (values, norms) by
the reordering of an fp32 (fp64) sum.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import fastreg
from fastreg.backends import BACKENDS, Coefficients, auto_backend, get_backend
from fastreg.backends.base import accumulate_dtype
from reference import (
    COEFS,
    assert_bitwise_equal,
    assert_lists_close,
    check_int64_indexing,
    check_nan_inf_propagation,
    elementwise_tol,
    make_grads,
    make_params,
    noncontiguous_params,
    opcheck_cases,
    reduction_tol,
    run_all_ops,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

def _has_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="module", autouse=True)
def cpp_backend():
    reason = get_backend("cpp").unavailable_reason(torch.device("cpu"), torch.float32)
    if reason is not None:
        if _has_compiler():
            pytest.fail(f"the cpp backend must work where a C++ compiler exists, but: {reason}")
        pytest.skip(f"no C++ compiler: {reason}")
    return get_backend("cpp")


CPP = BACKENDS["cpp"]
REF = BACKENDS["reference"]


# ---------------------------------------------------------------------------------------------
# cpp vs torch, every op, coefficient kind and dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms(dtype):
    params = make_params(dtype)
    abs_sums, sq_sums = CPP.norms(params)
    ref_abs, ref_sq = REF.norms(params)
    acc = accumulate_dtype(dtype)
    assert abs_sums.dtype == sq_sums.dtype == acc and abs_sums.shape == (len(params),)
    torch.testing.assert_close(abs_sums, ref_abs, **reduction_tol(dtype))
    torch.testing.assert_close(sq_sums, ref_sq, **reduction_tol(dtype))


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value(dtype, coefs):
    params = make_params(dtype)
    value = CPP.value(params, coefs)
    assert value.shape == () and value.dtype == accumulate_dtype(dtype)
    torch.testing.assert_close(value, REF.value(params, coefs), **reduction_tol(dtype))


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_grad(dtype, coefs):
    params = make_params(dtype)
    before = [p.clone() for p in params]
    grads, ref_grads = make_grads(params), make_grads(params)
    value = CPP.add_grad_(params, grads, coefs)
    ref_value = REF.add_grad_(params, ref_grads, coefs)
    torch.testing.assert_close(value, ref_value, **reduction_tol(dtype))
    # The coupled value is the one value() returns, to the bit.
    assert torch.equal(value, CPP.value(params, coefs))
    assert_lists_close(grads, ref_grads, **elementwise_tol(dtype))
    assert_bitwise_equal(params, before)


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_penalty_backward(dtype, coefs):
    params = make_params(dtype)
    grad_output = torch.tensor(1.75, dtype=accumulate_dtype(dtype))
    out = CPP.penalty_backward(params, grad_output, coefs)
    assert [(g.shape, g.dtype) for g in out] == [(p.shape, p.dtype) for p in params]
    assert_lists_close(out, REF.penalty_backward(params, grad_output, coefs), **elementwise_tol(dtype))


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decay(dtype, coefs, lr_kind):
    lr = 0.5 if lr_kind == "float" else torch.tensor(0.5, dtype=torch.float64)
    params, ref_params = make_params(dtype), make_params(dtype)
    CPP.decay_(params, lr, coefs)
    REF.decay_(ref_params, lr, coefs)
    assert_lists_close(params, ref_params, **elementwise_tol(dtype))
    # the prox steps give exact zeros where the reference does
    for p, r in zip(params, ref_params):
        assert torch.equal(p == 0, r == 0)


def test_decay_zeroes_whole_groups():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    CPP.decay_([w], 1.0, Coefficients(group_lasso=1.0, group_dim=0))
    torch.testing.assert_close(w, torch.tensor([[2.4, 3.2], [0.0, 0.0], [0.0, 0.0]]), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# layouts, special values, determinism


@pytest.mark.parametrize("coefs", [COEFS["all"], COEFS["all_rows"], COEFS["elastic_net"]], ids=["all", "all_rows", "elastic_net"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous(dtype, coefs):
    params = noncontiguous_params(dtype)
    assert not any(p.is_contiguous() for p in params)
    contiguous = [p.contiguous() for p in params]
    tol = elementwise_tol(dtype)

    torch.testing.assert_close(CPP.value(params, coefs), CPP.value(contiguous, coefs), rtol=0, atol=0)
    assert_lists_close(CPP.norms(params), CPP.norms(contiguous), rtol=0, atol=0)

    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(*p.shape, 2, generator=gen).to(dtype)[..., 0] for p in params]
    assert not any(g.is_contiguous() for g in grads)
    ref_grads = [g.clone() for g in grads]
    value = CPP.add_grad_(params, grads, coefs)
    torch.testing.assert_close(value, REF.add_grad_(params, ref_grads, coefs), **reduction_tol(dtype))
    assert_lists_close(grads, ref_grads, **tol)

    go = torch.tensor(0.5)
    assert_lists_close(CPP.penalty_backward(params, go, coefs), REF.penalty_backward(params, go, coefs), **tol)

    ref_params = [p.clone() for p in params]
    CPP.decay_(params, 0.5, coefs)
    REF.decay_(ref_params, 0.5, coefs)
    assert_lists_close(params, ref_params, **tol)


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_inf_propagate_like_reference(dtype, coefs):
    check_nan_inf_propagation(CPP, dtype, coefs, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_across_runs_and_thread_counts(dtype):
    # Large enough that every op runs on several threads.
    params = make_params(dtype, shapes=[(300, 1000), (1_000_003,), (2000, 300), (77,), (5, 200_000)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        results_one = {k: run_all_ops(CPP, params, c) for k, c in COEFS.items()}
        torch.set_num_threads(2)
        for key, coefs in COEFS.items():
            first = run_all_ops(CPP, params, coefs)
            assert_bitwise_equal(first, results_one[key])
            assert_bitwise_equal(run_all_ops(CPP, params, coefs), first)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_int64_indexing_beyond_2_pow_31():
    check_int64_indexing(CPP)


# ---------------------------------------------------------------------------------------------
# registration: schemas, fake kernels, opcheck


@pytest.mark.parametrize("case", range(11))
def test_opcheck(case):
    name, op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_ops_check_their_inputs():
    ops = torch.ops.fastreg
    with pytest.raises(RuntimeError, match="params\\[1\\] is"):
        ops.norms([torch.randn(3), torch.randn(3, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="grads\\[0\\]"):
        ops.add_grad_([torch.randn(3)], [torch.randn(4)], 0.1, 0.0, 0.0, None)
    with pytest.raises(RuntimeError, match="group_dim"):
        ops.value([torch.randn(3)], 0.1, 0.0, 0.0, 1)
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        ops.norms([torch.ones(3, dtype=torch.int64)])


# ---------------------------------------------------------------------------------------------
# public API with backend="cpp", and the registry


def test_registry_and_auto():
    assert get_backend("cpp") is CPP
    assert auto_backend(torch.device("cpu"), torch.float32) is CPP
    assert CPP.unavailable_reason(torch.device("cpu"), torch.bfloat16) is None
    assert CPP.unavailable_reason(torch.device("meta"), torch.float32) == "cpp runs on CPU tensors only"


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 3)).to(dtype)


@pytest.mark.parametrize("group_dim", [None, 0])
def test_public_penalty_backward_chain(group_dim):
    kwargs = dict(l1=1e-3, l2=1e-2, group_lasso=1e-2, group_dim=group_dim)
    grads = {}
    for backend in ("cpp", "reference"):
        model = _model()
        x = torch.randn(8, 20, generator=torch.Generator().manual_seed(3))
        loss = model(x).square().mean() + fastreg.penalty(model.parameters(), backend=backend, **kwargs)
        loss.backward()
        grads[backend] = [p.grad for p in model.parameters()]
    assert_lists_close(grads["cpp"], grads["reference"], **elementwise_tol(torch.float32))


def test_public_coupled_and_decoupled_chain():
    results = {}
    for backend in ("cpp", "reference"):
        model = _model()
        params = list(model.parameters())
        for p in params:
            p.grad = torch.ones_like(p)
        value = fastreg.add_penalty_grad_(params, l1=1e-3, l2=1e-2, backend=backend)
        fastreg.decay_(params, lr=0.1, l1=1e-2, l2=1e-1, group_lasso=1e-2, group_dim=0, backend=backend)
        norms = fastreg.norms(params, backend=backend)
        results[backend] = [value, norms.l1, norms.l2_squared, *[p.grad for p in params], *[p.detach() for p in params]]
    assert_lists_close(results["cpp"][:3], results["reference"][:3], **reduction_tol(torch.float32))
    assert_lists_close(results["cpp"][3:], results["reference"][3:], **elementwise_tol(torch.float32))


def test_public_sgd_weight_decay_oracle():
    """Coupled l2 through the cpp backend is SGD(weight_decay=l2), up to one rounding per step."""
    models = [_model(), _model()]
    opt_ref = torch.optim.SGD(models[0].parameters(), lr=0.1, weight_decay=0.01)
    opt = torch.optim.SGD(models[1].parameters(), lr=0.1)
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        for m, o in zip(models, (opt_ref, opt)):
            o.zero_grad()
            m(x).square().mean().backward()
        fastreg.add_penalty_grad_(models[1].parameters(), l2=0.01, backend="cpp")
        opt_ref.step()
        opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# torch.compile (the build machinery's tests are in test_build.py)


def test_torch_compile_fullgraph():
    """The mutating ops functionalize: a compiled graph gives the eager results, in place."""
    ops = torch.ops.fastreg

    def step(params, grads, lr):
        value = ops.add_grad_(params, grads, 0.1, 0.2, 0.3, 0)
        ops.decay_(params, 0.0, lr, 0.1, 0.2, 0.3, None)
        return value + ops.norms(params)[0].sum()

    params, grads = make_params(torch.float32, shapes=[(30, 20), (7,)]), make_grads(make_params(torch.float32, shapes=[(30, 20), (7,)]))
    eager = ([p.clone() for p in params], [g.clone() for g in grads])
    expected = step(*eager, torch.tensor(0.1))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(params, grads, torch.tensor(0.1)), expected)
    assert_bitwise_equal(params + grads, eager[0] + eager[1])
