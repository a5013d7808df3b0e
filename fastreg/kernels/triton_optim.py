"""Fused optimizer steps, Adam / AdamW and SGD, with fastreg's decay before the update and its
proximal maps after it, over every tensor of a bucket.

Math, per element ``w`` of group ``g`` with gradient ``d``, in this order. The update is
torch's fused CUDA kernels' (torch >= 2.11), operation for operation: every value and
hyperparameter in the accumulate dtype (torch's opmath type), the multiply-adds that nvcc
contracts in torch's build written as ``tl.fma``, IEEE division and square root::

    P   = l1*|w|_1 + penalty_l2/2*|w|^2 + gl*sum_g |w_g|     of the starting weights
    w   = w * (1 - lr*l2)                                     Regularized's decoupled decay
    d   = d / grad_scale (stored back);  -d with maximize     GradScaler's protocol
    Adam:  d = fma(w, wd, d) (Adam)  or  w = fma(-(lr*wd), w, w) (AdamW)
           m = fma(beta1, m, fma(-beta1, d, d))    v = fma(beta2, v, fma(-beta2, d*d, d*d))
           v' = max(vmax, v) with amsgrad (stored), else v
           w = w - (lr/bc1) * m / (sqrt(v')/sqrt(bc2) + eps)     bc_i = 1 - beta_i^step
    SGD:   d = fma(wd, w, d);   b = d (a new buffer) or momentum*b + (1-dampening)*d (stored)
           d = fma(momentum, b, d) (nesterov) or b;   w = fma(-lr, d, w)
    w   = sign(w) * max(|w| - lr*l1, 0)                       prox of L1
    w_g = w_g * max(0, 1 - lr*gl/|w_g|)                       prox of group lasso

Launches, whatever the number of tensors:

1. Adam: :func:`steps_kernel` advances each tensor's float32 step on the device, by
   ``1 - found_inf`` (torch adds 1, then subtracts ``found_inf``). The update reads the new
   count, so the programs of a tensor split over several items all see the same one.
2. :func:`step_kernel`, one program per work item: one read and one write of the weights,
   gradients and state; the sums of the starting weights (the penalty) and, with group lasso,
   of the updated and thresholded ones (the group norms) go to workspaces.
3. With ``track``: the finalize of :mod:`.triton_norms` turns the sums into the penalty.
4. With group lasso: the finalize turns each norm into its shrink and :func:`shrink_kernel`
   scales the weights, a second pass over them alone.

Nothing is read on the host: ``lr`` (a one-element tensor), ``grad_scale`` and ``found_inf``
stay on the device and the kernels read them, so a step can be captured in a CUDA graph. With
``found_inf`` set, nothing is written and the penalty is still computed, from the same sums.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_norms import DECAY_SHRINK, finalize_workspace, launch_finalize, step_constants
from .triton_table import (
    ACCUMULATE,
    H_PTRS_AT,
    H_TENSORS,
    LAUNCH_OPTIONS,
    OP_DECAY,
    OP_SUMS,
    TL_DTYPES,
    Table,
    accumulate_tl_dtype,
    counter_of,
    decayed,
    device_function,
    device_scalar,
    f64_bits,
    item_of,
    item_pass,
    on_device,
    run_of,
    scalar,
    scalar_arg,
    sqrt_rn,
    store_sums,
)

ADAM = tl.constexpr(0)
SGD = tl.constexpr(1)

# Address rows of a step's table, as csrc/fastreg_optim.cpp lays them out.
ROW_GRAD = tl.constexpr(1)
ROW_STATE = tl.constexpr(2)
"""Adam's exp_avg, SGD's momentum buffer."""
ROW_EXP_AVG_SQ = tl.constexpr(3)
ROW_STEP = tl.constexpr(4)
ROW_MAX_EXP_AVG_SQ = tl.constexpr(5)

STEP_BLOCKS = {torch.float16: 1024, torch.bfloat16: 1024, torch.float32: 512, torch.float64: 256}
"""Elements a program updates per step: one 128-bit access per thread and tensor (with the
4 warps of every launch); each element holds up to five streams."""

STEP_OPTIONS = {
    torch.float16: dict(LAUNCH_OPTIONS, maxnreg=192),
    torch.bfloat16: dict(LAUNCH_OPTIONS, maxnreg=192),
    torch.float32: dict(LAUNCH_OPTIONS, maxnreg=128),
    torch.float64: dict(LAUNCH_OPTIONS, maxnreg=128),
}
"""The step kernel's register budgets by dtype, the least that leaves nothing on the stack for
any variant on sm_80 and sm_90 (Triton 3.9). Left to choose, ptxas gives some variants fewer
registers and a stack frame of 8 to 32 bytes. The 16-bit dtypes need the most: 8 elements per
thread and stream, five streams and three running sums (2 blocks of 128 threads per SM)."""

STEPS_BLOCK = 1024
"""Tensors whose steps one program of :func:`steps_kernel` advances."""


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@device_function
def power(base, n):
    """``base ** n`` for a step count ``n`` (a whole number, as float32 counts it), by
    squaring in fp64, rounded once to ``base``'s dtype: within an ulp of CUDA's ``pow``
    (Triton's interpreter has none)."""
    ACC: tl.constexpr = base.dtype
    base = base.to(tl.float64)
    k = n.to(tl.int64)
    result = base * 0 + 1
    while k > 0:
        result = tl.where(k % 2 == 1, result * base, result)
        base = base * base
        k = k // 2
    return result.to(ACC)


@device_function
def divide(a, b):
    """``a / b`` correctly rounded (Triton's fp32 ``/`` may be approximate)."""
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@device_function
def load(ptrs, mask, ACC: tl.constexpr):
    if mask is None:
        return tl.load(ptrs).to(ACC)
    else:
        return tl.load(ptrs, mask=mask, other=0).to(ACC)


@device_function
def store(ptrs, x, mask, DTYPE: tl.constexpr):
    if mask is None:
        tl.store(ptrs, x.to(DTYPE))
    else:
        tl.store(ptrs, x.to(DTYPE), mask=mask)


@device_function
def adam_math(x, d, m_ptrs, v_ptrs, vmax_ptrs, mask, hyper, tensor,
              ACC: tl.constexpr, DTYPE: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
              AMSGRAD: tl.constexpr):
    """torch's ``adam_math``: the weights after the update; writes the state."""
    beta1, beta2, eps, wd, lr_wd = hyper
    step_size, bias_correction2_sqrt = tensor
    if HAS_WD:
        if DECOUPLED:
            x = tl.fma(-lr_wd, x, x)
        else:
            d = tl.fma(x, wd, d)
    m = tl.fma(beta1, load(m_ptrs, mask, ACC), tl.fma(-beta1, d, d))
    d2 = d * d
    v = tl.fma(beta2, load(v_ptrs, mask, ACC), tl.fma(-beta2, d2, d2))
    store(m_ptrs, m, mask, DTYPE)
    store(v_ptrs, v, mask, DTYPE)
    second = v
    if AMSGRAD:
        most = load(vmax_ptrs, mask, ACC)
        # std::max(most, v): the first unless it is less (a NaN v keeps the old maximum)
        second = tl.where(most < v, v, most)
        store(vmax_ptrs, second, mask, DTYPE)
    denom = divide(sqrt_rn(second), bias_correction2_sqrt) + eps
    return x - divide(step_size * m, denom)


@device_function
def sgd_math(x, d, b_ptrs, mask, hyper, first, lr,
             ACC: tl.constexpr, DTYPE: tl.constexpr, HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr,
             NESTEROV: tl.constexpr, HAS_FIRST: tl.constexpr):
    """torch's ``sgd_math``: the weights after the update; writes the momentum buffer."""
    momentum, dampening, wd, _, _ = hyper
    if HAS_WD:
        d = tl.fma(wd, x, d)
    if MOMENTUM:
        # two products and a sum, which torch's build leaves uncontracted
        b = momentum * load(b_ptrs, mask, ACC) + (1 - dampening) * d
        if HAS_FIRST:
            b = tl.where(first, d, b)
        store(b_ptrs, b, mask, DTYPE)
        if NESTEROV:
            d = tl.fma(momentum, b, d)
        else:
            d = b
    return tl.fma(-lr, d, x)


@device_function
def step_block(
    w_ptrs, d_ptrs, s_ptrs, v_ptrs, vmax_ptrs, mask, start_abs, start_sq, end_sq,
    hyper, tensor, lr, pre, threshold, grad_scale,
    DTYPE: tl.constexpr, ACC: tl.constexpr, OPTIMIZER: tl.constexpr, TRACK: tl.constexpr,
    HAS_L2: tl.constexpr, HAS_L1: tl.constexpr, HAS_GL: tl.constexpr, HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_FIRST: tl.constexpr,
):
    """One block of a run (``mask`` None: a full block): the module's math, every stream
    read and written once; returns the running sums."""
    x = load(w_ptrs, mask, ACC)
    if TRACK:
        # as item_pass sums them, so a skipped step's penalty has the same bits
        start_abs += tl.abs(x)
        start_sq = tl.fma(x, x, start_sq)
    x = decayed(x, pre, threshold, HAS_L2, False)
    d = load(d_ptrs, mask, ACC)
    if UNSCALE:
        d = divide(d, grad_scale)
        store(d_ptrs, d, mask, DTYPE)
    if MAXIMIZE:
        d = -d
    if OPTIMIZER == ADAM:
        x = adam_math(x, d, s_ptrs, v_ptrs, vmax_ptrs, mask, hyper, tensor, ACC, DTYPE, HAS_WD, DECOUPLED, AMSGRAD)
    else:
        x = sgd_math(x, d, s_ptrs, mask, hyper, tensor, lr, ACC, DTYPE, HAS_WD, MOMENTUM, NESTEROV, HAS_FIRST)
    x = decayed(x, pre, threshold, False, HAS_L1)
    store(w_ptrs, x, mask, DTYPE)
    if HAS_GL:
        if mask is not None:
            x = tl.where(mask, x, 0.0)
        end_sq = tl.fma(x, x, end_sq)
    return start_abs, start_sq, end_sq


@device_function
def aligned(addr, DTYPE: tl.constexpr):
    """A 16-byte aligned address as a pointer whose alignment the compiler sees."""
    return tl.multiple_of(((addr // 16) * 16).to(tl.pointer_type(DTYPE)), 16)


@device_function
def step_pass(
    table, ws, ws_end, firsts, hyper, lr, pre, threshold, grad_scale,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, OPTIMIZER: tl.constexpr,
    TRACK: tl.constexpr, ABS: tl.constexpr, HAS_L2: tl.constexpr, HAS_L1: tl.constexpr,
    HAS_GL: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    HAS_FIRST: tl.constexpr,
):
    """The update of every run of work item ``program_id(0)``, in blocks as
    :func:`~.triton_table.item_pass` walks them (aligned runs unmasked, with 128-bit accesses)."""
    ES: tl.constexpr = DTYPE.primitive_bitwidth // 8
    VEC: tl.constexpr = 16 // ES
    pid, count, num_groups, slots, ptrs, g, g_end, item = item_of(table)
    lanes = tl.arange(0, BLOCK)
    while g < g_end:
        t, start, length, split = run_of(item, g)
        w_addr = tl.load(ptrs + t) + start * ES
        d_addr = tl.load(ptrs + ROW_GRAD * count + t) + start * ES
        s_addr = d_addr
        v_addr = d_addr
        vmax_addr = d_addr
        if OPTIMIZER == ADAM:
            s_addr = tl.load(ptrs + ROW_STATE * count + t) + start * ES
            v_addr = tl.load(ptrs + ROW_EXP_AVG_SQ * count + t) + start * ES
            if AMSGRAD:
                vmax_addr = tl.load(ptrs + ROW_MAX_EXP_AVG_SQ * count + t) + start * ES
            beta1, beta2, _, _, _ = hyper
            n = tl.load(tl.load(ptrs + ROW_STEP * count + t).to(tl.pointer_type(tl.float32)))
            tensor = (divide(lr, 1 - power(beta1, n)), sqrt_rn(1 - power(beta2, n)))
        else:
            if MOMENTUM:
                s_addr = tl.load(ptrs + ROW_STATE * count + t) + start * ES
            if HAS_FIRST:
                tensor = tl.load(firsts + t) != 0
            else:
                tensor = False
        is_aligned = ((w_addr | d_addr | s_addr | v_addr | vmax_addr) % 16 == 0) & (length % VEC == 0)
        start_abs = tl.zeros([BLOCK], ACC)
        start_sq = tl.zeros([BLOCK], ACC)
        end_sq = tl.zeros([BLOCK], ACC)
        if is_aligned:
            w = aligned(w_addr, DTYPE)
            d = aligned(d_addr, DTYPE)
            s = aligned(s_addr, DTYPE)
            v = aligned(v_addr, DTYPE)
            vmax = aligned(vmax_addr, DTYPE)
            full = length // BLOCK
            b = 0
            while b < full:
                at = b * BLOCK + lanes
                start_abs, start_sq, end_sq = step_block(
                    w + at, d + at, s + at, v + at, vmax + at, None, start_abs, start_sq, end_sq,
                    hyper, tensor, lr, pre, threshold, grad_scale,
                    DTYPE, ACC, OPTIMIZER, TRACK, HAS_L2, HAS_L1, HAS_GL, HAS_WD, DECOUPLED, AMSGRAD,
                    MAXIMIZE, UNSCALE, MOMENTUM, NESTEROV, HAS_FIRST,
                )
                b += 1
            if full * BLOCK < length:
                at = full * BLOCK + lanes
                start_abs, start_sq, end_sq = step_block(
                    w + at, d + at, s + at, v + at, vmax + at, at < length, start_abs, start_sq, end_sq,
                    hyper, tensor, lr, pre, threshold, grad_scale,
                    DTYPE, ACC, OPTIMIZER, TRACK, HAS_L2, HAS_L1, HAS_GL, HAS_WD, DECOUPLED, AMSGRAD,
                    MAXIMIZE, UNSCALE, MOMENTUM, NESTEROV, HAS_FIRST,
                )
        else:
            w = w_addr.to(tl.pointer_type(DTYPE))
            d = d_addr.to(tl.pointer_type(DTYPE))
            s = s_addr.to(tl.pointer_type(DTYPE))
            v = v_addr.to(tl.pointer_type(DTYPE))
            vmax = vmax_addr.to(tl.pointer_type(DTYPE))
            k = 0
            while k < length:
                at = k + lanes
                start_abs, start_sq, end_sq = step_block(
                    w + at, d + at, s + at, v + at, vmax + at, at < length, start_abs, start_sq, end_sq,
                    hyper, tensor, lr, pre, threshold, grad_scale,
                    DTYPE, ACC, OPTIMIZER, TRACK, HAS_L2, HAS_L1, HAS_GL, HAS_WD, DECOUPLED, AMSGRAD,
                    MAXIMIZE, UNSCALE, MOMENTUM, NESTEROV, HAS_FIRST,
                )
                k += BLOCK
        if TRACK:
            store_sums(ws, slots, num_groups, g, pid, split, start_abs, start_sq, ABS)
        if HAS_GL:
            store_sums(ws_end, slots, num_groups, g, pid, split, start_abs, end_sq, False)
        g += 1


@triton.jit(do_not_specialize=["lr_bits", "a_bits", "b_bits", "h0_bits", "h1_bits", "h2_bits", "h3_bits"])
def step_kernel(
    table, ws, ws_end, lr, grad_scale, found_inf, firsts,
    lr_bits: tl.int64, a_bits: tl.int64, b_bits: tl.int64,
    h0_bits: tl.int64, h1_bits: tl.int64, h2_bits: tl.int64, h3_bits: tl.int64,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, OPTIMIZER: tl.constexpr,
    TRACK: tl.constexpr, ABS: tl.constexpr, HAS_L2: tl.constexpr, HAS_L1: tl.constexpr,
    HAS_GL: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr, SKIPPABLE: tl.constexpr,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_FIRST: tl.constexpr,
):
    """One work item's step. Hyperparameters (fp64 bits): Adam ``beta1, beta2, eps,
    weight_decay``; SGD ``momentum, dampening, weight_decay``. ``a_bits``, ``b_bits``: the
    decay's constants (:func:`~.triton_norms.step_constants`). With ``found_inf`` nonzero
    (``SKIPPABLE``), only the sums of the penalty."""
    if TRACK:
        if tl.program_id(0) == 0:
            tl.store(counter_of(ws), 0)
    if SKIPPABLE:
        proceed = tl.load(found_inf) == 0
    else:
        proceed = True
    if proceed:
        # torch rounds every hyperparameter to its opmath type (a tensor lr from its own dtype)
        rate = scalar_arg(lr, lr_bits, ACC)
        pre, threshold = step_constants(lr, lr_bits, a_bits, b_bits, ACC, LR_TENSOR)
        h3 = scalar(h3_bits, ACC)
        hyper = (scalar(h0_bits, ACC), scalar(h1_bits, ACC), scalar(h2_bits, ACC), h3, rate * h3)
        if UNSCALE:
            scale = tl.load(grad_scale).to(ACC)
        else:
            scale = 1.0
        step_pass(
            table, ws, ws_end, firsts, hyper, rate, pre, threshold, scale,
            DTYPE, ACC, BLOCK, OPTIMIZER, TRACK, ABS, HAS_L2, HAS_L1, HAS_GL, HAS_WD, DECOUPLED, AMSGRAD,
            MAXIMIZE, UNSCALE, MOMENTUM, NESTEROV, HAS_FIRST,
        )
    elif TRACK:
        item_pass(
            table, ws, None, None, 0.0, 0.0, 0.0,
            DTYPE, ACC, BLOCK, OP_SUMS, True, ABS, False, False, False, False, False,
        )


@triton.jit
def steps_kernel(table, found_inf, BLOCK: tl.constexpr, SKIPPABLE: tl.constexpr):
    """Tensors ``[BLOCK * pid, BLOCK * (pid + 1))``: each float32 step (address row
    ``ROW_STEP``) becomes ``step + 1``, or ``(step + 1) - found_inf``."""
    count = tl.load(table + H_TENSORS)
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = t < count
    rows = table + tl.load(table + H_PTRS_AT) + ROW_STEP * count
    steps = tl.load(rows + t, mask=live, other=0).to(tl.pointer_type(tl.float32))
    advanced = tl.load(steps, mask=live, other=0) + 1
    if SKIPPABLE:
        advanced = advanced - tl.load(found_inf)
    tl.store(steps, advanced, mask=live)


@triton.jit
def shrink_kernel(
    table, shrinks, found_inf,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, SKIPPABLE: tl.constexpr,
):
    """One work item's block shrink: ``w *= shrinks[g]``, unless ``found_inf`` is nonzero."""
    if SKIPPABLE:
        proceed = tl.load(found_inf) == 0
    else:
        proceed = True
    if proceed:
        item_pass(
            table, None, shrinks, None, 1.0, 0.0, 0.0,
            DTYPE, ACC, BLOCK, OP_DECAY, False, False, False, False, True, False, False,
        )


# ---------------------------------------------------------------------------------------
# Launchers (ops on a table)
# ---------------------------------------------------------------------------------------


def _on_device(t: Optional[Tensor], table: Table, name: str) -> Optional[Tensor]:
    """A GradScaler tensor where the kernels read it: one float32 element on the table's device."""
    if t is None:
        return None
    if t.numel() != 1 or t.dtype != torch.float32:
        raise ValueError(f"{name} must be one float32 element, got {t.dtype} of shape {tuple(t.shape)}")
    return t if t.device == table.device else t.to(table.device, non_blocking=True)


def _step(table: Table, dtype: torch.dtype, optimizer: int, hyper: Tuple[float, ...], flags: dict,
          firsts: Optional[Tensor], lr: float, lr_tensor: Optional[Tensor], maximize: bool,
          grad_scale: Optional[Tensor], found_inf: Optional[Tensor], l1: float, l2: float, group_lasso: float,
          penalty_l2: float, track: bool) -> Optional[Tensor]:
    acc = ACCUMULATE[dtype]
    with on_device(table):
        grad_scale = _on_device(grad_scale, table, "grad_scale")
        found_inf = _on_device(found_inf, table, "found_inf")
        tensor_lr = lr_tensor is not None
        if tensor_lr:
            if lr_tensor.numel() != 1 or not lr_tensor.is_floating_point():
                raise ValueError(f"lr_tensor must be one floating-point element, got {lr_tensor.dtype} of shape "
                                 f"{tuple(lr_tensor.shape)}")
            lr_ptr, lr_bits = device_scalar(lr_tensor, table, acc)
            a, b, threshold = l2, l1, group_lasso
        else:
            lr_ptr, lr_bits = None, f64_bits(lr)
            a, b, threshold = 1 - lr * l2, lr * l1, lr * group_lasso
        skippable = found_inf is not None
        if optimizer == ADAM.value and table.tensors:
            steps_kernel[(triton.cdiv(table.tensors, STEPS_BLOCK),)](
                table.data, found_inf, BLOCK=STEPS_BLOCK, SKIPPABLE=skippable, **LAUNCH_OPTIONS)
        value = None
        if track:
            value = torch.zeros((), dtype=acc, device=table.device)
        if not table.items:
            return value
        ws = finalize_workspace(table, acc) if track else None
        ws_end = finalize_workspace(table, acc) if group_lasso else None
        block = STEP_BLOCKS[dtype]
        h = [f64_bits(x) for x in hyper] + [0] * (4 - len(hyper))
        step_kernel[(table.items,)](
            table.data, ws, ws_end, lr_ptr, grad_scale, found_inf, firsts, lr_bits, f64_bits(a), f64_bits(b), *h,
            DTYPE=TL_DTYPES[dtype], ACC=accumulate_tl_dtype(dtype), BLOCK=block, OPTIMIZER=optimizer, TRACK=track,
            ABS=track and bool(l1), HAS_L2=bool(l2), HAS_L1=bool(l1), HAS_GL=bool(group_lasso), LR_TENSOR=tensor_lr,
            MAXIMIZE=maximize, UNSCALE=grad_scale is not None, SKIPPABLE=skippable, **flags, **STEP_OPTIONS[dtype],
        )
        if track:
            launch_finalize(table, ws, with_abs=bool(l1), value=value, coefs=(l1, penalty_l2, group_lasso))
        if group_lasso:
            shrinks = torch.empty(table.groups, dtype=acc, device=table.device)
            launch_finalize(table, ws_end, with_abs=False, factors=shrinks, factor=DECAY_SHRINK,
                            coefs=(0.0, 0.0, threshold), lr=lr_ptr, lr_bits=lr_bits, lr_tensor=tensor_lr)
            shrink_kernel[(table.items,)](
                table.data, shrinks, found_inf,
                DTYPE=TL_DTYPES[dtype], ACC=accumulate_tl_dtype(dtype), BLOCK=block, SKIPPABLE=skippable,
                **LAUNCH_OPTIONS,
            )
    return value


def adam_step(table: Table, dtype: torch.dtype, lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float,
              eps: float, weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
              grad_scale: Optional[Tensor], found_inf: Optional[Tensor], l1: float, l2: float, group_lasso: float,
              penalty_l2: float, track: bool) -> Optional[Tensor]:
    """One Adam / AdamW step of the table's tensors (address rows: params, grads, exp_avg,
    exp_avg_sq, steps (float32 scalars on the device), then max_exp_avg_sq with ``amsgrad``);
    the arguments are the C++ planner's ``adam_step_``. Returns the penalty of the starting
    weights (with ``track``), a 0-dim tensor on the device, else None."""
    flags = dict(HAS_WD=weight_decay != 0, DECOUPLED=bool(decoupled), AMSGRAD=bool(amsgrad), MOMENTUM=False,
                 NESTEROV=False, HAS_FIRST=False)
    return _step(table, dtype, ADAM.value, (beta1, beta2, eps, weight_decay), flags, None, lr, lr_tensor, maximize,
                 grad_scale, found_inf, l1, l2, group_lasso, penalty_l2, track)


def sgd_step(table: Table, dtype: torch.dtype, lr: float, lr_tensor: Optional[Tensor], momentum: float,
             dampening: float, weight_decay: float, nesterov: bool, maximize: bool, first: Optional[Tensor],
             grad_scale: Optional[Tensor], found_inf: Optional[Tensor], l1: float, l2: float, group_lasso: float,
             penalty_l2: float, track: bool) -> Optional[Tensor]:
    """One SGD step of the table's tensors (address rows: params, grads, then the momentum
    buffers when ``momentum`` is nonzero); ``first`` flags (one bool per tensor) the buffers
    that are new. The arguments are the C++ planner's ``sgd_step_``; returns as
    :func:`adam_step`."""
    firsts = None
    if first is not None and momentum != 0:
        if first.dtype != torch.bool or first.dim() != 1 or first.numel() != table.tensors:
            raise ValueError(f"first must hold one bool per tensor ({table.tensors}), got {first.dtype} of shape "
                             f"{tuple(first.shape)}")
        firsts = first.to(torch.uint8)
        if firsts.device != table.device:
            if table.device.type == "cuda":
                firsts = firsts.pin_memory()
            firsts = firsts.to(table.device, non_blocking=True)
    flags = dict(HAS_WD=weight_decay != 0, DECOUPLED=False, AMSGRAD=False, MOMENTUM=momentum != 0,
                 NESTEROV=bool(nesterov), HAS_FIRST=firsts is not None)
    return _step(table, dtype, SGD.value, (momentum, dampening, weight_decay), flags, firsts, lr, lr_tensor, maximize,
                 grad_scale, found_inf, l1, l2, group_lasso, penalty_l2, track)
