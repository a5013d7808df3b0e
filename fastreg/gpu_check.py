"""``python -m fastreg gpu-check``: everything a GPU machine can tell about fastreg, in one
command of at most 8 minutes, written into one folder ready to commit.

The steps, in order, each with its own time limit inside an overall budget:

1. ``environment``: device, driver, torch / Triton / CUDA / nvcc versions, commit;
2. ``build``: ``python -m fastreg build``, timed; a failed build is recorded and the steps
   after it still run (they then show what works without the extension);
3. ``tests``: the GPU tests of every backend under pytest, one pytest per file so that a file
   that hangs loses only its own results, each with its junit XML;
4. ``sanitizer``: compute-sanitizer memcheck and racecheck on a small case that calls every op
   with the ``cuda`` and ``triton`` backends;
5. ``graphs``: CUDA-graph capture and replay of ``add_penalty_grad_``, of a ``Regularized``
   step and of a ``capturable`` fused ``fastreg.AdamW`` step, against the same calls made eagerly;
6. ``bench``: :func:`fastreg.bench.run` on GPT-2 small (fp32), Llama shapes (bf16), 10,000
   small tensors and tiny-1k, each bandwidth also given as a percentage of a device-to-device
   copy of the same bytes timed in the same process.

Every step but the first runs in child processes of their own session, killed with all their
children at the step's limit: a hung kernel, compiler or sanitizer costs its step's time, never
the command's. The children import fastreg from this checkout (``PYTHONPATH`` is set for them),
so on a machine without network nothing needs installing: run ``PYTHONPATH=. python -m fastreg
gpu-check`` from the repository root.

``--dry-run`` runs the same plumbing on CPU at tiny sizes, for CI; what needs a GPU (the
sanitizer tools, CUDA graphs) is recorded as skipped, with the reason.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _build, bench, report, workloads
from .backends import BACKENDS
from .functional import add_penalty_grad_, decay_, norms
from .fused_optim import AdamW
from .optim import Regularized

SCHEMA = "fastreg-gpu-check/1"
SUMMARY_NAME = "gpu-check.json"
LOG_NAME = "gpu-check.log"
BENCH_NAME = "bench.json"
ROOT = Path(__file__).resolve().parent.parent

# Under the 10 minutes a command may take on a lent GPU machine, with room for the machine's
# start and the copy of the results.
BUDGET_SECONDS = 480.0
# A step with less time than this left is not started: it could only be killed half way.
MIN_STEP_SECONDS = 10.0

GPU_BACKENDS = ("cuda", "triton")
# CPU stand-ins in the dry run (Triton's interpreter, where TRITON_INTERPRET is set, takes minutes).
DRY_RUN_BACKENDS = ("cpp", "torch")
NO_GPU_IN_DRY_RUN = "dry run on CPU: needs a CUDA GPU"

# (name, pytest arguments). The conformance file's cpp and torch targets run on CPU: CI's job.
# test_plan.py and the optimizer tests have no GPU path.
GPU_TESTS: List[Tuple[str, List[str]]] = [
    ("conformance", ["tests/test_conformance.py", "-k", "cuda"]),
    ("cuda", ["tests/test_cuda.py"]),
    ("triton", ["tests/test_triton.py"]),
    ("triton-optim", ["tests/test_triton_optim.py"]),
    ("triton-compile", ["tests/test_triton_compile.py"]),
    ("compile-cuda-graphs", ["tests/test_compile.py::test_reduce_overhead_cuda_graphs", "-m", "slow"]),
    ("compile-fused-steps", ["tests/test_triton_optim.py::test_compiled_step_fullgraph_is_the_eager_step", "-m", "slow"]),
]
DRY_RUN_TESTS: List[Tuple[str, List[str]]] = [("conformance", ["tests/test_conformance.py", "-k", "test_norms"])]

# (workload, size, {task: with torch.compile peers}). Compiling takes tens of seconds a task,
# so only the headline comparison has it. Llama at a quarter: 310M bf16 parameters, built on
# the host in a few seconds.
GPU_BENCH: List[Tuple[str, float, Dict[str, bool]]] = [
    # adamw: the fused step's bandwidth against 28 bytes per fp32 parameter
    ("gpt2-small", 1.0, {"grad": True, "norms": False, "decay": False, "adamw": False}),
    ("llama-1b", 0.25, {"grad": False}),
    ("many-small", 1.0, {"grad": False}),
    ("tiny-1k", 1.0, {"grad": False}),
]
GPU_BENCH_SECONDS = 0.3  # of timing per implementation
# One workload timed for bandwidth and one for host cost: the two ways a run is reported.
DRY_RUN_BENCH: List[Tuple[str, float, Dict[str, bool]]] = [("gpt2-small", 0.0005, {"grad": False, "decay": False}), ("tiny-1k", 1.0, {"grad": False})]
DRY_RUN_BENCH_SECONDS = 0.005


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    seconds: float  # its own limit; the overall budget may leave it less
    run: Callable[["Check", float], Dict]  # (check, deadline) -> its record, with a "status"


class Check:
    """One gpu-check run: its output folder, log, summary and clock."""

    def __init__(self, out: Path, dry_run: bool, budget: float):
        self.out, self.dry_run, self.budget = out, dry_run, budget
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.log_path = out / LOG_NAME
        self.log_path.write_text("")
        # Append mode: the children write through the same file, and each write lands at its end.
        self._log = open(self.log_path, "a", encoding="utf-8")
        self._scratch = tempfile.TemporaryDirectory(prefix="fastreg-gpu-check-")
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        self.summary: Dict = {
            "schema": SCHEMA,
            "dry_run": dry_run,
            "budget_s": budget,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "status": "running",
            "environment": None,
            "steps": [],
            "bench": None,
        }

    def close(self) -> None:
        self._log.close()
        self._scratch.cleanup()

    def say(self, line: str) -> None:
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def write_summary(self) -> None:
        self.summary["elapsed_s"] = round(time.monotonic() - self.started, 1)
        path = self.out / SUMMARY_NAME
        path.with_suffix(".tmp").write_text(json.dumps(self.summary, indent=2) + "\n")
        path.with_suffix(".tmp").replace(path)

    def command(self, args: Sequence[str], deadline: float, env: Optional[Dict[str, str]] = None) -> Tuple[Optional[int], str]:
        """Runs ``args`` from the repository root, its output into the log; its exit status
        (None when it was killed at ``deadline``) and its output."""
        timeout = max(0.0, deadline - time.monotonic())
        self._log.write(f"$ {shlex.join(args)}\n")
        self._log.flush()
        start = self.log_path.stat().st_size
        process = subprocess.Popen(list(args), cwd=ROOT, env=env or self.env, stdin=subprocess.DEVNULL, stdout=self._log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: Optional[int] = process.wait(timeout)
        except subprocess.TimeoutExpired:
            # The whole session: pytest's workers, the program compute-sanitizer runs, a compiler.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            output = f.read()
        if code is None:
            self.say(f"  killed after its limit of {timeout:.0f} s: {shlex.join(args)}")
        return code, output

    def worker(self, name: str, deadline: float, wrap: Sequence[str] = (), env: Optional[Dict[str, str]] = None):
        """Runs the worker ``name`` (below) in a child process, under ``wrap`` (a sanitizer);
        its exit status, output and the record it wrote (None if it wrote none)."""
        result = Path(self._scratch.name) / f"{name}.json"
        result.unlink(missing_ok=True)
        args = [*wrap, sys.executable, "-m", "fastreg", "gpu-check", "--worker", name, "--out", str(self.out), "--result", str(result)]
        code, output = self.command(args + (["--dry-run"] if self.dry_run else []), deadline, env)
        return code, output, json.loads(result.read_text()) if result.exists() else None


def _status(code: Optional[int]) -> str:
    return "timeout" if code is None else "passed" if code == 0 else "failed"


def _worst(statuses: Sequence[str]) -> str:
    for status in ("failed", "timeout"):
        if status in statuses:
            return status
    return "passed"


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _tool_version(args: Sequence[str], marker: str) -> Optional[str]:
    """The line of ``args``' output that holds ``marker`` (a version), or None."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in done.stdout.splitlines() if marker in line), None)


def find_compute_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, else beside nvcc (the CUDA toolkit's bin)."""
    found = shutil.which("compute-sanitizer")
    nvcc = _build.find_nvcc()
    if found is None and nvcc is not None:
        candidate = Path(nvcc).parent / "compute-sanitizer"
        found = str(candidate) if candidate.exists() else None
    return found


def no_gpu_reason() -> Optional[str]:
    """Why gpu-check cannot run here, in one line; None where a CUDA GPU is usable."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        why = f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda}: no visible device or no driver)"
    return f"no CUDA GPU: {why}; --dry-run checks the plumbing on CPU"


# -- the steps ---------------------------------------------------------------------------
def step_environment(check: Check, deadline: float) -> Dict:
    """In this process: each command it runs (git, nvidia-smi, nvcc) has its own 10 s limit."""
    env = bench.environment(torch.device("cpu" if check.dry_run else "cuda"))
    nvcc, sanitizer = _build.find_nvcc(), find_compute_sanitizer()
    env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env["nvcc"] = _tool_version([nvcc, "--version"], "release") if nvcc else None
    env["compute_sanitizer"] = _tool_version([sanitizer, "--version"], "Version") if sanitizer else None
    check.summary["environment"] = env
    for key in ("device", "driver", "torch", "triton", "cuda", "nvcc", "compute_sanitizer", "python", "commit"):
        if key in env:
            check.say(f"  {key}: {env[key] if env[key] is not None else 'none'}")
    return {"status": "passed"}


def step_build(check: Check, deadline: float) -> Dict:
    code, output = check.command([sys.executable, "-m", "fastreg", "build"], deadline)
    extensions = dict(re.findall(r"^(fastreg_\w+) +(\S.*?)\s*$", output, re.MULTILINE))
    for name, state in extensions.items():
        check.say(f"  {name}: {state}")
    entry = {"status": _status(code), "extensions": extensions}
    if code != 0:
        # fastreg keeps no record of a failed build: each process tries again on first use.
        entry["reason"] = "the later steps' processes each try the build again (their limits bound it)"
    return entry


def junit_counts(path: Path) -> Dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"passed": passed, "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def step_tests(check: Check, deadline: float) -> Dict:
    suites = []
    for name, args in DRY_RUN_TESTS if check.dry_run else GPU_TESTS:
        junit = check.out / f"junit-{name}.xml"
        junit.unlink(missing_ok=True)
        if deadline - time.monotonic() < MIN_STEP_SECONDS:
            suites.append({"name": name, "status": "timeout", "reason": "the tests step's time ran out before it"})
        else:
            command = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
            code, output = check.command(command, deadline)
            entry = {"name": name, "status": _status(code), "junit": junit.name if junit.exists() else None}
            entry.update(junit_counts(junit) if junit.exists() else {})
            if code not in (0, None):
                entry["reason"] = _last_line(output)
            suites.append(entry)
        counts = ", ".join(f"{suites[-1][k]} {k}" for k in ("passed", "failed", "errors", "skipped") if k in suites[-1])
        check.say(f"  {name}: {suites[-1]['status']}{f' ({counts})' if counts else ''}")
    totals = {k: sum(s.get(k, 0) for s in suites) for k in ("passed", "failed", "errors", "skipped")}
    return {"status": _worst([s["status"] for s in suites]), **totals, "suites": suites}


SANITIZER_TOOLS = ("memcheck", "racecheck")
# memcheck, initcheck, synccheck: "ERROR SUMMARY: 0 errors"; racecheck: "RACECHECK SUMMARY:
# 0 hazards displayed (0 errors, 0 warnings)".
_SANITIZER_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error")


def step_sanitizer(check: Check, deadline: float) -> Dict:
    if check.dry_run:
        code, output, case = check.worker("sanitizer-case", deadline)
        tools = {tool: {"status": "skipped", "reason": NO_GPU_IN_DRY_RUN} for tool in SANITIZER_TOOLS}
        check.say(f"  the case ran on CPU ({_status(code)}); {', '.join(SANITIZER_TOOLS)}: skipped ({NO_GPU_IN_DRY_RUN})")
        return {"status": _status(code), "case": case, "tools": tools, "note": "the case ran on CPU, without compute-sanitizer"}
    sanitizer = find_compute_sanitizer()
    if sanitizer is None:
        return {"status": "skipped", "reason": "compute-sanitizer not found (neither on PATH nor beside nvcc)"}
    code, output = check.command([sanitizer, "--version"], min(deadline, time.monotonic() + 10))
    if code != 0:
        return {"status": "skipped", "reason": f"compute-sanitizer --version does not run: {_last_line(output)}"}
    # Without torch's caching allocator every tensor is an allocation of its own, whose bounds memcheck knows.
    env = dict(check.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    tools = {}
    for i, tool in enumerate(SANITIZER_TOOLS):
        tool_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(SANITIZER_TOOLS) - i)
        code, output, case = check.worker("sanitizer-case", tool_deadline, wrap=[sanitizer, "--tool", tool, "--error-exitcode", "1"], env=env)
        found = _SANITIZER_SUMMARY.search(output)
        if code is None:
            entry = {"status": "timeout"}
        elif found is None:
            entry = {"status": "skipped", "reason": f"compute-sanitizer could not run the case: {_last_line(output)}"}
        else:
            errors = int(found.group(1) or found.group(2))
            entry = {"status": "passed" if code == 0 and errors == 0 else "failed", "errors": errors, "case": case}
        tools[tool] = entry
        check.say(f"  {tool}: {entry['status']}" + (f" ({entry['errors']} errors)" if "errors" in entry else f": {entry.get('reason', '')}"))
    statuses = [t["status"] for t in tools.values()]
    status = "skipped" if set(statuses) == {"skipped"} else _worst(statuses)
    return {"status": status, "tools": tools, **({"reason": tools["memcheck"]["reason"]} if status == "skipped" else {})}


def step_graphs(check: Check, deadline: float) -> Dict:
    if check.dry_run:
        return {"status": "skipped", "reason": NO_GPU_IN_DRY_RUN}
    code, output, result = check.worker("graphs", deadline)
    for entry in (result or {}).get("checks", []):
        detail = entry.get("reason") or f"max relative error {entry['error']:.2g}"
        check.say(f"  {entry['name']}: {entry['status']} ({detail})")
    status = "timeout" if code is None else result["status"] if result else "failed"
    entry = {"status": status, "checks": (result or {}).get("checks")}
    if result is None and code is not None:
        entry["reason"] = _last_line(output)
    elif status == "skipped":
        entry["reason"] = "; ".join(sorted({c["reason"] for c in result["checks"]}))
    return entry


def step_bench(check: Check, deadline: float) -> Dict:
    path = check.out / BENCH_NAME
    path.unlink(missing_ok=True)  # an earlier run's, in a reused folder
    code, output, result = check.worker("bench", deadline)
    if path.exists():
        check.summary["bench"] = report.load(str(path))
    runs = []
    for run in (check.summary["bench"] or {}).get("runs", []):
        runs.append(bench_line(run))
        check.say(f"  {runs[-1]}")
    entry = {"status": _status(code), "file": BENCH_NAME if path.exists() else None, "runs": runs}
    if code not in (0, None):
        entry["reason"] = "; ".join(result["errors"]) if result else _last_line(output)
    return entry


def bench_line(run: Dict) -> str:
    """One run in a line: the fastreg backends' bandwidth as a percentage of the copy's, or on
    a host workload their time as a multiple of the floor's."""
    fastreg = [r for r in run["results"] if r["name"].startswith("fastreg") and r["median_ms"] is not None]
    head = f"{run['workload']['name']} {run['workload']['dtype']} {run['task']['name']}"
    if run.get("copy_gb_per_s") is None:
        return f"{head} (host cost): " + ", ".join(f"{r['name']} {r['x_floor']:.2f}x floor" for r in fastreg)
    cells = ", ".join(f"{r['name']} {r['pct_of_copy']:.0f}%" for r in fastreg)
    return f"{head}: copy {run['copy_gb_per_s']:.0f} GB/s; {cells}"


STEPS = (
    Step("environment", 30, step_environment),
    Step("build", 240, step_build),
    Step("tests", 200, step_tests),
    Step("sanitizer", 120, step_sanitizer),
    Step("graphs", 60, step_graphs),
    Step("bench", 180, step_bench),
)
STEP_NAMES = tuple(step.name for step in STEPS)


def default_out() -> Path:
    return Path("benchmarks", "results", f"gpu-check-{time.strftime('%Y%m%d-%H%M')}")


def run_check(out: Path, *, dry_run: bool = False, budget: float = BUDGET_SECONDS, skip: Sequence[str] = ()) -> int:
    """Every step into ``out``; 0 when all passed (or were skipped for a reason of their own),
    1 when one failed, timed out or found no time left in the budget."""
    out = out.resolve()  # the children run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, dry_run, budget)
    try:
        check.say(f"fastreg gpu-check{' --dry-run' if dry_run else ''}: into {out}, budget {budget:g} s")
        for step in STEPS:
            entry: Dict = {"name": step.name}
            remaining = check.deadline - time.monotonic()
            if step.name in skip:
                entry.update(status="skipped", reason="--skip")
            elif remaining < MIN_STEP_SECONDS:
                entry.update(status="not run", reason=f"the overall budget of {budget:g} s was spent")
            else:
                limit = min(step.seconds, remaining)
                entry["limit_s"] = round(limit, 1)
                check.say(f"== {step.name} (limit {limit:.0f} s)")
                started = time.monotonic()
                try:
                    entry.update(step.run(check, started + limit))
                except Exception as error:
                    check.say(traceback.format_exc().rstrip())
                    entry.update(status="failed", reason=f"{type(error).__name__}: {error}".splitlines()[0])
                entry["seconds"] = round(time.monotonic() - started, 1)
            took = f" in {entry['seconds']:.1f} s" if "seconds" in entry else ""
            check.say(f"{step.name}: {entry['status']}{took}{': ' + entry['reason'] if entry.get('reason') else ''}")
            check.summary["steps"].append(entry)
            check.write_summary()
        statuses = [s["status"] for s in check.summary["steps"]]
        worst = _worst(statuses)
        check.summary["status"] = "incomplete" if worst == "passed" and "not run" in statuses else worst
        check.write_summary()
        check.say(f"gpu-check: {check.summary['status']} in {check.summary['elapsed_s']:.0f} s; wrote {out}/{SUMMARY_NAME} and {LOG_NAME}")
    finally:
        check.close()
    return 0 if check.summary["status"] == "passed" else 1


# -- the workers: what a step runs in its child process -----------------------------------
def _device(dry_run: bool) -> torch.device:
    return torch.device("cpu" if dry_run else "cuda")


SANITIZER_SHAPES = [(33, 17), (1,), (), (3, 1, 5), (0,), (4097,), (2, 300)]


def worker_sanitizer_case(dry_run: bool, out: Path) -> Dict:
    """Every op once per backend and dtype on a few odd shapes: small, so that it runs in
    seconds under a sanitizer, and odd, so that tails and empty tensors are in it."""
    device = _device(dry_run)
    ran, unavailable = [], {}
    for backend in DRY_RUN_BACKENDS if dry_run else GPU_BACKENDS:
        for dtype in (torch.float32, torch.bfloat16):
            reason = BACKENDS[backend].unavailable_reason(device, dtype)
            if reason is not None:
                unavailable[f"{backend} {dtype}"] = reason
                continue
            for group_dim in (None, 0):
                params = workloads.make_params(SANITIZER_SHAPES, dtype, device)
                coefs = dict(l1=1e-3, l2=1e-2, group_lasso=1e-2, group_dim=group_dim)
                add_penalty_grad_(params, **coefs, backend=backend)
                norms(params, backend=backend)
                with torch.no_grad():
                    decay_(params, 0.1, **coefs, backend=backend)
            ran.append(f"{backend} {str(dtype).replace('torch.', '')}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"ran {', '.join(ran)}; unavailable: {unavailable or 'none'}")
    return {"status": "passed" if ran else "failed", "ran": ran, "unavailable": unavailable}


GRAPH_SHAPES = [(64, 40), (3, 70000), (1000,), ()]
GRAPH_STEPS = 3


def _capture(fn: Callable[[], object], warm_up: Optional[Callable[[], object]] = None):
    """``fn`` captured in a CUDA graph after three ``warm_up`` calls (default ``fn``) on a side
    stream, for the plans, Triton's compiles and the optimizer's state, as torch's
    documentation does it; (graph, what ``fn`` returned while captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            (warm_up or fn)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def _graph_penalty_grad(backend: str, device: torch.device) -> float:
    """Replays on new weights and gradients against eager calls on the same values."""
    params = workloads.make_params(GRAPH_SHAPES, torch.float32, device)

    def call():
        return add_penalty_grad_(params, l1=1e-3, l2=1e-2, group_lasso=1e-2, group_dim=0, backend=backend)

    def load(fresh):
        with torch.no_grad():
            for p, q in zip(params, fresh):
                p.copy_(q)
                p.grad.copy_(q.grad)

    graph, captured = _capture(call)
    errors = []
    for seed in range(1, GRAPH_STEPS + 1):
        fresh = workloads.make_params(GRAPH_SHAPES, torch.float32, device, seed=seed)
        load(fresh)
        graph.replay()
        replayed = [captured.clone()] + [p.grad.clone() for p in params]
        load(fresh)
        eager = [call()] + [p.grad for p in params]
        errors.append(bench._max_error(replayed, eager))
    return max(errors)


def _regularized_sgd(backend: str, mode: str) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    def make(model):
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return Regularized(sgd, l1=1e-3, l2=1e-2, group_lasso=1e-3, group_dim=0, mode=mode, backend=backend)

    return make


def _fused_adamw(backend: str) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    """fastreg.AdamW with a learning rate on the device and ``capturable``: its fused step reads
    nothing on the host."""
    def make(model):
        lr = torch.tensor(1e-3, device=next(model.parameters()).device)
        return AdamW(model.parameters(), lr=lr, capturable=True, l1=1e-3, group_lasso=1e-3, group_dim=0,
                     backend=backend)

    return make


def _graph_training_step(device: torch.device, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> float:
    """A whole training step of a small model (forward, backward, the optimizer's step)
    replayed on new batches, against a twin model stepped eagerly on the same batches."""
    x, y = torch.zeros(16, 32, device=device), torch.zeros(16, 8, device=device)
    generator = torch.Generator().manual_seed(0)

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device)
        return model, make_optimizer(model)

    def step(model, optimizer):
        optimizer.zero_grad(set_to_none=False)  # the graph's gradients keep their addresses
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def next_batch():
        x.copy_(torch.randn(x.shape, generator=generator))
        y.copy_(torch.randn(y.shape, generator=generator))

    graphed, eager = make(), make()

    def warm_up():
        next_batch()
        step(*graphed)
        step(*eager)  # the twin takes the warm-up steps too, so both start the replays alike

    graph, captured = _capture(lambda: step(*graphed), warm_up)
    errors = []
    for _ in range(GRAPH_STEPS):
        next_batch()
        graph.replay()
        replayed = [captured.clone()] + [p.detach().clone() for p in graphed[0].parameters()]
        eager_loss = step(*eager)
        errors.append(bench._max_error(replayed, [eager_loss] + [p.detach() for p in eager[0].parameters()]))
    return max(errors)


def worker_graphs(dry_run: bool, out: Path) -> Dict:
    device = _device(dry_run)
    limit = bench.tolerance(torch.float32)
    checks = []
    kinds = [("add_penalty_grad_", _graph_penalty_grad)] + [
        (f"Regularized(SGD) {mode} step",
         lambda backend, device, mode=mode: _graph_training_step(device, _regularized_sgd(backend, mode)))
        for mode in ("coupled", "decoupled")
    ] + [("fastreg.AdamW(capturable) step", lambda backend, device: _graph_training_step(device, _fused_adamw(backend)))]
    for backend in GPU_BACKENDS:
        reason = BACKENDS[backend].unavailable_reason(device, torch.float32)
        for kind, measure in kinds:
            entry: Dict = {"name": f"{kind} [{backend}]"}
            if reason is not None:
                entry.update(status="skipped", reason=f"{backend} backend unavailable: {reason}")
            else:
                try:
                    error = measure(backend, device)
                    entry.update(status="passed" if error <= limit else "failed", error=error)
                    if error > limit:
                        entry["reason"] = f"replay differs from eager: max relative error {error:.3g} > {limit:g}"
                except Exception as exc:  # a capture that fails (a host sync, a host copy) is this check's finding
                    entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
            print(entry)
            checks.append(entry)
    ran = [c["status"] for c in checks if c["status"] != "skipped"]
    return {"status": _worst(ran) if ran else "skipped", "checks": checks}


def worker_bench(dry_run: bool, out: Path) -> Dict:
    """:func:`fastreg.bench.run` on each workload; the document is rewritten after every run,
    so that a step killed at its limit keeps the runs it finished."""
    device = _device(dry_run)
    setting = bench.Setting()
    min_time = DRY_RUN_BENCH_SECONDS if dry_run else GPU_BENCH_SECONDS
    backends = ["reference", *DRY_RUN_BACKENDS] if dry_run else None
    runs, errors = [], []
    for name, size, tasks in DRY_RUN_BENCH if dry_run else GPU_BENCH:
        workload = workloads.WORKLOADS[name](size, workloads.DEFAULT_DTYPES[name], device)
        # On a host workload the kernels cost nothing: a bandwidth would be noise.
        copy = None if workload.host else bench.copy_bandwidth(workload.bytes, device, min_time)
        for task_name, compile in tasks.items():
            task = bench.TASKS[task_name]
            try:
                results = bench.run(task, workload, setting, compile=compile, backends=backends, min_run_time=min_time)
            except Exception as exc:  # a fastreg backend that disagrees with the reference: the next runs still count
                traceback.print_exc()
                errors.append(f"{name} {task_name}: {type(exc).__name__}: {exc}".splitlines()[0])
                continue
            record = report.run_record(workload, size, task, results)
            record["copy_gb_per_s"] = copy
            for r in record["results"]:
                r["pct_of_copy"] = None if copy is None or r["gb_per_s"] is None else 100 * r["gb_per_s"] / copy
            runs.append(record)
            print(f"\n{report.title(record)}\n{report.table(record)}\n{bench_line(record)}", flush=True)
            document = report.document(bench.environment(device), dataclasses.asdict(setting), runs)
            (out / BENCH_NAME).write_text(json.dumps(document, indent=2) + "\n")
        del workload
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": "failed" if errors else "passed", "runs": len(runs), "errors": errors}


WORKERS: Dict[str, Callable[[bool, Path], Dict]] = {
    "sanitizer-case": worker_sanitizer_case,
    "graphs": worker_graphs,
    "bench": worker_bench,
}


def run_worker(name: str, dry_run: bool, out: Path, result: Path) -> int:
    record = WORKERS[name](dry_run, out)
    result.write_text(json.dumps(record))
    return 1 if record["status"] == "failed" else 0
