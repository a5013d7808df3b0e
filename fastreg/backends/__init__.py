"""Backend registry: every implementation of the op set in :mod:`fastreg.backends.base`.

Adding a backend means adding a module with a :class:`~fastreg.backends.base.Backend`
subclass and one entry in ``_REGISTERED``; call sites never name backends.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .base import Backend, Coefficients, accumulate_dtype
from .cpp import CppBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

# `auto` takes the first usable, auto-eligible backend of this list for a (device, dtype) bucket:
# the pure-PyTorch `torch` backend runs anywhere, so it is the fallback; the `reference` oracle
# (last) is only used when asked for by name.
_REGISTERED: Tuple[Backend, ...] = (TritonBackend(), CudaBackend(), CppBackend(), TorchBackend(), ReferenceBackend())

BACKENDS: Dict[str, Backend] = {backend.name: backend for backend in _REGISTERED}
BACKEND_CHOICES: Tuple[str, ...] = ("auto",) + tuple(BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}") from None


def auto_backend(device: torch.device, dtype: torch.dtype) -> Backend:
    for backend in _REGISTERED:
        if backend.auto_eligible(device) and backend.unavailable_reason(device, dtype) is None:
            return backend
    raise RuntimeError(f"no fastreg backend can run on {device} with {dtype}")  # unreachable: torch runs anywhere


__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "Backend",
    "Coefficients",
    "accumulate_dtype",
    "auto_backend",
    "get_backend",
]
