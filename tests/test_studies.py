"""Regularization studies through the Python API (fastreg.studies) on tiny settings; the
commands are in test_studies_cli.py, the figures in test_study_plots.py."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics
from torch import nn

from fastreg import studies

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def digits():
    return studies.load_data("digits", seed=0, max_train=120)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- what the studies measure -----------------------------------------------------------------


def test_fixed_seed_gives_identical_results(digits):
    settings = [studies.StudySetting("dropout", dropout=0.3), studies.StudySetting("l1", l1=0.05, mode="decoupled")]
    config = studies.TrainConfig(epochs=2, seed=7)

    def run(config):
        result = studies.compare(settings, digits, config).to_dict()
        # What differs between two identical runs: how long each took and when it ran.
        for r in result["runs"]:
            r.pop("seconds")
        result["environment"].pop("created")
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
    assert studies.log_grid(1e-3, 1e1, 5) == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0], rel=8 * EPS64)
    with pytest.raises(ValueError, match="0 < low < high"):
        studies.log_grid(0.0, 1.0, 3)
    with pytest.raises(ValueError, match="X must have shape"):
        studies.split_data([1.0, 2.0, 3.0], [0, 1, 0])
    with pytest.raises(ValueError, match="at least two classes"):
        studies.split_data([[1.0]] * 10, [0] * 10)
    with pytest.raises(ValueError, match="X has NaN or infinite values"):
        studies.split_data([[1.0], [float("nan")]] * 10, [0, 1] * 10)
    with pytest.raises(ValueError, match="data must be one of digits"):
        studies.load_data("mnist")
    with pytest.raises(ValueError, match="max_train must be an integer >= the number of classes"):
        studies.load_data("digits", max_train=5)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        studies.load_data("iris", val_fraction=0.5, test_fraction=0.5)


def test_split_is_stratified_disjoint_and_standardized_with_the_training_statistics():
    n = 150
    ids = np.arange(n, dtype=np.float64)
    X = np.stack([ids, np.sin(ids)], axis=1)  # column 0 tells each sample apart
    y = np.array(["a", "b", "c"])[np.arange(n) % 3]
    data = studies.split_data(X, y, seed=3)
    assert data.sizes() == {"train": 90, "val": 30, "test": 30} and data.classes == ["a", "b", "c"]
    train = data.X_train.double()
    assert torch.allclose(train.mean(0), torch.zeros(2, dtype=torch.float64), atol=8 * EPS32)
    assert torch.allclose(train.std(0, unbiased=False), torch.ones(2, dtype=torch.float64), atol=8 * EPS32)
    # Every part standardized with the same (training) mean and deviation: together, column 0
    # of the three parts is an evenly spaced image of 0..n-1, each sample exactly once.
    parts = (data.X_train, data.X_val, data.X_test)
    standardized = torch.cat([part[:, 0].double() for part in parts])
    step = (standardized.max() - standardized.min()) / (n - 1)
    recovered = (standardized - standardized.min()) / step
    assert torch.allclose(recovered, recovered.round(), atol=8 * EPS32 * n)
    assert sorted(recovered.round().long().tolist()) == list(range(n))
    # Labels stay with their samples, and each class is a third of every part.
    for part, labels in zip(parts, (data.y_train, data.y_val, data.y_test)):
        sample = ((part[:, 0].double() - standardized.min()) / step).round().long()
        assert torch.equal(labels, sample % 3)
        assert torch.bincount(labels).tolist() == [len(labels) // 3] * 3


def test_max_train_keeps_a_stratified_subset_of_the_training_set():
    full = studies.load_data("digits", seed=1)
    small = studies.load_data("digits", seed=1, max_train=100)
    assert small.sizes() == {**full.sizes(), "train": 100}
    # The same held-out samples: only the training set shrinks.
    assert torch.equal(small.y_val, full.y_val) and torch.equal(small.y_test, full.y_test)
    counts = torch.bincount(small.y_train, minlength=10)
    assert int(counts.max() - counts.min()) <= 1


def test_the_callers_random_state_is_kept(digits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    studies.train(studies.StudySetting("dropout", dropout=0.5), digits, studies.TrainConfig(epochs=1))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_test_metrics_are_sklearns_on_the_models_own_predictions(name):
    """Loss, accuracy, precision, recall, F1 (macro; of the positive class for two classes),
    one-vs-rest ROC-AUC and the confusion matrix, recomputed from the trained model's
    predictions on the test set."""
    data = studies.load_data(name, max_train=100)
    run = studies.train(studies.StudySetting("l2", l2=0.01), data, studies.TrainConfig(epochs=2, threads=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the run's thread count: the logits are bit for bit the run's own
    try:
        with torch.no_grad():
            logits = run.model.eval()(data.X_test)
    finally:
        torch.set_num_threads(threads)
    truth, predicted = data.y_test.numpy(), logits.argmax(1).numpy()
    proba = torch.softmax(logits.double(), dim=1).numpy()
    if data.n_classes == 2:
        average, roc_auc = "binary", metrics.roc_auc_score(truth, proba[:, 1])
    else:
        average, roc_auc = "macro", metrics.roc_auc_score(truth, proba, multi_class="ovr", average="macro")
    expected = {
        "loss": F.cross_entropy(logits, data.y_test).item(),
        "accuracy": metrics.accuracy_score(truth, predicted),
        "precision": metrics.precision_score(truth, predicted, average=average, zero_division=0),
        "recall": metrics.recall_score(truth, predicted, average=average, zero_division=0),
        "f1": metrics.f1_score(truth, predicted, average=average, zero_division=0),
        "roc_auc": roc_auc,
    }
    for key, value in expected.items():
        assert getattr(run.test, key) == pytest.approx(value, rel=4 * EPS64, abs=0), key
    assert run.test.confusion_matrix == metrics.confusion_matrix(truth, predicted).tolist()
    # Predictions of every class, with errors that set precision, recall and F1 apart: one
    # reported in place of another could not pass.
    assert len(set(predicted.tolist())) == data.n_classes
    assert len({run.test.precision, run.test.recall, run.test.f1}) == 3


def expected_csv(rows):
    """Rows as csv.DictReader reads them back: every value as Python's str() writes it."""
    return [{key: "" if value is None else str(value) for key, value in row.items()} for row in rows]


def history_rows(labelled):
    return [
        {"setting": label, **{key: getattr(r, key) for key in studies.HISTORY_HEADER[1:]}} for label, run in labelled for r in run.history
    ]


def sparsity_rows(labelled):
    return [
        {"setting": label, "parameter": layer.name, "regularized": layer.regularized, "numel": layer.numel, "zeros": layer.zeros, "zero_fraction": layer.zero_fraction}
        for label, run in labelled
        for layer in run.sparsity
    ]


def metric_values(run):
    t = run.test
    values = [t.accuracy, t.precision, t.recall, t.f1, t.roc_auc, t.loss, run.zero_fraction]
    return dict(zip(studies.METRIC_HEADER, values))


def test_compare_run_folder_holds_the_results(tmp_path, digits):
    settings = [studies.StudySetting("none"), studies.StudySetting("l1-decoupled", l1=0.5, mode="decoupled")]
    result = studies.compare(settings, digits, studies.TrainConfig(epochs=2, only=("fc1",)))
    written = studies.write_run(result, tmp_path / "run", plots=False)
    assert [p.name for p in written] == ["results.json", "metrics.csv", "history.csv", "sparsity.csv"]
    assert json.loads(written[0].read_text()) == json.loads(json.dumps(result.to_dict()))
    labelled = [(run.setting.name, run) for run in result.runs]
    assert read_csv(written[1]) == expected_csv(
        {"setting": run.setting.name, "regularization": run.setting.describe(), "regularized_layers": "fc1.weight" if run.setting.regularized else "", **metric_values(run)}
        for run in result.runs
    )
    assert read_csv(written[2]) == expected_csv(history_rows(labelled))
    assert read_csv(written[3]) == expected_csv(sparsity_rows(labelled))
    assert result.run("l1-decoupled").sparsity[0].zeros > 0 and result.run("none").history[0].penalty is None


def test_sweep_run_folder_holds_the_results(tmp_path, digits):
    result = studies.sweep("l2", [1e-2, 1.0], data=digits, config=studies.TrainConfig(epochs=2))
    written = studies.write_run(result, tmp_path / "run", plots=False)
    assert [p.name for p in written] == ["results.json", "sweep.csv", "history.csv", "sparsity.csv"]
    record = json.loads(written[0].read_text())
    assert record == json.loads(json.dumps(result.to_dict()))
    assert record["baseline"]["setting"]["name"] == "none" and record["best_strength"] == result.strengths[result.best_index]
    finals = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    assert read_csv(written[1]) == expected_csv(
        {"strength": s, **{key: getattr(run.final, key) for key in finals}, **metric_values(run), "best": i == result.best_index}
        for i, (s, run) in enumerate(zip(result.strengths, result.runs))
    )
    labelled = [("none", result.baseline), ("l2=0.01", result.runs[0]), ("l2=1", result.runs[1])]
    assert read_csv(written[2]) == expected_csv(history_rows(labelled))
    assert read_csv(written[3]) == expected_csv(sparsity_rows(labelled))


def test_results_json_writes_a_diverged_runs_nan_as_null(tmp_path, digits):
    result = studies.compare([studies.StudySetting("none")], digits, studies.TrainConfig(epochs=1))
    result.runs[0].history[0].val_loss = float("nan")
    result.runs[0].test.loss = float("inf")
    (path, *_) = studies.write_run(result, tmp_path, plots=False)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)
    assert record["runs"][0]["history"][0]["val_loss"] is None and record["runs"][0]["test"]["loss"] is None


@pytest.mark.slow
def test_default_compare_runs_every_setting():
    result = studies.compare()
    assert [run.setting.name for run in result.runs] == [s.name for s in studies.default_settings()]
    by_name = {run.setting.name: run for run in result.runs}
    assert by_name["l1-decoupled"].regularized_zero_fraction > 0.2
    assert by_name["l1"].zero_fraction == 0
    for run in result.runs:
        assert len(run.history) == 30 and run.test.accuracy > 0.9
