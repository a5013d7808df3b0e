"""Every fast backend against the ``reference`` backend: one harness, op by op.

Parametrized by *target* (a backend on a device, with the settings that reach its code paths),
dtype, coefficients and op. Tolerances come from each dtype's eps (``reference.elementwise_tol``
/ ``reduction_tol``), tensors from ``reference.make_params`` in the target's ``Sizes``, opcheck
cases from ``reference.opcheck_case`` by name. A target that cannot run here skips with the
reason; a backend that must work here (``cpp`` where a compiler exists) fails in its own file.

Targets:
- ``cpp``: the C++ CPU kernels;
- ``torch``: the fast pure-PyTorch backend, as shipped;
- ``torch-small-batches``: the same with batches of 64 elements and runs of tensors up to 16
  elements, so that the shapes of ``make_params`` cross every path of its layout (slices of
  large tensors, rows longer than a batch, runs of small tensors of one shape, 0-d and empty
  tensors) as a large model does with the real limits; its row groups are ``SMALL_ROWS``,
  which cross those batches at a tenth of the full rows' Python time;
- ``cuda``: the CUDA kernels, on a GPU;
- ``triton``: the Triton kernels, on a GPU where there is one; else on CPU tensors under
  Triton's interpreter, in items of ``INTERPRETER_CHUNK`` elements and ``INTERPRETER_SIZES``,
  which cross them as the full sizes cross the real items at a hundredth of the interpreter's
  time.

Backend-specific checks (builds, loaders, layouts and launches, streams, graphs) stay in
test_cpp.py, test_cuda.py and test_triton.py.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

import fastreg
from fastreg.backends import BACKENDS, Coefficients
from fastreg.backends import torch_backend
from fastreg.backends.base import accumulate_dtype
from reference import (
    COEFS,
    FULL_SIZES,
    GPU_SIZES,
    INTERPRETER_CHUNK,
    INTERPRETER_SIZES,
    OPCHECK_NAMES,
    SMALL_ROWS,
    Sizes,
    assert_bitwise_equal,
    assert_lists_close,
    check_all_ops,
    check_nan_inf_propagation,
    check_public_calls,
    elementwise_tol,
    make_grads,
    make_params,
    noncontiguous_params,
    opcheck_case,
    reduction_tol,
    run_all_ops,
    triton_chunk,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REF = BACKENDS["reference"]
GPU = torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    backend: str
    device: str
    sizes: Sizes = FULL_SIZES
    ops: Optional[str] = None  # the torch.library namespace of its custom ops
    batch_limits: Optional[tuple] = None  # (batch, small) of the torch backend on this device
    chunk: Optional[int] = None  # elements per work item of the triton kernels' layout


TARGETS = [
    Target("cpp", "cpp", "cpu", ops="fastreg"),
    Target("torch", "torch", "cpu"),
    Target("torch-small-batches", "torch", "cpu", dataclasses.replace(FULL_SIZES, rows=SMALL_ROWS), batch_limits=(64, 16)),
    Target("cuda", "cuda", "cuda", GPU_SIZES, ops="fastreg"),
    Target("triton", "triton", "cuda", GPU_SIZES, ops="fastreg_triton") if GPU else
    Target("triton", "triton", "cpu", INTERPRETER_SIZES, ops="fastreg_triton", chunk=INTERPRETER_CHUNK),
]


@pytest.fixture(params=TARGETS, ids=lambda t: t.name)
def target(request, monkeypatch):
    t: Target = request.param
    if t.device == "cuda" and not GPU:
        pytest.skip(f"no GPU: the {t.name} target runs on CUDA tensors here")
    reason = BACKENDS[t.backend].unavailable_reason(torch.device(t.device), torch.float32)
    if reason is not None:
        pytest.skip(f"{t.backend} cannot run here: {reason}")
    if t.batch_limits is not None:
        monkeypatch.setattr(torch_backend, "_CPU_LIMITS", t.batch_limits)
    if t.chunk is None:
        yield t
    else:
        with triton_chunk(monkeypatch, t.chunk):
            yield t


def params_on(target: Target, dtype, **kwargs):
    kwargs.setdefault("shapes", target.sizes.mixed)
    return make_params(dtype, device=target.device, **kwargs)


def custom_ops(target: Target):
    """The target's torch.library namespace, its ops registered."""
    if target.ops is None:
        pytest.skip(f"{target.backend} registers no custom ops: torch.compile traces its PyTorch code")
    if target.backend == "triton":
        # Triton's ops are registered when its kernel modules are first imported.
        from fastreg.kernels import triton_decay, triton_grad, triton_norms  # noqa: F401
    return getattr(torch.ops, target.ops)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms(target, dtype):
    params = params_on(target, dtype)
    abs_sums, sq_sums = BACKENDS[target.backend].norms(params)
    ref_abs, ref_sq = REF.norms(params)
    assert abs_sums.dtype == sq_sums.dtype == accumulate_dtype(dtype) and abs_sums.shape == (len(params),)
    assert abs_sums.device == sq_sums.device == params[0].device
    torch.testing.assert_close(abs_sums, ref_abs, **reduction_tol(dtype))
    torch.testing.assert_close(sq_sums, ref_sq, **reduction_tol(dtype))


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value(target, dtype, coefs):
    params = params_on(target, dtype)
    value = BACKENDS[target.backend].value(params, coefs)
    assert value.shape == () and value.dtype == accumulate_dtype(dtype) and value.device == params[0].device
    torch.testing.assert_close(value, REF.value(params, coefs), **reduction_tol(dtype))


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_grad(target, dtype, coefs):
    backend = BACKENDS[target.backend]
    params = params_on(target, dtype)
    before = [p.clone() for p in params]
    grads, ref_grads = make_grads(params), make_grads(params)
    value = backend.add_grad_(params, grads, coefs)
    torch.testing.assert_close(value, REF.add_grad_(params, ref_grads, coefs), **reduction_tol(dtype))
    # The coupled value is the one value() returns, to the bit.
    assert torch.equal(value, backend.value(params, coefs))
    assert_lists_close(grads, ref_grads, **elementwise_tol(dtype))
    assert_bitwise_equal(params, before)


@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_penalty_backward(target, dtype, coefs):
    params = params_on(target, dtype)
    grad_output = torch.tensor(1.75, dtype=accumulate_dtype(dtype), device=target.device)
    out = BACKENDS[target.backend].penalty_backward(params, grad_output, coefs)
    assert [(g.shape, g.dtype, g.device) for g in out] == [(p.shape, p.dtype, p.device) for p in params]
    assert_lists_close(out, REF.penalty_backward(params, grad_output, coefs), **elementwise_tol(dtype))


@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.float16], ids=str)
def test_penalty_backward_takes_a_grad_output_of_another_dtype(target, grad_dtype):
    params = params_on(target, torch.bfloat16, shapes=[(4, 3), (2,), (3, 5)])
    grad_output = torch.tensor(2.0, dtype=grad_dtype, device=target.device)
    coefs = COEFS["all_rows"]
    out = BACKENDS[target.backend].penalty_backward(params, grad_output, coefs)
    assert_lists_close(out, REF.penalty_backward(params, grad_output, coefs), **elementwise_tol(torch.bfloat16))


@pytest.mark.parametrize("lr_kind", ["float", "tensor", "fp32_tensor", "cpu_tensor"])
@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decay(target, dtype, coefs, lr_kind):
    if lr_kind == "cpu_tensor" and target.device == "cpu":
        pytest.skip("on a CPU target a CPU tensor is the 'tensor' case")
    lr = {
        "float": 0.5,
        "tensor": torch.tensor(0.5, dtype=torch.float64, device=target.device),
        "fp32_tensor": torch.tensor(0.5, device=target.device),
        "cpu_tensor": torch.tensor(0.5, dtype=torch.float64),
    }[lr_kind]
    params, ref_params = params_on(target, dtype), params_on(target, dtype)
    BACKENDS[target.backend].decay_(params, lr, coefs)
    REF.decay_(ref_params, lr.to(target.device) if isinstance(lr, torch.Tensor) else lr, coefs)
    assert_lists_close(params, ref_params, **elementwise_tol(dtype))
    for p, r in zip(params, ref_params):  # exact zeros where the reference has them
        assert torch.equal(p == 0, r == 0)


def test_decay_zeroes_whole_groups(target):
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], device=target.device)
    BACKENDS[target.backend].decay_([w], 1.0, Coefficients(group_lasso=1.0, group_dim=0))
    # the fp32 numbers nearest 2.4 and 3.2 (3 and 4 scaled by 1 - 1/5), and exact zeros
    assert torch.equal(w.cpu(), torch.tensor([[2.4, 3.2], [0.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("coefs", [COEFS["all"], COEFS["all_rows"], COEFS["elastic_net"]], ids=["all", "all_rows", "elastic_net"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_non_contiguous(target, dtype, coefs):
    backend = BACKENDS[target.backend]
    params = noncontiguous_params(dtype, device=target.device, sizes=target.sizes)
    assert not any(p.is_contiguous() for p in params)
    tol = elementwise_tol(dtype)
    torch.testing.assert_close(backend.value(params, coefs), REF.value(params, coefs), **reduction_tol(dtype))
    assert_lists_close(backend.norms(params), REF.norms(params), **reduction_tol(dtype))

    # the grads are every other element of one buffer, each written in place in its own slots
    gen = torch.Generator().manual_seed(1)
    buffer = torch.randn(sum(p.numel() for p in params), 2, generator=gen).to(dtype).to(target.device)[:, 0]
    grads = [g.view(p.shape) for g, p in zip(buffer.split([p.numel() for p in params]), params)]
    assert not any(g.is_contiguous() for g in grads)
    ref_grads = [g.clone() for g in grads]
    value = backend.add_grad_(params, grads, coefs)
    torch.testing.assert_close(value, REF.add_grad_(params, ref_grads, coefs), **reduction_tol(dtype))
    assert_lists_close(grads, ref_grads, **tol)

    go = torch.tensor(0.5, device=target.device)
    assert_lists_close(backend.penalty_backward(params, go, coefs), REF.penalty_backward(params, go, coefs), **tol)

    ref_params = [p.clone() for p in params]
    backend.decay_(params, 0.5, coefs)
    REF.decay_(ref_params, 0.5, coefs)
    assert_lists_close(params, ref_params, **tol)


# numpy, which runs Triton's interpreter, warns where inf * 0 makes the NaN both backends produce
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("coefs", COEFS.values(), ids=COEFS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_inf_propagate_like_reference(target, dtype, coefs):
    check_nan_inf_propagation(BACKENDS[target.backend], dtype, coefs, device=target.device,
                              long_row=target.sizes.long_row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_across_runs(target, dtype):
    backend = BACKENDS[target.backend]
    params = params_on(target, dtype, shapes=target.sizes.repeated)
    for coefs in COEFS.values():
        first = run_all_ops(backend, params, coefs)
        for _ in range(target.sizes.reruns):
            assert_bitwise_equal(run_all_ops(backend, params, coefs), first)


def test_many_small_tensors_of_many_shapes(target):
    """Runs of small tensors interleaved with large ones, shapes repeating out of order: each
    result lands on its own tensor."""
    for coefs in (COEFS["elastic_net"], COEFS["all_rows"], COEFS["all"]):
        for dtype in (torch.float32, torch.bfloat16):
            check_all_ops(target.backend, params_on(target, dtype, shapes=target.sizes.interleaved), coefs)


@pytest.mark.parametrize("coefs", [COEFS["group_lasso_rows"], COEFS["all_rows"], COEFS["all"]], ids=["rows", "all_rows", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_row_groups_of_every_width(target, dtype, coefs):
    check_all_ops(target.backend, params_on(target, dtype, shapes=target.sizes.rows), coefs)


def test_long_tensor_lists(target):
    """Any number of tensors runs in one call; packed items of many small tensors and their row
    groups give the reference's results."""
    for count in target.sizes.list_lengths:
        shapes = [((i % 5) + 1, (i % 7) + 2) if i % 3 else ((i % 11) * 13,) for i in range(count)]
        params = params_on(target, torch.float32, shapes=shapes)
        for coefs in (COEFS["elastic_net"], COEFS["all_rows"]):
            check_all_ops(target.backend, params, coefs)


@pytest.mark.parametrize("shapes", [[(0,)], [(0, 3), (2, 0, 3)], [()], [(1,)], [(1, 1)], [(3,), (), (0,), (1,)]],
                         ids=["empty", "empty_2d_3d", "0d", "one", "one_row", "mixed"])
def test_lists_of_empty_and_one_element_tensors(target, shapes):
    """Lists with no element to split or pack: some with no work item at all."""
    params = params_on(target, torch.float32, shapes=shapes)
    for coefs in (COEFS["all"], COEFS["all_rows"]):
        check_all_ops(target.backend, params, coefs)
        check_public_calls(target.backend, params, coefs)


@pytest.mark.parametrize("coefs", [COEFS["elastic_net"], COEFS["all"], COEFS["all_rows"]], ids=["elastic_net", "all", "all_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_public_calls(target, dtype, coefs):
    """penalty (and its backward), norms, add_penalty_grad_ and decay_ through fastreg's API,
    where contiguous tensors run from a plan's table, not the list ops above. fp32 and fp64 for
    the kernels' two steps (Triton's blocks of 1024 and 256 elements); the other dtypes take
    fp32's."""
    check_public_calls(target.backend, params_on(target, dtype), coefs)


@pytest.mark.parametrize("group_dim", [None, 0])
def test_public_penalty_backward_chain(target, group_dim):
    """A model's loss plus the penalty, through autograd."""
    kwargs = dict(l1=1e-3, l2=1e-2, group_lasso=1e-2, group_dim=group_dim)
    grads = {}
    for backend in (target.backend, "reference"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 3)).to(target.device)
        x = torch.randn(8, 20, generator=torch.Generator().manual_seed(3)).to(target.device)
        loss = model(x).square().mean() + fastreg.penalty(model.parameters(), backend=backend, **kwargs)
        loss.backward()
        grads[backend] = [p.grad for p in model.parameters()]
    assert_lists_close(grads[target.backend], grads["reference"], **elementwise_tol(torch.float32))


@pytest.mark.parametrize("name", OPCHECK_NAMES)
def test_opcheck(target, name):
    custom_ops(target)
    torch.library.opcheck(*opcheck_case(name, target.device, target.ops))


def test_compiled_ops_functionalize(target):
    """The mutating ops in a fullgraph-compiled step give the eager results, in place."""
    ops = custom_ops(target)

    def step(params, grads, lr):
        value = ops.add_grad_(params, grads, 0.1, 0.2, 0.3, 0)
        ops.decay_(params, 0.0, lr, 0.1, 0.2, 0.3, None)
        return value + ops.norms(params)[0].sum()

    shapes = [(30, 20), (7,)]
    params, grads = params_on(target, torch.float32, shapes=shapes), make_grads(params_on(target, torch.float32, shapes=shapes))
    eager = ([p.clone() for p in params], [g.clone() for g in grads])
    lr = torch.tensor(0.1, device=target.device)
    expected = step(*eager, lr)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(params, grads, lr), expected)
    assert_bitwise_equal(params + grads, eager[0] + eager[1])
