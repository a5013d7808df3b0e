"""Backends whose ops are the ``torch.ops.fastreg`` operators of fastreg's C++ extensions.

The schemas live in ``csrc/ops.cpp``; ``cpp`` and ``cuda`` register kernels for them on their
device, so both backends make the same calls and differ only in what must be built first.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .base import Backend, Coefficients, LearningRate


class ExtensionBackend(Backend):
    """One ``torch.ops.fastreg`` call per op; subclasses say whether their extension is loaded."""

    def extension_unavailable_reason(self) -> Optional[str]:
        """None when the extension is built and loaded (building it now if needed), else why not."""
        raise NotImplementedError

    def _ops(self):
        reason = self.extension_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"fastreg's {self.name} backend is unavailable: {reason}")
        return torch.ops.fastreg

    def norms(self, params: List[Tensor]) -> Tuple[Tensor, Tensor]:
        return self._ops().norms(params)

    def value(self, params: List[Tensor], coefs: Coefficients) -> Tensor:
        return self._ops().value(params, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)

    def add_grad_(self, params: List[Tensor], grads: List[Tensor], coefs: Coefficients) -> Tensor:
        return self._ops().add_grad_(params, grads, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)

    def decay_(self, params: List[Tensor], lr: LearningRate, coefs: Coefficients) -> None:
        # The schema takes the lr as a double or, to stay on the device (CUDA graphs), a tensor.
        if isinstance(lr, Tensor):
            self._ops().decay_(params, 0.0, lr, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)
        else:
            self._ops().decay_(params, float(lr), None, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)

    def penalty_backward(self, params: List[Tensor], grad_output: Tensor, coefs: Coefficients) -> List[Tensor]:
        return list(self._ops().penalty_backward(params, grad_output, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim))
