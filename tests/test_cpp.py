"""The ``cpp`` backend against the ``torch`` reference, op by op, plus its build and registration.

Tolerances are per dtype and tight: elementwise results (gradients, decayed weights) may differ
from the reference by an ulp or so of their dtype (the reference rounds some group norms and
scale factors through a different sequence of fp32 operations); reductions (values, norms) by
the reordering of an fp32 (fp64) sum.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import fastreg
from fastreg import _build
from fastreg.backends import BACKENDS, Coefficients, auto_backend, get_backend
from fastreg.backends.base import accumulate_dtype

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

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
REF = BACKENDS["torch"]


def elementwise_tol(dtype):
    eps = torch.finfo(dtype).eps
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=eps, atol=eps)
    return dict(rtol=4 * eps, atol=4 * eps)


def reduction_tol(dtype):
    return dict(rtol=1e-12, atol=1e-300) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-30)


def make_params(dtype, seed=0, shapes=SHAPES):
    """Random weights with exact zeros, an all-zero tensor, near-zero rows (so prox steps zero some
    groups) and elements under the soft threshold."""
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
        params.append(w.to(dtype))
    return params


def make_grads(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]


def assert_lists_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"tensor {i}: {m}", **tol)


def assert_bitwise_equal(actual, expected):
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a, e.view(-1).view(torch.uint8) if e.numel() else e)


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


def _noncontiguous(dtype):
    base = make_params(dtype, shapes=[(64, 40), (9, 70000), (30, 20, 4), (1000,)])
    return [base[0].t(), base[1][:, ::2], base[2].permute(2, 0, 1), base[3][::3]]


@pytest.mark.parametrize("coefs", [COEFS["all"], COEFS["all_rows"], COEFS["elastic_net"]], ids=["all", "all_rows", "elastic_net"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous(dtype, coefs):
    params = _noncontiguous(dtype)
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
    """NaN and Inf follow the reference exactly: sign(NaN) = 0, a zero coefficient adds
    nothing (no 0 * inf), a NaN group norm gives the group a zero group-lasso scale."""
    shapes = [(4, 6), (5,), (3, 70000), (8, 8)]
    params = make_params(dtype, shapes=shapes)
    params[0][0, 1] = float("nan")
    params[0][2, 3] = float("inf")
    params[1][2] = float("-inf")
    params[2][1, 65537] = float("nan")
    grads, ref_grads = make_grads(params), make_grads(params)

    value, ref_value = CPP.add_grad_(params, grads, coefs), REF.add_grad_(params, ref_grads, coefs)
    torch.testing.assert_close(value, ref_value, equal_nan=True, **reduction_tol(dtype))
    if not coefs.is_zero():
        assert torch.isnan(value)
    assert_lists_close(grads, ref_grads, **elementwise_tol(dtype))
    torch.testing.assert_close(CPP.value(params, coefs), ref_value, equal_nan=True, **reduction_tol(dtype))
    assert_lists_close(CPP.norms(params), REF.norms(params), **reduction_tol(dtype))

    go = torch.tensor(2.0)
    assert_lists_close(CPP.penalty_backward(params, go, coefs), REF.penalty_backward(params, go, coefs), **elementwise_tol(dtype))

    ref_params = [p.clone() for p in params]
    CPP.decay_(params, 0.25, coefs)
    REF.decay_(ref_params, 0.25, coefs)
    assert_lists_close(params, ref_params, **elementwise_tol(dtype))


def _run_all_ops(params, coefs):
    grads = make_grads(params)
    out = [CPP.value(params, coefs), *CPP.norms(params), CPP.add_grad_(params, grads, coefs), *grads]
    out += CPP.penalty_backward(params, torch.tensor(0.75), coefs)
    decayed = [p.clone() for p in params]
    CPP.decay_(decayed, 0.1, coefs)
    return out + decayed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_across_runs_and_thread_counts(dtype):
    # Large enough that every op runs on several threads.
    params = make_params(dtype, shapes=[(300, 1000), (1_000_003,), (2000, 300), (77,), (5, 200_000)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        results_one = {k: _run_all_ops(params, c) for k, c in COEFS.items()}
        torch.set_num_threads(2)
        for key, coefs in COEFS.items():
            first = _run_all_ops(params, coefs)
            assert_bitwise_equal(first, results_one[key])
            assert_bitwise_equal(_run_all_ops(params, coefs), first)
    finally:
        torch.set_num_threads(threads)


def test_int64_indexing_beyond_2_pow_31():
    """Elements past index 2**31 are read and written where they are (int32 offsets would wrap)."""
    n = 2**31 + 70_000
    try:
        w = torch.zeros(n, dtype=torch.bfloat16)
    except RuntimeError as error:  # allocation failure
        pytest.skip(f"not enough memory for a {n}-element tensor: {error}")
    try:
        w[5] = 1.0
        w[2**31 + 3] = 3.0
        w[n - 1] = -4.0
        abs_sums, sq_sums = CPP.norms([w])
        assert abs_sums.item() == 8.0 and sq_sums.item() == 26.0
        CPP.decay_([w], 1.0, Coefficients(l1=0.5))
        assert w[5].item() == 0.5 and w[2**31 + 3].item() == 2.5 and w[n - 1].item() == -3.5
        assert w[2**31 + 2].item() == 0.0 and w[n - 2].item() == 0.0
        rows = w[: 2**31 + 65536].view(2, -1)  # two groups of 2**30 + 32768 elements
        value = CPP.value([rows], Coefficients(group_lasso=1.0, group_dim=0))
        assert value.item() == pytest.approx(0.5 + 2.5)
    finally:
        del w


# ---------------------------------------------------------------------------------------------
# registration: schemas, fake kernels, opcheck


def _opcheck_cases():
    params = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 3, 4, dtype=torch.float32), torch.randn(())]
    grads = [torch.randn_like(p) for p in params]
    ops = torch.ops.fastreg
    return [
        ("norms", ops.norms.default, (params,)),
        ("value", ops.value.default, (params, 0.1, 0.2, 0.3, None)),
        ("value_rows", ops.value.default, (params, 0.1, 0.2, 0.3, 0)),
        ("add_grad_", ops.add_grad_.default, (params, grads, 0.1, 0.2, 0.3, None)),
        ("add_grad_rows", ops.add_grad_.default, (params, grads, 0.1, 0.2, 0.3, 0)),
        ("decay_", ops.decay_.default, (params, 0.1, None, 0.1, 0.2, 0.3, 0)),
        ("decay_lr_tensor", ops.decay_.default, (params, 0.0, torch.tensor(0.1), 0.1, 0.2, 0.3, None)),
        ("penalty_backward", ops.penalty_backward.default, (params, torch.tensor(1.5), 0.1, 0.2, 0.3, 0)),
        ("penalty_backward_bf16", ops.penalty_backward.default, ([p.bfloat16() for p in params], torch.tensor(1.5), 0.1, 0.0, 0.3, None)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    name, op, args = _opcheck_cases()[case]
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
    for backend in ("cpp", "torch"):
        model = _model()
        x = torch.randn(8, 20, generator=torch.Generator().manual_seed(3))
        loss = model(x).square().mean() + fastreg.penalty(model.parameters(), backend=backend, **kwargs)
        loss.backward()
        grads[backend] = [p.grad for p in model.parameters()]
    assert_lists_close(grads["cpp"], grads["torch"], **elementwise_tol(torch.float32))


def test_public_coupled_and_decoupled_chain():
    results = {}
    for backend in ("cpp", "torch"):
        model = _model()
        params = list(model.parameters())
        for p in params:
            p.grad = torch.ones_like(p)
        value = fastreg.add_penalty_grad_(params, l1=1e-3, l2=1e-2, backend=backend)
        fastreg.decay_(params, lr=0.1, l1=1e-2, l2=1e-1, group_lasso=1e-2, group_dim=0, backend=backend)
        norms = fastreg.norms(params, backend=backend)
        results[backend] = [value, norms.l1, norms.l2_squared, *[p.grad for p in params], *[p.detach() for p in params]]
    assert_lists_close(results["cpp"][:3], results["torch"][:3], **reduction_tol(torch.float32))
    assert_lists_close(results["cpp"][3:], results["torch"][3:], **elementwise_tol(torch.float32))


def test_public_sgd_weight_decay_oracle():
    """Coupled l2 through the cpp backend is SGD(weight_decay=l2)."""
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
# build machinery


def test_import_builds_nothing():
    code = "import fastreg, fastreg._build as b; import sys; sys.exit(1 if b.CPU._done else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_all_reports_built():
    assert _build.build_all(verbose=False) == {"fastreg_cpu": "built"}


def test_name_hashes_sources(tmp_path):
    for name in ("a.cpp", "h.h"):
        (tmp_path / name).write_text("int x = 1;\n")
    ext = _build._Extension("fastreg_probe", ["a.cpp"], ["h.h"], root=tmp_path)
    first = ext.versioned_name()
    assert first.startswith("fastreg_probe_") and first == ext.versioned_name()
    (tmp_path / "h.h").write_text("int x = 2;\n")
    assert ext.versioned_name() != first
    assert _build.CPU.versioned_name().startswith("fastreg_cpu_")


def test_failed_build_warns_once_and_reports_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(tmp_path / "build"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cpp").write_text("#include <torch/library.h>\nint f() { return undefined_name; }\n")
    ext = _build._Extension("fastreg_broken", ["broken.cpp"], [], root=src)
    with pytest.warns(RuntimeWarning, match="undefined_name"):
        reason = ext.ensure()
    assert reason.startswith("build failed:") and "error:" in reason and "\n" not in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext.ensure() == reason
    assert (tmp_path / "build" / ext.versioned_name()).is_dir()


def test_missing_sources_are_a_reason_not_a_crash(tmp_path):
    ext = _build._Extension("fastreg_missing", ["nowhere.cpp"], [], root=tmp_path)
    with pytest.warns(RuntimeWarning):
        assert "not found" in ext.ensure()


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
