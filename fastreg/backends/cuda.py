"""The ``cuda`` backend: multi-tensor CUDA kernels from ``csrc/`` (see csrc/fastreg_cuda.cu).

The kernels read the work layout of ``csrc/plan.h``, the table the C++ planner builds for every
kernel backend: thread blocks take its work items in a grid-stride loop, so one launch covers
any number of tensors, and nothing about the tensors travels in the kernel arguments. A plan
keeps its table in device memory (:meth:`CudaBackend.table_to_device`: a pinned, non-blocking
copy on the current stream, kept alive for every stream that reads it) and calls the ops of
:meth:`CudaBackend.table_ops`, the extension's Python module, with no work per tensor. The list
ops (``torch.ops.fastreg`` on CUDA tensors: non-contiguous tensors, the penalty's backward,
compiled code) build the same layout in C++ and cache its device table by the tensors'
addresses, so a repeated call copies nothing and can be captured in a CUDA graph.

Launches per call, whatever the number of tensors: norms 1, value 2 (item pass + finalize),
coupled value + grad 2, decay and penalty backward 1; group lasso adds a sums pass (and a
finalize) before the update pass, which needs each group's norm. A finalize is one small
parallel kernel that combines the pieces of groups longer than a work item and the items'
sums, in a fixed order and never with float atomics, so results are bit-identical from run to
run (norms, decay and the backward launch it only when some group spans several items).

The extension builds on first use (:mod:`fastreg._build`), only where torch is a CUDA build and
nvcc is installed; until it has built, or if it cannot, :meth:`CudaBackend.unavailable_reason`
says why and ``auto`` picks the next backend.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _build
from .extension import ExtensionBackend


def _module():
    """The loaded extension's Python module (``csrc/cuda_bindings.cpp``), or None."""
    return _build.CUDA.module if _build.CUDA.ensure() is None else None


class CudaBackend(ExtensionBackend):
    name = "cuda"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if torch.device(device).type != "cuda":
            skip = _build.CUDA.skip_reason()
            return "cuda runs on CUDA tensors only" + (f"; not buildable here: {skip}" if skip else "")
        return _build.cuda_unavailable_reason()

    def auto_eligible(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda"

    def extension_unavailable_reason(self) -> Optional[str]:
        return _build.cuda_unavailable_reason()

    def table_ops(self, device: torch.device):
        # The module's norms / value / add_grad_ / decay_ take a DeviceTable and the dtype.
        return _module() if torch.device(device).type == "cuda" else None

    def step_ops(self, device: torch.device):
        # The module binds the fused optimizer steps over a DeviceTable too.
        return self.table_ops(device)

    def layout_limits(self, device: torch.device) -> Tuple[int, int]:
        module = _module()
        if module is None:
            raise RuntimeError(f"fastreg's cuda backend is unavailable: {self.extension_unavailable_reason()}")
        return tuple(module.layout_limits())

    def table_to_device(self, host: Tensor, device: torch.device):
        module = _module()
        if module is None:
            raise RuntimeError(f"fastreg's cuda backend is unavailable: {self.extension_unavailable_reason()}")
        return module.table_to_device(host, torch.device(device))
