"""The ``torch`` backend: fast pure PyTorch, for every device that has no compiled fastreg kernel.

Same math as every backend (see :mod:`fastreg.backends.base`)::

    P(W) = l1 * sum|w| + l2/2 * sum w^2 + group_lasso * sum_g ||w_g||_2
    dP/dw = l1 * sign(w) + l2 * w + group_lasso * w_g / ||w_g||

Why it is built this way. Written as whole-list ``torch._foreach_*`` ops (the ``reference``
backend), every intermediate (``sign(w)``, ``|w|``, ``w^2``, the gradient term) is a new copy
of all parameters, so a call streams the model through memory many times and allocates as
much. Here every op walks the parameters in batches of about ``batch`` elements instead:

- a tensor larger than ``small`` elements is cut into slices of its flat view (rows, for
  row groups; blocks along its leading dimensions when it is not contiguous);
- smaller tensors of one shape are gathered into runs of up to ``batch`` elements, one ``stack`` per run, so
  the per-op cost of a Python call (a few microseconds) is paid per run, not per tensor;
  results go back with one ``_foreach_add_`` / ``_foreach_copy_`` per run.

Each batch's intermediates live in scratch buffers of ``batch`` elements that every batch
reuses: on CPU they stay in cache, so weights and gradients are read from memory about once
and the in-cache passes are what a call costs beyond a single pass. Elementwise steps are
in-place ops that fuse what they can (``add_`` with ``alpha``, ``softshrink`` for the L1
prox). On accelerators the batches are large (few launches, temporaries still bounded).

Reductions: ``Tensor.sum`` per batch (cascade summation on CPU), partial sums combined in a
fixed order, so results are deterministic and within fp32 rounding of the reference. Not
``linalg.vector_norm`` / ``_foreach_norm`` (they accumulate sequentially on CPU: relative
error 6e-5 on 2M fp32 elements) and not ``torch.dot`` (MKL's result depends on the data's
address alignment, so equal inputs at other addresses could give other bits). fp16/bf16
batches are converted to fp32 in scratch and each result is rounded once when written; fp64
stays fp64.

Under ``torch.compile`` the reference formulation is traced instead: the compiler fuses it
into single passes itself, and a batch loop would unroll into a graph node per batch.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .base import Backend, Coefficients, LearningRate, accumulate_dtype
from .reference import ReferenceBackend

# Elements per batch and the largest tensor gathered into runs, per device type. CPU: a batch
# of 512K fp32 elements is 2 MiB, so the few buffers in use at once fit the last-level cache
# and each op call (about 2 us of Python and dispatch) is small beside its work; an in-cache op
# on it runs at about 190 GB/s on 2 cores whatever the batch from 128K up, so halving the batch
# only adds calls (GPT-2's coupled value + grad: 98 ms at 128K, 88 at 256K, 80 at 512K, 94 at
# 1M elements, in one run). Accelerators:
# 16M elements, so even a 124M-parameter model takes a few dozen launches per op.
_CPU_LIMITS = (1 << 19, 1 << 16)
_ACCELERATOR_LIMITS = (1 << 24, 1 << 20)


def _limits(device: torch.device) -> Tuple[int, int]:
    return _CPU_LIMITS if device.type == "cpu" else _ACCELERATOR_LIMITS


# -- layout: which tensors are cut into pieces, which are gathered into runs -------------------

Slots = Union[int, Tuple[int, int]]  # one group (the piece holds part of it), or groups [start, stop)


def _rows(t: Tensor, group_dim: Optional[int]) -> int:
    """The number of groups of ``t``: its rows for row groups of a 2+-d tensor, else 1."""
    return t.shape[0] if group_dim == 0 and t.dim() >= 2 else 1


def _strided_pieces(t: Tensor, limit: int) -> List[Tensor]:
    """Views covering ``t`` in index order, each of at most ``limit`` elements. The cut depends
    on the shape only, so tensors of one shape are cut alike whatever their strides."""
    if t.dim() == 0:
        return [t]
    if t.numel() <= limit or t.dim() == 1:
        return list(t.split(limit))
    per = limit // t[0].numel()
    if per >= 1:
        return list(t.split(per))
    return [piece for row in t.unbind(0) for piece in _strided_pieces(row, limit)]


def _pieces(tensors: Sequence[Tensor], limit: int) -> Iterator[Tuple[Tensor, ...]]:
    """``tensors`` (all of one shape) cut alike into pieces of at most ``limit`` elements."""
    if all(t.is_contiguous() for t in tensors):
        return zip(*(t.view(-1).split(limit) for t in tensors))
    return zip(*(_strided_pieces(t, limit) for t in tensors))


class _Run:
    """Small tensors of one shape, processed as one batch: stacked into one buffer, or the
    tensor itself when alone. ``groups`` groups of ``length`` elements when the call needs
    group sums (``groups_each`` per member)."""

    __slots__ = ("shape", "indices", "numel", "groups_each", "length", "groups", "stretches")

    def __init__(self, shape: torch.Size, numel: int, groups_each: int):
        self.shape = shape
        self.indices: List[int] = []
        self.numel = 0
        self.groups_each = groups_each
        self.length = numel // groups_each if groups_each else numel
        self.groups = 0
        # (first slot, stop slot, first group in the run) of each stretch of consecutive slots
        self.stretches: List[List[int]] = []

    def add(self, index: int, numel: int, first_slot: int) -> None:
        self.indices.append(index)
        self.numel += numel
        groups = self.groups_each
        if groups:
            if self.stretches and self.stretches[-1][1] == first_slot:
                self.stretches[-1][1] += groups
            else:
                self.stretches.append([first_slot, first_slot + groups, self.groups])
            self.groups += groups


class _Layout:
    """How one call walks its tensors: large ones piece by piece, small ones in runs.

    With ``grouped`` the call needs per-group sums (norms, group lasso): groups are whole
    tensors, or rows with ``group_dim=0``, and group ``g`` of tensor ``t`` has slot
    ``offsets[t] + g``. A run's tensors share one shape, so its group sums are one
    ``view(groups, length).sum(1)`` and its results go back through views of one buffer.
    """

    def __init__(self, params: Sequence[Tensor], grouped: bool = False, group_dim: Optional[int] = None):
        self.params = params
        self.acc = accumulate_dtype(params[0].dtype)
        self.device = params[0].device
        self.batch, small = _limits(self.device)
        self.group_dim = group_dim
        self.large: List[int] = []
        self.runs: List[_Run] = []
        self.offsets: List[int] = []
        self._scratch: Dict[str, Tensor] = {}
        self._views: Dict[tuple, Tensor] = {}
        rows = group_dim == 0
        batch, large, runs, offsets = self.batch, self.large, self.runs, self.offsets
        open_runs: Dict[torch.Size, _Run] = {}
        slots = 0
        for i, p in enumerate(params):
            numel = p.numel()
            offsets.append(slots)
            if numel > small:
                large.append(i)
                if grouped:
                    slots += p.shape[0] if rows and p.dim() >= 2 else 1
                continue
            shape = p.shape
            run = open_runs.get(shape)
            if run is None or run.numel + numel > batch:
                if run is not None:
                    runs.append(run)
                groups = (shape[0] if rows and len(shape) >= 2 else 1) if grouped else 0
                run = open_runs[shape] = _Run(shape, numel, groups)
            if numel or run.groups_each:
                run.add(i, numel, slots)
            slots += run.groups_each
        runs.extend(run for run in open_runs.values() if run.indices)
        self.slots = slots

    def zero(self) -> Tensor:
        return torch.zeros((), dtype=self.acc, device=self.device)

    def scratch(self, name: str, shape: Sequence[int], rows: int = 0) -> Tensor:
        """A buffer of the accumulate dtype of ``shape`` (``(rows,) + shape`` for ``rows`` of
        1 or 2), reused: valid until the next request of the same ``name``."""
        key = (name, tuple(shape), rows)
        view = self._views.get(key)
        if view is not None:
            return view
        buffer = self._scratch.get(name)
        if buffer is None:
            size = (2, self.batch) if rows else (self.batch,)
            buffer = self._scratch[name] = torch.empty(size, dtype=self.acc, device=self.device)
        n = math.prod(shape)
        view = buffer[:rows, :n].view((rows,) + tuple(shape)) if rows else buffer[:n].view(shape)
        if n == self.batch:  # the shape of most pieces: keep the view
            self._views[key] = view
        return view

    def batches(self, lists: Sequence[Sequence[Tensor]]) -> Iterator["_Piece | _Gathered"]:
        """Every batch of the call; ``lists`` (params first, then grads or outputs) are the
        tensors a batch reads and writes, cut or gathered alike."""
        for i in self.large:
            tensors = [lst[i] for lst in lists]
            for slots, views in self._cut(tensors, self.offsets[i]):
                first = views[0]
                values = first if first.dtype == self.acc else self.scratch("values", first.shape).copy_(first)
                yield _Piece(values, views, slots)
        for run in self.runs:
            members = [[lst[i] for i in run.indices] for lst in lists]
            params = members[0]
            stacked = (len(params),) + run.shape
            if len(params) == 1 and params[0].dtype == self.acc and params[0].is_contiguous():
                values = params[0].view(stacked)  # the tensor itself: no copy
            else:
                values = torch.stack(params, out=self.scratch("gathered", stacked))
            yield _Gathered(values.view(run.groups, run.length) if run.groups else values.view(-1), run, members)

    def _cut(self, tensors: List[Tensor], first: int) -> Iterator[Tuple[Slots, Tuple[Tensor, ...]]]:
        """(slots, pieces) of a large tensor: the whole tensor or one row longer than a batch is
        one group cut into pieces; shorter rows go whole, several to a piece."""
        rows = _rows(tensors[0], self.group_dim)
        if rows == 1:
            for pieces in _pieces(tensors, self.batch):
                yield first, pieces
            return
        length = tensors[0].numel() // rows
        if length > self.batch:
            for r in range(rows):
                for pieces in _pieces([t[r] for t in tensors], self.batch):
                    yield first + r, pieces
            return
        per = self.batch // length
        if all(t.is_contiguous() for t in tensors):
            tensors = [t.view(rows, length) for t in tensors]
        for start, pieces in zip(range(first, first + rows, per), zip(*(t.split(per) for t in tensors))):
            yield (start, start + pieces[0].shape[0]), pieces


class _Piece:
    """A piece of one large tensor: ``values`` (accumulate dtype: the piece of the first list,
    or a scratch copy) and the same piece of every list."""

    __slots__ = ("values", "views", "slots")

    def __init__(self, values: Tensor, views: Tuple[Tensor, ...], slots: Slots):
        self.values, self.views, self.slots = values, views, slots

    def of_groups(self, per_slot: Tensor) -> Tensor:
        """``per_slot``'s entries for this piece, shaped to broadcast against ``values``."""
        if isinstance(self.slots, int):
            return per_slot[self.slots]
        start, stop = self.slots
        return per_slot[start:stop].view((stop - start,) + (1,) * (self.values.dim() - 1))

    def add(self, k: int, d: Tensor) -> None:
        self.views[k].add_(d)

    def store(self, k: int, v: Tensor) -> None:
        if v is not self.views[k]:
            self.views[k].copy_(v)


class _Gathered:
    """A run of small tensors: ``values`` holds their elements (accumulate dtype) in one
    buffer, flat, or ``(groups, length)`` when the call has groups; ``members`` are the run's
    tensors of every list. When the run is one contiguous tensor of the accumulate dtype,
    ``values`` is a view of that tensor."""

    __slots__ = ("values", "run", "members")

    def __init__(self, values: Tensor, run: _Run, members: List[List[Tensor]]):
        self.values, self.run, self.members = values, run, members

    def of_groups(self, per_slot: Tensor) -> Tensor:
        """``per_slot``'s entries for the run's groups, a column against ``values``."""
        parts = [per_slot[start:stop] for start, stop, _ in self.run.stretches]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).view(-1, 1)

    def _split(self, v: Tensor) -> List[Tensor]:
        return v.view((len(self.run.indices),) + self.run.shape).unbind(0)

    def add(self, k: int, d: Tensor) -> None:
        torch._foreach_add_(self.members[k], self._split(d))

    def store(self, k: int, v: Tensor) -> None:
        targets = self.members[k]
        if len(targets) == 1 and v.dtype == targets[0].dtype and v.data_ptr() == targets[0].data_ptr():
            return  # v is the tensor itself
        torch._foreach_copy_(targets, self._split(v))


Batch = Union[_Piece, _Gathered]


# -- sums ----------------------------------------------------------------------------------------


def _abs_and_square(w: Tensor, out: Tensor) -> None:
    torch.abs(w, out=out[0])
    torch.mul(w, w, out=out[1])


def _square(w: Tensor, out: Tensor) -> None:
    torch.mul(w, w, out=out[0])


def _group_sums(layout: _Layout, quantities: Callable[[Tensor, Tensor], None], count: int,
                transform: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """``(count, slots)``: each group's sums of ``count`` elementwise quantities of its values
    (of ``transform(values)`` when given, which must not write the values).

    ``quantities(w, out)`` fills ``out``, of shape ``(count,) + w.shape``."""
    result = torch.zeros((count, layout.slots), dtype=layout.acc, device=layout.device)
    partial: Dict[int, List[Tensor]] = {}
    for batch in layout.batches([layout.params]):
        w = batch.values if transform is None else transform(batch.values)
        out = layout.scratch("quantities", w.shape, rows=count)
        quantities(w, out)
        if isinstance(batch, _Gathered):
            sums = out.sum(2)
            for start, stop, column in batch.run.stretches:
                result[:, start:stop] = sums[:, column:column + stop - start]
        elif isinstance(batch.slots, int):
            partial.setdefault(batch.slots, []).append(out.view(count, -1).sum(1))
        else:
            start, stop = batch.slots
            result[:, start:stop] = out.view(count, stop - start, -1).sum(2)
    for slot, parts in partial.items():
        result[:, slot] = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
    return result


def _value(layout: _Layout, coefs: Coefficients, abs_total: Tensor, sq_total: Tensor, norms: Optional[Tensor]) -> Tensor:
    """``P`` from its sums; a term whose coefficient is zero is left out (no ``0 * inf``)."""
    terms = []
    if coefs.l1:
        terms.append(coefs.l1 * abs_total)
    if coefs.l2:
        terms.append((coefs.l2 / 2) * sq_total)
    if coefs.group_lasso:
        terms.append(coefs.group_lasso * norms.sum())
    value = layout.zero()
    for term in terms:
        value = value + term
    return value


def _grouped_value(layout: _Layout, coefs: Coefficients) -> Tuple[Tensor, Tensor]:
    """``P`` and every group's norm, from one pass of per-group sums."""
    sums = _group_sums(layout, _abs_and_square, 2)
    norms = sums[1].sqrt()
    return _value(layout, coefs, sums[0].sum(), sums[1].sum(), norms), norms


def _increment(layout: _Layout, w: Tensor, coefs: Coefficients, scale: Optional[Tensor] = None) -> Tensor:
    """``dP/dw`` of a batch, in scratch: ``w * (the group scale, or l2) + l1 * sign(w)``."""
    d = layout.scratch("increment", w.shape)
    if scale is not None:
        torch.mul(w, scale, out=d)
    elif coefs.l2:
        torch.mul(w, coefs.l2, out=d)
    else:
        d.zero_()
    if coefs.l1:
        d.add_(torch.sign(w, out=layout.scratch("sign", w.shape)), alpha=coefs.l1)
    return d


def _elastic_net(layout: _Layout, coefs: Coefficients, grads: Optional[List[Tensor]] = None) -> Tensor:
    """``P`` for l1/l2 without groups from one pass; with ``grads``, the same pass adds each
    batch's gradient term to them (coupled mode).

    A batch's value is the sum of ``l1 * (|w| + c * w^2)``, ``c = l2 / (2 * l1)``, one
    ``addcmul_`` on ``|w|``: one in-cache pass less than summing ``|w|`` and ``w^2`` apart
    (done when ``c`` would leave the accumulate dtype's comfortable range)."""
    l1, l2 = coefs.l1, coefs.l2
    ratio = l2 / (2 * l1) if l1 and l2 else None
    if ratio is not None and not 1e-30 <= ratio <= 1e30:
        ratio = None
    count = 2 if l1 and l2 and ratio is None else 1
    partials = []
    for batch in layout.batches([layout.params] if grads is None else [layout.params, grads]):
        w = batch.values
        if grads is not None:
            if isinstance(batch, _Piece) and batch.views[1].dtype == w.dtype:
                # fp32/fp64 slices: fused in-place updates, no gradient buffer. The sign comes
                # first: it reads w from memory alone, then the first update streams g in with w
                # already in cache (on GPT-2 about 10% faster than reading both at once in a
                # tight loop, a tie inside the bench beside its memory-heavy peers); the later
                # passes find everything in cache.
                g = batch.views[1]
                sign = torch.sign(w, out=layout.scratch("sign", w.shape)) if l1 else None
                if l2:
                    g.add_(w, alpha=l2)
                if l1:
                    g.add_(sign, alpha=l1)
            else:  # one write per element: fp16/bf16 are rounded once, a run's grads in one op
                batch.add(1, _increment(layout, w, coefs))
        out = layout.scratch("quantities", w.shape, rows=count)
        if l1:
            torch.abs(w, out=out[0])
            if ratio is not None:
                out[0].addcmul_(out[0], out[0], value=ratio)
        if l2 and ratio is None:
            torch.mul(w, w, out=out[count - 1])
        partials.append(out.view(count, -1).sum(1))
    if not partials:
        return layout.zero()
    sums = torch.stack(partials).sum(0)
    if ratio is not None:
        return l1 * sums[0]
    return _value(layout, coefs, sums[0], sums[count - 1], None)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self):
        self._reference = ReferenceBackend()

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None

    def norms(self, params: List[Tensor]) -> Tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            return self._reference.norms(params)
        sums = _group_sums(_Layout(params, grouped=True), _abs_and_square, 2)
        return sums[0], sums[1]

    def value(self, params: List[Tensor], coefs: Coefficients) -> Tensor:
        if torch.compiler.is_compiling():
            return self._reference.value(params, coefs)
        if coefs.group_lasso:
            return _grouped_value(_Layout(params, grouped=True, group_dim=coefs.group_dim), coefs)[0]
        layout = _Layout(params)
        return layout.zero() if coefs.is_zero() else _elastic_net(layout, coefs)

    def add_grad_(self, params: List[Tensor], grads: List[Tensor], coefs: Coefficients) -> Tensor:
        if torch.compiler.is_compiling():
            return self._reference.add_grad_(params, grads, coefs)
        if not coefs.group_lasso:
            layout = _Layout(params)
            return layout.zero() if coefs.is_zero() else _elastic_net(layout, coefs, grads)
        # The group norms are needed before any update: one pass for them, one for the update.
        layout = _Layout(params, grouped=True, group_dim=coefs.group_dim)
        value, norms = _grouped_value(layout, coefs)
        scales = _group_scales(coefs, norms)
        for batch in layout.batches([params, grads]):
            batch.add(1, _increment(layout, batch.values, coefs, batch.of_groups(scales)))
        return value

    def decay_(self, params: List[Tensor], lr: LearningRate, coefs: Coefficients) -> None:
        if torch.compiler.is_compiling():
            return self._reference.decay_(params, lr, coefs)
        if coefs.is_zero():
            return
        layout = _Layout(params, grouped=bool(coefs.group_lasso), group_dim=coefs.group_dim)
        if isinstance(lr, Tensor):
            lr = lr.to(layout.acc)
        keep = 1 - lr * coefs.l2 if coefs.l2 else None
        threshold = lr * coefs.l1 if coefs.l1 else None

        def prox(w: Tensor) -> Tensor:
            """Steps 1 and 2 of the decoupled update, in place on ``w``."""
            if keep is not None:
                w.mul_(keep)
            if isinstance(threshold, Tensor):
                w.sub_(torch.clamp(w, -threshold, threshold, out=layout.scratch("clamped", w.shape)))
            elif threshold is not None:
                torch.ops.aten.softshrink.out(w, threshold, out=w)  # sign(w) * max(|w| - t, 0), NaN kept
            return w

        factors = None
        if coefs.group_lasso:
            # Step 3 needs the norms of the thresholded groups first: a read-only pass computes
            # them on scratch copies; the update pass below thresholds again and scales.
            shrink = lr * coefs.group_lasso
            thresholded = _group_sums(layout, _square, 1, lambda w: prox(layout.scratch("thresholded", w.shape).copy_(w)))
            norms = thresholded[0].sqrt()
            factors = torch.where(norms > shrink, 1 - shrink / norms, 0.0)
        for batch in layout.batches([params]):
            w = prox(batch.values)
            if factors is not None:
                w.mul_(batch.of_groups(factors))
            batch.store(0, w)

    def penalty_backward(self, params: List[Tensor], grad_output: Tensor, coefs: Coefficients) -> List[Tensor]:
        if torch.compiler.is_compiling():
            return self._reference.penalty_backward(params, grad_output, coefs)
        layout = _Layout(params, grouped=bool(coefs.group_lasso), group_dim=coefs.group_dim)
        scales = _group_scales(coefs, _grouped_value(layout, coefs)[1]) if coefs.group_lasso else None
        grad_output = grad_output.to(layout.acc)
        outputs = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]
        for batch in layout.batches([params, outputs]):
            d = _increment(layout, batch.values, coefs, None if scales is None else batch.of_groups(scales))
            batch.store(1, d.mul_(grad_output))
        return outputs


def _group_scales(coefs: Coefficients, norms: Tensor) -> Tensor:
    """Per group, the factor of ``w`` in the gradient: ``l2 + gl / ||w_g||``, with ``1/||w_g||``
    taken as 0 for a zero (or NaN) norm."""
    return coefs.l2 + coefs.group_lasso * torch.where(norms > 0, norms.reciprocal(), 0.0)
