"""The ``torch`` backend: pure PyTorch, runs everywhere, the oracle for every other backend.

It is written to be obviously correct first: ``torch._foreach_*`` ops over the whole
tensor list, accumulation in fp32 (fp64 for fp64 parameters), values kept as tensors
(no ``.item()``, no host synchronization). fp16/bf16 parameters are computed through an
fp32 copy and rounded once, the way a fused kernel computes in registers.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .base import Backend, Coefficients, LearningRate, accumulate_dtype


def _in_accumulate_dtype(tensors: List[Tensor]) -> List[Tensor]:
    acc = accumulate_dtype(tensors[0].dtype)
    if tensors[0].dtype == acc:
        return tensors
    return [t.to(acc) for t in tensors]


def _group_norms(params: List[Tensor], group_dim: Optional[int]) -> List[Tensor]:
    """``||w_g||_2`` per group, each shaped to broadcast against its tensor."""
    acc = accumulate_dtype(params[0].dtype)
    if group_dim is None:
        return list(torch._foreach_norm(params, 2, dtype=acc))
    norms = []
    for w in params:
        if w.dim() < 2:
            norms.append(torch.linalg.vector_norm(w, 2, dtype=acc))
        else:
            rows = torch.linalg.vector_norm(w.flatten(1), 2, dim=1, dtype=acc)
            norms.append(rows.view((w.shape[0],) + (1,) * (w.dim() - 1)))
    return norms


def _value(params: List[Tensor], coefs: Coefficients, group_norms: Optional[List[Tensor]]) -> Tensor:
    acc = accumulate_dtype(params[0].dtype)
    value = torch.zeros((), dtype=acc, device=params[0].device)
    if coefs.l1:
        value = value + coefs.l1 * torch.stack(torch._foreach_norm(params, 1, dtype=acc)).sum()
    if coefs.l2:
        norms2 = torch.stack(torch._foreach_norm(params, 2, dtype=acc))
        value = value + (coefs.l2 / 2) * norms2.square().sum()
    if coefs.group_lasso:
        value = value + coefs.group_lasso * torch.stack([n.sum() for n in group_norms]).sum()
    return value


def _gradient(params_acc: List[Tensor], coefs: Coefficients, group_norms: Optional[List[Tensor]]) -> List[Tensor]:
    """``dP/dw`` per tensor, in the accumulate dtype (``params_acc`` is already in it)."""
    grads = [torch.zeros_like(w) for w in params_acc]
    if coefs.l1:
        torch._foreach_add_(grads, torch._foreach_sign(params_acc), alpha=coefs.l1)
    if coefs.group_lasso:
        # w * (l2 + gl / ||w_g||), with 1/||w_g|| taken as 0 for an all-zero group.
        scales = [coefs.l2 + coefs.group_lasso * torch.where(n > 0, n.reciprocal(), 0.0) for n in group_norms]
        torch._foreach_add_(grads, torch._foreach_mul(params_acc, scales))
    elif coefs.l2:
        torch._foreach_add_(grads, params_acc, alpha=coefs.l2)
    return grads


class TorchBackend(Backend):
    name = "torch"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None

    def norms(self, params: List[Tensor]) -> Tuple[Tensor, Tensor]:
        acc = accumulate_dtype(params[0].dtype)
        abs_sums = torch.stack(torch._foreach_norm(params, 1, dtype=acc))
        sq_sums = torch.stack(torch._foreach_norm(params, 2, dtype=acc)).square()
        return abs_sums, sq_sums

    def value(self, params: List[Tensor], coefs: Coefficients) -> Tensor:
        norms = _group_norms(params, coefs.group_dim) if coefs.group_lasso else None
        return _value(params, coefs, norms)

    def add_grad_(self, params: List[Tensor], grads: List[Tensor], coefs: Coefficients) -> Tensor:
        norms = _group_norms(params, coefs.group_dim) if coefs.group_lasso else None
        value = _value(params, coefs, norms)
        if not coefs.is_zero():
            torch._foreach_add_(grads, _gradient(_in_accumulate_dtype(params), coefs, norms))
        return value

    def decay_(self, params: List[Tensor], lr: LearningRate, coefs: Coefficients) -> None:
        if coefs.is_zero():
            return
        weights = _in_accumulate_dtype(params)
        if coefs.l2:
            torch._foreach_mul_(weights, 1 - lr * coefs.l2)
        if coefs.l1:
            shrunk = torch._foreach_abs(weights)
            torch._foreach_sub_(shrunk, lr * coefs.l1)
            torch._foreach_clamp_min_(shrunk, 0.0)
            torch._foreach_mul_(shrunk, torch._foreach_sign(weights))
            weights = shrunk
        if coefs.group_lasso:
            threshold = lr * coefs.group_lasso
            norms = _group_norms(weights, coefs.group_dim)
            torch._foreach_mul_(weights, [torch.where(n > threshold, 1 - threshold / n, 0.0) for n in norms])
        if weights is not params:
            torch._foreach_copy_(params, weights)

    def penalty_backward(self, params: List[Tensor], grad_output: Tensor, coefs: Coefficients) -> List[Tensor]:
        norms = _group_norms(params, coefs.group_dim) if coefs.group_lasso else None
        grads = _gradient(_in_accumulate_dtype(params), coefs, norms)
        torch._foreach_mul_(grads, grad_output.to(grads[0].dtype))
        return [g.to(w.dtype) for g, w in zip(grads, params)]
