"""fastreg on sharded parameters: ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism).

The public functions route here when their tensors are DTensors. Each rank runs the
backends on its local shards (``to_local()``), which gives partial sums; the partial sums
of all tensors of a call travel together in ONE all-reduce (one per mesh dimension on an
n-D mesh), so every rank gets the whole model's value::

    P = l1 * sum|w| + l2/2 * sum w^2 + group_lasso * sum_t sqrt(sum over shards of sum w_t^2)

- A tensor replicated along a mesh dimension is counted once: only the rank at
  coordinate 0 of that dimension contributes its sums.
- Group lasso with one group per tensor needs each whole tensor's norm: the per-tensor
  sums of squares go into the same all-reduce, and the norm is taken after it.
- Group lasso over rows (``group_dim=0``) needs every row on one rank, which holds for
  ``Shard(0)`` (what ``fully_shard`` does, uneven or padded sharding included: each rank's
  local tensor holds whole rows, possibly none) and for replication. A tensor of two or
  more dimensions sharded along another dimension is refused with a ``ValueError``.
- ``Partial`` placements (pending reductions) are refused; mixing DTensors and regular
  tensors in one call, or DTensors on different meshes, too.

Gradients (the penalty's backward, ``add_penalty_grad_``) are DTensors with the
parameters' placements; updates (``decay_``) write the local shards in place.

With NCCL on GPUs nothing changes but the process group: the all-reduce runs on the
parameters' mesh, on their device.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _calls, _dispatch
from ._dispatch import Coefficients, accumulate_dtype

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None


def any_dtensor(tensors: Sequence[Tensor]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def local_tensors(tensors: Sequence[Tensor]) -> List[Tensor]:
    """``tensors`` with each DTensor replaced by its local shard."""
    if not any_dtensor(tensors):
        return list(tensors)
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


class _Shards(NamedTuple):
    mesh: object  # DeviceMesh
    tensors: List[Tensor]  # the DTensors
    locals: List[Tensor]  # their local shards
    owned: List[bool]  # whether this rank's sums count (False for a replica at coordinate > 0)


def _shards(tensors: Sequence[Tensor], group_dim: Optional[int], name: str = "params") -> _Shards:
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            raise ValueError(
                f"{name} mixes DTensors (sharded parameters) and regular tensors ({name}[{i}] is a "
                f"{type(t).__name__}); pass them in separate calls"
            )
    mesh = tensors[0].device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"this rank is not part of the device mesh of {name}[0]")
    owned = []
    for i, t in enumerate(tensors):
        if t.device_mesh != mesh:
            raise ValueError(f"{name}[{i}] is on another device mesh than {name}[0]; call once per mesh")
        mine = True
        for dim, placement in enumerate(t.placements):
            if placement.is_partial():
                raise ValueError(f"{name}[{i}] has a Partial placement (a pending reduction); redistribute it first")
            if placement.is_replicate():
                mine = mine and coordinate[dim] == 0
            elif group_dim == 0 and t.dim() >= 2 and placement.dim % t.dim() != 0:
                raise ValueError(
                    f"{name}[{i}] is sharded along dim {placement.dim}, which splits the rows that group_dim=0 "
                    "groups; shard it along dim 0 (fully_shard does) or use group_dim=None"
                )
        owned.append(mine)
    return _Shards(mesh, list(tensors), [t.to_local() for t in tensors], owned)


def _all_reduce(mesh, parts: List[Tensor]) -> List[Tensor]:
    """Sums ``parts`` over all ranks of ``mesh``: one collective for all of them per mesh dim."""
    import torch.distributed._functional_collectives as funcol

    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    flat = torch.cat([p.to(dtype).reshape(-1) for p in parts])
    for dim in range(mesh.ndim):
        flat = funcol.all_reduce(flat, "sum", (mesh, dim))
    flat = funcol.wait_tensor(flat) if hasattr(funcol, "wait_tensor") else flat
    return list(flat.split([p.numel() for p in parts]))


def _mask(sums: Tensor, owned: List[bool]) -> Tensor:
    if all(owned):
        return sums
    keep = torch.tensor(owned, device=sums.device)
    return torch.where(keep, sums, torch.zeros((), dtype=sums.dtype, device=sums.device))


def _local_norms(shards: _Shards, backend: Optional[str]) -> Tuple[Tensor, Tensor]:
    abs_sums, sq_sums = _calls.norms_parts(_calls.prepare(shards.locals, backend))
    return _mask(abs_sums, shards.owned), _mask(sq_sums, shards.owned)


def norm_sums(tensors: Sequence[Tensor], backend: Optional[str]) -> Tuple[Tensor, Tensor]:
    """Per-tensor ``sum|w|`` and ``sum w^2`` of whole tensors, on every rank."""
    shards = _shards(tensors, None)
    with torch.no_grad():
        abs_sums, sq_sums = _all_reduce(shards.mesh, list(_local_norms(shards, backend)))
    return abs_sums, sq_sums


def places(tensors: Sequence[Tensor]) -> List[Tuple[List[Tensor], bool]]:
    """``tensors`` (an optimizer's param group, which may span devices and meshes) split by
    device mesh for DTensors and by device for regular tensors, as ``(tensors, sharded)``
    pairs in order of first appearance."""
    by_place: dict = {}
    for t in tensors:
        key = t.device_mesh if isinstance(t, DTensor) else t.device
        by_place.setdefault(key, []).append(t)
    return [(place, isinstance(place[0], DTensor)) for place in by_place.values()]


def _whole_tensor_groups(shards: _Shards, coefs: Coefficients) -> List[int]:
    """Indices of the tensors whose group-lasso group is the whole (sharded) tensor, so
    their norm needs the all-reduce: every tensor with ``group_dim=None``, and tensors of
    fewer than two dims with ``group_dim=0``. Rows (``group_dim=0``) are local."""
    if not coefs.group_lasso:
        return []
    return [i for i, t in enumerate(shards.tensors) if coefs.group_dim is None or t.dim() < 2]


def _value_and_norms(shards: _Shards, coefs: Coefficients, backend: Optional[str]) -> Tuple[Tensor, List[int], Optional[Tensor]]:
    """``P`` of the whole tensors, the indices of :func:`_whole_tensor_groups` and those
    tensors' norms: one fused pass over the local shards (two with row groups beside
    whole-tensor groups) and one all-reduce."""
    whole = _whole_tensor_groups(shards, coefs)
    if not whole:
        mine = [t for t, own in zip(shards.locals, shards.owned) if own]
        local = _calls.penalty(_calls.prepare(mine, backend), coefs)
        (value,) = _all_reduce(shards.mesh, [local.reshape(1)])
        return value.reshape(()).to(local.dtype), whole, None
    rows = [i for i in range(len(shards.tensors)) if i not in set(whole)]
    parts = list(_local_norms(shards, backend))
    if rows:
        mine = [shards.locals[i] for i in rows if shards.owned[i]]
        parts.append(_calls.penalty(_calls.prepare(mine, backend), Coefficients(group_lasso=coefs.group_lasso, group_dim=0)).reshape(1))
    reduced = _all_reduce(shards.mesh, parts)
    abs_sums, sq_sums = reduced[0], reduced[1]
    norms = sq_sums[whole].sqrt()
    value = torch.zeros((), dtype=abs_sums.dtype, device=abs_sums.device)
    if coefs.l1:
        value = value + coefs.l1 * abs_sums.sum()
    if coefs.l2:
        value = value + (coefs.l2 / 2) * sq_sums.sum()
    value = value + coefs.group_lasso * norms.sum()
    if rows:
        value = value + reduced[2].reshape(())
    return value, whole, norms


def _scales(norms: Tensor, numerator) -> List[Tensor]:
    """``numerator / ||w_t||`` per tensor, 0 where the norm is 0."""
    return list(torch.where(norms > 0, numerator / norms, torch.zeros((), dtype=norms.dtype, device=norms.device)).unbind())


def _group_lasso_gradient(locals_: List[Tensor], norms: Tensor, group_lasso: float) -> List[Tensor]:
    """``group_lasso * w / ||w||`` of each shard, with the whole tensor's norm, in the accumulate dtype."""
    weights = [w.to(accumulate_dtype(w.dtype)) for w in locals_]
    return torch._foreach_mul(weights, [s.to(w.dtype) for s, w in zip(_scales(norms, group_lasso), weights)])


def _split_calls(shards: _Shards, whole: List[int], coefs: Coefficients, backend: Optional[str], **prepare):
    """(indices, prepared call, coefficients) for the tensors whose group lasso is local
    (all terms in the backend) and for the whole-tensor groups (group lasso left out)."""
    whole_set = set(whole)
    local = [i for i in range(len(shards.locals)) if i not in whole_set]
    out = []
    for indices, c in ((local, coefs), (whole, coefs.replace(group_lasso=0.0))):
        if indices and not c.is_zero():
            out.append((indices, _calls.prepare([shards.locals[i] for i in indices], backend, **prepare), c))
    return out


class _ShardedPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coefs: Coefficients, backend: Optional[str], shards: _Shards, *params: Tensor) -> Tensor:
        value, whole, norms = _value_and_norms(shards, coefs, backend)
        ctx.coefs, ctx.backend, ctx.shards, ctx.whole, ctx.norms = coefs, backend, shards, whole, norms
        return value

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        shards = ctx.shards
        grads: List[Optional[Tensor]] = [torch.zeros_like(w) for w in shards.locals]
        for indices, call, c in _split_calls(shards, ctx.whole, ctx.coefs, ctx.backend):
            for bucket in call.plan.buckets:
                for i, g in zip(bucket.pick(indices), _calls.penalty_backward(call, bucket, grad_output, c)):
                    grads[i] = g
        if ctx.whole:
            extra = _group_lasso_gradient([shards.locals[i] for i in ctx.whole], ctx.norms, ctx.coefs.group_lasso)
            for i, e in zip(ctx.whole, extra):
                grads[i] = (grads[i].to(e.dtype) + e * grad_output.to(e.dtype)).to(shards.locals[i].dtype)
        wrapped = [
            DTensor.from_local(g, t.device_mesh, t.placements, shape=t.shape, stride=t.stride(), run_check=False) if needed else None
            for g, t, needed in zip(grads, shards.tensors, ctx.needs_input_grad[3:])
        ]
        return (None, None, None, *wrapped)


def penalty(tensors: Sequence[Tensor], coefs: Coefficients, backend: Optional[str]) -> Tensor:
    _dispatch.check_backend_name(backend)
    shards = _shards(tensors, coefs.group_dim)
    return _ShardedPenalty.apply(coefs, backend, shards, *tensors)


def add_penalty_grad_(tensors: Sequence[Tensor], coefs: Coefficients, backend: Optional[str]) -> Tensor:
    _dispatch.check_backend_name(backend)
    with_grad, grads, indices = _dispatch.grads_of(tensors)
    for t, g, i in zip(with_grad, grads, indices):
        if not isinstance(g, DTensor) or tuple(g.placements) != tuple(t.placements):
            raise TypeError(f"params[{i}].grad must be a DTensor placed like params[{i}] ({t.placements})")
    if not with_grad:
        return torch.zeros((), dtype=_dispatch.result_dtype(tensors))
    shards = _shards(with_grad, coefs.group_dim)
    local_grads = [g.to_local() for g in grads]
    _dispatch.check_no_overlap(local_grads, "params", ".grad", indices)
    with torch.no_grad():
        value, whole, norms = _value_and_norms(shards, coefs, backend)
        for chosen, call, c in _split_calls(shards, whole, coefs, backend):
            _calls.add_grad(call, c, grads=[local_grads[i] for i in chosen])
        if whole:
            extra = _group_lasso_gradient([shards.locals[i] for i in whole], norms, coefs.group_lasso)
            targets = [local_grads[i] for i in whole]
            torch._foreach_add_(targets, [e.to(g.dtype) for e, g in zip(extra, targets)])
    return value


def decay_(tensors: Sequence[Tensor], lr, coefs: Coefficients, backend: Optional[str]) -> None:
    _dispatch.check_backend_name(backend)
    shards = _shards(tensors, coefs.group_dim)
    _calls.prepare(shards.locals, backend, writes_params=True)
    if coefs.is_zero():
        return
    whole = _whole_tensor_groups(shards, coefs)
    with torch.no_grad():
        # l2 decay and the L1 prox are elementwise and row groups are local; a whole-tensor
        # block shrink needs the norm after them, so it comes after one all-reduce
        for _, call, c in _split_calls(shards, whole, coefs, backend):
            _calls.decay(call, lr, c)
        if not whole:
            return
        (sq_sums,) = _all_reduce(shards.mesh, [_local_norms(shards, backend)[1]])
        norms = sq_sums[whole].sqrt()
        threshold = lr * coefs.group_lasso
        factors = torch.where(norms > threshold, 1 - threshold / norms, torch.zeros((), dtype=norms.dtype, device=norms.device))
        targets = [shards.locals[i] for i in whole]
        weights = [w.to(accumulate_dtype(w.dtype)) for w in targets]
        torch._foreach_mul_(weights, [f.to(w.dtype) for f, w in zip(factors.unbind(), weights)])
        torch._foreach_copy_(targets, weights)
