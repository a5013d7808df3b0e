"""Coupled value + gradient, and the penalty's backward, over every tensor in one launch.

Math, for an element ``w`` of group ``g`` (a tensor, or a row with ``group_dim=0``)::

    dP/dw = l1 * sign(w) + w * (l2 + group_lasso / ||w_g||)     (1/||w_g|| := 0 when ||w_g|| = 0)

in the accumulate dtype, rounded once to the parameter dtype. Without group lasso the ``w``
term is fused into the sign term with one rounding, as the CPU kernels do
(:func:`~.triton_table.gradient`).

Launches:

- l1 / l2 only: :func:`grad_kernel` reads ``w`` and ``g`` once, writes ``g += dP/dw`` and
  each run's sums of ``|w|`` and ``w^2``; the finalize of :mod:`.triton_norms` turns them into
  the value. Two launches.
- with group lasso the update needs every group norm first: the sums, the finalize (which
  stores each group's scale and the value), then :func:`grad_kernel`, which reads its
  group's scale. Three launches; fusing them would need a grid-wide barrier.
- penalty backward (``grad_output * dP/dw`` as new tensors): :func:`grad_kernel` writes one
  new contiguous tensor per parameter, through their addresses passed beside the table (in
  it they would key the table cache on every call's fresh outputs). One launch, or three
  with group lasso.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_norms import GRAD_SCALE, finalize_workspace, launch_finalize, launch_sums
from .triton_table import (
    ACCUMULATE,
    BLOCKS,
    LAUNCH_OPTIONS,
    OP_GRAD,
    TL_DTYPES,
    Staged,
    Table,
    accumulate_tl_dtype,
    counter_of,
    device_scalar,
    f64_bits,
    item_pass,
    on_device,
    row_groups,
    scalar,
    scalar_arg,
)


@triton.jit(do_not_specialize=["go_bits", "l1_bits", "l2_bits"])
def grad_kernel(
    table, ws, scales, out, go, go_bits: tl.int64, l1_bits: tl.int64, l2_bits: tl.int64,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, HAS_GL: tl.constexpr,
    SUMS: tl.constexpr, TO_OUT: tl.constexpr,
):
    """One work item: ``d = l1 * sign(w) + w * scale`` with ``scale = scales[g]`` (group
    lasso) or ``l2``, then ``g += d`` in place through pointer row 1, or (``TO_OUT``)
    ``= grad_output * d`` through the addresses in ``out``, rounded once to ``DTYPE``. With ``SUMS``, also
    each run's ``sum |w|`` and ``sum w^2`` into the workspace ``ws``."""
    if SUMS:
        if tl.program_id(0) == 0:
            tl.store(counter_of(ws), 0)
    if TO_OUT:
        grad_output = scalar_arg(go, go_bits, ACC)
    else:
        grad_output = 1.0
    item_pass(
        table, ws, scales, out, scalar(l1_bits, ACC), scalar(l2_bits, ACC), grad_output,
        DTYPE, ACC, BLOCK, OP_GRAD, SUMS, True, HAS_L1, HAS_L2, HAS_GL, TO_OUT, False,
    )


def launch_grad(
    table: Table,
    dtype: torch.dtype,
    l1: float,
    l2: float,
    group_lasso: float,
    scales: Optional[Tensor],
    ws: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    grad_output=(None, 0),
) -> None:
    """:func:`grad_kernel` over the table (row 1: the grads, or with ``out`` the addresses
    of the outputs, one int64 per tensor on the table's device); ``ws``: the workspace to write sums to; ``grad_output``: ``(pointer,
    bits)`` from :func:`~.triton_table.device_scalar`."""
    go, go_bits = grad_output
    grad_kernel[(table.items,)](
        table.data, ws, scales, out, go, go_bits, f64_bits(l1), f64_bits(l2),
        DTYPE=TL_DTYPES[dtype], ACC=accumulate_tl_dtype(dtype), BLOCK=BLOCKS[dtype],
        HAS_L1=bool(l1), HAS_L2=bool(l2), HAS_GL=bool(group_lasso),
        SUMS=ws is not None, TO_OUT=out is not None,
        **LAUNCH_OPTIONS,
    )


def _group_scales(table: Table, dtype: torch.dtype, l1: float, l2: float, group_lasso: float,
                  value: Optional[Tensor]) -> Tensor:
    """Each group's ``l2 + group_lasso / ||w_g||`` (and the value, when ``value`` is given):
    the sums pass and the finalize."""
    acc = ACCUMULATE[dtype]
    ws = finalize_workspace(table, acc)
    scales = torch.empty(table.groups, dtype=acc, device=table.device)
    with_abs = value is not None and bool(l1)
    launch_sums(table, dtype, ws, with_abs=with_abs)
    launch_finalize(table, ws, with_abs=with_abs, factors=scales, factor=GRAD_SCALE, value=value,
                    coefs=(l1, l2, group_lasso))
    return scales


def add_grad(table: Table, dtype: torch.dtype, l1: float, l2: float, group_lasso: float) -> Tensor:
    """``grads += dP/dw`` for the tensors of a two-row table (params, grads); returns ``P``."""
    acc = ACCUMULATE[dtype]
    if not (l1 or l2 or group_lasso) or not table.groups:
        return torch.zeros((), dtype=acc, device=table.device)
    with on_device(table):
        value = torch.empty((), dtype=acc, device=table.device)
        if group_lasso:
            scales = _group_scales(table, dtype, l1, l2, group_lasso, value)
            launch_grad(table, dtype, l1, l2, group_lasso, scales)
        else:
            ws = finalize_workspace(table, acc)
            launch_grad(table, dtype, l1, l2, 0.0, None, ws=ws)
            launch_finalize(table, ws, with_abs=bool(l1), value=value, coefs=(l1, l2, 0.0))
    return value


def penalty_backward(table: Table, dtype: torch.dtype, grad_output: Tensor, l1: float, l2: float,
                     group_lasso: float, outs: List[Tensor]) -> None:
    """``outs[t] = grad_output * dP/dw_t`` for the tensors of a one-row table; ``outs``:
    contiguous tensors of their shapes and dtype on the table's device."""
    if not table.groups:
        return
    with on_device(table):
        addresses = torch.tensor([t.data_ptr() for t in outs], dtype=torch.int64)
        if table.device.type == "cuda":
            addresses = addresses.pin_memory().to(table.device, non_blocking=True)
        go = device_scalar(grad_output, table, ACCUMULATE[dtype])
        scales = _group_scales(table, dtype, l1, l2, group_lasso, None) if group_lasso else None
        launch_grad(table, dtype, l1, l2, group_lasso, scales, out=addresses, grad_output=go)


# ---------------------------------------------------------------------------------------
# List ops, and their custom ops for torch.compile (see triton_norms)
# ---------------------------------------------------------------------------------------


def add_grad_of(params: List[Tensor], grads: List[Tensor], l1: float, l2: float, group_lasso: float,
                group_dim: Optional[int]) -> Tensor:
    """``grads[t] += dP/dw_t`` in place; returns ``P(params)``."""
    dtype = params[0].dtype
    if not (l1 or l2 or group_lasso):
        return torch.zeros((), dtype=ACCUMULATE[dtype], device=params[0].device)
    staged = Staged(params, grads)
    result = add_grad(staged.table(rows=row_groups(group_lasso, group_dim)), dtype, l1, l2, group_lasso)
    staged.write_back(1)
    return result


def penalty_backward_of(params: List[Tensor], grad_output: Tensor, l1: float, l2: float, group_lasso: float,
                        group_dim: Optional[int]) -> List[Tensor]:
    """``grad_output * dP/dw_t`` of every tensor, each a new contiguous tensor of its shape."""
    # one allocation each, not views of one buffer: a custom op's outputs may not alias
    outs = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]
    staged = Staged(params)
    table = staged.table(rows=row_groups(group_lasso, group_dim))
    penalty_backward(table, params[0].dtype, grad_output, l1, l2, group_lasso, outs)
    return outs


@torch.library.custom_op("fastreg_triton::add_grad_", mutates_args=("grads",))
def add_grad_op(
    params: List[Tensor], grads: List[Tensor], l1: float, l2: float, group_lasso: float, group_dim: Optional[int]
) -> Tensor:
    return add_grad_of(params, grads, l1, l2, group_lasso, group_dim)


@add_grad_op.register_fake
def _(params, grads, l1, l2, group_lasso, group_dim):
    return params[0].new_empty((), dtype=ACCUMULATE[params[0].dtype])


@torch.library.custom_op("fastreg_triton::penalty_backward", mutates_args=())
def penalty_backward_op(
    params: List[Tensor], grad_output: Tensor, l1: float, l2: float, group_lasso: float, group_dim: Optional[int]
) -> List[Tensor]:
    return penalty_backward_of(params, grad_output, l1, l2, group_lasso, group_dim)


@penalty_backward_op.register_fake
def _(params, grad_output, l1, l2, group_lasso, group_dim):
    return [p.new_empty(p.shape) for p in params]
