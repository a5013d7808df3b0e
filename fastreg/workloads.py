"""Built-in parameter lists to benchmark on (no download): shapes of well-known models."""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

Shape = Tuple[int, ...]


def gpt2_small_shapes(size: float = 1.0) -> List[Shape]:
    """The 148 parameter shapes of GPT-2 small (124.4M parameters, tied LM head).

    ``size`` in (0, 1] shrinks every dimension by ``sqrt(size)``, keeping the 148 tensors
    and their proportions, so the total is about ``size * 124.4M``.
    """
    if not 0 < size <= 1:
        raise ValueError(f"size must be in (0, 1], got {size}")
    scale = math.sqrt(size)

    def dim(n: int) -> int:
        return max(1, round(n * scale))

    d, vocab, context, layers = dim(768), dim(50257), dim(1024), 12
    shapes: List[Shape] = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [
            (d,), (d,),                  # ln_1 weight, bias
            (d, 3 * d), (3 * d,),        # attn.c_attn (Conv1D: in x out)
            (d, d), (d,),                # attn.c_proj
            (d,), (d,),                  # ln_2
            (d, 4 * d), (4 * d,),        # mlp.c_fc
            (4 * d, d), (d,),            # mlp.c_proj
        ]
    shapes += [(d,), (d,)]               # ln_f
    return shapes


def make_params(shapes: List[Shape], dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> List[torch.Tensor]:
    """Leaf tensors of ``shapes`` with ``requires_grad`` and a random ``.grad`` each.

    Values are N(0, 0.02) with about 1% exact zeros, like trained weights after some L1
    (exact zeros exercise ``sign(0) = 0``).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        w = torch.randn(shape, generator=generator) * 0.02
        w[torch.rand(shape, generator=generator) < 0.01] = 0.0
        p = w.to(device=device, dtype=dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params
