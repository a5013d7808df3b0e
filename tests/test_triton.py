"""The ``triton`` backend against the ``reference`` backend, op by op.

On a machine with a GPU these run on CUDA tensors at full size; without one, on CPU
tensors under Triton's interpreter (conftest sets ``TRITON_INTERPRET=1`` before the
kernels are defined), with every case kept under ~100K elements. They are skipped only
where Triton cannot be imported.

Contiguous tensors run from the plan's table (``table_ops``); non-contiguous ones, the
penalty's backward and compiled code from the list ops' tables.
"""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import fastreg
from fastreg import _build, _calls, _plan
from fastreg.backends import BACKENDS, Coefficients, auto_backend
from fastreg import kernels

pytestmark = pytest.mark.skipif(kernels.triton_import_error() is not None, reason=str(kernels.triton_import_error()))

if kernels.triton_import_error() is None:
    from fastreg.kernels import triton_decay, triton_grad, triton_norms, triton_table

from conftest import DTYPES, ODD_SHAPES

ORACLE = "reference"

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
TRITON = BACKENDS["triton"]

COEFFICIENTS = [
    dict(l1=0.3),
    dict(l2=0.7),
    dict(group_lasso=0.5),
    dict(l1=0.1, l2=0.2),
    dict(l1=0.1, l2=0.2, group_lasso=0.3),
    dict(group_lasso=0.5, group_dim=0),
    dict(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0),
]
COEF_IDS = ["l1", "l2", "group_lasso", "elasticnet", "elasticnet+group", "rows", "elasticnet+rows"]

# Triton and torch both accumulate in fp32 (fp64 for fp64) but sum in different orders:
# values agree to a few fp32 (fp64) roundings; tensors written in the parameter dtype are
# rounded once from nearly equal fp32 results, so they agree to one ulp of that dtype.
VALUE_RTOL = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}
TENSOR_TOL = {
    torch.float64: dict(rtol=1e-13, atol=1e-15),
    torch.float32: dict(rtol=1e-6, atol=1e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-7),
}

BLOCK = triton_table.BLOCK if kernels.triton_import_error() is None else 1024
# Odd shapes, sizes around the vector width and rows of several lengths (few rows: under
# the interpreter every row is a program); on a GPU also large tensors.
SHAPES = ODD_SHAPES[:-1] + [(BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (5, 3, 7), (9, 65)]
if GPU:
    SHAPES += [(4096, 1024), (3, 1_000_003), (50_257, 64)]


def make(shapes, dtype=torch.float32, seed=0, grad=False, device=DEVICE, zero_fraction=0.1):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        w = torch.randn(shape, generator=generator, dtype=torch.float64)
        w[torch.rand(shape, generator=generator) < zero_fraction] = 0
        p = w.to(device=device, dtype=dtype).requires_grad_()
        if grad:
            p.grad = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        params.append(p)
    return params


def clone(params, grad=False):
    out = []
    for p in params:
        c = p.detach().clone().requires_grad_(p.requires_grad)
        if grad and p.grad is not None:
            c.grad = p.grad.clone()
        out.append(c)
    return out


def assert_value(got, want, dtype):
    assert got.dtype == want.dtype and got.device == want.device
    torch.testing.assert_close(got, want, rtol=VALUE_RTOL[dtype], atol=1e-12, equal_nan=True)


def assert_tensors(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, **TENSOR_TOL[w.dtype], equal_nan=True)


def run_all_ops(params, coefs):
    """Every op of one backend on copies of ``params``: value and backward (through
    fastreg.penalty), add_penalty_grad_, decay_ with a float and a tensor lr, and norms."""
    results = {}
    for backend in ("triton", ORACLE):
        ps = clone(params)
        value = fastreg.penalty(ps, **coefs, backend=backend)
        if value.requires_grad:
            value.backward()
        grads = clone(params, grad=True)
        coupled = fastreg.add_penalty_grad_(grads, **coefs, backend=backend)
        float_lr, tensor_lr = clone(params), clone(params)
        fastreg.decay_(float_lr, 0.4, **coefs, backend=backend)
        fastreg.decay_(tensor_lr, torch.tensor(0.4, device=params[0].device), **coefs, backend=backend)
        norms = fastreg.norms(params, backend=backend)
        results[backend] = dict(
            value=value.detach(),
            backward=[p.grad if p.grad is not None else torch.zeros_like(p) for p in ps],
            coupled=coupled,
            coupled_grads=[p.grad for p in grads],
            float_lr=[p.detach() for p in float_lr],
            tensor_lr=[p.detach() for p in tensor_lr],
            norms=norms,
        )
    return results["triton"], results[ORACLE]


def assert_same_results(got, want, dtype):
    assert_value(got["value"], want["value"], dtype)
    assert_value(got["coupled"], want["coupled"], dtype)
    assert_tensors(got["backward"], want["backward"])
    assert_tensors(got["coupled_grads"], want["coupled_grads"])
    assert_tensors(got["float_lr"], want["float_lr"])
    assert_tensors(got["tensor_lr"], want["tensor_lr"])
    for field in ("l1", "l2_squared", "tensor_l1", "tensor_l2"):
        assert_value(getattr(got["norms"], field), getattr(want["norms"], field), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coefs", COEFFICIENTS, ids=COEF_IDS)
def test_every_op_matches_reference_backend(dtype, coefs):
    params = make(SHAPES, dtype, grad=True)
    assert_same_results(*run_all_ops(params, coefs), dtype)


def test_many_tiny_tensors():
    generator = torch.Generator().manual_seed(1)
    shapes = [tuple(torch.randint(0, 4, (int(torch.randint(0, 4, (1,), generator=generator)),), generator=generator).tolist()) for _ in range(300)]
    params = make(shapes, grad=True)
    assert_same_results(*run_all_ops(params, dict(l1=0.1, l2=0.2, group_lasso=0.3)), torch.float32)


def test_empty_and_scalar_tensors():
    for shapes in ([(0,)], [(0, 3), (2, 0, 3)], [()], [(1,)], [(1, 1)], [(), (0,), (1,)]):
        params = make(shapes, grad=True)
        for coefs in (dict(l1=0.5, l2=0.5, group_lasso=0.5), dict(group_lasso=0.5, group_dim=0)):
            assert_same_results(*run_all_ops(params, coefs), torch.float32)


@pytest.fixture
def small_chunks(monkeypatch):
    """Items of 2 * BLOCK elements: many items per tensor (and per row) without large tensors.
    Cached plans and tables hold the old layout, so they go too."""
    monkeypatch.setattr(triton_table, "CHUNK", 2 * BLOCK)
    _plan.clear()
    triton_table.TABLES.clear()
    yield
    _plan.clear()
    triton_table.TABLES.clear()


@pytest.mark.parametrize("rows", [False, True])
def test_chunk_boundaries(small_chunks, rows):
    shapes = [(2 * BLOCK,), (2 * BLOCK + 1,), (2 * BLOCK - 1,), (5 * BLOCK + 7,), (3, 2 * BLOCK + 5), (7, BLOCK)]
    params = make(shapes, grad=True)
    coefs = dict(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0 if rows else None)
    assert_same_results(*run_all_ops(params, coefs), torch.float32)
    table = triton_table.build([params], rows=rows)
    # 1-D: 1 + 2 + 1 + 3 items. (3, 2B+5): 4 items of the tensor, or 3 rows of 2 items. (7, B):
    # 4 items of the tensor, or its rows packed two to an item, the last alone.
    assert table.items == (7 + 6 + 4 if rows else 7 + 4 + 4)
    assert table.groups == (4 + 3 + 7 if rows else 6)


def test_many_items_per_group_and_many_finalize_programs(small_chunks, monkeypatch):
    # A group of more items than a finalize step reads, and more finalize programs than the
    # last one adds per step: both loops of the finalize run several steps.
    monkeypatch.setattr(triton_norms, "GROUPS_PER_PROGRAM", {torch.float32: 1, torch.float64: 1})
    monkeypatch.setattr(triton_norms, "ITEMS_PER_STEP", 2)
    monkeypatch.setattr(triton_norms, "SHARES_PER_STEP", 4)
    shapes = [(5 * 2 * BLOCK - 5,)] + [(3,)] * 9
    params = make(shapes, grad=True)
    for coefs in (dict(l1=0.1, l2=0.2), dict(l1=0.1, l2=0.2, group_lasso=0.3)):
        assert_same_results(*run_all_ops(params, coefs), torch.float32)


def test_non_contiguous_inputs_are_read_and_written_through():
    base = torch.randn(40, 64, dtype=torch.float64, device=DEVICE)
    views = [base.t(), base[:, ::2], base[3:17, 5:50], base[::3, 1]]
    assert not any(v.is_contiguous() for v in views)
    for coefs in (dict(l1=0.2, l2=0.3), dict(l1=0.2, l2=0.3, group_lasso=0.4, group_dim=0)):
        want_value = fastreg.penalty(views, **coefs, backend=ORACLE)
        assert_value(fastreg.penalty(views, **coefs, backend="triton"), want_value, torch.float64)
        for lr in (0.5, torch.tensor(0.5, device=DEVICE)):
            mine, ref = base.clone(), base.clone()
            fastreg.decay_([mine[:, ::2], mine[3:17, 1::2]], lr, **coefs, backend="triton")
            fastreg.decay_([ref[:, ::2], ref[3:17, 1::2]], lr, **coefs, backend=ORACLE)
            assert_tensors([mine], [ref])
    params = [torch.randn(6, 5, dtype=torch.float64, device=DEVICE).requires_grad_() for _ in range(2)]
    grad_base = torch.randn(5, 12, dtype=torch.float64, device=DEVICE)
    params[0].grad, params[1].grad = grad_base[:, :6].t(), grad_base[:, 6:].t()
    want_base = grad_base.clone()
    want_value = fastreg.penalty(params, l1=0.1, group_lasso=0.2, group_dim=0, backend=ORACLE)
    want_base[:, :6] += torch.autograd.grad(fastreg.penalty(params[0], l1=0.1, group_lasso=0.2, group_dim=0, backend=ORACLE), params[0])[0].t()
    want_base[:, 6:] += torch.autograd.grad(fastreg.penalty(params[1], l1=0.1, group_lasso=0.2, group_dim=0, backend=ORACLE), params[1])[0].t()
    value = fastreg.add_penalty_grad_(params, l1=0.1, group_lasso=0.2, group_dim=0, backend="triton")
    assert_value(value, want_value, torch.float64)
    assert_tensors([grad_base], [want_base])  # written into the grads' own (strided) memory


def test_staged_tensors_do_not_fill_the_cache():
    triton_table.TABLES.clear()
    views = [torch.randn(8, 6, device=DEVICE).t() for _ in range(3)]
    for _ in range(3):
        fastreg.penalty(views, l1=0.1, backend="triton")
    assert len(triton_table.TABLES) == 0 and triton_table.TABLES.builds == 3


# numpy, which runs the interpreter, warns where inf * 0 makes the NaN both backends produce
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("coefs", [COEFFICIENTS[i] for i in (0, 1, 2, 6)], ids=[COEF_IDS[i] for i in (0, 1, 2, 6)])
def test_nan_and_inf_propagate_like_torch(bad, coefs):
    params = make([(3, 5), (4,), (2, 2)], grad=True)
    with torch.no_grad():
        params[0][1, 2] = bad
        params[1][0] = bad
    assert_same_results(*run_all_ops(params, coefs), torch.float32)


def test_results_are_bit_identical_run_to_run(small_chunks):
    params = make([(7, 3 * BLOCK + 11), (5 * BLOCK,), (3, 5, 7)], grad=True)
    coefs = dict(l1=0.1, l2=0.2, group_lasso=0.3)
    first = run_all_ops(params, coefs)[0]
    again = run_all_ops(params, coefs)[0]
    for key in ("value", "coupled"):
        assert torch.equal(first[key], again[key])
    for key in ("backward", "coupled_grads", "float_lr", "tensor_lr"):
        assert all(torch.equal(a, b) for a, b in zip(first[key], again[key]))
    assert all(torch.equal(a, b) for a, b in zip(first["norms"], again["norms"]))


def test_table_words_are_those_of_plan_h():
    """The kernels read the planner's table through the word indices of plan.h."""
    params = make([(3, 4), (5,), (0, 2)])
    host = _build.planner().layout(torch.tensor([[12, 3], [5, 1], [0, 0]]), True, 2, 64, 4)
    words = host.tolist()
    table = triton_table.to_device(host, torch.device("cpu"))
    assert (table.tensors, table.groups, table.items, table.lists, table.row_groups, table.numel) == (3, 4, 1, 2, True, 17)
    assert words[triton_table.H_CHUNK.value] == 64
    assert words[triton_table.H_WORDS.value] == host.numel()
    ptrs = words[triton_table.H_PTRS_AT.value]
    assert ptrs == triton_table.HEADER_WORDS
    groups = words[triton_table.H_GROUPS_AT.value]
    items = words[triton_table.H_ITEMS_AT.value]
    group = lambda g, field: words[groups + g * triton_table.GROUP_WORDS.value + field.value]  # noqa: E731
    # the rows of (3, 4), then (5,) whole; (0, 2) has no rows, so no group
    assert [group(g, triton_table.GROUP_START) for g in range(4)] == [0, 4, 8, 0]
    assert [group(g, triton_table.GROUP_LEN) for g in range(4)] == [4, 4, 4, 5]
    assert [group(g, triton_table.GROUP_TENSOR) for g in range(4)] == [0, 0, 0, 1]
    item = words[items:items + triton_table.ITEM_WORDS.value]
    assert [item[f.value] for f in (triton_table.ITEM_GROUP, triton_table.ITEM_GROUP_END,
                                    triton_table.ITEM_OFFSET, triton_table.ITEM_LEN)] == [0, 4, 0, 17]
    _build.planner().set_ptrs(host, 0, params)
    assert words[ptrs] == 0 and host[ptrs].item() == params[0].data_ptr()


def test_plan_table_is_built_once_per_list_and_rebuilt_on_change(monkeypatch):
    _plan.clear()
    built = []
    to_device = triton_table.to_device
    monkeypatch.setattr(triton_table, "to_device", lambda host, device: built.append(host) or to_device(host, device))
    params = make([(4, 3), (5,), (2, 2)], grad=True)
    for _ in range(3):
        fastreg.norms(params, backend="triton")
    assert len(built) == 1

    params[1] = make([(5,)], seed=1)[0]  # a replaced tensor lives at another address
    fastreg.norms(params, backend="triton")
    assert len(built) == 2

    with torch.no_grad():
        params[0].data = torch.randn(9, 3, device=DEVICE)  # resized
    params[0].grad = torch.zeros_like(params[0])
    n = fastreg.norms(params, backend="triton")
    assert len(built) == 3
    torch.testing.assert_close(n.tensor_l1[0], params[0].detach().abs().sum())

    # params and params + grads, tensors and rows are different tables of one list
    for _ in range(2):
        fastreg.add_penalty_grad_(params, l1=0.1, backend="triton")
        fastreg.penalty(params, group_lasso=0.1, group_dim=0, backend="triton")
    assert len(built) == 5


def test_a_cached_call_runs_no_python_per_tensor(monkeypatch):
    """From a cached plan the kernels take the plan's table: the call's tensors are never
    selected in Python, and the list ops (and the custom-op machinery) are not involved."""
    _plan.clear()
    params = make([(4, 3), (5,), (2, 2)], grad=True)
    calls = [
        lambda: fastreg.add_penalty_grad_(params, l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0, backend="triton"),
        lambda: fastreg.norms(params, backend="triton"),
        lambda: fastreg.decay_(params, lr=0.1, l1=0.1, group_lasso=0.2, backend="triton"),
        lambda: fastreg.decay_(params, lr=torch.tensor(0.1, device=DEVICE), l2=0.1, backend="triton"),
    ]
    for call in calls:
        call()

    def refuse(*args, **kwargs):
        raise AssertionError("a cached call ran per-tensor Python or a list op")

    monkeypatch.setattr(_calls, "_params", refuse)
    for module, names in ((triton_norms, ("norms_of", "value_of")), (triton_grad, ("add_grad_of",)),
                          (triton_decay, ("decay_of",)), (triton_table, ("build", "to_device"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)
    for call in calls:
        call()


def test_list_op_tables_are_cached_per_list():
    triton_table.TABLES.clear()
    params = make([(4, 3), (5,), (2, 2)])
    for _ in range(3):
        fastreg.penalty(params, l1=0.1, group_lasso=0.2, group_dim=0, backend="triton").backward()
    # the backward's table: built once, whatever its outputs' addresses; the forward runs from the plan
    assert triton_table.TABLES.builds == 1 and triton_table.TABLES.hits == 2


def test_list_op_table_cache_is_bounded(monkeypatch):
    triton_table.TABLES.clear()
    monkeypatch.setattr(triton_table.TABLES, "size", 4)
    lists = [make([(3,)], seed=i) for i in range(6)]
    for params in lists:
        triton_norms.norms_of(params)
    assert len(triton_table.TABLES) == 4
    triton_norms.norms_of(lists[-1])  # most recent: still cached
    assert triton_table.TABLES.builds == 6
    triton_norms.norms_of(lists[0])  # least recent: dropped
    assert triton_table.TABLES.builds == 7


@pytest.fixture
def launches(monkeypatch):
    """Kernel launches, in order: (kernel name, grid, keyword arguments)."""
    recorded = []
    for module, name in ((triton_norms, "sums_kernel"), (triton_norms, "finalize_kernel"),
                         (triton_grad, "grad_kernel"), (triton_decay, "decay_kernel")):
        kernel = getattr(module, name)

        def counted(*args, _run=kernel.run, _name=name, **kwargs):
            recorded.append((_name, kwargs["grid"], kwargs))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    return recorded


def names(recorded):
    return [name for name, _, _ in recorded]


@pytest.mark.parametrize("count", [1, 300])
def test_launches_per_call_do_not_grow_with_tensor_count(launches, count):
    params = make([(2,)] * count, grad=True)
    elastic, group = dict(l1=0.1, l2=0.2), dict(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0)
    expected = [
        (lambda: fastreg.add_penalty_grad_(params, **elastic, backend="triton"), ["grad_kernel", "finalize_kernel"]),
        (lambda: fastreg.norms(params, backend="triton"), ["sums_kernel", "finalize_kernel"]),
        (lambda: fastreg.penalty(params, **elastic, backend="triton").backward(),
         ["sums_kernel", "finalize_kernel", "grad_kernel"]),
        (lambda: fastreg.decay_(params, 0.1, **elastic, backend="triton"), ["decay_kernel"]),
        (lambda: fastreg.add_penalty_grad_(params, **group, backend="triton"),
         ["sums_kernel", "finalize_kernel", "grad_kernel"]),
        (lambda: fastreg.decay_(params, 0.1, **group, backend="triton"),
         ["sums_kernel", "finalize_kernel", "decay_kernel"]),
    ]
    for call, kernels_run in expected:
        launches.clear()
        call()
        assert names(launches) == kernels_run
        # every launch states the contraction it compiles with, not Triton's default
        assert all(kwargs["enable_fp_fusion"] is False for _, _, kwargs in launches)


def test_rows_are_packed_into_items(launches):
    # 64 rows of 48 elements: one program per item of up to MAX_GROUPS rows, not one per row.
    params = make([(64, 48), (5,)], grad=True)
    fastreg.add_penalty_grad_(params, group_lasso=0.3, group_dim=0, backend="triton")
    grids = {name: grid for name, grid, _ in launches}
    rows_per_item = triton_table.MAX_GROUPS
    assert grids["sums_kernel"] == grids["grad_kernel"] == (64 // rows_per_item + 1,)
    assert grids["finalize_kernel"] == (1,)


def test_zero_coefficients_launch_nothing(launches):
    params = make([(4, 3)], grad=True)
    assert fastreg.add_penalty_grad_(params, backend="triton").item() == 0.0
    fastreg.decay_(params, lr=0.5, backend="triton")
    assert fastreg.penalty(params, backend="triton").item() == 0.0
    assert launches == []


def _opcheck_cases():
    params = make([(3, 4), (5,), ()], grad=True)
    grads = [p.grad for p in params]
    detached = [p.detach() for p in params]
    go = torch.tensor(1.5, device=DEVICE)
    return [
        (torch.ops.fastreg_triton.norms, (detached,)),
        (torch.ops.fastreg_triton.value, (detached, 0.1, 0.2, 0.3, 0)),
        (torch.ops.fastreg_triton.add_grad_, (detached, grads, 0.1, 0.2, 0.0, None)),
        (torch.ops.fastreg_triton.add_grad_, (detached, grads, 0.1, 0.2, 0.3, 0)),
        (torch.ops.fastreg_triton.penalty_backward, (detached, go, 0.1, 0.2, 0.3, None)),
        (torch.ops.fastreg_triton.decay_, (detached, 0.1, None, 0.1, 0.2, 0.3, 0)),
        (torch.ops.fastreg_triton.decay_, (detached, 0.0, torch.tensor(0.1, device=DEVICE), 0.1, 0.2, 0.0, None)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_schemas_declare_what_each_op_writes():
    ops = torch.ops.fastreg_triton
    assert "Tensor(a1!)[] grads" in str(ops.add_grad_.default._schema)
    assert "Tensor(a0!)[] params" in str(ops.decay_.default._schema)
    for op in (ops.norms, ops.value, ops.penalty_backward):
        assert "!" not in str(op.default._schema)


@pytest.mark.slow
def test_compiled_fullgraph_matches_eager():
    import torch._dynamo

    torch._dynamo.reset()
    params = make([(7, 13), (129,), (3, 1, 5)], grad=True)
    twins = clone(params, grad=True)

    def step(ps):
        return fastreg.add_penalty_grad_(ps, l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0, backend="triton")

    got = torch.compile(step, fullgraph=True)(params)
    want = step(twins)
    assert torch.equal(got, want)
    assert all(torch.equal(p.grad, t.grad) for p, t in zip(params, twins))


def test_auto_never_picks_the_interpreter():
    assert auto_backend(torch.device("cpu"), torch.float32).name != "triton"
    assert not TRITON.auto_eligible(torch.device("cpu"))
    if GPU:
        assert auto_backend(torch.device("cuda"), torch.float32).name == "triton"


def test_unavailable_reasons():
    assert TRITON.unavailable_reason(DEVICE, torch.float32) is None
    assert "CUDA" in TRITON.unavailable_reason(torch.device("mps"), torch.float32)
    assert kernels.interpreted() == (not GPU)


def test_backend_ops_directly():
    # The op set as the dispatch calls it, including a 0-d grad_output of another dtype.
    params = make([(4, 3), (2,)], dtype=torch.bfloat16)
    coefs = Coefficients(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0)
    go = torch.tensor(2.0, dtype=torch.float64, device=DEVICE)
    got = TRITON.penalty_backward([p.detach() for p in params], go, coefs)
    want = BACKENDS[ORACLE].penalty_backward([p.detach() for p in params], go, coefs)
    assert_tensors(got, want)
    abs_sums, sq_sums = TRITON.norms([p.detach() for p in params])
    assert abs_sums.shape == sq_sums.shape == (2,) and abs_sums.dtype == torch.float32


def test_misaligned_and_odd_runs_take_the_general_path(small_chunks):
    # Views starting one element into their storage: no run is 16-byte aligned, in items of
    # split tensors, of packed tensors and of packed rows; rows of odd length misalign the
    # rows after the first even in an aligned tensor.
    bases = make([(5 * BLOCK + 1,), (40,), (3 * 33 + 1,), (6 * 7,)], grad=True)
    params = []
    with torch.no_grad():
        for base, shape in zip(bases[:3], [(5 * BLOCK,), (39,), (3, 33)]):
            view = base.detach()[1:].view(shape).requires_grad_()
            view.grad = base.grad[1:].view(shape)
            params.append(view)
    odd_rows = bases[3].detach().view(6, 7).requires_grad_()
    odd_rows.grad = bases[3].grad.view(6, 7)
    params.append(odd_rows)
    assert all(p.is_contiguous() for p in params) and params[0].data_ptr() % 16 != 0
    for coefs in (dict(l1=0.1, l2=0.2), dict(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0)):
        assert_same_results(*run_all_ops(params, coefs), torch.float32)


def _host_read(t, table, acc):
    """What the launchers do with a one-element CPU tensor while the tensors are on a GPU."""
    return None, triton_table.f64_bits(t.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_scalar_read_on_the_host_gives_the_same_bits(monkeypatch, dtype):
    # lr and grad_output take part in the arithmetic in the accumulate dtype whether the kernel
    # loads them or the launcher reads them from a CPU tensor.
    params = make([(5, 7), (BLOCK + 3,)], dtype)
    coefs = dict(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0)
    lr = torch.tensor(0.3, dtype=torch.float64, device=DEVICE)
    go = torch.tensor(1.7, dtype=torch.float64, device=DEVICE)
    results = []
    for read in (None, _host_read):
        if read is not None:
            for module in (triton_decay, triton_grad):
                monkeypatch.setattr(module, "device_scalar", read)
        decayed = clone(params)
        fastreg.decay_(decayed, lr, **coefs, backend="triton")
        backward = TRITON.penalty_backward([p.detach() for p in params], go, Coefficients(**coefs))
        results.append(decayed + backward)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_where_a_one_element_tensor_is_read():
    cpu = torch.tensor(0.25, dtype=torch.float64)
    here = triton_table.Table(torch.zeros(16, dtype=torch.long), torch.device("cpu"), 0, 0, 0, 1, False, 0, 0)
    ptr, bits = triton_table.device_scalar(cpu, here, torch.float32)
    assert ptr.dtype == torch.float32 and ptr.item() == 0.25 and bits == 0
    # A CPU tensor with GPU tensors: its value, read on the host, which touches no GPU.
    gpu = triton_table.Table(torch.zeros(16, dtype=torch.long), torch.device("cuda", 0), 0, 0, 0, 1, False, 0, 0)
    assert triton_table.device_scalar(cpu, gpu, torch.float32) == (None, triton_table.f64_bits(0.25))


def test_kernels_import_nothing_from_backends():
    for path in pathlib.Path(kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                assert "backends" not in module, f"{path.name} imports {module}"


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_cpu_scalars_with_gpu_tensors():
    params = make([(5, 7), (BLOCK + 3,)], grad=True)
    coefs = dict(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0)
    on_gpu, on_cpu = clone(params), clone(params)
    fastreg.decay_(on_gpu, torch.tensor(0.3, device=DEVICE), **coefs, backend="triton")
    fastreg.decay_(on_cpu, torch.tensor(0.3), **coefs, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(on_gpu, on_cpu))
    args = ([p.detach() for p in params], Coefficients(**coefs))
    want = TRITON.penalty_backward(args[0], torch.tensor(1.5, device=DEVICE), args[1])
    got = TRITON.penalty_backward(args[0], torch.tensor(1.5), args[1])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_another_device_than_the_current_one():
    params = make([(5, 7), (BLOCK + 3,)], grad=True, device=torch.device("cuda", 1))
    coefs = dict(l1=0.1, l2=0.2, group_lasso=0.3)
    with torch.cuda.device(0):
        assert_same_results(*run_all_ops(params, coefs), torch.float32)


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_a_cached_table_read_on_a_side_stream_outlives_its_plan():
    _plan.clear()
    params = make([(300, 1000)], grad=True)
    want = fastreg.penalty(clone(params), l1=0.1, l2=0.2, backend=ORACLE)
    fastreg.norms(params, backend="triton")  # the table is made on the default stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = fastreg.add_penalty_grad_(params, l1=0.1, l2=0.2, backend="triton")
        _plan.clear()  # the table is freed while the kernels may still read it
        torch.cuda._sleep(10_000_000)
        noise = torch.full((1 << 20,), 7, dtype=torch.long, device=DEVICE)  # would reuse its memory
    torch.cuda.current_stream().wait_stream(side)
    assert_value(got, want.detach(), torch.float32)
    del noise
