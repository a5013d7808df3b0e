"""Optional packages of the regularization studies (the ``study`` extra), imported on use."""
from __future__ import annotations

import importlib

INSTALL_HINT = 'pip install "fastreg[study]"'


class MissingDependency(ImportError):
    """An optional package a study needs is not installed."""


def optional_import(module: str, purpose: str):
    """``module``, or a :class:`MissingDependency` saying what needed it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependency(f"{purpose} needs {module.split('.')[0]}, which is not installed: {INSTALL_HINT}") from error
