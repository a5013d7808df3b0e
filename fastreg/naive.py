"""Slow, obvious fp64 references: per-tensor Python loops, differentiated by autograd.

The math every backend implements, for tensors ``w_t`` and non-negative coefficients::

    P(W)  = l1 * sum_t sum|w_t| + l2/2 * sum_t sum w_t^2 + group_lasso * sum_g ||w_g||_2
    dP/dw = l1 * sign(w) + l2 * w + group_lasso * w_g / ||w_g||      (0 for an all-zero group)

and the decoupled update with step size ``lr``: ``w *= 1 - lr*l2``, then the L1 soft threshold
``w = sign(w) * max(|w| - lr*l1, 0)``, then the group-lasso block shrink
``w_g *= max(0, 1 - lr*group_lasso / ||w_g||)``. A group is a whole tensor, or with
``group_dim=0`` each slice ``w[i]`` of a tensor with two or more dimensions.

Every backend is tested against these loops, directly or through the ``reference`` backend
(itself tested against them). They are slow on purpose: nothing here is fused or batched.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor


def _groups(w: Tensor, group_dim: Optional[int]) -> List[Tensor]:
    if group_dim is None or w.dim() < 2:
        return [w]
    return list(w.unbind(0))


def naive_penalty(params: Sequence[Tensor], l1=0.0, l2=0.0, group_lasso=0.0, group_dim=None) -> Tensor:
    """``P`` in fp64, differentiable with respect to ``params``; zero coefficients are left out."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        w = p.double()
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + l2 / 2 * (w * w).sum()
        if group_lasso:
            for g in _groups(w, group_dim):
                total = total + group_lasso * torch.linalg.vector_norm(g)
    return total


def naive_value_and_grads(params: Sequence[Tensor], l1=0.0, l2=0.0, group_lasso=0.0, group_dim=None):
    """``P`` and ``dP/dw`` per tensor, fp64, by autograd through :func:`naive_penalty`."""
    leaves = [p.detach().double().requires_grad_() for p in params]
    value = naive_penalty(leaves, l1, l2, group_lasso, group_dim)
    if value.requires_grad:
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for w, g in zip(leaves, grads)]
    else:
        grads = [torch.zeros_like(w) for w in leaves]
    return value.detach(), grads


def naive_decay(params: Sequence[Tensor], lr: float, l1=0.0, l2=0.0, group_lasso=0.0, group_dim=None) -> List[Tensor]:
    """The decoupled update (``l2`` scale, L1 soft threshold, group-lasso block shrink), written out per tensor in fp64."""
    out = []
    for p in params:
        w = p.detach().double().clone()
        w = w * (1 - lr * l2)
        w = torch.sign(w) * torch.clamp(w.abs() - lr * l1, min=0)
        if group_lasso:
            for g in _groups(w, group_dim):
                norm = torch.sqrt((g * g).sum())
                factor = torch.clamp(1 - lr * group_lasso / norm, min=0) if norm > 0 else torch.zeros((), dtype=torch.float64)
                g.mul_(factor)
        out.append(w)
    return out
