"""Prepared calls: a tensor list checked once, split by (device, dtype), each group given its
backend, and the backend ops run over such a call.

A call is prepared in full before any op runs, so a bad tensor or a backend that refuses a group
raises before anything is written. :mod:`fastreg.functional`, :mod:`fastreg.distributed` (on the
local shards) and :class:`fastreg.Regularized` (which prepares every param group first) share it.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _dispatch
from .backends import Backend, Coefficients


class Call(NamedTuple):
    tensors: List[Tensor]
    grads: Optional[List[Tensor]]
    plan: List[Tuple[Backend, List[int]]]  # (backend, indices) per (device, dtype) group


def prepare(tensors: List[Tensor], backend: Optional[str], with_grads: bool = False, writes_params: bool = False) -> Call:
    """Check every tensor (``tensors`` come from :func:`_dispatch.tensor_list`) and choose
    every group's backend before any work runs, so a bad call (or a backend that refuses a
    group) changes nothing. ``with_grads`` keeps the tensors that have a ``.grad`` (whose
    grads are written: they must not overlap); ``writes_params``: the tensors themselves
    are written and must not overlap."""
    _dispatch.check_backend_name(backend)
    grads = None
    if with_grads:
        tensors, grads, indices = _dispatch.grads_of(tensors)
    groups = _dispatch.split(tensors)
    _dispatch.single_device([device for device, _, _ in groups])
    if with_grads:
        _dispatch.check_no_overlap(grads, "params", ".grad", indices)
    if writes_params:
        _dispatch.check_no_overlap(tensors, "params")
    plan = [(_dispatch.backend_for(backend, device, dtype), indices) for device, dtype, indices in groups]
    return Call(tensors, grads, plan)


def total(values: List[Tensor], tensors: List[Tensor]) -> Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    return _dispatch.total(values, _dispatch.result_dtype(tensors), device)


def select(tensors: Sequence[Tensor], indices: List[int]) -> List[Tensor]:
    return [tensors[i] for i in indices]


class PenaltyFunction(torch.autograd.Function):
    """``P`` of one (device, dtype) group; the backward is one backend call for all its tensors."""

    @staticmethod
    def forward(ctx, backend: Backend, coefs: Coefficients, *params: Tensor) -> Tensor:
        ctx.backend, ctx.coefs = backend, coefs
        ctx.save_for_backward(*params)
        return backend.value(list(params), coefs)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        params = ctx.saved_tensors
        grads = ctx.backend.penalty_backward(list(params), grad_output, ctx.coefs)
        grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[2:])]
        return (None, None, *grads)


def penalty(call: Call, coefs: Coefficients) -> Tensor:
    tensors, _, plan = call
    return total([PenaltyFunction.apply(be, coefs, *select(tensors, idx)) for be, idx in plan], tensors)


def norms_parts(call: Call) -> Tuple[Tensor, Tensor]:
    """Per-tensor ``sum|w|`` and ``sum w^2`` of a prepared call, in its tensors' order."""
    tensors, _, plan = call
    dtype = _dispatch.result_dtype(tensors)
    per_group = [be.norms(select(tensors, idx)) for be, idx in plan]
    if len(per_group) == 1:
        return tuple(x.to(dtype) for x in per_group[0])
    abs_parts, sq_parts = [None] * len(tensors), [None] * len(tensors)
    for (_, idx), (group_abs, group_sq) in zip(plan, per_group):
        for i, a, s in zip(idx, group_abs.to(dtype).unbind(), group_sq.to(dtype).unbind()):
            abs_parts[i], sq_parts[i] = a, s
    return torch.stack(abs_parts), torch.stack(sq_parts)


def add_grad(call: Call, coefs: Coefficients) -> Tensor:
    tensors, grads, plan = call
    with torch.no_grad():
        values = [be.add_grad_(select(tensors, idx), select(grads, idx), coefs) for be, idx in plan]
    return total(values, tensors)


def decay(call: Call, lr, coefs: Coefficients) -> None:
    if coefs.is_zero():
        return
    tensors, _, plan = call
    with torch.no_grad():
        for be, idx in plan:
            be.decay_(select(tensors, idx), lr, coefs)
