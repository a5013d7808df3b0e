"""Regularization studies (fastreg.studies, python -m fastreg compare / sweep) on tiny settings."""
from __future__ import annotations

import csv
import json
import sys
import textwrap

import pytest
import torch
from torch import nn

from fastreg import studies
from fastreg.__main__ import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "2", "--max-train", "80", "--no-progress"]


@pytest.fixture(scope="module")
def digits():
    return studies.load_data("digits", seed=0, max_train=120)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert len(data) > 2000, path
    image = pytest.importorskip("matplotlib.image").imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


# -- the commands, end to end --------------------------------------------------------------


def test_compare_command_writes_its_run_folder(tmp_path, capsys):
    out = tmp_path / "compare"
    argv = ["compare", *TINY, "--settings", "none,l1-decoupled,dropout", "--setting", "mine:l2=0.1,mode=decoupled", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("none", "l1-decoupled", "dropout", "mine", "ROC-AUC", "zero weights"):
        assert name in printed

    record = json.loads((out / "results.json").read_text())
    assert record["schema"] == "fastreg-compare/1"
    assert record["config"]["epochs"] == 2 and record["data"]["train"] == 80
    runs = {run["setting"]["name"]: run for run in record["runs"]}
    assert list(runs) == ["none", "l1-decoupled", "dropout", "mine"]
    assert runs["mine"]["setting"] == {"name": "mine", "l1": 0.0, "l2": 0.1, "group_lasso": 0.0, "mode": "decoupled", "group_dim": None, "dropout": 0.0}
    assert runs["none"]["regularized_layers"] == [] and runs["dropout"]["regularized_layers"] == []
    assert runs["l1-decoupled"]["regularized_layers"] == ["fc1.weight", "fc2.weight"]
    for run in runs.values():
        assert [h["epoch"] for h in run["history"]] == [1, 2]
        matrix = run["test"]["confusion_matrix"]
        assert len(matrix) == 10 and sum(map(sum, matrix)) == record["data"]["test"]
        assert 0 <= run["test"]["f1"] <= 1 and 0.5 < run["test"]["roc_auc"] <= 1
    assert runs["none"]["history"][0]["penalty"] is None and runs["l1-decoupled"]["history"][0]["penalty"] > 0

    history = read_csv(out / "history.csv")
    assert len(history) == 4 * 2 and set(history[0]) == set(studies.HISTORY_HEADER)
    metrics = read_csv(out / "metrics.csv")
    assert [row["setting"] for row in metrics] == list(runs)
    assert float(metrics[0]["accuracy"]) == pytest.approx(runs["none"]["test"]["accuracy"])
    sparsity = read_csv(out / "sparsity.csv")
    assert len(sparsity) == 4 * 6
    assert {row["parameter"] for row in sparsity if row["regularized"] == "True"} == {"fc1.weight", "fc2.weight"}
    for name in ("learning_curves.png", "metrics.png", "confusion_matrices.png", "sparsity.png"):
        assert_png(out / name)


def test_sweep_command_writes_its_run_folder_and_reports_the_best(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", *TINY, "--kind", "l1", "--mode", "decoupled", "--strengths", "1e-3,1e-2,1e-1", "--only", "fc1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "<- best" in printed and "best l1 (decoupled) =" in printed and "on fc1.weight" in printed

    record = json.loads((out / "results.json").read_text())
    assert record["schema"] == "fastreg-sweep/1"
    assert record["strengths"] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert record["best_strength"] == record["strengths"][record["best_index"]]
    assert record["baseline"]["regularized_layers"] == []
    for run in record["runs"]:
        assert run["regularized_layers"] == ["fc1.weight"]
    val_losses = [run["history"][-1]["val_loss"] for run in record["runs"]]
    assert record["best_index"] == val_losses.index(min(val_losses))

    rows = read_csv(out / "sweep.csv")
    assert [float(row["strength"]) for row in rows] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert [row["best"] for row in rows].count("True") == 1
    assert len(read_csv(out / "history.csv")) == 4 * 2  # baseline + 3 strengths
    for name in ("sweep.png", "sparsity.png"):
        assert_png(out / name)


def test_commands_reject_bad_options_before_training(tmp_path):
    with pytest.raises(SystemExit, match="--settings: unknown nope"):
        main(["compare", *TINY, "--settings", "none,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="only: pattern 'fc9' matches no parameter; the model has fc1.weight"):
        main(["compare", *TINY, "--only", "fc9", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--strengths must be a comma list of numbers"):
        main(["sweep", *TINY, "--strengths", "1e-3,big", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="epochs must be a positive integer"):
        main(["sweep", "--epochs", "0", "--no-progress", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_missing_optional_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    with pytest.raises(SystemExit, match=r'tqdm, not installed here: pip install "fastreg\[study\]"'):
        main(["compare", "--epochs", "1", "--out", str(tmp_path)])
    with pytest.raises(studies.MissingDependency, match=r'pip install "fastreg\[study\]"'):
        studies.require(plots=False, progress=True)
    studies.require(plots=False, progress=False)


def test_user_model_and_data_entry_points(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_study.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import torch

            def data():
                rng = np.random.default_rng(0)
                X = rng.normal(size=(150, 5))
                return X, np.where(X[:, 0] + X[:, 1] > 0, "yes", "no")

            def model(in_features, n_classes):
                return torch.nn.Sequential(torch.nn.Linear(in_features, 8), torch.nn.ReLU(), torch.nn.Linear(8, n_classes))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["compare", "--data", "my_study:data", "--model", "my_study:model", "--epochs", "2", "--no-progress", "--no-plots"]
    assert main([*argv, "--settings", "none,l2", "--only", "0", "--out", "run"]) == 0
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["data"]["classes"] == ["no", "yes"] and record["data"]["features"] == 5
    assert record["runs"][1]["regularized_layers"] == ["0.weight"]
    assert not list((tmp_path / "run").glob("*.png"))
    with pytest.raises(SystemExit, match="takes no 'dropout' argument"):
        main([*argv, "--settings", "dropout", "--out", "run2"])
    with pytest.raises(SystemExit, match="--hidden sets the built-in MLP's width"):
        main([*argv, "--hidden", "16", "--out", "run3"])


# -- what the studies measure -----------------------------------------------------------------


def test_fixed_seed_gives_identical_results(digits):
    settings = [studies.StudySetting("dropout", dropout=0.3), studies.StudySetting("l1", l1=0.05, mode="decoupled")]
    config = studies.TrainConfig(epochs=2, seed=7)

    def run(config):
        result = studies.compare(settings, digits, config).to_dict()
        for r in result["runs"]:
            r.pop("seconds")
        return result

    first = run(config)
    assert run(config) == first
    other_seed = run(studies.TrainConfig(epochs=2, seed=8))
    assert other_seed["runs"][0]["history"] != first["runs"][0]["history"]


def overfitting_data():
    """A linear problem with few samples and many features: unregularized logistic regression
    separates the training set and grows overconfident, so validation loss is high at both
    ends of the strength grid (overfit, underfit) and lowest in between."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.make_classification(
        n_samples=400, n_features=60, n_informative=5, n_redundant=0, n_clusters_per_class=1, flip_y=0.0, class_sep=1.5, random_state=0
    )
    return studies.split_data(X, y, seed=0, val_fraction=0.4, test_fraction=0.2, max_train=30, name="overfit")


def logistic_regression(in_features, n_classes):
    return nn.Linear(in_features, n_classes)


def test_sweep_on_an_overfitting_setup_picks_an_interior_strength():
    config = studies.TrainConfig(epochs=100, batch_size=30, lr=1e-2, seed=0, no_decay=())
    result = studies.sweep(
        "l2", studies.log_grid(1e-3, 1e2, 6), mode="coupled", data=overfitting_data(), config=config, model_fn=logistic_regression
    )
    val_losses = [run.final.val_loss for run in result.runs]
    assert 0 < result.best_index < len(result.strengths) - 1, val_losses
    assert val_losses[result.best_index] == min(val_losses)
    # An actual under-/over-fitting curve, not noise: both ends are clearly worse.
    assert min(val_losses[0], val_losses[-1]) > 2 * val_losses[result.best_index]
    assert result.baseline.final.val_loss > val_losses[result.best_index]
    train_losses = [run.final.train_loss for run in result.runs]
    assert train_losses == sorted(train_losses)  # stronger decay never fits the training set better


def test_decoupled_l1_zeros_are_counted_by_the_sparsity_report(digits):
    config = studies.TrainConfig(epochs=3)
    decoupled = studies.train(studies.StudySetting("l1-decoupled", l1=0.5, mode="decoupled"), digits, config)
    coupled = studies.train(studies.StudySetting("l1", l1=1e-3), digits, config)
    for run in (decoupled, coupled):
        params = dict(run.model.named_parameters())
        for layer in run.sparsity:
            assert layer.zeros == int((params[layer.name] == 0).sum())
            assert layer.zero_fraction == layer.zeros / params[layer.name].numel()
    report = {layer.name: layer for layer in decoupled.sparsity}
    assert report["fc1.weight"].zeros > 0 and report["fc2.weight"].zeros > 0
    assert report["fc1.weight"].regularized and not report["fc1.bias"].regularized
    assert report["fc1.bias"].zeros == 0 and report["bn1.weight"].zeros == 0
    assert decoupled.zero_fraction > 0.01 and decoupled.regularized_zero_fraction > decoupled.zero_fraction
    # A loss-gradient (coupled) L1 step overshoots zero instead of landing on it.
    assert coupled.zero_fraction == 0


@pytest.mark.parametrize(
    "setting",
    [
        studies.StudySetting("l1", l1=0.1),
        studies.StudySetting("elasticnet-decoupled", l1=1.0, l2=10.0, mode="decoupled"),
        studies.StudySetting("group-lasso", group_lasso=5.0, mode="decoupled", group_dim=0),
    ],
    ids=lambda s: s.name,
)
def test_one_layer_only_leaves_other_layers_updates_identical(digits, setting):
    """One full-batch step from the same weights: with --only fc1, every other parameter gets
    exactly the update it gets without regularization, and fc1.weight does not."""
    config = studies.TrainConfig(epochs=1, batch_size=len(digits.y_train), only=("fc1",))
    plain = studies.train(studies.StudySetting("none"), digits, config).model.state_dict()
    one_layer = studies.train(setting, digits, config)
    assert one_layer.regularized_layers == ["fc1.weight"]
    regularized = one_layer.model.state_dict()
    assert not torch.equal(regularized["fc1.weight"], plain["fc1.weight"])
    others = [name for name in plain if name != "fc1.weight"]
    assert "fc2.weight" in others and "bn1.running_mean" in others
    for name in others:
        assert torch.equal(regularized[name], plain[name]), name


def test_regularization_groups_put_unselected_parameters_in_a_zero_group(digits):
    model = studies.mlp(digits.n_features, digits.n_classes)
    setting = studies.StudySetting("l2", l2=0.1, l1=0.01)
    groups, regularized = studies.regularization_groups(model, setting, only=("fc2",), no_decay=())
    assert [p is model.fc2.weight or p is model.fc2.bias for p in groups[0]["params"]] == [True, True]
    assert (groups[0]["l1"], groups[0]["l2"], groups[0]["group_lasso"]) == (0.01, 0.1, 0.0)
    assert (groups[1]["l1"], groups[1]["l2"], groups[1]["group_lasso"]) == (0.0, 0.0, 0.0)
    assert len(groups[1]["params"]) == 4
    assert [name for name, on in regularized.items() if on] == ["fc2.weight", "fc2.bias"]
    _, default_exclusions = studies.regularization_groups(model, setting)
    assert [name for name, on in default_exclusions.items() if on] == ["fc1.weight", "fc2.weight"]
    _, unregularized = studies.regularization_groups(model, studies.StudySetting("none"))
    assert not any(unregularized.values())


def test_only_patterns():
    model = studies.mlp(64, 10)
    assert studies.select_parameters(model, ["fc1"]) == ["fc1.weight", "fc1.bias"]
    assert studies.select_parameters(model, ["*.weight"]) == ["fc1.weight", "bn1.weight", "fc2.weight"]
    assert studies.select_parameters(model, ["fc2.bias", "bn1"]) == ["bn1.weight", "bn1.bias", "fc2.bias"]
    assert studies.select_parameters(model, ["fc*"]) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert len(studies.select_parameters(model, [])) == 6
    with pytest.raises(ValueError, match="pattern 'fc' matches no parameter"):
        studies.select_parameters(model, ["fc1", "fc"])


def test_setting_parse_and_validation():
    setting = studies.StudySetting.parse("rows:group-lasso=0.5,mode=decoupled,group_dim=0")
    assert setting == studies.StudySetting("rows", group_lasso=0.5, mode="decoupled", group_dim=0)
    assert setting.describe() == "group_lasso=0.5 rows decoupled"
    assert studies.StudySetting("none").describe() == "none" and not studies.StudySetting("none").regularized
    with pytest.raises(ValueError, match="unknown key 'l3'"):
        studies.StudySetting.parse("x:l3=1")
    with pytest.raises(ValueError, match="expected NAME:KEY=VALUE"):
        studies.StudySetting.parse("l1=1e-3")
    with pytest.raises(ValueError, match=r"StudySetting\('x'\).l1 must be finite and non-negative"):
        studies.StudySetting("x", l1=-1.0)
    with pytest.raises(ValueError, match=r"StudySetting\('x'\).mode must be one of coupled, decoupled"):
        studies.StudySetting("x", mode="adamw")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        studies.StudySetting("x", dropout=1.0)
    with pytest.raises(ValueError, match="names must be unique, a repeat"):
        studies.compare([studies.StudySetting("a"), studies.StudySetting("a", l1=1.0)], data=studies.load_data("iris"))


def test_data_and_grid_validation():
    assert studies.log_grid(1e-3, 1e1, 5) == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    with pytest.raises(ValueError, match="0 < low < high"):
        studies.log_grid(0.0, 1.0, 3)
    with pytest.raises(ValueError, match="X must have shape"):
        studies.split_data([1.0, 2.0, 3.0], [0, 1, 0])
    with pytest.raises(ValueError, match="at least two classes"):
        studies.split_data([[1.0]] * 10, [0] * 10)
    with pytest.raises(ValueError, match="data must be one of digits"):
        studies.load_data("mnist")
    with pytest.raises(ValueError, match="max_train must be an integer >= the number of classes"):
        studies.load_data("digits", max_train=5)
    iris = studies.load_data("iris", seed=3)
    assert iris.sizes() == {"train": 90, "val": 30, "test": 30}
    assert torch.allclose(iris.X_train.mean(0), torch.zeros(4), atol=1e-5)
    assert sorted(torch.bincount(iris.y_test).tolist()) == [10, 10, 10]  # stratified


def test_binary_metrics_and_the_callers_random_state_is_kept():
    data = studies.load_data("breast_cancer", max_train=100)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run = studies.train(studies.StudySetting("l2", l2=0.01), data, studies.TrainConfig(epochs=2))
    assert torch.equal(torch.rand(3), expected)
    assert len(run.test.confusion_matrix) == 2 and 0.8 < run.test.roc_auc <= 1 and 0 < run.test.f1 <= 1


@pytest.mark.slow
def test_default_compare_runs_every_setting():
    result = studies.compare()
    assert [run.setting.name for run in result.runs] == [s.name for s in studies.default_settings()]
    by_name = {run.setting.name: run for run in result.runs}
    assert by_name["l1-decoupled"].regularized_zero_fraction > 0.2
    assert by_name["l1"].zero_fraction == 0
    for run in result.runs:
        assert len(run.history) == 30 and run.test.accuracy > 0.9
