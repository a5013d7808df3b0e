"""The ``cuda`` backend: its sources compile with nvcc (in CI, without a GPU), its build is
skipped with a reason where it cannot run, its plans lay out tables in the kernels' limits, and,
on a GPU, what only the CUDA kernels promise: launches per call, tables read on other streams
and in CUDA graphs, device scalars never copied to the host, views read like their copies. Every
op's agreement with the ``reference`` backend is tests/test_conformance.py's ``cuda`` target.

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


# About a minute on two CPU cores (every dtype and kernel variant; nvcc --threads compiles the two
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
