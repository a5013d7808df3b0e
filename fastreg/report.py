"""Benchmark records: the JSON ``python -m fastreg bench`` writes, and the tables and plots
made from one or several of them (``python -m fastreg report``) to compare machines and
commits."""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

from .bench import Result, Task
from .workloads import Workload

SCHEMA = "fastreg-bench/1"
HEADERS = ["implementation", "time (ms)", "GB/s", "x floor", "speedup vs naive", "value err", "tensor err", "note"]


def run_record(workload: Workload, size: float, task: Task, results: List[Result]) -> Dict:
    return {
        "workload": {
            "name": workload.name,
            "size": size,
            "dtype": str(workload.params[0].dtype).replace("torch.", ""),
            "tensors": len(workload.params),
            "params": workload.numel,
            "bytes": workload.bytes,
            "host": workload.host,
        },
        "task": {"name": task.name, "title": task.title, "floor": task.floor_for(workload), "naive": task.naive},
        "results": [dataclasses.asdict(r) for r in results],
    }


def document(environment: Dict, setting: Dict, runs: List[Dict], scaling: Optional[str] = None) -> Dict:
    return {"schema": SCHEMA, "environment": environment, "setting": setting, "scaling": scaling, "runs": runs}


def load(path: str) -> Dict:
    with open(path) as f:
        record = json.load(f)
    if record.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a fastreg benchmark record (schema {record.get('schema')!r}, expected {SCHEMA!r})")
    return record


def format_optional(value: Optional[float], spec: str, missing: str = "") -> str:
    """A table cell: ``value`` formatted with ``spec``, or ``missing`` where there is no value."""
    return missing if value is None else format(value, spec)


def title(run: Dict) -> str:
    w = run["workload"]
    return f"{w['name']}: {w['tensors']} tensors, {w['params'] / 1e6:.1f}M params, {w['dtype']} | {run['task']['title']}"


def table(run: Dict, tablefmt: str = "simple") -> str:
    rows = [
        [
            r["name"],
            format_optional(r["median_ms"], ".3g"),
            format_optional(r["gb_per_s"], ".1f"),
            format_optional(r["x_floor"], ".2f"),
            format_optional(r["speedup_vs_naive"], ".1f"),
            format_optional(r["value_error"], ".1e"),
            format_optional(r["tensor_error"], ".1e"),
            r["note"],
        ]
        for r in run["results"]
    ]
    return tabulate(rows, headers=HEADERS, tablefmt=tablefmt, disable_numparse=True)


def machine(record: Dict) -> str:
    env = record["environment"]
    commit = (env.get("commit") or "unknown")[:8]
    return f"{env['device']}, {env['threads']} threads, torch {env['torch']}, commit {commit}"


def markdown(records: Sequence[Dict]) -> str:
    """One section per (workload, task), one column pair (time, x floor) per record."""
    sections: Dict[str, Dict[str, Dict[int, Dict]]] = {}
    for index, record in enumerate(records):
        for run in record["runs"]:
            rows = sections.setdefault(title(run), {})
            for r in run["results"]:
                rows.setdefault(r["name"], {})[index] = r
    lines = ["Machines:", ""] + [f"{i + 1}. {machine(record)}" for i, record in enumerate(records)] + [""]
    for heading, rows in sections.items():
        headers = ["implementation"] + [h for i in range(len(records)) for h in (f"[{i + 1}] ms", f"[{i + 1}] x floor")]
        body = []
        for name, by_record in rows.items():
            row = [name]
            for i in range(len(records)):
                r = by_record.get(i)
                row += [format_optional(r and r["median_ms"], ".3g"), format_optional(r and r["x_floor"], ".2f")]
            body.append(row)
        lines += [f"### {heading}", "", tabulate(body, headers=headers, tablefmt="github", disable_numparse=True), ""]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('plots need matplotlib: pip install "fastreg[plot]"') from None
    return plt


def plot(records: Sequence[Dict], path: str) -> None:
    """Bars per implementation for each (workload, task); log-log curves for scaling runs."""
    plt = _pyplot()
    panels = [(record, run) for record in records if not record.get("scaling") for run in record["runs"]]
    scaling = [record for record in records if record.get("scaling")]
    count = len(panels) + len(scaling)
    if count == 0:
        raise ValueError("no benchmark runs to plot")
    fig, axes = plt.subplots(count, 1, figsize=(9, 3.2 * count), squeeze=False)
    axes = iter(axes[:, 0])
    for record, run in panels:
        _bars(next(axes), record, run)
    for record in scaling:
        _curves(next(axes), record)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, record: Dict, run: Dict) -> None:
    timed = [r for r in run["results"] if r["median_ms"] is not None]
    names = [r["name"] for r in timed]
    colors = ["tab:orange" if n.startswith("fastreg") else ("tab:gray" if n == run["task"]["floor"] else "tab:blue") for n in names]
    ax.barh(names, [r["median_ms"] for r in timed], color=colors)
    ax.set_xscale("log")
    ax.set_xlim(left=min(r["median_ms"] for r in timed) / 3)  # so the fastest bar has a visible length
    ax.invert_yaxis()
    ax.set_xlabel("time per call (ms, log scale; lower is better)")
    ax.set_title(f"{title(run)}\n{machine(record)}", fontsize=9)
    for y, r in enumerate(timed):
        ax.annotate(f" {r['median_ms']:.3g} ms", (r["median_ms"], y), va="center", fontsize=7)


def _curves(ax, record: Dict) -> None:
    axis = record["scaling"]
    curves: Dict[str, List] = {}
    for run in record["runs"]:
        x = run["workload"]["params" if axis == "params" else "tensors"]
        for r in run["results"]:
            if r["median_ms"] is not None:
                curves.setdefault(r["name"], []).append((x, r["median_ms"]))
    for name, points in curves.items():
        points.sort()
        style = "-o" if name.startswith("fastreg") else "--."
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total parameters" if axis == "params" else "tensor count (fixed total size)")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(f"{record['runs'][0]['task']['title']}: scaling with {axis}\n{machine(record)}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
