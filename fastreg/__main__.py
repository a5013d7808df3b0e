"""fastreg's command line: ``python -m fastreg {info,build,bench,report,gpu-check,compare,sweep}``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from typing import List, Optional, Sequence

import torch
from tabulate import tabulate
from tqdm import tqdm

from . import __version__, bench, gpu_check, report, workloads
from .backends import BACKENDS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _devices() -> List[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _build_problems(devices: Sequence[torch.device], backends: Optional[Sequence[str]] = None) -> List[str]:
    """For each C++ extension the run needs that failed to build (building it now if needed):
    what failed, what fastreg uses instead and how to fix it. Nothing for one that is built, or
    skipped on this machine (no CUDA)."""
    from . import _build
    from .backends import auto_backend

    lines = []
    with warnings.catch_warnings():
        # Said here in full, as the extension's own warning would say it again.
        warnings.filterwarnings("ignore", message=r"fastreg: \S+ is unavailable", category=RuntimeWarning)
        for backend, extension, device_type in (("cpp", _build.CPU, "cpu"), ("cuda", _build.CUDA, "cuda")):
            device = next((d for d in devices if d.type == device_type), None)
            if device is None or (backends is not None and backend not in backends):
                continue
            reason = extension.ensure()
            if reason is None or extension.fix is None:
                continue
            lines += [
                f"{extension.name} is unavailable: {reason}",
                f"  instead: fastreg uses the {auto_backend(device, torch.float32).name} backend on {device_type}",
                f"  to fix: {extension.fix}",
            ]
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    problems = _build_problems(_devices())
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
    if problems:
        print()
        print("\n".join(problems))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from . import _build

    results = _build.build_all(verbose=args.verbose)
    print(tabulate([[name, status] for name, status in results.items()], headers=["extension", "status"]))
    # An extension that cannot be built on this machine (CUDA on a CPU-only one) is skipped, not failed.
    return 1 if _build.failures(results) else 0


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
        series = [(size, build()) for size, build in workloads.scaling_series(args.scaling, dtype, device, args.seed, args.max_params, args.size)]
        task_names = ["grad"]
    else:
        task_names = _names(args.task, list(bench.TASKS), "--task")
        series = []
        for name in _names(args.workload, list(workloads.WORKLOADS), "--workload"):
            dtype = DTYPES[args.dtype] if args.dtype else workloads.DEFAULT_DTYPES[name]
            series.append((args.size, workloads.WORKLOADS[name](args.size, dtype, device, seed=args.seed)))
    env = bench.environment(device)
    print(f"{env['device']}, {env['threads']} threads, torch {env['torch']} | l1={args.l1:g}, l2={args.l2:g}, lr={args.lr:g}")
    for line in _build_problems([device], backends):
        print(line)
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
    print("errors: relative to the reference backend; GB/s counts the bytes a single pass must move")
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


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.worker:
        return gpu_check.run_worker(args.worker, args.dry_run, Path(args.out), Path(args.result))
    if not args.dry_run:
        reason = gpu_check.no_gpu_reason()
        if reason is not None:
            print(f"python -m fastreg gpu-check: {reason}", file=sys.stderr)
            return 2
    return gpu_check.run_check(Path(args.out) if args.out else gpu_check.default_out(), dry_run=args.dry_run, budget=args.budget, skip=args.skip)


# -- regularization studies: thin wrappers over fastreg.studies (the "study" extra) --------

STUDY_DATA_HELP = """\
--data: a data set that ships with scikit-learn (digits, iris, wine, breast_cancer) or
MODULE:FUNCTION, a function with no arguments that returns (X, y): X of shape
(n_samples, n_features), finite numbers; y of n_samples class labels. It is split into
stratified train/validation/test sets with --seed and standardized with the training
statistics.

--model: MODULE:FUNCTION, a function called as FUNCTION(in_features, n_classes) that
returns a torch.nn.Module mapping a float batch (N, in_features) to logits
(N, n_classes); settings with dropout call FUNCTION(in_features, n_classes, dropout=p).
The default is an MLP fc1 -> bn1 -> relu -> dropout -> fc2 (--hidden units).

--only PATTERN regularizes only the parameters it matches: a parameter name
(fc1.weight), a module prefix (fc1: fc1.weight and fc1.bias) or a glob (*.weight);
repeat it or give a comma list. Biases and norm layers stay unregularized unless
--no-decay says otherwise. MODULE must be importable (the current directory counts).
"""


def _comma_list(values: Optional[Sequence[str]]) -> List[str]:
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def _load_studies(args: argparse.Namespace):
    """fastreg.studies, once the optional packages this command will use are known to import."""
    from . import studies

    try:
        studies.require(plots=not args.no_plots, progress=not args.no_progress)
    except studies.MissingDependency as error:
        raise SystemExit(f"python -m fastreg {args.command}: {error}") from None
    return studies


def _study_inputs(studies, args: argparse.Namespace):
    """The training config, data and model function from the options both studies share."""
    import functools

    config = studies.TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        device=args.device,
        only=tuple(_comma_list(args.only)),
        no_decay=tuple(_comma_list([args.no_decay])),
        backend=args.backend,
        threads=args.threads,
    )
    data = studies.load_data(
        args.data, seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction, max_train=args.max_train
    )
    if args.model:
        if args.hidden is not None:
            raise ValueError("--hidden sets the built-in MLP's width; it does not apply to --model")
        model_fn = studies.load_entry_point(args.model, "--model")
    else:
        model_fn = functools.partial(studies.mlp, hidden=128 if args.hidden is None else args.hidden)
    return config, data, model_fn


def _run_folder(args: argparse.Namespace) -> str:
    import os
    import time

    return args.out or os.path.join("runs", f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")


def _finish(studies, args: argparse.Namespace, result) -> None:
    folder = _run_folder(args)
    files = studies.write_run(result, folder, plots=not args.no_plots)
    print(f"wrote {folder}: {', '.join(path.name for path in files)}")


def cmd_compare(args: argparse.Namespace) -> int:
    studies = _load_studies(args)
    try:
        config, data, model_fn = _study_inputs(studies, args)
        defaults = studies.default_settings(
            l1=args.l1,
            l2=args.l2,
            l1_decoupled=args.l1_decoupled,
            l2_decoupled=args.l2_decoupled,
            group_lasso=args.group_lasso,
            dropout=args.dropout,
        )
        by_name = {setting.name: setting for setting in defaults}
        names = _comma_list([args.settings]) if args.settings is not None else list(by_name)
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise ValueError(f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(by_name)}")
        settings = [by_name[name] for name in names] + [studies.StudySetting.parse(spec) for spec in args.setting or ()]
        if not settings:
            raise ValueError("--settings is empty and no --setting is given: nothing to compare")
        studies.check_study(settings, data, config, model_fn)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"python -m fastreg compare: {error}") from None
    result = studies.compare(settings, data, config, model_fn, progress=not args.no_progress)
    print(studies.summary_table(result))
    _finish(studies, args, result)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    studies = _load_studies(args)
    try:
        config, data, model_fn = _study_inputs(studies, args)
        if args.strengths:
            try:
                strengths = [float(s) for s in _comma_list([args.strengths])]
            except ValueError:
                raise ValueError(f"--strengths must be a comma list of numbers, got {args.strengths!r}") from None
        else:
            low, high = studies.DEFAULT_GRIDS[args.kind, args.mode]
            strengths = studies.log_grid(low if args.min is None else args.min, high if args.max is None else args.max, args.num)
        group_dim = 0 if args.group_dim == "rows" else None
        planned = [studies.sweep_setting(args.kind, s, args.mode, l1_ratio=args.l1_ratio, group_dim=group_dim) for s in strengths]
        studies.check_study(planned, data, config, model_fn)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"python -m fastreg sweep: {error}") from None
    result = studies.sweep(
        args.kind,
        strengths,
        mode=args.mode,
        l1_ratio=args.l1_ratio,
        group_dim=group_dim,
        select=args.select,
        baseline=not args.no_baseline,
        data=data,
        config=config,
        model_fn=model_fn,
        progress=not args.no_progress,
    )
    print(studies.summary_table(result))
    print(studies.best_summary(result))
    _finish(studies, args, result)
    return 0


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="digits (default), iris, wine, breast_cancer, or MODULE:FUNCTION (below)")
    p.add_argument("--model", metavar="MODULE:FUNCTION", help="your model (below); default: the built-in MLP")
    p.add_argument("--hidden", type=int, help="hidden units of the built-in MLP (default 128)")
    p.add_argument("--only", action="append", metavar="PATTERN", help="regularize only matching parameters (below); repeatable")
    p.add_argument(
        "--no-decay",
        default="bias,norm",
        metavar="PATTERNS",
        help="comma list: parameters whose name or module class contains one are never regularized "
        "(fastreg.param_groups; default bias,norm; '' regularizes them too)",
    )
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="adam (default) or sgd with momentum 0.9")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights, batch order and dropout (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default: these models are too small to gain from a GPU), cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while training (default 1)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), help="fastreg backend (default: FASTREG_BACKEND or auto)")
    p.add_argument("--max-train", type=int, metavar="N", help="keep at most N training samples (small sets overfit)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="default 0.2")
    p.add_argument("--test-fraction", type=float, default=0.2, help="default 0.2")
    p.add_argument("--out", metavar="FOLDER", help="run folder (default runs/COMMAND-DATE-TIME)")
    p.add_argument("--no-plots", action="store_true", help="write JSON and CSV only (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (no tqdm needed)")


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    _study_arguments(p)
    p.add_argument(
        "--settings",
        metavar="NAMES",
        help="comma list of the built-in settings to run (default all: none, l1, l1-decoupled, l2, l2-decoupled, "
        "elasticnet, group-lasso, dropout)",
    )
    p.add_argument(
        "--setting",
        action="append",
        metavar="SPEC",
        help="add a setting NAME:KEY=VALUE,... with keys l1, l2, group_lasso, mode (coupled/decoupled), group_dim "
        "(0 = rows, none), dropout; e.g. strong:l1=3e-3,mode=decoupled; repeatable",
    )
    p.add_argument("--l1", type=float, default=1e-3, help="l1 of the coupled l1 setting (default 1e-3; elasticnet: half)")
    p.add_argument("--l2", type=float, default=1e-2, help="l2 of the coupled l2 setting (default 1e-2; elasticnet: half)")
    p.add_argument("--l1-decoupled", type=float, default=0.3, help="l1 of l1-decoupled (default 0.3)")
    p.add_argument("--l2-decoupled", type=float, default=3.0, help="l2 of l2-decoupled (default 3; AdamW's weight_decay)")
    p.add_argument("--group-lasso", type=float, default=1.0, help="strength of group-lasso, decoupled on rows (default 1)")
    p.add_argument("--dropout", type=float, default=0.5, help="rate of the dropout setting (default 0.5)")


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    _study_arguments(p)
    p.add_argument("--kind", choices=["l1", "l2", "elasticnet", "group_lasso"], default="l2", help="default l2")
    p.add_argument("--mode", choices=["coupled", "decoupled"], default="coupled", help="default coupled")
    p.add_argument("--min", type=float, help="smallest strength (default: per kind and mode, see fastreg.studies.DEFAULT_GRIDS)")
    p.add_argument("--max", type=float, help="largest strength (default: per kind and mode)")
    p.add_argument("--num", type=int, default=9, help="strengths, log-spaced from --min to --max (default 9)")
    p.add_argument("--strengths", metavar="LIST", help="comma list of strengths, instead of --min/--max/--num")
    p.add_argument("--l1-ratio", type=float, default=0.5, help="elasticnet: l1 = s * ratio, l2 = s * (1 - ratio) (default 0.5)")
    p.add_argument("--group-dim", choices=["rows", "tensor"], default="rows", help="group_lasso groups (default rows)")
    p.add_argument(
        "--select", choices=["val_loss", "val_accuracy"], default="val_loss", help="what 'best on validation data' means (default val_loss)"
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the unregularized reference run")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m fastreg", description="Fused weight regularization for PyTorch.")
    top.add_argument("--version", action="version", version=f"fastreg {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, devices, and which backends are usable here (and why not)")
    info.set_defaults(func=cmd_info)

    build = sub.add_parser("build", help="build the C++ extensions now instead of on first use")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    build.set_defaults(func=cmd_build)

    b = sub.add_parser(
        "bench",
        help="fastreg vs the naive loop, foreach, torch.compile and the bandwidth floor",
        description="Every implementation of a task is checked against the reference backend, then timed "
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
                   "to --max-params) or vs tensor count (10 to 10,000 tensors, --size times 4M elements in all)")
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
    g = sub.add_parser(
        "gpu-check",
        help="everything on a GPU machine in one command: build, GPU tests, compute-sanitizer, CUDA graphs, bench",
        description="Runs, each with its own time limit inside --budget: the environment, `python -m fastreg build`, "
        "the GPU tests of every backend (junit XML), compute-sanitizer memcheck and racecheck on a small case, CUDA-graph "
        "capture and replay against eager calls, and the bench on GPT-2 small, Llama shapes in bf16, 10,000 small tensors "
        "and tiny-1k (bandwidth as a percentage of a device-to-device copy). Writes gpu-check.json, gpu-check.log, "
        "bench.json and the junit files into one folder. Run it from the repository root (PYTHONPATH=. where fastreg "
        "is not installed); exits 0 when every step passed.",
    )
    g.add_argument("--out", metavar="FOLDER", help="output folder (default benchmarks/results/gpu-check-DATE-TIME)")
    g.add_argument("--dry-run", action="store_true", help="the same plumbing on CPU at tiny sizes (for CI); GPU-only parts are skipped")
    g.add_argument("--budget", type=float, default=gpu_check.BUDGET_SECONDS,
                   help=f"seconds for all steps together (default {gpu_check.BUDGET_SECONDS:g})")
    g.add_argument("--skip", nargs="+", default=[], choices=gpu_check.STEP_NAMES, metavar="STEP",
                   help=f"steps not to run: {', '.join(gpu_check.STEP_NAMES)}")
    g.add_argument("--worker", choices=sorted(gpu_check.WORKERS), help=argparse.SUPPRESS)
    g.add_argument("--result", help=argparse.SUPPRESS)
    g.set_defaults(func=cmd_gpu_check)

    c = sub.add_parser(
        "compare",
        help="train one model under several regularizations (none, L1, L2, ElasticNet, group lasso, dropout) and compare",
        description="Trains the same model with the same seed, split and batch order under each setting; records "
        "learning curves, test precision/recall/F1/ROC-AUC/confusion matrix, the penalty and the exactly-zero weights "
        "per layer; writes JSON, CSV and PNG plots to a run folder and prints a summary table.",
        epilog=STUDY_DATA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _compare_arguments(c)
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser(
        "sweep",
        help="train over a log-spaced grid of one regularization's strength and pick the best on validation data",
        description="Trains at each strength of one kind, plots train and validation loss and accuracy against the "
        "strength (the under-/over-fitting curve), marks the best strength on validation data and reports its test "
        "metrics; writes JSON, CSV and PNG plots to a run folder.",
        epilog=STUDY_DATA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _sweep_arguments(s)
    s.set_defaults(func=cmd_sweep)
    return top


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
