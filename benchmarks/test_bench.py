"""The pytest-benchmark suite: every case of every task on every workload, one harness.

    pytest benchmarks/                          # time every case (groups: workload/task)
    FASTREG_BENCH_SIZE=1 pytest benchmarks/     # at the real models' sizes
    FASTREG_BENCH_COMPILE=1 pytest benchmarks/  # with the torch.compile peers (slow to compile)
    pytest benchmarks/ --benchmark-disable      # smoke test: check and run each case once (CI)

Each case is checked against the reference backend before it is timed: a fastreg
backend that disagrees fails; a peer's error is recorded in the benchmark's extra info.
``python -m fastreg bench`` prints the same comparison as a table with ratios.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from fastreg import bench, workloads

SIZE = float(os.environ.get("FASTREG_BENCH_SIZE", "0.002"))
COMPILE = os.environ.get("FASTREG_BENCH_COMPILE") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETTING = bench.Setting()


@functools.lru_cache(maxsize=1)  # one workload alive at a time: full-size ones are large
def workload(name: str) -> workloads.Workload:
    return workloads.WORKLOADS[name](SIZE, workloads.DEFAULT_DTYPES[name], DEVICE)


@functools.lru_cache(maxsize=None)
def expected(workload_name: str, task_name: str):
    task, w = bench.TASKS[task_name], workload(workload_name)
    start = task.snapshot(w)
    return start, bench.reference(task, w, SETTING, start)


def _parameters():
    """(workload, task, case) triples; case names do not depend on the size, so a tiny
    instance of each workload names them."""
    triples = []
    for workload_name, build in workloads.WORKLOADS.items():
        tiny = build(1e-4, workloads.DEFAULT_DTYPES[workload_name], "cpu")
        for task_name, task in bench.TASKS.items():
            if task.applies_to(tiny) is None:
                for case in bench.make_cases(task, tiny, SETTING, compile=False):
                    triples.append(pytest.param(workload_name, task_name, case.name, id=f"{workload_name}/{task_name}/{case.name}"))
    return triples


@pytest.mark.parametrize("workload_name, task_name, case_name", _parameters())
def test_case(benchmark, workload_name, task_name, case_name):
    task, w = bench.TASKS[task_name], workload(workload_name)
    case = {c.name: c for c in bench.make_cases(task, w, SETTING, compile=COMPILE)}[case_name]
    if case.skip_reason is not None:
        pytest.skip(case.skip_reason)
    start, want = expected(workload_name, task_name)
    if case.checked:
        value_error, tensor_error = bench.check(task, w, case, want, start)
        errors = [e for e in (value_error, tensor_error) if e is not None]
        benchmark.extra_info.update(value_error=value_error, tensor_error=tensor_error)
        if case.name.startswith("fastreg"):
            assert max(errors) <= bench.tolerance(w.params[0].dtype)
    benchmark.group = f"{workload_name}/{task_name}"
    benchmark.extra_info.update(tensors=len(w.params), params=w.numel, bytes_per_call=task.traffic(w), device=str(DEVICE))
    run = case.run
    if DEVICE.type == "cuda":
        def run():  # host timers around asynchronous work would time the launch, not the kernel
            case.run()
            torch.cuda.synchronize()
    benchmark(run)
