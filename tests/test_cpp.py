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
from reference import (
    COEFS,
    assert_bitwise_equal,
    assert_lists_close,
    check_int64_indexing,
    elementwise_tol,
    make_grads,
    make_params,
    OPCHECK_NAMES,
    opcheck_case,
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
# what only the cpp kernels promise; their op-by-op agreement with the reference backend is
# tests/test_conformance.py's


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
def test_coupled_value_is_value_to_the_bit(coefs):
    params = make_params(torch.float32)
    value = CPP.add_grad_(params, make_grads(params), coefs)
    assert torch.equal(value, CPP.value(params, coefs))


def test_decay_zeroes_whole_groups():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    CPP.decay_([w], 1.0, Coefficients(group_lasso=1.0, group_dim=0))
    torch.testing.assert_close(w, torch.tensor([[2.4, 3.2], [0.0, 0.0], [0.0, 0.0]]), rtol=0, atol=1e-7)


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


@pytest.mark.parametrize("name", OPCHECK_NAMES)
def test_opcheck(name):
    torch.library.opcheck(*opcheck_case(name))


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
