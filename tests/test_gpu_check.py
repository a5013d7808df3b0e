"""python -m fastreg gpu-check: its dry run on CPU end to end (the folder and its JSON), the
clear failure without a GPU, and the limits that keep it from hanging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastreg import bench, gpu_check, report, workloads
from fastreg.__main__ import main


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    code = main(["gpu-check", "--dry-run", "--out", str(out)])
    return code, out, json.loads((out / gpu_check.SUMMARY_NAME).read_text())


def test_dry_run_passes_and_writes_one_folder(dry_run):
    code, out, summary = dry_run
    assert code == 0 and summary["status"] == "passed"
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "gpu-check.json", "gpu-check.log", "junit-conformance.xml"]
    assert summary["schema"] == gpu_check.SCHEMA and summary["dry_run"] is True
    env = summary["environment"]
    assert env["torch"] == __import__("torch").__version__ and env["device_type"] == "cpu"
    assert len(env["commit"]) == 40 and "nvcc" in env and "compute_sanitizer" in env
    assert [s["name"] for s in summary["steps"]] == list(gpu_check.STEP_NAMES)
    assert summary["elapsed_s"] < summary["budget_s"]
    for step in summary["steps"]:
        assert step["seconds"] <= step["limit_s"]
    log = (out / gpu_check.LOG_NAME).read_text()
    for name in gpu_check.STEP_NAMES:
        assert f"== {name} (limit" in log and f"\n{name}: " in log
    assert "-m pytest tests/test_conformance.py" in log  # the children's output lands in the one log


def test_dry_run_steps(dry_run):
    _, out, summary = dry_run
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["build"]["status"] == "passed" and steps["build"]["extensions"]["fastreg_cpu"] == "built"
    tests = steps["tests"]
    (suite,) = tests["suites"]
    assert tests["status"] == "passed" and tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    assert {k: suite[k] for k in ("passed", "failed", "errors", "skipped")} == gpu_check.junit_counts(out / suite["junit"])
    sanitizer = steps["sanitizer"]
    assert sanitizer["status"] == "passed" and set(sanitizer["case"]["ran"]) == {"cpp float32", "cpp bfloat16", "torch float32", "torch bfloat16"}
    for tool in gpu_check.SANITIZER_TOOLS:
        assert sanitizer["tools"][tool] == {"status": "skipped", "reason": gpu_check.NO_GPU_IN_DRY_RUN}
    assert steps["graphs"] == {**steps["graphs"], "status": "skipped", "reason": gpu_check.NO_GPU_IN_DRY_RUN}


def test_dry_run_bench_is_a_report_document_held_to_the_copy(dry_run):
    _, out, summary = dry_run
    document = report.load(str(out / gpu_check.BENCH_NAME))
    assert summary["bench"] == document
    assert [(r["workload"]["name"], r["task"]["name"]) for r in document["runs"]] == [
        (name, task) for name, _, tasks in gpu_check.DRY_RUN_BENCH for task in tasks
    ]
    for run in document["runs"]:
        timed = [r for r in run["results"] if r["median_ms"] is not None]
        assert any(r["name"] == "fastreg[cpp]" for r in timed)
        if run["workload"]["host"]:
            assert run["copy_gb_per_s"] is None and all(r["pct_of_copy"] is None for r in run["results"])
        else:
            assert run["copy_gb_per_s"] > 0
            for r in timed:
                assert r["pct_of_copy"] == pytest.approx(100 * r["gb_per_s"] / run["copy_gb_per_s"])
    assert [line.split(":")[0] for line in next(s for s in summary["steps"] if s["name"] == "bench")["runs"]] == [
        f"{r['workload']['name']} {r['workload']['dtype']} {r['task']['name']}" + (" (host cost)" if r["workload"]["host"] else "")
        for r in document["runs"]
    ]


def test_without_a_gpu_it_fails_at_once_in_one_line(tmp_path):
    out = tmp_path / "never"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(gpu_check.ROOT))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fastreg", "gpu-check", "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60
    assert done.returncode == 2 and done.stdout == ""
    # torch itself may log a line at import (a CUDA build without a CUDA runtime says so).
    (line,) = [line for line in done.stderr.splitlines() if "gpu-check" in line]
    assert line.startswith("python -m fastreg gpu-check: no CUDA GPU: ") and "--dry-run" in line
    assert not out.exists()


def test_a_spent_budget_runs_no_step_and_is_not_a_pass(tmp_path, capsys):
    assert main(["gpu-check", "--dry-run", "--budget", "5", "--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / gpu_check.SUMMARY_NAME).read_text())
    assert summary["status"] == "incomplete"
    assert {s["status"] for s in summary["steps"]} == {"not run"}
    assert summary["steps"][0]["reason"] == "the overall budget of 5 s was spent"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped; it waits to be reaped


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_command_past_its_limit_is_killed_with_its_children(tmp_path):
    check = gpu_check.Check(tmp_path, dry_run=True, budget=60)
    parent = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print(c.pid, flush=True); time.sleep(60)"
    try:
        started = time.monotonic()
        code, output = check.command([sys.executable, "-c", parent], time.monotonic() + 3)
        assert code is None and time.monotonic() - started < 15
    finally:
        check.close()
    child = int(output.split()[0])
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert "killed after its limit of 3 s" in (tmp_path / gpu_check.LOG_NAME).read_text()


def test_the_gpu_plan_names_real_tests_workloads_and_tasks():
    for _, args in gpu_check.GPU_TESTS:
        assert (gpu_check.ROOT / args[0].split("::")[0]).is_file()
    for name, size, tasks in gpu_check.GPU_BENCH:
        assert name in workloads.WORKLOADS and size > 0 and set(tasks) <= set(bench.TASKS)


@pytest.mark.parametrize(
    "output, errors",
    [
        ("========= COMPUTE-SANITIZER\nran cuda float32\n========= ERROR SUMMARY: 0 errors\n", 0),
        ("========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 3 errors\n", 3),
        ("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n", 1),
        ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", 0),
    ],
)
def test_sanitizer_summaries_are_read(output, errors):
    found = gpu_check._SANITIZER_SUMMARY.search(output)
    assert int(found.group(1) or found.group(2)) == errors
