"""The build machinery of the C++ extensions (fastreg/_build.py): first use, the lock between
processes, builds that are killed, fail or cannot be written, damaged binaries, and what is said.

Most tests build a probe: a one-function C++ file that cpp_extension builds in about a second,
in a temporary ``FASTREG_BUILD_DIR``, in fresh processes (what one process has loaded stays
loaded). The ones marked slow do the same with the real ``fastreg_cpu`` (about 40 s a build).
A compiler wrapper logs every compile and can make one wait, so that a build is killed or
contended while it is surely under way.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from fastreg import _build

COMPILER = shutil.which(os.environ.get("CXX", "c++"))
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (CXX or c++ on PATH)")

BUILD_SECONDS = 600  # "did not hang": far above any build here (about 40 s for fastreg_cpu on 2 cores)

PROBE_SOURCE = 'extern "C" int fastreg_probe_answer() { return 42; }\n'

# Ensures one extension in a fresh process and prints what came of it as JSON: "cpu" is fastreg_cpu,
# anything else the folder of a probe's source.
ENSURE = r"""
import ctypes, json, sys, warnings
from pathlib import Path
import torch
import fastreg._build as b

which = sys.argv[1]
ext = b.CPU if which == "cpu" else b._Extension("fastreg_probe", ["probe.cpp"], [], root=Path(which))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    reason = ext.ensure()
value = None
if reason is None:
    if which == "cpu":
        value = torch.ops.fastreg.value([torch.linspace(-1, 1, 1001)], 0.1, 0.2, 0.0, None).item()
    else:
        value = ctypes.CDLL(str(ext.build_directory() / f"{ext.versioned_name()}.so")).fastreg_probe_answer()
print(json.dumps({"reason": reason, "fix": getattr(ext, "fix", None), "value": value, "warnings": [str(w.message) for w in caught]}))
"""

# Takes a build directory's lock, says so, holds it for argv[2] seconds and lets it go.
HOLD = r"""
import sys, time
from pathlib import Path
import fastreg._build as b

lock = b._BuildLock(Path(sys.argv[1]), "a test")
lock.acquire(60)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


class Processes:
    """Starts Python processes in sessions of their own, and ends them (and what they started:
    ninja and compilers outlive a killed build) when the test ends."""

    def __init__(self):
        self.started: List[subprocess.Popen] = []

    def start(self, code: str, *args: str, env: Optional[dict] = None, prefix: Optional[List[str]] = None) -> subprocess.Popen:
        process = subprocess.Popen([*(prefix or []), sys.executable, "-c", code, *args], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.started.append(process)
        return process

    def start_ensure(self, which: str, build_root: Path, cxx: Optional[Path] = None, **kwargs) -> subprocess.Popen:
        env = dict(os.environ, **{_build.BUILD_DIR_ENV: str(build_root)})
        if cxx is not None:
            env["CXX"] = str(cxx)
        return self.start(ENSURE, which, env=env, **kwargs)

    @staticmethod
    def finish(process: subprocess.Popen, timeout: float = BUILD_SECONDS):
        """The JSON result of an ENSURE process and its stderr."""
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"still waiting after {timeout} s, far longer than a build takes")
        assert process.returncode == 0, err
        return json.loads(out.splitlines()[-1]), err

    def ensure(self, which: str, build_root: Path, **kwargs):
        return self.finish(self.start_ensure(which, build_root, **kwargs))

    def end_all(self) -> None:
        for process in self.started:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.communicate()


@pytest.fixture
def processes():
    started = Processes()
    yield started
    started.end_all()


@pytest.fixture
def probe(tmp_path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    (root / "probe.cpp").write_text(PROBE_SOURCE)
    return root


def _probe_extension(root: Path) -> _build._Extension:
    return _build._Extension("fastreg_probe", ["probe.cpp"], [], root=root)


def _compiler_wrapper(tmp_path: Path, delay: float = 0) -> Path:
    """A CXX that appends each compile command to compiles.log (next to it), waits ``delay``
    seconds, and runs the real compiler; cpp_extension's version checks and links pass straight."""
    wrapper = tmp_path / "cxx"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" -c "*) echo "$*" >> "{tmp_path / "compiles.log"}"; sleep {delay};; esac\n'
        f'exec "{COMPILER}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _wait_for(condition, what: str, timeout: float = BUILD_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.1)


def _build_dir(root: Path, ext: _build._Extension) -> Path:
    return root / ext.versioned_name()


def _built_probe(probe: Path, root: Path, monkeypatch) -> Path:
    """Builds the probe into ``root`` in this process: the build directory of the binary."""
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(root))
    ext = _probe_extension(probe)
    assert ext.ensure() is None
    return ext.build_directory()


def _replace(path: Path, data: bytes) -> None:
    """Gives ``path`` new contents in a new file: this process may have the old one loaded, and
    a loaded library whose file shrinks under it faults (SIGBUS) when touched."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------
# the real extension: built once, not at import, with torch's own C++ standard


def test_import_builds_nothing():
    code = "import fastreg, fastreg._build as b; import sys; sys.exit(1 if b.CPU._done else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_all_reports_built():
    results = _build.build_all(verbose=False)
    assert results["fastreg_cpu"] == "built"
    assert set(results) == set(_build.EXTENSIONS) and not _build.failures(results)


def test_cxx_standard_comes_from_torch():
    """cpp_extension passes the standard torch's headers need; a second ``-std`` of fastreg's
    own would override it (torch 2.14's headers do not compile as C++17)."""
    assert _build.cpu_unavailable_reason() is None
    assert len(_build.compiled_std_flags(_build.CPU)) == 1
    for flags in (_build.CPU._cflags(), _build.CUDA._cflags(), _build.cuda_flags()):
        assert not [flag for flag in flags if flag.startswith(("-std", "--std"))], flags


def test_name_hashes_sources(tmp_path):
    for name in ("a.cpp", "h.h"):
        (tmp_path / name).write_text("int x = 1;\n")
    ext = _build._Extension("fastreg_probe", ["a.cpp"], ["h.h"], root=tmp_path)
    first = ext.versioned_name()
    assert first.startswith("fastreg_probe_") and first == ext.versioned_name()
    (tmp_path / "h.h").write_text("int x = 2;\n")
    assert ext.versioned_name() != first
    assert _build.CPU.versioned_name().startswith("fastreg_cpu_")


def test_finished_build_is_its_binary_and_record(tmp_path, probe, monkeypatch):
    build = _built_probe(probe, tmp_path / "build", monkeypatch)
    ext = _probe_extension(probe)
    assert ctypes.CDLL(str(build / ext.binary_name())).fastreg_probe_answer() == 42
    record = json.loads((build / _build.RECORD_NAME).read_text())
    binary = build / ext.binary_name()
    assert record["binary"] == binary.name and record["host"] == socket.gethostname()
    assert record["sha256"] == _build._sha256(binary)
    # no lock, staging directory or error log left behind
    assert sorted(p.name for p in build.iterdir()) == sorted([binary.name, _build.RECORD_NAME, "build.ninja"])


# ---------------------------------------------------------------------------------------------
# processes that die, wait or build at once


def test_killed_build_costs_the_next_process_one_build(tmp_path, probe, processes):
    """A build killed with SIGKILL (a kernel restart, the OOM killer) leaves its lock behind;
    the next process removes it at once and builds, instead of waiting for it forever."""
    build_root = tmp_path / "build"
    # The probe compiles in no time: its compile waits, so that the kill surely lands mid-build.
    builder = processes.start_ensure(str(probe), build_root, cxx=_compiler_wrapper(tmp_path, delay=600))
    _wait_for((tmp_path / "compiles.log").exists, "the first compile")
    os.kill(builder.pid, signal.SIGKILL)  # only Python: its ninja and compiler live on, as they do
    builder.wait()
    assert list(build_root.rglob("*lock"))  # left behind

    result, err = processes.ensure(str(probe), build_root)
    assert result["reason"] is None and result["value"] == 42
    assert f"pid {builder.pid}, whose build it was, is no longer running" in err


# The probe only: the real extension builds through the lock in the slow tier's damaged-binary
# test (each real build costs CI one to two minutes of its budget).
def test_first_use_by_several_processes_builds_once(tmp_path, probe, processes):
    wrapper = _compiler_wrapper(tmp_path, delay=3)  # others arrive mid-build
    started = [processes.start_ensure(str(probe), tmp_path / "build", cxx=wrapper) for _ in range(3)]
    results = [processes.finish(process)[0] for process in started]
    assert [r["reason"] for r in results] == [None] * 3
    assert len({r["value"] for r in results}) == 1 and results[0]["value"] is not None
    # one build: the probe's one source compiled once
    assert len((tmp_path / "compiles.log").read_text().splitlines()) == 1


def test_waiting_for_a_live_holder_is_said_once_then_given_up(tmp_path, probe, processes, monkeypatch, capfd):
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(tmp_path / "build"))
    ext = _probe_extension(probe)
    holder = processes.start(HOLD, str(ext.build_directory()), "600")
    assert holder.stdout.readline() == "held\n"
    monkeypatch.setattr(_build, "BUILD_WAIT_SECONDS", 2.0)
    with pytest.warns(RuntimeWarning, match="unavailable") as caught:
        reason = ext.ensure()
    assert len(caught) == 1
    lock = ext.build_directory() / _build.LOCK_NAME
    assert reason.startswith(f"gave up after waiting 2 s for pid {holder.pid} (started ") and str(lock) in reason
    assert "\n" not in reason and f"delete {lock}" in ext.fix
    err = capfd.readouterr().err
    assert err.count("fastreg: waiting for") == 1
    assert f"fastreg: waiting for pid {holder.pid} (started " in err and f"to finish building fastreg_probe (lock: {lock})" in err
    assert holder.poll() is None and lock.exists()  # a live holder's lock is left alone


def test_waiter_goes_on_when_the_holder_lets_go(tmp_path, probe, processes, monkeypatch, capfd):
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(tmp_path / "build"))
    ext = _probe_extension(probe)
    holder = processes.start(HOLD, str(ext.build_directory()), "2")
    assert holder.stdout.readline() == "held\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext.ensure() is None
    assert capfd.readouterr().err.count(f"fastreg: waiting for pid {holder.pid}") == 1


def test_lock_holders_that_are_gone(tmp_path):
    lock = tmp_path / _build.LOCK_NAME

    def holder(text: str, age: float = 0) -> _build._Holder:
        lock.write_text(text)
        os.utime(lock, (time.time() - age,) * 2)
        return _build._Holder(lock)

    here = socket.gethostname()
    me = {"pid": os.getpid(), "host": here, "process_start": _build._process_start(os.getpid())}
    assert holder(json.dumps(me), age=2 * _build.BUILD_WAIT_SECONDS).stale_reason(_build.BUILD_WAIT_SECONDS) is None
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    gone = {**me, "pid": int(finished.stdout)}
    assert "is no longer running" in holder(json.dumps(gone)).stale_reason(60)
    if me["process_start"] is not None:  # Linux: a later process given the holder's pid
        assert "is no longer running" in holder(json.dumps({**me, "process_start": "1"})).stale_reason(60)
    # Another host's holder, or one the lock does not name, cannot be checked: stale only once
    # older than any build takes.
    for text in (json.dumps({**me, "host": here + "-elsewhere"}), "", "{}"):
        assert holder(text, age=30).stale_reason(60) is None
        assert "longer than any build takes" in holder(text, age=90).stale_reason(60)


# ---------------------------------------------------------------------------------------------
# build directories that cannot be written, binaries that must not be loaded


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _read_only(root: Path) -> List[str]:
    """Makes ``root`` unwritable for the process started with the returned command prefix."""
    if os.geteuid() != 0:
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)
        return []
    # Root writes through permissions: mount the directory read-only in a namespace of its own.
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
              'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', str(root)]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root (chmod does not stop root's writes) without user namespaces to mount read-only")
    return prefix


@pytest.mark.parametrize("built", [False, True], ids=["empty", "prebuilt"])
def test_read_only_build_directory(tmp_path, probe, processes, monkeypatch, built):
    root = tmp_path / "build"
    if built:
        _built_probe(probe, root, monkeypatch)
    else:
        root.mkdir()
    before = _snapshot(root)
    try:
        result, _ = processes.ensure(str(probe), root, prefix=_read_only(root))
    finally:
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
    if built:  # a build made ahead of time loads without writing anything
        assert result["reason"] is None and result["value"] == 42 and not result["warnings"]
    else:
        assert result["reason"].startswith("cannot write the build directory (")
        assert "\n" not in result["reason"] and _build.BUILD_DIR_ENV in result["fix"]
        assert len(result["warnings"]) == 1
    assert _snapshot(root) == before


def test_build_directory_that_cannot_be_made(tmp_path, probe, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(blocker / "build"))
    ext = _probe_extension(probe)
    with pytest.warns(RuntimeWarning) as caught:
        reason = ext.ensure()
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert reason == f"cannot write the build directory (Not a directory: {blocker / 'build' / ext.versioned_name()})"
    assert ext.fix.startswith(f"set {_build.BUILD_DIR_ENV} to a writable directory")


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))


def test_build_whose_writes_fail_leaves_no_binary(tmp_path, probe):
    """As on a full disk: files stop growing at 8 KB, so the lock and the build's small files are
    written but the linker's binary (about 15 KB) is cut short, and it is never loaded or kept."""
    env = dict(os.environ, **{_build.BUILD_DIR_ENV: str(tmp_path / "build")})
    done = subprocess.run([sys.executable, "-c", ENSURE, str(probe)], env=env, capture_output=True, text=True,
                          timeout=BUILD_SECONDS, preexec_fn=_limit_file_size, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["reason"].startswith("build failed: ") and "File size limit exceeded" in result["reason"]
    assert "\n" not in result["reason"] and _build.BUILD_DIR_ENV in result["fix"]
    build = _build_dir(tmp_path / "build", _probe_extension(probe))
    assert not list(build.glob("*.so")) and not (build / _build.RECORD_NAME).exists()
    assert not list(build.glob(_build._STAGING_PREFIX + "*")) and not (build / _build.LOCK_NAME).exists()


@pytest.mark.parametrize("damage", ["truncated", "unrecorded"])
def test_damaged_binary_is_rebuilt_not_loaded(tmp_path, probe, processes, monkeypatch, damage):
    root = tmp_path / "build"
    binary = _built_probe(probe, root, monkeypatch) / _probe_extension(probe).binary_name()
    if damage == "truncated":
        _replace(binary, binary.read_bytes()[:4096])  # dlopen would fail, or SIGBUS later
        said = "its binary differs from the one recorded after its build (damaged); rebuilding it"
    else:
        (binary.parent / _build.RECORD_NAME).unlink()  # killed between publishing the binary and its record
        said = "its binary has no record of a finished build; rebuilding it"
    result, _ = processes.ensure(str(probe), root)
    assert result["reason"] is None and result["value"] == 42
    assert [w for w in result["warnings"] if said in w]
    assert json.loads((binary.parent / _build.RECORD_NAME).read_text())["sha256"] == _build._sha256(binary)


@pytest.mark.parametrize("host", ["this", "another"])
def test_binary_that_does_not_load(tmp_path, probe, processes, host):
    """A recorded binary that does not load: built here, it is rebuilt; built on another host
    sharing the directory, it is left to that host, with the reason and the fallback here."""
    root = tmp_path / "build"
    ext = _probe_extension(probe)
    build = _build_dir(root, ext)
    build.mkdir(parents=True)
    binary = build / ext.binary_name()
    binary.write_bytes(b"not a shared library")
    builder = socket.gethostname() if host == "this" else "other-node"
    record = {"binary": binary.name, "sha256": _build._sha256(binary), "host": builder, "finished": time.time()}
    (build / _build.RECORD_NAME).write_text(json.dumps(record))
    result, _ = processes.ensure(str(probe), root)
    if host == "this":
        assert result["reason"] is None and result["value"] == 42
        assert [w for w in result["warnings"] if "it did not load" in w and "rebuilding it" in w]
    else:
        assert result["reason"].startswith(f"the fastreg_probe build in {build} was made on host other-node "
                                           "and does not load here (")
        assert "\n" not in result["reason"] and _build.BUILD_DIR_ENV in result["fix"]
        assert binary.read_bytes() == b"not a shared library"


@pytest.mark.slow
def test_damaged_real_binary_is_rebuilt_after_a_killed_rebuild(tmp_path, processes):
    """The real extension, in one real build: a truncated binary is found damaged and rebuilt;
    that rebuild is killed with all it started (a kernel restart) mid-compile, leaving its lock;
    the next process removes the lock at once, finds the binary still damaged and builds."""
    assert _build.cpu_unavailable_reason() is None
    source = _build.CPU.build_directory()
    copy = tmp_path / "build" / source.name
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(_build.LOCK_NAME, _build._STAGING_PREFIX + "*"))
    binary = copy / _build.CPU.binary_name()
    binary.write_bytes(binary.read_bytes()[:4096])  # a truncated copy: dlopen fails
    builder = processes.start_ensure("cpu", tmp_path / "build", cxx=_compiler_wrapper(tmp_path, delay=600))
    _wait_for((tmp_path / "compiles.log").exists, "the rebuild's first compile")
    os.killpg(builder.pid, signal.SIGKILL)
    builder.communicate()
    assert list(copy.parent.rglob("*lock")) and binary.stat().st_size == 4096

    result, err = processes.ensure("cpu", tmp_path / "build")
    assert result["reason"] is None and result["value"] is not None
    assert f"pid {builder.pid}, whose build it was, is no longer running" in err
    assert [w for w in result["warnings"] if "differs from the one recorded after its build (damaged); rebuilding it" in w]
    assert binary.stat().st_size > 4096


# ---------------------------------------------------------------------------------------------
# failed builds: said once, in one line, with what fastreg does instead and how to fix it


def test_failed_build_warns_once_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(tmp_path / "build"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cpp").write_text("#include <torch/library.h>\nint f() { return undefined_name; }\n")
    ext = _build._Extension("fastreg_broken", ["broken.cpp"], [], root=src)
    with pytest.warns(RuntimeWarning) as caught:
        reason = ext.ensure()
    (warning,) = caught
    message = str(warning.message)
    assert reason.startswith("build failed: ") and "broken.cpp:2:" in reason and "error:" in reason and "undefined_name" in reason
    assert "\n" not in message and reason in message and "To fix: " + ext.fix in message
    log = _build_dir(tmp_path / "build", ext) / _build.ERROR_LOG_NAME
    assert ext.fix == f"{_build.FIX_SEE_OUTPUT} (also in {log})"
    assert "undefined_name" in log.read_text() and "broken.cpp" in log.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext.ensure() == reason


def test_missing_sources_are_a_reason_not_a_crash(tmp_path):
    ext = _build._Extension("fastreg_missing", ["nowhere.cpp"], [], root=tmp_path)
    with pytest.warns(RuntimeWarning):
        assert "not found" in ext.ensure()


def test_causes_and_fixes_of_compiler_output(tmp_path):
    def failure(output: str) -> _build.BuildError:
        return _build._compile_failure(RuntimeError(f"Error building extension 'fastreg_cpu_0':\n{output}"), tmp_path)

    torch_check = failure("[1/3] c++ -MMD -std=c++17 -c ops.cpp -o ops.o\nFAILED: ops.o\nIn file included from ops.cpp:1:\n"
                          "all.h:5:2: error: #error C++17 or later compatible compiler is required to use PyTorch.\n")
    assert torch_check.reason == "build failed: all.h:5:2: error: #error C++17 or later compatible compiler is required to use PyTorch."
    old_std = failure("c++: error: unrecognized command-line option '-std=c++20'; did you mean '-std=c++2a'?\n")
    old_library = failure("[1/3] c++ -std=c++17 -c x.cpp\nStringUtil.h:65:22: error: 'is_enum_v' is not a member of 'std'\n")
    for too_old in (torch_check, old_std, old_library):
        assert f"may be too old for the headers of torch {torch.__version__}" in too_old.fix
    assert "(they are compiled as C++17)" in torch_check.fix and "compiled as C++20" in old_std.fix
    full = failure("[3/3] c++ ops.o -shared -o x.so\n/usr/bin/ld: final link failed: No space left on device\n"
                   "collect2: error: ld returned 1 exit status\n")
    assert full.reason == "build failed: /usr/bin/ld: final link failed: No space left on device"
    assert full.fix.startswith(f"set {_build.BUILD_DIR_ENV} to a writable directory with free space")
    ours = failure("x.cpp:2:20: error: 'undefined_name' was not declared in this scope\n")
    assert ours.reason == "build failed: x.cpp:2:20: error: 'undefined_name' was not declared in this scope"
    assert ours.fix.startswith(_build.FIX_SEE_OUTPUT)


@pytest.mark.slow
def test_too_old_a_standard_is_named(tmp_path, monkeypatch):
    """A real source with a compiler held to C++14, older than any torch's headers need. One
    source (the op schemas) is enough to fail, and each failing source costs a minute."""
    wrapper = tmp_path / "cxx14"
    wrapper.write_text(f'#!/bin/sh\nexec "{COMPILER}" "$@" -std=c++14\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(tmp_path / "build"))
    ext = _build._Extension("fastreg_cpu", ["ops.cpp"], _build.CPU.headers)
    with pytest.warns(RuntimeWarning):
        reason = ext.ensure()
    assert reason.startswith("build failed: ") and "error:" in reason
    assert f"({wrapper}) may be too old for the headers of torch {torch.__version__}" in ext.fix


# Every op of the public API through `auto`, several times, in a process whose build fails.
AUTO_REPEATEDLY = r"""
import json, warnings
import torch, fastreg
from fastreg.backends import auto_backend

def params():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(30, 20, generator=generator, requires_grad=True), torch.randn(7, generator=generator, requires_grad=True)]

def run(backend):
    ps, out = params(), []
    for _ in range(3):
        out.append(fastreg.penalty(ps, l1=0.1, l2=0.2, backend=backend).item())
        for p in ps:
            p.grad = torch.ones_like(p)
        out.append(fastreg.add_penalty_grad_(ps, l1=0.1, l2=0.2, backend=backend).item())
        fastreg.decay_(ps, lr=0.1, l1=0.1, l2=0.2, group_lasso=0.1, group_dim=0, backend=backend)
        out.append(fastreg.norms(ps, backend=backend).l1.tolist())
    return out + [p.detach().tolist() for p in ps] + [p.grad.tolist() for p in ps]

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    results = run("auto")
said = [str(w.message) for w in caught if "fastreg" in str(w.message)]
print(json.dumps({"auto": auto_backend(torch.device("cpu"), torch.float32).name, "same": results == run("torch"), "said": said}))
"""


def test_auto_falls_back_and_warns_once_per_process(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), **{_build.BUILD_DIR_ENV: str(tmp_path / "build")})
    done = subprocess.run([sys.executable, "-c", AUTO_REPEATEDLY], env=env, capture_output=True, text=True,
                          timeout=BUILD_SECONDS, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["auto"] == "torch" and result["same"]
    (said,) = result["said"]
    assert said.startswith("fastreg: fastreg_cpu is unavailable, so `auto` uses the torch backend for CPU tensors. Cause: ")
    assert "\n" not in said and f"no C++ compiler: {tmp_path / 'no-such-c++'} not found" in said
    assert "To fix: install a C++ compiler" in said


def test_info_and_bench_say_what_failed_and_what_to_do(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), **{_build.BUILD_DIR_ENV: str(tmp_path / "build")})
    expected = [
        f"fastreg_cpu is unavailable: no C++ compiler: {tmp_path / 'no-such-c++'} not found",
        "  instead: fastreg uses the torch backend on cpu",
        "  to fix: install a C++ compiler (g++ or clang++; or set CXX to one), then run `python -m fastreg build`",
    ]

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "fastreg", *args], env=env, capture_output=True, text=True,
                              timeout=BUILD_SECONDS, check=True)
        assert "is unavailable" not in done.stderr  # said once, on stdout
        return done.stdout.splitlines()

    info = run("info")
    assert info[-3:] == expected
    bench = run("bench", "--size", "0.0005", "--min-time", "0.005", "--quiet", "--no-compile", "--backends", "cpp,torch")
    assert bench[1:4] == expected  # right under the line naming the machine


def test_cpp_extension_import_warning_is_not_passed_on(tmp_path):
    """torch logs "No CUDA runtime is found" when cpp_extension is imported where a CUDA
    toolkit is found and no GPU is (CUDA_HOME set, no device visible): not in fastreg's output."""
    if not torch.version.cuda:
        pytest.skip("torch is a CPU-only build: its cpp_extension looks for no CUDA toolkit")
    env = dict(os.environ, CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    plain = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], env=env,
                           capture_output=True, text=True, check=True)
    assert "No CUDA runtime is found" in plain.stderr  # the condition holds here
    ours = subprocess.run([sys.executable, "-c", "import fastreg.__main__; from fastreg import _build; _build.import_cpp_extension()"], env=env,
                          capture_output=True, text=True, check=True)
    assert "No CUDA runtime" not in ours.stderr and "No CUDA runtime" not in ours.stdout


@pytest.mark.parametrize("capability, expected", [
    ("AVX512", ["-mavx512f", "-DCPU_CAPABILITY=AVX512"]),
    ("AVX2", ["-mavx2", "-DCPU_CAPABILITY=AVX2"]),
    ("DEFAULT", []),
])
def test_cpu_kernels_use_the_vector_width_torch_uses(monkeypatch, capability, expected):
    """The CPU extension is compiled for the instruction set torch's own CPU kernels run on this
    machine (its fused AdamW among them): a narrower build halves the throughput of a
    compute-bound step (a bf16 Adam step: divides and square roots)."""
    monkeypatch.setattr(_build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    flags = _build.CPU._cflags()
    for flag in expected:
        assert flag in flags
    assert len([f for f in flags if f.startswith("-DCPU_CAPABILITY=")]) == (1 if expected else 0)
