"""fastreg's functional API: the penalty, its norms, and its coupled and decoupled updates.

All functions take ``params`` as one tensor or any iterable of tensors
(``model.parameters()`` included), split them into (device, dtype) buckets, and make one
backend call per bucket. The math is in :mod:`fastreg.backends.base`; in short::

    P = l1 * sum|w| + l2/2 * sum w^2 + group_lasso * sum_g ||w_g||_2

``l2`` carries the 1/2 so its gradient is ``l2 * w``, exactly what
``torch.optim.SGD(weight_decay=l2)`` adds (Keras's ``l2`` has no 1/2: its gradient is ``2*l2*w``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _calls, _dispatch
from ._dispatch import TensorOrTensors


class Norms(NamedTuple):
    """Norms of a list of tensors, all read in one pass per (device, dtype) bucket."""

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
    per (device, dtype) bucket rather than one autograd node per tensor::

        loss = criterion(model(x), y) + fastreg.penalty(model.parameters(), l1=1e-5, l2=1e-4)

    ``P`` is a function of the list as given: views of one tensor listed side by side each
    count, while the same tensor object twice is refused (``ValueError``), as it is almost
    always a list built by hand that repeats a tied weight. Sharded parameters (DTensors,
    as from FSDP2's ``fully_shard``) give the whole model's ``P`` on every rank and
    gradients sharded like the parameters (:mod:`fastreg.distributed`).
    """
    coefs = _dispatch.make_coefficients(l1, l2, group_lasso, group_dim)
    return _calls.penalty(_calls.prepare(_dispatch.as_list(params), backend), coefs)


def norms(params: TensorOrTensors, *, backend: Optional[str] = None) -> Norms:
    """Total and per-tensor L1 and L2 norms of ``params``, without gradient tracking.

    For sharded parameters (DTensors) these are the norms of the whole tensors, on every rank.
    """
    call = _calls.prepare(_dispatch.as_list(params), backend)
    if not call.tensors:
        dtype = call.plan.result_dtype
        zero, empty = torch.zeros((), dtype=dtype), torch.zeros(0, dtype=dtype)
        return Norms(zero, zero, empty, empty)
    with torch.no_grad():
        abs_sums, sq_sums = _calls.norms_parts(call)
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
    return _calls.add_grad(_calls.prepare(_dispatch.as_list(params), backend, with_grads=True), coefs)


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
    _calls.decay(_calls.prepare(_dispatch.as_list(params), backend, writes_params=True), lr, coefs)
