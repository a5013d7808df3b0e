"""Regularization studies: does it help, which kind, how strong, on which layers.

Two studies, usable from Python and behind ``python -m fastreg compare`` and ``sweep``:

- :func:`compare` trains the same model (same initial weights, data split and batch
  order) under several :class:`StudySetting` s (none, L1, L2, ElasticNet, group lasso,
  coupled and decoupled, dropout for contrast) and records learning curves, test metrics,
  the penalty and the exactly-zero weights of every layer;
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
scikit-learn, matplotlib, tqdm); the package imports them only when a study needs them.

The modules, each importing only those above it: :mod:`.settings` (what is compared and
how runs train), :mod:`.data`, :mod:`.model` (the model and which parameters are
regularized), :mod:`.results` (what a study measures), :mod:`.training` (one run),
:mod:`.run` (the two studies), :mod:`.tables`, :mod:`.plots` and :mod:`.files` (the run
folder).
"""
from .._optional import INSTALL_HINT, MissingDependency
from .data import DATASETS, DataFn, Dataset, load_data, load_entry_point, split_data
from .files import HISTORY_HEADER, METRIC_HEADER, SPARSITY_HEADER, write_run
from .model import MLP, ModelFn, build_model, mlp, regularization_groups, select_parameters
from .results import CompareResult, EpochRecord, LayerSparsity, RunResult, SweepResult, TestMetrics
from .run import SELECT_CHOICES, check_study, compare, require, sweep
from .settings import (
    DEFAULT_GRIDS,
    OPTIMIZERS,
    STRENGTH_KEYS,
    SWEEP_KINDS,
    StudySetting,
    TrainConfig,
    default_settings,
    log_grid,
    sweep_setting,
)
from .tables import best_summary, summary_table
from .training import sparsity, train

__all__ = [
    "CompareResult",
    "DATASETS",
    "DEFAULT_GRIDS",
    "DataFn",
    "Dataset",
    "EpochRecord",
    "HISTORY_HEADER",
    "INSTALL_HINT",
    "LayerSparsity",
    "METRIC_HEADER",
    "MLP",
    "MissingDependency",
    "ModelFn",
    "OPTIMIZERS",
    "RunResult",
    "SELECT_CHOICES",
    "SPARSITY_HEADER",
    "STRENGTH_KEYS",
    "SWEEP_KINDS",
    "StudySetting",
    "SweepResult",
    "TestMetrics",
    "TrainConfig",
    "best_summary",
    "build_model",
    "check_study",
    "compare",
    "default_settings",
    "load_data",
    "load_entry_point",
    "log_grid",
    "mlp",
    "regularization_groups",
    "require",
    "select_parameters",
    "sparsity",
    "split_data",
    "summary_table",
    "sweep",
    "sweep_setting",
    "train",
    "write_run",
]
