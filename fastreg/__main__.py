"""fastreg's command line: ``python -m fastreg {info,bench}``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

import torch
from tabulate import tabulate

from . import __version__, bench
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


def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def cmd_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = None
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise SystemExit(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    dtype = DTYPES[args.dtype]
    params = bench.gpt2_small(args.size, dtype, device, seed=args.seed)
    n_params = sum(p.numel() for p in params)
    env = bench.environment(device)
    print(
        f"GPT-2-small shapes: {len(params)} tensors, {n_params / 1e6:.1f}M params, {args.dtype}, each with a grad | "
        f"coupled ElasticNet value + grad (l1={args.l1:g}, l2={args.l2:g}) | {env['device']}, {env['threads']} threads, "
        f"torch {env['torch']}",
        flush=True,
    )

    def progress(name: str) -> None:
        print(f"  checking and timing {name} ...", file=sys.stderr, flush=True)

    results = bench.run(
        params, args.l1, args.l2, compile=not args.no_compile, backends=backends, min_run_time=args.min_time, progress=progress
    )
    rows = [
        [
            r.name,
            _fmt(r.median_ms, ".2f"),
            _fmt(r.gb_per_s, ".1f"),
            _fmt(r.x_floor, ".2f"),
            _fmt(r.speedup_vs_naive, ".1f"),
            _fmt(r.value_error, ".1e"),
            _fmt(r.grad_error, ".1e"),
            r.note,
        ]
        for r in results
    ]
    headers = ["implementation", "time (ms)", "GB/s", "x floor", "speedup vs naive", "value err", "grad err", "note"]
    print(tabulate(rows, headers=headers, disable_numparse=True))
    print(
        "errors: relative to the torch reference backend (Tensor.sum accumulation); GB/s counts w and g read, g written once",
    )
    if args.json:
        record = {
            "schema": "fastreg-bench/1",
            "environment": env,
            "workload": {"name": "gpt2-small", "size": args.size, "tensors": len(params), "params": n_params, "dtype": args.dtype},
            "task": {"name": "coupled value+grad", "l1": args.l1, "l2": args.l2},
            "results": [dataclasses.asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.json}")
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
        description="Coupled ElasticNet value + grad on GPT-2-small parameter shapes: every implementation is "
        "checked against the torch reference, then timed in the same run.",
    )
    b.add_argument("--size", type=float, default=1.0, help="fraction of GPT-2 small's 124.4M parameters, in (0, 1] (default 1)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    b.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    b.add_argument("--l1", type=float, default=1e-5)
    b.add_argument("--l2", type=float, default=1e-4)
    b.add_argument("--backends", help=f"comma-separated fastreg backends (default: all of {', '.join(BACKENDS)})")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (its compile takes a while)")
    b.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per implementation (default 1)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", metavar="PATH", help="also write the results, with device and versions, as JSON")
    b.set_defaults(func=cmd_bench)
    return top


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
