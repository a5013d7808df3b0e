"""A study's run folder: ``results.json``, the CSV files and the figures."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Sequence, Tuple, Union

from .plots import compare_figures, sweep_figures
from .results import CompareResult, RunResult, SweepResult


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
        labelled = [(run.setting.name, run) for run in result.trained]
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
        figures = compare_figures(result) if isinstance(result, CompareResult) else sweep_figures(result)
        for name, figure in figures.items():
            figure.savefig(folder / name)
            written.append(folder / name)
    return written
