"""What only the ``cpp`` backend promises: the same bits on any thread count, int64 indexing,
its ops' input checks, ``auto``'s choice on the CPU, a model's coupled and decoupled calls, and
coupled l2 as SGD's weight decay. Its op-by-op agreement with the ``reference`` backend,
opcheck and ``torch.compile`` are tests/test_conformance.py's ``cpp`` target.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import fastreg
from fastreg.backends import BACKENDS, auto_backend, get_backend
from reference import (
    COEFS,
    assert_bitwise_equal,
    assert_lists_close,
    check_int64_indexing,
    elementwise_tol,
    make_params,
    reduction_tol,
    run_all_ops,
)


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


# ---------------------------------------------------------------------------------------------
# determinism and indexing


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
# registration: input checks (opcheck and torch.compile are tests/test_conformance.py's)


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
