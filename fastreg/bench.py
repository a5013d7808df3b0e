"""The one benchmark harness: fastreg against the loops people write, side by side in one run.

A *task* (coupled value + grad, norms, decoupled decay, a training step) has several
*cases*: the single-pass floor, the naive loop people write, a no-grad loop,
``torch._foreach_*``, ``torch.compile`` of the loop, and every usable fastreg backend.
Every case is first checked against the ``reference`` backend, then timed with
``torch.utils.benchmark`` (which synchronizes CUDA and runs with the process's thread
count here), all cases interleaved in rounds so that a change in the machine's load
reaches every case alike, and reported as ratios to the floor and to the naive loop of
the same run.

On a *host* workload (``tiny-1k``, ``tiny-10k``: tensors of 4 elements) the kernels cost
nothing and what is measured is the host work of a call. Every task's floor is then
``torch._foreach_add_(grads, params, alpha=0)`` on the same list, and every fastreg case
of a stateless task has a ``first call`` twin that drops the cached plans before each call.
The CLI (``python -m fastreg bench``) and the pytest-benchmark suite (``benchmarks/``)
both use :func:`make_cases` and :func:`check`.
"""
from __future__ import annotations

import abc
import dataclasses
import datetime
import os
import platform
import subprocess
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _build, _plan, functional
from .backends import BACKENDS
from .fused_optim import AdamW as FusedAdamW
from .optim import Regularized
from .workloads import Workload

# torch.utils.benchmark imports cpp_extension, which logs a warning where a CUDA toolkit is
# found but no GPU: import it through fastreg's quiet import first.
_build.import_cpp_extension()
from torch.utils import benchmark as torch_benchmark  # noqa: E402

Outputs = Tuple[List[Tensor], List[Tensor]]  # (reductions: values and norms, tensors: grads or weights)


@dataclasses.dataclass(frozen=True)
class Setting:
    """The strengths every case of a run uses: a coupled ElasticNet of typical strengths."""

    l1: float = 1e-5
    l2: float = 1e-4
    lr: float = 1e-3


@dataclasses.dataclass
class Case:
    name: str
    run: Callable[[], object]
    skip_reason: Optional[str] = None
    checked: bool = True  # False for a floor: it moves the same bytes but computes something else


@dataclasses.dataclass
class Result:
    name: str
    median_ms: Optional[float] = None
    iqr_ms: Optional[float] = None
    gb_per_s: Optional[float] = None
    x_floor: Optional[float] = None
    speedup_vs_naive: Optional[float] = None
    value_error: Optional[float] = None
    tensor_error: Optional[float] = None
    note: str = ""


def _compiled(name: str, fn: Callable, compile: bool) -> Tuple[str, Optional[Callable], Optional[str]]:
    label = f"torch.compile({name})"
    if not compile:
        return label, None, "torch.compile peers switched off (each compile takes about a minute on CPU)"
    return label, torch.compile(fn, fullgraph=True), None


class Task(abc.ABC):
    """One thing a user does with regularization, and every way to do it."""

    name: str
    title: str
    floor: str
    naive: str
    passes: int  # tensor-sized reads + writes a single-pass implementation makes
    # Cases carry state from call to call (an optimizer's moments): no first-call twins, whose
    # check would start from the state their cached twin left.
    stateful = False

    def traffic(self, workload: Workload) -> int:
        return 0 if workload.host else self.passes * workload.bytes

    def floor_for(self, workload: Workload) -> str:
        """The name of the case the others are divided by on ``workload``."""
        return HOST_FLOOR if workload.host else self.floor

    def applies_to(self, workload: Workload) -> Optional[str]:
        """None when the task can run on ``workload``, else why not."""
        return None

    @abc.abstractmethod
    def peers(self, workload: Workload, setting: Setting, compile: bool) -> List[Case]:
        """The floor and the ways people do it without fastreg."""

    @abc.abstractmethod
    def fastreg_cases(self, workload: Workload, setting: Setting, backend: str) -> List[Case]:
        """The ways fastreg does it with ``backend``; the first, with ``reference``, is the reference."""

    def snapshot(self, workload: Workload):
        """What :meth:`restore` needs to start a check from the same state."""
        return None

    def restore(self, workload: Workload, saved) -> None:
        pass

    @abc.abstractmethod
    def outputs(self, workload: Workload, returned) -> Outputs:
        """What a case produced, in a form comparable with the reference's."""


def _detached(params: Sequence[Tensor]) -> List[Tensor]:
    return [p.detach() for p in params]


class CoupledGrad(Task):
    name = "grad"
    title = "coupled ElasticNet value + grad"
    floor = "floor: foreach add (alpha=0)"
    naive = "naive autograd loop"
    passes = 3  # read w and g, write g

    def peers(self, workload, setting, compile):
        params, l1, l2 = workload.params, setting.l1, setting.l2
        label, compiled, reason = _compiled("no-grad loop", no_grad_loop, compile)
        return [
            Case(self.floor, lambda: grad_floor(params), checked=False),
            Case(self.naive, lambda: naive_autograd_loop(params, l1, l2)),
            Case("no-grad loop", lambda: no_grad_loop(params, l1, l2)),
            Case("torch._foreach_*", lambda: foreach_grad(params, l1, l2)),
            Case(label, (lambda: compiled(params, l1, l2)) if compiled else None, reason),
        ]

    def fastreg_cases(self, workload, setting, backend):
        return [Case(f"fastreg[{backend}]", lambda: functional.add_penalty_grad_(workload.params, setting.l1, setting.l2, backend=backend))]

    def snapshot(self, workload):
        return [p.grad.clone() for p in workload.params]

    def restore(self, workload, saved):
        with torch.no_grad():
            for p, g in zip(workload.params, saved):
                p.grad.copy_(g)

    def outputs(self, workload, returned):
        return [returned.reshape(())], [p.grad for p in workload.params]


class TensorNorms(Task):
    name = "norms"
    title = "per-tensor L1 and L2 norms"
    # One read of every element in one multi-tensor op; on CPU, _foreach_norm(inf) is not
    # vectorized (2.5 GB/s on GPT-2 small against 27 GB/s here), so it would be no floor.
    floor = "floor: foreach max"
    naive = "naive loop"
    passes = 1  # read w

    def peers(self, workload, setting, compile):
        params = _detached(workload.params)
        label, compiled, reason = _compiled("naive loop", norms_loop, compile)
        return [
            Case(self.floor, lambda: torch._foreach_max(params), checked=False),
            Case(self.naive, lambda: norms_loop(params)),
            Case("torch._foreach_*", lambda: foreach_norms(params)),
            Case(label, (lambda: compiled(params)) if compiled else None, reason),
        ]

    def fastreg_cases(self, workload, setting, backend):
        def run():
            n = functional.norms(workload.params, backend=backend)
            return n.tensor_l1, n.tensor_l2

        return [Case(f"fastreg[{backend}]", run)]

    def outputs(self, workload, returned):
        return list(returned), []


class DecoupledDecay(Task):
    name = "decay"
    title = "decoupled decay: l2 scale + L1 prox"
    floor = "floor: foreach mul_"
    naive = "naive loop"
    passes = 2  # read and write w

    def peers(self, workload, setting, compile):
        params, lr, l1, l2 = _detached(workload.params), setting.lr, setting.l1, setting.l2
        label, compiled, reason = _compiled("naive loop", decay_loop, compile)
        return [
            Case(self.floor, lambda: torch._foreach_mul_(params, 1.0), checked=False),
            Case(self.naive, lambda: decay_loop(params, lr, l1, l2)),
            Case("torch._foreach_*", lambda: foreach_decay(params, lr, l1, l2)),
            Case(label, (lambda: compiled(params, lr, l1, l2)) if compiled else None, reason),
        ]

    def fastreg_cases(self, workload, setting, backend):
        return [
            Case(f"fastreg[{backend}]", lambda: functional.decay_(workload.params, setting.lr, setting.l1, setting.l2, backend=backend))
        ]

    def snapshot(self, workload):
        return [p.detach().clone() for p in workload.params]

    def restore(self, workload, saved):
        with torch.no_grad():
            for p, w in zip(workload.params, saved):
                p.copy_(w)

    def outputs(self, workload, returned):
        return [], _detached(workload.params)


class TrainingStep(Task):
    """A whole SGD step of a real model: forward, loss + penalty, backward, update."""

    name = "step"
    title = "training step: forward, loss + penalty, backward, SGD update"
    floor = "unregularized step"
    naive = "naive autograd loop"
    passes = 0  # dominated by the model, not by the penalty's memory traffic

    def applies_to(self, workload):
        if workload.model is None and not workload.host:
            return "needs a workload with a model (e.g. transformer) or a host workload"
        return None

    @staticmethod
    def _step(workload: Workload, optimizer: torch.optim.Optimizer, penalty: Optional[Callable[[], Tensor]]):
        if workload.model is None:  # a host workload: the step alone, on the gradients it has
            def step():
                if penalty is not None:
                    penalty().backward()
                optimizer.step()

            return step

        def run():
            optimizer.zero_grad()
            loss = workload.model(workload.inputs).float().square().mean()
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            optimizer.step()
            return loss.detach()

        return run

    def peers(self, workload, setting, compile):
        params, l1, l2 = workload.params, setting.l1, setting.l2
        sgd = torch.optim.SGD(params, lr=setting.lr)

        def naive():
            return sum(l1 * p.abs().sum() + l2 / 2 * p.pow(2).sum() for p in params)

        return [
            Case(self.floor, self._step(workload, sgd, None), checked=False),
            Case(self.naive, self._step(workload, sgd, naive)),
        ]

    def fastreg_cases(self, workload, setting, backend):
        params, l1, l2 = workload.params, setting.l1, setting.l2
        sgd = torch.optim.SGD(params, lr=setting.lr)
        regularized = Regularized(torch.optim.SGD(params, lr=setting.lr), l1, l2, backend=backend)
        in_loss = Case(f"fastreg[{backend}] penalty in the loss", self._step(workload, sgd, lambda: functional.penalty(params, l1, l2, backend=backend)))
        step = Case(f"fastreg[{backend}] Regularized(SGD)", self._step(workload, regularized, None))
        return [step] if workload.model is None else [in_loss, step]

    def snapshot(self, workload):
        weights = [p.detach().clone() for p in workload.params]
        # Without a model the gradients are the workload's own, and coupled steps add to them.
        grads = [p.grad.clone() for p in workload.params] if workload.model is None else None
        return weights, grads

    def restore(self, workload, saved):
        weights, grads = saved
        with torch.no_grad():
            for p, w in zip(workload.params, weights):
                p.copy_(w)
            if grads is not None:
                for p, g in zip(workload.params, grads):
                    p.grad.copy_(g)

    def outputs(self, workload, returned):
        return [], _detached(workload.params)


class AdamWStep(Task):
    """An optimizer step on the gradients the workload has: AdamW's update with its own
    (decoupled) weight decay, then the L1 soft threshold, as ``Regularized(AdamW, l1,
    mode="decoupled")`` and the fused ``fastreg.AdamW(l1=)`` do it."""

    name = "adamw"
    title = "AdamW step + L1 prox (weight_decay = l2)"
    floor = "torch AdamW(fused), weight decay only"
    naive = "torch AdamW + prox loop"
    passes = 7  # read w, g, m, v; write w, m, v
    stateful = True
    # Every case keeps its own AdamW state (two tensors per parameter).
    MAX_PARAMS = 200_000_000

    def applies_to(self, workload):
        if workload.numel > self.MAX_PARAMS:
            return f"keeps AdamW state for each of its cases: at most {self.MAX_PARAMS:,} params (use --size)"
        return None

    @staticmethod
    def _adamw(params, setting: Setting, fused: Optional[bool]) -> torch.optim.AdamW:
        # torch's fused AdamW runs on CPU and CUDA; elsewhere its default implementation.
        fused = fused and params[0].device.type in ("cpu", "cuda")
        return torch.optim.AdamW(params, lr=setting.lr, weight_decay=setting.l2, fused=fused or None)

    @staticmethod
    def _stepper(optimizer, after: Optional[Callable[[], None]] = None):
        def step():
            optimizer.step()
            if after is not None:
                after()

        return step

    def peers(self, workload, setting, compile):
        params = workload.params
        weights = _detached(params)
        threshold = setting.lr * setting.l1
        return [
            Case(self.floor, self._stepper(self._adamw(params, setting, True)), checked=False),
            Case(self.naive, self._stepper(self._adamw(params, setting, False), lambda: prox_loop(weights, threshold))),
            Case("torch AdamW(fused) + foreach prox", self._stepper(self._adamw(params, setting, True), lambda: foreach_prox(weights, threshold))),
        ]

    def fastreg_cases(self, workload, setting, backend):
        params = workload.params
        def regularized(fuse: bool, track: bool) -> Regularized:
            return Regularized(self._adamw(params, setting, True), l1=setting.l1, mode="decoupled", backend=backend,
                               track_penalty=track, fuse=fuse)

        # With a fused step (cpp on CPU, triton on CUDA), Regularized runs its kernel itself;
        # fuse=False shows the composition.
        cases = [Case(f"fastreg[{backend}] Regularized(AdamW(fused))", self._stepper(regularized(True, False)))]
        if BACKENDS[backend].step_ops(params[0].device) is not None:
            # Untracked, then with the penalty of each step's weights (both classes' default):
            # the fused step sums it in its one pass, the composition reads the weights again.
            for track, suffix in ((False, ""), (True, ", last_penalty")):
                fused = FusedAdamW(params, lr=setting.lr, weight_decay=setting.l2, l1=setting.l1, track_penalty=track,
                                   backend=backend)
                cases += [Case(f"fastreg[{backend}] Regularized(AdamW(fused), fuse=False){suffix}",
                               self._stepper(regularized(False, track))),
                          Case(f"fastreg[{backend}] AdamW(l1) fused{suffix}", self._stepper(fused))]
        return cases

    def snapshot(self, workload):
        return [p.detach().clone() for p in workload.params]

    def restore(self, workload, saved):
        with torch.no_grad():
            for p, w in zip(workload.params, saved):
                p.copy_(w)

    def outputs(self, workload, returned):
        return [], _detached(workload.params)


TASKS: Dict[str, Task] = {task.name: task for task in (CoupledGrad(), TensorNorms(), DecoupledDecay(), TrainingStep(), AdamWStep())}


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


def foreach_grad(params: Sequence[Tensor], l1: float, l2: float) -> Tensor:
    """The same with ``torch._foreach_*`` ops: a few multi-tensor kernels, several passes."""
    grads = [p.grad for p in params]
    with torch.no_grad():
        abs_sums = torch.stack(torch._foreach_norm(params, 1, dtype=torch.float32))
        sq_sums = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32)).square()
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=l1)
        torch._foreach_add_(grads, params, alpha=l2)
    return l1 * abs_sums.sum() + l2 / 2 * sq_sums.sum()


HOST_FLOOR = CoupledGrad.floor


def grad_floor(params: Sequence[Tensor]) -> None:
    """Reads w and g once and writes g once, as coupled value + grad must."""
    with torch.no_grad():
        torch._foreach_add_([p.grad for p in params], list(params), alpha=0)


def norms_loop(params: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    return (
        torch.stack([p.abs().sum(dtype=torch.float32) for p in params]),
        torch.stack([torch.norm(p.float(), 2) for p in params]),
    )


def foreach_norms(params: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    return (
        torch.stack(torch._foreach_norm(params, 1, dtype=torch.float32)),
        torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32)),
    )


def decay_loop(params: Sequence[Tensor], lr: float, l1: float, l2: float) -> None:
    for p in params:
        p.mul_(1 - lr * l2)
        prox_loop([p], lr * l1)


def prox_loop(params: Sequence[Tensor], threshold: float) -> None:
    """The L1 soft threshold as a loop over tensors: ``sign(w) * max(|w| - threshold, 0)``."""
    with torch.no_grad():
        for p in params:
            p.copy_(torch.sign(p) * torch.clamp(p.abs() - threshold, min=0))


def foreach_prox(params: Sequence[Tensor], threshold: float) -> None:
    with torch.no_grad():
        shrunk = torch._foreach_abs(params)
        torch._foreach_sub_(shrunk, threshold)
        torch._foreach_clamp_min_(shrunk, 0.0)
        torch._foreach_mul_(shrunk, torch._foreach_sign(params))
        torch._foreach_copy_(params, shrunk)


def foreach_decay(params: Sequence[Tensor], lr: float, l1: float, l2: float) -> None:
    torch._foreach_mul_(params, 1 - lr * l2)
    foreach_prox(params, lr * l1)


# -- cases, checks, timing ------------------------------------------------------------
def make_cases(task: Task, workload: Workload, setting: Setting, *, compile: bool = True, backends: Optional[Sequence[str]] = None) -> List[Case]:
    """The task's floor and peers, then one case per fastreg backend (unusable ones carry
    the reason)."""
    device, dtype = workload.params[0].device, workload.params[0].dtype
    found = task.peers(workload, setting, compile)
    if workload.host and task.floor != HOST_FLOOR:
        found.insert(0, Case(HOST_FLOOR, lambda: grad_floor(workload.params), checked=False))
    for name in backends if backends is not None else BACKENDS:
        for case in task.fastreg_cases(workload, setting, name):
            case.skip_reason = BACKENDS[name].unavailable_reason(device, dtype)
            found.append(case)
            if workload.host and not task.stateful and case.skip_reason is None:
                found.append(Case(f"{case.name} first call", _first_call(case.run), case.skip_reason))
    return found


def _first_call(run: Callable[[], object]) -> Callable[[], object]:
    """``run`` as on its first call: with no cached plan to reuse."""

    def first():
        _plan.clear()
        return run()

    return first


def reference(task: Task, workload: Workload, setting: Setting, start) -> Outputs:
    """What the ``reference`` backend produces from the ``start`` state."""
    task.restore(workload, start)
    returned = task.fastreg_cases(workload, setting, "reference")[0].run()
    values, tensors = task.outputs(workload, returned)
    return [v.detach().clone() for v in values], [t.detach().clone() for t in tensors]


def _relative_error(got: Tensor, want: Tensor) -> float:
    scale = want.double().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((got.double() - want.double()).abs().max() / scale).item()


def _max_error(got: List[Tensor], want: List[Tensor]) -> Optional[float]:
    if not want:
        return None
    return max(_relative_error(g.reshape(w.shape), w) for g, w in zip(got, want))


def check(task: Task, workload: Workload, case: Case, expected: Outputs, start) -> Tuple[Optional[float], Optional[float]]:
    """Runs ``case`` once from the ``start`` state (timing other cases changes the state);
    its relative errors (reductions, tensors) against ``expected``."""
    task.restore(workload, start)
    values, tensors = task.outputs(workload, case.run())
    return _max_error(values, expected[0]), _max_error(tensors, expected[1])


def tolerance(dtype: torch.dtype) -> float:
    """How far an implementation may stray from the reference: a few roundings of ``dtype``."""
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


# A timed block lasts about this long; rounds repeat until every case has run min_run_time.
BLOCK_SECONDS = 0.02
MIN_ROUNDS = 3


def time_cases(cases: Sequence[Case], min_run_time: float) -> List[Tuple[float, float]]:
    """(median, interquartile range) in seconds per call of every case, timed in interleaved
    rounds: each round runs one block of every case in turn, so a slow moment of the machine
    lands on all of them rather than on whichever case ran then."""
    timers = [torch_benchmark.Timer(stmt="run()", globals={"run": c.run}, num_threads=torch.get_num_threads(), label=c.name)
              for c in cases]
    numbers = []
    for timer in timers:
        timer.timeit(1)  # warm-up: first-call work (a plan, a compile) stays out of the numbers
        once = timer.timeit(1).median
        numbers.append(max(1, int(BLOCK_SECONDS / max(once, 1e-9))))
    samples: List[List[float]] = [[] for _ in cases]
    spent = [0.0] * len(cases)

    def done(i: int) -> bool:
        # As blocked_autorange: a case whose one call outlasts min_run_time is timed once.
        enough = len(samples[i]) >= MIN_ROUNDS or (samples[i] and spent[i] >= min_run_time and numbers[i] == 1)
        return bool(enough) and spent[i] >= min_run_time

    while not all(done(i) for i in range(len(cases))):
        for i, timer in enumerate(timers):
            if not done(i):
                per_call = timer.timeit(numbers[i]).median
                samples[i].append(per_call)
                spent[i] += per_call * numbers[i]
    found = []
    for values in samples:
        q = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        found.append((q[1], q[2] - q[0]))
    return found


def copy_bandwidth(nbytes: int, device: torch.device, min_run_time: float = 1.0) -> float:
    """GB/s of ``dst.copy_(src)`` over ``nbytes``, counting its read and its write: what one
    pass over that many bytes reaches on ``device``, the yardstick a task's GB/s is held to."""
    src = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ((median, _),) = time_cases([Case("copy", lambda: dst.copy_(src))], min_run_time)
    return 2 * nbytes / median / 1e9


def run(
    task: Task,
    workload: Workload,
    setting: Setting = Setting(),
    *,
    compile: bool = True,
    backends: Optional[Sequence[str]] = None,
    min_run_time: float = 1.0,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Result]:
    """Check, then time, every case of ``task`` on ``workload``; ratios are within this run.

    A fastreg backend that disagrees with the reference is a bug and raises; a peer that
    disagrees (``torch._foreach_norm`` accumulates sequentially on CPU) is timed and flagged.
    """
    start = task.snapshot(workload)
    expected = reference(task, workload, setting, start)
    limit = tolerance(workload.params[0].dtype)
    traffic = task.traffic(workload)
    results = []
    timed_cases: List[Tuple[Case, Result]] = []
    for case in make_cases(task, workload, setting, compile=compile, backends=backends):
        if progress:
            progress(case.name)
        result = Result(case.name)
        results.append(result)
        if case.skip_reason is not None:
            result.note = f"skipped: {case.skip_reason}"
            continue
        if case.checked:
            try:
                result.value_error, result.tensor_error = check(task, workload, case, expected, start)
            except Exception as exc:  # a peer that cannot run here, e.g. torch.compile without a compiler
                if case.name.startswith("fastreg"):
                    raise
                result.note = f"skipped: {type(exc).__name__}: {exc}".splitlines()[0]
                continue
            worst = max(e for e in (result.value_error, result.tensor_error) if e is not None)
            if not worst <= limit:
                if case.name.startswith("fastreg"):
                    raise AssertionError(f"{case.name} disagrees with the reference backend on {task.name}: relative error {worst:.3g} > {limit:g}")
                result.note = "disagrees with the reference (see errors)"
        timed_cases.append((case, result))
    task.restore(workload, start)
    for (case, result), (median, iqr) in zip(timed_cases, time_cases([c for c, _ in timed_cases], min_run_time)):
        result.median_ms, result.iqr_ms = median * 1e3, iqr * 1e3
        if traffic:
            result.gb_per_s = traffic / median / 1e9
    timed = {r.name: r.median_ms for r in results if r.median_ms is not None}
    floor = task.floor_for(workload)
    for r in results:
        if r.median_ms is not None:
            r.x_floor = r.median_ms / timed[floor] if floor in timed else None
            r.speedup_vs_naive = timed[task.naive] / r.median_ms if task.naive in timed else None
    task.restore(workload, start)
    return results


# -- where a result was measured ------------------------------------------------------
def _command_output(args: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=os.path.dirname(__file__))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


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
        "commit": _command_output(["git", "rev-parse", "HEAD"]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["driver"] = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return info
