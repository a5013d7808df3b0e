"""fastreg's setuptools entry point.

All metadata lives in pyproject.toml. Installing compiles nothing: fused kernels are
built just in time on first use (see README, "Backends").
"""
from setuptools import setup

setup()
