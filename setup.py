"""fastreg's setuptools entry point.

All metadata lives in pyproject.toml. Installing compiles nothing: fused kernels are
built just in time on first use (see README, "Backends").

Ahead-of-time build, on request: ``FASTREG_BUILD_EXT=1 pip install --no-build-isolation .``
(or ``-e .``) also compiles the C++ extensions into the just-in-time cache (see
``fastreg/_build.py``), with the torch already installed in the environment; that is why it
needs ``--no-build-isolation``, and why torch is never a build requirement.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUILD_EXT_ENV = "FASTREG_BUILD_EXT"
HERE = Path(__file__).resolve().parent


class BuildPy(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            # A regular install has no checkout next to it: ship the C++ sources inside the
            # package so the extension can still be built (and its cache name hashed) at run time.
            target = Path(self.build_lib) / "fastreg" / "csrc"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(HERE / "csrc", target)
        if os.environ.get(BUILD_EXT_ENV, "") not in ("", "0"):
            _build_extensions()


def _build_extensions():
    sys.path.insert(0, str(HERE))
    try:
        from fastreg import _build
    except ImportError as error:
        raise SystemExit(f"{BUILD_EXT_ENV}: fastreg's build needs torch importable here ({error}); "
                         "install torch first and pass --no-build-isolation") from None
    results = _build.build_all(verbose=True)
    failed = _build.failures(results)
    if failed:
        raise SystemExit(f"{BUILD_EXT_ENV}: building the C++ extensions failed: {failed}")


setup(cmdclass={"build_py": BuildPy})
