"""What the backends' tests share: the fp64 loops of :mod:`fastreg.naive` every fast path is
tested against, and the inputs, tolerances and comparisons of the kernel backends' tests."""
from __future__ import annotations

import contextlib
import dataclasses

import torch

import fastreg
from fastreg.backends import BACKENDS, Coefficients
from fastreg.naive import naive_decay, naive_penalty, naive_value_and_grads  # noqa: F401 (the tests' oracle)


# ---------------------------------------------------------------------------------------------
# Inputs and comparisons shared by the backends' tests (test_conformance.py and the per-backend
# files): every backend is checked against the ``reference`` backend on the same inputs with the
# same tolerances.

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


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The tensors of the conformance tests at one scale: every list holds the same kinds of
    tensor relative to the work item (the chunk) of the kernels it is meant for."""

    mixed: list  # SHAPES' kinds
    rows: list  # row groups of every width a kernel treats its own way
    repeated: list  # several items per tensor and per row, for reruns compared bit for bit
    reruns: int  # of those
    interleaved: list  # runs of small tensors between large ones, shapes repeating out of order
    noncontiguous: list  # the bases of noncontiguous_params
    long_row: int  # a row longer than a chunk
    list_lengths: tuple  # tensor counts of long lists (many small tensors packed into items)


FULL_SIZES = Sizes(
    mixed=SHAPES,
    # The CUDA kernels' cooperation widths: a thread per group (rows under 32 elements), a warp
    # per group, the whole block per group, and groups cut into several items.
    rows=[(40000, 3), (7, 31), (3000, 40), (100, 100), (31, 2047), (30, 5000), (3, 70000), (2, 131072)],
    repeated=[(300, 1000), (100_003,), (77,), (5, 20_000), (3, 4)],
    reruns=1,
    interleaved=[(3,), (4, 2), (3,), (70_001,), (4, 2), (1,), (3,), (2, 2, 2), (300, 5)] * 7,
    noncontiguous=[(64, 40), (9, 70000), (30, 20, 4), (1000,)],
    long_row=70000,
    list_lengths=(1, 700, 2000),
)

# On a GPU the kernels spread only large tensors over many blocks, where a reordered sum or a
# race would show, and a race shows only sometimes.
GPU_SIZES = dataclasses.replace(
    FULL_SIZES,
    mixed=SHAPES + [(4096, 1024), (3, 1_000_003), (50_257, 64)],
    repeated=[(300, 1000), (1_000_003,), (2000, 300), (77,), (5, 200_000), (40000, 3)],
    reruns=2,
)

INTERPRETER_CHUNK = 2048
"""The chunk of Triton's kernels under its interpreter (two 1024-element blocks), which runs
every block of every program in Python: INTERPRETER_SIZES cross its items as FULL_SIZES cross
the real 64K-element ones, with some 50 times fewer elements."""

SMALL_ROWS = [(17, 3), (5, 31), (3, 1023), (2, 1025), (2, 2100)]
"""Row groups for small work items (Triton's interpreter, the torch backend's 64-element
batches): packed past 16 to an item, on both sides of a 16-, 64- and 1024-element step, longer
than a 2048-element chunk."""

# The interpreter's time goes by launch, program and group (about a millisecond for each group's
# sums) more than by element, so these have few rows and short lists.
INTERPRETER_SIZES = Sizes(
    # (2, 2049): a tensor over two chunks and rows one element over one
    mixed=[(3, 5), (), (0,), (2, 0, 3), (0, 4), (5, 3, 4), (2, 2049), (1,)],
    rows=SMALL_ROWS,
    repeated=[(77,), (2, 2100), (3, 4)],
    reruns=1,
    interleaved=[(3,), (4, 2), (3,), (2049,), (4, 2), (1,), (3,), (2, 2, 2), (6, 5)],
    noncontiguous=[(40, 16), (2, 4200), (6, 20, 4), (1000,)],
    long_row=2100,
    list_lengths=(1, 40),
)


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


def noncontiguous_params(dtype, device="cpu", sizes=FULL_SIZES):
    """Transposed, strided and permuted views, one of a base with rows longer than a chunk."""
    base = make_params(dtype, shapes=sizes.noncontiguous, device=device)
    return [base[0].t(), base[1][:, ::2], base[2].permute(2, 0, 1), base[3][::3]]


def twin(t):
    """A copy of ``t`` in new memory with its strides and storage offset: a view stays a view
    (non-contiguous, or off a 16-byte boundary) where a clone would be dense and aligned."""
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=t.device)
    return storage.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t.detach())


def assert_lists_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"tensor {i}: {m}", **tol)


def assert_bitwise_equal(actual, expected):
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a, e.view(-1).view(torch.uint8) if e.numel() else e)


def check_nan_inf_propagation(backend, dtype, coefs, device="cpu", long_row=FULL_SIZES.long_row):
    """NaN and Inf through every op of ``backend`` follow the ``reference`` backend exactly:
    sign(NaN) = 0, a zero coefficient adds nothing (no 0 * inf), a NaN group norm gives the
    group a zero group-lasso scale. One NaN sits past the first chunk of a ``long_row`` row."""
    reference = BACKENDS["reference"]
    params = make_params(dtype, shapes=[(4, 6), (5,), (3, long_row), (8, 8)], device=device)
    params[0][0, 1] = float("nan")
    params[0][2, 3] = float("inf")
    params[1][2] = float("-inf")
    params[2][1, -1] = float("nan")
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


REDUCTIONS = 4
"""Outputs of :func:`run_all_ops` and :func:`run_public_calls` that are reductions (values and
norms, in the accumulate dtype); the others are tensors of the parameters' dtype."""


def run_all_ops(backend, params, coefs):
    """Every op of ``backend`` on ``params`` (twins for the in-place ones), outputs in one list:
    value, norms, add_grad_'s value, then the gradients, the penalty's backward and the
    decayed weights."""
    grads = make_grads(params)
    out = [backend.value(params, coefs), *backend.norms(params), backend.add_grad_(params, grads, coefs), *grads]
    out += backend.penalty_backward(params, torch.tensor(0.75, device=params[0].device), coefs)
    decayed = [twin(p) for p in params]
    backend.decay_(decayed, 0.1, coefs)
    return out + decayed


def run_public_calls(backend, params, coefs):
    """Every public call with ``backend=backend`` (a name) on twins of ``params``, outputs in
    one list in :func:`run_all_ops`'s order: penalty value, per-tensor L1 and L2 norms,
    add_penalty_grad_'s value, then the gradients, the penalty's backward through autograd and
    weights decayed with a float and with a tensor lr. Contiguous tensors run from a plan's
    table where the backend has table kernels."""
    kwargs = dict(l1=coefs.l1, l2=coefs.l2, group_lasso=coefs.group_lasso, group_dim=coefs.group_dim)
    device = params[0].device
    leaves = [twin(p).requires_grad_() for p in params]
    value = fastreg.penalty(leaves, backend=backend, **kwargs)
    if value.requires_grad:
        (0.75 * value).backward()
    norms = fastreg.norms(params, backend=backend)
    graded = [twin(p).requires_grad_() for p in params]
    for p, g in zip(graded, make_grads(params)):
        p.grad = g
    coupled = fastreg.add_penalty_grad_(graded, backend=backend, **kwargs)
    out = [value.detach(), norms.tensor_l1, norms.tensor_l2, coupled, *[p.grad for p in graded]]
    out += [torch.zeros_like(p) if p.grad is None else p.grad for p in leaves]
    for lr in (0.1, torch.tensor(0.1, dtype=torch.float64, device=device)):
        decayed = [twin(p) for p in params]
        fastreg.decay_(decayed, lr, backend=backend, **kwargs)
        out += decayed
    return out


def assert_results_close(actual, expected, dtype):
    """Outputs of :func:`run_all_ops` or :func:`run_public_calls` on ``dtype`` parameters."""
    assert_lists_close(actual[:REDUCTIONS], expected[:REDUCTIONS], **reduction_tol(dtype))
    assert_lists_close(actual[REDUCTIONS:], expected[REDUCTIONS:], **elementwise_tol(dtype))


def check_all_ops(backend, params, coefs):
    """:func:`run_all_ops` of the backend named ``backend`` against the ``reference`` backend's."""
    assert_results_close(run_all_ops(BACKENDS[backend], params, coefs), run_all_ops(BACKENDS["reference"], params, coefs),
                         params[0].dtype)


def check_public_calls(backend, params, coefs):
    """:func:`run_public_calls` of ``backend`` against the ``reference`` backend's."""
    assert_results_close(run_public_calls(backend, params, coefs), run_public_calls("reference", params, coefs),
                         params[0].dtype)


@contextlib.contextmanager
def triton_chunk(monkeypatch, chunk):
    """The triton kernels' work items of ``chunk`` elements, so that small tensors span several.
    Cached plans and list-op tables hold the old layout: they go before and after."""
    from fastreg import _plan
    from fastreg.kernels import triton_table

    monkeypatch.setattr(triton_table, "CHUNK", chunk)
    _plan.clear()
    triton_table.TABLES.clear()
    try:
        yield
    finally:
        _plan.clear()
        triton_table.TABLES.clear()


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


def opcheck_case(name, device="cpu", namespace="fastreg"):
    """(op overload, args) of the opcheck case ``name`` of ``torch.ops.<namespace>`` (the
    extension's ``fastreg`` ops, or Triton's ``fastreg_triton`` ones, of the same schemas)."""
    d = torch.device(device)
    params = [torch.randn(3, 5, device=d), torch.randn(7, device=d), torch.randn(2, 3, 4, device=d), torch.randn((), device=d)]
    grads = [torch.randn_like(p) for p in params]
    op, arguments = _OPCHECK[name]
    return getattr(getattr(torch.ops, namespace), op).default, arguments(params, grads, d)
