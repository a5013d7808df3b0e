"""Plans: a call's tensor list checked, split and laid out once, then reused while it holds.

A *plan* is everything a fastreg call over a tensor list works out before it computes: every
tensor checked (dtype, layout, device, the ``.grad`` of each), the tensors the call works on
(all, or those with a ``.grad``), their (device, dtype) buckets and each bucket's backend, the
check that tensors written in place share no memory, and, for kernel backends, each bucket's
work-layout table (``csrc/plan.h``: which elements of which tensor each work item covers, with
the tensors' addresses), built once and kept on the device the kernels read it from.

Plans are cached per (backend choice, kind of call) under a key of the tensor list: each
tensor's object, address, element count, dtype, device, contiguity and rows, and its ``.grad``'s
where the call writes grads. Everything a plan holds is a function of those words, so a plan
is reused only for a list it is exactly right for, and a tensor replaced, re-allocated, resized
or re-dtyped, a ``.grad`` set, swapped or freed, or a list reordered gives another key and a
new plan. With the C++ planner (part of the ``cpp`` extension), the key is computed by one C++
pass over the list: a call with a cached plan runs no Python code per tensor. A list of over 768
tensors is compared with a cached key on torch's intra-op threads (``torch.get_num_threads()``),
a block of 256 tensors at a time: the comparison mostly waits for memory, and each core keeps its
own cache misses in flight. Without the C++ planner (no compiler), a Python key does the same work
more slowly.

A list that the C++ pass does not settle (an element that is not a plain dense tensor, a bad
dtype or gradient, written tensors whose address ranges intersect) goes to the Python planner
here, which raises the error naming the tensor, or accepts what the fast pass could not decide
(interleaved views that share no element). Sharded tensors (DTensors) are never keyed: their
plan says so (``sharded``) and :mod:`fastreg.distributed` takes the call.

Under ``torch.compile`` nothing is cached: the Python planner runs at trace time and the
compiled graph calls each backend's list ops (custom ops with fake kernels).
"""
from __future__ import annotations

import collections
import dataclasses
import operator
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _build, _dispatch
from .backends import Backend

# Kinds of call: flags, as the C++ planner's (csrc/planner.cpp).
_WRITES = 1
_GRADED = 2
_WRITES_GRADS = 4
READ = 0
"""A call that reads its tensors (norms, value, penalty)."""
WRITES_PARAMS = _WRITES
"""A call that writes its tensors in place (decay)."""
WRITES_GRADS = _GRADED | _WRITES_GRADS
"""A call that reads the tensors with a ``.grad`` and writes those grads (coupled gradient)."""
WRITES_GRADED = _GRADED | _WRITES
"""A call that writes the tensors that have a ``.grad`` (an optimizer's decoupled decay)."""

CACHE_SIZE = 32
"""Plans kept per (backend choice, kind of call), least recently used dropped first. A training
loop uses one or two lists per call site; a cache this size holds every param group of a
large optimizer."""

_GRAD = operator.attrgetter("grad")


def _picker(positions: Optional[Sequence[int]]) -> Callable[[Sequence[Tensor]], List[Tensor]]:
    """A function taking the elements at ``positions`` of a sequence, as a list, with no Python
    code per element (None: all of them)."""
    if positions is None:
        return list
    positions = list(positions)
    if len(positions) == 0:
        return lambda seq: []
    if len(positions) == 1:
        get = operator.itemgetter(positions[0])
        return lambda seq: [get(seq)]
    get = operator.itemgetter(*positions)
    return lambda seq: list(get(seq))


@dataclasses.dataclass
class Bucket:
    """A bucket: the tensors of one (device, dtype) of a plan, and the backend that computes them."""

    backend: Backend
    device: torch.device
    dtype: torch.dtype
    positions: Optional[List[int]]
    """Positions of this bucket's tensors among the plan's used tensors (None: all of them, in order)."""
    contiguous: bool
    """Whether every tensor (and written grad) is contiguous: only then can kernels run from a
    cached table; other buckets stage copies through the backend's list ops on every call."""
    extents: Optional[Tensor]
    """int64 [n, 2]: each tensor's element count and rows, what the work layout is built from."""
    pick: Callable[[Sequence[Tensor]], List[Tensor]] = dataclasses.field(repr=False, default=list)
    tables: Dict[bool, Tensor] = dataclasses.field(repr=False, default_factory=dict)
    """Work-layout tables by row grouping, on the device the backend's kernels read them from."""

    def table(self, row_groups: bool, tensors: Sequence[Tensor], grads: Optional[Sequence[Tensor]]) -> Tensor:
        """This bucket's work layout (row groups for group lasso over ``group_dim=0``) with the
        addresses of ``tensors`` (and ``grads``), built now and kept in ``tables``: a plan
        applies only to tensors at the addresses it was keyed on."""
        planner = _build.planner()
        chunk, max_groups = self.backend.layout_limits(self.device)
        host = planner.layout(self.extents, row_groups, 1 if grads is None else 2, chunk, max_groups)
        planner.set_ptrs(host, 0, list(tensors))
        if grads is not None:
            planner.set_ptrs(host, 1, list(grads))
        table = self.tables[row_groups] = self.backend.table_to_device(host, self.device)
        return table


@dataclasses.dataclass
class Plan:
    """What a call over one tensor list works out once; see the module docstring."""

    kind: int
    name: str
    count: int
    """How many tensors the list has."""
    used: Optional[List[int]]
    """Positions in the list of the tensors the call works on (None: all of them)."""
    buckets: List[Bucket]
    result_dtype: torch.dtype
    device: torch.device
    sharded: bool = False
    pick: Callable[[Sequence[Tensor]], List[Tensor]] = dataclasses.field(repr=False, default=list)

    def tensors(self, tensors: Sequence[Tensor]) -> List[Tensor]:
        """The tensors of the call's list that the call works on."""
        return self.pick(tensors)


# ---------------------------------------------------------------------------------------------
# Building a plan


def _buckets_of(tensors: List[Tensor], split: List[Tuple[torch.device, torch.dtype, List[int], bool]],
                extents: Optional[Tensor], backend: Optional[str]) -> List[Bucket]:
    whole = len(split) == 1
    buckets = []
    for device, dtype, positions, contiguous in split:
        chosen = _dispatch.backend_for(backend, device, dtype)
        if extents is None or not chosen.runs_tables(device):
            bucket_extents = None
        elif whole:
            bucket_extents = extents
        else:
            bucket_extents = extents[torch.tensor(positions, dtype=torch.long)]
        buckets.append(Bucket(
            backend=chosen,
            device=device,
            dtype=dtype,
            positions=None if whole else positions,
            contiguous=contiguous,
            extents=bucket_extents,
            pick=_picker(None if whole else positions),
        ))
    return buckets


def _finish(kind: int, name: str, tensors: List[Tensor], used: Optional[List[int]], buckets: List[Bucket]) -> Plan:
    dtype = torch.float64 if any(b.dtype == torch.float64 for b in buckets) else torch.float32
    device = buckets[0].device if buckets else (tensors[0].device if tensors else torch.device("cpu"))
    return Plan(kind=kind, name=name, count=len(tensors), used=used, buckets=buckets, result_dtype=dtype, device=device,
                pick=_picker(used))


def _from_scan(scan: dict, kind: int, name: str, tensors: List[Tensor], backend: Optional[str], devices: bool) -> Plan:
    """A plan from the C++ planner's first-sight pass (``csrc/planner.cpp``)."""
    used = scan["used"].tolist()
    if len(used) == len(tensors):
        used = None
    split = [(device, dtype, members.tolist(), contiguous) for device, dtype, members, contiguous in scan["buckets"]]
    if not devices:
        _dispatch.single_device([device for device, _, _, _ in split], name)
    return _finish(kind, name, tensors, used, _buckets_of(tensors, split, scan["extents"], backend))


def extents(tensors: Sequence[Tensor]) -> Tensor:
    """The work layout's view of tensors: int64 [T, 2] of numel and rows (shape[0] of 2+-d tensors, else 1)."""
    return torch.tensor([(t.numel(), t.shape[0] if t.dim() >= 2 else 1) for t in tensors], dtype=torch.long).reshape(-1, 2)


def _python_plan(kind: int, name: str, tensors: List[Tensor], backend: Optional[str], devices: bool) -> Plan:
    """The Python planner: every check with its error message, for lists the C++ pass leaves
    to it, for every list where the C++ planner is not built, and while ``torch.compile`` traces."""
    _dispatch.check_tensors(tensors, name)
    from . import distributed

    if distributed.any_dtensor(tensors):
        used = [i for i, t in enumerate(tensors) if t.grad is not None] if kind & _GRADED else None
        return Plan(kind=kind, name=name, count=len(tensors), used=used, buckets=[], sharded=True,
                    result_dtype=_dispatch.result_dtype(tensors), device=tensors[0].device, pick=_picker(used))
    used = None
    grads = None
    chosen = tensors
    if kind == WRITES_GRADS:
        chosen, grads, used = _dispatch.grads_of(tensors, name)
    elif kind & _GRADED:
        used = [i for i, t in enumerate(tensors) if t.grad is not None]
        chosen = [tensors[i] for i in used]
    if used is not None and len(used) == len(tensors):
        used = None
    split = _dispatch.split(chosen)
    if not devices:
        _dispatch.single_device([device for device, _, _ in split], name)
    if kind == WRITES_GRADS:
        _dispatch.check_no_overlap(grads, name, ".grad", used)
    elif kind & _WRITES:
        _dispatch.check_no_overlap(chosen, name, indices=used)
    with_contiguity = []
    for device, dtype, positions in split:
        contiguous = all(chosen[i].is_contiguous() for i in positions)
        if grads is not None:
            contiguous = contiguous and all(grads[i].is_contiguous() for i in positions)
        with_contiguity.append((device, dtype, positions, contiguous))
    sizes = None if torch.compiler.is_compiling() or _build.planner_if_loaded() is None else extents(chosen)
    return _finish(kind, name, tensors, used, _buckets_of(chosen, with_contiguity, sizes, backend))


# ---------------------------------------------------------------------------------------------
# Caches


class _PythonKeyCache:
    """The cache where the C++ planner is not built: the same key, computed in Python."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._plans: "collections.OrderedDict[tuple, Plan]" = collections.OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def _key(tensors: List[Tensor], kind: int) -> Optional[tuple]:
        # The C++ key's words (csrc/planner.cpp), through C-level maps over the list.
        if not all(type(t) in (Tensor, torch.nn.Parameter) and t.layout == torch.strided and not t.is_meta for t in tensors):
            return None
        words = [kind, len(tensors), tuple(map(id, tensors)), tuple(map(Tensor.data_ptr, tensors)),
                 tuple(map(Tensor.size, tensors)), tuple(map(Tensor.stride, tensors)),
                 tuple(map(operator.attrgetter("dtype", "device"), tensors))]
        if kind & _GRADED:
            grads = list(map(_GRAD, tensors))
            if not all(g is None or type(g) is Tensor for g in grads):
                return None
            words.append(tuple((id(g), g.data_ptr(), g.size(), g.stride(), g.dtype, g.device) if g is not None else None
                               for g in grads))
        return tuple(words)

    def lookup(self, tensors: List[Tensor], kind: int):
        key = self._key(tensors, kind)
        if key is None:
            return None, None
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            self.hits += 1
            return plan, None
        self.misses += 1
        return None, key

    def put(self, key: tuple, plan: Plan) -> None:
        self._plans[key] = plan
        while len(self._plans) > self.capacity:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


_caches: Dict[Tuple[str, int, bool], object] = {}
_caches_lock = threading.Lock()


def _cache(backend: str, kind: int):
    planner = _build.planner_if_loaded()
    key = (backend, kind, planner is not None)
    cache = _caches.get(key)
    if cache is None:
        with _caches_lock:
            cache = _caches.get(key)
            if cache is None:
                cache = planner.PlanCache(CACHE_SIZE) if planner is not None else _PythonKeyCache(CACHE_SIZE)
                _caches[key] = cache
    return cache


def clear() -> None:
    """Drop every cached plan (and the tables they hold)."""
    with _caches_lock:
        for cache in _caches.values():
            cache.clear()


def stats() -> Dict[str, int]:
    """Plans cached, and lookups that found one or not, over every cache."""
    caches = list(_caches.values())
    return {"plans": sum(map(len, caches)), "hits": sum(c.hits for c in caches), "misses": sum(c.misses for c in caches)}


def plan(tensors: List[Tensor], backend: Optional[str], kind: int, name: str = "params", devices: bool = False) -> Plan:
    """The plan of a call of ``kind`` over ``tensors`` (a list) with ``backend`` (a name, or None
    for ``FASTREG_BACKEND`` / ``auto``): cached, or built and cached. ``devices``: the tensors
    may span devices (an optimizer's param group); a functional call refuses that."""
    backend, origin = _dispatch.requested_backend(backend)
    _dispatch.check_backend_name(backend, origin)
    if torch.compiler.is_compiling():
        return _python_plan(kind, name, tensors, backend, devices)
    _build.prepare_planner(backend)
    cache = _cache(backend, kind | (8 if devices else 0))
    found, key = cache.lookup(tensors, kind)
    if found is not None:
        return found
    planner = _build.planner_if_loaded()
    scan = planner.scan(tensors, kind) if planner is not None and key is not None else None
    if scan is not None:
        built = _from_scan(scan, kind, name, tensors, backend, devices)
    else:
        built = _python_plan(kind, name, tensors, backend, devices)
    if key is not None and not built.sharded:
        cache.put(key, built)
    return built
