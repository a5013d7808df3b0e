"""Just-in-time (and ahead-of-time) build of fastreg's C++ extensions.

Nothing compiles at import. The first call that needs an extension builds it with
``torch.utils.cpp_extension`` (ninja) and loads it as a library of ``torch.ops.fastreg``
operators; later processes load the binary already built. The extension's name carries a hash
of its sources, compiler flags and torch version, so an edited source, another torch or another
instruction set gets a new name and a fresh build, never a stale binary.

Binaries live where ``cpp_extension`` keeps them (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), or under ``FASTREG_BUILD_DIR`` when that is set, one directory
per versioned name. A finished build is ``<name>.so`` with a record of its digest and host
(``fastreg-build.json``); loading it writes nothing, so a prebuilt directory may be read-only.

Building is safe against processes that die or build at once:

- Each build compiles in a staging directory of its own and publishes the binary by rename, then
  its record; a binary without a matching record (killed mid-publish, truncated, damaged) is
  never loaded but rebuilt.
- One process builds while the others wait, through a lock file that names its holder (pid,
  host, process start). A waiter says once, on stderr, whom it waits for. A holder that died
  (on this host, its pid is gone or belongs to a later process) costs nothing: its lock is
  removed at once and the waiter builds. A wait longer than any build takes
  (:data:`BUILD_WAIT_SECONDS`) gives up. Correctness never rests on the lock: two builders (a
  dead holder's lock taken over by two processes in the same instant) only cost a second build.

A failed build is not an error: it warns once, in one line (the compiler's first error, what
fastreg uses instead, how to fix it), and the extension's backend reports itself unavailable
(``auto`` then picks the next backend). ``python -m fastreg build --verbose`` shows the
compiler's full output, which a failed build also leaves in ``fastreg-build-error.log``.

Two extensions: ``fastreg_cpu`` (``ops.cpp``, which defines the ``torch.ops.fastreg`` schemas, the
CPU kernels and the planner) and ``fastreg_cuda`` (``fastreg_cuda.cu``, which adds CUDA kernels to
those ops with ``TORCH_LIBRARY_IMPL``, and ``cuda_bindings.cpp``, the Python module of its ops over
a plan's table; loaded after ``fastreg_cpu``). Keeping them apart means the
CPU backend never waits for, or depends on, nvcc; the CUDA one is built only where it can run or
was asked for: a CUDA build of torch, a CUDA toolkit (nvcc), and a visible GPU or an explicit
``TORCH_CUDA_ARCH_LIST``. Elsewhere it is *skipped* with a one-line reason, which is not a failure.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

BUILD_DIR_ENV = "FASTREG_BUILD_DIR"


def import_cpp_extension():
    """``torch.utils.cpp_extension``, imported without the warning it logs at import where a
    CUDA toolkit is found but no GPU ("No CUDA runtime is found"): fastreg says itself what it
    builds and why not, once."""
    if "torch.utils.cpp_extension" not in sys.modules:
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            import torch.utils.cpp_extension  # noqa: F401
        finally:
            log.setLevel(level)
    from torch.utils import cpp_extension

    return cpp_extension

# Far longer than any build takes (about 40 s for the CPU extension on 2 cores, a few minutes for
# a CUDA one): a wait this long is for a stuck build, and the waiter falls back instead; a lock
# this old whose holder cannot be checked (another host) is stale.
BUILD_WAIT_SECONDS = 15 * 60
_POLL_SECONDS = 0.25

LOCK_NAME = "fastreg.lock"
RECORD_NAME = "fastreg-build.json"
ERROR_LOG_NAME = "fastreg-build-error.log"
_STAGING_PREFIX = "staging."
# Hashed into the names: a fastreg that lays out or records its builds differently (one that
# builds in place, with another record) never shares a build directory with this one.
_LAYOUT = f"staged builds, {RECORD_NAME}"

FIX_SEE_OUTPUT = "`python -m fastreg build --verbose` shows the compiler's full output"


def _find_csrc() -> Path:
    """The C++ sources: shipped inside the package by a regular install, else the checkout's."""
    package = Path(__file__).resolve().parent
    shipped = package / "csrc"
    return shipped if shipped.is_dir() else package.parent / "csrc"


CSRC = _find_csrc()


class BuildError(RuntimeError):
    """Why an extension is not built and loaded (one line), and what would fix that."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def _say(message: str) -> None:
    print(f"fastreg: {message}", file=sys.stderr, flush=True)


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else text + "."


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- who holds a lock ---------------------------------------------------------------------------


def _host() -> str:
    return socket.gethostname()


def _safe_host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", _host())


def _own_name() -> str:
    """This process's files among those of every host sharing a build directory: ``<host>.<pid>``."""
    return f"{_safe_host()}.{os.getpid()}"


def _process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (Linux: clock ticks after boot; None where unknown): tells the
    process that wrote a lock from a later one given the same pid (containers reuse low pids)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else None


def _process_alive(pid: int, start: Optional[str]) -> Optional[bool]:
    """Whether process ``pid`` of this host runs (None: cannot tell)."""
    if sys.platform == "win32":
        return None  # os.kill there terminates the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    now = _process_start(pid)
    return start is None or now is None or now == start


class _Holder:
    """What a lock file says about the process holding it."""

    def __init__(self, path: Path):
        with open(path) as file:
            status = os.fstat(file.fileno())
            text = file.read()
        self.inode = status.st_ino
        self.age = max(0.0, time.time() - status.st_mtime)
        try:
            record = json.loads(text)
            self.pid: Optional[int] = int(record["pid"]) if int(record["pid"]) > 0 else None
            self.host: Optional[str] = str(record["host"])
            self.start: Optional[str] = record.get("process_start")
        except (ValueError, KeyError, TypeError):
            self.pid = self.host = self.start = None

    def __str__(self) -> str:
        if self.pid is None:
            return f"an unknown process (its lock names none, {_duration(self.age)} old)"
        where = "" if self.host == _host() else f" on host {self.host}"
        return f"pid {self.pid}{where} (started {_duration(self.age)} ago)"

    def stale_reason(self, max_age: float) -> Optional[str]:
        """Why the holder is gone (None: it may still be building)."""
        alive = _process_alive(self.pid, self.start) if self.pid is not None and self.host == _host() else None
        if alive is not None:
            return None if alive else f"pid {self.pid}, whose build it was, is no longer running"
        if self.age > max_age:
            return f"it is {_duration(self.age)} old, longer than any build takes"
        return None


class _BuildLock:
    """Held by the one process that builds in a build directory, while the others wait.

    The lock file appears atomically with its holder record already in it: the record is written
    to a file of the holder's own, then hard-linked to the lock's name, which fails if a lock
    exists (file systems without hard links create it with ``O_EXCL`` instead).
    """

    def __init__(self, build_dir: Path, what: str):
        self.path = build_dir / LOCK_NAME
        self.what = what
        self._inode: Optional[int] = None

    def acquire(self, wait_seconds: float) -> None:
        """Takes the lock, waiting for a live holder up to ``wait_seconds``; raises BuildError
        when that holder is still building then."""
        waiting_since: Optional[float] = None
        while not self._create():
            try:
                holder = _Holder(self.path)
            except FileNotFoundError:
                continue  # released since: try again at once
            stale = holder.stale_reason(max_age=wait_seconds)
            if stale is not None:
                self._remove(holder, stale)
                continue
            now = time.monotonic()
            if waiting_since is None:
                waiting_since = now
                _say(f"waiting for {holder} to finish building {self.what} (lock: {self.path})")
            elif now - waiting_since > wait_seconds:
                raise BuildError(
                    f"gave up after waiting {_duration(now - waiting_since)} for {holder} to finish building "
                    f"{self.what} (lock: {self.path})",
                    f"if no build is running there any more, delete {self.path}; else let it finish "
                    f"and run `python -m fastreg build`",
                )
            time.sleep(_POLL_SECONDS)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _record(self) -> str:
        pid = os.getpid()
        return json.dumps({"pid": pid, "host": _host(), "process_start": _process_start(pid), "since": time.time()})

    def _create(self) -> bool:
        record = self.path.with_name(f"{LOCK_NAME}.{_own_name()}.tmp")
        record.write_text(self._record())
        try:
            os.link(record, self.path)
            self._inode = record.stat().st_ino
            return True
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return self._create_exclusive()  # no hard links on this file system
        finally:
            record.unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as file:
            file.write(self._record())
            self._inode = os.fstat(file.fileno()).st_ino
        return True

    def _remove(self, holder: _Holder, why: str) -> None:
        # Renamed aside first, to remove only the lock that was judged: another waiter may have
        # removed it and taken a fresh one in the meantime, which goes back.
        aside = self.path.with_name(f"{LOCK_NAME}.{_own_name()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if os.stat(aside).st_ino == holder.inode:
            _say(f"removed {self.path}: {why}")
        else:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        aside.unlink()


# -- finished builds: staged, published, recorded -----------------------------------------------


def _staging_directory(build_dir: Path) -> Path:
    return build_dir / f"{_STAGING_PREFIX}{_own_name()}"


def _remove_abandoned_staging(build_dir: Path) -> None:
    """Removes the staging directories of builds that did not finish: of processes of this host
    that are gone, or of others older than any build takes."""
    for path in build_dir.glob(_STAGING_PREFIX + "*"):
        host, _, pid = path.name[len(_STAGING_PREFIX):].rpartition(".")
        alive = _process_alive(int(pid), None) if host == _safe_host() and pid.isdigit() and int(pid) > 0 else None
        if alive is None:
            try:
                alive = time.time() - path.stat().st_mtime <= BUILD_WAIT_SECONDS
            except FileNotFoundError:
                continue
        if not alive:
            shutil.rmtree(path, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_record(build_dir: Path) -> Optional[dict]:
    try:
        record = json.loads((build_dir / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_atomically(path: Path, text: str) -> None:
    """Writes ``path`` whole or not at all (readers never see a part), as another process may
    read it meanwhile."""
    temporary = path.with_name(f"{path.name}.{_own_name()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _import_binary(module: str, binary: Path):
    """Imports the Python module ``module`` from the extension binary ``binary`` (which also
    registers its operators, as loading it with torch.ops would)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module, binary)
    if spec is None or spec.loader is None:
        raise ImportError(f"{binary} is not an importable module")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def _write_record(build_dir: Path, binary: str, module: str) -> None:
    record = {"binary": binary, "module": module, "sha256": _sha256(build_dir / binary), "host": _host(),
              "finished": time.time()}
    _write_atomically(build_dir / RECORD_NAME, json.dumps(record, indent=1) + "\n")


def _write_error_log(build_dir: Path, text: str) -> Optional[Path]:
    """Keeps a failed build's full output (None where it cannot be written)."""
    try:
        log = build_dir / ERROR_LOG_NAME
        _write_atomically(log, text)
        return log
    except OSError:
        return None


# -- why a build failed, in one line, and what fixes it -----------------------------------------


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


FIX_BUILD_DIR = (f"set {BUILD_DIR_ENV} to a writable directory with free space (on a cluster: a shared one, built "
                 f"once with `python -m fastreg build` before the job starts, or one per host)")


def _io_failure(error: OSError) -> BuildError:
    what = f"{error.strerror}: {error.filename}" if error.strerror and error.filename else _first_line(error)
    return BuildError(f"cannot write the build directory ({what})", FIX_BUILD_DIR)


# Lines of a build's output that name its cause: a failed write (the linker's comes before the
# compiler driver's "error: ld returned 1"), else the compiler's first error.
_IO_ERRORS = re.compile(r"No space left on device|Disk quota exceeded|File too large|File size limit exceeded|"
                        r"Read-only file system|Permission denied")
# An older compiler than torch's headers need: their own check, an unknown -std, or the C++17/20
# library names they use missing from std.
_STANDARD_ERRORS = re.compile(r"C\+\+ ?\d\d\b|-std=|is not a member of .std.|in namespace .std. does not name|"
                              r"no (?:member|template|type) named .+ in namespace .std.")


def _compile_failure(error: Exception, build_dir: Path) -> BuildError:
    """A failed build's cause in one line, and the fix its kind suggests."""
    import torch

    text = str(error)
    log = _write_error_log(build_dir, text)
    lines = [line.strip() for line in text.splitlines()]
    line = next((line for line in lines if _IO_ERRORS.search(line)), None)
    if line is not None:
        return BuildError(f"build failed: {line}", FIX_BUILD_DIR)
    line = next((line for line in lines if "error:" in line), _first_line(error))
    if _STANDARD_ERRORS.search(line):
        standard = re.search(r"-std=(c\+\+\w+)", text)
        needs = f" (they are compiled as {standard.group(1).upper()})" if standard else ""
        fix = (f"the C++ compiler ({_compiler()}) may be too old for the headers of torch {torch.__version__}{needs}: "
               f"install a newer g++ or clang++ and set CXX to it, or use a torch release whose headers it compiles")
    elif "Ninja is required" in text:
        fix = "install ninja (`pip install ninja`)"
    else:
        fix = FIX_SEE_OUTPUT + (f" (also in {log})" if log else "")
    return BuildError(f"build failed: {line}", fix)


# -- one extension ------------------------------------------------------------------------------


class _Extension:
    """One C++ extension: its sources, flags, and the outcome of building and loading it."""

    def __init__(self, name: str, sources: List[str], headers: List[str], root: Path = CSRC,
                 fallback: str = "fastreg uses another backend", on_load: Optional[Callable[[], None]] = None,
                 python_module: bool = False):
        self.name = name
        self.root = Path(root)
        self.sources = sources
        self.headers = headers
        # A Python module (pybind11) besides its torch.ops operators; loaded, it is `module`.
        self.python_module = python_module
        self.module = None
        self.fallback = fallback
        self.on_load = on_load
        self.fix: Optional[str] = None  # set when a build or load failed
        self._lock = threading.Lock()
        self._done = False
        self._error: Optional[str] = None
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
        capability = torch.backends.cpu.get_cpu_capability() if platform.machine() in ("x86_64", "AMD64") else None
        if capability == "AVX512":
            # torch's own kernels (its fused AdamW among them) run AVX-512 here: with half the
            # vector width, the divides and square roots of a bf16 Adam step bound the time.
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                      "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        elif capability == "AVX2":
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
        digest.update(_LAYOUT.encode())
        return f"{self.name}_{digest.hexdigest()[:16]}"

    def binary_name(self) -> str:
        cpp_extension = import_cpp_extension()

        return self.versioned_name() + cpp_extension.LIB_EXT

    def build_directory(self) -> Path:
        """Where this build's binary lives: ``$FASTREG_BUILD_DIR/<name>``, else cpp_extension's
        own place (``$TORCH_EXTENSIONS_DIR/<name>`` or its default)."""
        cpp_extension = import_cpp_extension()

        name = self.versioned_name()
        if os.environ.get(BUILD_DIR_ENV):
            path = Path(os.environ[BUILD_DIR_ENV]) / name
            path.mkdir(parents=True, exist_ok=True)
            return path
        return Path(cpp_extension._get_build_directory(name, verbose=False))

    def _build(self, verbose: bool) -> None:
        missing = [str(p) for p in self._paths(self.sources + self.headers) if not p.is_file()]
        if missing:
            raise BuildError(f"C++ sources not found: {', '.join(missing)}",
                             "reinstall fastreg (its C++ sources ship with the package)")
        build_dir = self.build_directory()
        if self._load_finished(build_dir) is not None:
            lock = _BuildLock(build_dir, self.name)
            lock.acquire(BUILD_WAIT_SECONDS)
            try:
                problem = self._load_finished(build_dir)  # the build it waited for, if any
                if problem is not None:
                    if shutil.which(_compiler()) is None:
                        raise BuildError(f"no C++ compiler: {_compiler()} not found",
                                         "install a C++ compiler (g++ or clang++; or set CXX to one), then run "
                                         "`python -m fastreg build`")
                    if problem:
                        warnings.warn(f"fastreg: the cached {self.name} build in {build_dir}: {problem}; rebuilding it",
                                      RuntimeWarning, stacklevel=4)
                    _remove_abandoned_staging(build_dir)
                    self._build_and_publish(build_dir, verbose)
            finally:
                lock.release()
        if self.on_load is not None:
            self.on_load()

    def _load_finished(self, build_dir: Path) -> Optional[str]:
        """Loads the finished build in ``build_dir``: None when loaded, else why it must be built
        ("" when there is none). Raises BuildError for another host's build that does not load
        here, which rebuilding would only take away from that host."""
        import torch

        binary = build_dir / self.binary_name()
        if not binary.is_file():
            return ""
        record = _read_record(build_dir)
        if record is None or record.get("binary") != binary.name:
            return "its binary has no record of a finished build"
        # Loading a damaged binary can kill the process (SIGBUS), hence the digest first.
        if record.get("sha256") != _sha256(binary):
            return "its binary differs from the one recorded after its build (damaged)"
        try:
            if self.python_module:
                self.module = _import_binary(record.get("module", self.versioned_name()), binary)
            else:
                torch.ops.load_library(str(binary))
        except (OSError, ImportError) as error:
            host = record.get("host")
            if host != _host():
                raise BuildError(
                    f"the {self.name} build in {build_dir} was made on host {host} and does not load here "
                    f"({_first_line(error)})",
                    f"set {BUILD_DIR_ENV} to a directory of this host's own (or of hosts like it) and run "
                    f"`python -m fastreg build` there",
                ) from None
            return f"it did not load ({_first_line(error)})"
        return None

    def _build_and_publish(self, build_dir: Path, verbose: bool) -> None:
        staging = _staging_directory(build_dir)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            try:
                self._load(staging, verbose)
            except Exception as error:
                if isinstance(error, OSError) and error.errno is not None:
                    raise  # the file system's (a full disk), not the compiler's; dlopen's have no errno
                raise _compile_failure(error, build_dir) from None
            # Record gone before the binary changes, written after: no reader ever pairs a
            # record with a binary it was not made for.
            (build_dir / RECORD_NAME).unlink(missing_ok=True)
            binary = self.binary_name()
            # Named <name>_v1 and so on when one process builds the same name again (cpp_extension's
            # versioning): published under the name later processes look for.
            (built,) = staging.glob(f"{self.versioned_name()}*{Path(binary).suffix}")
            os.replace(staging / "build.ninja", build_dir / "build.ninja")
            os.replace(built, build_dir / binary)
            # A Python module keeps the name it was compiled under (its PyInit_ symbol).
            _write_record(build_dir, binary, built.name[: -len(Path(binary).suffix)])
            (build_dir / ERROR_LOG_NAME).unlink(missing_ok=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _load(self, build_dir: Path, verbose: bool) -> None:
        cpp_extension = import_cpp_extension()

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
        warn = False
        with self._lock:
            if not self._done:
                skip = self.skip_reason()
                if skip is not None:
                    self._error = skip  # nothing was attempted, so there is nothing to warn about
                else:
                    failure = None
                    try:
                        self._build(verbose)
                    except BuildError as error:
                        failure = error
                    except OSError as error:  # unwritable or full build directory
                        failure = _io_failure(error)
                    except Exception as error:  # any failure means: fall back, and say why
                        failure = BuildError(f"build failed: {_first_line(error)}", FIX_SEE_OUTPUT)
                    if failure is not None:
                        self._error, self.fix = failure.reason, failure.fix
                        warn = True
                self._done = True
        if warn:
            warnings.warn(f"fastreg: {self.name} is unavailable, so {self.fallback}. Cause: {_sentence(self._error)} "
                          f"To fix: {_sentence(self.fix)}", RuntimeWarning, stacklevel=3)
        return self._error


def _arch_numbers(arch_list: str) -> List[int]:
    """Compute capabilities (major * 10 + minor) named by a ``TORCH_CUDA_ARCH_LIST`` value."""
    numbers = [int(major) * 10 + int(minor) for major, minor in re.findall(r"(\d+)\.(\d+)", arch_list)]
    # cpp_extension also takes architecture names; only the pre-Volta ones change the build.
    named = {"Kepler": 35, "Maxwell": 50, "Pascal": 60}
    return numbers + [number for name, number in named.items() if name in arch_list]


class _CudaExtension(_Extension):
    """The CUDA kernels: built with nvcc, loaded after the CPU extension that defines the ops."""

    def __init__(self, name: str, sources: List[str], headers: List[str], requires: _Extension, root: Path = CSRC,
                 fallback: str = "fastreg uses another backend", python_module: bool = False):
        super().__init__(name, sources, headers, root, fallback=fallback, python_module=python_module)
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
        return cuda_flags()

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
            raise BuildError(f"needs {self.requires.name}, which defines the ops: {required}", self.requires.fix or FIX_SEE_OUTPUT)
        super()._build(verbose)


def find_nvcc() -> Optional[str]:
    """The nvcc that cpp_extension would use: ``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``), else PATH's."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_flags() -> List[str]:
    """nvcc flags of the CUDA extension (the CI compile check uses them too).

    ``--fmad=false``: nvcc would otherwise contract ``a * b + c`` into an FMA wherever it can,
    and the kernels decide which products are fused, as the CPU kernels do. No ``-std``:
    cpp_extension adds torch's own when none is given.
    """
    return ["-O3", "--fmad=false"]


def compiled_std_flags(extension: "_Extension") -> List[str]:
    """The ``-std=`` flags ``extension``'s C++ sources were compiled with, read from the ninja
    file cpp_extension wrote for its build (empty when it has not been built)."""
    ninja = extension.build_directory() / "build.ninja"
    if not ninja.is_file():
        return []
    cflags = next((line for line in ninja.read_text().splitlines() if line.startswith("cflags =")), "")
    return re.findall(r"-std=\S+", cflags)


def _register_fakes() -> None:
    from . import _ops

    _ops.register_fakes()


CPU = _Extension("fastreg_cpu", sources=["ops.cpp", "fastreg_cpu.cpp", "fastreg_optim.cpp", "planner.cpp"],
                 headers=["fastreg.h", "plan.h", "cpu_table.h"],
                 fallback="`auto` uses the torch backend for CPU tensors",
                 on_load=_register_fakes, python_module=True)
CUDA = _CudaExtension("fastreg_cuda", sources=["fastreg_cuda.cu", "cuda_bindings.cpp"],
                      headers=["fastreg.h", "plan.h", "fastreg_cuda.h"], requires=CPU,
                      fallback="`auto` uses the triton backend (where it imports), else torch, for CUDA tensors",
                      python_module=True)

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
