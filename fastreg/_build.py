"""Just-in-time (and ahead-of-time) build of fastreg's C++ extensions.

Nothing compiles at import. The first call that needs an extension builds it with
``torch.utils.cpp_extension.load`` (ninja) and loads it as a library of ``torch.ops.fastreg``
operators; later processes find the binary already built. The extension's name carries a hash
of its sources, compiler flags and torch version, so an edited source, another torch or another
instruction set gets a new name and a fresh build, never a stale binary.

Binaries live where ``cpp_extension`` keeps them (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), or under ``FASTREG_BUILD_DIR`` when that is set.

A failed build is not an error: it warns once, with the compiler's message, and the extension's
backend reports itself unavailable (``auto`` then picks the ``torch`` backend).
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional

BUILD_DIR_ENV = "FASTREG_BUILD_DIR"


def _find_csrc() -> Path:
    """The C++ sources: shipped inside the package by a regular install, else the checkout's."""
    package = Path(__file__).resolve().parent
    shipped = package / "csrc"
    return shipped if shipped.is_dir() else package.parent / "csrc"


CSRC = _find_csrc()


class _Extension:
    """One C++ extension: its sources, flags, and the outcome of building and loading it."""

    def __init__(self, name: str, sources: List[str], headers: List[str], root: Path = CSRC):
        self.name = name
        self.root = Path(root)
        self.sources = sources
        self.headers = headers
        self._lock = threading.Lock()
        self._done = False
        self._error: Optional[str] = None
        self._full_error = ""
        self._warned = False

    def _paths(self, names: List[str]) -> List[Path]:
        return [self.root / name for name in names]

    def _cflags(self) -> List[str]:
        import torch

        flags = ["-O3", "-std=c++17", "-ffp-contract=off"]
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

    def versioned_name(self) -> str:
        import torch

        digest = hashlib.sha256()
        for path in self._paths(self.sources + self.headers):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        digest.update(" ".join(self._cflags() + self._ldflags()).encode())
        digest.update(torch.__version__.encode())
        return f"{self.name}_{digest.hexdigest()[:16]}"

    def _build(self, verbose: bool) -> None:
        from torch.utils import cpp_extension

        missing = [str(p) for p in self._paths(self.sources + self.headers) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"C++ sources not found: {', '.join(missing)}")
        name = self.versioned_name()
        build_dir = None
        if os.environ.get(BUILD_DIR_ENV):
            build_dir = os.path.join(os.environ[BUILD_DIR_ENV], name)
            os.makedirs(build_dir, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in self._paths(self.sources)],
            extra_cflags=self._cflags(),
            extra_ldflags=self._ldflags(),
            extra_include_paths=[str(self.root)],
            build_directory=build_dir,
            is_python_module=False,
            verbose=verbose,
        )
        from . import _ops

        _ops.register_fakes()

    def ensure(self, verbose: bool = False) -> Optional[str]:
        """Builds and loads the extension once per process; None on success, else why not."""
        if self._done:
            return self._error
        with self._lock:
            if not self._done:
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


def _reason(error: Exception) -> str:
    """A one-line cause: the compiler's first error line when there is one."""
    text = str(error)
    for line in text.splitlines():
        if "error:" in line:
            return f"build failed: {line.strip()}"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"build failed: {first}"


CPU = _Extension("fastreg_cpu", sources=["ops.cpp", "fastreg_cpu.cpp"], headers=["fastreg.h"])

EXTENSIONS: Dict[str, _Extension] = {CPU.name: CPU}


def cpu_unavailable_reason() -> Optional[str]:
    """None when the CPU extension is built and loaded (building it now if needed), else why not."""
    return CPU.ensure()


def build_all(verbose: bool = False) -> Dict[str, str]:
    """Builds every extension now (``python -m fastreg build``): name -> "built" or the failure reason."""
    results = {}
    for name, extension in EXTENSIONS.items():
        error = extension.ensure(verbose=verbose)
        results[name] = "built" if error is None else error
    return results
