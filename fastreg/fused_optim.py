"""Fused regularized optimizers: :class:`AdamW`, :class:`Adam` and :class:`SGD`.

Each is the ``torch.optim`` optimizer of the same name (a subclass: same arguments, same
``param_groups`` and state keys, state dicts that load both ways) with fastreg's proximal terms
added per param group:

    opt = fastreg.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, l1=1e-5)

A step is ``Regularized(torch_optimizer, mode="decoupled")`` with ``l2=0``: torch's update
(its own ``weight_decay``: decoupled for AdamW, added to the gradient for Adam and SGD), then
the soft threshold of ``l1`` and the block shrink of ``group_lasso``, both scaled by the
group's current ``lr``; they leave exact zeros.

For float32 / float64 / bfloat16 / float16 params the step is one kernel over a work-layout
table per (device, dtype) bucket: one pass over the weights, gradients and state per element
(a second pass over the weights alone for group lasso), which also sums the penalty of the
starting weights. On CPU it is the ``cpp`` backend's C++ kernel (``csrc/fastreg_optim.cpp``),
whose update is torch's fused CPU kernel's, operation for operation. On CUDA it is the
``triton`` backend's (:mod:`fastreg.kernels.triton_optim`), whose update is torch's fused CUDA
kernel's (torch >= 2.11), operation for operation; it reads ``lr``, the steps and GradScaler's tensors on the device,
so ``capturable`` groups fuse too. Every other case (other devices, ``differentiable``
groups, ``capturable`` ones on CPU, non-contiguous tensors, no C++ compiler, a ``backend``
without fused steps such as ``"torch"``) runs torch's own step for those groups and fastreg's
decay ops around it: the same composition, unfused.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _build, _calls, _dispatch, _plan, distributed
from ._dispatch import Coefficients
from .backends import Backend, get_backend

REGULARIZATION_KEYS = ("l1", "group_lasso", "group_dim")
CACHE_SIZE = 32
"""Work-layout tables kept per optimizer (one per param group and dtype in steady state)."""

# Cache kinds: graded (the key covers each tensor's .grad) and written, as csrc/planner.cpp's
# flags, with bits of their own above those so that an optimizer's tables never match a plan's.
_GRADED_WRITES = 3
_ADAM_KIND = _GRADED_WRITES | 64
_SGD_KIND = _GRADED_WRITES | 128


def _kernels():
    """The CPU extension's module (its planner binds the fused steps), or None without one."""
    return _build.planner()


def _check_fraction(name: str, value) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _check_nonnegative(name: str, value) -> float:
    value = float(value)
    if not value >= 0.0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


@dataclasses.dataclass
class _Bucket:
    """A bucket: the tensors of one dtype of a fused param group, and their tables."""

    dtype: torch.dtype
    backend: Backend
    """Whose fused kernel steps the bucket (see :meth:`_Fused._fusable`)."""
    positions: Optional[List[int]]
    """Positions among the group's tensors with a gradient (None: all of them)."""
    extents: Tensor
    tables: Dict[bool, Any] = dataclasses.field(default_factory=dict)
    """By row grouping, as fastreg._plan.Bucket.tables: built from the addresses the key holds,
    where the backend's kernels read them."""


_FALLBACK = "fallback"


@dataclasses.dataclass
class _Work:
    """One param group's step: checked (by ``_check``), then prepared (``_prepare``: its state
    made, its buckets planned); nothing written to its params yet."""

    index: int
    group: Dict[str, Any]
    params: List[Tensor]
    lists: Optional[List[List[Tensor]]]
    """Fused: the table's pointer rows after params and grads (the state); None until the
    state of a first step is made."""
    buckets: Optional[List[_Bucket]]
    """None: the group runs torch's step (the fallback)."""
    call: Optional[_calls.Call] = None
    """Fallback: the prepared call of fastreg's ops on the group's tensors with a gradient."""
    fresh: Optional[Tensor] = None
    """SGD: one flag per tensor whose momentum buffer is new (allocated for this step)."""
    fallback: bool = False
    """Runs torch's step (``buckets`` stays None)."""
    backend: Optional[Backend] = None
    """The fused kernel's backend, chosen when the group is checked (None: torch's step)."""
    found: Any = None
    key: Any = None
    """The plan cache's answer for the group's tensors and state: its buckets (or the fallback
    mark), else the key to cache them under."""


class _Fused:
    """What the fused optimizers share; mixed in before the torch optimizer class."""

    _kind: int

    # -- construction -------------------------------------------------------------------
    def _init_regularization(self, l1, group_lasso, group_dim, track_penalty, backend) -> None:
        coefs = _dispatch.make_coefficients(l1=l1, group_lasso=group_lasso, group_dim=group_dim)
        _dispatch.check_backend_name(backend)
        self.backend = backend
        self._regularization = {"l1": coefs.l1, "group_lasso": coefs.group_lasso, "group_dim": coefs.group_dim}
        self.track_penalty = bool(track_penalty)
        # A dict for the reason fastreg.Regularized gives: torch.compile replays dict mutations.
        self._log: Dict[str, Optional[Tensor]] = {"last_penalty": None}
        self._tables = None

    def _finish_init(self) -> None:
        self.defaults.update(self._regularization)
        # GradScaler hands the step grad_scale and found_inf instead of unscaling and checking
        # the gradients itself: the kernel unscales in its one pass and skips a step with an inf.
        self._step_supports_amp_scaling = True

    @property
    def last_penalty(self) -> Optional[Tensor]:
        """The penalty ``l1*|w|_1 + weight_decay/2*|w|^2 + group_lasso*sum_g |w_g|`` of the
        weights the last step started from, summed over param groups (``None`` before the first
        step, when nothing is regularized, or with ``track_penalty=False``); a tensor."""
        return self._log["last_penalty"]

    def _adopt(self, group: Dict[str, Any], index: int) -> None:
        """Fill in and check a group's regularization keys and its tensors."""
        for key in REGULARIZATION_KEYS:
            group.setdefault(key, self._regularization[key])
        name = f"param_groups[{index}]"
        for key in ("l1", "group_lasso"):
            group[key] = _dispatch.check_coefficient(f"{name}[{key!r}]", group[key])
        try:
            _dispatch.make_coefficients(group_dim=group["group_dim"])
        except ValueError as error:
            raise ValueError(f"{name}['group_dim']: {error}") from None
        _dispatch.check_tensors(group["params"], f"{name}['params']")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, Tensor):
            group["params"] = [params]
        elif params is not None and not isinstance(params, set):
            group["params"] = list(params)
        if params is not None and not isinstance(params, set):
            self._adopt(group, len(self.param_groups))
        super().add_param_group(group)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        defaults = self.defaults
        self.__dict__.setdefault("_regularization", {key: defaults.get(key) for key in REGULARIZATION_KEYS})
        self.__dict__.setdefault("track_penalty", True)
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("_log", {"last_penalty": None})
        self.__dict__.setdefault("_tables", None)
        self._step_supports_amp_scaling = True

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["_regularization"] = self._regularization
        state["track_penalty"] = self.track_penalty
        state["backend"] = self.backend
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a state dict of this class or of the torch optimizer of the same name; groups
        saved without fastreg's keys get this optimizer's defaults."""
        super().load_state_dict(state_dict)
        for index, group in enumerate(self.param_groups):
            self._adopt(group, index)
        self._tables = None

    # -- the step -------------------------------------------------------------------------
    def _coefficients(self, group: Dict[str, Any]) -> Coefficients:
        """The group's penalty: ``l1``, ``group_lasso`` and, as ``l2``, ``weight_decay``."""
        return Coefficients(l1=group["l1"], l2=_check_nonnegative("weight_decay", group["weight_decay"]),
                            group_lasso=group["group_lasso"], group_dim=group["group_dim"])

    def _update_decay(self, group: Dict[str, Any]) -> float:
        """The weight decay of torch's update (decoupled for AdamW, in the gradient otherwise)."""
        return _check_nonnegative("weight_decay", group["weight_decay"])

    def _prox_l2(self, coefs: Coefficients) -> float:
        """The multiplicative decay ``w *= 1 - lr*l2`` applied before the update (none here; a
        ``Regularized(mode="decoupled")`` step routed to this kernel has one)."""
        return 0.0

    def _check_group(self, group: Dict[str, Any], index: int) -> None:
        """Everything a step reads from a group, checked before any group is written."""
        name = f"param_groups[{index}]"
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if not lr.is_floating_point() or lr.numel() != 1:
                raise TypeError(f"{name}['lr'] given as a tensor must be one floating-point element, got {lr.dtype} "
                                f"of shape {tuple(lr.shape)}")
        else:
            _dispatch.check_coefficient(f"{name}['lr']", lr)
        _check_nonnegative(f"{name}['weight_decay']", group["weight_decay"])
        for key in ("l1", "group_lasso"):
            _dispatch.check_coefficient(f"{name}[{key!r}]", group[key])
        self._check_hyper(group, name)

    def _fusable(self, group: Dict[str, Any], params: List[Tensor], kernels) -> Optional[Backend]:
        """The backend whose fused kernel steps the group's params with a gradient, or None
        (torch's step and fastreg's decay ops). ``auto`` takes the backend fastreg's ops would
        on the params' device; one asked for by name that cannot run there is an error."""
        if kernels is None and _dispatch.requested_backend(self.backend)[0] == "auto":
            return None
        device = params[0].device
        backend = self._step_backend(params, device)
        if kernels is None or group.get("differentiable") or backend is None:
            return None
        if device.type == "cpu" and group.get("capturable"):
            return None  # torch's step says what capturable means on CPU
        return backend if _kernel_tensors(params, device) else None

    def _step_backend(self, params: List[Tensor], device: torch.device) -> Optional[Backend]:
        """The backend fastreg's ops take for ``params`` on ``device`` (one asked for by name
        that cannot run there is an error), where it has fused steps; else None."""
        backend = None
        for dtype in {p.dtype for p in params}:
            backend = _dispatch.backend_for(self.backend, device, dtype)
        return backend if _dispatch._has_step_ops(backend.name, device) else None

    def _check_grads(self, group: Dict[str, Any], index: int) -> None:
        name = f"param_groups[{index}]['params']"
        _dispatch.check_tensors(group["params"], name)
        for i, p in enumerate(group["params"]):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{name}[{i}].grad is sparse; {type(self).__name__} needs dense gradients")
        with_grad, grads, indices = _dispatch.grads_of(group["params"], name)
        # A DTensor's own address is no address: its local shard's is (FSDP2's params).
        _dispatch.check_no_overlap(distributed.local_tensors(with_grad), name, indices=indices)

    def _check(self, index: int, group: Dict[str, Any], kernels) -> Optional[_Work]:
        """One group's step, checked, with nothing written: every group is checked before any
        group's state is made or changed (:meth:`_prepare` does that)."""
        self._check_group(group, index)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        lists = self._state_lists(group, params)
        if lists is None:
            # The first step of these params: their state is made by _prepare.
            self._check_grads(group, index)
            backend = self._fusable(group, params, kernels)
            if backend is None:
                return self._fallback_work(index, group, params)
            return _Work(index, group, params, None, None, backend=backend)
        work = _Work(index, group, params, lists, None)
        if kernels is None:
            return self._fallback_work(index, group, params, lists)
        self._lookup(work, kernels)
        if work.found is None:
            self._check_grads(group, index)
            self._check_state(work, f"param_groups[{index}]")
            work.backend = self._fusable(group, params, kernels)
        return work

    def _lookup(self, work: _Work, kernels) -> None:
        """The plan cache's answer for the group's tensors and state, into ``work``."""
        if self._tables is None:
            self._tables = kernels.PlanCache(CACHE_SIZE)
        work.found, work.key = self._tables.lookup(work.params, self._kind, self._keyed(work))

    def _prepare(self, work: _Work, kernels) -> _Work:
        """A checked group's step, ready to run: its state made (or brought to the kernel's
        form) and its buckets planned."""
        if work.fallback:
            return work
        index, group, params = work.index, work.group, work.params
        if work.lists is None:
            self._init_state(group, params)
            work.lists = self._state_lists(group, params)
            self._lookup(work, kernels)
            if work.found is None:
                # State the group had in part (a hand-made or broken one), now completed.
                self._check_state(work, f"param_groups[{index}]")
        if work.found is None and self._normalize_state(work):
            self._lookup(work, kernels)
        found, key = work.found, work.key
        if found is None:
            if key is None or work.backend is None or not self._contiguous_state(work):
                found = _FALLBACK
            else:
                found = [_Bucket(dtype, work.backend, None if len(split) == 1 else positions,
                                 _plan.extents([params[i] for i in positions]))
                         for split in [_dispatch.split(params)] for _, dtype, positions in split]
            if key is not None:
                self._tables.put(key, found)
        if found is _FALLBACK:
            return self._fallback_work(index, group, params)
        work.buckets = found
        self._before_fused(work)
        return work

    def _keyed(self, work: _Work) -> List[List[Tensor]]:
        return work.lists

    def _before_fused(self, work: _Work) -> None:
        pass

    def _normalize_state(self, work: _Work) -> bool:
        """Bring state of another form to the kernel's (True when anything changed)."""
        return False

    def _contiguous_state(self, work: _Work) -> bool:
        return all(s is None or s.is_contiguous() for row in work.lists for s in row)

    def _check_state(self, work: _Work, name: str) -> None:
        """State tensors that match their params (a bad checkpoint could hold others)."""
        for row in work.lists:
            for i, (p, s) in enumerate(zip(work.params, row)):
                if s.shape != p.shape or s.dtype != p.dtype or s.device != p.device:
                    raise ValueError(f"{name}: state of the param with gradient {i} is {s.dtype} {tuple(s.shape)} on "
                                     f"{s.device}, but the param is {p.dtype} {tuple(p.shape)} on {p.device}")

    def _fallback_work(self, index: int, group: Dict[str, Any], params: List[Tensor],
                       lists: Optional[List[List[Tensor]]] = None) -> _Work:
        # torch's step checks tensors as it goes, after earlier groups are written.
        self._check_grads(group, index)
        if lists is not None:
            self._check_state(_Work(index, group, params, lists, None), f"param_groups[{index}]")
        call = None
        if not self._coefficients(group).is_zero():
            call = _calls.prepare(group["params"], self.backend, with_grads=True, writes_params=True,
                                  name=f"param_groups[{index}]['params']", devices=True)
        return _Work(index, group, params, [], None, call, fallback=True)

    def _table(self, work: _Work, bucket: _Bucket, rows: bool, kernels) -> Tensor:
        table = bucket.tables.get(rows)
        if table is not None:
            return table
        table = _layout(kernels, bucket.backend, work.params[0].device, bucket.extents, rows,
                        [work.params, [p.grad for p in work.params]] + work.lists, bucket.positions)
        bucket.tables[rows] = table
        return table

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step of every param group; with a closure, evaluates it first (with grad on)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            backends = self._compiled_backends()
            if backends is not None:
                self._compiled_step(backends)
                return loss
        kernels = _kernels()
        checked = [w for index, group in enumerate(self.param_groups) if (w := self._check(index, group, kernels)) is not None]
        works = [self._prepare(work, kernels) for work in checked]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        values = []
        fallback = [w for w in works if w.buckets is None]
        if fallback:
            values += self._fallback_step(fallback, grad_scale, found_inf)
        for work in works:
            if work.buckets is None:
                continue
            coefs = self._coefficients(work.group)
            track = self.track_penalty and not coefs.is_zero()
            rows = coefs.row_groups
            device = work.params[0].device
            for bucket in work.buckets:
                value = self._run(bucket.backend.step_ops(device), self._table(work, bucket, rows, kernels), bucket, work,
                                  coefs, track, grad_scale, found_inf)
                if track:
                    values.append(value)
            self._after_fused(work, found_inf)
        self._record_penalty(values)
        return loss

    def _after_fused(self, work: _Work, found_inf: Optional[Tensor]) -> None:
        pass

    def _record_penalty(self, values: List[Tensor]) -> None:
        if self.track_penalty:
            self._log["last_penalty"] = _dispatch.total(values, _dispatch.result_dtype(values), values[0].device) if values else None

    # -- under torch.compile ----------------------------------------------------------------
    _compiled_run: Optional[Callable] = None
    """The group's step as one custom op (``torch.ops.fastreg``), where the optimizer has one."""

    def _compiled_backends(self) -> Optional[List[Optional[str]]]:
        """Whether a traced step can be the fused op for every group, and with whose kernels:
        the backend of each group (None for one without gradients), chosen as ``_fusable``
        does for tensors the kernel takes; None when some group cannot. The answers are constants of
        the trace. Else the step runs as in eager mode, which breaks the graph at its plan cache."""
        if self._compiled_run is None or _dispatch._unavailable_reason("cpp", torch.device("cpu"), torch.float32) is not None:
            return None  # the CPU extension lays out every backend's tables
        if not self._compiled_state_ready():
            return None
        names = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                names.append(None)
                continue
            device = params[0].device
            # Not _fusable: Dynamo sets every group's "capturable" while it traces an optimizer.
            # Sharded params (FSDP2's DTensors) take the eager step, as their plan's key does.
            if group.get("differentiable") or distributed.any_dtensor(params) or not _kernel_tensors(params, device):
                return None
            backend = self._step_backend(params, device)
            if backend is None:
                return None
            names.append(backend.name)
        return names

    def _compiled_state_ready(self) -> bool:
        return True

    def _compiled_step(self, backends: List[Optional[str]]) -> None:
        """The step as torch.compile traces it: every group checked, then each group's state
        made (as torch's optimizers make theirs under compile) and its update run as one custom
        op of ``backends``' kernels, which lays out its table when it runs. The plan cache is
        host work on tensor addresses, which a graph cannot hold."""
        groups = []
        for index, (group, backend) in enumerate(zip(self.param_groups, backends)):
            self._check_group(group, index)
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                groups.append((group, params, backend))
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        values = []
        for group, params, backend in groups:
            self._init_state(group, params)
            coefs = self._coefficients(group)
            track = self.track_penalty and not coefs.is_zero()
            value = self._compiled_run(group, params, self._state_lists(group, params), coefs, track, grad_scale,
                                       found_inf, backend)
            if track:
                values.append(value)
        self._record_penalty(values)

    def _fallback_step(self, works: List[_Work], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> List[Tensor]:
        """torch's step for these groups, with fastreg's penalty before and prox after it."""
        values = []
        for work in works:
            coefs = self._coefficients(work.group)
            if self.track_penalty and work.call is not None:
                values.append(_calls.value(work.call, coefs))
        skipped = found_inf is not None and bool(found_inf.item())
        if skipped:
            return values
        # torch's fused groups take GradScaler's tensors themselves; the others are given
        # unscaled gradients, as the fused kernels compute them.
        if grad_scale is not None:
            for work in works:
                if not work.group.get("fused"):
                    torch._foreach_div_([p.grad for p in work.params], grad_scale)
        saved_groups = self.param_groups
        saved = {name: self.__dict__[name] for name in ("grad_scale", "found_inf") if name in self.__dict__}
        unfused = [w.group for w in works if not w.group.get("fused")]
        fused = [w.group for w in works if w.group.get("fused")]
        torch_step = _unhooked(super().step)
        try:
            for groups, scaling in ((unfused, False), (fused, True)):
                if not groups:
                    continue
                self.param_groups = groups
                for name in ("grad_scale", "found_inf"):
                    self.__dict__.pop(name, None)
                if scaling:
                    self.__dict__.update(saved)
                torch_step()
        finally:
            self.param_groups = saved_groups
            for name in ("grad_scale", "found_inf"):
                self.__dict__.pop(name, None)
            self.__dict__.update(saved)
        for work in works:
            if work.call is not None:
                coefs = self._coefficients(work.group)
                _calls.decay(work.call, work.group["lr"], coefs.replace(l2=0.0))
        return values


def _unhooked(step: Callable) -> Callable:
    """A bound torch ``step`` without the hook wrapper torch.optim.Optimizer puts on a class's
    step (our own step runs the hooks once)."""
    func = getattr(step, "__func__", step)
    while getattr(func, "hooked", False):
        func = func.__wrapped__
    return func.__get__(step.__self__) if hasattr(step, "__self__") else func


def _kernel_tensors(params: List[Tensor], device: torch.device = torch.device("cpu")) -> bool:
    """Whether a fused kernel takes these params (with a gradient) and their gradients: all
    contiguous, on ``device``."""
    return all(p.device == device and p.is_contiguous() and p.grad.is_contiguous() and p.grad.device == device
               for p in params)


def _layout(kernels, backend: Backend, device: torch.device, extents: Tensor, row_groups: bool,
            rows: List[List[Tensor]], positions: Optional[List[int]]):
    """A fused step's work-layout table where ``backend``'s kernels on ``device`` read it: the
    layout of ``extents`` with its limits, and an address row per list of ``rows`` (params,
    grads, then the state), each restricted to ``positions`` (None: every tensor)."""
    chunk, max_groups = backend.layout_limits(device)
    table = kernels.layout(extents, row_groups, len(rows), chunk, max_groups)
    for r, row in enumerate(rows):
        kernels.set_ptrs(table, r, row if positions is None else [row[i] for i in positions])
    return backend.table_to_device(table, device)


def _over_buckets(op: str, rows: Dict[str, List[Tensor]], row_groups: bool, backend: str, run: Callable) -> Tensor:
    """The body of a fused step op: ``rows`` (params, grads, then the state, each one tensor per
    param: a float32 scalar for ``steps``) checked, laid out per dtype bucket as the eager step's
    tables for ``backend``'s kernels, and ``run(ops, table, dtype, positions)`` on each, with
    ``ops`` the backend's step ops; the total of the values it returns."""
    kernels = _kernels()
    torch._check(kernels is not None, lambda: f"fastreg::{op} needs the CPU extension: {_build.cpu_unavailable_reason()}")
    params = rows["params"]
    device = params[0].device if params else torch.device("cpu")
    ops = get_backend(backend).step_ops(device)
    torch._check(ops is not None, lambda: f"fastreg::{op}: backend {backend!r} has no fused steps on {device}")
    for name, row in rows.items():
        torch._check(len(row) == len(params), lambda: f"fastreg::{op}: {len(row)} {name} for {len(params)} params")
        for i, (p, t) in enumerate(zip(params, row)):
            if name == "steps":
                torch._check(t.dtype == torch.float32 and t.numel() == 1 and t.device == p.device,
                             lambda: f"fastreg::{op}: steps[{i}] must be a float32 scalar on {p.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
            else:
                torch._check(t.shape == p.shape and t.dtype == p.dtype and t.device == p.device and t.is_contiguous(),
                             lambda: f"fastreg::{op}: {name}[{i}] is {t.dtype} {tuple(t.shape)} on {t.device}, not a "
                             f"contiguous tensor like params[{i}] ({p.dtype} {tuple(p.shape)} on {p.device})")
    values = []
    for _, dtype, positions in _dispatch.split(params):
        table = _layout(kernels, get_backend(backend), device, _plan.extents([params[i] for i in positions]),
                        row_groups, list(rows.values()), positions)
        value = run(ops, table, dtype, positions)
        if value is not None:
            values.append(value)
    return _dispatch.total(values, _dispatch.result_dtype(params), device)


def _penalty_like(params: List[Tensor]) -> Tensor:
    return torch.empty((), dtype=_dispatch.result_dtype(params), device=params[0].device if params else "cpu")


@torch.library.custom_op("fastreg::adam_step_", device_types=("cpu", "cuda"),
                         mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "max_exp_avg_sqs"))
def _adam_step_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                  steps: List[Tensor], max_exp_avg_sqs: List[Tensor], lr: float, lr_tensor: Optional[Tensor],
                  beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
                  maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor], l1: float, l2: float,
                  group_lasso: float, penalty_l2: float, row_groups: bool, track: bool, backend: str) -> Tensor:
    """One fused Adam/AdamW step of a param group over tensor lists (the kernel of the eager
    step, ``backend``'s), for torch.compile; returns the penalty of the starting weights (0 without
    ``track``). The states are torch's fused ones (``steps``: float32 scalars); grads are
    written only when unscaled by ``grad_scale``, as torch's fused step does. ``l2`` decays the
    weights before the update, ``l1`` and ``group_lasso`` are the proximal maps after it (by
    rows with ``row_groups``), ``penalty_l2`` is the L2 term of the penalty."""
    rows = dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    if amsgrad:
        rows["max_exp_avg_sqs"] = max_exp_avg_sqs
    return _over_buckets("adam_step_", rows, row_groups, backend, lambda ops, table, dtype, positions: ops.adam_step_(
        table, dtype, lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale,
        found_inf, l1, l2, group_lasso, penalty_l2, track))


@_adam_step_op.register_fake
def _(params, *args, **kwargs):
    return _penalty_like(params)


@torch.library.custom_op("fastreg::sgd_step_", device_types=("cpu", "cuda"), mutates_args=("params", "grads", "momentum_buffers"))
def _sgd_step_op(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], first: Optional[Tensor],
                 lr: float, lr_tensor: Optional[Tensor], momentum: float, dampening: float, weight_decay: float,
                 nesterov: bool, maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor], l1: float,
                 l2: float, group_lasso: float, penalty_l2: float, row_groups: bool, track: bool,
                 backend: str) -> Tensor:
    """One fused SGD step of a param group over tensor lists, for torch.compile, as
    ``adam_step_``; ``momentum_buffers`` is empty without momentum, and ``first`` flags the
    buffers that are new (they start as the gradient)."""
    rows = dict(params=params, grads=grads)
    if momentum != 0.0:
        rows["momentum_buffers"] = momentum_buffers

    def run(ops, table, dtype, positions):
        flags = None if first is None else first[positions]
        return ops.sgd_step_(table, dtype, lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize,
                                 flags, grad_scale, found_inf, l1, l2, group_lasso, penalty_l2, track)

    return _over_buckets("sgd_step_", rows, row_groups, backend, run)


@_sgd_step_op.register_fake
def _(params, *args, **kwargs):
    return _penalty_like(params)


def _kernel_step(step, param: Tensor) -> bool:
    """Whether an Adam step count is in the fused kernels' form: a float32 scalar tensor on
    the param's device."""
    return isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == param.device and step.dim() == 0


def _lr_args(lr) -> Tuple[float, Optional[Tensor]]:
    return (0.0, lr.reshape(())) if isinstance(lr, Tensor) else (float(lr), None)


class _AdamFused(_Fused):
    _kind = _ADAM_KIND

    def _check_hyper(self, group: Dict[str, Any], name: str) -> None:
        beta1, beta2 = group["betas"]
        _check_fraction(f"{name}['betas'][0]", beta1)
        _check_fraction(f"{name}['betas'][1]", beta2)
        _check_nonnegative(f"{name}['eps']", group["eps"])

    def _state_lists(self, group: Dict[str, Any], params: List[Tensor]) -> Optional[List[List[Tensor]]]:
        # .get: the state is a defaultdict, and reading it must not make entries.
        states = [self.state.get(p, {}) for p in params]
        try:
            lists = [[s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states]]
            if group["amsgrad"]:
                lists.append([s["max_exp_avg_sq"] for s in states])
        except KeyError:
            return None
        return lists

    def _init_state(self, group: Dict[str, Any], params: List[Tensor]) -> None:
        for p in params:
            s = self.state[p]
            # torch's fused step's state: a float32 step on the param's device.
            s.setdefault("step", torch.zeros((), dtype=torch.float32, device=p.device))
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
                s.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))

    def _normalize_state(self, work: _Work) -> bool:
        changed = False
        for p, step in zip(work.params, work.lists[2]):
            if not _kernel_step(step, p):
                # A step of torch's unfused optimizers (float64 where the default dtype is
                # float64, on the CPU for CUDA params, a number in old checkpoints): the same
                # count, where the kernel reads it.
                self.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
                changed = True
        if changed:
            work.lists[:] = self._state_lists(work.group, work.params)
        return changed

    def _check_state(self, work: _Work, name: str) -> None:
        super()._check_state(dataclasses.replace(work, lists=work.lists[:2] + work.lists[3:]), name)

    def _compiled_state_ready(self) -> bool:
        # Steps of another form (see _normalize_state) are brought to the kernel's by an eager
        # step, which reads them on the host.
        for group in self.param_groups:
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if step is not None and not _kernel_step(step, p):
                    return False
        return True

    def _arguments(self, group: Dict[str, Any], coefs: Coefficients) -> Dict[str, Any]:
        """The kernel's settings of a group, as ``adam_step_`` (the planner's and the op) takes them."""
        beta1, beta2 = group["betas"]
        lr, lr_tensor = _lr_args(group["lr"])
        return dict(lr=lr, lr_tensor=lr_tensor, beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=self._update_decay(group),
                    decoupled=bool(group.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW))),
                    amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]), l1=coefs.l1,
                    l2=self._prox_l2(coefs), group_lasso=coefs.group_lasso, penalty_l2=coefs.l2)

    def _run(self, ops, table, bucket, work, coefs, track, grad_scale, found_inf) -> Tensor:
        return ops.adam_step_(table, bucket.dtype, grad_scale=grad_scale, found_inf=found_inf, track=track,
                              **self._arguments(work.group, coefs))

    def _compiled_run(self, group, params, lists, coefs, track, grad_scale, found_inf, backend) -> Tensor:
        return torch.ops.fastreg.adam_step_(params, [p.grad for p in params], lists[0], lists[1], lists[2],
                                            lists[3] if group["amsgrad"] else [], grad_scale=grad_scale,
                                            found_inf=found_inf, row_groups=coefs.row_groups, track=track,
                                            backend=backend, **self._arguments(group, coefs))


class AdamW(_AdamFused, torch.optim.AdamW):
    """``torch.optim.AdamW`` with L1 and group-lasso proximal terms, fused on CPU and CUDA.

    Args: torch's (``params``, ``lr`` (a number or a one-element tensor), ``betas``, ``eps``,
    ``weight_decay`` (decoupled), ``amsgrad``, ``maximize``, and the rest by keyword), plus:
        l1, group_lasso: default strengths for param groups without their own ``"l1"`` /
            ``"group_lasso"`` keys; after each update, weights are soft-thresholded by
            ``lr*l1`` and each group shrunk by ``max(0, 1 - lr*group_lasso/|w_g|)``.
        group_dim: ``None`` (each tensor is one group-lasso group) or ``0`` (each slice along
            dim 0 of a tensor with two or more dims); a group key too.
        track_penalty: keep the penalty of each step's starting weights in
            :attr:`last_penalty`; the fused kernel sums it in the same pass.
        backend: ``"auto"`` (``cpp`` on CPU, ``triton`` then ``cuda`` on CUDA), a backend
            name, or ``None`` for ``FASTREG_BACKEND``'s; one without fused steps (``"torch"``,
            ``"reference"``) runs the composition with that backend's decay ops.

    See :mod:`fastreg.fused_optim` for when the fused kernel runs.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 l1: float = 0.0, group_lasso: float = 0.0, group_dim: Optional[int] = None,
                 track_penalty: bool = True, backend: Optional[str] = None, **options) -> None:
        self._init_regularization(l1, group_lasso, group_dim, track_penalty, backend)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **options)
        self._finish_init()


class Adam(_AdamFused, torch.optim.Adam):
    """``torch.optim.Adam`` (``weight_decay`` added to the gradient) with L1 and group-lasso
    proximal terms, fused on CPU and CUDA; the arguments are :class:`AdamW`'s."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 l1: float = 0.0, group_lasso: float = 0.0, group_dim: Optional[int] = None,
                 track_penalty: bool = True, backend: Optional[str] = None, **options) -> None:
        self._init_regularization(l1, group_lasso, group_dim, track_penalty, backend)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **options)
        self._finish_init()


class SGD(_Fused, torch.optim.SGD):
    """``torch.optim.SGD`` (``momentum``, ``dampening``, ``nesterov``, ``weight_decay`` added to
    the gradient) with L1 and group-lasso proximal terms, fused on CPU and CUDA; the regularization
    arguments are :class:`AdamW`'s."""

    _kind = _SGD_KIND

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 l1: float = 0.0, group_lasso: float = 0.0, group_dim: Optional[int] = None,
                 track_penalty: bool = True, backend: Optional[str] = None, **options) -> None:
        self._init_regularization(l1, group_lasso, group_dim, track_penalty, backend)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, **options)
        self._finish_init()

    def _check_hyper(self, group: Dict[str, Any], name: str) -> None:
        momentum = _check_nonnegative(f"{name}['momentum']", group["momentum"])
        dampening = float(group["dampening"])
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{name}: nesterov needs a positive momentum and zero dampening, got "
                             f"momentum={momentum} dampening={dampening}")

    def _state_lists(self, group: Dict[str, Any], params: List[Tensor]) -> Optional[List[List[Tensor]]]:
        if group["momentum"] == 0:
            return []
        # A missing buffer is made by _before_fused (or torch's step): no state to init here.
        return [[self.state.get(p, {}).get("momentum_buffer") for p in params]]

    def _init_state(self, group: Dict[str, Any], params: List[Tensor]) -> None:
        pass

    def _keyed(self, work: _Work) -> List[List[Tensor]]:
        # New buffers are made after the lookup; a list with one missing has no key (a miss).
        return [[b for b in row if b is not None] for row in work.lists]

    def _check_state(self, work: _Work, name: str) -> None:
        rows = [[b for b in row if b is not None] for row in work.lists]
        params = [p for p, b in zip(work.params, work.lists[0]) if b is not None] if work.lists else []
        super()._check_state(dataclasses.replace(work, params=params, lists=rows), name)

    def _before_fused(self, work: _Work) -> None:
        if not work.lists or all(b is not None for b in work.lists[0]):
            return
        row = work.lists[0]
        work.fresh = torch.tensor([b is None for b in row], dtype=torch.bool)
        # Zeros, not garbage: the Triton kernel reads a new buffer before it selects the gradient.
        row[:] = [torch.zeros_like(p, memory_format=torch.preserve_format) if b is None else b
                  for p, b in zip(work.params, row)]
        # Tables hold addresses: the new buffers need new ones, made once (this key has none).
        for bucket in work.buckets:
            bucket.tables.clear()

    def _after_fused(self, work: _Work, found_inf: Optional[Tensor]) -> None:
        if work.fresh is None:
            return
        # A step GradScaler skipped leaves the new buffers unwritten: they are not state yet.
        if found_inf is not None and bool(found_inf.item()):
            return
        for p, b in zip(work.params, work.lists[0]):
            self.state[p]["momentum_buffer"] = b

    def _arguments(self, group: Dict[str, Any], coefs: Coefficients) -> Dict[str, Any]:
        """The kernel's settings of a group, as ``sgd_step_`` (the planner's and the op) takes them."""
        lr, lr_tensor = _lr_args(group["lr"])
        return dict(lr=lr, lr_tensor=lr_tensor, momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                    weight_decay=self._update_decay(group), nesterov=bool(group["nesterov"]),
                    maximize=bool(group["maximize"]), l1=coefs.l1, l2=self._prox_l2(coefs),
                    group_lasso=coefs.group_lasso, penalty_l2=coefs.l2)

    def _run(self, ops, table, bucket, work, coefs, track, grad_scale, found_inf) -> Tensor:
        first = work.fresh
        if first is not None and bucket.positions is not None:
            first = first[bucket.positions]
        return ops.sgd_step_(table, bucket.dtype, first=first, grad_scale=grad_scale, found_inf=found_inf,
                             track=track, **self._arguments(work.group, coefs))

    def _compiled_state_ready(self) -> bool:
        # A step GradScaler skips must not keep new buffers (_after_fused reads found_inf on the
        # host): the first step of such buffers under a scaler runs eagerly.
        if getattr(self, "found_inf", None) is None:
            return True
        return all(group["momentum"] == 0 or all(p.grad is None or "momentum_buffer" in self.state.get(p, {})
                                                 for p in group["params"])
                   for group in self.param_groups)

    def _compiled_run(self, group, params, lists, coefs, track, grad_scale, found_inf, backend) -> Tensor:
        buffers, first = [], None
        if lists:
            fresh = [b is None for b in lists[0]]
            # Zeros, as in _before_fused.
            buffers = [torch.zeros_like(p, memory_format=torch.preserve_format) if b is None else b
                       for p, b in zip(params, lists[0])]
            if any(fresh):
                first = torch.tensor(fresh, dtype=torch.bool)
        value = torch.ops.fastreg.sgd_step_(params, [p.grad for p in params], buffers, first, grad_scale=grad_scale,
                                            found_inf=found_inf, row_groups=coefs.row_groups, track=track,
                                            backend=backend, **self._arguments(group, coefs))
        for p, b in zip(params, buffers):
            self.state[p]["momentum_buffer"] = b
        return value


class NotFused(Exception):
    """A param group no fused kernel can step (no C++ extension, a device or backend without
    one, a ``capturable`` group on CPU, non-contiguous tensors): the caller runs the unfused
    composition."""


class _Routed:
    """``Regularized(optimizer, mode="decoupled")``'s step as one fused kernel: a view of the
    wrapped torch optimizer (its ``param_groups`` and ``state`` themselves, read at every step)
    whose terms are Regularized's: ``l2`` decays the weights before the update, ``l1`` and
    ``group_lasso`` are the proximal maps after it, and the penalty is theirs alone; the torch
    optimizer's own ``weight_decay`` stays in its update, as in the composition."""

    def __init__(self, optimizer: torch.optim.Optimizer, coefficients: Callable[[Dict[str, Any]], Coefficients],
                 log: Dict[str, Any], backend: Optional[str]):
        self._inner = optimizer
        self.backend = backend
        self._coefficients_of = coefficients
        self._log = log
        self._tables = None
        self.track_penalty = True

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self._inner.param_groups

    @property
    def state(self):
        return self._inner.state

    def _coefficients(self, group: Dict[str, Any]) -> Coefficients:
        return self._coefficients_of(group)


    def _prox_l2(self, coefs: Coefficients) -> float:
        return coefs.l2

    def _fallback_work(self, *args, **kwargs) -> _Work:
        raise NotFused

    def _check_grads(self, group: Dict[str, Any], index: int) -> None:
        # Sharded params (DTensors) need global group norms: the composition's distributed ops.
        if distributed.any_dtensor(group["params"]):
            raise NotFused
        super()._check_grads(group, index)

    def fused_step(self, track_penalty: bool) -> None:
        """One step of every param group, fused; raises :class:`NotFused`, before anything is
        written, when a group cannot be."""
        inner = self._inner
        # Hooks of the inner optimizer, and wrappers put on its step (an LR scheduler built on
        # it counts its steps that way), run only around its own step.
        if inner._optimizer_step_pre_hooks or inner._optimizer_step_post_hooks or "step" in vars(inner):
            raise NotFused
        # The kernel is torch's fused implementation, operation for operation: only where that
        # is the one asked for does routing leave every update as it was (unregularized params
        # included; torch's default implementation rounds some differently, by an ulp).
        if not all(group.get("fused") for group in inner.param_groups):
            raise NotFused
        # Regularized's own check of its keys, as its composition makes it: before anything
        # (state included) is touched.
        for group in inner.param_groups:
            self._coefficients(group)
        self.track_penalty = track_penalty
        _Fused.step(self)


class _RoutedAdamW(_Routed, AdamW):
    pass


class _RoutedAdam(_Routed, Adam):
    pass


class _RoutedSGD(_Routed, SGD):
    pass


_ROUTES = {torch.optim.AdamW: _RoutedAdamW, torch.optim.Adam: _RoutedAdam, torch.optim.SGD: _RoutedSGD}


def routed(optimizer: torch.optim.Optimizer, coefficients: Callable[[Dict[str, Any]], Coefficients],
           log: Dict[str, Any], backend: Optional[str] = None) -> Optional[_Routed]:
    """The fused step of ``Regularized(optimizer, mode="decoupled")`` when ``optimizer`` is
    exactly torch's AdamW, Adam or SGD (a subclass may change the update) with ``fused=True``
    groups; else None. ``coefficients``: Regularized's terms of a param group, checked;
    ``backend``: Regularized's."""
    route = _ROUTES.get(type(optimizer))
    return None if route is None else route(optimizer, coefficients, log, backend)


__all__ = ["Adam", "AdamW", "NotFused", "SGD"]
