"""python -m fastreg compare / sweep, end to end on tiny settings: the commands are a thin
layer over fastreg.studies, so each run folder must be the one the Python API writes."""
from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest
import torch

import fastreg
from fastreg import studies
from fastreg.__main__ import main

TINY = ["--epochs", "2", "--max-train", "80", "--no-progress"]
TINY_CONFIG = dict(epochs=2)


@pytest.fixture(scope="module")
def tiny_digits():
    return studies.load_data("digits", seed=0, max_train=80)


def comparable(record):
    """A results.json without what differs between two identical runs: time and when/where."""
    record = json.loads(json.dumps(record))
    record.pop("environment")
    for run in record["runs"] + ([record["baseline"]] if record.get("baseline") else []):
        run.pop("seconds")
    return record


def assert_same_run_folder(folder, expected_result, tmp_path):
    """``folder`` holds exactly what ``write_run(expected_result)`` writes: the same JSON but
    for timings and environment, byte-identical CSV files and figures."""
    reference = tmp_path / "reference"
    written = studies.write_run(expected_result, reference)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in written)
    record = json.loads((folder / "results.json").read_text())
    assert comparable(record) == comparable(json.loads((reference / "results.json").read_text()))
    environment = record["environment"]
    assert (environment["fastreg"], environment["torch"], environment["device_type"]) == (fastreg.__version__, torch.__version__, "cpu")
    for path in written:
        if path.suffix in (".csv", ".png"):
            assert (folder / path.name).read_bytes() == path.read_bytes(), path.name
    return record


def without_time_column(table):
    """The compare table's lines, each cut before its last column (seconds differ run to run)."""
    return [re.split(r"\s{2,}", line.rstrip())[:-1] for line in table.splitlines()]


def test_compare_command_is_the_python_api(tmp_path, capsys, tiny_digits):
    out = tmp_path / "compare"
    argv = ["compare", *TINY, "--settings", "none,l1-decoupled,dropout", "--setting", "mine:l2=0.1,mode=decoupled", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()

    defaults = {s.name: s for s in studies.default_settings()}
    settings = [defaults["none"], defaults["l1-decoupled"], defaults["dropout"], studies.StudySetting("mine", l2=0.1, mode="decoupled")]
    expected = studies.compare(settings, tiny_digits, studies.TrainConfig(**TINY_CONFIG))
    table = studies.summary_table(expected)
    assert without_time_column("\n".join(printed[:-1])) == without_time_column(table)
    assert printed[-1] == f"wrote {out}: results.json, metrics.csv, history.csv, sparsity.csv, learning_curves.png, metrics.png, confusion_matrices.png, sparsity.png"

    record = assert_same_run_folder(out, expected, tmp_path)
    assert record["config"]["epochs"] == 2 and record["data"]["train"] == 80
    runs = {run["setting"]["name"]: run for run in record["runs"]}
    assert list(runs) == ["none", "l1-decoupled", "dropout", "mine"]
    assert runs["mine"]["setting"] == {"name": "mine", "l1": 0.0, "l2": 0.1, "group_lasso": 0.0, "mode": "decoupled", "group_dim": None, "dropout": 0.0}
    assert runs["none"]["regularized_layers"] == [] and runs["dropout"]["regularized_layers"] == []
    assert runs["l1-decoupled"]["regularized_layers"] == ["fc1.weight", "fc2.weight"]
    assert runs["none"]["history"][0]["penalty"] is None and runs["l1-decoupled"]["history"][0]["penalty"] > 0


def test_sweep_command_is_the_python_api(tmp_path, capsys, tiny_digits):
    out = tmp_path / "sweep"
    argv = ["sweep", *TINY, "--kind", "l1", "--mode", "decoupled", "--strengths", "1e-3,1e-2,1e-1", "--only", "fc1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    config = studies.TrainConfig(**TINY_CONFIG, only=("fc1",))
    expected = studies.sweep("l1", [1e-3, 1e-2, 1e-1], mode="decoupled", data=tiny_digits, config=config)
    files = "results.json, sweep.csv, history.csv, sparsity.csv, sweep.png, sparsity.png"
    assert printed == f"{studies.summary_table(expected)}\n{studies.best_summary(expected)}\nwrote {out}: {files}\n"

    record = assert_same_run_folder(out, expected, tmp_path)
    assert record["strengths"] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert record["best_strength"] == record["strengths"][record["best_index"]]
    assert record["baseline"]["regularized_layers"] == []
    assert [run["regularized_layers"] for run in record["runs"]] == [["fc1.weight"]] * 3
    val_losses = [run["history"][-1]["val_loss"] for run in record["runs"]]
    assert record["best_index"] == val_losses.index(min(val_losses))


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
    assert not any(tmp_path.iterdir())


def test_user_model_and_data_entry_points(tmp_path, monkeypatch):
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
    assert record["model"] == str(studies.load_entry_point("my_study:model")(5, 2))
    assert record["runs"][1]["regularized_layers"] == ["0.weight"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["history.csv", "metrics.csv", "results.json", "sparsity.csv"]
    with pytest.raises(SystemExit, match="takes no 'dropout' argument"):
        main([*argv, "--settings", "dropout", "--out", "run2"])
    with pytest.raises(SystemExit, match="--hidden sets the built-in MLP's width"):
        main([*argv, "--hidden", "16", "--out", "run3"])
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run3").exists()
