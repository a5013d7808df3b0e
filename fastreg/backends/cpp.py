"""The ``cpp`` backend: fused multi-tensor CPU kernels from ``csrc/`` (see csrc/fastreg_cpu.cpp).

Each op is one call into ``torch.ops.fastreg``, which walks a single work list of 64K-element
chunks of all tensors on all intra-op threads: coupled value + gradient reads ``w`` and ``g``
once and writes ``g`` once; decay reads and writes ``w`` once. Group lasso needs each group's
norm before its update, so those calls make a norms pass and an update pass inside the same op.
Partial sums are per chunk and combined in chunk order, so results are bit-identical for any
thread count. Non-contiguous tensors are processed through contiguous copies (written back
for the in-place ops).

The extension builds on first use (:mod:`fastreg._build`); until it has built, or if it
cannot, :meth:`CppBackend.unavailable_reason` says why and ``auto`` uses ``torch``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _build
from .base import Backend, Coefficients, LearningRate


def _ops():
    reason = _build.cpu_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastreg's cpp backend is unavailable: {reason}")
    return torch.ops.fastreg


class CppBackend(Backend):
    name = "cpp"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if torch.device(device).type != "cpu":
            return "cpp runs on CPU tensors only"
        return _build.cpu_unavailable_reason()

    def norms(self, params: List[Tensor]) -> Tuple[Tensor, Tensor]:
        return _ops().norms(params)

    def value(self, params: List[Tensor], coefs: Coefficients) -> Tensor:
        return _ops().value(params, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)

    def add_grad_(self, params: List[Tensor], grads: List[Tensor], coefs: Coefficients) -> Tensor:
        return _ops().add_grad_(params, grads, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)

    def decay_(self, params: List[Tensor], lr: LearningRate, coefs: Coefficients) -> None:
        if isinstance(lr, Tensor):
            _ops().decay_(params, 0.0, lr, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)
        else:
            _ops().decay_(params, float(lr), None, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)

    def penalty_backward(self, params: List[Tensor], grad_output: Tensor, coefs: Coefficients) -> List[Tensor]:
        return list(_ops().penalty_backward(params, grad_output, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim))
