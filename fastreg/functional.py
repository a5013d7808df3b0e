"""fastreg's functional API: the penalty, its norms, and its coupled and decoupled updates.

All functions take ``params`` as one tensor or any iterable of tensors
(``model.parameters()`` included), group them by dtype, and make one backend call per
group. The math is in :mod:`fastreg.backends.base`; in short::

    P = l1 * sum|w| + l2/2 * sum w^2 + group_lasso * sum_g ||w_g||_2

``l2`` carries the 1/2 so its gradient is ``l2 * w``, exactly what
``torch.optim.SGD(weight_decay=l2)`` adds (Keras's ``l2`` has no 1/2: its gradient is ``2*l2*w``).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _dispatch, distributed
from ._dispatch import TensorOrTensors
from .backends import Backend, Coefficients


class Norms(NamedTuple):
    """Norms of a list of tensors, all read in one pass per (device, dtype) group."""

    l1: Tensor
    """``sum_t sum |w_t|`` (0-d)."""
    l2_squared: Tensor
    """``sum_t sum w_t^2`` (0-d)."""
    tensor_l1: Tensor
    """Per-tensor ``sum |w_t|``, in the order given (1-D, length T)."""
    tensor_l2: Tensor
    """Per-tensor ``||w_t||_2`` (1-D, length T): the ``torch.norm(p, 2)`` of tutorials."""

    @property
    def l2(self) -> Tensor:
        """``sqrt(sum_t sum w_t^2)``: the global norm gradient clipping uses."""
        return self.l2_squared.sqrt()


class _Call(NamedTuple):
    tensors: List[Tensor]
    grads: Optional[List[Tensor]]
    plan: List[Tuple[Backend, List[int]]]  # (backend, indices) per (device, dtype) group


def _prepare(tensors: List[Tensor], backend: Optional[str], with_grads: bool = False, writes_params: bool = False) -> _Call:
    """Check every tensor (``tensors`` come from :func:`_dispatch.tensor_list`) and choose
    every group's backend before any work runs, so a bad call (or a backend that refuses a
    group) changes nothing. ``with_grads`` keeps the tensors that have a ``.grad`` (whose
    grads are written: they must not overlap); ``writes_params``: the tensors themselves
    are written and must not overlap."""
    _dispatch.check_backend_name(backend)
    grads = None
    if with_grads:
        tensors, grads, indices = _dispatch.grads_of(tensors)
    _dispatch.single_device(tensors)
    if with_grads:
        _dispatch.check_no_overlap(grads, "params", ".grad", indices)
    if writes_params:
        _dispatch.check_no_overlap(tensors, "params")
    plan = [(_dispatch.backend_for(backend, device, dtype), indices) for device, dtype, indices in _dispatch.split(tensors)]
    return _Call(tensors, grads, plan)


def _total(values: List[Tensor], tensors: List[Tensor]) -> Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    return _dispatch.total(values, _dispatch.result_dtype(tensors), device)


def _select(tensors: Sequence[Tensor], indices: List[int]) -> List[Tensor]:
    return [tensors[i] for i in indices]


class _PenaltyFunction(torch.autograd.Function):
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


def penalty(
    params: TensorOrTensors,
    l1: float = 0.0,
    l2: float = 0.0,
    group_lasso: float = 0.0,
    *,
    group_dim: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``P(params)`` as a differentiable 0-d tensor (fp32, or fp64 when any tensor is fp64).

    Add it to the loss; its backward computes every tensor's gradient in one backend call
    per (device, dtype) group rather than one autograd node per tensor::

        loss = criterion(model(x), y) + fastreg.penalty(model.parameters(), l1=1e-5, l2=1e-4)

    ``P`` is a function of the list as given: views of one tensor listed side by side each
    count, while the same tensor object twice is refused (``ValueError``), as it is almost
    always a list built by hand that repeats a tied weight. Sharded parameters (DTensors,
    as from FSDP2's ``fully_shard``) give the whole model's ``P`` on every rank and
    gradients sharded like the parameters (:mod:`fastreg.distributed`).
    """
    coefs = _dispatch.make_coefficients(l1, l2, group_lasso, group_dim)
    tensors = _dispatch.tensor_list(params)
    if distributed.any_dtensor(tensors):
        return distributed.penalty(tensors, coefs, backend)
    call = _prepare(tensors, backend)
    return _penalty(call, coefs)


def _penalty(call: _Call, coefs: Coefficients) -> Tensor:
    tensors, _, plan = call
    return _total([_PenaltyFunction.apply(be, coefs, *_select(tensors, idx)) for be, idx in plan], tensors)


def _norms_parts(call: _Call) -> Tuple[Tensor, Tensor]:
    """Per-tensor ``sum|w|`` and ``sum w^2`` of a prepared call, in its tensors' order."""
    tensors, _, plan = call
    dtype = _dispatch.result_dtype(tensors)
    per_group = [be.norms(_select(tensors, idx)) for be, idx in plan]
    if len(per_group) == 1:
        return tuple(x.to(dtype) for x in per_group[0])
    abs_parts, sq_parts = [None] * len(tensors), [None] * len(tensors)
    for (_, idx), (group_abs, group_sq) in zip(plan, per_group):
        for i, a, s in zip(idx, group_abs.to(dtype).unbind(), group_sq.to(dtype).unbind()):
            abs_parts[i], sq_parts[i] = a, s
    return torch.stack(abs_parts), torch.stack(sq_parts)


def norms(params: TensorOrTensors, *, backend: Optional[str] = None) -> Norms:
    """Total and per-tensor L1 and L2 norms of ``params``, without gradient tracking.

    For sharded parameters (DTensors) these are the norms of the whole tensors, on every rank.
    """
    tensors = _dispatch.tensor_list(params)
    if distributed.any_dtensor(tensors):
        return Norms(*distributed.norms(tensors, backend))
    call = _prepare(tensors, backend)
    dtype = _dispatch.result_dtype(tensors)
    if not tensors:
        zero, empty = torch.zeros((), dtype=dtype), torch.zeros(0, dtype=dtype)
        return Norms(zero, zero, empty, empty)
    with torch.no_grad():
        abs_sums, sq_sums = _norms_parts(call)
        return Norms(abs_sums.sum(), sq_sums.sum(), abs_sums, sq_sums.sqrt())


def add_penalty_grad_(
    params: TensorOrTensors,
    l1: float = 0.0,
    l2: float = 0.0,
    group_lasso: float = 0.0,
    *,
    group_dim: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Coupled regularization: ``p.grad += dP/dp`` in place; returns ``P`` of those tensors.

    Tensors without a ``.grad`` are skipped. Call it between ``backward()`` and
    ``optimizer.step()``; with ``l2`` alone and SGD this is ``SGD(weight_decay=l2)``.
    Gradients that share memory (two tensors with one ``.grad``, or views of one buffer)
    are refused with a ``ValueError`` before anything is written: the sum would depend
    on the order of the writes.
    """
    coefs = _dispatch.make_coefficients(l1, l2, group_lasso, group_dim)
    tensors = _dispatch.tensor_list(params)
    if distributed.any_dtensor(tensors):
        return distributed.add_penalty_grad_(tensors, coefs, backend)
    return _add_grad(_prepare(tensors, backend, with_grads=True), coefs)


def _add_grad(call: _Call, coefs: Coefficients) -> Tensor:
    tensors, grads, plan = call
    with torch.no_grad():
        values = [be.add_grad_(_select(tensors, idx), _select(grads, idx), coefs) for be, idx in plan]
    return _total(values, tensors)


def decay_(
    params: TensorOrTensors,
    lr,
    l1: float = 0.0,
    l2: float = 0.0,
    group_lasso: float = 0.0,
    *,
    group_dim: Optional[int] = None,
    backend: Optional[str] = None,
) -> None:
    """Decoupled regularization, in place on the weights, as a step of size ``lr``:

    ``p *= 1 - lr*l2`` (AdamW's decay), then the proximal maps of the L1 term
    (``p = sign(p) * max(|p| - lr*l1, 0)``, exact zeros) and of the group-lasso term
    (``p_g *= max(0, 1 - lr*group_lasso / ||p_g||)``, whole groups to zero).

    Tensors that share memory (views of one buffer) are refused with a ``ValueError``
    before anything is written, as the result would depend on the order of the writes.
    """
    coefs = _dispatch.make_coefficients(l1, l2, group_lasso, group_dim)
    lr = _dispatch.check_lr(lr)
    tensors = _dispatch.tensor_list(params)
    if distributed.any_dtensor(tensors):
        return distributed.decay_(tensors, lr, coefs, backend)
    _decay(_prepare(tensors, backend, writes_params=True), lr, coefs)


def _decay(call: _Call, lr, coefs: Coefficients) -> None:
    if coefs.is_zero():
        return
    tensors, _, plan = call
    with torch.no_grad():
        for be, idx in plan:
            be.decay_(_select(tensors, idx), lr, coefs)
