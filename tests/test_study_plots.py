"""The figures of a study's run folder show the study's results (fastreg.studies.plots)."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imread

from fastreg import studies
from fastreg.studies import plots

S = studies.StudySetting


@pytest.fixture(scope="module")
def data():
    return studies.load_data("digits", seed=0, max_train=200)


@pytest.fixture(scope="module")
def compared(data):
    settings = [S("none"), S("l1-decoupled", l1=0.5, mode="decoupled"), S("l2", l2=0.01)]
    return studies.compare(settings, data, studies.TrainConfig(epochs=4, only=("fc1",)))


@pytest.fixture(scope="module")
def swept(data):
    return studies.sweep("l1", [1e-3, 1e-1, 1.0], mode="decoupled", data=data, config=studies.TrainConfig(epochs=3))


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.lines}


def test_learning_curves_plot_each_runs_history(compared):
    fig = plots.learning_curves(compared)
    runs = compared.runs
    assert len(fig.axes) == 3 * len(runs)
    grid = np.array(fig.axes, dtype=object).reshape(3, len(runs))  # subplots are row-major
    for column, run in enumerate(runs):
        loss_ax, accuracy_ax, penalty_ax = grid[:, column]
        epochs = [r.epoch for r in run.history]
        assert loss_ax.get_title() == f"{run.setting.name}\n{run.setting.describe()}\nregularized: {run.layers_label}"
        for ax, train, val in ((loss_ax, "train_loss", "val_loss"), (accuracy_ax, "train_accuracy", "val_accuracy")):
            lines = lines_by_label(ax)
            assert sorted(lines) == ["train", "validation"]
            for label, key in (("train", train), ("validation", val)):
                assert list(lines[label].get_xdata()) == epochs
                assert list(lines[label].get_ydata()) == [getattr(r, key) for r in run.history], (run.setting.name, label)
        penalties = [r.penalty for r in run.history]
        if run.setting.regularized:
            assert all(p > 0 for p in penalties)
            (line,) = penalty_ax.lines
            assert list(line.get_xdata()) == epochs and list(line.get_ydata()) == penalties
        else:
            assert penalties == [None] * len(epochs) and not penalty_ax.lines
            assert [t.get_text() for t in penalty_ax.texts] == ["no penalty"]
    assert grid[0, 0].get_yscale() == "log" and grid[2, 0].get_yscale() == "log"


def test_metrics_table_shows_each_runs_test_metrics_and_bolds_the_best(compared):
    fig = plots.metrics_table(compared)
    (table,) = fig.axes[0].tables
    cells = table.get_celld()
    text = {key: cell.get_text().get_text() for key, cell in cells.items()}
    columns = list(plots.METRIC_COLUMNS)
    assert [text[0, j] for j in range(len(columns))] == columns
    assert max(i for i, _ in cells) == len(compared.runs)
    for i, run in enumerate(compared.runs, start=1):
        row = {column: text[i, j] for j, column in enumerate(columns)}
        assert (row["setting"], row["regularization"], row["layers"]) == (run.setting.name, run.setting.describe(), run.layers_label)
        shown = {"test acc": run.test.accuracy, "precision": run.test.precision, "recall": run.test.recall, "F1": run.test.f1, "ROC-AUC": run.test.roc_auc}
        for column, value in shown.items():
            decimals = 4 if column == "ROC-AUC" else 3
            assert float(row[column]) == pytest.approx(value, abs=0.5 * 10**-decimals), column
        assert float(row["zero weights"].rstrip("%")) == pytest.approx(100 * run.zero_fraction, abs=0.05)
    for column in plots.BOLD_BEST:
        j = columns.index(column)
        values = [float(text[i, j]) for i in range(1, len(compared.runs) + 1)]
        bold = [cells[i, j].get_text().get_fontweight() == "bold" for i in range(1, len(compared.runs) + 1)]
        assert bold == [v == max(values) for v in values], column


def test_confusion_matrices_show_each_runs_matrix(compared, data):
    fig = plots.confusion_matrices(compared)
    for ax, run in zip(fig.axes, compared.runs):
        (image,) = ax.images
        matrix = np.array(run.test.confusion_matrix)
        assert image.get_visible() and np.array_equal(image.get_array(), matrix)
        assert sorted(int(t.get_text()) for t in ax.texts) == sorted(matrix.ravel().tolist())
        assert ax.get_title() == f"{run.setting.name} (acc {run.test.accuracy:.3f})"
        assert [t.get_text() for t in ax.get_xticklabels()] == data.classes
    assert len(fig.axes) == len(compared.runs)


def test_sparsity_bars_are_the_zero_fractions_hatched_where_not_regularized(compared):
    fig = plots.sparsity_per_layer(compared.runs, "zeros")
    (ax,) = fig.axes
    names = [layer.name for layer in compared.runs[0].sparsity]
    bars = np.array(ax.patches, dtype=object).reshape(len(compared.runs), len(names))
    for run, row in zip(compared.runs, bars):
        assert [bar.get_height() for bar in row] == [layer.zero_fraction for layer in run.sparsity]
        assert [bar.get_hatch() for bar in row] == [None if layer.regularized else plots.UNREGULARIZED_HATCH for layer in run.sparsity]
    assert compared.run("l1-decoupled").sparsity[0].zero_fraction > 0  # the plot has a visible bar to check
    assert ax.get_legend_handles_labels()[1] == [run.setting.name for run in compared.runs]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fc1.weight\n(regularized)"] + names[1:]


def test_sweep_figure_plots_the_final_epoch_against_the_strength(swept):
    fig = plots.sweep_figure(swept)
    loss_ax, accuracy_ax, zeros_ax = fig.axes
    finals = [run.final for run in swept.runs]
    expected = {
        loss_ax: {"train": [f.train_loss for f in finals], "validation": [f.val_loss for f in finals]},
        accuracy_ax: {
            "train": [f.train_accuracy for f in finals],
            "validation": [f.val_accuracy for f in finals],
            "test": [run.test.accuracy for run in swept.runs],
        },
        zeros_ax: {
            "regularized parameters": [run.regularized_zero_fraction for run in swept.runs],
            "all parameters": [run.zero_fraction for run in swept.runs],
        },
    }
    assert swept.runs[-1].regularized_zero_fraction > 0  # the strongest decoupled L1 leaves zeros to plot
    base = swept.baseline.final
    baselines = {
        loss_ax: {"train, unregularized": base.train_loss, "validation, unregularized": base.val_loss},
        accuracy_ax: {"train, unregularized": base.train_accuracy, "validation, unregularized": base.val_accuracy},
        zeros_ax: {},
    }
    for ax, curves in expected.items():
        lines = lines_by_label(ax)
        for label, values in curves.items():
            assert list(lines[label].get_xdata()) == swept.strengths and list(lines[label].get_ydata()) == values, label
        for label, value in baselines[ax].items():
            assert list(lines[label].get_ydata()) == [value, value], label
        best_marks = [line for label, line in lines.items() if label.startswith("_") and list(line.get_xdata()) == [swept.best_strength] * 2]
        assert len(best_marks) == 1
        assert set(lines) == set(curves) | set(baselines[ax]) | {best_marks[0].get_label()}
        assert ax.get_xscale() == "log"
    (note,) = zeros_ax.texts
    assert f"{swept.best_strength:.3g}" in note.get_text() and f"test acc {swept.best.test.accuracy:.4f}" in note.get_text()


def test_sweep_sparsity_figure_includes_the_baseline(swept):
    figures = plots.sweep_figures(swept)
    assert list(figures) == ["sweep.png", "sparsity.png"]
    (ax,) = figures["sparsity.png"].axes
    assert ax.get_legend_handles_labels()[1] == ["none", "l1=0.001", "l1=0.1", "l1=1"]


def rendered(figure):
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())


@pytest.mark.parametrize("study", ["compared", "swept"])
def test_written_pngs_are_the_figures(study, request, tmp_path):
    result = request.getfixturevalue(study)
    written = studies.write_run(result, tmp_path)
    figures = plots.compare_figures(result) if study == "compared" else plots.sweep_figures(result)
    assert [p.name for p in written if p.suffix == ".png"] == list(figures)
    for name, figure in figures.items():
        png = imread(tmp_path / name)
        width, height = figure.get_size_inches() * plots.DPI
        assert png.shape == (round(height), round(width), 4), name
        pixels = np.round(png * 255).astype(np.uint8)
        assert np.array_equal(pixels, rendered(figure)), name
        # Not a blank canvas: a fair share of the pixels carry ink, in many colours.
        ink = (pixels[..., :3] < 250).any(axis=-1)
        assert ink.mean() > 0.02, name
        assert len(np.unique(pixels.reshape(-1, 4), axis=0)) > 20, name
