"""The one benchmark harness: fastreg against the loops people write, in one run.

Every implementation of a task is first checked against the ``torch`` reference
backend, then timed with ``torch.utils.benchmark`` (which synchronizes CUDA and runs with
the process's thread count here), and reported as a ratio to the single-pass floor and
to the naive autograd loop. The CLI (``python -m fastreg bench``) and the pytest-benchmark
suite (``benchmarks/``) both build on :func:`cases` and :func:`run`.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import subprocess
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils import benchmark as torch_benchmark

from . import functional
from .backends import BACKENDS
from .workloads import gpt2_small_shapes, make_params

FLOOR = "floor (foreach add, alpha=0)"
NAIVE = "naive autograd loop"


@dataclasses.dataclass
class Case:
    """One implementation of the task: ``run`` adds ``dP/dw`` to every grad, returns ``P``."""

    name: str
    run: Callable[[], Tensor]
    skip_reason: Optional[str] = None
    computes_task: bool = True  # False for the floor: it only moves the same bytes


@dataclasses.dataclass
class Result:
    name: str
    median_ms: Optional[float]
    iqr_ms: Optional[float]
    gb_per_s: Optional[float]
    x_floor: Optional[float]
    speedup_vs_naive: Optional[float]
    value_error: Optional[float]
    grad_error: Optional[float]
    note: str = ""


# -- the peers: how people regularize today -------------------------------------------
def naive_autograd_loop(params: Sequence[Tensor], l1: float, l2: float) -> Tensor:
    """The tutorial way: build the penalty per tensor, then backpropagate through it."""
    value = sum(l1 * p.abs().sum() + l2 / 2 * p.pow(2).sum() for p in params)
    value.backward()
    return value.detach()


def no_grad_loop(params: Sequence[Tensor], l1: float, l2: float) -> Tensor:
    """A hand-written loop that skips autograd: still several kernels per tensor."""
    value = torch.zeros((), device=params[0].device)
    with torch.no_grad():
        for p in params:
            value = value + l1 * p.abs().sum(dtype=torch.float32) + l2 / 2 * p.square().sum(dtype=torch.float32)
            p.grad.add_(l1 * torch.sign(p) + l2 * p)
    return value


def foreach_loop(params: Sequence[Tensor], l1: float, l2: float) -> Tensor:
    """The same with ``torch._foreach_*`` ops: a few multi-tensor kernels, several passes."""
    grads = [p.grad for p in params]
    with torch.no_grad():
        abs_sums = torch.stack(torch._foreach_norm(params, 1, dtype=torch.float32))
        sq_sums = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32)).square()
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=l1)
        torch._foreach_add_(grads, params, alpha=l2)
    return l1 * abs_sums.sum() + l2 / 2 * sq_sums.sum()


def floor(params: Sequence[Tensor]) -> Tensor:
    """Reads w and g once and writes g once, as coupled value+grad must: the bandwidth floor."""
    with torch.no_grad():
        torch._foreach_add_([p.grad for p in params], list(params), alpha=0)
    return torch.zeros(())


def cases(params: List[Tensor], l1: float, l2: float, *, compile: bool = True, backends: Optional[Sequence[str]] = None) -> List[Case]:
    """Every implementation of coupled ElasticNet value + grad over ``params``."""
    device, dtype = params[0].device, params[0].dtype
    found = [
        Case(FLOOR, lambda: floor(params), computes_task=False),
        Case(NAIVE, lambda: naive_autograd_loop(params, l1, l2)),
        Case("no-grad loop", lambda: no_grad_loop(params, l1, l2)),
        Case("torch._foreach_*", lambda: foreach_loop(params, l1, l2)),
    ]
    if compile:
        compiled = torch.compile(no_grad_loop, fullgraph=True)
        found.append(Case("torch.compile(no-grad loop)", lambda: compiled(params, l1, l2)))
    else:
        found.append(Case("torch.compile(no-grad loop)", lambda: None, skip_reason="skipped with --no-compile"))
    for name in backends if backends is not None else BACKENDS:
        reason = BACKENDS[name].unavailable_reason(device, dtype)
        found.append(Case(f"fastreg[{name}]", lambda name=name: functional.add_penalty_grad_(params, l1, l2, backend=name), reason))
    return found


# -- checking and timing --------------------------------------------------------------
def _relative_error(got: Tensor, want: Tensor) -> float:
    scale = want.double().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((got.double() - want.double()).abs().max() / scale).item()


def check(case: Case, params: List[Tensor], reference: Tuple[Tensor, List[Tensor]], start: List[Tensor]) -> Tuple[float, float]:
    """Runs ``case`` once from the starting grads; its relative errors (value, worst grad)
    against the reference."""
    with torch.no_grad():
        for p, g in zip(params, start):
            p.grad.copy_(g)
    value = case.run()
    want_value, want_grads = reference
    return _relative_error(value.reshape(()), want_value), max(_relative_error(p.grad, g) for p, g in zip(params, want_grads))


def tolerance(dtype: torch.dtype) -> float:
    """How far an implementation may stray from the reference: a few roundings of ``dtype``."""
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


def time_case(case: Case, min_run_time: float) -> torch_benchmark.Measurement:
    timer = torch_benchmark.Timer(stmt="run()", globals={"run": case.run}, num_threads=torch.get_num_threads(), label=case.name)
    return timer.blocked_autorange(min_run_time=min_run_time)


def run(
    params: List[Tensor],
    l1: float = 1e-5,
    l2: float = 1e-4,
    *,
    compile: bool = True,
    backends: Optional[Sequence[str]] = None,
    min_run_time: float = 1.0,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Result]:
    """Check, then time, every implementation; ratios are taken within this one run."""
    start = [p.grad.detach().clone() for p in params]
    reference_grads = [g.clone() for g in start]
    reference = (_reference(params, reference_grads, l1, l2), reference_grads)
    moved = 3 * sum(p.numel() * p.element_size() for p in params)
    limit = tolerance(params[0].dtype)
    results = []
    for case in cases(params, l1, l2, compile=compile, backends=backends):
        if progress:
            progress(case.name)
        result = Result(case.name, None, None, None, None, None, None, None)
        results.append(result)
        if case.skip_reason is not None:
            result.note = f"skipped: {case.skip_reason}"
            continue
        if case.computes_task:
            try:
                result.value_error, result.grad_error = check(case, params, reference, start)
            except Exception as exc:  # a peer that cannot run here, e.g. torch.compile without a compiler
                result.note = f"skipped: {type(exc).__name__}: {exc}".splitlines()[0]
                continue
            if not max(result.value_error, result.grad_error) <= limit:
                if case.name.startswith("fastreg"):
                    raise AssertionError(
                        f"{case.name} disagrees with the torch reference: relative error {result.value_error:.3g} "
                        f"(value), {result.grad_error:.3g} (grads) > {limit:g}"
                    )
                result.note = "disagrees with the reference (see errors)"
        measurement = time_case(case, min_run_time)
        result.median_ms, result.iqr_ms = measurement.median * 1e3, measurement.iqr * 1e3
        result.gb_per_s = moved / measurement.median / 1e9
    by_name = {r.name: r for r in results}
    floor_ms = by_name[FLOOR].median_ms
    naive_ms = by_name[NAIVE].median_ms
    for r in results:
        if r.median_ms is not None:
            r.x_floor = r.median_ms / floor_ms
            r.speedup_vs_naive = naive_ms / r.median_ms if naive_ms is not None else None
    return results


def _reference(params: List[Tensor], grads: List[Tensor], l1: float, l2: float) -> Tensor:
    """The ``torch`` backend's value, adding its gradient to ``grads`` (copies, so the
    benchmarked tensors keep their own)."""
    views = []
    for p, g in zip(params, grads):
        view = p.detach()
        view.grad = g
        views.append(view)
    return functional.add_penalty_grad_(views, l1, l2, backend="torch")


# -- reporting ------------------------------------------------------------------------
def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=os.path.dirname(__file__)
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict[str, object]:
    """Where a result was measured: enough to compare machines and commits."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "device_type": device.type,
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": _git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["driver"] = _nvidia_driver()
    return info


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def gpt2_small(size: float, dtype: torch.dtype, device: torch.device, seed: int = 0) -> List[Tensor]:
    return make_params(gpt2_small_shapes(size), dtype=dtype, device=device, seed=seed)
