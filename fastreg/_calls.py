"""Prepared calls: a tensor list with its plan (:mod:`fastreg._plan`), and the backend ops run
over it, bucket by bucket.

A call is planned in full before any op runs, so a bad tensor or a backend that refuses a bucket
raises before anything is written. :mod:`fastreg.functional`, :mod:`fastreg.distributed` (on the
local shards) and :class:`fastreg.Regularized` (which prepares every param group first) share it.

A bucket whose backend runs from tables (``cpp``, ``cuda``, ``triton``) and whose tensors are
contiguous runs its kernels from the plan's cached work-layout table: nothing per tensor in
Python. Other buckets (the pure-PyTorch backends, non-contiguous tensors, and every bucket while
``torch.compile`` traces) call the backend's list ops.
"""
from __future__ import annotations

import operator
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _dispatch, _plan
from ._plan import Bucket, Plan
from .backends import Backend, Coefficients

_GRAD = operator.attrgetter("grad")


class Call(NamedTuple):
    plan: Plan
    tensors: List[Tensor]
    """The call's list, as given (the plan says which of them the call works on)."""
    backend: Optional[str]
    devices: bool


def prepare(tensors: List[Tensor], backend: Optional[str], with_grads: bool = False, writes_params: bool = False,
            name: str = "params", devices: bool = False) -> Call:
    """Plan a call over ``tensors`` (a list). ``with_grads``: the tensors with a ``.grad``, whose
    grads are written; ``writes_params``: the tensors are written (with ``with_grads`` too: the
    tensors that have a ``.grad`` are written, as an optimizer's decay does). ``devices``: the
    tensors may span devices."""
    if with_grads and writes_params:
        kind = _plan.WRITES_GRADED
    elif with_grads:
        kind = _plan.WRITES_GRADS
    elif writes_params:
        kind = _plan.WRITES_PARAMS
    else:
        kind = _plan.READ
    return Call(_plan.plan(tensors, backend, kind, name, devices), tensors, backend, devices)


def _params(call: Call, bucket: Bucket) -> List[Tensor]:
    return bucket.pick(call.plan.tensors(call.tensors))


def _table(call: Call, bucket: Bucket, row_groups: bool) -> Optional[Tensor]:
    """The bucket's cached table when its kernels can run from one (else None: list ops)."""
    if bucket.extents is None or not bucket.contiguous or torch.compiler.is_compiling():
        return None
    table = bucket.tables.get(row_groups)
    if table is not None:
        return table
    params = _params(call, bucket)
    grads = list(map(_GRAD, params)) if call.plan.kind == _plan.WRITES_GRADS else None
    return bucket.table(row_groups, params, grads)


def total(values: List[Tensor], plan: Plan) -> Tensor:
    return _dispatch.total(values, plan.result_dtype, plan.device)


class PenaltyFunction(torch.autograd.Function):
    """``P`` of one (device, dtype) bucket; the backward is one backend call for all its tensors."""

    @staticmethod
    def forward(ctx, call: Call, bucket: Bucket, coefs: Coefficients, *params: Tensor) -> Tensor:
        ctx.backend, ctx.coefs = bucket.backend, coefs
        ctx.save_for_backward(*params)
        return _value(call, bucket, coefs, list(params))

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        params = ctx.saved_tensors
        grads = ctx.backend.penalty_backward(list(params), grad_output, ctx.coefs)
        grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[3:])]
        return (None, None, None, *grads)


def _value(call: Call, bucket: Bucket, coefs: Coefficients, params: List[Tensor]) -> Tensor:
    table = _table(call, bucket, coefs.row_groups)
    if table is None:
        return bucket.backend.value(params, coefs)
    return bucket.backend.table_ops(bucket.device).value(table, bucket.dtype, coefs.l1, coefs.l2, coefs.group_lasso)


def _places(call: Call) -> List[Tuple[List[Tensor], Optional[Call]]]:
    """A sharded call's tensors by place: (DTensors of one device mesh, None), which
    :mod:`fastreg.distributed` computes, and (regular tensors of one device, their call), for
    an optimizer's param group that mixes them."""
    from . import distributed

    if not call.devices:
        return [(call.tensors, None)]
    tensors = call.plan.tensors(call.tensors)
    kind = call.plan.kind
    return [(place, None if sharded else Call(_plan.plan(place, call.backend, kind, call.plan.name, True), place,
                                              call.backend, True))
            for place, sharded in distributed.places(tensors)]


def penalty(call: Call, coefs: Coefficients) -> Tensor:
    if call.plan.sharded:
        from . import distributed

        return _sharded_total([distributed.penalty(ts, coefs, call.backend) if c is None else penalty(c, coefs)
                               for ts, c in _places(call)])
    values = []
    for bucket in call.plan.buckets:
        params = _params(call, bucket)
        values.append(PenaltyFunction.apply(call, bucket, coefs, *params))
    return total(values, call.plan)


def value(call: Call, coefs: Coefficients) -> Tensor:
    """``P`` without autograd."""
    return total([_value(call, bucket, coefs, _params(call, bucket)) for bucket in call.plan.buckets], call.plan)


def _sharded_total(values: List[Tensor]) -> Tensor:
    return _dispatch.total(values, _dispatch.result_dtype(values), values[0].device)


def norms_parts(call: Call) -> Tuple[Tensor, Tensor]:
    """Per-tensor ``sum|w|`` and ``sum w^2`` of a prepared call, in its tensors' order (of
    whole tensors, on every rank, for sharded ones)."""
    plan = call.plan
    if plan.sharded:
        from . import distributed

        return distributed.norm_sums(call.tensors, call.backend)
    per_bucket = []
    for bucket in plan.buckets:
        table = _table(call, bucket, False)
        if table is None:
            per_bucket.append(bucket.backend.norms(_params(call, bucket)))
        else:
            per_bucket.append(bucket.backend.table_ops(bucket.device).norms(table, bucket.dtype))
    dtype = plan.result_dtype
    if len(per_bucket) == 1:
        return tuple(x.to(dtype) for x in per_bucket[0])
    count = len(plan.tensors(call.tensors))
    abs_sums = torch.empty(count, dtype=dtype, device=plan.device)
    sq_sums = torch.empty(count, dtype=dtype, device=plan.device)
    for bucket, (bucket_abs, bucket_sq) in zip(plan.buckets, per_bucket):
        where = torch.tensor(bucket.positions, device=plan.device)
        abs_sums[where] = bucket_abs.to(device=plan.device, dtype=dtype)
        sq_sums[where] = bucket_sq.to(device=plan.device, dtype=dtype)
    return abs_sums, sq_sums


def add_grad(call: Call, coefs: Coefficients, grads: Optional[Sequence[Tensor]] = None) -> Tensor:
    """``grad += dP/dw`` for the call's tensors with a ``.grad`` (or into ``grads``, one per
    tensor of the call, for a plan of tensors whose grads live elsewhere, as DTensors' local
    shards do); returns ``P`` of those tensors."""
    if call.plan.sharded:
        from . import distributed

        return _sharded_total([distributed.add_penalty_grad_(ts, coefs, call.backend) if c is None else add_grad(c, coefs)
                               for ts, c in _places(call)])
    values = []
    with torch.no_grad():
        for bucket in call.plan.buckets:
            table = None if grads is not None else _table(call, bucket, coefs.row_groups)
            if table is not None:
                values.append(bucket.backend.table_ops(bucket.device).add_grad_(
                    table, bucket.dtype, coefs.l1, coefs.l2, coefs.group_lasso))
                continue
            params = _params(call, bucket)
            # A comprehension, not map(attrgetter): torch.compile traces this path and cannot
            # trace attrgetter.__call__.
            bucket_grads = [p.grad for p in params] if grads is None else bucket.pick(list(grads))
            values.append(bucket.backend.add_grad_(params, bucket_grads, coefs))
    return total(values, call.plan)


def decay(call: Call, lr, coefs: Coefficients) -> None:
    if coefs.is_zero():
        return
    if call.plan.sharded:
        from . import distributed

        for tensors, c in _places(call):
            if c is None:
                distributed.decay_(tensors, lr, coefs, call.backend)
            else:
                decay(c, lr, coefs)
        return
    with torch.no_grad():
        for bucket in call.plan.buckets:
            table = _table(call, bucket, coefs.row_groups)
            if table is None:
                bucket.backend.decay_(_params(call, bucket), lr, coefs)
                continue
            ops = bucket.backend.table_ops(bucket.device)
            if isinstance(lr, Tensor):
                ops.decay_(table, bucket.dtype, 0.0, lr, coefs.l1, coefs.l2, coefs.group_lasso)
            else:
                ops.decay_(table, bucket.dtype, float(lr), None, coefs.l1, coefs.l2, coefs.group_lasso)


def penalty_backward(call: Call, bucket: Bucket, grad_output: Tensor, coefs: Coefficients) -> List[Tensor]:
    return bucket.backend.penalty_backward(_params(call, bucket), grad_output, coefs)


__all__ = ["Backend", "Call", "add_grad", "decay", "norms_parts", "penalty", "penalty_backward", "prepare", "total", "value"]
