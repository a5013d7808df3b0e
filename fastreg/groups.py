"""``param_groups``: split a model's parameters into a regularized and a no-decay group."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from . import _dispatch


def _owner_class_names(model: torch.nn.Module) -> Dict[str, str]:
    return {
        f"{module_name}.{param_name}" if module_name else param_name: type(module).__name__
        for module_name, module in model.named_modules()
        for param_name, _ in module.named_parameters(recurse=False)
    }


def param_groups(
    model: torch.nn.Module,
    l1: Optional[float] = None,
    l2: Optional[float] = None,
    group_lasso: Optional[float] = None,
    *,
    no_decay: Sequence[str] = ("bias", "norm"),
    exclude_1d: bool = False,
) -> List[Dict[str, Any]]:
    """Param groups for an optimizer, timm/Hugging Face style: ``[regularized, no_decay]``.

    A trainable parameter goes to the no-decay group when any pattern of ``no_decay``
    occurs (case-insensitively) in its qualified name or in the class name of the module
    that owns it, so ``"norm"`` catches the weights of ``LayerNorm``, ``BatchNorm2d`` or
    ``RMSNorm`` whatever they are called; ``exclude_1d=True`` also excludes every
    parameter with at most one dimension (timm's rule). The regularized group gets the
    strengths given here (``None`` leaves the key out, so ``Regularized``'s default
    applies); the no-decay group gets all strengths 0. Both groups set
    ``weight_decay=0``: fastreg applies the decay, the inner optimizer must not add its own.
    Empty groups are left out; frozen parameters (``requires_grad=False``) too.

        groups = fastreg.param_groups(model, l2=0.1)
        opt = fastreg.Regularized(torch.optim.AdamW(groups, lr=3e-4), mode="decoupled")
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    patterns = [p.lower() for p in no_decay]
    owners = _owner_class_names(model)
    strengths = {}
    for key, value in (("l1", l1), ("l2", l2), ("group_lasso", group_lasso)):
        if value is not None:
            strengths[key] = _dispatch.check_coefficient(key, value)
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        haystacks = (name.lower(), owners.get(name, "").lower())
        excluded = any(p in h for p in patterns for h in haystacks) or (exclude_1d and param.dim() <= 1)
        (keep if excluded else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": 0.0, **strengths})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0, "l1": 0.0, "l2": 0.0, "group_lasso": 0.0})
    return groups
