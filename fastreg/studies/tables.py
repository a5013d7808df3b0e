"""A study's results as text: the summary tables the CLI prints, and the best strength of a sweep."""
from __future__ import annotations

from typing import Dict, Union

from tabulate import tabulate

from ..report import format_optional
from .results import CompareResult, RunResult, SweepResult

MISSING = "-"  # a ROC-AUC with a class absent from the test set, the penalty of an unregularized run


def compare_cells(run: RunResult) -> Dict[str, str]:
    """One run's row of the compare table, by column header."""
    return {
        "setting": run.setting.name,
        "regularization": run.setting.describe(),
        "layers": run.layers_label,
        "val acc": f"{run.final.val_accuracy:.3f}",
        "test acc": f"{run.test.accuracy:.3f}",
        "precision": f"{run.test.precision:.3f}",
        "recall": f"{run.test.recall:.3f}",
        "F1": f"{run.test.f1:.3f}",
        "ROC-AUC": format_optional(run.test.roc_auc, ".4f", MISSING),
        "penalty": format_optional(run.final.penalty, ".4g", MISSING),
        "zero weights": f"{run.zero_fraction:.1%}",
        "time (s)": f"{run.seconds:.1f}",
    }


def summary_table(result: Union[CompareResult, SweepResult]) -> str:
    """The results as a table (tabulate), as the CLI prints them."""
    if isinstance(result, CompareResult):
        cells = [compare_cells(run) for run in result.runs]
        return tabulate([list(row.values()) for row in cells], headers=list(cells[0]), disable_numparse=True)
    labels = (["none (baseline)"] if result.baseline is not None else []) + [f"{s:.3g}" for s in result.strengths]
    rows = [
        [
            label,
            f"{run.final.train_loss:.4f}",
            f"{run.final.val_loss:.4f}",
            f"{run.final.train_accuracy:.3f}",
            f"{run.final.val_accuracy:.3f}",
            f"{run.test.accuracy:.3f}",
            f"{run.test.f1:.3f}",
            f"{run.zero_fraction:.1%}",
            "<- best" if run is result.best else "",
        ]
        for label, run in zip(labels, result.trained)
    ]
    headers = [result.kind, "train loss", "val loss", "train acc", "val acc", "test acc", "test F1", "zero weights", ""]
    return tabulate(rows, headers=headers, disable_numparse=True)


def best_summary(result: SweepResult) -> str:
    """One sentence: the best strength, what it was picked by, its test metrics and the baseline's."""
    best = result.best
    text = (
        f"best {result.kind} ({result.mode}) = {result.best_strength:.3g} by {result.select.replace('_', ' ')}, "
        f"on {best.layers_label}: test accuracy {best.test.accuracy:.4f}, precision {best.test.precision:.4f}, "
        f"recall {best.test.recall:.4f}, F1 {best.test.f1:.4f}, ROC-AUC {format_optional(best.test.roc_auc, '.4f', MISSING)}"
    )
    if result.baseline is not None:
        text += f" (unregularized: test accuracy {result.baseline.test.accuracy:.4f}, F1 {result.baseline.test.f1:.4f})"
    # A best value at the edge of the grid only bounds the optimum: say which way to look.
    if len(result.runs) > 1 and result.best_index == 0:
        text += "; it is the grid's smallest strength: a weaker one (or none) may be better still"
    elif len(result.runs) > 1 and result.best_index == len(result.runs) - 1:
        text += "; it is the grid's largest strength: a stronger one may be better still"
    return text
