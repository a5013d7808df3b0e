"""The op set every fastreg backend implements.

Math, for tensors ``w_t`` and non-negative coefficients::

    P(W) = l1 * sum_t sum|w_t| + l2/2 * sum_t sum w_t^2 + group_lasso * sum_g ||w_g||_2

    dP/dw = l1 * sign(w) + l2 * w + group_lasso * w_g / ||w_g||     (sign(0) = 0, 0 where ||w_g|| = 0)

A group ``g`` is a whole tensor (``group_dim=None``) or, with ``group_dim=0``, one slice
``w[i]`` of a tensor with two or more dimensions (rows of a Linear weight, output
channels of a conv weight); tensors with fewer than two dimensions stay one group.

Conventions shared by all backends, so their results agree:

- A term whose coefficient is exactly zero is left out: it contributes 0, not ``0 * inf``.
- Reductions accumulate in :func:`accumulate_dtype` of the parameter dtype and are
  deterministic (same input, bit-identical output on every run).
- A group norm is ``sqrt(sum w^2)`` of the group.
- A tensor ``lr`` takes part in the arithmetic in the accumulate dtype.

The dispatch (``fastreg._dispatch``) has already validated every argument before a
backend sees it: ``params`` is a non-empty list of dense tensors of one device and one
dtype (fp16, bf16, fp32 or fp64); ``grads`` match ``params`` in shape, dtype and device;
coefficients are finite, non-negative Python floats; ``lr`` is a non-negative float or a
one-element floating tensor on the parameters' device. Backends only compute.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

LearningRate = Union[float, Tensor]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 parameters accumulate in fp64; fp16, bf16 and fp32 accumulate in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """Validated penalty strengths; see the module docstring for their meaning."""

    l1: float = 0.0
    l2: float = 0.0
    group_lasso: float = 0.0
    group_dim: Optional[int] = None

    def is_zero(self) -> bool:
        return self.l1 == 0.0 and self.l2 == 0.0 and self.group_lasso == 0.0

    @property
    def row_groups(self) -> bool:
        """Whether the work layout cuts tensors into rows: group lasso over ``group_dim=0``
        (without a group-lasso term, every tensor is one group whatever ``group_dim`` says)."""
        return self.group_dim == 0 and self.group_lasso != 0.0

    def replace(self, **changes) -> "Coefficients":
        return dataclasses.replace(self, **changes)


class Backend(abc.ABC):
    """One implementation of the op set, for a list of tensors of one device and dtype."""

    name: str

    @abc.abstractmethod
    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when this backend can run on ``device`` with ``dtype``, else why not."""

    def auto_eligible(self, device: torch.device) -> bool:
        """Whether ``auto`` may pick this backend on ``device`` when it is usable there (a
        backend that only emulates a device, like Triton's CPU interpreter, says no)."""
        return True

    def table_ops(self, device: torch.device):
        """The kernels that run from a plan's work-layout table (``csrc/plan.h``, with the
        tensors' addresses) on ``device``, with no Python work per tensor: an object with
        ``norms(table, dtype)``, ``value(table, dtype, l1, l2, group_lasso)``,
        ``add_grad_(table, dtype, l1, l2, group_lasso)`` and
        ``decay_(table, dtype, lr, lr_tensor, l1, l2, group_lasso)``, the same ops as below.
        None for a backend that takes tensor lists only."""
        return None

    def step_ops(self, device: torch.device):
        """The fused optimizer steps over a work-layout table on ``device`` (address rows:
        params, grads, then the optimizer's state), for :mod:`fastreg.fused_optim`: an object
        with ``adam_step_(table, dtype, ...)`` and ``sgd_step_(table, dtype, ...)``, the
        arguments of ``csrc/fastreg_optim.cpp``'s. None where this backend has none."""
        return None

    def runs_tables(self, device: torch.device) -> bool:
        return self.table_ops(device) is not None

    def layout_limits(self, device: torch.device) -> Tuple[int, int]:
        """Elements per work item and most groups packed into one item (0: no limit) of this
        backend's work layout on ``device``."""
        return 1 << 16, 0

    def table_to_device(self, host: Tensor, device: torch.device) -> Tensor:
        """A plan's table (built on the host) where this backend's kernels read it."""
        return host

    @abc.abstractmethod
    def norms(self, params: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """Per-tensor ``sum|w_t|`` and ``sum w_t^2``: two 1-D tensors of length T, accumulate dtype."""

    @abc.abstractmethod
    def value(self, params: List[Tensor], coefs: Coefficients) -> Tensor:
        """``P(params)`` as a 0-d tensor of the accumulate dtype."""

    @abc.abstractmethod
    def add_grad_(self, params: List[Tensor], grads: List[Tensor], coefs: Coefficients) -> Tensor:
        """Coupled mode: ``grads[t] += dP/dw_t`` in place; returns ``P(params)`` like :meth:`value`."""

    @abc.abstractmethod
    def decay_(self, params: List[Tensor], lr: LearningRate, coefs: Coefficients) -> None:
        """Decoupled mode, in place on ``params``, in this order:

        1. ``w *= 1 - lr*l2`` (AdamW's decay),
        2. ``w = sign(w) * max(|w| - lr*l1, 0)`` (soft threshold, the prox of the L1 term),
        3. ``w_g *= max(0, 1 - lr*group_lasso / ||w_g||)`` with the norm of the thresholded
           ``w_g`` (block shrink, the prox of the group-lasso term; 0 where ``||w_g|| = 0``).

        Steps 2 and 3 together are the exact prox of the sparse-group-lasso term.
        """

    @abc.abstractmethod
    def penalty_backward(self, params: List[Tensor], grad_output: Tensor, coefs: Coefficients) -> List[Tensor]:
        """``grad_output * dP/dw_t`` for every tensor, as new tensors of the parameters' dtype."""
