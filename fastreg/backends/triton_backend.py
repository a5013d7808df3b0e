"""The ``triton`` backend: multi-tensor Triton kernels, one launch for all tensors of a bucket.

The kernels (:mod:`fastreg.kernels`) read the work layout of ``csrc/plan.h``, the table the
C++ planner builds. A plan keeps its table on the device (:meth:`TritonBackend.table_to_device`)
and calls the ops of :meth:`TritonBackend.table_ops`, which launch the kernels with O(1) host
work. Launches per call, whatever the number of tensors: norms and value 2 (item pass +
finalize); coupled value + grad 2, or 3 with group lasso (group norms, finalize, update); decay
1, or 3 with group lasso; penalty backward 1, or 3 with group lasso.

The list ops (tensors a plan has no table for: non-contiguous ones, the penalty's backward,
anything ``torch.compile`` traces) build a table from the same planner, cached per list. In
compiled code each is one ``torch.ops.fastreg_triton`` custom op, an opaque node that declares
the tensors it writes; in eager code they run directly.

It runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter, for tests), which ``auto`` never picks. Triton is imported on first use.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _build, kernels
from .base import Backend, Coefficients, LearningRate, accumulate_dtype


class TableOps(NamedTuple):
    """The kernels over a layout table (see :meth:`Backend.table_ops`)."""

    norms: Callable
    value: Callable
    add_grad_: Callable
    decay_: Callable


_TABLE_OPS: List[TableOps] = []


def _table_ops() -> TableOps:
    if not _TABLE_OPS:
        from ..kernels import triton_decay, triton_grad, triton_norms

        _TABLE_OPS.append(TableOps(triton_norms.norms, triton_norms.value, triton_grad.add_grad, triton_decay.decay))
    return _TABLE_OPS[0]


class StepOps(NamedTuple):
    """The fused optimizer steps over a layout table (see :meth:`Backend.step_ops`)."""

    adam_step_: Callable
    sgd_step_: Callable


_STEP_OPS: List[StepOps] = []


def _step_ops() -> StepOps:
    if not _STEP_OPS:
        from ..kernels import triton_optim

        _STEP_OPS.append(StepOps(triton_optim.adam_step, triton_optim.sgd_step))
    return _STEP_OPS[0]


def _kernels():
    """The kernel modules, their ``fastreg_triton`` custom ops registered on first import."""
    from ..kernels import triton_decay, triton_grad, triton_norms, triton_table

    return triton_norms, triton_grad, triton_decay, triton_table


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        reason = kernels.triton_import_error()
        if reason is not None:
            return reason
        device_type = torch.device(device).type
        if device_type == "cpu":
            if not kernels.interpreted():
                return "triton runs on CUDA tensors; CPU only under TRITON_INTERPRET=1 (set before the kernels are imported)"
        elif device_type != "cuda":
            return f"triton runs on CUDA tensors, not {device_type}"
        planner = _build.cpu_unavailable_reason()
        if planner is not None:
            return f"triton's work layout comes from fastreg's C++ planner, which is unavailable: {planner}"
        return None

    def auto_eligible(self, device: torch.device) -> bool:
        return torch.device(device).type != "cpu"

    def table_ops(self, device: torch.device):
        return _table_ops()

    def step_ops(self, device: torch.device):
        return _step_ops()

    def layout_limits(self, device: torch.device) -> Tuple[int, int]:
        table = _kernels()[3]
        return table.CHUNK, table.MAX_GROUPS

    def table_to_device(self, host: Tensor, device: torch.device):
        return _kernels()[3].to_device(host, device)

    def norms(self, params: List[Tensor]) -> Tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            return torch.ops.fastreg_triton.norms(params)
        return _kernels()[0].norms_of(params)

    def value(self, params: List[Tensor], coefs: Coefficients) -> Tensor:
        if coefs.is_zero():
            return torch.zeros((), dtype=accumulate_dtype(params[0].dtype), device=params[0].device)
        args = (params, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)
        if torch.compiler.is_compiling():
            return torch.ops.fastreg_triton.value(*args)
        return _kernels()[0].value_of(*args)

    def add_grad_(self, params: List[Tensor], grads: List[Tensor], coefs: Coefficients) -> Tensor:
        args = (params, grads, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)
        if torch.compiler.is_compiling():
            return torch.ops.fastreg_triton.add_grad_(*args)
        return _kernels()[1].add_grad_of(*args)

    def decay_(self, params: List[Tensor], lr: LearningRate, coefs: Coefficients) -> None:
        if isinstance(lr, Tensor):
            args = (params, 0.0, lr, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)
        else:
            args = (params, float(lr), None, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)
        if torch.compiler.is_compiling():
            torch.ops.fastreg_triton.decay_(*args)
        else:
            _kernels()[2].decay_of(*args)

    def penalty_backward(self, params: List[Tensor], grad_output: Tensor, coefs: Coefficients) -> List[Tensor]:
        args = (params, grad_output, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)
        if torch.compiler.is_compiling():
            return torch.ops.fastreg_triton.penalty_backward(*args)
        return _kernels()[1].penalty_backward_of(*args)
