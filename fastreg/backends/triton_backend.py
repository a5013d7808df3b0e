"""The ``triton`` backend: multi-tensor Triton kernels, one launch for all tensors of a group.

Each op is one ``torch.ops.fastreg_triton`` custom op (see :mod:`fastreg.kernels`), an
opaque node to ``torch.compile`` that declares the tensors it writes. Launches per call,
whatever the number of tensors: norms and value 2 (kernel + one-program finalize); coupled
value + grad 2, or 3 with group lasso (group norms + finalize + update); penalty backward
and decay 1, or 3 with group lasso.

It runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter, for tests), which ``auto`` never picks. Triton is imported on first use.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import kernels
from .base import Backend, Coefficients, LearningRate, accumulate_dtype


def _ops():
    """The ``fastreg_triton`` custom ops, registered when their modules (and Triton) are
    first imported."""
    from ..kernels import triton_decay, triton_grad, triton_norms  # noqa: F401

    return torch.ops.fastreg_triton


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        reason = kernels.triton_import_error()
        if reason is not None:
            return reason
        device_type = torch.device(device).type
        if device_type == "cuda":
            return None
        if device_type == "cpu":
            if kernels.interpreted():
                return None
            return "triton runs on CUDA tensors; CPU only under TRITON_INTERPRET=1 (set before the kernels are imported)"
        return f"triton runs on CUDA tensors, not {device_type}"

    def auto_eligible(self, device: torch.device) -> bool:
        return torch.device(device).type != "cpu"

    def norms(self, params: List[Tensor]) -> Tuple[Tensor, Tensor]:
        return _ops().norms(params)

    def value(self, params: List[Tensor], coefs: Coefficients) -> Tensor:
        if coefs.is_zero():
            return torch.zeros((), dtype=accumulate_dtype(params[0].dtype), device=params[0].device)
        return _ops().value(params, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)

    def add_grad_(self, params: List[Tensor], grads: List[Tensor], coefs: Coefficients) -> Tensor:
        return _ops().add_grad(params, grads, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)

    def decay_(self, params: List[Tensor], lr: LearningRate, coefs: Coefficients) -> None:
        if isinstance(lr, Tensor):
            _ops().decay(params, 0.0, lr, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)
        else:
            _ops().decay(params, float(lr), None, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)

    def penalty_backward(self, params: List[Tensor], grad_output: Tensor, coefs: Coefficients) -> List[Tensor]:
        flat = _ops().penalty_backward(
            params, grad_output, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim
        )
        return [part.view(p.shape) for part, p in zip(flat.split([p.numel() for p in params]), params)]
