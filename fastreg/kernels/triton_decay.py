"""Decoupled decay and proximal maps, in place on every tensor in one launch.

Math, per element ``w`` of group ``g``, with a step ``lr``::

    w1 = w * (1 - lr*l2)                              AdamW's decay
    w2 = sign(w1) * max(|w1| - lr*l1, 0)              prox of l1 (soft threshold)
    w3 = w2 * max(0, 1 - lr*gl / ||w2_g||)            prox of group lasso (0 for a zero group)

in the accumulate dtype, rounded once to the parameter dtype; ``max(x, 0)`` keeps NaN, as
``clamp_min`` does, so NaN weights stay NaN.

Launches: one (:func:`decay_kernel`) without group lasso. With it, the group norms of the
*thresholded* weights come first: the sums kernel of :mod:`.triton_norms` recomputes ``w2`` in
registers and sums ``w2^2`` per run, the finalize turns each group's sum into its shrink
factor, and :func:`decay_kernel` recomputes ``w2`` and scales it. Three launches; the weights
are read twice and written once.

``lr`` is a Python float (``1 - lr*l2``, ``lr*l1`` and ``lr*gl`` formed on the host in
fp64) or a one-element tensor, taking part in the arithmetic in the accumulate dtype: read in
the kernel when it is on the tensors' device (so a learning rate held there never
synchronizes with the host), read on the host when it is a CPU tensor.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_norms import DECAY_SHRINK, launch_finalize, launch_sums, step_constants
from .triton_table import (
    ACCUMULATE,
    BLOCKS,
    LAUNCH_OPTIONS,
    OP_DECAY,
    TL_DTYPES,
    Staged,
    Table,
    accumulate_tl_dtype,
    device_scalar,
    f64_bits,
    item_pass,
    on_device,
    row_groups,
    workspace,
)


@triton.jit(do_not_specialize=["lr_bits", "a_bits", "b_bits"])
def decay_kernel(
    table, shrinks, lr, lr_bits: tl.int64, a_bits: tl.int64, b_bits: tl.int64,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    HAS_L2: tl.constexpr, HAS_L1: tl.constexpr, HAS_GL: tl.constexpr, LR_TENSOR: tl.constexpr,
):
    """One work item in place: ``w = w2 * shrinks[g]`` (``w2`` without group lasso)."""
    factor, threshold = step_constants(lr, lr_bits, a_bits, b_bits, ACC, LR_TENSOR)
    item_pass(
        table, None, shrinks, None, factor, threshold, 0.0,
        DTYPE, ACC, BLOCK, OP_DECAY, False, False, HAS_L1, HAS_L2, HAS_GL, False, False,
    )


def decay(table: Table, dtype: torch.dtype, lr: float, lr_tensor: Optional[Tensor], l1: float, l2: float,
          group_lasso: float) -> None:
    """The decoupled step in place on the table's params; ``lr_tensor``, when given, replaces
    ``lr``."""
    if not (l1 or l2 or group_lasso) or not table.groups:
        return
    acc = ACCUMULATE[dtype]
    tensor_lr = lr_tensor is not None
    # Without an l2 or l1 step the learning rate only enters the shrink threshold.
    steps = bool(l1 or l2)
    with on_device(table):
        if tensor_lr:
            lr_ptr, lr_bits = device_scalar(lr_tensor, table, acc)
            a, b, threshold = l2, l1, group_lasso
        else:
            lr_ptr, lr_bits = None, 0
            a, b, threshold = 1 - lr * l2, lr * l1, lr * group_lasso
        step = (lr_ptr, lr_bits, f64_bits(a), f64_bits(b)) if steps else (None, 0, 0, 0)
        flags = dict(HAS_L2=bool(l2), HAS_L1=bool(l1), LR_TENSOR=tensor_lr and steps)
        shrinks = None
        if group_lasso:
            shrinks = torch.empty(table.groups, dtype=acc, device=table.device)
            ws = workspace(table, acc, 0)
            decayed = step + (bool(l2), bool(l1), tensor_lr) if steps else None
            launch_sums(table, dtype, ws, with_abs=False, decay=decayed)
            launch_finalize(table, ws, with_abs=False, factors=shrinks, factor=DECAY_SHRINK,
                            coefs=(0.0, 0.0, threshold), lr=lr_ptr, lr_bits=lr_bits, lr_tensor=tensor_lr)
        decay_kernel[(table.items,)](
            table.data, shrinks, *step,
            DTYPE=TL_DTYPES[dtype], ACC=accumulate_tl_dtype(dtype), BLOCK=BLOCKS[dtype], HAS_GL=bool(group_lasso),
            **flags, **LAUNCH_OPTIONS,
        )


def decay_of(params: List[Tensor], lr: float, lr_tensor: Optional[Tensor], l1: float, l2: float,
             group_lasso: float, group_dim: Optional[int]) -> None:
    """Decoupled step in place on ``params``; ``lr_tensor``, when given, replaces ``lr``."""
    if not (l1 or l2 or group_lasso):
        return
    staged = Staged(params)
    decay(staged.table(rows=row_groups(group_lasso, group_dim)), params[0].dtype, lr, lr_tensor, l1, l2,
          group_lasso)
    staged.write_back(0)


@torch.library.custom_op("fastreg_triton::decay_", mutates_args=("params",))
def decay_op(
    params: List[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    l1: float,
    l2: float,
    group_lasso: float,
    group_dim: Optional[int],
) -> None:
    decay_of(params, lr, lr_tensor, l1, l2, group_lasso, group_dim)


@decay_op.register_fake
def _(params, lr, lr_tensor, l1, l2, group_lasso, group_dim):
    return None
