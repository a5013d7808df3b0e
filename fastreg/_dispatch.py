"""Validation, bucketing and backend choice: the one layer between the public API and the backends.

Every argument is checked here, once, before any tensor is touched, so a bad call raises
without changing a weight or a gradient. Tensors are then split into (device, dtype)
buckets, each handed to one backend op.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch._dynamo
from torch import Tensor

from .backends import Backend, Coefficients, accumulate_dtype, auto_backend, get_backend  # noqa: F401 (re-exported: optim and distributed take them from here)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKEND_ENV = "FASTREG_BACKEND"

TensorOrTensors = Union[Tensor, Iterable[Tensor]]
BucketIndices = Tuple[torch.device, torch.dtype, List[int]]


def check_coefficient(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Not math.isfinite: torch.compile traces a step's settings as symbolic floats, which take
    # arithmetic and comparisons (inf - inf and nan - nan are nan, unequal to 0).
    if not value - value == 0.0:
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


def as_list(params: TensorOrTensors, name: str = "params") -> List[Tensor]:
    """``params`` (a single tensor, a list or any iterable) as a list; a list is taken as it is."""
    if type(params) is list:
        return params
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, dict):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got a dict; pass group['params']")
    try:
        return list(params)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(params).__name__}") from None


def tensor_list(params: TensorOrTensors, name: str = "params") -> List[Tensor]:
    """``params`` as a list of checked tensors (a single tensor, a list or a generator)."""
    tensors = as_list(params, name)
    check_tensors(tensors, name)
    return tensors


def check_tensors(tensors: Sequence[Tensor], name: str = "params") -> None:
    """Refuse anything but distinct dense floating tensors with values, naming the first culprit."""
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise TypeError(f"{name}[{i}] has layout {t.layout}; fastreg works on dense (strided) tensors")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; fastreg supports float16, bfloat16, float32 and float64")
        if t.is_meta:
            raise ValueError(f"{name}[{i}] is on the meta device and holds no values")
    # A set of ids costs a fraction of a dict keyed by tensors (Tensor.__hash__ is Python
    # code), but torch.compile guards a set of ids on object identity and would recompile
    # for new tensors of the same shapes; traced, the dict is used.
    if torch.compiler.is_compiling() or len(set(map(id, tensors))) != len(tensors):
        seen = {}
        for i, t in enumerate(tensors):
            if t in seen:
                raise ValueError(f"{name}[{i}] is the same tensor as {name}[{seen[t]}]; pass each tensor once")
            seen[t] = i


def single_device(bucket_devices: Sequence[torch.device], name: str = "params") -> None:
    """Refuse a call whose (device, dtype) buckets, from :func:`split`, span several devices."""
    devices = list(dict.fromkeys(bucket_devices))
    if len(devices) > 1:
        raise ValueError(
            f"{name} holds tensors on several devices ({', '.join(map(str, devices))}); call once per device, "
            "or use fastreg.Regularized, which groups parameters by device"
        )


def check_no_overlap(tensors: Sequence[Tensor], name: str = "params", suffix: str = "", indices: Optional[Sequence[int]] = None) -> None:
    """Refuse tensors that share elements: an op writing them in place would give a result
    that depends on the order of its writes (and, in a parallel kernel, would race).

    Tensors whose address ranges are disjoint (separate tensors, or slices of a flat buffer
    as DDP's ``gradient_as_bucket_view`` makes) pass at the cost of a sort of integers; only
    tensors whose ranges intersect (interleaved views such as ``w[:, ::2]`` and ``w[:, 1::2]``)
    have their elements compared. Ranges are addresses, not storage offsets, so memory shared
    by two storages (``torch.from_numpy`` of one array twice) is caught too. Under
    ``torch.compile`` the check is skipped: data pointers are not traceable, and the compiler
    guards a graph's inputs for aliasing itself.
    """
    if torch.compiler.is_compiling():
        return
    indices = range(len(tensors)) if indices is None else indices
    # Plain int lists rather than a tuple per tensor: with thousands of tensors, the garbage
    # collector's passes over per-tensor containers cost more than the check itself.
    positions, starts, stops = [], [], []
    for position, t in enumerate(tensors):
        numel = t.numel()
        if numel:
            start, stop = _byte_span(t, numel)
            positions.append(position)
            starts.append(start)
            stops.append(stop)
    order = sorted(range(len(starts)), key=starts.__getitem__)
    first, end = 0, -1  # the run of ranges in order[first:] that reach one another
    for n, k in enumerate(order):
        if starts[k] >= end:  # nothing before reaches this range: the run before it is settled
            if n - first > 1:
                _check_run(order[first:n], positions, tensors, indices, name, suffix)
            first = n
        if stops[k] > end:
            end = stops[k]
    if len(order) - first > 1:
        _check_run(order[first:], positions, tensors, indices, name, suffix)


def _check_run(run: List[int], positions: List[int], tensors: Sequence[Tensor], indices: Sequence[int], name: str, suffix: str) -> None:
    _check_shared_elements([(indices[positions[k]], tensors[positions[k]]) for k in run], name, suffix)


def _byte_span(t: Tensor, numel: int) -> Tuple[int, int]:
    """The addresses ``[start, stop)`` of the bytes ``t`` (of ``numel`` > 0 elements) can touch."""
    start = t.data_ptr()
    if t.is_contiguous():
        extent = numel
    else:
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


def _check_shared_elements(shared: Sequence[Tuple[int, Tensor]], name: str, suffix: str) -> None:
    """Raise naming the first two of ``shared`` (index, tensor; their address ranges
    intersect) that have an element in common; views of another element size or alignment
    count as sharing."""
    def refuse(first: int, second: int):
        first, second = sorted((first, second))
        raise ValueError(
            f"{name}[{second}]{suffix} shares memory with {name}[{first}]{suffix}; tensors written in place "
            "must not overlap (the result would depend on the order of the writes)"
        )

    element_size = shared[0][1].element_size()
    for (i, a), (j, b) in zip(shared, shared[1:]):
        if b.element_size() != element_size:
            refuse(i, j)
    spans = [_byte_span(t, t.numel()) for _, t in shared]
    base = min(start for start, _ in spans)
    if any((start - base) % element_size for start, _ in spans):
        refuse(shared[0][0], shared[1][0])
    count = (max(stop for _, stop in spans) - base) // element_size
    numbering = torch.arange(count, device=shared[0][1].device)
    owner = torch.full((count,), -1, dtype=torch.long, device=numbering.device)
    for (i, t), (start, _) in zip(shared, spans):
        elements = numbering.as_strided(t.shape, t.stride(), (start - base) // element_size).reshape(-1)
        taken = owner[elements]
        clash = taken >= 0
        if bool(clash.any()):
            refuse(int(taken[clash][0]), i)
        owner[elements] = i


def grads_of(tensors: Sequence[Tensor], name: str = "params") -> Tuple[List[Tensor], List[Tensor], List[int]]:
    """The tensors that have a ``.grad``, those grads, checked, and their indices in
    ``tensors``; tensors without one are skipped."""
    with_grad, grads, indices = [], [], []
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
        indices.append(i)
    return with_grad, grads, indices


def split(tensors: Sequence[Tensor]) -> List[BucketIndices]:
    """(device, dtype, indices) buckets in order of first appearance."""
    buckets = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return [(device, dtype, indices) for (device, dtype), indices in buckets.items()]


# torch.compile calls these three at trace time and takes their answers as constants: whether
# a backend can run may mean building its extension (a lock, a compiler run), which has no
# business in a graph, and the answer does not change while a process lives.
@torch._dynamo.assume_constant_result
def _auto_name(device: torch.device, dtype: torch.dtype) -> str:
    return auto_backend(device, dtype).name


@torch._dynamo.assume_constant_result
def _unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return get_backend(name).unavailable_reason(device, dtype)


@torch._dynamo.assume_constant_result
def _has_step_ops(name: str, device: torch.device) -> bool:
    """Whether the backend has fused optimizer steps on ``device`` (importing its kernels)."""
    return get_backend(name).step_ops(device) is not None


def requested_backend(name: Optional[str]) -> Tuple[str, str]:
    """The backend name a call asks for (``name``, else ``FASTREG_BACKEND``, else ``auto``),
    and where it came from, for error messages."""
    if name is None:
        return os.environ.get(BACKEND_ENV, "auto"), BACKEND_ENV
    return name, "backend"


def backend_for(name: Optional[str], device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend named by the call, else by ``FASTREG_BACKEND``, else ``auto``'s choice."""
    name, origin = requested_backend(name)
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        return get_backend(_auto_name(device, dtype))
    try:
        backend = get_backend(name)
    except ValueError as error:
        raise ValueError(f"{origin}: {error}") from None
    reason = _unavailable_reason(name, device, dtype)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device} with {dtype}: {reason}")
    return backend


def check_backend_name(name: Optional[str], origin: str = "backend") -> None:
    """Fail early on an unknown backend name (whether it can run is decided per bucket);
    ``origin`` names where the name came from (the argument, or ``FASTREG_BACKEND``)."""
    if name is not None and name != "auto":
        if not isinstance(name, str):
            raise TypeError(f"{origin} must be a string, got {type(name).__name__}")
        try:
            get_backend(name)
        except ValueError as error:
            raise ValueError(f"{origin}: {error}" if origin != "backend" else str(error)) from None


def result_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def total(values: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Sum per-bucket values in bucket order (deterministic), on ``device``."""
    if not values:
        return torch.zeros((), dtype=dtype, device=device)
    result = values[0].to(device=device, dtype=dtype)
    for v in values[1:]:
        result = result + v.to(device=device, dtype=dtype)
    return result
