"""Triton multi-tensor kernels behind fastreg's ``triton`` backend.

One launch covers every tensor of a (device, dtype) bucket: programs find their work through the
work-layout table of ``csrc/plan.h`` (:mod:`.triton_table`), built by the C++ planner once per
parameter list and read on the device. Kernel families, each with its kernels, launchers, ops
over a table and ``torch.library`` custom ops (namespace ``fastreg_triton``) for compiled code:

- :mod:`.triton_norms`: per-tensor / per-group sums, the penalty value, and the finalize
  every family shares,
- :mod:`.triton_grad`: coupled value + gradient and the penalty backward,
- :mod:`.triton_decay`: decoupled decay and proximal maps.

Nothing here imports Triton: ``import fastreg`` must work, and cost nothing, without it.
The kernel modules import it when the backend first runs. They import nothing from
:mod:`fastreg.backends`, which builds on them.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

_STATE: Dict[str, object] = {}
"""``import_error``: the outcome of the one attempt to import Triton; ``interpreted``: the
mode the kernels were defined in, recorded by :mod:`.triton_table` when it is imported.
Plain module state, so that ``torch.compile`` reads these answers as constants while
tracing the dispatch rather than tracing an import."""


def triton_import_error() -> Optional[str]:
    """None when Triton imports, else why not (an import is tried once)."""
    if "import_error" not in _STATE:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as error:  # a broken install raises more than ImportError
            _STATE["import_error"] = f"triton is not importable: {type(error).__name__}: {error}"
        else:
            _STATE["import_error"] = None
    return _STATE["import_error"]


def interpreted() -> bool:
    """Whether the kernels run (or, once imported, will run) under Triton's CPU interpreter.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined, so once the kernel
    modules are imported their mode is fixed whatever the variable says later; until then
    the variable decides, read as Triton reads it.
    """
    mode = _STATE.get("interpreted")
    if mode is None:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
    return bool(mode)
