"""Decoupled decay and proximal maps, in place on every tensor in one launch.

Math, per element ``w`` of segment ``g``, with a step ``lr``::

    w1 = w * (1 - lr*l2)                              AdamW's decay
    w2 = sign(w1) * max(|w1| - lr*l1, 0)              prox of l1 (soft threshold)
    w3 = w2 * max(0, 1 - lr*gl / ||w2_g||)            prox of group lasso (0 for a zero group)

in the accumulate dtype, rounded once to the parameter dtype; ``max(x, 0)`` keeps NaN, as
``clamp_min`` does, so NaN weights stay NaN.

Launches: one (:func:`decay_kernel`) without group lasso. With it, the group norms of the
*thresholded* weights come first: :func:`decayed_partial_sums_kernel` recomputes ``w2`` in
registers and writes per-item partial sums of ``w2^2``, the finalize program of
:mod:`.triton_norms` reduces them per group in a fixed order, and :func:`decay_kernel`
recomputes ``w2`` and scales it. Three launches; the weights are read twice and written once.

``lr`` is a Python float (``1 - lr*l2``, ``lr*l1`` and ``lr*gl`` formed on the host in
fp64, like the ``torch`` backend's scalar arithmetic) or a one-element tensor read in the
kernel, so a learning rate held on the device never synchronizes with the host.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_norms import launch_finalize
from .triton_table import (
    BLOCK,
    TL_DTYPES,
    Staged,
    Table,
    accumulate_tl_dtype,
    device_function,
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


@device_function
def step_constants(lr, a2_bits, a1_bits, ag_bits, ACC: tl.constexpr, LR_TENSOR: tl.constexpr):
    """``(1 - lr*l2, lr*l1, lr*gl)``: read from the host-formed values, or formed here in
    ``ACC`` from the coefficients and the learning rate tensor ``lr``."""
    if LR_TENSOR:
        rate = tl.load(lr).to(ACC)
        return (
            1 - rate * scalar(a2_bits, ACC),
            rate * scalar(a1_bits, ACC),
            rate * scalar(ag_bits, ACC),
        )
    else:
        return scalar(a2_bits, ACC), scalar(a1_bits, ACC), scalar(ag_bits, ACC)


@device_function
def decayed(w, factor, threshold, HAS_L2: tl.constexpr, HAS_L1: tl.constexpr):
    """``w2``: the decay then the soft threshold (a step with a zero coefficient skipped)."""
    if HAS_L2:
        w = w * factor
    if HAS_L1:
        shrunk = tl.abs(w) - threshold
        w = tl.where(shrunk < 0, 0, shrunk) * sign(w)
    return w


@triton.jit(do_not_specialize=["a2_bits", "a1_bits", "ag_bits"])
def decayed_partial_sums_kernel(
    ptrs, items, partials, num_items, lr, a2_bits, a1_bits, ag_bits,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    LR_TENSOR: tl.constexpr, HAS_L2: tl.constexpr, HAS_L1: tl.constexpr,
):
    """``partials[num_items + item] = sum w2^2`` over one work item (``partials[item]``,
    the ``sum |w2|`` slot the finalize program also reads, is written as 0)."""
    pid = tl.program_id(0).to(tl.int64)
    tensor, start, length, _ = load_item(items, pid)
    w_ptr = tensor_base(ptrs, tensor, DTYPE) + start
    factor, threshold, _ = step_constants(lr, a2_bits, a1_bits, ag_bits, ACC, LR_TENSOR)
    sq_acc = tl.zeros([BLOCK], ACC)
    for offset in tl.range(0, length, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + idx, mask=idx < length, other=0).to(ACC)
        w = decayed(w, factor, threshold, HAS_L2, HAS_L1)
        sq_acc += w * w
    tl.store(partials + pid, tl.zeros([], ACC))
    tl.store(partials + num_items + pid, tl.sum(sq_acc, 0))


@triton.jit(do_not_specialize=["a2_bits", "a1_bits", "ag_bits"])
def decay_kernel(
    ptrs, items, seg_sq, lr, a2_bits, a1_bits, ag_bits,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    LR_TENSOR: tl.constexpr, HAS_L2: tl.constexpr, HAS_L1: tl.constexpr, HAS_GL: tl.constexpr,
):
    """One work item in place: ``w = w2 * shrink`` with
    ``shrink = 1 - lr*gl / n if n > lr*gl else 0`` and ``n = sqrt(seg_sq[g])``."""
    pid = tl.program_id(0).to(tl.int64)
    tensor, start, length, seg = load_item(items, pid)
    w_ptr = tensor_base(ptrs, tensor, DTYPE) + start
    factor, threshold, group_threshold = step_constants(lr, a2_bits, a1_bits, ag_bits, ACC, LR_TENSOR)
    if HAS_GL:
        norm = sqrt_rn(tl.load(seg_sq + seg))
        # the dead branch of a where is evaluated too: keep it finite for a zero norm
        keep = norm > group_threshold
        shrink = tl.where(keep, 1 - div_rn(group_threshold, tl.where(keep, norm, 1)), 0)
    for offset in tl.range(0, length, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        mask = idx < length
        w = tl.load(w_ptr + idx, mask=mask, other=0).to(ACC)
        w = decayed(w, factor, threshold, HAS_L2, HAS_L1)
        if HAS_GL:
            w = w * shrink
        tl.store(w_ptr + idx, w.to(DTYPE), mask=mask)


def _arguments(lr: float, lr_tensor: Optional[Tensor], l1: float, l2: float, group_lasso: float):
    """The kernels' ``lr`` pointer and three scalars, as :func:`step_constants` reads them."""
    if lr_tensor is not None:
        return lr_tensor, (f64_bits(l2), f64_bits(l1), f64_bits(group_lasso))
    return None, (f64_bits(1 - lr * l2), f64_bits(lr * l1), f64_bits(lr * group_lasso))


def launch_decay(table: Table, dtype: torch.dtype, lr, constants, l1: float, l2: float, group_lasso: float) -> None:
    flags = dict(
        DTYPE=TL_DTYPES[dtype], ACC=accumulate_tl_dtype(dtype), BLOCK=BLOCK,
        LR_TENSOR=lr is not None, HAS_L2=bool(l2), HAS_L1=bool(l1),
    )
    seg_sq = None
    if group_lasso:
        partials = torch.empty(2 * max(table.num_items, 1), dtype=accumulate_dtype(dtype), device=table.data.device)
        decayed_partial_sums_kernel[(table.num_items,)](
            table.ptrs[0], table.items, partials, table.num_items, lr, *constants, **flags
        )
        seg_sq = launch_finalize(table, partials, False, True)[1]
    decay_kernel[(table.num_items,)](table.ptrs[0], table.items, seg_sq, lr, *constants, HAS_GL=bool(group_lasso), **flags)


@torch.library.custom_op("fastreg_triton::decay", mutates_args=("params",))
def decay(
    params: List[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    l1: float,
    l2: float,
    group_lasso: float,
    group_dim: Optional[int],
) -> None:
    """Decoupled step in place on ``params``; ``lr_tensor``, when given, replaces ``lr``."""
    if not (l1 or l2 or group_lasso):
        return
    dtype = params[0].dtype
    if lr_tensor is not None:
        lr_tensor = lr_tensor.to(accumulate_dtype(dtype)).reshape(())
    lr_arg, constants = _arguments(lr, lr_tensor, l1, l2, group_lasso)
    staged = Staged(params)
    table = staged.table(rows=segment_mode(group_lasso, group_dim))
    launch_decay(table, dtype, lr_arg, constants, l1, l2, group_lasso)
    staged.write_back(0)


@decay.register_fake
def _(params, lr, lr_tensor, l1, l2, group_lasso, group_dim):
    return None
