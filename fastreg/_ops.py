"""Fake (meta) kernels for the ``torch.ops.fastreg`` operators defined in ``csrc/ops.cpp``.

They give ``torch.compile`` and ``FakeTensorMode`` each op's output shapes and dtypes without
running it, and check inputs the way the C++ launchers do. They are registered right after the
library loads (:func:`register_fakes`), since ``register_fake`` needs the op to exist.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Sequence

import torch
from torch import Tensor

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_lock = threading.Lock()
_registered = False


def _accumulate(params: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if params and params[0].dtype == torch.float64 else torch.float32


def _check_params(params: Sequence[Tensor], op: str) -> None:
    if not params:
        return
    first = params[0]
    torch._check(first.dtype in _SUPPORTED, lambda: f"fastreg::{op}: params must be float16, bfloat16, float32 or float64, got {first.dtype}")
    for i, p in enumerate(params):
        torch._check(p.device == first.device, lambda: f"fastreg::{op}: params[{i}] is on {p.device} but params[0] is on {first.device}")
        torch._check(p.dtype == first.dtype, lambda: f"fastreg::{op}: params[{i}] is {p.dtype} but params[0] is {first.dtype}")


def _check_coefs(op: str, l1: float, l2: float, group_lasso: float, group_dim: Optional[int]) -> None:
    torch._check(l1 >= 0 and l2 >= 0 and group_lasso >= 0, lambda: f"fastreg::{op}: coefficients must be non-negative, got l1={l1} l2={l2} group_lasso={group_lasso}")
    torch._check(group_dim is None or group_dim == 0, lambda: f"fastreg::{op}: group_dim must be None or 0, got {group_dim}")


def _scalar(params: Sequence[Tensor]) -> Tensor:
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((), dtype=_accumulate(params), device=device)


def _norms(params: List[Tensor]):
    _check_params(params, "norms")
    device = params[0].device if params else torch.device("cpu")
    count = len(params)
    dtype = _accumulate(params)
    return torch.empty(count, dtype=dtype, device=device), torch.empty(count, dtype=dtype, device=device)


def _value(params: List[Tensor], l1: float, l2: float, group_lasso: float, group_dim: Optional[int]) -> Tensor:
    _check_params(params, "value")
    _check_coefs("value", l1, l2, group_lasso, group_dim)
    return _scalar(params)


def _add_grad_(params: List[Tensor], grads: List[Tensor], l1: float, l2: float, group_lasso: float, group_dim: Optional[int]) -> Tensor:
    _check_params(params, "add_grad_")
    _check_coefs("add_grad_", l1, l2, group_lasso, group_dim)
    torch._check(len(grads) == len(params), lambda: f"fastreg::add_grad_: got {len(grads)} grads for {len(params)} params")
    for i, (p, g) in enumerate(zip(params, grads)):
        torch._check(
            g.shape == p.shape and g.dtype == p.dtype and g.device == p.device,
            lambda: f"fastreg::add_grad_: grads[{i}] is {g.dtype} {tuple(g.shape)} on {g.device} "
            f"but params[{i}] is {p.dtype} {tuple(p.shape)} on {p.device}",
        )
    return _scalar(params)


def _decay_(params: List[Tensor], lr: float, lr_tensor: Optional[Tensor], l1: float, l2: float, group_lasso: float, group_dim: Optional[int]) -> None:
    _check_params(params, "decay_")
    _check_coefs("decay_", l1, l2, group_lasso, group_dim)
    if lr_tensor is not None:
        torch._check(
            lr_tensor.numel() == 1 and lr_tensor.is_floating_point(),
            lambda: f"fastreg::decay_: lr_tensor must be one floating-point element, got {lr_tensor.dtype} of shape {tuple(lr_tensor.shape)}",
        )


def _penalty_backward(params: List[Tensor], grad_output: Tensor, l1: float, l2: float, group_lasso: float, group_dim: Optional[int]) -> List[Tensor]:
    _check_params(params, "penalty_backward")
    _check_coefs("penalty_backward", l1, l2, group_lasso, group_dim)
    torch._check(grad_output.numel() == 1, lambda: f"fastreg::penalty_backward: grad_output must have one element, got shape {tuple(grad_output.shape)}")
    return [p.new_empty(p.shape) for p in params]


_FAKES = {
    "fastreg::norms": _norms,
    "fastreg::value": _value,
    "fastreg::add_grad_": _add_grad_,
    "fastreg::decay_": _decay_,
    "fastreg::penalty_backward": _penalty_backward,
}


def register_fakes() -> None:
    """Registers every fake kernel once; call after the library defining the ops is loaded."""
    global _registered
    with _lock:
        if _registered:
            return
        for name, fake in _FAKES.items():
            torch.library.register_fake(name, fake)
        _registered = True
