"""The training loop of a study: one model, one setting, deterministic, then evaluated."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import Regularized
from .._optional import optional_import
from .data import Dataset
from .model import ModelFn, build_model, mlp, regularization_groups
from .results import EpochRecord, LayerSparsity, RunResult, TestMetrics
from .settings import StudySetting, TrainConfig


@contextlib.contextmanager
def _reproducible(device: torch.device, threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count, and the global RNG (dropout draws from
    it) seeded inside a fork, so that a study leaves the caller's random state as it was."""
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    enabled = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous_threads)
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _batches(order: Tensor, batch_size: int) -> List[Tensor]:
    starts = list(range(0, len(order), batch_size))
    # BatchNorm cannot train on a single sample: fold a last batch of one into the one before.
    if len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()
    ends = starts[1:] + [len(order)]
    return [order[s:e] for s, e in zip(starts, ends)]


@torch.no_grad()
def _logits(model: nn.Module, X: Tensor, chunk: int = 8192) -> Tensor:
    model.eval()
    return torch.cat([model(X[i : i + chunk]) for i in range(0, len(X), chunk)])


def _loss_accuracy(logits: Tensor, y: Tensor) -> Tuple[float, float]:
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


def _test_metrics(logits: Tensor, y: Tensor, n_classes: int) -> TestMetrics:
    metrics = optional_import("sklearn.metrics", "test metrics")
    loss, accuracy = _loss_accuracy(logits, y)
    proba = torch.softmax(logits.double(), dim=1).cpu().numpy()
    truth = y.cpu().numpy()
    predicted = proba.argmax(1)
    labels = list(range(n_classes))
    binary = n_classes == 2
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        truth, predicted, labels=None if binary else labels, average="binary" if binary else "macro", zero_division=0
    )
    try:
        if binary:
            roc_auc = float(metrics.roc_auc_score(truth, proba[:, 1]))
        else:
            roc_auc = float(metrics.roc_auc_score(truth, proba, multi_class="ovr", average="macro", labels=labels))
    except ValueError:  # a class absent from the test set has no ROC curve
        roc_auc = None
    return TestMetrics(
        loss=loss,
        accuracy=accuracy,
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        roc_auc=roc_auc,
        confusion_matrix=metrics.confusion_matrix(truth, predicted, labels=labels).tolist(),
    )


def sparsity(model: nn.Module, regularized: Dict[str, bool]) -> List[LayerSparsity]:
    """Exactly-zero entries of every parameter (what decoupled L1 / group lasso leave)."""
    layers = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            zeros = int((p == 0).sum().item())
            layers.append(LayerSparsity(name, p.numel(), zeros, zeros / p.numel() if p.numel() else 0.0, regularized.get(name, False)))
    return layers


def progress_bar(iterable: Iterable, enabled: bool, **options):
    if not enabled:
        return iterable
    tqdm = optional_import("tqdm", "progress bars").tqdm
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **options)


def train(
    setting: StudySetting,
    data: Dataset,
    config: TrainConfig = TrainConfig(),
    model_fn: Optional[ModelFn] = None,
    *,
    progress: bool = False,
) -> RunResult:
    """Train one model under ``setting`` and evaluate it.

    ``model_fn(in_features, n_classes, **options)`` returns a ``torch.nn.Module`` mapping a
    float batch ``(N, in_features)`` to logits ``(N, n_classes)``; ``options`` is
    ``dropout=p`` for a setting with dropout, and empty otherwise (the default is :func:`mlp`).
    The model is built right after ``torch.manual_seed(config.seed)``, so every setting of a
    study starts from the same weights, and batches come in the same order (a generator
    seeded with ``config.seed``); with the same seed, data and machine, the result is the same.
    """
    model_fn = model_fn or mlp
    device = torch.device(config.device)
    started = time.perf_counter()
    with _reproducible(device, config.threads):
        torch.manual_seed(config.seed)
        model = build_model(model_fn, data, setting).to(device)
        groups, regularized = regularization_groups(model, setting, config.only, config.no_decay)
        if config.optimizer == "adam":
            inner: torch.optim.Optimizer = torch.optim.Adam(groups, lr=config.lr)
        else:
            inner = torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
        optimizer = Regularized(inner, mode=setting.mode, group_dim=setting.group_dim, backend=config.backend)
        data = data.to(device)
        order_generator = torch.Generator().manual_seed(config.seed)
        history = []
        epochs = progress_bar(range(1, config.epochs + 1), progress, desc=setting.name, unit="epoch", leave=False)
        for epoch in epochs:
            model.train()
            penalty_sum: Optional[Tensor] = None
            batches = _batches(torch.randperm(len(data.y_train), generator=order_generator).to(device), config.batch_size)
            for batch in batches:
                optimizer.zero_grad()
                F.cross_entropy(model(data.X_train[batch]), data.y_train[batch]).backward()
                optimizer.step()
                if optimizer.last_penalty is not None:
                    # Summed as tensors: one host sync per epoch, not one per step.
                    value = optimizer.last_penalty.detach()
                    penalty_sum = value if penalty_sum is None else penalty_sum + value
            train_loss, train_accuracy = _loss_accuracy(_logits(model, data.X_train), data.y_train)
            val_loss, val_accuracy = _loss_accuracy(_logits(model, data.X_val), data.y_val)
            mean_penalty = None if penalty_sum is None else penalty_sum.item() / len(batches)
            history.append(EpochRecord(epoch, train_loss, train_accuracy, val_loss, val_accuracy, mean_penalty))
            if progress:
                epochs.set_postfix(val_loss=f"{val_loss:.3f}", val_acc=f"{val_accuracy:.3f}")
        test = _test_metrics(_logits(model, data.X_test), data.y_test, data.n_classes)
        layers = sparsity(model, regularized)
    return RunResult(setting, history, test, layers, time.perf_counter() - started, model)

