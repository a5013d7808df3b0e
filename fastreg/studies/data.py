"""The data a study trains on: scikit-learn's bundled data sets, a user's ``(X, y)``
function, split into stratified train / validation / test sets."""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .._optional import optional_import

DATASETS = ("digits", "iris", "wine", "breast_cancer")

DataFn = Callable[[], Tuple[Any, Any]]


@dataclass
class Dataset:
    """A stratified train/validation/test split, standardized with the training statistics."""

    name: str
    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    classes: List[str]

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> Dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def info(self) -> Dict[str, Any]:
        return {"name": self.name, "features": self.n_features, "classes": self.classes, **self.sizes()}

    def to(self, device: torch.device) -> "Dataset":
        tensors = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self) if f.name.startswith(("X_", "y_"))}
        return dataclasses.replace(self, **tensors)


def load_entry_point(spec: str, what: str = "entry point") -> Callable:
    """The function named by ``"package.module:function"``, importable from the current
    directory or from an installed package."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} must be MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({error})") from error
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{what} {spec!r} is a {type(target).__name__}, not a function")
    return target


def _builtin_dataset(name: str) -> Tuple[Any, Any]:
    datasets = optional_import("sklearn.datasets", f"the {name} dataset")
    return getattr(datasets, f"load_{name}")(return_X_y=True)


def load_data(
    source: Union[str, DataFn] = "digits",
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    max_train: Optional[int] = None,
) -> Dataset:
    """Load and split a classification data set.

    ``source`` is a data set that ships with scikit-learn (``"digits"``, ``"iris"``,
    ``"wine"``, ``"breast_cancer"``: no download), a ``"module:function"`` entry point, or
    a function; a function takes no arguments and returns ``(X, y)``: ``X`` an array-like of
    shape ``(n_samples, n_features)`` with finite numbers, ``y`` an array-like of ``n_samples``
    class labels (any sortable values; at least two classes). See :func:`split_data`.
    """
    if callable(source):
        name, loaded = getattr(source, "__qualname__", repr(source)), source()
    elif source in DATASETS:
        name, loaded = source, _builtin_dataset(source)
    elif isinstance(source, str) and ":" in source:
        name, loaded = source, load_entry_point(source, "data")()
    else:
        raise ValueError(f"data must be one of {', '.join(DATASETS)}, a MODULE:FUNCTION entry point or a function, got {source!r}")
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise TypeError(f"data {name!r} must return (X, y), got {type(loaded).__name__}")
    X, y = loaded
    return split_data(X, y, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, max_train=max_train, name=name)


def _fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def split_data(
    X: Any,
    y: Any,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    max_train: Optional[int] = None,
    name: str = "data",
) -> Dataset:
    """Split ``(X, y)`` into stratified train / validation / test sets (scikit-learn's
    ``train_test_split`` with ``random_state=seed``), optionally keep a stratified
    ``max_train`` of the training samples (small training sets overfit: a study's
    under-/over-fitting curve needs one), and standardize every feature with the training
    mean and standard deviation."""
    np = optional_import("numpy", "splitting data")
    model_selection = optional_import("sklearn.model_selection", "splitting data")
    val_fraction = _fraction("val_fraction", val_fraction)
    test_fraction = _fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"data {name!r}: X must be numeric ({error})") from error
    y = np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"data {name!r}: X must have shape (n_samples, n_features), got {X.shape}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"data {name!r}: y must have shape ({X.shape[0]},) to match X, got {y.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"data {name!r}: X has NaN or infinite values")
    classes, labels = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"data {name!r}: y needs at least two classes, got {len(classes)}")
    index = np.arange(len(y))
    try:
        rest, test = model_selection.train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)
        train, val = model_selection.train_test_split(
            rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=labels[rest]
        )
        if max_train is not None:
            if isinstance(max_train, bool) or not isinstance(max_train, int) or max_train < len(classes):
                raise ValueError(f"max_train must be an integer >= the number of classes ({len(classes)}), got {max_train!r}")
            if max_train < len(train):
                train, _ = model_selection.train_test_split(train, train_size=max_train, random_state=seed, stratify=labels[train])
    except ValueError as error:
        if "max_train" in str(error):
            raise
        raise ValueError(f"data {name!r}: cannot split {len(y)} samples of {len(classes)} classes by class ({error})") from error
    mean = X[train].mean(axis=0)
    std = X[train].std(axis=0)
    std[std == 0] = 1.0

    def part(rows):
        return torch.from_numpy(((X[rows] - mean) / std).astype(np.float32)), torch.from_numpy(labels[rows].astype(np.int64))

    (X_train, y_train), (X_val, y_val), (X_test, y_test) = part(train), part(val), part(test)
    return Dataset(name, X_train, y_train, X_val, y_val, X_test, y_test, [str(c) for c in classes])

