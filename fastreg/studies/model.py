"""The model a study trains, and which of its parameters a setting regularizes."""
from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Callable, Dict, List, Sequence, Tuple

from torch import Tensor, nn

from .. import param_groups
from .data import Dataset
from .settings import STRENGTH_KEYS, StudySetting

ModelFn = Callable[..., nn.Module]


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
    """The default model of the studies (a model function, see :func:`~fastreg.studies.train`)."""
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


def build_model(model_fn: ModelFn, data: Dataset, setting: StudySetting) -> nn.Module:
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
    model: nn.Module, setting: StudySetting, only: Sequence[str] = (), no_decay: Sequence[str] = ("bias", "norm")
) -> Tuple[List[Dict[str, Any]], Dict[str, bool]]:
    """Param groups for :class:`fastreg.Regularized`, and which parameters they regularize.

    :func:`fastreg.param_groups` sets biases and norm layers (``no_decay``) apart; of the
    rest, the parameters ``only`` selects form one group with the setting's strengths and
    every other parameter goes to a group with all strengths 0, so they are untouched.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    selected = set(select_parameters(model, only))
    regularized, untouched = [], []
    for group in param_groups(model, no_decay=tuple(no_decay), **setting.strengths):
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

