"""The figures of a study's run folder (matplotlib, imported only here).

Figures are built with matplotlib's object-oriented API (``Figure``, never ``pyplot``), so
making and saving them neither needs a display nor changes the caller's matplotlib backend.
Each function returns its ``Figure``; :func:`compare_figures` and :func:`sweep_figures`
name them by the file :func:`~fastreg.studies.write_run` saves them to.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

from .._optional import optional_import
from ..report import format_optional
from .results import CompareResult, RunResult, SweepResult
from .tables import MISSING, compare_cells

DPI = 80
UNREGULARIZED_HATCH = "//"


Figure = Any  # matplotlib.figure.Figure, imported on use


def _figure(width: float, height: float) -> Figure:
    figure_module = optional_import("matplotlib.figure", "plots")
    return figure_module.Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _title(run: RunResult) -> str:
    return f"{run.setting.name}\n{run.setting.describe()}\nregularized: {run.layers_label}"


def learning_curves(result: CompareResult) -> Figure:
    """Per setting, side by side: loss, accuracy (train and validation) and the penalty per epoch."""
    runs = result.runs
    fig = _figure(2.6 * len(runs) + 0.6, 7.2)
    axes = fig.subplots(3, len(runs), sharex=True, sharey="row", squeeze=False)
    for column, run in enumerate(runs):
        epochs = [r.epoch for r in run.history]
        loss_ax, accuracy_ax, penalty_ax = axes[:, column]
        loss_ax.plot(epochs, [r.train_loss for r in run.history], label="train")
        loss_ax.plot(epochs, [r.val_loss for r in run.history], label="validation")
        accuracy_ax.plot(epochs, [r.train_accuracy for r in run.history], label="train")
        accuracy_ax.plot(epochs, [r.val_accuracy for r in run.history], label="validation")
        penalties = [(r.epoch, r.penalty) for r in run.history if r.penalty is not None]
        if penalties:
            penalty_ax.plot(*zip(*penalties), color="tab:red")
        else:
            penalty_ax.text(0.5, 0.5, "no penalty", transform=penalty_ax.transAxes, ha="center", va="center", color="gray")
        loss_ax.set_title(_title(run), fontsize=8)
        penalty_ax.set_xlabel("epoch")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("cross-entropy loss")
    axes[0, 0].set_yscale("log")
    axes[1, 0].set_ylabel("accuracy")
    # Decoupled strengths are orders of magnitude above coupled ones, and so are their penalties.
    if any(r.penalty for run in runs for r in run.history):
        axes[2, 0].set_yscale("log")
    axes[2, 0].set_ylabel("penalty (epoch mean)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"learning curves on {result.data['name']} (same seed, split and batch order)")
    return fig


METRIC_COLUMNS = ("setting", "regularization", "layers", "test acc", "precision", "recall", "F1", "ROC-AUC", "zero weights")
BOLD_BEST = ("test acc", "precision", "recall", "F1", "ROC-AUC")


def metrics_table(result: CompareResult) -> Figure:
    """The test metrics as a table, the best value of each metric in bold."""
    rows = [[cells[column] for column in METRIC_COLUMNS] for cells in map(compare_cells, result.runs)]
    fig = _figure(13, 0.3 * (len(rows) + 1) + 0.5)
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=METRIC_COLUMNS, bbox=(0, 0, 1, 1), cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(METRIC_COLUMNS))))
    for column in map(METRIC_COLUMNS.index, BOLD_BEST):
        values = [-math.inf if row[column] == MISSING else float(row[column]) for row in rows]
        best = max(values)
        for i, value in enumerate(values):
            if value == best:
                table[i + 1, column].get_text().set_fontweight("bold")
    ax.set_title(f"test set ({result.data['test']} samples of {result.data['name']}); bold: best", fontsize=10)
    return fig


def _grid(count: int, columns: int):
    columns = min(columns, count)
    return math.ceil(count / columns), columns


def confusion_matrices(result: CompareResult) -> Figure:
    """One test-set confusion matrix per setting (scikit-learn's ``ConfusionMatrixDisplay``)."""
    np = optional_import("numpy", "plots")
    metrics = optional_import("sklearn.metrics", "plots")
    rows, columns = _grid(len(result.runs), 4)
    classes = result.data["classes"]
    size = 2.0 + 0.28 * len(classes)
    fig = _figure(size * columns, size * rows + 0.4)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, run in zip(axes.flat, result.runs):
        display = metrics.ConfusionMatrixDisplay(np.array(run.test.confusion_matrix), display_labels=classes)
        display.plot(ax=ax, colorbar=False, cmap="Blues", text_kw={"fontsize": 6})
        ax.set_title(f"{run.setting.name} (acc {run.test.accuracy:.3f})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
    for ax in axes.flat[len(result.runs) :]:
        ax.axis("off")
    fig.suptitle("confusion matrices on the test set")
    return fig


def sparsity_per_layer(runs: Sequence[RunResult], title: str) -> Figure:
    """Exactly-zero weights per parameter and setting; hatched bars were not regularized."""
    names = [layer.name for layer in runs[0].sparsity]
    fig = _figure(min(16.0, max(7.0, 0.3 * len(names) * len(runs) + 2)), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    cmap = optional_import("matplotlib", "plots").colormaps["tab10"]
    for i, run in enumerate(runs):
        positions = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(positions, [layer.zero_fraction for layer in run.sparsity], width, label=run.setting.name, color=cmap(i % 10))
        for bar, layer in zip(bars, run.sparsity):
            if not layer.regularized:
                bar.set_hatch(UNREGULARIZED_HATCH)
                bar.set_alpha(0.45)
    regularized_anywhere = {layer.name for run in runs for layer in run.sparsity if layer.regularized}
    ax.set_xticks(range(len(names)), [f"{n}\n(regularized)" if n in regularized_anywhere else n for n in names], fontsize=8)
    ax.set_ylabel("fraction of exactly-zero weights")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=min(4, len(runs)), loc="upper right")
    ax.set_title(f"{title} (hatched: parameter not regularized in that run)", fontsize=10)
    return fig


def compare_figures(result: CompareResult) -> Dict[str, Figure]:
    """The figures of a compare run folder, by file name."""
    return {
        "learning_curves.png": learning_curves(result),
        "metrics.png": metrics_table(result),
        "confusion_matrices.png": confusion_matrices(result),
        "sparsity.png": sparsity_per_layer(result.runs, "exactly-zero weights per layer"),
    }


def _baseline_line(ax, value: Optional[float], color: str, label: str) -> None:
    if value is not None and math.isfinite(value):
        ax.axhline(value, color=color, linestyle=":", linewidth=1, label=label)


def sweep_figure(result: SweepResult) -> Figure:
    """Train and validation loss and accuracy, and sparsity, against the strength (log
    scale), with the best strength on validation data marked and its test metrics."""
    strengths = result.strengths
    runs = result.runs
    fig = _figure(14, 4.4)
    loss_ax, accuracy_ax, zeros_ax = fig.subplots(1, 3, sharex=True)
    loss_ax.plot(strengths, [r.final.train_loss for r in runs], "o-", label="train")
    loss_ax.plot(strengths, [r.final.val_loss for r in runs], "o-", label="validation")
    accuracy_ax.plot(strengths, [r.final.train_accuracy for r in runs], "o-", label="train")
    accuracy_ax.plot(strengths, [r.final.val_accuracy for r in runs], "o-", label="validation")
    accuracy_ax.plot(strengths, [r.test.accuracy for r in runs], "s--", color="gray", markersize=4, label="test")
    zeros_ax.plot(strengths, [r.regularized_zero_fraction for r in runs], "o-", color="tab:red", label="regularized parameters")
    zeros_ax.plot(strengths, [r.zero_fraction for r in runs], "o-", color="tab:purple", label="all parameters")
    if result.baseline is not None:
        base = result.baseline.final
        _baseline_line(loss_ax, base.train_loss, "tab:blue", "train, unregularized")
        _baseline_line(loss_ax, base.val_loss, "tab:orange", "validation, unregularized")
        _baseline_line(accuracy_ax, base.train_accuracy, "tab:blue", "train, unregularized")
        _baseline_line(accuracy_ax, base.val_accuracy, "tab:orange", "validation, unregularized")
    best = result.best
    for ax in (loss_ax, accuracy_ax, zeros_ax):
        ax.set_xscale("log")
        ax.axvline(result.best_strength, color="tab:green", linewidth=1.5, alpha=0.7)
        ax.grid(alpha=0.3)
        ax.set_xlabel(f"{result.kind} strength ({result.mode})")
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("cross-entropy loss (final epoch)")
    accuracy_ax.set_ylabel("accuracy (final epoch)")
    zeros_ax.set_ylabel("fraction of exactly-zero weights")
    zeros_ax.set_ylim(0, 1)
    for ax in (loss_ax, accuracy_ax, zeros_ax):
        ax.legend(fontsize=7)
    zeros_ax.text(
        0.03,
        0.8,
        f"best ({result.select.replace('_', ' ')}): {result.best_strength:.3g}\n"
        f"test acc {best.test.accuracy:.4f}\nF1 {best.test.f1:.4f}\nROC-AUC {format_optional(best.test.roc_auc, '.4f', MISSING)}",
        transform=zeros_ax.transAxes,
        va="top",
        fontsize=8,
        color="tab:green",
    )
    fig.suptitle(
        f"{result.kind} sweep on {result.data['name']}: regularized {best.layers_label}; "
        f"green line: best on validation data"
    )
    return fig


def sweep_figures(result: SweepResult) -> Dict[str, Figure]:
    """The figures of a sweep run folder, by file name."""
    return {
        "sweep.png": sweep_figure(result),
        "sparsity.png": sparsity_per_layer(result.trained, f"exactly-zero weights per layer by {result.kind} strength"),
    }
