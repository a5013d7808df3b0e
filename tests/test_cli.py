"""python -m fastreg: info and bench, end to end on tiny sizes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastreg.__main__ import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backend" in out
    assert "torch      cpu       usable" in out


def test_bench_prints_the_comparison_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--size", "0.0005", "--no-compile", "--min-time", "0.01", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for name in ("floor", "naive autograd loop", "no-grad loop", "torch._foreach_*", "fastreg[torch]"):
        assert name in out
    assert "skipped with --no-compile" in out
    record = json.loads(path.read_text())
    assert record["workload"]["tensors"] == 148
    assert record["environment"]["torch"] and record["environment"]["threads"] >= 1
    by_name = {r["name"]: r for r in record["results"]}
    assert by_name["fastreg[torch]"]["value_error"] == 0.0
    assert by_name["naive autograd loop"]["speedup_vs_naive"] == 1.0
    assert by_name["floor (foreach add, alpha=0)"]["x_floor"] == 1.0


def test_bench_rejects_unknown_backend():
    with pytest.raises(SystemExit, match="--backends: unknown nope"):
        main(["bench", "--size", "0.0005", "--backends", "nope"])


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastreg", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out and "bench" in out


@pytest.mark.slow
def test_bench_with_torch_compile_peer(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["bench", "--size", "0.0005", "--min-time", "0.01", "--json", str(path)]) == 0
    by_name = {r["name"]: r for r in json.loads(path.read_text())["results"]}
    compiled = by_name["torch.compile(no-grad loop)"]
    assert compiled["median_ms"] is not None, compiled["note"]
    assert compiled["grad_error"] < 1e-5
