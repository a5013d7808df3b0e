"""fastreg.param_groups: timm / Hugging Face style no-decay exclusion."""
from __future__ import annotations

import pytest
import torch

import fastreg


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(4)        # GPT-2 naming: "norm" is only in the class name
        self.attn = torch.nn.Linear(4, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.embed = torch.nn.Embedding(10, 4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.ones(4))  # 1-D, not a bias, not a norm


def names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_default_excludes_biases_and_norm_layers_by_name_or_class():
    model = Block()
    decay, keep = fastreg.param_groups(model, l2=0.1)
    assert names(model, decay) == ["attn.weight", "embed.weight", "scale"]
    assert names(model, keep) == ["attn.bias", "bn.bias", "bn.weight", "ln_1.bias", "ln_1.weight"]
    assert decay["l2"] == 0.1 and "l1" not in decay and decay["weight_decay"] == 0.0
    assert keep["l1"] == keep["l2"] == keep["group_lasso"] == 0.0 and keep["weight_decay"] == 0.0


def test_exclude_1d_is_timms_rule():
    model = Block()
    decay, keep = fastreg.param_groups(model, l1=1e-5, exclude_1d=True)
    assert names(model, decay) == ["attn.weight", "embed.weight"]
    assert "scale" in names(model, keep)


def test_custom_patterns_and_empty_groups_left_out():
    model = torch.nn.Linear(3, 2)
    groups = fastreg.param_groups(model, l2=0.1, no_decay=())
    assert len(groups) == 1 and len(groups[0]["params"]) == 2
    groups = fastreg.param_groups(model, l2=0.1, no_decay="WEIGHT")  # case-insensitive, one string allowed
    assert [len(g["params"]) for g in groups] == [1, 1]
    assert groups[1]["params"][0] is model.weight


def test_frozen_parameters_are_left_out():
    model = Block()
    all_params = [p for g in fastreg.param_groups(model) for p in g["params"]]
    assert all(p.requires_grad for p in all_params)
    assert len(all_params) == sum(p.requires_grad for p in model.parameters())


def test_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastreg.param_groups([torch.zeros(2)])
    with pytest.raises(ValueError, match="l2 must be non-negative"):
        fastreg.param_groups(torch.nn.Linear(2, 2), l2=-0.1)
