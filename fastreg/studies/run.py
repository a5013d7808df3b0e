"""The two studies: :func:`compare` (one model under several settings) and :func:`sweep`
(one kind of regularization over a grid of strengths), and the checks they run first."""
from __future__ import annotations

import importlib
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import __version__
from .._optional import INSTALL_HINT, MissingDependency
from ..bench import environment
from ..optim import MODES
from .data import DataFn, Dataset, load_data
from .model import ModelFn, build_model, mlp, select_parameters
from .results import CompareResult, RunResult, SweepResult
from .settings import DEFAULT_GRIDS, SWEEP_KINDS, StudySetting, TrainConfig, check_strength, default_settings, log_grid, sweep_setting
from .training import progress_bar, train

SELECT_CHOICES = ("val_loss", "val_accuracy")


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


def check_study(settings: Sequence[StudySetting], data: Dataset, config: TrainConfig, model_fn: Optional[ModelFn] = None) -> None:
    """Raise on a bad model function, ``only`` pattern or dropout setting before the first
    run trains rather than after several (``compare`` and ``sweep`` call it first)."""
    model_fn = model_fn or mlp
    for setting in settings:
        if not isinstance(setting, StudySetting):
            raise TypeError(f"settings must be fastreg.studies.StudySetting objects, got {type(setting).__name__}")
    names = [s.name for s in settings]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"settings: names must be unique, {', '.join(duplicates)} repeat")
    # Building the model draws from the global RNG: fork it, so the check changes nothing.
    with torch.random.fork_rng(devices=[]):
        # One setting with dropout and one without stand for all: the rest build alike.
        for setting in {s.dropout > 0: s for s in settings}.values():
            select_parameters(build_model(model_fn, data, setting), config.only)


def _environment(config: TrainConfig) -> Dict[str, Any]:
    return {"fastreg": __version__, **environment(torch.device(config.device))}


def _train_all(
    settings: Sequence[StudySetting], data: Union[Dataset, str, DataFn], config: TrainConfig, model_fn: Optional[ModelFn], progress: bool, desc: str
) -> Tuple[Dataset, List[RunResult]]:
    """Every setting trained on the same data, after :func:`check_study` has passed them all."""
    dataset = data if isinstance(data, Dataset) else load_data(data, seed=config.seed)
    model_fn = model_fn or mlp
    check_study(settings, dataset, config, model_fn)
    runs = [train(s, dataset, config, model_fn, progress=progress) for s in progress_bar(settings, progress, desc=desc, unit="run")]
    return dataset, runs


def compare(
    settings: Optional[Sequence[StudySetting]] = None,
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
        raise ValueError("settings must name at least one StudySetting")
    dataset, runs = _train_all(settings, data, config, model_fn, progress, "compare")
    return CompareResult(runs, config, dataset.info(), str(runs[0].model), _environment(config))


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
    strengths = [check_strength("strengths[]", s) for s in strengths]
    if not strengths:
        raise ValueError("strengths must hold at least one value")
    if len(set(strengths)) != len(strengths):
        raise ValueError("strengths must not repeat")
    settings = [sweep_setting(kind, s, mode, l1_ratio=l1_ratio, group_dim=group_dim) for s in sorted(strengths)]
    planned = ([StudySetting("none")] if baseline else []) + settings
    dataset, trained = _train_all(planned, data, config, model_fn, progress, "sweep")
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
        environment=_environment(config),
    )

