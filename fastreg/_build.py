"""Just-in-time (and ahead-of-time) build of fastreg's C++ extensions.

Nothing compiles at import. The first call that needs an extension builds it with
``torch.utils.cpp_extension.load`` (ninja) and loads it as a library of ``torch.ops.fastreg``
operators; later processes find the binary already built. The extension's name carries a hash
of its sources, compiler flags and torch version, so an edited source, another torch or another
instruction set gets a new name and a fresh build, never a stale binary.

Binaries live where ``cpp_extension`` keeps them (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), or under ``FASTREG_BUILD_DIR`` when that is set. A cached binary
that does not match the digest recorded after its build (truncated, damaged), or fails to load, is
deleted and built again, and a ``lock`` file left by a build that was killed is removed once it is
older than any build takes.

A failed build is not an error: it warns once, with the compiler's message, and the extension's
backend reports itself unavailable (``auto`` then picks the ``torch`` backend).

Two extensions: ``fastreg_cpu`` (``ops.cpp``, which defines the ``torch.ops.fastreg`` schemas, and
the CPU kernels) and ``fastreg_cuda`` (only ``fastreg_cuda.cu``, which adds CUDA kernels to those
ops with ``TORCH_LIBRARY_IMPL`` and is loaded after ``fastreg_cpu``). Keeping them apart means the
CPU backend never waits for, or depends on, nvcc; the CUDA one is built only where it can run or
was asked for: a CUDA build of torch, a CUDA toolkit (nvcc), and a visible GPU or an explicit
``TORCH_CUDA_ARCH_LIST``. Elsewhere it is *skipped* with a one-line reason, which is not a failure.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

BUILD_DIR_ENV = "FASTREG_BUILD_DIR"


def _find_csrc() -> Path:
    """The C++ sources: shipped inside the package by a regular install, else the checkout's."""
    package = Path(__file__).resolve().parent
    shipped = package / "csrc"
    return shipped if shipped.is_dir() else package.parent / "csrc"


CSRC = _find_csrc()


class _Extension:
    """One C++ extension: its sources, flags, and the outcome of building and loading it."""

    def __init__(self, name: str, sources: List[str], headers: List[str], root: Path = CSRC, python_module: bool = False):
        self.name = name
        self.root = Path(root)
        self.sources = sources
        self.headers = headers
        # A Python module (pybind11) besides its torch.ops operators; loaded, it is `module`.
        self.python_module = python_module
        self.module = None
        self._lock = threading.Lock()
        self._done = False
        self._error: Optional[str] = None
        self._full_error = ""
        self._warned = False

    def _paths(self, names: List[str]) -> List[Path]:
        return [self.root / name for name in names]

    def _cflags(self) -> List[str]:
        import torch

        # No -std: cpp_extension passes the standard torch's own headers need (C++20 today),
        # and a second -std after it would override it (torch 2.14's headers fail in C++17).
        flags = ["-O3", "-ffp-contract=off"]
        if sys.platform.startswith("linux"):
            # at::parallel_for is header code over OpenMP in torch's Linux builds; libgomp then
            # resolves to the copy torch already loaded (same soname), so set_num_threads applies.
            flags.append("-fopenmp")
        # ATen's vector types pick AVX2 code from these macros; the inline namespace named by
        # CPU_CAPABILITY keeps them from clashing with another instruction set's copies.
        if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        return flags

    def _ldflags(self) -> List[str]:
        return ["-fopenmp"] if sys.platform.startswith("linux") else []

    def _cuda_cflags(self) -> List[str]:
        return []

    def skip_reason(self) -> Optional[str]:
        """Why this extension is not built on this machine at all (None: it should build here)."""
        return None

    def versioned_name(self) -> str:
        import torch

        digest = hashlib.sha256()
        for path in self._paths(self.sources + self.headers):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        digest.update(" ".join(self._cflags() + self._ldflags() + self._cuda_cflags()).encode())
        digest.update(torch.__version__.encode())
        return f"{self.name}_{digest.hexdigest()[:16]}"

    def build_directory(self) -> Path:
        """Where this build's objects and binary live: ``$FASTREG_BUILD_DIR/<name>``, else
        cpp_extension's own place (``$TORCH_EXTENSIONS_DIR/<name>`` or its default)."""
        from torch.utils import cpp_extension

        name = self.versioned_name()
        if os.environ.get(BUILD_DIR_ENV):
            path = Path(os.environ[BUILD_DIR_ENV]) / name
            path.mkdir(parents=True, exist_ok=True)
            return path
        return Path(cpp_extension._get_build_directory(name, verbose=False))

    def _build(self, verbose: bool) -> None:
        missing = [str(p) for p in self._paths(self.sources + self.headers) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"C++ sources not found: {', '.join(missing)}")
        build_dir = self.build_directory()
        _clear_stale_lock(build_dir)
        # The name hashes the sources and flags, so a binary under it can only be wrong by
        # damage (a truncated copy, a full disk, an interrupted link). Loading a damaged one can
        # kill the process (SIGBUS), so it is checked against the record written when it was
        # built, and built afresh when it does not match.
        problem = _binary_problem(build_dir)
        if problem is None:
            try:
                self._load(build_dir, verbose)
            except Exception as error:
                if not any(build_dir.glob("*.so")):
                    raise
                problem = f"it did not load ({_reason(error)})"
        if problem is not None:
            warnings.warn(f"fastreg: the cached {self.name} build in {build_dir}: {problem}; rebuilding it",
                          RuntimeWarning, stacklevel=3)
            shutil.rmtree(build_dir, ignore_errors=True)
            build_dir.mkdir(parents=True, exist_ok=True)
            self._load(build_dir, verbose)
        _record_binaries(build_dir)
        from . import _ops

        _ops.register_fakes()

    def _load(self, build_dir: Path, verbose: bool) -> None:
        from torch.utils import cpp_extension

        self.module = cpp_extension.load(
            name=self.versioned_name(),
            sources=[str(p) for p in self._paths(self.sources)],
            extra_cflags=self._cflags(),
            extra_cuda_cflags=self._cuda_cflags() or None,
            extra_ldflags=self._ldflags(),
            extra_include_paths=[str(self.root)],
            build_directory=str(build_dir),
            is_python_module=self.python_module,
            verbose=verbose,
        )

    def ensure(self, verbose: bool = False) -> Optional[str]:
        """Builds and loads the extension once per process; None on success, else why not."""
        if self._done:
            return self._error
        with self._lock:
            if not self._done:
                skip = self.skip_reason()
                if skip is not None:
                    # Nothing was attempted, so there is nothing to warn about.
                    self._error = skip
                    self._warned = True
                else:
                    try:
                        self._build(verbose)
                    except Exception as error:  # any failure means: fall back, and say why
                        self._error = _reason(error)
                        self._full_error = str(error)
                self._done = True
        if self._error is not None and not self._warned:
            self._warned = True
            warnings.warn(
                f"fastreg: building the C++ extension {self.name!r} failed; falling back to the torch backend.\n"
                f"{self._full_error}",
                RuntimeWarning,
                stacklevel=3,
            )
        return self._error


# A build takes under a minute; a lock file this old was left by a build that was killed, and
# cpp_extension would wait for it forever.
STALE_LOCK_SECONDS = 15 * 60


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(f"fastreg: removing {lock}, left {age / 60:.0f} minutes ago by a build that did not finish",
                      RuntimeWarning, stacklevel=4)
        lock.unlink(missing_ok=True)


BINARY_RECORD = "fastreg-binaries.sha256"


def _digests(build_dir: Path) -> Dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(build_dir.glob("*.so"))}


def _binary_problem(build_dir: Path) -> Optional[str]:
    """Why the binary cached in ``build_dir`` must not be loaded (None: none cached, or it is
    the one recorded after its build)."""
    found = _digests(build_dir)
    if not found:
        return None
    try:
        recorded = dict(line.split(maxsplit=1)[::-1] for line in (build_dir / BINARY_RECORD).read_text().splitlines() if line)
    except (FileNotFoundError, ValueError):
        return "its binary has no record of a finished build"
    return None if recorded == found else "its binary differs from the one recorded after its build (damaged)"


def _record_binaries(build_dir: Path) -> None:
    """Records the built binaries' digests (``sha256sum`` format), written atomically, as
    concurrent processes may finish the same build together."""
    record = build_dir / BINARY_RECORD
    temporary = record.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text("".join(f"{digest}  {name}\n" for name, digest in _digests(build_dir).items()))
    os.replace(temporary, record)


def _reason(error: Exception) -> str:
    """A one-line cause: the compiler's first error line when there is one."""
    text = str(error)
    for line in text.splitlines():
        if "error:" in line:
            return f"build failed: {line.strip()}"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"build failed: {first}"


def _arch_numbers(arch_list: str) -> List[int]:
    """Compute capabilities (major * 10 + minor) named by a ``TORCH_CUDA_ARCH_LIST`` value."""
    numbers = [int(major) * 10 + int(minor) for major, minor in re.findall(r"(\d+)\.(\d+)", arch_list)]
    # cpp_extension also takes architecture names; only the pre-Volta ones change the build.
    named = {"Kepler": 35, "Maxwell": 50, "Pascal": 60}
    return numbers + [number for name, number in named.items() if name in arch_list]


class _CudaExtension(_Extension):
    """The CUDA kernels: built with nvcc, loaded after the CPU extension that defines the ops."""

    def __init__(self, name: str, sources: List[str], headers: List[str], requires: _Extension, root: Path = CSRC):
        super().__init__(name, sources, headers, root)
        self.requires = requires
        self._skip: Optional[Tuple[Optional[str]]] = None  # computed once: it asks PATH and the driver

    def _cflags(self) -> List[str]:
        return ["-O3"]

    def _ldflags(self) -> List[str]:
        return []

    def target_archs(self) -> List[int]:
        """The compute capabilities this build targets: those cpp_extension compiles for."""
        import torch

        listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if listed and listed != "native":
            return _arch_numbers(listed)
        if not torch.cuda.is_available():
            return []
        return sorted({major * 10 + minor for major, minor in
                       (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))})

    def _cuda_cflags(self) -> List[str]:
        return cuda_flags(self.target_archs())

    def skip_reason(self) -> Optional[str]:
        if self._skip is None:
            self._skip = (self._find_skip_reason(),)
        return self._skip[0]

    def _find_skip_reason(self) -> Optional[str]:
        import torch

        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        if find_nvcc() is None:
            return "no CUDA toolkit: nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            return "no CUDA GPU visible and TORCH_CUDA_ARCH_LIST not set (no architecture to build for)"
        return None

    def _build(self, verbose: bool) -> None:
        required = self.requires.ensure(verbose=verbose)
        if required is not None:
            raise RuntimeError(f"needs {self.requires.name}, which defines the ops: {required}")
        super()._build(verbose)


def find_nvcc() -> Optional[str]:
    """The nvcc that cpp_extension would use: ``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``), else PATH's."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_flags(archs: List[int]) -> List[str]:
    """nvcc flags of the CUDA extension (the CI compile check uses them too).

    ``--fmad=false``: nvcc would otherwise contract ``a * b + c`` into an FMA wherever it can,
    and the kernels decide which products are fused, as the CPU kernels do. Kernel parameters
    over 4 KB need compute capability 7.0+, so a build that also targets older GPUs uses 4 KB
    tables (more launches for long tensor lists). No ``-std``: cpp_extension adds torch's own
    when none is given.
    """
    flags = ["-O3", "--fmad=false"]
    if archs and min(archs) < 70:
        flags.append("-DFASTREG_KERNEL_PARAM_BYTES=4096")
    return flags


def compiled_std_flags(extension: "_Extension") -> List[str]:
    """The ``-std=`` flags ``extension``'s C++ sources were compiled with, read from the ninja
    file cpp_extension wrote for its build (empty when it has not been built)."""
    ninja = extension.build_directory() / "build.ninja"
    if not ninja.is_file():
        return []
    cflags = next((line for line in ninja.read_text().splitlines() if line.startswith("cflags =")), "")
    return re.findall(r"-std=\S+", cflags)


CPU = _Extension("fastreg_cpu", sources=["ops.cpp", "fastreg_cpu.cpp", "planner.cpp"], headers=["fastreg.h", "plan.h"],
                 python_module=True)
CUDA = _CudaExtension("fastreg_cuda", sources=["fastreg_cuda.cu"], headers=["fastreg.h", "plan.h"], requires=CPU)

EXTENSIONS: Dict[str, _Extension] = {CPU.name: CPU, CUDA.name: CUDA}

SKIPPED = "skipped: "


def cpu_unavailable_reason() -> Optional[str]:
    """None when the CPU extension is built and loaded (building it now if needed), else why not."""
    return CPU.ensure()


def planner():
    """The C++ planner module (``csrc/planner.cpp``, part of the CPU extension, building it now
    if needed), or None where the CPU extension cannot be built."""
    return CPU.module if CPU.ensure() is None else None


def planner_if_loaded():
    """The C++ planner module when the CPU extension is loaded already, else None (no build)."""
    return CPU.module if CPU._done and CPU._error is None else None


# Backends that are pure PyTorch: asking for one of them never starts a C++ build.
PURE_BACKENDS = ("torch", "reference")


def prepare_planner(backend: str) -> None:
    """Builds the CPU extension (once per process) unless ``backend`` is pure PyTorch: every
    other choice may need it, for its kernels or for the planner of its work layout."""
    if backend not in PURE_BACKENDS and not CPU._done:
        CPU.ensure()


def cuda_unavailable_reason() -> Optional[str]:
    """None when the CUDA extension is built and loaded (building it now if needed), else why not."""
    return CUDA.ensure()


def build_all(verbose: bool = False) -> Dict[str, str]:
    """Builds every extension now (``python -m fastreg build``): name -> "built", "skipped: <why>"
    for one that cannot be built on this machine (the CUDA one without CUDA), or the failure reason."""
    results = {}
    for name, extension in EXTENSIONS.items():
        skip = extension.skip_reason()
        if skip is not None:
            results[name] = SKIPPED + skip
            continue
        error = extension.ensure(verbose=verbose)
        results[name] = "built" if error is None else error
    return results


def failures(results: Dict[str, str]) -> Dict[str, str]:
    """The extensions of a :func:`build_all` result that failed (neither built nor skipped)."""
    return {name: status for name, status in results.items() if status != "built" and not status.startswith(SKIPPED)}
