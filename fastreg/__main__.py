"""fastreg's command line: ``python -m fastreg {info,bench,report}``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional, Sequence

import torch
from tabulate import tabulate
from tqdm import tqdm

from . import __version__, bench, report, workloads
from .backends import BACKENDS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _devices() -> List[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def cmd_info(args: argparse.Namespace) -> int:
    env = bench.environment(torch.device("cpu"))
    print(f"fastreg {__version__}")
    print(
        tabulate(
            [
                ["torch", env["torch"]],
                ["triton", env["triton"] or "not installed"],
                ["CUDA (torch build)", env["cuda"] or "none (CPU-only build)"],
                ["python", env["python"]],
                ["CPU", f"{env['cpu']} ({env['threads']} threads)"],
            ]
            + [[f"GPU {i}", torch.cuda.get_device_name(i)] for i in range(torch.cuda.device_count())],
            tablefmt="plain",
        )
    )
    rows = []
    for name, backend in BACKENDS.items():
        for device in _devices():
            reason = backend.unavailable_reason(device, torch.float32)
            rows.append([name, str(device), "usable" if reason is None else "no", reason or ""])
    print()
    print(tabulate(rows, headers=["backend", "device", "status", "why not"]))
    return 0


def _names(values: Sequence[str], choices: Sequence[str], option: str) -> List[str]:
    names = list(choices) if "all" in values else list(dict.fromkeys(values))
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise SystemExit(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(choices)} or all")
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = _names(args.backends.split(","), list(BACKENDS), "--backends") if args.backends else None
    setting = bench.Setting(l1=args.l1, l2=args.l2, lr=args.lr)
    if args.scaling:
        dtype = DTYPES[args.dtype or "fp32"]
        series = [(size, build()) for size, build in workloads.scaling_series(args.scaling, dtype, device, args.seed, args.max_params)]
        task_names = ["grad"]
    else:
        task_names = _names(args.task, list(bench.TASKS), "--task")
        series = []
        for name in _names(args.workload, list(workloads.WORKLOADS), "--workload"):
            dtype = DTYPES[args.dtype] if args.dtype else workloads.DEFAULT_DTYPES[name]
            series.append((args.size, workloads.WORKLOADS[name](args.size, dtype, device, seed=args.seed)))
    env = bench.environment(device)
    print(f"{env['device']}, {env['threads']} threads, torch {env['torch']} | l1={args.l1:g}, l2={args.l2:g}, lr={args.lr:g}")
    plan = []
    for size, workload in series:
        for task_name in task_names:
            task = bench.TASKS[task_name]
            reason = task.applies_to(workload)
            if reason is None:
                plan.append((size, workload, task))
            else:
                print(f"skipping {task.name} on {workload.name}: {reason}")
    total = sum(len(bench.make_cases(task, workload, setting, compile=False, backends=backends)) for _, workload, task in plan)
    runs = []
    with tqdm(total=total, unit="case", file=sys.stderr, disable=True if args.quiet else None) as progress:

        def advance(name: str) -> None:
            progress.set_description(name[:40])
            progress.update()

        for size, workload, task in plan:
            results = bench.run(
                task, workload, setting, compile=not args.no_compile, backends=backends, min_run_time=args.min_time, progress=advance
            )
            record = report.run_record(workload, size, task, results)
            runs.append(record)
            progress.write(f"\n{report.title(record)}\n{report.table(record)}")
    print("errors: relative to the torch reference backend; GB/s counts the bytes a single pass must move")
    document = report.document(env, dataclasses.asdict(setting), runs, scaling=args.scaling)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot([document], args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    records = [report.load(path) for path in args.files]
    text = report.markdown(records)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.markdown}")
    else:
        print(text)
    if args.plot:
        report.plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m fastreg", description="Fused weight regularization for PyTorch.")
    top.add_argument("--version", action="version", version=f"fastreg {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, devices, and which backends are usable here (and why not)")
    info.set_defaults(func=cmd_info)

    b = sub.add_parser(
        "bench",
        help="fastreg vs the naive loop, foreach, torch.compile and the bandwidth floor",
        description="Every implementation of a task is checked against the torch reference backend, then timed "
        "in the same run; ratios (x floor, speedup vs naive) are within that run. Run it on an otherwise idle "
        "machine: CPU threads stall when another process holds a core.",
    )
    b.add_argument("--workload", nargs="+", default=["gpt2-small"], metavar="NAME",
                   help=f"one or more of {', '.join(workloads.WORKLOADS)}, or all (default gpt2-small)")
    b.add_argument("--task", nargs="+", default=["grad"], metavar="NAME",
                   help=f"one or more of {', '.join(bench.TASKS)}, or all (default grad: coupled value + grad)")
    b.add_argument("--size", type=float, default=1.0, help="scale of the workload, 1 = the real model (default 1)")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="parameter dtype (default: the workload's, e.g. bf16 for llama-1b)")
    b.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    b.add_argument("--l1", type=float, default=1e-5)
    b.add_argument("--l2", type=float, default=1e-4)
    b.add_argument("--lr", type=float, default=1e-3, help="step size of the decay task")
    b.add_argument("--backends", help=f"comma-separated fastreg backends (default: all of {', '.join(BACKENDS)})")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers (each compile takes a while)")
    b.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per implementation (default 1)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--scaling", choices=["params", "tensors"],
                   help="instead of --workload/--task: coupled value + grad vs total parameters (GPT-2 shapes, 1M up "
                   "to --max-params) or vs tensor count (10 to 10,000 tensors, 4M elements in all)")
    b.add_argument("--max-params", type=float, default=124.4e6, help="largest workload of --scaling params (default 124.4e6)")
    b.add_argument("--json", metavar="PATH", help="also write the results, with device and versions, as JSON")
    b.add_argument("--plot", metavar="PATH", help='also draw them to a PNG (needs matplotlib: pip install "fastreg[plot]")')
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", help="tables and plots from saved bench JSON files, to compare machines or commits")
    r.add_argument("files", nargs="+", metavar="JSON")
    r.add_argument("--markdown", metavar="PATH", help="write the markdown there instead of printing it")
    r.add_argument("--plot", metavar="PATH", help="also draw the results to a PNG")
    r.set_defaults(func=cmd_report)
    return top


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
