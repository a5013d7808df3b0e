"""Norms and penalty value: an item pass of sums, then a parallel finalize.

Math, for the groups ``g`` (tensors, or rows with ``group_dim=0``) of a list::

    abs_g = sum_{i in g} |w_i|        sq_g = sum_{i in g} w_i^2
    P = l1 * sum_g abs_g + l2/2 * sum_g sq_g + group_lasso * sum_g sqrt(sq_g)

Launches, whatever the number of tensors:

1. :func:`sums_kernel`, one program per work item of the plan's table
   (:func:`~.triton_table.item_pass`): each run's ``sum |w|`` and ``sum w^2`` (``x^2`` fused
   into the running sum, as the CPU kernels do), accumulated in fp32 (fp64 for fp64) over
   BLOCK-wide vectors and reduced by ``tl.sum``.
2. :func:`finalize_kernel`, one program per :data:`GROUPS_PER_PROGRAM` groups: each group's
   sums (a split group's from its items' sums, in item order), stored per tensor or turned into
   a per-group factor for a following pass, and the program's share of the value. The
   value itself is combined by the last program to finish (an integer counter: no float
   atomics), over the programs' shares in program order, so it is bit-identical run to run
   and the same for any number of SMs.

The ops here and in :mod:`.triton_grad` / :mod:`.triton_decay` take a
:class:`~.triton_table.Table` (a plan's, or a list op's) and do O(1) host work.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_table import (
    ACCUMULATE,
    BLOCKS,
    LAUNCH_OPTIONS,
    OP_SUMS,
    TL_DTYPES,
    GROUP_ITEM,
    GROUP_LEN,
    GROUP_WORDS,
    H_CHUNK,
    H_GROUPS,
    H_GROUPS_AT,
    H_ITEMS,
    Staged,
    Table,
    accumulate_tl_dtype,
    counter_of,
    device_function,
    f64_bits,
    item_pass,
    on_device,
    reciprocal,
    row_groups,
    scalar,
    scalar_arg,
    sqrt_rn,
    workspace,
)

GROUPS_PER_PROGRAM = {torch.float32: 128, torch.float64: 64}
"""Groups a finalize program combines side by side, by accumulate dtype: fp64 takes half as
many, or the group-lasso variants spill on sm_80 (Triton 3.8)."""

ITEMS_PER_STEP = 512
"""Items of a split group a finalize program reads per step."""

SHARES_PER_STEP = 128
"""Programs' shares the last finalize program adds per step."""

# finalize_kernel's FACTOR: what it stores per group for a following pass.
NO_FACTOR = tl.constexpr(0)
GRAD_SCALE = tl.constexpr(1)
"""``l2 + group_lasso / ||w_g||`` (0 for a zero group): the gradient's scale."""
DECAY_SHRINK = tl.constexpr(2)
"""``max(0, 1 - lr*group_lasso / ||w_g||)``: the block shrink of the decay."""


@device_function
def step_constants(lr, lr_bits, a_bits, b_bits, ACC: tl.constexpr, LR_TENSOR: tl.constexpr):
    """``(1 - lr*l2, lr*l1)`` of a decay: formed on the host in fp64 (``a``, ``b``) for a
    float ``lr``, or here in ``ACC`` from ``a = l2``, ``b = l1`` and a tensor ``lr``, as
    arithmetic with a tensor lr is done."""
    if LR_TENSOR:
        rate = scalar_arg(lr, lr_bits, ACC)
        return 1 - rate * scalar(a_bits, ACC), rate * scalar(b_bits, ACC)
    else:
        return scalar(a_bits, ACC), scalar(b_bits, ACC)


@triton.jit(do_not_specialize=["lr_bits", "a_bits", "b_bits"])
def sums_kernel(
    table, ws, lr, lr_bits: tl.int64, a_bits: tl.int64, b_bits: tl.int64,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ABS: tl.constexpr,
    DECAYED: tl.constexpr, HAS_L2: tl.constexpr, HAS_L1: tl.constexpr, LR_TENSOR: tl.constexpr,
):
    """Sums of every run of one work item into the workspace (``ABS``: ``sum |w|`` too);
    with ``DECAYED``, of the decayed and thresholded weights (the norms the decay's block
    shrink uses), which are not written."""
    if tl.program_id(0) == 0:
        tl.store(counter_of(ws), 0)
    if DECAYED:
        factor, threshold = step_constants(lr, lr_bits, a_bits, b_bits, ACC, LR_TENSOR)
    else:
        factor = 0.0
        threshold = 0.0
    item_pass(
        table, ws, None, None, factor, threshold, 0.0,
        DTYPE, ACC, BLOCK, OP_SUMS, True, ABS, HAS_L1, HAS_L2, False, False, DECAYED,
    )


@triton.jit(do_not_specialize=["lr_bits", "l1_bits", "l2_bits", "half_l2_bits", "gl_bits"])
def finalize_kernel(
    table, ws, tensor_abs, tensor_sq, factors, value, lr,
    lr_bits: tl.int64, l1_bits: tl.int64, l2_bits: tl.int64, half_l2_bits: tl.int64, gl_bits: tl.int64,
    ACC: tl.constexpr, GROUPS: tl.constexpr, ITEMS: tl.constexpr, SHARES: tl.constexpr,
    ABS: tl.constexpr, TENSOR_SUMS: tl.constexpr, FACTOR: tl.constexpr, VALUE: tl.constexpr,
    HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, HAS_GL: tl.constexpr, LR_TENSOR: tl.constexpr,
):
    """Groups ``[GROUPS * q, GROUPS * (q + 1))``: their sums; with ``TENSOR_SUMS`` stored as
    ``tensor_abs[t]`` and ``tensor_sq[t]`` (a table whose groups are its tensors);
    with ``FACTOR``, the per-group factor into ``factors[g]``; with ``VALUE``, the value
    ``l1 * sum abs + l2/2 * sum sq + gl * sum sqrt(sq)`` into ``value`` (a term with a zero
    coefficient left out, so an infinite sum cannot turn it into NaN)."""
    q = tl.program_id(0)
    num_groups = tl.load(table + H_GROUPS)
    slots = num_groups + tl.load(table + H_ITEMS)
    chunk = tl.load(table + H_CHUNK)
    g = q.to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    live = g < num_groups
    row = table + tl.load(table + H_GROUPS_AT) + g * GROUP_WORDS
    length = tl.load(row + GROUP_LEN, mask=live, other=0)
    first = tl.load(row + GROUP_ITEM, mask=live, other=0)
    whole = live & (length <= chunk)
    count = tl.where(length > chunk, (length + chunk - 1) // chunk, 0)
    sq = tl.load(ws + 1 + slots + g, mask=whole, other=0)
    if ABS:
        ab = tl.load(ws + 1 + g, mask=whole, other=0)
    # A split group's sums: its items' sums (consecutive from its first item), in item order.
    # Split groups are few (tensors or rows longer than a chunk): one at a time, each over
    # a vector of its items.
    lanes = tl.arange(0, GROUPS)
    pending = count
    while tl.max(pending, 0) > 0:
        lane = lanes == tl.min(tl.where(pending > 0, lanes, GROUPS), 0)
        n = tl.sum(tl.where(lane, pending, 0), 0)
        slot = 1 + num_groups + tl.sum(tl.where(lane, first, 0), 0)
        sq_items = tl.zeros([ITEMS], ACC)
        ab_items = tl.zeros([ITEMS], ACC)
        j = 0
        while j < n:
            k = j + tl.arange(0, ITEMS)
            sq_items += tl.load(ws + slots + slot + k, mask=k < n, other=0)
            if ABS:
                ab_items += tl.load(ws + slot + k, mask=k < n, other=0)
            j += ITEMS
        sq = tl.where(lane, tl.sum(sq_items, 0), sq)
        if ABS:
            ab = tl.where(lane, tl.sum(ab_items, 0), ab)
        pending = tl.where(lane, 0, pending)
    if TENSOR_SUMS:
        tl.store(tensor_abs + g, ab, mask=live)
        tl.store(tensor_sq + g, sq, mask=live)
    if FACTOR != NO_FACTOR or HAS_GL:
        norm = sqrt_rn(sq)
        positive = norm > 0
        # the dead branch of a where is evaluated too: keep it finite for a zero norm
        inverse = reciprocal(tl.where(positive, norm, 1))
    if FACTOR == GRAD_SCALE:
        scale = scalar(l2_bits, ACC) + scalar(gl_bits, ACC) * tl.where(positive, inverse, 0)
        tl.store(factors + g, scale, mask=live)
    elif FACTOR == DECAY_SHRINK:
        if LR_TENSOR:
            threshold = scalar_arg(lr, lr_bits, ACC) * scalar(gl_bits, ACC)
        else:
            threshold = scalar(gl_bits, ACC)
        shrink = tl.where(norm > threshold, 1 - inverse * threshold, 0)
        tl.store(factors + g, shrink, mask=live)
    if VALUE:
        programs = tl.num_programs(0)
        shares = ws + 1 + 2 * slots
        if HAS_L1:
            tl.store(shares + q, tl.sum(ab, 0))
        if HAS_L2:
            tl.store(shares + programs + q, tl.sum(sq, 0))
        if HAS_GL:
            tl.store(shares + 2 * programs + q, tl.sum(tl.where(live, norm, 0), 0))
        # Every thread's stores before the release of the counter; the last program to count
        # acquires them all (read past L1, which is not coherent across SMs).
        tl.debug_barrier()
        done = tl.atomic_add(counter_of(ws), 1, sem="acq_rel", scope="gpu")
        if done == programs - 1:
            ab_total = tl.zeros([SHARES], ACC)
            sq_total = tl.zeros([SHARES], ACC)
            norm_total = tl.zeros([SHARES], ACC)
            p = 0
            while p < programs:
                at = p + tl.arange(0, SHARES)
                present = at < programs
                if HAS_L1:
                    ab_total += tl.load(shares + at, mask=present, other=0, cache_modifier=".cg")
                if HAS_L2:
                    sq_total += tl.load(shares + programs + at, mask=present, other=0, cache_modifier=".cg")
                if HAS_GL:
                    norm_total += tl.load(shares + 2 * programs + at, mask=present, other=0, cache_modifier=".cg")
                p += SHARES
            result = tl.zeros([], ACC)
            if HAS_L1:
                result = result + scalar(l1_bits, ACC) * tl.sum(ab_total, 0)
            if HAS_L2:
                result = result + scalar(half_l2_bits, ACC) * tl.sum(sq_total, 0)
            if HAS_GL:
                result = result + scalar(gl_bits, ACC) * tl.sum(norm_total, 0)
            tl.store(value, result)


# ---------------------------------------------------------------------------------------
# Launchers (call them inside ``on_device(table)``)
# ---------------------------------------------------------------------------------------


def finalize_programs(table: Table, acc: torch.dtype) -> int:
    return triton.cdiv(table.groups, GROUPS_PER_PROGRAM[acc])


def finalize_workspace(table: Table, acc: torch.dtype) -> Tensor:
    """The workspace of a sums pass followed by :func:`launch_finalize`."""
    return workspace(table, acc, finalize_programs(table, acc))


def launch_sums(
    table: Table, dtype: torch.dtype, ws: Tensor, with_abs: bool = True, decay: Optional[tuple] = None
) -> None:
    """:func:`sums_kernel` over the table's params; ``decay``: ``(lr, lr_bits, a_bits, b_bits,
    has_l2, has_l1, lr_tensor)`` of :func:`step_constants`, for the decayed weights' sums."""
    lr, lr_bits, a_bits, b_bits, has_l2, has_l1, lr_tensor = decay or (None, 0, 0, 0, False, False, False)
    sums_kernel[(table.items,)](
        table.data, ws, lr, lr_bits, a_bits, b_bits,
        DTYPE=TL_DTYPES[dtype], ACC=accumulate_tl_dtype(dtype), BLOCK=BLOCKS[dtype], ABS=with_abs,
        DECAYED=decay is not None, HAS_L2=has_l2, HAS_L1=has_l1, LR_TENSOR=lr_tensor,
        **LAUNCH_OPTIONS,
    )


def launch_finalize(
    table: Table,
    ws: Tensor,
    with_abs: bool = True,
    tensor_sums: Optional[Tuple[Tensor, Tensor]] = None,
    factors: Optional[Tensor] = None,
    factor: tl.constexpr = NO_FACTOR,
    value: Optional[Tensor] = None,
    coefs: Tuple[float, float, float] = (0.0, 0.0, 0.0),
    lr: Optional[Tensor] = None,
    lr_bits: int = 0,
    lr_tensor: bool = False,
) -> None:
    """:func:`finalize_kernel` over the sums in ``ws``. ``coefs = (l1, l2, group_lasso)``;
    for ``DECAY_SHRINK``, ``group_lasso`` is ``lr * group_lasso`` unless ``lr_tensor``."""
    l1, l2, gl = coefs
    tensor_abs, tensor_sq = tensor_sums or (None, None)
    finalize_kernel[(finalize_programs(table, ws.dtype),)](
        table.data, ws, tensor_abs, tensor_sq, factors, value, lr, lr_bits,
        f64_bits(l1), f64_bits(l2), f64_bits(l2 / 2), f64_bits(gl),
        ACC=TL_DTYPES[ws.dtype], GROUPS=GROUPS_PER_PROGRAM[ws.dtype], ITEMS=ITEMS_PER_STEP, SHARES=SHARES_PER_STEP,
        ABS=with_abs and (tensor_sums is not None or (value is not None and bool(l1))),
        TENSOR_SUMS=tensor_sums is not None, FACTOR=factor.value, VALUE=value is not None,
        HAS_L1=value is not None and bool(l1), HAS_L2=value is not None and bool(l2),
        HAS_GL=value is not None and bool(gl),
        LR_TENSOR=lr_tensor,
        **LAUNCH_OPTIONS,
    )


# ---------------------------------------------------------------------------------------
# Ops on a table
# ---------------------------------------------------------------------------------------


def norms(table: Table, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Per-tensor ``sum |w|`` and ``sum w^2`` (of a table whose groups are its tensors)."""
    if table.row_groups:
        raise ValueError("fastreg's triton norms take a table of tensor groups, not of rows")
    acc = ACCUMULATE[dtype]
    with on_device(table):
        sums = (torch.empty(table.tensors, dtype=acc, device=table.device),
                torch.empty(table.tensors, dtype=acc, device=table.device))
        if table.items:
            ws = finalize_workspace(table, acc)
            launch_sums(table, dtype, ws)
            launch_finalize(table, ws, tensor_sums=sums)
    return sums


def value(table: Table, dtype: torch.dtype, l1: float, l2: float, group_lasso: float) -> Tensor:
    """``P`` of the table's params: sums + finalize, two launches."""
    acc = ACCUMULATE[dtype]
    if not (l1 or l2 or group_lasso) or not table.groups:
        return torch.zeros((), dtype=acc, device=table.device)
    with on_device(table):
        out = torch.empty((), dtype=acc, device=table.device)
        ws = finalize_workspace(table, acc)
        launch_sums(table, dtype, ws, with_abs=bool(l1))
        launch_finalize(table, ws, with_abs=bool(l1), value=out, coefs=(l1, l2, group_lasso))
    return out


# ---------------------------------------------------------------------------------------
# List ops: what the backend runs for tensors a plan has no table for, and, as custom ops
# (opaque, correctly typed nodes; the compiler cannot see memory reached through the
# table), what compiled code runs.
# ---------------------------------------------------------------------------------------


def norms_of(params: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per-tensor ``sum |w|`` and ``sum w^2``."""
    staged = Staged(params)  # the table addresses its copies: they live until the launches
    return norms(staged.table(rows=False), params[0].dtype)


def value_of(params: List[Tensor], l1: float, l2: float, group_lasso: float, group_dim: Optional[int]) -> Tensor:
    """``P(params)``."""
    staged = Staged(params)
    return value(staged.table(rows=row_groups(group_lasso, group_dim)), params[0].dtype, l1, l2, group_lasso)


@torch.library.custom_op("fastreg_triton::norms", mutates_args=())
def norms_op(params: List[Tensor]) -> Tuple[Tensor, Tensor]:
    return norms_of(params)


@norms_op.register_fake
def _(params):
    acc = ACCUMULATE[params[0].dtype]
    return params[0].new_empty(len(params), dtype=acc), params[0].new_empty(len(params), dtype=acc)


@torch.library.custom_op("fastreg_triton::value", mutates_args=())
def value_op(params: List[Tensor], l1: float, l2: float, group_lasso: float, group_dim: Optional[int]) -> Tensor:
    return value_of(params, l1, l2, group_lasso, group_dim)


@value_op.register_fake
def _(params, l1, l2, group_lasso, group_dim):
    return params[0].new_empty((), dtype=ACCUMULATE[params[0].dtype])
