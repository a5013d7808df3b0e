"""What a study varies and what it holds fixed: the regularization settings it compares
(:class:`StudySetting`), the strengths a sweep tries, and how every run trains
(:class:`TrainConfig`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..optim import MODES

OPTIMIZERS = ("adam", "sgd")
SWEEP_KINDS = ("l1", "l2", "elasticnet", "group_lasso")
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


def check_strength(name: str, value: Any) -> float:
    """``value`` as a float, or a clear error naming ``name`` when it is not a finite
    non-negative real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and non-negative, got {value}")
    return value


@dataclass(frozen=True)
class StudySetting:
    """One way to regularize in a study: strengths in fastreg's convention (those of
    :func:`fastreg.penalty`), the mode ``Regularized`` applies them in, and a dropout rate
    for contrast (passed to the model)."""

    name: str
    l1: float = 0.0
    l2: float = 0.0
    group_lasso: float = 0.0
    mode: str = "coupled"
    group_dim: Optional[int] = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in ",:\n"):
            raise ValueError(f"StudySetting.name must be a non-empty string without ',', ':' or newlines, got {self.name!r}")
        where = f"StudySetting({self.name!r})"
        for key in STRENGTH_KEYS:
            object.__setattr__(self, key, check_strength(f"{where}.{key}", getattr(self, key)))
        if self.mode not in MODES:
            raise ValueError(f"{where}.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.group_dim is not None and (isinstance(self.group_dim, bool) or self.group_dim != 0):
            raise ValueError(f"{where}.group_dim must be None (whole tensors) or 0 (rows), got {self.group_dim!r}")
        dropout = check_strength(f"{where}.dropout", self.dropout)
        if dropout >= 1:
            raise ValueError(f"{where}.dropout must be in [0, 1), got {dropout}")
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
    def parse(cls, spec: str) -> "StudySetting":
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
) -> List[StudySetting]:
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
        StudySetting("none"),
        StudySetting("l1", l1=l1),
        StudySetting("l1-decoupled", l1=l1_decoupled, mode="decoupled"),
        StudySetting("l2", l2=l2),
        StudySetting("l2-decoupled", l2=l2_decoupled, mode="decoupled"),
        StudySetting("elasticnet", l1=l1 / 2, l2=l2 / 2),
        StudySetting("group-lasso", group_lasso=group_lasso, mode="decoupled", group_dim=0),
        StudySetting("dropout", dropout=dropout),
    ]


def log_grid(low: float, high: float, num: int) -> List[float]:
    """``num`` strengths from ``low`` to ``high``, evenly spaced in log scale."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"num must be an integer >= 2, got {num!r}")
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"the grid needs 0 < low < high (finite), got low={low!r}, high={high!r}")
    step = (math.log(high) - math.log(low)) / (num - 1)
    return [math.exp(math.log(low) + i * step) for i in range(num - 1)] + [float(high)]


def sweep_setting(
    kind: str, strength: float, mode: str = "coupled", *, l1_ratio: float = 0.5, group_dim: Optional[int] = 0
) -> StudySetting:
    """The setting a sweep trains at ``strength``: ElasticNet splits it as scikit-learn
    does (``l1 = strength * l1_ratio``, ``l2 = strength * (1 - l1_ratio)``), group lasso
    groups ``group_dim`` (rows by default: whole neurons go to zero)."""
    name = f"{kind}={strength:.3g}"
    if kind == "l1":
        return StudySetting(name, l1=strength, mode=mode)
    if kind == "l2":
        return StudySetting(name, l2=strength, mode=mode)
    if kind == "elasticnet":
        if not 0 <= l1_ratio <= 1:
            raise ValueError(f"l1_ratio must be in [0, 1], got {l1_ratio!r}")
        return StudySetting(name, l1=strength * l1_ratio, l2=strength * (1 - l1_ratio), mode=mode)
    if kind == "group_lasso":
        return StudySetting(name, group_lasso=strength, mode=mode, group_dim=group_dim)
    raise ValueError(f"kind must be one of {', '.join(SWEEP_KINDS)}, got {kind!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How every run of a study trains. ``only`` and ``no_decay`` pick the regularized
    parameters (see :func:`~fastreg.studies.model.regularization_groups`); ``backend`` goes
    to ``Regularized``. ``threads`` is torch's CPU thread count during training: models this
    small gain nothing from more threads, and on a busy machine extra threads cost more time
    in waiting for each other than they save (10x slower on 2 shared cores)."""

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
