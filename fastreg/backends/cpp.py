"""The ``cpp`` backend: fused multi-tensor CPU kernels from ``csrc/`` (see csrc/fastreg_cpu.cpp).

Each op is one call into ``torch.ops.fastreg``, which walks a single work list of 64K-element
chunks of all tensors on all intra-op threads: coupled value + gradient reads ``w`` and ``g``
once and writes ``g`` once; decay reads and writes ``w`` once. Group lasso needs each group's
norm before its update, so those calls make a norms pass and an update pass inside the same op.
Partial sums are per chunk and combined in chunk order, so results are bit-identical for any
thread count. Non-contiguous tensors are processed through contiguous copies (written back
for the in-place ops).

The extension builds on first use (:mod:`fastreg._build`); until it has built, or if it
cannot, :meth:`CppBackend.unavailable_reason` says why and ``auto`` uses ``torch``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _build
from .extension import ExtensionBackend


class CppBackend(ExtensionBackend):
    name = "cpp"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if torch.device(device).type != "cpu":
            return "cpp runs on CPU tensors only"
        return _build.cpu_unavailable_reason()

    def extension_unavailable_reason(self) -> Optional[str]:
        return _build.cpu_unavailable_reason()

    def table_ops(self, device: torch.device):
        # The planner module binds the CPU kernels over a table (csrc/planner.cpp).
        return _build.planner() if torch.device(device).type == "cpu" else None

    def step_ops(self, device: torch.device):
        # The planner module binds the fused steps too (csrc/fastreg_optim.cpp).
        return self.table_ops(device)
