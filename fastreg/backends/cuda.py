"""The ``cuda`` backend: multi-tensor CUDA kernels from ``csrc/`` (see csrc/fastreg_cuda.cu).

Each op is one call into ``torch.ops.fastreg`` (the same operators as the ``cpp`` backend, with
CUDA kernels registered for them). A launch carries a table of all tensors of the call in its
kernel arguments (addresses, int64 sizes, the first work item of each tensor), blocks stride
over 64K-element work items, and per-item partial sums are combined by a second small kernel
in a fixed order: results are bit-identical from run to run, nothing is copied from the host
per call, and calls can be captured in CUDA graphs. Launches per call: coupled value + grad,
value and norms 2; decay and penalty backward 1; with group lasso 3 (sums, finalize, update);
plus one more kernel launch per extra ~600 tensors (per ~68 where 4 KB parameter space applies).

The extension builds on first use (:mod:`fastreg._build`), only where torch is a CUDA build and
nvcc is installed; until it has built, or if it cannot, :meth:`CudaBackend.unavailable_reason`
says why and ``auto`` picks the next backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _build
from .extension import ExtensionBackend


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
