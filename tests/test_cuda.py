"""The ``cuda`` backend: its sources compile with nvcc (in CI, without a GPU), its build is
skipped with a reason where it cannot run, its plans lay out tables in the kernels' limits, and,
on a GPU, what only the CUDA kernels promise: launches per call, tables read on other streams
and in CUDA graphs, device scalars never copied to the host, views read like their copies, and
the fused optimizer steps against torch's own fused Adam / AdamW / SGD. Every op's agreement
with the ``reference`` backend is tests/test_conformance.py's ``cuda`` target.

The GPU tests skip, with the reason, where ``torch.cuda.is_available()`` is False. Where a GPU,
a CUDA build of torch and nvcc are all present, an unusable backend is a failure, not a skip.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import warnings

import pytest
import torch

import fastreg
from fastreg import _build
from fastreg.__main__ import main
from fastreg.backends import BACKENDS, auto_backend, get_backend
from reference import (
    COEFS,
    SHAPES,
    assert_bitwise_equal,
    assert_lists_close,
    check_int64_indexing,
    elementwise_tol,
    make_grads,
    make_params,
    noncontiguous_params,
    reduction_tol,
)

CUDA = BACKENDS["cuda"]
REF = BACKENDS["reference"]
CSRC = _build.CSRC
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda") if GPU else None


# ---------------------------------------------------------------------------------------------
# CI without a GPU: nvcc compiles every .cu file against torch's headers


def _nvcc_command(source, obj, include_dir):
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{path}" for path in cpp_extension.include_paths()] + [f"-I{CSRC}", f"-I{include_dir}"]
    return [
        _build.find_nvcc(), "-c", str(source), "-o", str(obj),
        *_build.cuda_flags(),
        *_build.compiled_std_flags(_build.CPU),
        *cpp_extension.COMMON_NVCC_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=fastreg_cuda_ci",
        *includes,
        "--compiler-options", "-fPIC",
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90,code=sm_90",
        "--threads", str(os.cpu_count() or 1),
    ]


def _ptxas_report(text):
    """Per compiled kernel of ``-Xptxas -v`` output: (architecture, mangled name, registers,
    stack frame bytes, spill store bytes, spill load bytes)."""
    kernels = []
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", text):
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", block)
        if entry is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        assert frame and registers, block
        kernels.append((entry.group(2), entry.group(1), int(registers.group(1)), *map(int, frame.groups())))
    return kernels


# About two minutes on two CPU cores (every dtype and kernel variant; nvcc --threads compiles the two
# architectures at once, each with its own ptxas report).
@pytest.mark.slow
@pytest.mark.skipif(_build.find_nvcc() is None, reason="no nvcc found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_nvcc_compiles_for_sm80_and_sm90(source, tmp_path):
    """Every kernel compiles for both architectures within the registers its launch bounds
    leave: no spills and no stack frame (local memory would cost a round trip per access)."""
    # The standard torch's headers need, as cpp_extension gives it to the CPU build.
    assert _build.cpu_unavailable_reason() is None
    # CPU wheels of torch ship c10/cuda's headers but not this CMake-generated one; with no
    # settings in it, an empty header is what a CUDA build of torch generates for this purpose.
    macros = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n")
    obj = tmp_path / (source.stem + ".o")
    start = time.perf_counter()
    command = _nvcc_command(source, obj, tmp_path / "include") + ["-Xptxas", "-v"]
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, f"nvcc failed on {source.name} after {elapsed:.0f} s:\n{result.stderr}{result.stdout}"
    assert obj.stat().st_size > 0
    kernels = _ptxas_report(result.stderr + result.stdout)
    for arch in ("sm_80", "sm_90"):
        names = sorted(name for a, name, *_ in kernels if a == arch)
        assert names and names == sorted(name for a, name, *_ in kernels if a == "sm_80"), arch
    print(f"\n{source.name}: {len(kernels)} kernels in {elapsed:.0f} s (arch, registers, stack, spill stores, loads, name)")
    for arch, name, *numbers in kernels:
        print(arch, *numbers, name)
    local = [(arch, name, *numbers) for arch, name, *numbers in kernels if any(numbers[1:])]
    assert not local, "kernels with a stack frame or spills:\n" + "\n".join(map(str, local))
    cuobjdump = shutil.which("cuobjdump", path=os.path.dirname(_build.find_nvcc()))
    if cuobjdump:
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True, check=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing


@pytest.mark.slow
def test_cuda_bindings_compile_with_the_host_compiler(tmp_path):
    """The Python module of the CUDA extension is host code only (fastreg_cuda.h names no CUDA
    type), so it compiles against a CPU build of torch too."""
    from torch.utils import cpp_extension

    assert _build.cpu_unavailable_reason() is None
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    python_include = __import__("sysconfig").get_paths()["include"]
    command = [compiler, "-fsyntax-only", str(CSRC / "cuda_bindings.cpp"), *_build.compiled_std_flags(_build.CPU),
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-DTORCH_EXTENSION_NAME=fastreg_cuda_ci", f"-I{CSRC}", f"-I{python_include}",
               *[f"-I{path}" for path in cpp_extension.include_paths()]]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-20000:]


def test_every_kernel_source_is_part_of_the_cuda_extension():
    cuda_files = sorted(p.name for p in CSRC.glob("*.cu"))
    assert cuda_files and set(cuda_files) <= set(_build.CUDA.sources)
    assert "cuda_bindings.cpp" in _build.CUDA.sources and "fastreg_cuda.h" in _build.CUDA.headers
    assert all((CSRC / name).is_file() for name in _build.CUDA.sources + _build.CUDA.headers)
    assert _build.CUDA.python_module


# ---------------------------------------------------------------------------------------------
# build logic, registration and reasons (every machine)


def test_registry_order_prefers_triton_then_cuda():
    assert list(BACKENDS) == ["triton", "cuda", "cpp", "torch", "reference"]
    assert get_backend("cuda") is CUDA
    assert not CUDA.auto_eligible(torch.device("cpu")) and CUDA.auto_eligible(torch.device("cuda"))


def test_cpu_tensors_are_not_for_cuda():
    reason = CUDA.unavailable_reason(torch.device("cpu"), torch.float32)
    assert reason.startswith("cuda runs on CUDA tensors only")
    skip = _build.CUDA.skip_reason()
    if skip is not None:
        assert skip in reason


def test_nvcc_contracts_nothing():
    """The kernels fuse exactly the products the CPU kernels fuse, so nvcc may add none."""
    assert "--fmad=false" in _build.cuda_flags() and "--fmad=false" in _build.CUDA._cuda_cflags()
    assert _build._arch_numbers("7.5;8.0+PTX 9.0a") == [75, 80, 90]
    assert min(_build._arch_numbers("Pascal;8.0")) < 70


def test_build_skips_what_cannot_be_built_here(capsys):
    """`python -m fastreg build` exits 0 where the CUDA extension cannot be built (a CPU-only
    torch, no nvcc, or no GPU and no TORCH_CUDA_ARCH_LIST), and says why."""
    skip = _build.CUDA.skip_reason()
    if skip is None:
        pytest.skip("the CUDA extension is buildable here")
    results = _build.build_all()
    assert results["fastreg_cuda"] == _build.SKIPPED + skip
    assert not _build.failures(results)
    assert _build.cuda_unavailable_reason() == skip
    assert main(["build"]) == 0
    assert re.search(r"^fastreg_cuda +skipped: ", capsys.readouterr().out, re.MULTILINE)


def test_skip_reasons_name_the_missing_piece(monkeypatch):
    import torch.version

    ext = _build._CudaExtension("fastreg_cuda_probe", ["fastreg_cuda.cu"], ["fastreg.h"], requires=_build.CPU)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in ext._find_skip_reason()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_build, "find_nvcc", lambda: None)
    assert "nvcc not found" in ext._find_skip_reason()
    monkeypatch.setattr(_build, "find_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert "no CUDA GPU visible" in ext._find_skip_reason()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert ext._find_skip_reason() is None
    assert ext.target_archs() == [90]


def test_skipped_extension_does_not_warn():
    ext = _build._CudaExtension("fastreg_cuda_probe", ["fastreg_cuda.cu"], ["fastreg.h"], requires=_build.CPU)
    ext._skip = ("no CUDA here",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext.ensure() == "no CUDA here"


def test_tables_only_for_cuda_devices():
    assert CUDA.table_ops(torch.device("cpu")) is None and not CUDA.runs_tables(torch.device("cpu"))


def test_table_helpers_say_why_the_extension_is_unavailable(monkeypatch):
    monkeypatch.setattr(_build.CUDA, "ensure", lambda verbose=False: "no CUDA toolkit here")
    cuda = torch.device("cuda", 0)
    assert CUDA.table_ops(cuda) is None
    assert CUDA.unavailable_reason(cuda, torch.float32) == "no CUDA toolkit here"
    with pytest.raises(RuntimeError, match="cuda backend is unavailable: no CUDA toolkit here"):
        CUDA.layout_limits(cuda)
    with pytest.raises(RuntimeError, match="cuda backend is unavailable: no CUDA toolkit here"):
        CUDA.table_to_device(torch.zeros(16, dtype=torch.long), cuda)


def test_a_plan_lays_out_cuda_tables_with_the_kernels_limits(monkeypatch):
    """A plan's CUDA bucket builds its table with the planner (plan.h), in the layout limits the
    extension reports, with the tensors' addresses, and keeps what the extension's
    table_to_device returns (the device table) for the bucket's later calls."""
    planner = _build.planner()
    if planner is None:
        pytest.skip(f"the C++ planner is unavailable: {_build.cpu_unavailable_reason()}")
    from fastreg import _plan
    from fastreg.backends import cuda as cuda_backend_module

    moved = []

    class Extension:
        @staticmethod
        def layout_limits():
            return 1024, 4

        @staticmethod
        def table_to_device(host, device):
            moved.append((host.clone(), device))
            return "device table"

    monkeypatch.setattr(cuda_backend_module, "_module", lambda: Extension)
    params = [torch.randn(3000), torch.randn(10, 7), torch.randn(5), torch.randn(0)]
    grads = [torch.randn_like(p) for p in params]
    extents = torch.tensor([[p.numel(), p.shape[0] if p.dim() >= 2 else 1] for p in params])
    device = torch.device("cuda", 0)
    bucket = _plan.Bucket(backend=CUDA, device=device, dtype=torch.float32, positions=None, contiguous=True, extents=extents)
    assert bucket.table(True, params, grads) == "device table" and bucket.tables[True] == "device table"
    (host, to), = moved
    assert to == device
    expected = planner.layout(extents, True, 2, 1024, 4)
    planner.set_ptrs(expected, 0, params)
    planner.set_ptrs(expected, 1, grads)
    assert torch.equal(host, expected)
    words = host.tolist()
    assert words[4] == 1024 and words[5] == 4  # plan.h's kChunk and kMaxGroups header words
    assert words[words[8]:words[8] + 4] == [p.data_ptr() for p in params[:3]] + [0]


@pytest.mark.slow
@pytest.mark.skipif(GPU, reason="with a GPU, the GPU tests load the extension itself")
@pytest.mark.skipif(torch.version.cuda is None, reason=f"torch {torch.__version__} is a CPU-only build")
@pytest.mark.skipif(_build.find_nvcc() is None, reason="no nvcc found (set CUDA_HOME or put nvcc on PATH)")
def test_the_extension_builds_and_loads_without_a_gpu(monkeypatch):
    """Built for one architecture by TORCH_CUDA_ARCH_LIST, the extension links, loads, registers
    CUDA kernels for the ops and checks a table's arguments before it needs a device."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if not any(os.path.exists(os.path.join(home or "", lib, "libcudart.so")) for lib in ("lib64", "lib")):
        pytest.skip(f"cpp_extension's CUDA_HOME ({home}) holds no CUDA runtime to link; set CUDA_HOME to the toolkit")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    ext = _build._CudaExtension(_build.CUDA.name, _build.CUDA.sources, _build.CUDA.headers, requires=_build.CPU,
                                python_module=True)
    assert ext.ensure() is None, ext.fix
    module = ext.module
    assert tuple(module.layout_limits()) == (1 << 16, 64)
    for op in ("norms", "value", "add_grad_", "decay_", "penalty_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastreg::{op}", "CUDA"), op
    assert callable(module.adam_step_) and callable(module.sgd_step_)
    planner = _build.planner()
    host = planner.layout(torch.tensor([[10, 1]]), False, 1, *module.layout_limits())
    with pytest.raises(RuntimeError, match="host is not a work-layout table"):
        module.table_to_device(torch.zeros(3, dtype=torch.long), torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="tables live on CUDA devices, got cpu"):
        module.table_to_device(host, torch.device("cpu"))
    too_long = planner.layout(torch.tensor([[10, 1]]), False, 1, 1 << 31, 0)
    with pytest.raises(RuntimeError, match="work items of at most"):
        module.table_to_device(too_long, torch.device("cuda", 0))


def test_cuda_name_hashes_sources_and_flags():
    name = _build.CUDA.versioned_name()
    assert name.startswith("fastreg_cuda_") and name != _build.CPU.versioned_name()


# ---------------------------------------------------------------------------------------------
# On a GPU: launches, tables, streams and layouts

gpu = pytest.mark.skipif(not GPU, reason="no CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def cuda_backend():
    reason = CUDA.unavailable_reason(torch.device("cuda"), torch.float32)
    if reason is not None:
        if torch.version.cuda is not None and _build.find_nvcc() is not None:
            pytest.fail(f"the cuda backend must work where a GPU, CUDA torch and nvcc exist, but: {reason}")
        pytest.skip(f"cuda backend unavailable: {reason}")
    return CUDA


def gpu_params(dtype, seed=0, shapes=SHAPES):
    return make_params(dtype, seed=seed, shapes=shapes, device=DEVICE)


@gpu
@pytest.mark.parametrize("count", [1, 3000])
@pytest.mark.parametrize("coefs", [COEFS["elastic_net"], COEFS["all_rows"]], ids=["elastic_net", "all_rows"])
def test_one_item_launch_and_one_finalize_for_any_tensor_count(cuda_backend, count, coefs):
    """A planned call reads its cached table: per call one launch per pass over the items (the
    update pass and, with group lasso, the sums pass before it) and one finalize, whatever
    the number of tensors, and nothing copied from the host."""
    from torch.profiler import ProfilerActivity, profile

    shapes = [(5, 3)] * count + [(3, 70000)]
    params = [p.requires_grad_() for p in gpu_params(torch.float32, shapes=shapes)]
    for p, g in zip(params, make_grads(params)):
        p.grad = g
    kwargs = dict(l1=coefs.l1, l2=coefs.l2, group_lasso=coefs.group_lasso, group_dim=coefs.group_dim)
    fastreg.add_penalty_grad_(params, backend="cuda", **kwargs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fastreg.add_penalty_grad_(params, backend="cuda", **kwargs)
        torch.cuda.synchronize()
    names = [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    items = [name for name in names if "items_kernel" in name]
    assert len(items) == (2 if coefs.group_lasso else 1), names
    assert len([name for name in names if "finalize_kernel" in name]) == 1, names
    assert not [name for name in names if "HtoD" in name], names


@gpu
@pytest.mark.parametrize("coefs", [COEFS["all"], COEFS["all_rows"]], ids=["all", "all_rows"])
def test_plan_tables_and_list_ops_give_the_same_bits(cuda_backend, coefs):
    """A plan's table and the list ops' cached table are the same plan.h layout, in the same
    limits, so the two paths agree to the bit."""
    params = gpu_params(torch.float32, shapes=[(300, 1000), (1_000_003,), (77,), (40000, 3)])
    planned = fastreg.penalty(params, backend="cuda", l1=coefs.l1, l2=coefs.l2, group_lasso=coefs.group_lasso,
                              group_dim=coefs.group_dim)
    listed = torch.ops.fastreg.value(params, coefs.l1, coefs.l2, coefs.group_lasso, coefs.group_dim)
    assert torch.equal(planned, listed)
    from fastreg import _calls

    planned_norms = _calls.norms_parts(_calls.prepare(params, "cuda"))
    assert_bitwise_equal(list(planned_norms), list(torch.ops.fastreg.norms(params)))


@gpu
def test_a_table_used_on_another_stream(cuda_backend):
    """A plan's table copied on one stream and read on another: that stream waits for the copy."""
    params = gpu_params(torch.float32, shapes=[(64, 40), (3, 70000)])
    expected = REF.value(params, COEFS["all"])
    kwargs = dict(l1=COEFS["all"].l1, l2=COEFS["all"].l2, group_lasso=COEFS["all"].group_lasso)
    first = fastreg.penalty(params, backend="cuda", **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        second = fastreg.penalty(params, backend="cuda", **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected, **reduction_tol(torch.float32))


# ---------------------------------------------------------------------------------------------
# views, device scalars, indices past 2**31


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_views_give_the_bits_of_contiguous_copies(cuda_backend, dtype):
    """Strided views are read in place with the layout of their contiguous copies."""
    params = noncontiguous_params(dtype, device=DEVICE)
    assert not any(p.is_contiguous() for p in params)
    contiguous = [p.contiguous() for p in params]
    for coefs in (COEFS["all"], COEFS["all_rows"], COEFS["elastic_net"]):
        assert torch.equal(CUDA.value(params, coefs), CUDA.value(contiguous, coefs))
    assert_bitwise_equal(list(CUDA.norms(params)), list(CUDA.norms(contiguous)))


@gpu
def test_misaligned_views_take_the_scalar_path(cuda_backend):
    """Views that start off a 16-byte boundary are read element by element, with the same
    thread -> element assignment, so they give the bits of an aligned copy."""
    base = gpu_params(torch.float32, shapes=[(70001 * 3 + 1,)])[0]
    view = base[1:].view(3, 70001)
    copy = view.clone()
    for coefs in (COEFS["all"], COEFS["all_rows"], COEFS["elastic_net"]):
        assert torch.equal(CUDA.value([view], coefs), CUDA.value([copy], coefs))
        go = torch.tensor(1.5, device=DEVICE)
        assert_bitwise_equal(CUDA.penalty_backward([view], go, coefs), CUDA.penalty_backward([copy], go, coefs))


@gpu
def test_device_scalars_are_not_copied_to_the_host(cuda_backend):
    """lr and grad_output held in CUDA tensors are read by the kernels: no call synchronizes."""
    params = gpu_params(torch.float32, shapes=[(64, 40), (1000,), (3, 70000)])
    grads = make_grads(params)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for coefs in (COEFS["all"], COEFS["all_rows"], COEFS["elastic_net"]):
            CUDA.norms(params)
            CUDA.value(params, coefs)
            CUDA.add_grad_(params, grads, coefs)
            CUDA.penalty_backward(params, torch.tensor(2.0, device=DEVICE), coefs)
            CUDA.decay_(params, torch.tensor(0.1, device=DEVICE), coefs)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu
@pytest.mark.slow
def test_int64_indexing_beyond_2_pow_31(cuda_backend):
    check_int64_indexing(CUDA, DEVICE)


# ---------------------------------------------------------------------------------------------
# registration: input checks, CUDA graphs


@gpu
def test_ops_check_their_inputs(cuda_backend):
    ops = torch.ops.fastreg
    with pytest.raises(RuntimeError, match="params\\[1\\] is"):
        ops.norms([torch.randn(3, device=DEVICE), torch.randn(3, dtype=torch.float64, device=DEVICE)])
    with pytest.raises(RuntimeError, match="params\\[1\\] is on cpu"):
        ops.norms([torch.randn(3, device=DEVICE), torch.randn(3)])
    with pytest.raises(RuntimeError, match="grads\\[0\\]"):
        ops.add_grad_([torch.randn(3, device=DEVICE)], [torch.randn(4, device=DEVICE)], 0.1, 0.0, 0.0, None)
    with pytest.raises(RuntimeError, match="group_dim"):
        ops.value([torch.randn(3, device=DEVICE)], 0.1, 0.0, 0.0, 1)
    with pytest.raises(RuntimeError, match="lr_tensor must be one floating-point element"):
        ops.decay_([torch.randn(3, device=DEVICE)], 0.0, torch.ones(2, device=DEVICE), 0.1, 0.0, 0.0, None)
    with pytest.raises(RuntimeError, match="grad_output must have one element"):
        ops.penalty_backward([torch.randn(3, device=DEVICE)], torch.ones(2, device=DEVICE), 0.1, 0.0, 0.0, None)


@gpu
def test_registry_and_auto_on_cuda(cuda_backend):
    auto = auto_backend(DEVICE, torch.float32)
    assert auto.name in ("triton", "cuda")
    assert CUDA.unavailable_reason(DEVICE, torch.bfloat16) is None


@gpu
@pytest.mark.parametrize("coefs", [COEFS["elastic_net"], COEFS["all_rows"]], ids=["elastic_net", "all_rows"])
def test_cuda_graph_capture_and_replay(cuda_backend, coefs):
    """add_penalty_grad_ and decay_ (with an lr tensor) captured once, replayed on new values:
    nothing in a call reads host memory that a replay would see stale."""
    kwargs = dict(l1=coefs.l1, l2=coefs.l2, group_lasso=coefs.group_lasso, group_dim=coefs.group_dim)
    shapes = [(64, 40), (3, 70000), (1000,), ()]
    params = [p.requires_grad_() for p in gpu_params(torch.float32, shapes=shapes)]
    for p, g in zip(params, make_grads(params)):
        p.grad = g
    lr = torch.tensor(0.1, device=DEVICE)

    def step():
        value = fastreg.add_penalty_grad_(params, backend="cuda", **kwargs)
        with torch.no_grad():
            fastreg.decay_(params, lr=lr, backend="cuda", **kwargs)
        return value

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    for seed, new_lr in ((3, 0.05), (4, 0.2)):
        new_params = gpu_params(torch.float32, seed=seed, shapes=shapes)
        new_grads = make_grads(new_params, seed=seed + 10)
        with torch.no_grad():
            for p, w, g in zip(params, new_params, new_grads):
                p.copy_(w)
                p.grad.copy_(g)
        lr.fill_(new_lr)
        graph.replay()
        torch.cuda.synchronize()
        expected = REF.add_grad_(new_params, new_grads, coefs)
        REF.decay_(new_params, new_lr, coefs)
        torch.testing.assert_close(captured, expected, **reduction_tol(torch.float32))
        assert_lists_close([p.grad for p in params], new_grads, **elementwise_tol(torch.float32))
        assert_lists_close([p.detach() for p in params], new_params, **elementwise_tol(torch.float32))


# ---------------------------------------------------------------------------------------------
# fused optimizer steps: adam_step_ / sgd_step_ over a table, against torch's fused CUDA kernels

# Tails of every length, packed small tensors, a 0-d one, tensors and rows longer than a work
# item (split groups), rows of every width the kernels treat their own way.
STEP_SHAPES = [(3, 5), (70001,), (257, 300), (), (5, 3, 4), (3, 70000), (40000, 3), (7, 31), (1,)]


def step_module():
    return CUDA.table_ops(DEVICE)


def step_table(module, rows, row_groups=False):
    """A step's device table as a plan lays it out: the planner's layout in the CUDA kernels'
    limits, one pointer row per list of ``rows`` (params first), copied to the device."""
    planner = _build.planner()
    if planner is None:
        pytest.skip(f"the C++ planner is unavailable: {_build.cpu_unavailable_reason()}")
    from fastreg import _plan

    host = planner.layout(_plan.extents(rows[0]), row_groups, len(rows), *module.layout_limits())
    for i, row in enumerate(rows):
        planner.set_ptrs(host, i, row)
    return module.table_to_device(host, DEVICE)


def adam_state(dtype, amsgrad, seed=0, shapes=STEP_SHAPES):
    params = gpu_params(dtype, seed=seed, shapes=shapes)
    return dict(params=params, grads=make_grads(params, seed=seed + 1),
                exp_avgs=[torch.zeros_like(p) for p in params], exp_avg_sqs=[torch.zeros_like(p) for p in params],
                steps=[torch.zeros((), dtype=torch.float32, device=DEVICE) for _ in params],
                max_exp_avg_sqs=[torch.zeros_like(p) for p in params] if amsgrad else [])


def sgd_state(dtype, momentum, seed=0, shapes=STEP_SHAPES):
    params = gpu_params(dtype, seed=seed, shapes=shapes)
    return dict(params=params, grads=make_grads(params, seed=seed + 1),
                momentum_buffers=[torch.zeros_like(p) for p in params] if momentum else [])


def clone_state(state):
    return {key: [t.clone() for t in row] for key, row in state.items()}


def adam_rows(state):
    """The pointer rows of adam_step_'s table: params, grads, exp_avg, exp_avg_sq, step and,
    with amsgrad, max_exp_avg_sq."""
    keys = ["params", "grads", "exp_avgs", "exp_avg_sqs", "steps"] + (["max_exp_avg_sqs"] if state["max_exp_avg_sqs"] else [])
    return [state[key] for key in keys]


def sgd_rows(state):
    return [state["params"], state["grads"]] + ([state["momentum_buffers"]] if state["momentum_buffers"] else [])


def new_grads(*states, seed):
    """The same new gradients in every state (each its own copy: unscaling writes them)."""
    grads = make_grads(states[0]["params"], seed=seed)
    for state in states:
        for g, new in zip(state["grads"], grads):
            g.copy_(new)


def torch_adam(state, *, decoupled, found_inf=None, **kwargs):
    """One step of torch's fused Adam / AdamW as torch.optim's fused path runs it: the float32
    steps advanced before the kernel, and taken back after it where GradScaler found an inf."""
    steps = state["steps"]
    torch._foreach_add_(steps, 1)
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    fused(state["params"], state["grads"], state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"], steps,
          found_inf=found_inf, **kwargs)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def adam_step(module, table, dtype, *, lr, lr_tensor=None, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
              decoupled=True, amsgrad=False, maximize=False, grad_scale=None, found_inf=None, l1=0.0, l2=0.0,
              group_lasso=0.0, penalty_l2=0.0, track=False):
    # By keyword: the binding's argument names are the planner's.
    return module.adam_step_(table=table, dtype=dtype, lr=lr, lr_tensor=lr_tensor, beta1=betas[0], beta2=betas[1],
                             eps=eps, weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                             maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, l1=l1, l2=l2,
                             group_lasso=group_lasso, penalty_l2=penalty_l2, track=track)


def sgd_step(module, table, dtype, *, lr, lr_tensor=None, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, maximize=False, first=None, grad_scale=None, found_inf=None, l1=0.0, l2=0.0,
             group_lasso=0.0, penalty_l2=0.0, track=False):
    return module.sgd_step_(table=table, dtype=dtype, lr=lr, lr_tensor=lr_tensor, momentum=momentum,
                            dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                            first=first, grad_scale=grad_scale, found_inf=found_inf, l1=l1, l2=l2,
                            group_lasso=group_lasso, penalty_l2=penalty_l2, track=track)


def assert_within_an_ulp(ours, theirs, starts, what):
    """Each element within one ulp of the largest of its values before and after the step (the
    same arithmetic as torch's kernel; a product that one side fuses and the other rounds would
    show as one)."""
    for i, (a, b, start) in enumerate(zip(ours, theirs, starts)):
        eps = torch.finfo(a.dtype).eps
        a, b, start = a.double(), b.double(), start.double()
        bound = eps * torch.maximum(torch.maximum(a.abs(), b.abs()), start.abs())
        close = ((a - b).abs() <= bound) | (a.isnan() & b.isnan())
        assert bool(close.all()), f"{what}[{i}]: {int((~close).sum())} elements off by up to {float(((a - b).abs() - bound).max())}"


def assert_penalty(value, expected, dtype):
    """A step's penalty is value()'s on the same table: to the bit where the step's packs are
    value()'s (16 bytes); a 2-byte dtype's step sums 4-element packs, in another order."""
    if dtype.itemsize >= 4:
        assert torch.equal(value, expected)
    else:
        torch.testing.assert_close(value, expected, **reduction_tol(torch.float32))


def assert_states_within_an_ulp(ours, theirs, starts, step):
    for key in ours:
        assert_within_an_ulp(ours[key], theirs[key], starts[key], f"step {step}: {key}")


def sync_state(source, target):
    """The next step starts from the same point in both."""
    for key in source:
        for s, t in zip(source[key], target[key]):
            t.copy_(s)


ADAM_CASES = {
    "adamw": dict(decoupled=True, weight_decay=0.1),
    "adam": dict(decoupled=False, weight_decay=0.1),
    "adamw_amsgrad_maximize": dict(decoupled=True, weight_decay=0.01, amsgrad=True, maximize=True),
    "adam_amsgrad_no_decay": dict(decoupled=False, amsgrad=True, betas=(0.5, 0.9), eps=1e-3),
}


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(ADAM_CASES))
@pytest.mark.parametrize("lr_kind", ["float", "cuda_tensor"])
def test_adam_step_is_torchs_fused_adam(cuda_backend, dtype, case, lr_kind):
    """fastreg's terms off, each step from the same state: params, grads, moments and steps
    within an ulp of torch._fused_adam_ / _fused_adamw_, the penalty untracked (None)."""
    options = dict(ADAM_CASES[case])
    betas = options.pop("betas", (0.9, 0.999))
    eps = options.pop("eps", 1e-8)
    amsgrad = options.get("amsgrad", False)
    module = step_module()
    ours = adam_state(dtype, amsgrad)
    theirs = clone_state(ours)
    table = step_table(module, adam_rows(ours))
    lr = 3e-3
    lr_tensor = torch.tensor(lr, device=DEVICE) if lr_kind == "cuda_tensor" else None
    for step in range(4):
        new_grads(ours, theirs, seed=10 + step)
        starts = clone_state(ours)
        value = adam_step(module, table, dtype, lr=0.0 if lr_tensor is not None else lr, lr_tensor=lr_tensor,
                          betas=betas, eps=eps, **options)
        assert value is None
        torch_adam(theirs, lr=lr_tensor if lr_tensor is not None else lr, beta1=betas[0], beta2=betas[1], eps=eps,
                   weight_decay=options.get("weight_decay", 0.0), amsgrad=amsgrad,
                   maximize=options.get("maximize", False), decoupled=options["decoupled"])
        assert all(torch.equal(a, b) for a, b in zip(ours["steps"], theirs["steps"]))
        assert all(float(s) == step + 1 for s in ours["steps"])
        assert_states_within_an_ulp(ours, theirs, starts, step)
        sync_state(ours, theirs)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam_step_with_gradscaler(cuda_backend, dtype):
    """grad_scale and found_inf on the device, as GradScaler passes them: the gradients are
    divided and stored unscaled, as torch's fused kernel does; a step with an inf writes nothing,
    steps included, and still returns the penalty of the weights."""
    module = step_module()
    ours = adam_state(dtype, amsgrad=True)
    theirs = clone_state(ours)
    table = step_table(module, adam_rows(ours))
    grad_scale = torch.tensor(1024.0, device=DEVICE)
    for step, inf in enumerate((0.0, 1.0, 0.0, 1.0, 0.0)):
        new_grads(ours, theirs, seed=20 + step)
        for state in (ours, theirs):
            torch._foreach_mul_(state["grads"], 1024.0)
        found_inf = torch.tensor(inf, device=DEVICE)
        starts = clone_state(ours)
        expected_penalty = module.value(table, dtype, 0.0, 0.7, 0.0)
        # penalty_l2 weighs the penalty alone: the update is torch's.
        value = adam_step(module, table, dtype, lr=1e-2, weight_decay=0.1, amsgrad=True, grad_scale=grad_scale,
                          found_inf=found_inf, penalty_l2=0.7, track=True)
        assert value.dtype == torch.float32 and value.dim() == 0 and value.device == DEVICE
        assert_penalty(value, expected_penalty, dtype)
        if inf:
            for key in ours:
                assert all(torch.equal(a, b) for a, b in zip(ours[key], starts[key])), key
        torch_adam(theirs, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
                   decoupled=True, grad_scale=grad_scale, found_inf=found_inf)
        assert_states_within_an_ulp(ours, theirs, starts, step)
        sync_state(ours, theirs)


SGD_CASES = {
    "plain": dict(weight_decay=0.1),
    "momentum": dict(momentum=0.9),
    "dampening": dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    "maximize": dict(momentum=0.5, maximize=True),
}


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(SGD_CASES))
@pytest.mark.parametrize("lr_kind", ["float", "cuda_tensor"])
def test_sgd_step_is_torchs_fused_sgd(cuda_backend, dtype, case, lr_kind):
    """fastreg's terms off, each step from the same state: within an ulp of torch._fused_sgd_.
    `first` flags the tensors whose buffers are new: all of them in the first step (a CPU
    tensor, copied), then none, then some (a device tensor), as torch's is_first_step does for
    the tensors it is given."""
    options = SGD_CASES[case]
    momentum = options.get("momentum", 0.0)
    module = step_module()
    ours = sgd_state(dtype, momentum)
    theirs = clone_state(ours)
    table = step_table(module, sgd_rows(ours))
    lr = 1e-2
    lr_tensor = torch.tensor(lr, device=DEVICE) if lr_kind == "cuda_tensor" else None
    count = len(ours["params"])
    flags = [torch.ones(count, dtype=torch.bool), torch.zeros(count, dtype=torch.bool, device=DEVICE),
             (torch.arange(count) % 3 == 0).to(DEVICE)]
    for step, first in enumerate(flags):
        new_grads(ours, theirs, seed=30 + step)
        starts = clone_state(ours)
        assert sgd_step(module, table, dtype, lr=0.0 if lr_tensor is not None else lr, lr_tensor=lr_tensor,
                        first=first, **options) is None
        kwargs = dict(weight_decay=options.get("weight_decay", 0.0), momentum=momentum,
                      lr=lr_tensor if lr_tensor is not None else lr, dampening=options.get("dampening", 0.0),
                      nesterov=options.get("nesterov", False), maximize=options.get("maximize", False))
        for flag in (True, False):
            picked = [i for i in range(count) if bool(first[i]) == flag]
            if picked:
                torch._fused_sgd_([theirs["params"][i] for i in picked], [theirs["grads"][i] for i in picked],
                                  [theirs["momentum_buffers"][i] for i in picked] if momentum else [],
                                  is_first_step=flag and momentum != 0.0, **kwargs)
        assert_states_within_an_ulp(ours, theirs, starts, step)
        sync_state(ours, theirs)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sgd_step_with_gradscaler(cuda_backend, dtype):
    module = step_module()
    ours = sgd_state(dtype, momentum=0.9)
    theirs = clone_state(ours)
    table = step_table(module, sgd_rows(ours))
    grad_scale = torch.tensor(512.0, device=DEVICE)
    for step, inf in enumerate((0.0, 1.0, 0.0)):
        new_grads(ours, theirs, seed=40 + step)
        for state in (ours, theirs):
            torch._foreach_mul_(state["grads"], 512.0)
        found_inf = torch.tensor(inf, device=DEVICE)
        starts = clone_state(ours)
        first = torch.full((len(ours["params"]),), step == 0, dtype=torch.bool, device=DEVICE)
        sgd_step(module, table, dtype, lr=1e-2, momentum=0.9, weight_decay=0.1, first=first, grad_scale=grad_scale,
                 found_inf=found_inf)
        torch._fused_sgd_(theirs["params"], theirs["grads"], theirs["momentum_buffers"], weight_decay=0.1,
                          momentum=0.9, lr=1e-2, dampening=0.0, nesterov=False, maximize=False,
                          is_first_step=step == 0, grad_scale=grad_scale, found_inf=found_inf)
        if inf:
            for key in ours:
                assert all(torch.equal(a, b) for a, b in zip(ours[key], starts[key])), key
        assert_states_within_an_ulp(ours, theirs, starts, step)
        sync_state(ours, theirs)


def group_scales(params, row_groups, threshold):
    """Block shrink factors max(0, 1 - t / ||w_g||) per element (0 for an all-zero group), the
    norms in float64: groups are tensors, or with row_groups the slices w[i] of 2+-d tensors."""
    scales = []
    for p in params:
        rows = p.double().reshape(p.shape[0], -1) if row_groups and p.dim() >= 2 else p.double().reshape(1, -1)
        norm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        scale = torch.where(norm > threshold, 1 - threshold / norm, torch.zeros_like(norm))
        scales.append(scale.expand_as(rows).reshape(p.shape))
    return scales


def composition(state, step, *, lr, l1, l2, group_lasso, row_groups):
    """Regularized's decoupled step written in plain torch around torch's fused step: decay by
    1 - lr*l2, the step, the soft threshold by lr*l1, then the group shrink by lr*group_lasso."""
    params = state["params"]
    if l2:
        torch._foreach_mul_(params, 1 - lr * l2)
    step(state)
    for p in params:
        p.copy_(torch.sign(p) * torch.clamp(p.abs() - lr * l1, min=0))
    if group_lasso:
        for p, scale in zip(params, group_scales(params, row_groups, lr * group_lasso)):
            p.copy_((p.double() * scale).to(p.dtype))


def reference_penalty(params, l1, l2, group_lasso, row_groups):
    total = 0.0
    for p in params:
        w = p.double()
        rows = w.reshape(w.shape[0], -1) if row_groups and w.dim() >= 2 else w.reshape(1, -1)
        total += l1 * w.abs().sum() + l2 / 2 * (w * w).sum() + group_lasso * torch.linalg.vector_norm(rows, dim=1).sum()
    return total


@gpu
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
@pytest.mark.parametrize("row_groups", [False, True], ids=["tensor_groups", "row_groups"])
@pytest.mark.parametrize("terms", ["l1", "all"])
def test_steps_with_prox_terms_are_the_composition(cuda_backend, optimizer, row_groups, terms):
    """l1 (and l2 before the update, group lasso after the threshold) on: the composition's
    weights, exact zeros included, and the penalty of the starting weights, which is value()'s
    on the same table to the bit."""
    lr, l1, penalty_l2 = 0.05, 0.3, 0.7
    l2, group_lasso = (0.2, 0.5) if terms == "all" else (0.0, 0.0)
    module = step_module()
    dtype = torch.float32
    adam = optimizer == "adamw"
    ours = adam_state(dtype, amsgrad=False) if adam else sgd_state(dtype, momentum=0.9)
    theirs = clone_state(ours)
    table = step_table(module, adam_rows(ours) if adam else sgd_rows(ours), row_groups=row_groups)
    terms_kwargs = dict(l1=l1, l2=l2, group_lasso=group_lasso, penalty_l2=penalty_l2, track=True)
    for step in range(3):
        new_grads(ours, theirs, seed=50 + step)
        starts = [p.clone() for p in ours["params"]]
        expected_penalty = module.value(table, dtype, l1, penalty_l2, group_lasso)
        if adam:
            value = adam_step(module, table, dtype, lr=lr, weight_decay=0.1, **terms_kwargs)
            composition(theirs, lambda s: torch_adam(s, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                                                     amsgrad=False, maximize=False, decoupled=True),
                        lr=lr, l1=l1, l2=l2, group_lasso=group_lasso, row_groups=row_groups)
        else:
            first = torch.full((len(ours["params"]),), step == 0, dtype=torch.bool, device=DEVICE)
            value = sgd_step(module, table, dtype, lr=lr, momentum=0.9, first=first, **terms_kwargs)
            composition(theirs, lambda s: torch._fused_sgd_(s["params"], s["grads"], s["momentum_buffers"],
                                                            weight_decay=0.0, momentum=0.9, lr=lr, dampening=0.0,
                                                            nesterov=False, maximize=False, is_first_step=step == 0),
                        lr=lr, l1=l1, l2=l2, group_lasso=group_lasso, row_groups=row_groups)
        assert torch.equal(value, expected_penalty)
        torch.testing.assert_close(value.double(), torch.as_tensor(
            reference_penalty(starts, l1, penalty_l2, group_lasso, row_groups), device=DEVICE), rtol=1e-5, atol=0)
        if group_lasso:
            # The shrink's norms sum in another order than the reference's float64 ones.
            assert_lists_close(ours["params"], theirs["params"], rtol=1e-6, atol=1e-9)
        else:
            assert_within_an_ulp(ours["params"], theirs["params"], starts, f"step {step}: params")
        for a, b in zip(ours["params"], theirs["params"]):
            assert torch.equal(a == 0, b == 0)
        assert sum(int((p == 0).sum()) for p in ours["params"]) > 0
        sync_state(ours, theirs)


@gpu
def test_a_skipped_step_with_group_lasso_writes_nothing(cuda_backend):
    module = step_module()
    ours = adam_state(torch.float32, amsgrad=False)
    table = step_table(module, adam_rows(ours), row_groups=True)
    new_grads(ours, seed=60)
    starts = clone_state(ours)
    expected_penalty = module.value(table, torch.float32, 0.3, 0.0, 0.5)
    value = adam_step(module, table, torch.float32, lr=0.05, l1=0.3, l2=0.2, group_lasso=0.5, track=True,
                      grad_scale=torch.tensor(2.0, device=DEVICE), found_inf=torch.tensor(1.0, device=DEVICE))
    assert torch.equal(value, expected_penalty)
    for key in ours:
        assert all(torch.equal(a, b) for a, b in zip(ours[key], starts[key])), key


@gpu
@pytest.mark.parametrize("terms", [dict(), dict(l1=0.3, track=True), dict(l1=0.3, group_lasso=0.5, track=True)],
                         ids=["update", "tracked", "shrink"])
def test_step_launches(cuda_backend, terms):
    """Per call, whatever the number of tensors: Adam's steps kernel, the step's pass, with
    the penalty or group lasso a finalize, with group lasso the shrink pass; nothing copied
    from the host when lr, grad_scale, found_inf and SGD's first are on the device."""
    from torch.profiler import ProfilerActivity, profile

    module = step_module()
    shapes = [(5, 3)] * 3000 + [(3, 70000)]
    adam = adam_state(torch.float32, amsgrad=True, shapes=shapes)
    sgd = sgd_state(torch.float32, momentum=0.9, shapes=shapes)
    adam_table = step_table(module, adam_rows(adam))
    sgd_table = step_table(module, sgd_rows(sgd))
    scalars = dict(lr=0.0, lr_tensor=torch.tensor(1e-3, device=DEVICE), grad_scale=torch.tensor(1.0, device=DEVICE),
                   found_inf=torch.tensor(0.0, device=DEVICE))
    first = torch.zeros(len(shapes), dtype=torch.bool, device=DEVICE)

    def calls():
        adam_step(module, adam_table, torch.float32, amsgrad=True, **scalars, **terms)
        sgd_step(module, sgd_table, torch.float32, momentum=0.9, first=first, **scalars, **terms)

    calls()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        calls()
        torch.cuda.synchronize()
    names = [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    passes = 2 if terms.get("group_lasso") else 1
    finalizes = 1 if terms.get("track") else 0
    assert len([n for n in names if "steps_kernel" in n]) == 1, names
    assert len([n for n in names if "items_kernel" in n]) == 2 * passes, names
    assert len([n for n in names if "finalize_kernel" in n]) == 2 * finalizes, names
    assert not [n for n in names if "HtoD" in n], names
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu
def test_adam_step_in_a_cuda_graph(cuda_backend):
    """A step with its lr and GradScaler's tensors on the device, captured once and replayed:
    each replay is the eager step on the values of that moment."""
    module = step_module()
    ours = adam_state(torch.float32, amsgrad=False)
    eager = clone_state(ours)
    table = step_table(module, adam_rows(ours), row_groups=True)
    eager_table = step_table(module, adam_rows(eager), row_groups=True)
    lr = torch.tensor(1e-2, device=DEVICE)
    found_inf = torch.tensor(0.0, device=DEVICE)
    kwargs = dict(lr=0.0, lr_tensor=lr, grad_scale=torch.tensor(4.0, device=DEVICE), found_inf=found_inf,
                  weight_decay=0.1, l1=0.1, group_lasso=0.2, track=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        adam_step(module, table, torch.float32, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    sync_state(ours, eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = adam_step(module, table, torch.float32, **kwargs)
    for step, (new_lr, inf) in enumerate(((3e-3, 0.0), (1e-2, 1.0), (5e-3, 0.0))):
        new_grads(ours, eager, seed=70 + step)
        lr.fill_(new_lr)
        found_inf.fill_(inf)
        graph.replay()
        expected = adam_step(module, eager_table, torch.float32, **kwargs)
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)
        for key in ours:
            assert all(torch.equal(a, b) for a, b in zip(ours[key], eager[key])), key


@gpu
def test_steps_check_their_inputs(cuda_backend):
    module = step_module()
    state = adam_state(torch.float32, amsgrad=False, shapes=[(3, 4), (5,)])
    table = step_table(module, adam_rows(state))
    before = clone_state(state)
    one = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(RuntimeError, match="amsgrad needs 6"):
        adam_step(module, table, torch.float32, lr=1e-3, amsgrad=True)
    with pytest.raises(RuntimeError, match="dtype must be float16, bfloat16, float32 or float64"):
        adam_step(module, table, torch.int32, lr=1e-3)
    with pytest.raises(RuntimeError, match="bad hyperparameters"):
        adam_step(module, table, torch.float32, lr=1e-3, betas=(1.0, 0.999))
    with pytest.raises(RuntimeError, match="penalty_l2 must be non-negative"):
        adam_step(module, table, torch.float32, lr=1e-3, penalty_l2=-1.0)
    with pytest.raises(RuntimeError, match="lr_tensor must be one floating-point element"):
        adam_step(module, table, torch.float32, lr=1e-3, lr_tensor=torch.ones(2, device=DEVICE))
    with pytest.raises(RuntimeError, match="grad_scale must be one float32 element"):
        adam_step(module, table, torch.float32, lr=1e-3, grad_scale=one.double())
    with pytest.raises(RuntimeError, match="found_inf is on cpu but the table is on cuda"):
        adam_step(module, table, torch.float32, lr=1e-3, found_inf=torch.tensor(0.0))
    sgd = sgd_state(torch.float32, momentum=0.9, shapes=[(3, 4), (5,)])
    plain = step_table(module, [sgd["params"], sgd["grads"]])
    with pytest.raises(RuntimeError, match="momentum needs 3"):
        sgd_step(module, plain, torch.float32, lr=1e-3, momentum=0.9)
    with_buffers = step_table(module, sgd_rows(sgd))
    with pytest.raises(RuntimeError, match="bad hyperparameters"):
        sgd_step(module, with_buffers, torch.float32, lr=1e-3, momentum=0.9, nesterov=True, dampening=0.1)
    with pytest.raises(RuntimeError, match="first must be a bool tensor of one flag per tensor"):
        sgd_step(module, with_buffers, torch.float32, lr=1e-3, momentum=0.9, first=torch.ones(3, dtype=torch.bool))
    torch.cuda.synchronize()
    for key in state:  # every check comes before any launch
        assert all(torch.equal(a, b) for a, b in zip(state[key], before[key])), key
