"""What a study measures: per-epoch records, test metrics and sparsity of each run, and
the results of the two studies (plain data, written out by :mod:`.files`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from .settings import StudySetting, TrainConfig


@dataclass
class EpochRecord:
    """Losses and accuracies measured after an epoch, in eval mode (so dropout is off and
    batch norm uses its running statistics); ``penalty`` is the mean over the epoch's steps
    of ``Regularized.last_penalty``, ``None`` when nothing is regularized."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    penalty: Optional[float]


@dataclass
class TestMetrics:
    """On the held-out test set. Precision, recall and F1 are macro averages over the
    classes (of the positive class for two classes); ROC-AUC is one-vs-rest macro, ``None``
    when a class is missing from the test set."""

    loss: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: Optional[float]
    confusion_matrix: List[List[int]]


@dataclass
class LayerSparsity:
    name: str
    numel: int
    zeros: int
    zero_fraction: float
    regularized: bool


def _zero_fraction(layers: Sequence[LayerSparsity]) -> float:
    total = sum(layer.numel for layer in layers)
    return sum(layer.zeros for layer in layers) / total if total else 0.0


@dataclass
class RunResult:
    setting: StudySetting
    history: List[EpochRecord]
    test: TestMetrics
    sparsity: List[LayerSparsity]
    seconds: float
    model: Optional[nn.Module] = field(default=None, repr=False, compare=False)
    """The trained model (not saved by :func:`~fastreg.studies.write_run`)."""

    @property
    def final(self) -> EpochRecord:
        return self.history[-1]

    @property
    def regularized_layers(self) -> List[str]:
        return [layer.name for layer in self.sparsity if layer.regularized]

    @property
    def layers_label(self) -> str:
        """Which parameters the run regularized, short enough for a table or a plot title."""
        layers = self.regularized_layers
        if not layers:
            return "-"
        if len(layers) == len(self.sparsity):
            return "all"
        return ", ".join(layers)

    @property
    def zero_fraction(self) -> float:
        """Exactly-zero weights among all parameters."""
        return _zero_fraction(self.sparsity)

    @property
    def regularized_zero_fraction(self) -> float:
        """Exactly-zero weights among the regularized parameters (0 when there are none)."""
        return _zero_fraction([layer for layer in self.sparsity if layer.regularized])

    def to_dict(self) -> Dict[str, Any]:
        return {
            "setting": dataclasses.asdict(self.setting),
            "description": self.setting.describe(),
            "regularized_layers": self.regularized_layers,
            "history": [dataclasses.asdict(r) for r in self.history],
            "test": dataclasses.asdict(self.test),
            "sparsity": [dataclasses.asdict(s) for s in self.sparsity],
            "zero_fraction": self.zero_fraction,
            "regularized_zero_fraction": self.regularized_zero_fraction,
            "seconds": self.seconds,
        }


@dataclass
class CompareResult:
    runs: List[RunResult]
    config: TrainConfig
    data: Dict[str, Any]
    model: str
    environment: Dict[str, Any]

    def run(self, name: str) -> RunResult:
        for run in self.runs:
            if run.setting.name == name:
                return run
        raise KeyError(f"no setting named {name!r}; the study ran {', '.join(r.setting.name for r in self.runs)}")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": "fastreg-compare/1",
            "config": dataclasses.asdict(self.config),
            "data": self.data,
            "model": self.model,
            "environment": self.environment,
            "runs": [run.to_dict() for run in self.runs],
        }


@dataclass
class SweepResult:
    kind: str
    mode: str
    select: str
    strengths: List[float]
    runs: List[RunResult]
    best_index: int
    baseline: Optional[RunResult]
    config: TrainConfig
    data: Dict[str, Any]
    model: str
    environment: Dict[str, Any]

    @property
    def best_strength(self) -> float:
        return self.strengths[self.best_index]

    @property
    def best(self) -> RunResult:
        return self.runs[self.best_index]

    @property
    def trained(self) -> List[RunResult]:
        """Every run the sweep trained: the unregularized baseline (if any), then the candidates."""
        return ([self.baseline] if self.baseline is not None else []) + self.runs

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": "fastreg-sweep/1",
            "kind": self.kind,
            "mode": self.mode,
            "select": self.select,
            "strengths": self.strengths,
            "best_index": self.best_index,
            "best_strength": self.best_strength,
            "config": dataclasses.asdict(self.config),
            "data": self.data,
            "model": self.model,
            "environment": self.environment,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "runs": [run.to_dict() for run in self.runs],
        }

