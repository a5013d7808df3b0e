"""What only the ``triton`` backend promises: its table words are plan.h's, its tables are
cached and bounded, its launches per call do not grow with the tensor count, chunk boundaries
and misaligned runs take the paths they should, scalars are read where they should be, and its
kernels import nothing from the backends. Its op-by-op agreement with the ``reference`` backend
is tests/test_conformance.py's ``triton`` target.

On a machine with a GPU these run on CUDA tensors; without one, on CPU tensors under Triton's
interpreter (conftest sets ``TRITON_INTERPRET=1`` before the kernels are defined), every case
kept small. They are skipped only where Triton cannot be imported.

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
from reference import check_public_calls, make_grads, make_params, reduction_tol, triton_chunk

pytestmark = pytest.mark.skipif(kernels.triton_import_error() is not None, reason=str(kernels.triton_import_error()))

if kernels.triton_import_error() is None:
    from fastreg.kernels import triton_decay, triton_grad, triton_norms, triton_table

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
TRITON = BACKENDS["triton"]
BLOCK = triton_table.BLOCK if kernels.triton_import_error() is None else 1024
# Rows, and a block plus a tail; make_params zeroes its last tensor, here the 0-d one.
SCALAR_SHAPES = [(5, 7), (BLOCK + 3,), ()]


def leaves(shapes, dtype=torch.float32, seed=0, device=DEVICE):
    """``make_params``' tensors as leaves that require grad, each with a gradient."""
    params = [p.requires_grad_() for p in make_params(dtype, seed=seed, shapes=shapes, device=device)]
    for p, g in zip(params, make_grads(params, seed=seed + 1)):
        p.grad = g
    return params


@pytest.fixture
def small_chunks(monkeypatch):
    """Items of 2 * BLOCK elements: many items per tensor (and per row) without large tensors."""
    with triton_chunk(monkeypatch, 2 * BLOCK):
        yield


@pytest.mark.parametrize("rows", [False, True])
def test_chunk_boundaries(small_chunks, rows):
    shapes = [(2 * BLOCK,), (2 * BLOCK + 1,), (2 * BLOCK - 1,), (5 * BLOCK + 7,), (3, 2 * BLOCK + 5), (7, BLOCK)]
    params = make_params(torch.float32, shapes=shapes, device=DEVICE)
    check_public_calls("triton", params, Coefficients(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0 if rows else None))
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
    params = make_params(torch.float32, shapes=[(5 * 2 * BLOCK - 5,)] + [(3,)] * 9, device=DEVICE)
    for coefs in (Coefficients(l1=0.1, l2=0.2), Coefficients(l1=0.1, l2=0.2, group_lasso=0.3)):
        check_public_calls("triton", params, coefs)


def test_staged_tensors_do_not_fill_the_cache():
    triton_table.TABLES.clear()
    views = [p.t() for p in make_params(torch.float32, shapes=[(8, 6)] * 3, device=DEVICE)]
    for _ in range(3):
        fastreg.penalty(views, l1=0.1, backend="triton")
    assert len(triton_table.TABLES) == 0 and triton_table.TABLES.builds == 3


def test_table_words_are_those_of_plan_h():
    """The kernels read the planner's table through the word indices of plan.h."""
    params = make_params(torch.float32, shapes=[(3, 4), (5,), (0, 2)], device=DEVICE)
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
    params = leaves([(4, 3), (5,), (2, 2)])
    for _ in range(3):
        fastreg.norms(params, backend="triton")
    assert len(built) == 1

    params[1] = leaves([(5,)], seed=1)[0]  # a replaced tensor lives at another address
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
    params = leaves([(4, 3), (5,), (2, 2)])
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
    params = leaves([(4, 3), (5,), (2, 2)])
    for _ in range(3):
        fastreg.penalty(params, l1=0.1, group_lasso=0.2, group_dim=0, backend="triton").backward()
    # the backward's table: built once, whatever its outputs' addresses; the forward runs from the plan
    assert triton_table.TABLES.builds == 1 and triton_table.TABLES.hits == 2


def test_list_op_table_cache_is_bounded(monkeypatch):
    triton_table.TABLES.clear()
    monkeypatch.setattr(triton_table.TABLES, "size", 4)
    lists = [make_params(torch.float32, seed=i, shapes=[(3,)], device=DEVICE) for i in range(6)]
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
    params = leaves([(2,)] * count)
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
    params = leaves([(64, 48), (5,)])
    fastreg.add_penalty_grad_(params, group_lasso=0.3, group_dim=0, backend="triton")
    grids = {name: grid for name, grid, _ in launches}
    rows_per_item = triton_table.MAX_GROUPS
    assert grids["sums_kernel"] == grids["grad_kernel"] == (64 // rows_per_item + 1,)
    assert grids["finalize_kernel"] == (1,)


def test_zero_coefficients_launch_nothing(launches):
    params = leaves([(4, 3)])
    assert fastreg.add_penalty_grad_(params, backend="triton").item() == 0.0
    fastreg.decay_(params, lr=0.5, backend="triton")
    assert fastreg.penalty(params, backend="triton").item() == 0.0
    assert launches == []


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
    shapes = [(7, 13), (129,), (3, 1, 5)]
    params, twins = leaves(shapes), leaves(shapes)

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


def test_misaligned_and_odd_runs_take_the_general_path(small_chunks):
    # Views starting one element into their storage: no run is 16-byte aligned, in items of
    # split tensors, of packed tensors and of packed rows; rows of odd length misalign the
    # rows after the first even in an aligned tensor. make_params zeroes its last tensor, the
    # 0-d one here.
    bases = make_params(torch.float32, shapes=[(5 * BLOCK + 1,), (40,), (3 * 33 + 1,), (6 * 7,), ()], device=DEVICE)
    params = [base[1:].view(shape) for base, shape in zip(bases[:3], [(5 * BLOCK,), (39,), (3, 33)])]
    params.append(bases[3].view(6, 7))
    assert all(p.is_contiguous() for p in params) and params[0].data_ptr() % 16 != 0
    # run_public_calls' twins keep the views' storage offsets, so they stay misaligned.
    for coefs in (Coefficients(l1=0.1, l2=0.2), Coefficients(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0)):
        check_public_calls("triton", params, coefs)


def _host_read(t, table, acc):
    """What the launchers do with a one-element CPU tensor while the tensors are on a GPU."""
    return None, triton_table.f64_bits(t.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_scalar_read_on_the_host_gives_the_same_bits(monkeypatch, dtype):
    # lr and grad_output take part in the arithmetic in the accumulate dtype whether the kernel
    # loads them or the launcher reads them from a CPU tensor.
    params = make_params(dtype, shapes=SCALAR_SHAPES, device=DEVICE)
    coefs = dict(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0)
    lr = torch.tensor(0.3, dtype=torch.float64, device=DEVICE)
    go = torch.tensor(1.7, dtype=torch.float64, device=DEVICE)
    results = []
    for read in (None, _host_read):
        if read is not None:
            for module in (triton_decay, triton_grad):
                monkeypatch.setattr(module, "device_scalar", read)
        decayed = [p.clone() for p in params]
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
    params = make_params(torch.float32, shapes=SCALAR_SHAPES, device=DEVICE)
    coefs = dict(l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0)
    on_gpu, on_cpu = [p.clone() for p in params], [p.clone() for p in params]
    fastreg.decay_(on_gpu, torch.tensor(0.3, device=DEVICE), **coefs, backend="triton")
    fastreg.decay_(on_cpu, torch.tensor(0.3), **coefs, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(on_gpu, on_cpu))
    args = ([p.detach() for p in params], Coefficients(**coefs))
    want = TRITON.penalty_backward(args[0], torch.tensor(1.5, device=DEVICE), args[1])
    got = TRITON.penalty_backward(args[0], torch.tensor(1.5), args[1])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_another_device_than_the_current_one():
    params = make_params(torch.float32, shapes=SCALAR_SHAPES, device=torch.device("cuda", 1))
    with torch.cuda.device(0):
        check_public_calls("triton", params, Coefficients(l1=0.1, l2=0.2, group_lasso=0.3))


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_a_cached_table_read_on_a_side_stream_outlives_its_plan():
    _plan.clear()
    params = leaves([(300, 1000)])
    want = fastreg.penalty(params, l1=0.1, l2=0.2, backend="reference")
    fastreg.norms(params, backend="triton")  # the table is made on the default stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = fastreg.add_penalty_grad_(params, l1=0.1, l2=0.2, backend="triton")
        _plan.clear()  # the table is freed while the kernels may still read it
        torch.cuda._sleep(10_000_000)
        noise = torch.full((1 << 20,), 7, dtype=torch.long, device=DEVICE)  # would reuse its memory
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want.detach(), **reduction_tol(torch.float32))
    del noise
