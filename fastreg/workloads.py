"""Built-in workloads to benchmark on (no download): parameter lists shaped like real models.

Every builder takes ``size`` (a scale factor, 1 = the real model), ``dtype``, ``device``
and ``seed``, and returns a :class:`Workload` whose parameters are leaf tensors with
``requires_grad`` and a random ``.grad``, as after a backward pass.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

Shape = Tuple[int, ...]


@dataclasses.dataclass
class Workload:
    name: str
    params: List[torch.Tensor]
    model: Optional[torch.nn.Module] = None
    inputs: Optional[torch.Tensor] = None  # a batch for the model, when there is one
    # Tensors so small that the kernels cost nothing: what a call costs is its host work,
    # measured against ``torch._foreach_add_`` on the same list.
    host: bool = False

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


def _scaled(size: float) -> Callable[[int], int]:
    if not size > 0:
        raise ValueError(f"size must be positive, got {size}")
    scale = math.sqrt(size)
    return lambda n: max(1, round(n * scale))


def gpt2_small_shapes(size: float = 1.0) -> List[Shape]:
    """The 148 parameter shapes of GPT-2 small (124.4M parameters, tied LM head).

    ``size`` scales every dimension by ``sqrt(size)``, keeping the 148 tensors and their
    proportions, so the total is about ``size * 124.4M``.
    """
    dim = _scaled(size)
    d, vocab, context = dim(768), dim(50257), dim(1024)
    shapes: List[Shape] = [(vocab, d), (context, d)]
    for _ in range(12):
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


def llama_1b_shapes(size: float = 1.0) -> List[Shape]:
    """The 146 parameter shapes of a Llama-3.2-1B-style model (1.24B parameters, tied
    embedding, grouped-query attention with 8 of 32 heads for keys and values)."""
    dim = _scaled(size)
    d, vocab, hidden, kv = dim(2048), dim(128256), dim(8192), dim(512)
    shapes: List[Shape] = [(vocab, d)]
    for _ in range(16):
        shapes += [
            (d,),                                  # input_layernorm (RMSNorm)
            (d, d), (kv, d), (kv, d), (d, d),      # q, k, v, o projections
            (d,),                                  # post_attention_layernorm
            (hidden, d), (hidden, d), (d, hidden), # gate, up, down
        ]
    shapes += [(d,)]                               # final norm
    return shapes


def many_small_shapes(size: float = 1.0, count: int = 10_000) -> List[Shape]:
    """``count`` tensors of 1,024 elements (times ``size``): launch and host overhead."""
    return [(max(1, round(1024 * size)),)] * count


def tiny_shapes(count: int, size: float = 1.0) -> List[Shape]:
    """``count`` tensors of 4 elements (times ``size``): the host cost of a call alone."""
    return [(max(1, round(4 * size)),)] * count


def equal_split_shapes(total: int, count: int) -> List[Shape]:
    """``total`` elements split into ``count`` tensors: the cost of the tensor count alone."""
    return [(max(1, total // count),)] * count


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


def _from_shapes(name: str, shapes_fn: Callable[[float], List[Shape]]):
    def build(size: float, dtype: torch.dtype, device, seed: int = 0) -> Workload:
        return Workload(name, make_params(shapes_fn(size), dtype, device, seed))

    return build


def _tiny(count: int):
    def build(size: float, dtype: torch.dtype, device, seed: int = 0) -> Workload:
        return Workload(f"tiny-{count // 1000}k", make_params(tiny_shapes(count, size), dtype, device, seed), host=True)

    return build


def transformer(size: float, dtype: torch.dtype, device, seed: int = 0) -> Workload:
    """A real ``torch.nn.TransformerEncoder`` (6 layers, d_model 512 at size 1: 18.9M
    parameters in 74 tensors), its ``parameters()`` used as they are, and a batch for it."""
    torch.manual_seed(seed)
    heads = 8
    d_model = max(heads, round(512 * math.sqrt(size) / heads) * heads)
    layer = torch.nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False).to(device=device, dtype=dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    inputs = torch.randn(8, 64, d_model, generator=generator).to(device=device, dtype=dtype)
    params = list(model.parameters())
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(device=device, dtype=dtype)
    return Workload("transformer", params, model=model, inputs=inputs)


WORKLOADS: Dict[str, Callable[..., Workload]] = {
    "gpt2-small": _from_shapes("gpt2-small", gpt2_small_shapes),
    "llama-1b": _from_shapes("llama-1b", llama_1b_shapes),
    "many-small": _from_shapes("many-small", many_small_shapes),
    "transformer": transformer,
    "tiny-1k": _tiny(1_000),
    "tiny-10k": _tiny(10_000),
}

# The dtype each workload is measured in unless asked otherwise: bf16 for the model that is
# trained in it, fp32 for the rest.
DEFAULT_DTYPES: Dict[str, torch.dtype] = {
    "gpt2-small": torch.float32,
    "llama-1b": torch.bfloat16,
    "many-small": torch.float32,
    "transformer": torch.float32,
    "tiny-1k": torch.float32,
    "tiny-10k": torch.float32,
}


def scaling_series(axis: str, dtype: torch.dtype, device, seed: int = 0, max_params: float = 124.4e6, size: float = 1.0):
    """(size, builder) pairs of ``--scaling``: total parameters 1M up to ``max_params`` in
    GPT-2-small shapes (148 tensors), or 10 to 10,000 tensors of ``size`` times 4M elements in all."""
    if axis == "params":
        full = sum(math.prod(s) for s in gpt2_small_shapes(1.0))
        totals = [t for t in (1e6, 4e6, 16e6, 64e6) if t < max_params] + [max_params]
        return [
            (total / full, lambda total=total: Workload("gpt2-small", make_params(gpt2_small_shapes(total / full), dtype, device, seed)))
            for total in totals
        ]
    if axis == "tensors":
        return [
            (1.0, lambda count=count: Workload(f"{count} tensors", make_params(equal_split_shapes(round((1 << 22) * size), count), dtype, device, seed)))
            for count in (10, 100, 1000, 10_000)
        ]
    raise ValueError(f"scaling axis must be 'params' or 'tensors', got {axis!r}")
