"""Multi-tensor addressing for the Triton kernels: one device-side table per parameter list.

A launch covers every tensor of a (device, dtype) group, whatever their count and sizes.
Each program handles one *work item*, a run of at most :data:`CHUNK` contiguous elements of
one tensor, and finds it through a table of ``int64`` words on the tensors' device::

    ptrs[L, T]      base addresses (``data_ptr()``) of the T tensors of each of the L lists
                    (params; params and grads), loaded and cast with
                    ``.to(tl.pointer_type(DTYPE))`` in the kernels
    offsets[T]      element offset of each tensor in their concatenation (penalty backward
                    writes one flat buffer)
    items[W, 4]     per work item: tensor index, first element, element count, segment
    seg_first[S+1]  the items of segment s are ``seg_first[s] : seg_first[s + 1]``

A *segment* is a group of the penalty: a whole tensor, or with ``group_dim=0`` one slice
``w[i]`` of a tensor with two or more dimensions (a contiguous run of ``numel / shape[0]``
elements). Items never straddle segments, so per-item partial sums reduce to per-segment
sums, in item order, without atomics (:mod:`.triton_norms`).

The table is the only host-to-device copy of the backend. It is built once per parameter
list and kept in a small LRU cache keyed on what its words are a function of: the device,
dtype, grouping, chunk size, every tensor's ``data_ptr()`` and ``numel()`` (and, for row
groups, its number of rows). A tensor replaced, re-allocated or resized changes the key,
so a stale table is never used; a call with a cached table copies nothing to the device
and can be captured in a CUDA graph (warm the cache with one call before capturing).
Identity (``id``) is deliberately not part of the key: the table holds addresses, not
objects, so it is valid for any tensor at those addresses with those sizes. Grads that
are freed and re-allocated every step (``zero_grad(set_to_none=True)``) usually come back
at the same addresses from PyTorch's caching allocator; when they do not, the table is
rebuilt (one small copy).

Kernels need contiguous memory. Non-contiguous tensors are staged through contiguous
copies (written back by the ops that write them); a list that needs staging gets a fresh,
uncached table, since the copies live at new addresses on every call.
"""
import collections
import dataclasses
import itertools
import struct
import threading
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _STATE

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""Whether the ``@triton.jit`` kernels of this package run under the CPU interpreter
(fixed when they are defined, see :func:`fastreg.kernels.interpreted`)."""
_STATE["interpreted"] = INTERPRETED

BLOCK = 1024
"""Elements a program handles per vector step."""

CHUNK = 64 * BLOCK
"""Elements per work item (one program), a multiple of :data:`BLOCK`: apex's chunk size.
Read when a table is built, so tests can shrink it to reach chunk boundaries cheaply."""

CACHE_SIZE = 64
"""Tables kept per process (least recently used dropped first)."""


def _rows(t: Tensor) -> int:
    """Segments of ``t`` when segments are rows."""
    return t.shape[0] if t.dim() >= 2 else 1


TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

# Column of each field in a row of the work map (``items[W, 4]``).
ITEM_TENSOR = tl.constexpr(0)
ITEM_START = tl.constexpr(1)
ITEM_LEN = tl.constexpr(2)
ITEM_SEG = tl.constexpr(3)


# ---------------------------------------------------------------------------------------
# Device helpers shared by the kernel families
# ---------------------------------------------------------------------------------------


def device_function(fn):
    """``triton.jit`` for helpers called from kernels (compiled, they are inlined).

    Under the interpreter a helper stays a plain Python function: the interpreter
    re-patches ``triton.language`` on every call of a jitted helper (about 0.3 ms, most
    of an interpreted run's time), and the calling kernel has patched it already.
    """
    return fn if INTERPRETED else triton.jit(fn)


@device_function
def scalar(bits, ACC: tl.constexpr):
    """A host float passed as the int64 bits of an fp64, read in the accumulate dtype.

    Triton passes Python floats as fp32; fp64 parameters need their coefficients in full
    fp64, and fp32 ones need them rounded once from the exact value, as PyTorch does.
    Kernels list these arguments in ``do_not_specialize``, so a new learning rate never
    compiles a new variant.
    """
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)


@device_function
def sign(x):
    """``torch.sign``: -1, 0 or 1, and 0 for NaN (both comparisons are false)."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@device_function
def sqrt_rn(x):
    """Correctly rounded square root (``tl.sqrt`` is approximate for fp32 on GPUs)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@device_function
def div_rn(x, y):
    """Correctly rounded division (Triton's ``/`` may be approximate for fp32)."""
    if y.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@device_function
def load_item(items, pid):
    """``(tensor, first element, element count, segment)`` of work item ``pid``, all int64."""
    row = items + pid * 4
    return (
        tl.load(row + ITEM_TENSOR),
        tl.load(row + ITEM_START),
        tl.load(row + ITEM_LEN),
        tl.load(row + ITEM_SEG),
    )


@device_function
def tensor_base(ptrs, tensor, DTYPE: tl.constexpr):
    """Typed base pointer of ``tensor`` from a row of the pointer table."""
    return tl.load(ptrs + tensor).to(tl.pointer_type(DTYPE))


# ---------------------------------------------------------------------------------------
# Host side: building and caching tables
# ---------------------------------------------------------------------------------------


def f64_bits(x: float) -> int:
    """The bits of ``x`` as an fp64, for :func:`scalar`."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def accumulate_tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclasses.dataclass(frozen=True)
class Table:
    """A built table: views of one device tensor, plus the sizes launches need."""

    data: Tensor
    ptrs: Tuple[Tensor, ...]  # one row of T addresses per list
    offsets: Tensor
    items: Tensor
    seg_first: Tensor
    num_tensors: int
    num_items: int
    num_segments: int
    numel: int


class TableCache:
    """Bounded LRU of :class:`Table` objects, with counters for tests and diagnostics."""

    def __init__(self, size: int):
        self.size = size
        self.builds = 0
        self.hits = 0
        self._tables: "collections.OrderedDict[tuple, Table]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, lists: Sequence[Sequence[Tensor]], rows: bool, cache: bool = True) -> Table:
        """The table of ``lists`` (equal-length lists of contiguous tensors, params first);
        ``rows``: one segment per ``w[i]`` of tensors with two or more dimensions."""
        params = lists[0]
        key = (
            params[0].device,
            params[0].dtype,
            rows,
            CHUNK,
            tuple(itertools.chain.from_iterable(map(Tensor.data_ptr, lst) for lst in lists)),
            tuple(map(Tensor.numel, params)),
            tuple(map(_rows, params)) if rows else None,
        )
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                self.hits += 1
                return table
        table = _build(lists, rows)
        with self._lock:
            self.builds += 1
            if cache:
                self._tables[key] = table
                while len(self._tables) > self.size:
                    self._tables.popitem(last=False)
        return table

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self.builds = self.hits = 0

    def __len__(self) -> int:
        return len(self._tables)


TABLES = TableCache(CACHE_SIZE)


def _build(lists: Sequence[Sequence[Tensor]], rows: bool) -> Table:
    params = lists[0]
    device = params[0].device
    numels = torch.tensor([t.numel() for t in params], dtype=torch.int64)
    if rows:
        segs_per_tensor = torch.tensor([_rows(t) for t in params], dtype=torch.int64)
    else:
        segs_per_tensor = torch.ones(len(params), dtype=torch.int64)
    # A tensor with zero segments (shape[0] == 0) has no elements either.
    seg_len_of_tensor = numels // segs_per_tensor.clamp_min(1)

    num_tensors = len(params)
    seg_tensor = torch.repeat_interleave(torch.arange(num_tensors), segs_per_tensor)
    first_seg_of_tensor = torch.cumsum(segs_per_tensor, 0) - segs_per_tensor
    seg_rank = torch.arange(len(seg_tensor)) - first_seg_of_tensor[seg_tensor]
    seg_len = seg_len_of_tensor[seg_tensor]
    seg_start = seg_rank * seg_len

    items_per_seg = (seg_len + CHUNK - 1) // CHUNK
    seg_first = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(items_per_seg, 0)])
    item_seg = torch.repeat_interleave(torch.arange(len(seg_tensor)), items_per_seg)
    item_rank = torch.arange(len(item_seg)) - seg_first[item_seg]
    item_start = seg_start[item_seg] + item_rank * CHUNK
    item_len = torch.minimum(seg_len[item_seg] - item_rank * CHUNK, torch.tensor(CHUNK))
    items = torch.stack([seg_tensor[item_seg], item_start, item_len, item_seg], dim=1)

    offsets = torch.cumsum(numels, 0) - numels
    ptrs = torch.tensor([[t.data_ptr() for t in lst] for lst in lists], dtype=torch.int64)
    host = torch.cat([ptrs.reshape(-1), offsets, items.reshape(-1), seg_first])
    data = host.to(device)

    sections = [num_tensors] * len(lists) + [num_tensors, items.numel(), seg_first.numel()]
    *ptr_rows, offsets_d, items_d, seg_first_d = data.split(sections)
    return Table(
        data=data,
        ptrs=tuple(ptr_rows),
        offsets=offsets_d,
        items=items_d,
        seg_first=seg_first_d,
        num_tensors=num_tensors,
        num_items=len(item_seg),
        num_segments=len(seg_tensor),
        numel=int(numels.sum()),
    )


class Staged:
    """Contiguous stand-ins for lists of tensors, written back on :meth:`write_back`."""

    def __init__(self, *lists: Sequence[Tensor]):
        self.originals = lists
        self.copied = not all(all(map(Tensor.is_contiguous, lst)) for lst in lists)
        if self.copied:
            self.lists = [[t if t.is_contiguous() else t.contiguous() for t in lst] for lst in lists]
        else:
            self.lists = lists

    def table(self, rows: bool) -> Table:
        return TABLES.get(self.lists, rows, cache=not self.copied)

    def write_back(self, which: int) -> None:
        """Copy the staged list ``which`` into the originals it stands in for."""
        if self.copied:
            for staged, original in zip(self.lists[which], self.originals[which]):
                if staged is not original:
                    original.copy_(staged)


def segment_mode(group_lasso: float, group_dim: Optional[int]) -> bool:
    """Whether segments are rows: only group lasso over ``group_dim=0`` needs them."""
    return bool(group_lasso) and group_dim == 0


def cache_stats() -> Dict[str, int]:
    """Counters of the table cache: tables held, built and reused."""
    return {"tables_cached": len(TABLES), "table_builds": TABLES.builds, "table_hits": TABLES.hits}
