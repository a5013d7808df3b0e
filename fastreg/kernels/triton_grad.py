"""Coupled value + gradient, and the penalty's backward, over every tensor in one launch.

Math, for an element ``w`` of segment ``g`` (a tensor, or a row with ``group_dim=0``)::

    dP/dw = w * (l2 + group_lasso / ||w_g||) + l1 * sign(w)     (1/||w_g|| := 0 when ||w_g|| = 0)

computed in the accumulate dtype with the terms in the order of the ``torch`` backend.

Launches:

- l1 / l2 only: :func:`grad_kernel` reads ``w`` and ``g`` once, writes ``g += dP/dw`` and
  per-item partial sums of ``|w|`` and ``w^2``; the finalize program of
  :mod:`.triton_norms` turns them into the value. Two launches.
- with group lasso the update needs every group norm first: the partial-sums launch and
  the finalize (which stores ``sum w^2`` per group and the value), then
  :func:`grad_kernel`, which reads the norm of its item's group. Three launches; fusing
  them would need a grid-wide barrier.
- penalty backward (``grad_output * dP/dw`` as new tensors): :func:`grad_kernel` writes
  one flat buffer at each tensor's offset, split into views of the parameters' shapes
  afterwards, so no per-call table of output addresses is needed. One launch, or three
  with group lasso.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_norms import launch_finalize, launch_partial_sums
from .triton_table import (
    BLOCK,
    TL_DTYPES,
    Staged,
    Table,
    accumulate_tl_dtype,
    div_rn,
    f64_bits,
    load_item,
    scalar,
    segment_mode,
    sign,
    sqrt_rn,
    tensor_base,
)
from ..backends.base import accumulate_dtype


@triton.jit(do_not_specialize=["l1_bits", "l2_bits", "gl_bits"])
def grad_kernel(
    w_ptrs, g_ptrs, offsets, items, seg_sq, partials, num_items, out, grad_output,
    l1_bits, l2_bits, gl_bits,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, HAS_GL: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr, TO_OUT: tl.constexpr,
):
    """One work item: ``d = w * scale + l1 * sign(w)`` with ``scale = l2 + gl / ||w_g||``
    (``||w_g|| = sqrt(seg_sq[g])``, its inverse 0 for a zero group), then either
    ``g += d`` in place (coupled) or ``out[offset + i] = grad_output * d`` (backward),
    rounded once to ``DTYPE``. With ``WRITE_PARTIALS``, also the item's ``sum |w|`` and
    ``sum w^2`` into ``partials[item]`` and ``partials[num_items + item]``."""
    pid = tl.program_id(0).to(tl.int64)
    tensor, start, length, seg = load_item(items, pid)
    w_ptr = tensor_base(w_ptrs, tensor, DTYPE) + start
    if TO_OUT:
        dest = out + tl.load(offsets + tensor) + start
        go = tl.load(grad_output)
    else:
        dest = tensor_base(g_ptrs, tensor, DTYPE) + start
    l1 = scalar(l1_bits, ACC)
    scale = scalar(l2_bits, ACC)
    if HAS_GL:
        norm = sqrt_rn(tl.load(seg_sq + seg))
        # the dead branch of a where is evaluated too: keep it finite for a zero norm
        inverse = tl.where(norm > 0, div_rn(tl.full([], 1, ACC), tl.where(norm > 0, norm, 1)), 0)
        scale = scale + scalar(gl_bits, ACC) * inverse
    abs_acc = tl.zeros([BLOCK], ACC)
    sq_acc = tl.zeros([BLOCK], ACC)
    for offset in tl.range(0, length, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        mask = idx < length
        w = tl.load(w_ptr + idx, mask=mask, other=0).to(ACC)
        if WRITE_PARTIALS:
            abs_acc += tl.abs(w)
            sq_acc += w * w
        if HAS_L2 or HAS_GL:
            d = w * scale
        else:
            d = tl.zeros([BLOCK], ACC)
        if HAS_L1:
            d += sign(w) * l1
        if TO_OUT:
            tl.store(dest + idx, (d * go).to(DTYPE), mask=mask)
        else:
            g = tl.load(dest + idx, mask=mask, other=0).to(ACC)
            tl.store(dest + idx, (g + d).to(DTYPE), mask=mask)
    if WRITE_PARTIALS:
        tl.store(partials + pid, tl.sum(abs_acc, 0))
        tl.store(partials + num_items + pid, tl.sum(sq_acc, 0))


def launch_grad(
    table: Table,
    dtype: torch.dtype,
    l1: float,
    l2: float,
    group_lasso: float,
    seg_sq: Optional[Tensor],
    out: Optional[Tensor] = None,
    grad_output: Optional[Tensor] = None,
    write_partials: bool = False,
) -> Optional[Tensor]:
    """Runs :func:`grad_kernel` over the table (``ptrs[1]`` are the grads unless ``out`` is
    given); returns the per-item partial sums when ``write_partials``."""
    partials = None
    if write_partials:
        partials = torch.empty(2 * max(table.num_items, 1), dtype=accumulate_dtype(dtype), device=table.data.device)
    to_out = out is not None
    grad_kernel[(table.num_items,)](
        table.ptrs[0], None if to_out else table.ptrs[1], table.offsets, table.items, seg_sq, partials,
        table.num_items, out, grad_output,
        f64_bits(l1), f64_bits(l2), f64_bits(group_lasso),
        DTYPE=TL_DTYPES[dtype], ACC=accumulate_tl_dtype(dtype), BLOCK=BLOCK,
        HAS_L1=bool(l1), HAS_L2=bool(l2), HAS_GL=bool(group_lasso),
        WRITE_PARTIALS=write_partials, TO_OUT=to_out,
    )
    return partials


def _group_sq_sums(table: Table, dtype: torch.dtype, coefs=None):
    _, seg_sq, value = launch_finalize(table, launch_partial_sums(table, dtype), False, True, coefs)
    return seg_sq, value


@torch.library.custom_op("fastreg_triton::add_grad", mutates_args=("grads",))
def add_grad(
    params: List[Tensor], grads: List[Tensor], l1: float, l2: float, group_lasso: float, group_dim: Optional[int]
) -> Tensor:
    """``grads[t] += dP/dw_t`` in place; returns ``P(params)``."""
    dtype = params[0].dtype
    if not (l1 or l2 or group_lasso):
        return torch.zeros((), dtype=accumulate_dtype(dtype), device=params[0].device)
    staged = Staged(params, grads)
    table = staged.table(rows=segment_mode(group_lasso, group_dim))
    coefs = (l1, l2, group_lasso)
    if group_lasso:
        seg_sq, result = _group_sq_sums(table, dtype, coefs)
        launch_grad(table, dtype, l1, l2, group_lasso, seg_sq)
    else:
        partials = launch_grad(table, dtype, l1, l2, 0.0, None, write_partials=True)
        result = launch_finalize(table, partials, False, False, coefs)[2]
    staged.write_back(1)
    return result


@add_grad.register_fake
def _(params, grads, l1, l2, group_lasso, group_dim):
    return params[0].new_empty((), dtype=accumulate_dtype(params[0].dtype))


@torch.library.custom_op("fastreg_triton::penalty_backward", mutates_args=())
def penalty_backward(
    params: List[Tensor], grad_output: Tensor, l1: float, l2: float, group_lasso: float, group_dim: Optional[int]
) -> Tensor:
    """``grad_output * dP/dw`` of every tensor, concatenated flat in the parameters' dtype
    (the backend splits it into per-tensor views)."""
    dtype = params[0].dtype
    staged = Staged(params)
    table = staged.table(rows=segment_mode(group_lasso, group_dim))
    seg_sq = _group_sq_sums(table, dtype)[0] if group_lasso else None
    out = torch.empty(table.numel, dtype=dtype, device=params[0].device)
    go = grad_output.to(accumulate_dtype(dtype)).reshape(())
    launch_grad(table, dtype, l1, l2, group_lasso, seg_sq, out=out, grad_output=go)
    return out


@penalty_backward.register_fake
def _(params, grad_output, l1, l2, group_lasso, group_dim):
    return params[0].new_empty(sum(p.numel() for p in params))
