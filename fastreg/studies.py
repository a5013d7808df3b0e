"""Regularization studies: does it help, which kind, how strong, on which layers.

Two studies, usable from Python and behind ``python -m fastreg compare`` and ``sweep``:

- :func:`compare` trains the same model (same initial weights, data split and batch
  order) under several :class:`Setting` s (none, L1, L2, ElasticNet, group lasso, coupled
  and decoupled, dropout for contrast) and records learning curves, test metrics, the
  penalty and the exactly-zero weights of every layer;
- :func:`sweep` trains over a log-spaced grid of strengths of one kind, picks the best
  strength on validation data and reports its test metrics.

Regularization is applied by :class:`fastreg.Regularized` through param groups: the
parameters a study regularizes (``TrainConfig.only``, minus ``TrainConfig.no_decay``)
form one group that carries the setting's strengths, every other parameter a group with
all strengths 0, so "one layer only" is exactly one param group.

    from fastreg import studies
    result = studies.compare(config=studies.TrainConfig(epochs=20, only=("fc1",)))
    print(studies.summary_table(result))
    studies.write_run(result, "runs/fc1")

The data, metrics and plots need the ``study`` extra (``pip install "fastreg[study]"``:
scikit-learn, matplotlib, tqdm); this module imports them only when a study needs them.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import fnmatch
import importlib
import inspect
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import Tensor, nn

import fastreg

from ._optional import INSTALL_HINT, MissingDependency, optional_import

MODES = ("coupled", "decoupled")
OPTIMIZERS = ("adam", "sgd")
SWEEP_KINDS = ("l1", "l2", "elasticnet", "group_lasso")
SELECT_CHOICES = ("val_loss", "val_accuracy")
DATASETS = ("digits", "iris", "wine", "breast_cancer")
STRENGTH_KEYS = ("l1", "l2", "group_lasso")

# Default sweep grids for the default model and optimizer (Adam, lr 1e-3, digits), wide
# enough to run from "no effect" to "underfits" for each kind and mode.
DEFAULT_GRIDS: Dict[Tuple[str, str], Tuple[float, float]] = {
    ("l1", "coupled"): (1e-5, 1e-1),
    ("l1", "decoupled"): (1e-4, 1e0),
    ("l2", "coupled"): (1e-4, 1e1),
    ("l2", "decoupled"): (1e-2, 1e3),
    ("elasticnet", "coupled"): (1e-5, 1e0),
    ("elasticnet", "decoupled"): (1e-4, 1e1),
    ("group_lasso", "coupled"): (1e-4, 1e0),
    ("group_lasso", "decoupled"): (1e-3, 1e1),
}

ModelFn = Callable[..., nn.Module]
DataFn = Callable[[], Tuple[Any, Any]]


def require(*, plots: bool = True, progress: bool = True) -> None:
    """Check, before any training, that the optional packages a study will use import.

    Raises :class:`MissingDependency` naming every missing one and the install command.
    """
    needed = {"sklearn": "scikit-learn", "numpy": "numpy"}
    if plots:
        needed["matplotlib"] = "matplotlib"
    if progress:
        needed["tqdm"] = "tqdm"
    missing = []
    for module, package in needed.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingDependency(f"regularization studies need {', '.join(missing)}, not installed here: {INSTALL_HINT}")


# -- what is compared ---------------------------------------------------------------------


def _strength(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and non-negative, got {value}")
    return value


@dataclass(frozen=True)
class Setting:
    """One way to regularize: strengths in fastreg's convention (DESIGN §1), the mode
    ``Regularized`` applies them in, and a dropout rate for contrast (passed to the model)."""

    name: str
    l1: float = 0.0
    l2: float = 0.0
    group_lasso: float = 0.0
    mode: str = "coupled"
    group_dim: Optional[int] = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in ",:\n"):
            raise ValueError(f"Setting.name must be a non-empty string without ',', ':' or newlines, got {self.name!r}")
        for key in STRENGTH_KEYS:
            object.__setattr__(self, key, _strength(f"Setting({self.name!r}).{key}", getattr(self, key)))
        if self.mode not in MODES:
            raise ValueError(f"Setting({self.name!r}).mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.group_dim is not None and (isinstance(self.group_dim, bool) or self.group_dim != 0):
            raise ValueError(f"Setting({self.name!r}).group_dim must be None (whole tensors) or 0 (rows), got {self.group_dim!r}")
        dropout = _strength(f"Setting({self.name!r}).dropout", self.dropout)
        if dropout >= 1:
            raise ValueError(f"Setting({self.name!r}).dropout must be in [0, 1), got {dropout}")
        object.__setattr__(self, "dropout", dropout)

    @property
    def strengths(self) -> Dict[str, float]:
        return {key: getattr(self, key) for key in STRENGTH_KEYS}

    @property
    def regularized(self) -> bool:
        return any(self.strengths.values())

    def describe(self) -> str:
        parts = [f"{key}={value:g}" for key, value in self.strengths.items() if value]
        if self.group_lasso and self.group_dim == 0:
            parts.append("rows")
        if parts:
            parts.append(self.mode)
        if self.dropout:
            parts.append(f"dropout={self.dropout:g}")
        return " ".join(parts) or "none"

    @classmethod
    def parse(cls, spec: str) -> "Setting":
        """``"name:key=value,key=value"``, keys among l1, l2, group_lasso, mode,
        group_dim (``0`` or ``none``) and dropout, e.g. ``"strong-l1:l1=1e-3,mode=decoupled"``."""
        name, sep, body = spec.partition(":")
        if not sep:
            raise ValueError(f"setting {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        options: Dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in body.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq:
                raise ValueError(f"setting {spec!r}: {item!r} is not KEY=VALUE")
            if key == "mode":
                options[key] = value.strip()
            elif key == "group_dim":
                options[key] = None if value.strip().lower() in ("none", "tensor") else _parse_int(spec, key, value)
            elif key in STRENGTH_KEYS + ("dropout",):
                options[key] = _parse_float(spec, key, value)
            else:
                raise ValueError(f"setting {spec!r}: unknown key {key!r}; use l1, l2, group_lasso, mode, group_dim, dropout")
        return cls(name.strip(), **options)


def _parse_float(spec: str, key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"setting {spec!r}: {key} must be a number, got {value!r}") from None


def _parse_int(spec: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"setting {spec!r}: {key} must be 0 or none, got {value!r}") from None


def default_settings(
    *,
    l1: float = 1e-3,
    l2: float = 1e-2,
    l1_decoupled: float = 0.3,
    l2_decoupled: float = 3.0,
    group_lasso: float = 1.0,
    dropout: float = 0.5,
) -> List[Setting]:
    """The settings ``compare`` runs by default, with strengths that visibly act on the
    default model and optimizer (Adam, lr 1e-3, digits).

    Decoupled decay is a step of size ``lr`` on the weights, not a gradient term that Adam
    renormalizes, so the same coefficient is far weaker there (AdamW's usual
    ``weight_decay=0.01`` does almost nothing at ``lr=1e-3``): decoupled settings have their
    own strengths. ElasticNet splits ``l1`` and ``l2`` half and half; group lasso acts on
    rows (a row of ``fc1`` is one hidden unit's input weights), decoupled, so whole rows can
    reach exact zero.
    """
    return [
        Setting("none"),
        Setting("l1", l1=l1),
        Setting("l1-decoupled", l1=l1_decoupled, mode="decoupled"),
        Setting("l2", l2=l2),
        Setting("l2-decoupled", l2=l2_decoupled, mode="decoupled"),
        Setting("elasticnet", l1=l1 / 2, l2=l2 / 2),
        Setting("group-lasso", group_lasso=group_lasso, mode="decoupled", group_dim=0),
        Setting("dropout", dropout=dropout),
    ]


# -- data -----------------------------------------------------------------------------------


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


# -- the model --------------------------------------------------------------------------------


class MLP(nn.Module):
    """The classic example: ``fc1 -> bn1 -> relu -> dropout -> fc2``."""

    def __init__(self, in_features: int, n_classes: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.relu = nn.ReLU()
        # Present at p=0 too (it has no parameters), so every setting starts from the same weights.
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.relu(self.bn1(self.fc1(x)))))


def mlp(in_features: int, n_classes: int, *, hidden: int = 128, dropout: float = 0.0) -> MLP:
    """The default model of the studies (a model function, see :func:`train`)."""
    return MLP(in_features, n_classes, hidden=hidden, dropout=dropout)


def _callable_name(fn: Callable) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return f"{getattr(inner, '__module__', '?')}:{getattr(inner, '__qualname__', repr(inner))}"


def _takes_dropout(fn: Callable) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "dropout" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def build_model(model_fn: ModelFn, data: Dataset, setting: Setting) -> nn.Module:
    kwargs = {"dropout": setting.dropout} if setting.dropout else {}
    if kwargs and not _takes_dropout(model_fn):
        raise ValueError(
            f"setting {setting.name!r} asks for dropout={setting.dropout:g}, but the model function "
            f"{_callable_name(model_fn)} takes no 'dropout' argument"
        )
    model = model_fn(data.n_features, data.n_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model function {_callable_name(model_fn)} must return a torch.nn.Module, got {type(model).__name__}")
    return model


# -- which parameters are regularized ---------------------------------------------------------


def _matches(pattern: str, name: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def select_parameters(model: nn.Module, only: Sequence[str] = ()) -> List[str]:
    """Names of the parameters that ``only`` selects (all of them when it is empty).

    A pattern selects a parameter when it is the parameter's name, a module prefix of it
    (``fc1`` selects ``fc1.weight`` and ``fc1.bias``; ``encoder`` everything under it), or a
    shell glob matching the whole name (``*.weight``, ``layer[12].*``). A pattern that
    selects nothing is an error, as it is almost always a typo.
    """
    names = [name for name, _ in model.named_parameters()]
    if not only:
        return names
    for pattern in only:
        if not any(_matches(pattern, name) for name in names):
            raise ValueError(f"only: pattern {pattern!r} matches no parameter; the model has {', '.join(names)}")
    return [name for name in names if any(_matches(pattern, name) for pattern in only)]


def regularization_groups(
    model: nn.Module, setting: Setting, only: Sequence[str] = (), no_decay: Sequence[str] = ("bias", "norm")
) -> Tuple[List[Dict[str, Any]], Dict[str, bool]]:
    """Param groups for :class:`fastreg.Regularized`, and which parameters they regularize.

    :func:`fastreg.param_groups` sets biases and norm layers (``no_decay``) apart; of the
    rest, the parameters ``only`` selects form one group with the setting's strengths and
    every other parameter goes to a group with all strengths 0, so they are untouched.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    selected = set(select_parameters(model, only))
    regularized, untouched = [], []
    for group in fastreg.param_groups(model, no_decay=tuple(no_decay), **setting.strengths):
        decays = any(group[key] for key in STRENGTH_KEYS)
        for p in group["params"]:
            (regularized if decays and names[id(p)] in selected else untouched).append(p)
    groups = []
    if regularized:
        groups.append({"params": regularized, "weight_decay": 0.0, **setting.strengths})
    if untouched:
        groups.append({"params": untouched, "weight_decay": 0.0, **{key: 0.0 for key in STRENGTH_KEYS}})
    marked = {id(p) for p in regularized}
    return groups, {name: id(p) in marked for name, p in model.named_parameters()}


def check_study(settings: Sequence[Setting], data: Dataset, config: "TrainConfig", model_fn: Optional[ModelFn] = None) -> None:
    """Raise on a bad model function, ``only`` pattern or dropout setting before the first
    run trains rather than after several (``compare`` and ``sweep`` call it first)."""
    model_fn = model_fn or mlp
    for setting in settings:
        if not isinstance(setting, Setting):
            raise TypeError(f"settings must be fastreg.studies.Setting objects, got {type(setting).__name__}")
    names = [s.name for s in settings]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"settings: names must be unique, {', '.join(duplicates)} repeat")
    # Building the model draws from the global RNG: fork it, so the check changes nothing.
    with torch.random.fork_rng(devices=[]):
        # One setting with dropout and one without stand for all: the rest build alike.
        for setting in {s.dropout > 0: s for s in settings}.values():
            select_parameters(build_model(model_fn, data, setting), config.only)


# -- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """How every run of a study trains. ``only`` and ``no_decay`` pick the regularized
    parameters (see :func:`regularization_groups`); ``backend`` goes to ``Regularized``.
    ``threads`` is torch's CPU thread count during training: models this small gain nothing
    from more threads, and on a busy machine extra threads cost more time in waiting for
    each other than they save (10x slower on 2 shared cores)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    device: str = "cpu"
    only: Tuple[str, ...] = ()
    no_decay: Tuple[str, ...] = ("bias", "norm")
    backend: Optional[str] = None
    threads: int = 1

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "threads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for key in ("only", "no_decay"):
            value = getattr(self, key)
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{key} must be non-empty strings, got {value!r}")
            object.__setattr__(self, key, value)
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available here")
        object.__setattr__(self, "device", str(device))


@dataclass
class EpochRecord:
    """Losses and accuracies measured after an epoch, in eval mode (so dropout is off and
    batch norm uses its running statistics); ``penalty`` is the mean over the epoch's steps
    of ``Regularized.last_penalty``, ``None`` when nothing is regularized."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    penalty: Optional[float]


@dataclass
class TestMetrics:
    """On the held-out test set. Precision, recall and F1 are macro averages over the
    classes (of the positive class for two classes); ROC-AUC is one-vs-rest macro, ``None``
    when a class is missing from the test set."""

    loss: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: Optional[float]
    confusion_matrix: List[List[int]]


@dataclass
class LayerSparsity:
    name: str
    numel: int
    zeros: int
    zero_fraction: float
    regularized: bool


def _zero_fraction(layers: Sequence[LayerSparsity]) -> float:
    total = sum(layer.numel for layer in layers)
    return sum(layer.zeros for layer in layers) / total if total else 0.0


@dataclass
class RunResult:
    setting: Setting
    history: List[EpochRecord]
    test: TestMetrics
    sparsity: List[LayerSparsity]
    seconds: float
    model: Optional[nn.Module] = field(default=None, repr=False, compare=False)
    """The trained model (not saved by :func:`write_run`)."""

    @property
    def final(self) -> EpochRecord:
        return self.history[-1]

    @property
    def regularized_layers(self) -> List[str]:
        return [layer.name for layer in self.sparsity if layer.regularized]

    @property
    def layers_label(self) -> str:
        """Which parameters the run regularized, short enough for a table or a plot title."""
        layers = self.regularized_layers
        if not layers:
            return "-"
        if len(layers) == len(self.sparsity):
            return "all"
        return ", ".join(layers)

    @property
    def zero_fraction(self) -> float:
        """Exactly-zero weights among all parameters."""
        return _zero_fraction(self.sparsity)

    @property
    def regularized_zero_fraction(self) -> float:
        """Exactly-zero weights among the regularized parameters (0 when there are none)."""
        return _zero_fraction([layer for layer in self.sparsity if layer.regularized])

    def to_dict(self) -> Dict[str, Any]:
        return {
            "setting": dataclasses.asdict(self.setting),
            "description": self.setting.describe(),
            "regularized_layers": self.regularized_layers,
            "history": [dataclasses.asdict(r) for r in self.history],
            "test": dataclasses.asdict(self.test),
            "sparsity": [dataclasses.asdict(s) for s in self.sparsity],
            "zero_fraction": self.zero_fraction,
            "regularized_zero_fraction": self.regularized_zero_fraction,
            "seconds": self.seconds,
        }


@contextlib.contextmanager
def _reproducible(device: torch.device, threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count, and the global RNG (dropout draws from
    it) seeded inside a fork, so that a study leaves the caller's random state as it was."""
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    enabled = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous_threads)
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _batches(order: Tensor, batch_size: int) -> List[Tensor]:
    starts = list(range(0, len(order), batch_size))
    # BatchNorm cannot train on a single sample: fold a last batch of one into the one before.
    if len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()
    ends = starts[1:] + [len(order)]
    return [order[s:e] for s, e in zip(starts, ends)]


@torch.no_grad()
def _logits(model: nn.Module, X: Tensor, chunk: int = 8192) -> Tensor:
    model.eval()
    return torch.cat([model(X[i : i + chunk]) for i in range(0, len(X), chunk)])


def _loss_accuracy(logits: Tensor, y: Tensor) -> Tuple[float, float]:
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


def _test_metrics(logits: Tensor, y: Tensor, n_classes: int) -> TestMetrics:
    metrics = optional_import("sklearn.metrics", "test metrics")
    loss, accuracy = _loss_accuracy(logits, y)
    proba = torch.softmax(logits.double(), dim=1).cpu().numpy()
    truth = y.cpu().numpy()
    predicted = proba.argmax(1)
    labels = list(range(n_classes))
    binary = n_classes == 2
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        truth, predicted, labels=None if binary else labels, average="binary" if binary else "macro", zero_division=0
    )
    try:
        if binary:
            roc_auc = float(metrics.roc_auc_score(truth, proba[:, 1]))
        else:
            roc_auc = float(metrics.roc_auc_score(truth, proba, multi_class="ovr", average="macro", labels=labels))
    except ValueError:  # a class absent from the test set has no ROC curve
        roc_auc = None
    return TestMetrics(
        loss=loss,
        accuracy=accuracy,
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        roc_auc=roc_auc,
        confusion_matrix=metrics.confusion_matrix(truth, predicted, labels=labels).tolist(),
    )


def sparsity(model: nn.Module, regularized: Dict[str, bool]) -> List[LayerSparsity]:
    """Exactly-zero entries of every parameter (what decoupled L1 / group lasso leave)."""
    layers = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            zeros = int((p == 0).sum().item())
            layers.append(LayerSparsity(name, p.numel(), zeros, zeros / p.numel() if p.numel() else 0.0, regularized.get(name, False)))
    return layers


def _progress(iterable: Iterable, enabled: bool, **options):
    if not enabled:
        return iterable
    tqdm = optional_import("tqdm", "progress bars").tqdm
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **options)


def train(
    setting: Setting,
    data: Dataset,
    config: TrainConfig = TrainConfig(),
    model_fn: Optional[ModelFn] = None,
    *,
    progress: bool = False,
) -> RunResult:
    """Train one model under ``setting`` and evaluate it.

    ``model_fn(in_features, n_classes, **options)`` returns a ``torch.nn.Module`` mapping a
    float batch ``(N, in_features)`` to logits ``(N, n_classes)``; ``options`` is
    ``dropout=p`` for a setting with dropout, and empty otherwise (the default is :func:`mlp`).
    The model is built right after ``torch.manual_seed(config.seed)``, so every setting of a
    study starts from the same weights, and batches come in the same order (a generator
    seeded with ``config.seed``); with the same seed, data and machine, the result is the same.
    """
    model_fn = model_fn or mlp
    device = torch.device(config.device)
    started = time.perf_counter()
    with _reproducible(device, config.threads):
        torch.manual_seed(config.seed)
        model = build_model(model_fn, data, setting).to(device)
        groups, regularized = regularization_groups(model, setting, config.only, config.no_decay)
        if config.optimizer == "adam":
            inner: torch.optim.Optimizer = torch.optim.Adam(groups, lr=config.lr)
        else:
            inner = torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
        optimizer = fastreg.Regularized(inner, mode=setting.mode, group_dim=setting.group_dim, backend=config.backend)
        data = data.to(device)
        order_generator = torch.Generator().manual_seed(config.seed)
        history = []
        epochs = _progress(range(1, config.epochs + 1), progress, desc=setting.name, unit="epoch", leave=False)
        for epoch in epochs:
            model.train()
            penalty_sum: Optional[Tensor] = None
            batches = _batches(torch.randperm(len(data.y_train), generator=order_generator).to(device), config.batch_size)
            for batch in batches:
                optimizer.zero_grad()
                F.cross_entropy(model(data.X_train[batch]), data.y_train[batch]).backward()
                optimizer.step()
                if optimizer.last_penalty is not None:
                    # Summed as tensors: one host sync per epoch, not one per step.
                    value = optimizer.last_penalty.detach()
                    penalty_sum = value if penalty_sum is None else penalty_sum + value
            train_loss, train_accuracy = _loss_accuracy(_logits(model, data.X_train), data.y_train)
            val_loss, val_accuracy = _loss_accuracy(_logits(model, data.X_val), data.y_val)
            mean_penalty = None if penalty_sum is None else penalty_sum.item() / len(batches)
            history.append(EpochRecord(epoch, train_loss, train_accuracy, val_loss, val_accuracy, mean_penalty))
            if progress:
                epochs.set_postfix(val_loss=f"{val_loss:.3f}", val_acc=f"{val_accuracy:.3f}")
        test = _test_metrics(_logits(model, data.X_test), data.y_test, data.n_classes)
        layers = sparsity(model, regularized)
    return RunResult(setting, history, test, layers, time.perf_counter() - started, model)


# -- the two studies --------------------------------------------------------------------------


def environment(device: str) -> Dict[str, Any]:
    return {
        "fastreg": fastreg.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
    }


def _resolve_data(data: Union[Dataset, str, DataFn], config: TrainConfig) -> Dataset:
    return data if isinstance(data, Dataset) else load_data(data, seed=config.seed)


@dataclass
class CompareResult:
    runs: List[RunResult]
    config: TrainConfig
    data: Dict[str, Any]
    model: str
    environment: Dict[str, Any]

    def run(self, name: str) -> RunResult:
        for run in self.runs:
            if run.setting.name == name:
                return run
        raise KeyError(f"no setting named {name!r}; the study ran {', '.join(r.setting.name for r in self.runs)}")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": "fastreg-compare/1",
            "config": dataclasses.asdict(self.config),
            "data": self.data,
            "model": self.model,
            "environment": self.environment,
            "runs": [run.to_dict() for run in self.runs],
        }


def compare(
    settings: Optional[Sequence[Setting]] = None,
    data: Union[Dataset, str, DataFn] = "digits",
    config: TrainConfig = TrainConfig(),
    model_fn: Optional[ModelFn] = None,
    *,
    progress: bool = False,
) -> CompareResult:
    """Train the same model under each setting (default: :func:`default_settings`) with the
    same seed, data split and batch order; see :func:`train` for ``model_fn``. ``data`` is
    a :class:`Dataset` or anything :func:`load_data` takes (split with ``config.seed``)."""
    settings = list(default_settings() if settings is None else settings)
    if not settings:
        raise ValueError("settings must name at least one Setting")
    dataset = _resolve_data(data, config)
    model_fn = model_fn or mlp
    check_study(settings, dataset, config, model_fn)
    runs = [train(s, dataset, config, model_fn, progress=progress) for s in _progress(settings, progress, desc="compare", unit="run")]
    return CompareResult(runs, config, dataset.info(), str(runs[0].model), environment(config.device))


def log_grid(low: float, high: float, num: int) -> List[float]:
    """``num`` strengths from ``low`` to ``high``, evenly spaced in log scale."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"num must be an integer >= 2, got {num!r}")
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"the grid needs 0 < low < high (finite), got low={low!r}, high={high!r}")
    step = (math.log(high) - math.log(low)) / (num - 1)
    return [math.exp(math.log(low) + i * step) for i in range(num - 1)] + [float(high)]


def sweep_setting(kind: str, strength: float, mode: str = "coupled", *, l1_ratio: float = 0.5, group_dim: Optional[int] = 0) -> Setting:
    """The setting a sweep trains at ``strength``: ElasticNet splits it as scikit-learn
    does (``l1 = strength * l1_ratio``, ``l2 = strength * (1 - l1_ratio)``), group lasso
    groups ``group_dim`` (rows by default: whole neurons go to zero)."""
    name = f"{kind}={strength:.3g}"
    if kind == "l1":
        return Setting(name, l1=strength, mode=mode)
    if kind == "l2":
        return Setting(name, l2=strength, mode=mode)
    if kind == "elasticnet":
        if not 0 <= l1_ratio <= 1:
            raise ValueError(f"l1_ratio must be in [0, 1], got {l1_ratio!r}")
        return Setting(name, l1=strength * l1_ratio, l2=strength * (1 - l1_ratio), mode=mode)
    if kind == "group_lasso":
        return Setting(name, group_lasso=strength, mode=mode, group_dim=group_dim)
    raise ValueError(f"kind must be one of {', '.join(SWEEP_KINDS)}, got {kind!r}")


@dataclass
class SweepResult:
    kind: str
    mode: str
    select: str
    strengths: List[float]
    runs: List[RunResult]
    best_index: int
    baseline: Optional[RunResult]
    config: TrainConfig
    data: Dict[str, Any]
    model: str
    environment: Dict[str, Any]

    @property
    def best_strength(self) -> float:
        return self.strengths[self.best_index]

    @property
    def best(self) -> RunResult:
        return self.runs[self.best_index]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": "fastreg-sweep/1",
            "kind": self.kind,
            "mode": self.mode,
            "select": self.select,
            "strengths": self.strengths,
            "best_index": self.best_index,
            "best_strength": self.best_strength,
            "config": dataclasses.asdict(self.config),
            "data": self.data,
            "model": self.model,
            "environment": self.environment,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "runs": [run.to_dict() for run in self.runs],
        }


def _select_best(runs: Sequence[RunResult], select: str) -> int:
    def val_loss(run: RunResult) -> float:
        return run.final.val_loss if math.isfinite(run.final.val_loss) else math.inf

    if select == "val_loss":
        return min(range(len(runs)), key=lambda i: (val_loss(runs[i]), i))
    # Accuracy ties are common on small validation sets; the lower loss breaks them.
    return min(range(len(runs)), key=lambda i: (-runs[i].final.val_accuracy, val_loss(runs[i]), i))


def sweep(
    kind: str = "l2",
    strengths: Optional[Sequence[float]] = None,
    *,
    mode: str = "coupled",
    l1_ratio: float = 0.5,
    group_dim: Optional[int] = 0,
    select: str = "val_loss",
    baseline: bool = True,
    data: Union[Dataset, str, DataFn] = "digits",
    config: TrainConfig = TrainConfig(),
    model_fn: Optional[ModelFn] = None,
    progress: bool = False,
) -> SweepResult:
    """Train at each strength of ``kind`` (default: 9 log-spaced values of
    :data:`DEFAULT_GRIDS`) and pick the best by the final epoch's ``select`` on the
    validation set (``"val_loss"``, or ``"val_accuracy"`` with ties broken by the loss).
    With ``baseline``, one unregularized run is trained for reference (not a candidate)."""
    if kind not in SWEEP_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SWEEP_KINDS)}, got {kind!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if select not in SELECT_CHOICES:
        raise ValueError(f"select must be one of {', '.join(SELECT_CHOICES)}, got {select!r}")
    if strengths is None:
        strengths = log_grid(*DEFAULT_GRIDS[kind, mode], 9)
    strengths = [_strength("strengths[]", s) for s in strengths]
    if not strengths:
        raise ValueError("strengths must hold at least one value")
    if len(set(strengths)) != len(strengths):
        raise ValueError("strengths must not repeat")
    settings = [sweep_setting(kind, s, mode, l1_ratio=l1_ratio, group_dim=group_dim) for s in sorted(strengths)]
    dataset = _resolve_data(data, config)
    model_fn = model_fn or mlp
    planned = ([Setting("none")] if baseline else []) + settings
    check_study(planned, dataset, config, model_fn)
    trained = [train(s, dataset, config, model_fn, progress=progress) for s in _progress(planned, progress, desc="sweep", unit="run")]
    reference, runs = (trained[0], trained[1:]) if baseline else (None, trained)
    return SweepResult(
        kind=kind,
        mode=mode,
        select=select,
        strengths=sorted(strengths),
        runs=runs,
        best_index=_select_best(runs, select),
        baseline=reference,
        config=config,
        data=dataset.info(),
        model=str(runs[0].model),
        environment=environment(config.device),
    )


# -- reporting --------------------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def summary_table(result: Union[CompareResult, SweepResult]) -> str:
    """The results as a table (tabulate), as the CLI prints them."""
    if isinstance(result, CompareResult):
        rows = [
            [
                run.setting.name,
                run.setting.describe(),
                run.layers_label,
                _fmt(run.final.val_accuracy),
                _fmt(run.test.accuracy),
                _fmt(run.test.precision),
                _fmt(run.test.recall),
                _fmt(run.test.f1),
                _fmt(run.test.roc_auc, ".4f"),
                _fmt(run.final.penalty, ".4g"),
                _fmt(run.zero_fraction, ".1%"),
                _fmt(run.seconds, ".1f"),
            ]
            for run in result.runs
        ]
        headers = ["setting", "regularization", "layers", "val acc", "test acc", "precision", "recall", "F1", "ROC-AUC", "penalty", "zero weights", "time (s)"]
        return tabulate(rows, headers=headers, disable_numparse=True)
    rows = []
    candidates = ([("none (baseline)", result.baseline)] if result.baseline else []) + [
        (f"{s:.3g}", run) for s, run in zip(result.strengths, result.runs)
    ]
    for label, run in candidates:
        rows.append(
            [
                label,
                _fmt(run.final.train_loss, ".4f"),
                _fmt(run.final.val_loss, ".4f"),
                _fmt(run.final.train_accuracy),
                _fmt(run.final.val_accuracy),
                _fmt(run.test.accuracy),
                _fmt(run.test.f1),
                _fmt(run.zero_fraction, ".1%"),
                "<- best" if run is result.best else "",
            ]
        )
    headers = [result.kind, "train loss", "val loss", "train acc", "val acc", "test acc", "test F1", "zero weights", ""]
    return tabulate(rows, headers=headers, disable_numparse=True)


def best_summary(result: SweepResult) -> str:
    best = result.best
    text = (
        f"best {result.kind} ({result.mode}) = {result.best_strength:.3g} by {result.select.replace('_', ' ')}, "
        f"on {best.layers_label}: test accuracy {best.test.accuracy:.4f}, precision {best.test.precision:.4f}, "
        f"recall {best.test.recall:.4f}, F1 {best.test.f1:.4f}, ROC-AUC {_fmt(best.test.roc_auc, '.4f')}"
    )
    if result.baseline is not None:
        text += f" (unregularized: test accuracy {result.baseline.test.accuracy:.4f}, F1 {result.baseline.test.f1:.4f})"
    # A best value at the edge of the grid only bounds the optimum: say which way to look.
    if len(result.runs) > 1 and result.best_index == 0:
        text += "; it is the grid's smallest strength: a weaker one (or none) may be better still"
    elif len(result.runs) > 1 and result.best_index == len(result.runs) - 1:
        text += "; it is the grid's largest strength: a stronger one may be better still"
    return text


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity (a diverged run has them): they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _history_rows(runs: Iterable[Tuple[str, RunResult]]) -> Iterator[List[Any]]:
    for label, run in runs:
        for r in run.history:
            yield [label, r.epoch, r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy, "" if r.penalty is None else r.penalty]


def _sparsity_rows(runs: Iterable[Tuple[str, RunResult]]) -> Iterator[List[Any]]:
    for label, run in runs:
        for layer in run.sparsity:
            yield [label, layer.name, layer.regularized, layer.numel, layer.zeros, layer.zero_fraction]


HISTORY_HEADER = ["setting", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "penalty"]
SPARSITY_HEADER = ["setting", "parameter", "regularized", "numel", "zeros", "zero_fraction"]
METRIC_HEADER = ["accuracy", "precision", "recall", "f1", "roc_auc", "test_loss", "zero_fraction"]


def _metric_values(run: RunResult) -> List[Any]:
    t = run.test
    return [t.accuracy, t.precision, t.recall, t.f1, "" if t.roc_auc is None else t.roc_auc, t.loss, run.zero_fraction]


def write_run(result: Union[CompareResult, SweepResult], folder: Union[str, os.PathLike], *, plots: bool = True) -> List[Path]:
    """Write a study's run folder and return the files written.

    Both studies write ``results.json`` (everything, with config and environment),
    ``history.csv`` (per-epoch losses, accuracies and penalty) and ``sparsity.csv``
    (exactly-zero weights per parameter, and whether it was regularized). ``compare`` adds
    ``metrics.csv`` and the plots ``learning_curves.png``, ``metrics.png``,
    ``confusion_matrices.png`` and ``sparsity.png``; ``sweep`` adds ``sweep.csv`` and the
    plots ``sweep.png`` and ``sparsity.png``. ``plots=False`` skips the PNGs (and matplotlib).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    results = folder / "results.json"
    results.write_text(json.dumps(_json_safe(result.to_dict()), indent=2) + "\n")
    written.append(results)
    if isinstance(result, CompareResult):
        labelled = [(run.setting.name, run) for run in result.runs]
        written.append(
            _write_csv(
                folder / "metrics.csv",
                ["setting", "regularization", "regularized_layers"] + METRIC_HEADER,
                ([run.setting.name, run.setting.describe(), " ".join(run.regularized_layers)] + _metric_values(run) for run in result.runs),
            )
        )
    elif isinstance(result, SweepResult):
        labelled = ([("none", result.baseline)] if result.baseline else []) + [(run.setting.name, run) for run in result.runs]
        written.append(
            _write_csv(
                folder / "sweep.csv",
                ["strength", "train_loss", "train_accuracy", "val_loss", "val_accuracy"] + METRIC_HEADER + ["best"],
                (
                    [s, run.final.train_loss, run.final.train_accuracy, run.final.val_loss, run.final.val_accuracy]
                    + _metric_values(run)
                    + [i == result.best_index]
                    for i, (s, run) in enumerate(zip(result.strengths, result.runs))
                ),
            )
        )
    else:
        raise TypeError(f"result must be a CompareResult or SweepResult, got {type(result).__name__}")
    written.append(_write_csv(folder / "history.csv", HISTORY_HEADER, _history_rows(labelled)))
    written.append(_write_csv(folder / "sparsity.csv", SPARSITY_HEADER, _sparsity_rows(labelled)))
    if plots:
        from . import plots as plotting

        if isinstance(result, CompareResult):
            written += plotting.compare_figures(result, folder)
        else:
            written += plotting.sweep_figures(result, folder)
    return written
