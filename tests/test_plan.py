"""Cached plans (fastreg/_plan.py): reused for the same tensors, never for changed ones.

Every case runs with the C++ planner (the key computed in C++, the ``cpp`` backend's kernels run
from the plan's table) and with the Python planner (what runs where the C++ extension is not
built), each checked against the reference backend on fresh copies.
"""
from __future__ import annotations

import gc

import pytest
import torch

import fastreg
from fastreg import _build, _calls, _plan
from reference import COEFS, assert_bitwise_equal

BACKENDS = ["cpp", "torch"]


@pytest.fixture(params=["cpp-planner", "python-planner"])
def planner(request, monkeypatch):
    if request.param == "python-planner":
        monkeypatch.setattr(_build, "planner_if_loaded", lambda: None)
    else:
        assert _build.planner() is not None
    _plan.clear()
    yield request.param
    _plan.clear()


def grads_after(params, backend, **coefs):
    value = fastreg.add_penalty_grad_(params, backend=backend, **coefs)
    return value, [p.grad.clone() if p.grad is not None else None for p in params]


def reference_grads(params, **coefs):
    copies = []
    for p in params:
        c = p.detach().clone().requires_grad_()
        c.grad = None if p.grad is None else p.grad.clone()
        copies.append(c)
    return grads_after(copies, "reference", **coefs)


def check_grads(params, backend, **coefs):
    expected = reference_grads(params, **coefs)
    value, grads = grads_after(params, backend, **coefs)
    torch.testing.assert_close(value, expected[0])
    for got, want in zip(grads, expected[1]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want)


def make(shapes, seed=0, grad=True):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator).requires_grad_() for s in shapes]
    if grad:
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
    return params


SHAPES = [(3, 5), (7,), (), (2, 3, 4), (70000,)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_list_reuses_its_plan(planner, backend):
    params = make(SHAPES)
    first = _calls.prepare(params, backend, with_grads=True).plan
    assert _calls.prepare(params, backend, with_grads=True).plan is first
    assert _calls.prepare(list(params), backend, with_grads=True).plan is first  # a new list of the same tensors
    assert _calls.prepare(params, backend).plan is not first  # another kind of call


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cached_call_gives_the_bits_of_a_fresh_one(planner, backend):
    params = make(SHAPES)
    for coefs in COEFS.values():
        kwargs = dict(l1=coefs.l1, l2=coefs.l2, group_lasso=coefs.group_lasso, group_dim=coefs.group_dim)
        _plan.clear()
        fresh = fastreg.norms(params, backend=backend), fastreg.penalty(params, backend=backend, **kwargs)
        cached = fastreg.norms(params, backend=backend), fastreg.penalty(params, backend=backend, **kwargs)
        assert_bitwise_equal(list(fresh[0]) + [fresh[1]], list(cached[0]) + [cached[1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_swapped_grad_gets_a_new_plan(planner, backend):
    params = make(SHAPES)
    check_grads(params, backend, l1=0.1, l2=0.2)
    old = params[1].grad
    params[1].grad = torch.randn(7)
    kept = old.clone()
    check_grads(params, backend, l1=0.1, l2=0.2)
    assert torch.equal(old, kept), "the replaced grad was written"


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, planner):
    """torch's intra-op threads: the C++ lookup compares a list of over 768 tensors on
    several threads, block by block, and on the calling thread alone with one."""
    if planner == "python-planner" and request.param > 1:
        pytest.skip("the Python key is computed on the calling thread alone")
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


LONG = 1301  # six blocks of the C++ key: 256 tensors each, the last one of 21


@pytest.mark.parametrize("where", [0, 255, 256, 700, 1023, 1024, 1300])
def test_a_change_anywhere_in_a_long_list_gets_a_new_plan(planner, threads, where):
    """The C++ key reads a list in blocks of 256 tensors, and compares them on several threads:
    a change in any block, at its edges included, is seen (a swapped .grad, a grad set to None,
    new data of the same size)."""
    params = make([(3,)] * LONG)

    def plan():
        return _calls.prepare(params, "cpp", with_grads=True).plan

    def changes(change):
        before = plan()
        assert plan() is before
        change()
        assert plan() is not before
        check_grads(params, "cpp", l1=0.1, l2=0.2)

    def new_data():
        with torch.no_grad():
            params[where].data = torch.randn(3)

    check_grads(params, "cpp", l1=0.1, l2=0.2)
    changes(lambda: setattr(params[where], "grad", torch.randn(3)))
    changes(lambda: setattr(params[where], "grad", None))
    changes(new_data)


class Subclass(torch.Tensor):
    """A tensor subclass with a plain TensorImpl: only the Python API can say it is a tensor, so
    the lookup's worker threads leave its block to the thread that holds the GIL."""


def test_a_tensor_subclass_in_a_long_list(planner, threads):
    if planner == "python-planner":
        pytest.skip("the Python key plans a list with a tensor subclass anew on every call")
    params = make([(3,)] * LONG)
    params[1100] = make([(3,)], seed=1)[0].as_subclass(Subclass)
    params[1100].grad = torch.randn(3)
    check_grads(params, "cpp", l1=0.1, l2=0.2)
    before = _calls.prepare(params, "cpp", with_grads=True).plan
    assert _calls.prepare(params, "cpp", with_grads=True).plan is before
    params[1100].grad = torch.randn(3)
    assert _calls.prepare(params, "cpp", with_grads=True).plan is not before
    check_grads(params, "cpp", l1=0.1, l2=0.2)


@pytest.mark.parametrize("stranger", [None, 3.0, "w"], ids=["None", "float", "str"])
def test_a_non_tensor_in_a_long_planned_list_is_named(planner, threads, stranger):
    """A list whose length matches a cached one is compared block by block, on worker threads
    that cannot ask Python what an element is: one that is not a tensor still gets the error
    naming it, and nothing is written."""
    params = make([(3,)] * LONG)
    fastreg.add_penalty_grad_(params, l1=0.1, backend="cpp")
    grads = [p.grad.clone() for p in params]
    mixed = list(params)
    mixed[1100] = stranger
    with pytest.raises(TypeError, match=r"params\[1100\] is a"):
        fastreg.add_penalty_grad_(mixed, l1=0.1, backend="cpp")
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_set_to_none_and_back(planner, backend):
    params = make(SHAPES)
    check_grads(params, backend, l2=0.5)
    params[0].grad = None
    check_grads(params, backend, l2=0.5)
    params[0].grad = torch.ones(3, 5)
    check_grads(params, backend, l2=0.5)


@pytest.mark.parametrize("change", ["resize", "redtype", "replace"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_changed_tensor_gets_a_new_plan(planner, backend, change):
    params = make(SHAPES)
    fastreg.decay_(params, lr=0.1, l1=0.01, l2=0.1, backend=backend)
    with torch.no_grad():
        if change == "resize":
            params[3].data = torch.randn(5, 5)
        elif change == "redtype":
            params[3].data = params[3].data.double()
        else:
            params[3].data = torch.randn(2, 3, 4)
    expected = [p.detach().clone() for p in params]
    fastreg.decay_(expected, lr=0.1, l1=0.01, l2=0.1, group_lasso=0.3, backend="reference")
    fastreg.decay_(params, lr=0.1, l1=0.01, l2=0.1, group_lasso=0.3, backend=backend)
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.detach(), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_freed_tensor_and_its_address_reused(planner, backend):
    """A plan holds addresses and sizes, not objects: a new tensor at a freed one's address,
    with its sizes, may use the plan, and must get the right result."""
    params = make([(1000,), (300,), (5, 7)])
    fastreg.norms(params, backend=backend)
    address = params[1].data_ptr()
    del params[1]
    gc.collect()
    for _ in range(20):
        fresh = torch.randn(300)
        if fresh.data_ptr() == address:
            break
    params.insert(1, fresh)
    got = fastreg.norms(params, backend=backend)
    want = fastreg.norms(params, backend="reference")
    torch.testing.assert_close(got.tensor_l1, want.tensor_l1)
    torch.testing.assert_close(got.tensor_l2, want.tensor_l2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reordered_list_gets_its_own_order(planner, backend):
    params = make(SHAPES, grad=False)
    forward = fastreg.norms(params, backend=backend).tensor_l1
    backward = fastreg.norms(params[::-1], backend=backend).tensor_l1
    assert torch.equal(forward.flip(0), backward)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_of_one_buffer(planner, backend):
    buffer = torch.randn(100)
    disjoint = [buffer[:40].view(8, 5), buffer[40:]]
    expected = [v.clone() for v in disjoint]
    for _ in range(2):  # the second call runs from the cached plan
        fastreg.decay_(expected, lr=0.5, l1=0.1, backend="reference")
        fastreg.decay_(disjoint, lr=0.5, l1=0.1, backend=backend)
        torch.testing.assert_close(disjoint, expected)
    overlapping = [buffer[:40], buffer[30:60]]
    for _ in range(2):  # refused every time: an invalid list is never cached as valid
        with pytest.raises(ValueError, match=r"params\[1\] shares memory with params\[0\]"):
            fastreg.decay_(overlapping, lr=0.5, l1=0.1, backend=backend)
    interleaved = [buffer.view(50, 2)[:, 0], buffer.view(50, 2)[:, 1]]  # ranges meet, elements do not
    expected = [v.clone() for v in interleaved]
    for _ in range(2):
        fastreg.decay_(expected, lr=0.5, l1=0.1, backend="reference")
        fastreg.decay_(interleaved, lr=0.5, l1=0.1, backend=backend)
        torch.testing.assert_close(list(interleaved), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_tensor_twice_is_refused_every_time(planner, backend):
    a = torch.randn(5)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"params\[1\] is the same tensor as params\[0\]"):
            fastreg.norms([a, a], backend=backend)
    views = [a.view(-1), a.view(-1)]  # two views of one tensor are two tensors to a read
    torch.testing.assert_close(fastreg.norms(views, backend=backend).l1, 2 * a.abs().sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_tensors(planner, backend):
    params = [t.requires_grad_() for t in (torch.randn(6, 4).t(), torch.randn(10)[::2])]
    for p in params:
        p.grad = torch.randn(p.shape).t().contiguous().t() if p.dim() == 2 else torch.randn(p.shape)
    for _ in range(2):
        check_grads(params, backend, l1=0.1, l2=0.3, group_lasso=0.2, group_dim=0)


def test_a_cached_call_runs_no_python_per_tensor(planner, monkeypatch):
    """From a cached plan, the cpp backend's kernels take the plan's table: the tensors of the
    call are never selected, nor their grads read, in Python."""
    if planner == "python-planner":
        pytest.skip("without the C++ planner, kernels take tensor lists")
    params = make(SHAPES)
    fastreg.add_penalty_grad_(params, l1=0.1, backend="cpp")
    fastreg.norms(params, backend="cpp")
    fastreg.decay_(params, lr=0.1, l1=0.1, backend="cpp")

    def refuse(*args):
        raise AssertionError("a cached call selected its tensors in Python")

    monkeypatch.setattr(_calls, "_params", refuse)
    fastreg.add_penalty_grad_(params, l1=0.1, backend="cpp")
    fastreg.norms(params, backend="cpp")
    fastreg.decay_(params, lr=0.1, l1=0.1, backend="cpp")


def test_the_cache_is_bounded(planner):
    for seed in range(_plan.CACHE_SIZE + 5):
        fastreg.norms(make([(3,)], seed=seed, grad=False), backend="torch")
    assert _plan.stats()["plans"] <= _plan.CACHE_SIZE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_tensors_of_every_tail_length_packed_in_one_buffer(planner, dtype):
    """Tensors of 0 to 35 elements (every length of a vector block's partial tail, for every
    dtype's block), one element apart in one buffer: the cpp kernels (masked loads and stores for
    fp32/fp64, a padded buffer for fp16/bf16) give the bits they give on separate tensors, and
    write nothing between them."""
    sizes = list(range(36))
    sentinel = 1234.0

    def packed():
        starts = [sum(sizes[:k]) + k for k in range(len(sizes))]
        data = torch.full((sum(sizes) + len(sizes),), sentinel, dtype=dtype)
        grads = data.clone()
        gen = torch.Generator().manual_seed(0)
        params = []
        for start, n in zip(starts, sizes):
            data[start:start + n] = torch.randn(n, generator=gen).to(dtype)
            grads[start:start + n] = torch.randn(n, generator=gen).to(dtype)
            p = data[start:start + n]
            p.grad = grads[start:start + n]
            params.append(p)
        gaps = torch.ones_like(data, dtype=torch.bool)
        for start, n in zip(starts, sizes):
            gaps[start:start + n] = False
        return data, grads, gaps, params

    data, grads, gaps, packed_params = packed()
    separate = [p.clone() for p in packed_params]
    for s, p in zip(separate, packed_params):
        s.grad = p.grad.clone()
    for _ in range(2):  # the second call runs from the cached plan
        for params in (packed_params, separate):
            fastreg.add_penalty_grad_(params, l1=0.1, l2=0.3, backend="cpp")
            fastreg.decay_(params, lr=0.5, l1=0.01, l2=0.2, group_lasso=0.05, backend="cpp")
        assert_bitwise_equal(packed_params, separate)
        assert_bitwise_equal([p.grad for p in packed_params], [s.grad for s in separate])
        assert bool((data[gaps] == sentinel).all()) and bool((grads[gaps] == sentinel).all())
