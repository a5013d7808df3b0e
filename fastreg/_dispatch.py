"""Validation, grouping and backend choice: the one layer between the public API and the backends.

Every argument is checked here, once, before any tensor is touched, so a bad call raises
without changing a weight or a gradient. Tensors are then split into (device, dtype)
groups, each handed to one backend op.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import Backend, Coefficients, auto_backend, get_backend

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKEND_ENV = "FASTREG_BACKEND"

TensorOrTensors = Union[Tensor, Iterable[Tensor]]
Group = Tuple[torch.device, torch.dtype, List[int]]


def check_coefficient(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def make_coefficients(l1=0.0, l2=0.0, group_lasso=0.0, group_dim: Optional[int] = None) -> Coefficients:
    if group_dim is not None and (isinstance(group_dim, bool) or group_dim != 0):
        raise ValueError(f"group_dim must be None (one group per tensor) or 0 (slices along dim 0), got {group_dim!r}")
    return Coefficients(
        l1=check_coefficient("l1", l1),
        l2=check_coefficient("l2", l2),
        group_lasso=check_coefficient("group_lasso", group_lasso),
        group_dim=group_dim,
    )


def check_lr(lr) -> Union[float, Tensor]:
    """A learning rate: a non-negative finite number, or a one-element floating tensor.

    A tensor's value is not inspected: reading it would synchronize with the device.
    """
    if isinstance(lr, Tensor):
        if not lr.is_floating_point() or lr.numel() != 1:
            raise TypeError(f"lr given as a tensor must be one floating-point element, got {lr.dtype} of shape {tuple(lr.shape)}")
        return lr.reshape(())
    return check_coefficient("lr", lr)


def tensor_list(params: TensorOrTensors, name: str = "params") -> List[Tensor]:
    """``params`` as a list of checked tensors (a single tensor, a list or a generator)."""
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, dict):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got a dict; pass group['params']")
    try:
        tensors = list(params)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(params).__name__}") from None
    seen = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise TypeError(f"{name}[{i}] has layout {t.layout}; fastreg works on dense (strided) tensors")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; fastreg supports float16, bfloat16, float32 and float64")
        if t.device.type == "meta":
            raise ValueError(f"{name}[{i}] is on the meta device and holds no values")
        if id(t) in seen:
            raise ValueError(f"{name}[{i}] is the same tensor as {name}[{seen[id(t)]}]; pass each tensor once")
        seen[id(t)] = i
    return tensors


def single_device(tensors: Sequence[Tensor], name: str = "params") -> None:
    devices = list(dict.fromkeys(t.device for t in tensors))
    if len(devices) > 1:
        raise ValueError(
            f"{name} holds tensors on several devices ({', '.join(map(str, devices))}); call once per device, "
            "or use fastreg.Regularized, which groups parameters by device"
        )


def grads_of(tensors: Sequence[Tensor], name: str = "params") -> Tuple[List[Tensor], List[Tensor]]:
    """The tensors that have a ``.grad`` and those grads, checked; tensors without one are skipped."""
    with_grad, grads = [], []
    for i, t in enumerate(tensors):
        g = t.grad
        if g is None:
            continue
        if g.layout != torch.strided:
            raise TypeError(f"{name}[{i}].grad has layout {g.layout}; fastreg needs dense gradients")
        if g.dtype != t.dtype or g.shape != t.shape or g.device != t.device:
            raise TypeError(
                f"{name}[{i}].grad is {g.dtype} {tuple(g.shape)} on {g.device}, but the tensor is "
                f"{t.dtype} {tuple(t.shape)} on {t.device}"
            )
        with_grad.append(t)
        grads.append(g)
    return with_grad, grads


def split(tensors: Sequence[Tensor]) -> List[Group]:
    """(device, dtype, indices) groups in order of first appearance."""
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return [(device, dtype, indices) for (device, dtype), indices in groups.items()]


def backend_for(name: Optional[str], device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend named by the call, else by ``FASTREG_BACKEND``, else ``auto``'s choice."""
    origin = "backend"
    if name is None:
        name, origin = os.environ.get(BACKEND_ENV, "auto"), BACKEND_ENV
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        return auto_backend(device, dtype)
    try:
        backend = get_backend(name)
    except ValueError as error:
        raise ValueError(f"{origin}: {error}") from None
    reason = backend.unavailable_reason(device, dtype)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device} with {dtype}: {reason}")
    return backend


def check_backend_name(name: Optional[str]) -> None:
    """Fail early on an unknown backend name (whether it can run is decided per group)."""
    if name is not None and name != "auto":
        if not isinstance(name, str):
            raise TypeError(f"backend must be a string, got {type(name).__name__}")
        get_backend(name)


def result_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def total(values: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Sum per-group values in group order (deterministic), on ``device``."""
    if not values:
        return torch.zeros((), dtype=dtype, device=device)
    result = values[0].to(device=device, dtype=dtype)
    for v in values[1:]:
        result = result + v.to(device=device, dtype=dtype)
    return result
