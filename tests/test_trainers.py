"""Regularized inside the training loops of Lightning and Hugging Face ``transformers``.

Both libraries are optional (``pip install -e ".[trainers]"``); each test skips when its
library is not importable. Each trains the same small regression twice in the same loop:
with Regularized(SGD, mode="decoupled"), and with that step written in plain torch (SGD's
``weight_decay``, then the L1 soft threshold), and checks that both end at the same weights,
with exact zeros.
"""
from __future__ import annotations

import pytest
import torch

import fastreg

STRENGTHS = dict(l1=0.05, l2=0.01)


def regression_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :2] @ torch.tensor([[1.5], [-2.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def make_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


LR = 0.1
STEPS = 15 * 64 // 16  # epochs * batches per epoch, in both trainers


class TorchOnly(torch.optim.SGD):
    """Regularized(SGD, mode="decoupled") in plain torch: the decoupled decay ``w *= 1 - lr*l2``
    before a plain SGD step is SGD's own ``weight_decay``; the L1 prox follows the step."""

    def __init__(self, params):
        super().__init__(params, lr=LR, weight_decay=STRENGTHS["l2"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            threshold = group["lr"] * STRENGTHS["l1"]
            for p in group["params"]:
                if p.grad is not None:
                    p.copy_(p.sign() * (p.abs() - threshold).clamp(min=0))
        return loss


def make_optimizer(model, with_fastreg):
    if not with_fastreg:
        return TorchOnly(model.parameters())
    return fastreg.Regularized(torch.optim.SGD(model.parameters(), lr=LR), **STRENGTHS, mode="decoupled")


def assert_regularized(torch_only, regularized, optimizer):
    # Each step may round the decay, the update and the threshold differently from torch's ops
    # (an ulp or so), and later steps carry that along; leaving out the l2 term moves weights
    # by about 1e-2 here, the l1 term by about 0.2.
    tol = STEPS * 10 * torch.finfo(torch.float32).eps
    for want, got in zip(torch_only.parameters(), regularized.parameters()):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert any((p == 0).any() for p in regularized.parameters()), "decoupled L1 leaves exact zeros"
    assert optimizer.last_penalty is not None


def lightning_fit(with_fastreg, tmp_path):
    lightning = pytest.importorskip("lightning", reason="Lightning is not installed (pip install -e '.[trainers]')")
    x, y = regression_data()

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, _):
            inputs, targets = batch
            return torch.nn.functional.mse_loss(self.net(inputs), targets)

        def configure_optimizers(self):
            self.chosen = make_optimizer(self, with_fastreg)
            scheduler = torch.optim.lr_scheduler.StepLR(self.chosen, step_size=20, gamma=0.5)
            return {"optimizer": self.chosen, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    module = Module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = lightning.Trainer(
        max_epochs=15, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert trainer.optimizers[0] is module.chosen
    assert module.chosen.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3), "the scheduler drove the lr"
    return module.net, module.chosen


def test_lightning_trainer(tmp_path):
    torch_only, _ = lightning_fit(False, tmp_path / "torch_only")
    regularized, optimizer = lightning_fit(True, tmp_path / "regularized")
    assert_regularized(torch_only, regularized, optimizer)


def hf_train(with_fastreg, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[trainers]')")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install -e '.[trainers]')")
    x, y = regression_data()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def forward(self, inputs, labels=None):
            out = self.net(inputs)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"inputs": x[i], "labels": y[i]}

    model = Model()
    optimizer = make_optimizer(model, with_fastreg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.01 * step))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=15, per_device_train_batch_size=16, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(optimizer, scheduler))
    trainer.train()
    assert optimizer.param_groups[0]["lr"] < 0.1, "the scheduler drove the lr"
    return model.net, optimizer


def test_hugging_face_trainer(tmp_path):
    torch_only, _ = hf_train(False, tmp_path / "torch_only")
    regularized, optimizer = hf_train(True, tmp_path / "regularized")
    assert_regularized(torch_only, regularized, optimizer)
