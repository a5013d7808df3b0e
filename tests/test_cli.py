"""python -m fastreg: info, bench and report, end to end on tiny sizes."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from fastreg import bench
from fastreg.bench import TASKS
from fastreg.workloads import WORKLOADS
from fastreg.backends import BACKENDS
from fastreg.__main__ import _names, main

TINY = ["--size", "0.0005", "--min-time", "0.005", "--quiet"]


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^torch +{re.escape(torch.__version__)}$", out, re.MULTILINE)
    for name, backend in BACKENDS.items():
        reason = backend.unavailable_reason(torch.device("cpu"), torch.float32)
        row = rf"^{name} +cpu +usable *$" if reason is None else rf"^{name} +cpu +no +{re.escape(reason[:40])}"
        assert re.search(row, out, re.MULTILINE), (name, reason)


def test_build_builds_the_cpu_extension(capsys):
    assert main(["build"]) == 0
    assert re.search(r"^fastreg_cpu +built$", capsys.readouterr().out, re.MULTILINE)


def test_bench_prints_the_comparison_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--no-compile", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for name in ("floor", "naive autograd loop", "no-grad loop", "torch._foreach_*", "fastreg[torch]"):
        assert name in out
    assert "torch.compile peers switched off" in out
    record = json.loads(path.read_text())
    assert record["schema"] == "fastreg-bench/1"
    assert record["environment"]["torch"] and record["environment"]["threads"] >= 1
    (run,) = record["runs"]
    assert run["workload"]["name"] == "gpt2-small" and run["workload"]["tensors"] == 148
    assert run["task"]["name"] == "grad"
    by_name = {r["name"]: r for r in run["results"]}
    assert by_name["fastreg[reference]"]["value_error"] == 0.0 == by_name["fastreg[reference]"]["tensor_error"]
    limit = bench.tolerance(torch.float32)
    assert 0 <= by_name["fastreg[torch]"]["value_error"] <= limit and by_name["fastreg[torch]"]["tensor_error"] <= limit
    assert by_name["naive autograd loop"]["speedup_vs_naive"] == 1.0
    assert by_name["floor: foreach add (alpha=0)"]["x_floor"] == 1.0


def test_all_names_every_workload_and_task():
    assert _names(["all"], list(WORKLOADS), "--workload") == list(WORKLOADS)
    assert _names(["grad", "all"], list(TASKS), "--task") == list(TASKS)
    assert _names(["norms", "grad", "norms"], list(TASKS), "--task") == ["norms", "grad"]


def test_bench_every_kind_of_workload_and_every_task_then_report(tmp_path, capsys):
    # One workload of each kind: a model with no module (gpt2-small), bf16 (llama-1b), a model
    # with a module (transformer) and a host-cost one (tiny-1k). The 10,000-tensor workloads run
    # in the benchmark smoke test (benchmarks/): their peer loops take a minute here.
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    args = ["bench", *TINY, "--no-compile", "--workload", "gpt2-small", "llama-1b", "transformer", "tiny-1k",
            "--task", "all", "--backends", "torch"]
    assert main([*args, "--json", str(first), "--plot", str(tmp_path / "bars.png")]) == 0
    record = json.loads(first.read_text())
    pairs = {(r["workload"]["name"], r["task"]["name"]) for r in record["runs"]}
    assert ("llama-1b", "decay") in pairs and ("transformer", "step") in pairs
    assert ("gpt2-small", "step") not in pairs  # the step task needs a model, or a host workload
    assert {task for workload, task in pairs if workload == "tiny-1k"} == set(TASKS)
    for run in record["runs"]:
        names = [r["name"] for r in run["results"]]
        if run["workload"]["host"]:  # host cost: every task against _foreach_add_, first calls beside cached ones
            assert run["task"]["floor"] == "floor: foreach add (alpha=0)" and run["workload"]["tensors"] == 1000
            torch_case = {"step": "fastreg[torch] Regularized(SGD)", "adamw": "fastreg[torch] Regularized(AdamW(fused))"}
            assert torch_case.get(run["task"]["name"], "fastreg[torch]") in names
            cached = [r["name"] for r in run["results"]
                      if r["name"].startswith("fastreg") and not r["name"].endswith(" first call") and not r["note"]]
            twins = [n for n in names if n.endswith(" first call")]
            assert twins == ([] if run["task"]["name"] == "adamw" else [f"{n} first call" for n in cached])
        assert next(r for r in run["results"] if r["name"] == run["task"]["floor"])["x_floor"] == 1.0
    assert {r["workload"]["dtype"] for r in record["runs"] if r["workload"]["name"] == "llama-1b"} == {"bfloat16"}
    assert (tmp_path / "bars.png").stat().st_size > 10_000
    assert main(["bench", *TINY, "--no-compile", "--backends", "torch", "--json", str(second)]) == 0
    markdown = tmp_path / "report.md"
    assert main(["report", str(first), str(second), "--markdown", str(markdown), "--plot", str(tmp_path / "report.png")]) == 0
    text = markdown.read_text()
    assert "[1] ms" in text and "[2] x floor" in text and "| fastreg[torch]" in text
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_bench_scaling_with_tensor_count(tmp_path):
    path = tmp_path / "scaling.json"
    assert main(["bench", "--scaling", "tensors", "--size", "0.01", "--min-time", "0.005", "--quiet", "--no-compile", "--backends", "torch",
                 "--json", str(path), "--plot", str(tmp_path / "scaling.png")]) == 0
    record = json.loads(path.read_text())
    assert record["scaling"] == "tensors"
    assert [r["workload"]["tensors"] for r in record["runs"]] == [10, 100, 1000, 10_000]
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_bench_and_report_reject_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="--backends: unknown nope"):
        main(["bench", *TINY, "--backends", "nope"])
    with pytest.raises(SystemExit, match="--workload: unknown gpt5"):
        main(["bench", *TINY, "--workload", "gpt5"])
    not_a_record = tmp_path / "x.json"
    not_a_record.write_text("{}")
    with pytest.raises(ValueError, match="not a fastreg benchmark record"):
        main(["report", str(not_a_record)])


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastreg", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out and "bench" in out and "report" in out


@pytest.mark.slow
def test_bench_with_torch_compile_peer(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--backends", "torch", "--json", str(path)]) == 0
    (run,) = json.loads(path.read_text())["runs"]
    compiled = {r["name"]: r for r in run["results"]}["torch.compile(no-grad loop)"]
    assert compiled["median_ms"] is not None, compiled["note"]
    assert compiled["tensor_error"] < 1e-5


@pytest.mark.parametrize("first", ["fastreg", "torch"])
def test_no_numpy_warning_when_fastreg_imports_torch(first):
    """In a fresh venv without NumPy, torch warns at import; fastreg keeps that out of its own
    commands' output. Importing torch first shows the warning, so the check can fail."""
    code = f"import sys; sys.modules['numpy'] = None; import {first}; import fastreg"
    stderr = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert ("Failed to initialize NumPy" in stderr) == (first == "torch"), stderr
