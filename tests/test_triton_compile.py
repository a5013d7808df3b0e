"""The Triton kernels compiled ahead of time for NVIDIA GPUs, on a machine without one.

Every kernel variant the launchers produce (each parameter dtype and each combination of the
flags they pass) is compiled for sm_80 and sm_90 with the launch options, and its PTX and
cubin are checked:

- the item kernels' aligned path is an unmasked loop of 128-bit global loads (and stores,
  for the kernels that write), a whole number of 16-byte vectors per tensor and block;
- nothing spills: no local memory, stack or local loads and stores (``cuobjdump -res-usage``,
  the SASS), but for one known 8-byte stack frame (``_known_stack_frame``);
- no multiply-add is contracted: the PTX fuses exactly where the kernels call ``tl.fma``
  (the sum of squares, the gradient without group lasso), and the machine code of kernels
  with none has no FFMA/DFMA.

The variants are found by running the real launchers with the kernels' launch replaced by a
recorder, in a subprocess where the kernels are compiled ones (the test session runs them
under the interpreter). The default run checks a representative set (every kernel and dtype,
both architectures); ``-m slow`` checks all of them. Skipped only where Triton cannot compile
for CUDA at all.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from fastreg import kernels

ARCHS = (80, 90)
KERNELS = {"sums_kernel": "triton_norms", "finalize_kernel": "triton_norms", "grad_kernel": "triton_grad",
           "decay_kernel": "triton_decay", "step_kernel": "triton_optim", "steps_kernel": "triton_optim",
           "shrink_kernel": "triton_optim"}
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


# ---------------------------------------------------------------------------------------------
# The worker: runs in a subprocess with TRITON_INTERPRET=0


def _record_variants():
    """Every distinct launch the launchers make over the op space: (kernel name, signature,
    constexprs, attrs, options), in first-seen order."""
    import torch

    from fastreg.kernels import triton_decay, triton_grad, triton_norms, triton_optim, triton_table

    modules = {"triton_norms": triton_norms, "triton_grad": triton_grad, "triton_decay": triton_decay,
               "triton_optim": triton_optim}
    seen = {}

    def recorder(name, kernel):
        def run(*args, grid, warmup, **kwargs):
            bound = dict(zip(kernel.arg_names, args))
            bound.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
            options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
            signature, constexprs, attrs = {}, {}, {}
            for i, param in enumerate(kernel.params):
                value = bound[param.name]
                if param.is_constexpr or value is None:
                    signature[param.name] = "constexpr"
                    constexprs[param.name] = value
                elif isinstance(value, torch.Tensor):
                    signature[param.name] = "*" + {torch.int64: "i64", torch.float16: "fp16", torch.bfloat16: "bf16",
                                                   torch.float32: "fp32", torch.float64: "fp64",
                                                   torch.uint8: "u8"}[value.dtype]
                    if value.data_ptr() % 16 == 0:
                        attrs[i] = 16
                else:
                    assert param.annotation == "i64", f"{name}: scalar {param.name} is not annotated tl.int64"
                    signature[param.name] = "i64"
            key = (name, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()),
                   tuple(sorted(options.items())))
            seen.setdefault(key, (name, signature, constexprs, attrs, options))

        return run

    for name, module in KERNELS.items():
        kernel = getattr(modules[module], name)
        kernel.run = recorder(name, kernel)

    host_read = lambda t, table, acc: (None, triton_table.f64_bits(t.item()))  # noqa: E731 (a CPU scalar with GPU tensors)
    coefficients = [c for c in itertools.product((0.0, 0.1), repeat=3)]
    for dtype_name in DTYPE_NAMES:
        dtype = getattr(torch, dtype_name)
        acc = triton_table.ACCUMULATE[dtype]
        table = triton_table.Table(torch.zeros(64, dtype=torch.long), torch.device("cpu"), 2, 2, 2, 2, False, 12, 0)
        triton_norms.norms(table, dtype)
        outs = [torch.empty(8, dtype=dtype)] * 2
        for reads in (triton_table.device_scalar, host_read):
            triton_grad.device_scalar = triton_decay.device_scalar = reads
            for l1, l2, gl in coefficients:
                triton_norms.value(table, dtype, l1, l2, gl)
                triton_grad.add_grad(table, dtype, l1, l2, gl)
                triton_grad.penalty_backward(table, dtype, torch.tensor(1.5, dtype=acc), l1, l2, gl, outs)
                triton_decay.decay(table, dtype, 0.3, None, l1, l2, gl)
                triton_decay.decay(table, dtype, 0.0, torch.tensor(0.3, dtype=acc), l1, l2, gl)
        triton_grad.device_scalar = triton_decay.device_scalar = triton_table.device_scalar
        _record_steps(triton_optim, dtype)
    return list(seen.values())


def _record_steps(triton_optim, dtype):
    """The fused optimizer steps' launches: each optimizer with each option of its update, with
    and without the regularization terms and GradScaler's tensors."""
    import torch

    from fastreg.kernels import triton_table

    table = triton_table.Table(torch.zeros(64, dtype=torch.long), torch.device("cpu"), 2, 2, 2, 6, False, 12, 0)
    scaler = dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
    plain = dict(grad_scale=None, found_inf=None)
    none = dict(l1=0.0, l2=0.0, group_lasso=0.0, penalty_l2=0.0, track=False)
    l1 = dict(l1=1e-2, l2=0.0, group_lasso=0.0, penalty_l2=0.1, track=True)
    every = dict(l1=1e-2, l2=1e-3, group_lasso=0.5, penalty_l2=0.1, track=True)
    for term, amp in ((none, plain), (l1, scaler), (every, plain), (every, scaler)):
        for decoupled, amsgrad, maximize, weight_decay in ((True, False, False, 0.1), (False, True, True, 0.0)):
            triton_optim.adam_step(table, dtype, 1e-3, None, 0.9, 0.999, 1e-8, weight_decay, decoupled, amsgrad, maximize,
                                   **amp, **term)
        for momentum, nesterov, first in ((0.0, False, None), (0.9, True, torch.tensor([True, False]))):
            triton_optim.sgd_step(table, dtype, 1e-3, torch.tensor(1e-3), momentum, 0.0, 0.1, nesterov, False, first,
                                  **amp, **term)


def _representative(variant) -> bool:
    """The default run's share: each item kernel with every term and the finalize of a
    group-lasso gradient, per dtype."""
    name, _, constexprs, _, _ = variant
    if name == "sums_kernel":
        return constexprs["ABS"] and not constexprs["DECAYED"]
    if name == "grad_kernel":
        return constexprs["HAS_L1"] and constexprs["HAS_L2"] and constexprs["SUMS"]
    if name == "decay_kernel":
        return constexprs["HAS_L1"] and constexprs["HAS_L2"] and not constexprs["HAS_GL"] and not constexprs["LR_TENSOR"]
    if name == "step_kernel":
        return constexprs["TRACK"] and constexprs["UNSCALE"] and not constexprs["HAS_GL"] and (
            constexprs["DECOUPLED"] or constexprs["MOMENTUM"])
    if name in ("steps_kernel", "shrink_kernel"):
        return constexprs["SKIPPABLE"]
    return constexprs["VALUE"] and constexprs["FACTOR"] == 1 and constexprs["HAS_L1"] and constexprs["HAS_L2"]


def _tool(name: str) -> str:
    """A CUDA tool as Triton finds it (its own copy unless overridden), else the toolkit's."""
    from triton import knobs

    path = getattr(knobs.nvidia, name).path
    return path if path and os.path.exists(path) else shutil.which(name)


def _compile(variant, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastreg.kernels import triton_decay, triton_grad, triton_norms, triton_optim

    modules = {"triton_norms": triton_norms, "triton_grad": triton_grad, "triton_decay": triton_decay,
               "triton_optim": triton_optim}
    name, signature, constexprs, attrs, options = variant
    kernel = getattr(modules[KERNELS[name]], name)
    source = ASTSource(kernel, dict(signature), constexprs=dict(constexprs),
                       attrs={(i,): [["tt.divisibility", d]] for i, d in attrs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(options))
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as scratch:
        cubin = pathlib.Path(scratch) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    resources = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    return dict(
        kernel=name,
        arch=arch,
        constexprs={k: str(v) for k, v in constexprs.items()},
        registers=int(resources["REG"]),
        stack=int(resources["STACK"]),
        local=int(resources["LOCAL"]),
        num_warps=compiled.metadata.num_warps,
        loops=_loops(ptx),
        fma_ptx=len(re.findall(r"\bfma\.rn\.f(?:32|64)\b", ptx)),
        fma_sass=len(re.findall(r"\b[FD]FMA\b", sass)),
        local_accesses=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
    )


GLOBAL_ACCESS = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s")
LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")


def _access(line):
    """``(kind, bits, predicated)`` of a global load or store in PTX, else None."""
    match = GLOBAL_ACCESS.match(line)
    if match is None:
        return None
    modifiers = match.group(3)
    lanes = re.search(r"\.v(\d)\b", modifiers)
    width = re.search(r"\.[bfsu](\d+)\b", modifiers)
    bits = (int(lanes.group(1)) if lanes else 1) * int(width.group(1))
    return match.group(2), bits, match.group(1) is not None


def _loops(ptx: str):
    """The innermost loops of ``ptx`` (a label and a later branch back to it, with no loop
    inside), as lists of their global accesses."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line))}
    spans = []
    for i, line in enumerate(lines):
        match = BRANCH.search(line)
        if match and labels.get(match.group(1), i) < i:
            spans.append((labels[match.group(1)], i))
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [[a for line in lines[b:e + 1] if (a := _access(line))] for b, e in innermost]


def _worker(out_path: str, everything: bool) -> None:
    variants = _record_variants()
    if not everything:
        variants = [v for v in variants if _representative(v)]
    jobs = [(v, arch) for v in variants for arch in ARCHS]
    # Two compiling processes, as many as CI's cores.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=context) as pool:
        results = list(pool.map(_compile_job, jobs))
    pathlib.Path(out_path).write_text(json.dumps(results))


def _compile_job(job):
    return _compile(*job)


# ---------------------------------------------------------------------------------------------
# The tests


def _cannot_compile_reason():
    if kernels.triton_import_error() is not None:
        return kernels.triton_import_error()
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        return "this Triton has no NVIDIA backend"
    if _tool("ptxas") is None or _tool("cuobjdump") is None:
        return "neither Triton nor the CUDA toolkit provides ptxas and cuobjdump"
    return None


pytestmark = pytest.mark.skipif(_cannot_compile_reason() is not None, reason=str(_cannot_compile_reason()))


def _run(everything: bool):
    with tempfile.TemporaryDirectory() as scratch:
        out = pathlib.Path(scratch) / "variants.json"
        env = dict(os.environ, TRITON_INTERPRET="0")
        root = pathlib.Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
        command = [sys.executable, __file__, str(out)] + (["--all"] if everything else [])
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=root)
        assert done.returncode == 0, done.stderr[-6000:]
        return json.loads(out.read_text())


STREAMS = {"sums_kernel": (1, 0), "decay_kernel": (1, 1), "shrink_kernel": (1, 1)}
"""Tensors each aligned block reads and writes: (loads, stores)."""


def _streams(result):
    flags = result["constexprs"]
    if result["kernel"] == "step_kernel":
        # weights and gradients (stored when unscaled), then Adam's moments (and amsgrad's
        # maximum) or SGD's momentum buffer
        state = (2 + (flags["AMSGRAD"] == "True")) if flags["OPTIMIZER"] == "0" else int(flags["MOMENTUM"] == "True")
        return 2 + state, 1 + (flags["UNSCALE"] == "True") + state
    if result["kernel"] == "grad_kernel":
        flags = result["constexprs"]
        if flags["TO_OUT"] == "True":
            # With every coefficient zero the output is zeros: the weights are not read.
            reads = any(flags[f] == "True" for f in ("HAS_L1", "HAS_L2", "HAS_GL", "SUMS"))
            return (int(reads), 1)
        return (2, 1)
    return STREAMS[result["kernel"]]


def _vectors_per_thread(result):
    element_bits = {"fp16": 16, "bf16": 16, "fp32": 32, "fp64": 64}[result["constexprs"]["DTYPE"]]
    return int(result["constexprs"]["BLOCK"]) * element_bits // (result["num_warps"] * 32 * 128)


def _known_stack_frame(result) -> bool:
    """The one variant family Triton 3.9 (torch 2.13's) gives a stack frame, found by this test: on
    sm_90, the fp32 sums of decayed weights with L2 alone keep 8 bytes on the stack, written once
    and read once per thread (one STL and one LDL in the whole kernel, at 32 registers: not a
    spill in a loop). Anything more, or on any other variant, fails."""
    flags = result["constexprs"]
    return (result["kernel"] == "sums_kernel" and result["arch"] == 90 and flags["DTYPE"] == "fp32"
            and flags["DECAYED"] == "True" and flags["HAS_L2"] == "True" and flags["HAS_L1"] == "False"
            and result["stack"] <= 8 and result["local"] == 0 and result["local_accesses"] <= 2)


def check(results):
    assert results, "no variants recorded"
    kernels_seen = {r["kernel"] for r in results}
    assert kernels_seen == set(KERNELS), kernels_seen
    for r in results:
        where = f'{r["kernel"]} sm_{r["arch"]} {r["constexprs"]}'
        spills = r["stack"] or r["local"] or r["local_accesses"]
        assert not spills or _known_stack_frame(r), f"{where} uses local memory (spills): {r}"
        flags = r["constexprs"]
        if r["kernel"] in ("finalize_kernel", "steps_kernel"):
            assert r["fma_ptx"] == 0, f"{where}: contracted multiply-add"
            continue
        loads, stores = _streams(r)
        per_block = _vectors_per_thread(r)
        aligned = [loop for loop in r["loops"]
                   if loop and all(bits == 128 and not predicated for _, bits, predicated in loop)]
        assert aligned, f"{where}: no loop of unmasked 128-bit accesses: {r['loops']}"
        # the step kernel's skipped-step branch has a sums loop of its own: the update's is the longest
        main = max(aligned, key=len) if r["kernel"] == "step_kernel" else aligned[0]
        n_loads = sum(kind == "ld" for kind, _, _ in main)
        n_stores = sum(kind == "st" for kind, _, _ in main)
        assert (n_loads > 0) == (loads > 0) and n_loads % max(loads * per_block, 1) == 0, \
            f"{where}: {n_loads} vector loads per step"
        assert n_stores % max(stores * per_block, 1) == 0 and (n_stores > 0) == (stores > 0), where
        # the step kernel's updates are torch's, whose build contracts them: it writes them as fmas
        fused = flags.get("SUMS") == "True" or r["kernel"] in ("sums_kernel", "step_kernel") or (
            r["kernel"] == "grad_kernel" and flags["HAS_GL"] == "False" and flags["HAS_L2"] == "True")
        if not fused:
            assert r["fma_ptx"] == 0 and r["fma_sass"] == 0, f"{where}: contracted multiply-add"
        else:
            assert r["fma_ptx"] > 0, f"{where}: the fused multiply-add is missing"


def test_representative_variants_compile_vectorized_without_spills():
    check(_run(everything=False))


@pytest.mark.slow
def test_every_variant_compiles_vectorized_without_spills():
    check(_run(everything=True))


if __name__ == "__main__":
    _worker(sys.argv[1], "--all" in sys.argv[2:])
