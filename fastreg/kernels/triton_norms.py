"""Norms and penalty value: per-item partial sums, then one fixed-order finalize program.

Math, for the segments ``g`` (tensors, or rows with ``group_dim=0``) of a list::

    abs_g = sum_{i in g} |w_i|        sq_g = sum_{i in g} w_i^2
    P = l1 * sum_g abs_g + l2/2 * sum_g sq_g + group_lasso * sum_g sqrt(sq_g)

Launches (whatever the number of tensors):

1. :func:`partial_sums_kernel`, one program per work item: ``abs`` and ``sq`` of its
   elements, accumulated in fp32 (fp64 for fp64 parameters) over BLOCK-wide vectors and
   reduced by ``tl.sum`` into ``partials[item]`` and ``partials[W + item]``.
2. :func:`finalize_kernel`, a single program: per-segment sums of the partials, each over
   the segment's items in item order, and the value. No float atomics anywhere, so the
   result is bit-identical run to run.

The finalize reads ``2*W`` words (W is about numel / 65,536), so it is tiny next to the
pass over the weights; being one program it needs no third launch to combine segments.
Its serial length is about ``S / SEG_BLOCK`` steps plus ``(items of the longest segment) /
ITEM_BLOCK`` steps: short for tens of tensors, long enough to matter on a GPU for lists of
10,000 tensors or one huge tensor. A segmented scan over items, or a last-program-done
combine (an integer counter, still no float atomics), would shorten it; that is GPU tuning.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_table import (
    BLOCK,
    TL_DTYPES,
    Staged,
    Table,
    accumulate_tl_dtype,
    f64_bits,
    load_item,
    scalar,
    segment_mode,
    sqrt_rn,
    tensor_base,
)
from ..backends.base import accumulate_dtype

SEG_BLOCK = 64
"""Segments the finalize program reduces side by side."""

ITEM_BLOCK = 16
"""Items per segment the finalize program reads per step."""


@triton.jit
def partial_sums_kernel(ptrs, items, partials, num_items, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``partials[item] = sum |w|`` and ``partials[num_items + item] = sum w^2`` over the
    elements of one work item, in ``ACC``."""
    pid = tl.program_id(0).to(tl.int64)
    tensor, start, length, _ = load_item(items, pid)
    w_ptr = tensor_base(ptrs, tensor, DTYPE) + start
    abs_acc = tl.zeros([BLOCK], ACC)
    sq_acc = tl.zeros([BLOCK], ACC)
    for offset in tl.range(0, length, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + idx, mask=idx < length, other=0).to(ACC)
        abs_acc += tl.abs(w)
        sq_acc += w * w
    tl.store(partials + pid, tl.sum(abs_acc, 0))
    tl.store(partials + num_items + pid, tl.sum(sq_acc, 0))


@triton.jit(do_not_specialize=["l1_bits", "half_l2_bits", "gl_bits"])
def finalize_kernel(
    partials, num_items, seg_first, num_segments, seg_abs, seg_sq, value,
    l1_bits, half_l2_bits, gl_bits,
    ACC: tl.constexpr, STORE_ABS: tl.constexpr, STORE_SQ: tl.constexpr, WRITE_VALUE: tl.constexpr,
    HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, HAS_GL: tl.constexpr,
    SEG_BLOCK: tl.constexpr, ITEM_BLOCK: tl.constexpr,
):
    """One program. For every segment ``s``, ``abs_s`` and ``sq_s`` are the sums of its
    items' partials in item order (stored to ``seg_abs[s]`` and ``seg_sq[s]``);
    ``value = l1 * sum_s abs_s + l2/2 * sum_s sq_s + gl * sum_s sqrt(sq_s)``, a term with a
    zero coefficient left out (so an infinite sum cannot turn it into NaN)."""
    abs_total = tl.zeros([SEG_BLOCK], ACC)
    sq_total = tl.zeros([SEG_BLOCK], ACC)
    norm_total = tl.zeros([SEG_BLOCK], ACC)
    for s0 in tl.range(0, num_segments, SEG_BLOCK):
        segs = s0 + tl.arange(0, SEG_BLOCK).to(tl.int64)
        live = segs < num_segments
        first = tl.load(seg_first + segs, mask=live, other=0)
        count = tl.load(seg_first + segs + 1, mask=live, other=0) - first
        abs_acc = tl.zeros([SEG_BLOCK, ITEM_BLOCK], ACC)
        sq_acc = tl.zeros([SEG_BLOCK, ITEM_BLOCK], ACC)
        for j0 in tl.range(0, tl.max(count, 0), ITEM_BLOCK):
            j = j0 + tl.arange(0, ITEM_BLOCK).to(tl.int64)
            item = first[:, None] + j[None, :]
            mask = j[None, :] < count[:, None]
            abs_acc += tl.load(partials + item, mask=mask, other=0)
            sq_acc += tl.load(partials + num_items + item, mask=mask, other=0)
        abs_seg = tl.sum(abs_acc, 1)
        sq_seg = tl.sum(sq_acc, 1)
        if STORE_ABS:
            tl.store(seg_abs + segs, abs_seg, mask=live)
        if STORE_SQ:
            tl.store(seg_sq + segs, sq_seg, mask=live)
        abs_total += abs_seg
        sq_total += sq_seg
        if HAS_GL:
            norm_total += sqrt_rn(sq_seg)
    if WRITE_VALUE:
        result = tl.zeros([], ACC)
        if HAS_L1:
            result += scalar(l1_bits, ACC) * tl.sum(abs_total, 0)
        if HAS_L2:
            result += scalar(half_l2_bits, ACC) * tl.sum(sq_total, 0)
        if HAS_GL:
            result += scalar(gl_bits, ACC) * tl.sum(norm_total, 0)
        tl.store(value, result)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def launch_partial_sums(table: Table, dtype: torch.dtype) -> Tensor:
    """Per-item ``[abs..., sq...]`` (``2*W`` accumulate-dtype words) of the table's params."""
    partials = torch.empty(2 * max(table.num_items, 1), dtype=accumulate_dtype(dtype), device=table.data.device)
    partial_sums_kernel[(table.num_items,)](
        table.ptrs[0], table.items, partials, table.num_items,
        DTYPE=TL_DTYPES[dtype], ACC=accumulate_tl_dtype(dtype), BLOCK=BLOCK,
    )
    return partials


def launch_finalize(
    table: Table,
    partials: Tensor,
    store_abs: bool,
    store_sq: bool,
    coefs: Optional[Tuple[float, float, float]] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(seg_abs, seg_sq, value)``: per-segment sums when asked for, and the value ``P``
    for ``coefs = (l1, l2, group_lasso)`` when given."""
    device, acc = partials.device, partials.dtype
    seg_abs = torch.empty(table.num_segments, dtype=acc, device=device) if store_abs else None
    seg_sq = torch.empty(table.num_segments, dtype=acc, device=device) if store_sq else None
    value = torch.empty((), dtype=acc, device=device) if coefs is not None else None
    l1, l2, gl = coefs if coefs is not None else (0.0, 0.0, 0.0)
    finalize_kernel[(1,)](
        partials, table.num_items, table.seg_first, table.num_segments, seg_abs, seg_sq, value,
        f64_bits(l1), f64_bits(l2 / 2), f64_bits(gl),
        ACC=TL_DTYPES[acc], STORE_ABS=store_abs, STORE_SQ=store_sq, WRITE_VALUE=coefs is not None,
        HAS_L1=bool(l1), HAS_L2=bool(l2), HAS_GL=bool(gl),
        SEG_BLOCK=SEG_BLOCK, ITEM_BLOCK=ITEM_BLOCK,
    )
    return seg_abs, seg_sq, value


# ---------------------------------------------------------------------------------------
# Custom ops: opaque, correctly-typed nodes for torch.compile (the compiler cannot see
# memory reached through the pointer table, so triton_op/wrap_triton would not do).
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("fastreg_triton::norms", mutates_args=())
def norms(params: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per-tensor ``sum |w|`` and ``sum w^2``: partial sums + finalize, two launches."""
    staged = Staged(params)
    table = staged.table(rows=False)
    abs_sums, sq_sums, _ = launch_finalize(table, launch_partial_sums(table, params[0].dtype), True, True)
    return abs_sums, sq_sums


@norms.register_fake
def _(params):
    acc = accumulate_dtype(params[0].dtype)
    return params[0].new_empty(len(params), dtype=acc), params[0].new_empty(len(params), dtype=acc)


@torch.library.custom_op("fastreg_triton::value", mutates_args=())
def value(params: List[Tensor], l1: float, l2: float, group_lasso: float, group_dim: Optional[int]) -> Tensor:
    """``P(params)``: partial sums + finalize, two launches."""
    staged = Staged(params)
    table = staged.table(rows=segment_mode(group_lasso, group_dim))
    return launch_finalize(table, launch_partial_sums(table, params[0].dtype), False, False, (l1, l2, group_lasso))[2]


@value.register_fake
def _(params, l1, l2, group_lasso, group_dim):
    return params[0].new_empty((), dtype=accumulate_dtype(params[0].dtype))
