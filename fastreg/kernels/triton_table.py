"""The work layout of ``csrc/plan.h`` where the Triton kernels read it, and the pass every
item kernel makes over it.

A call's table is the one the C++ planner builds (``planner.layout`` + ``planner.set_ptrs``):
one int64 tensor of words, a header of counts and section offsets, the tensors' addresses (one
row per list: params; params and grads), each tensor's groups, every group's
(tensor, first element, element count, first item) and every work item's
(first group, end group, element offset, element count). The kernels read all of it on the
device, header included, so a launch takes the table and a few scalars whatever the tensor
count, and the host does O(1) work per call: no Python per tensor, and no copy to the device
once the table is there.

One program per work item (:func:`item_pass`): for each run of the item (the piece of a split
group, or each whole group of a packed item) it finds the run's tensor through the address
row, then walks the run in blocks of :data:`BLOCK` elements. A run whose addresses are 16-byte
aligned and whose length is a whole number of 16-byte vectors takes the *aligned* path, an
unmasked loop over its full blocks and one masked tail, with the alignment proven to the
compiler so that every global access is 128 bits wide; any other run takes the *general*
path, masked element by element. Both paths compute the same values in the same order per
lane, so which one a run takes never changes a result.

Per-group sums go to a per-call workspace: a packed group's sums whole, a split group's per
item; the finalize program (:mod:`.triton_norms`) combines them in item order, so results
depend only on the layout, never on scheduling.

Loops whose trip count comes from the table are ``while`` loops: Triton 3.6's interpreter
cannot turn such a count into a ``range`` bound under NumPy >= 2.4 (a loaded scalar is a
one-element array there), and a ``while`` compiles to the same loop.

Host side: :func:`to_device` (pinned memory, a ``non_blocking`` copy, no synchronization),
:class:`on_device` (the table's device made current for the launches, and the table kept alive
for the stream they run on), and the tables of the list ops (:class:`TableCache`, built by the
same planner), which ``torch.compile``'d code and non-contiguous tensors use.
"""
import collections
import dataclasses
import struct
import threading
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _STATE
from .. import _build

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""Whether the ``@triton.jit`` kernels of this package run under the CPU interpreter
(fixed when they are defined, see :func:`fastreg.kernels.interpreted`)."""
_STATE["interpreted"] = INTERPRETED

BLOCK = 1024
"""Elements a program handles per step: with :data:`NUM_WARPS` warps, 8 per thread, two
128-bit loads of fp32 (one of fp16/bf16) per tensor read."""

BLOCKS = {torch.float16: BLOCK, torch.bfloat16: BLOCK, torch.float32: BLOCK, torch.float64: BLOCK // 4}
"""The step of each dtype: fp64 takes a quarter as many elements (16 bytes per thread, one
128-bit load per tensor read). Half as many (the 32 bytes per thread of fp32) spilled in the
gradient kernel with sums on sm_90 under Triton 3.8: fp64 doubles every accumulator's registers."""

NUM_WARPS = 4

CHUNK = 64 * BLOCK
"""Elements per work item of the layout the kernels are given (apex's chunk): large enough
that per-item overhead vanishes, small enough to spread a model over every SM. A multiple of
every step, so the items of a split group all start aligned when the group does."""

MAX_GROUPS = 16
"""Most groups packed into one item. Each group costs its program a few dependent table loads
and a block-wide reduction; a bound keeps lists of many tiny tensors (or rows) spread over many
programs instead of a few long serial ones."""

LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
"""Options of every launch. No multiply-add contraction: the kernels fuse exactly where the
CPU kernels do (``tl.fma``), so a result does not change with Triton's default."""

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

ACCUMULATE = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}
"""Accumulate dtype of each parameter dtype: fp64 for fp64, fp32 otherwise."""

# csrc/plan.h: Header, GroupField and ItemField.
H_TENSORS = tl.constexpr(0)
H_GROUPS = tl.constexpr(1)
H_ITEMS = tl.constexpr(2)
H_LISTS = tl.constexpr(3)
H_CHUNK = tl.constexpr(4)
H_ROW_GROUPS = tl.constexpr(6)
H_NUMEL = tl.constexpr(7)
H_PTRS_AT = tl.constexpr(8)
H_GROUPS_AT = tl.constexpr(10)
H_ITEMS_AT = tl.constexpr(11)
H_WORDS = tl.constexpr(12)
HEADER_WORDS = 16
GROUP_TENSOR = tl.constexpr(0)
GROUP_START = tl.constexpr(1)
GROUP_LEN = tl.constexpr(2)
GROUP_ITEM = tl.constexpr(3)
GROUP_WORDS = tl.constexpr(4)
ITEM_GROUP = tl.constexpr(0)
ITEM_GROUP_END = tl.constexpr(1)
ITEM_OFFSET = tl.constexpr(2)
ITEM_LEN = tl.constexpr(3)
ITEM_WORDS = tl.constexpr(4)

# What an item pass does with each block (item_pass's OP).
OP_SUMS = tl.constexpr(0)
OP_GRAD = tl.constexpr(1)
OP_DECAY = tl.constexpr(2)


# ---------------------------------------------------------------------------------------
# Device helpers
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
    Kernels annotate these arguments ``tl.int64`` and list them in ``do_not_specialize``,
    so a new value (even 0.0, whose bits would fit an int32) never compiles a new variant.
    """
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)


@device_function
def scalar_arg(ptr, bits, ACC: tl.constexpr):
    """A one-element tensor's value in ``ACC``: loaded from ``ptr`` on the device, or, with
    ``ptr`` None, the host value the launcher read from a CPU tensor (as :func:`scalar`)."""
    if ptr is None:
        return scalar(bits, ACC)
    else:
        return tl.load(ptr).to(ACC)


@device_function
def sqrt_rn(x):
    """Correctly rounded square root (``tl.sqrt`` is approximate for fp32 on GPUs)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@device_function
def reciprocal(x):
    """``1 / x`` correctly rounded (Triton's fp32 ``/`` may be approximate); ``x`` > 0."""
    if x.dtype == tl.float32:
        return tl.div_rn(tl.full(x.shape, 1, tl.float32), x)
    else:
        return 1 / x


@device_function
def counter_of(ws):
    """The int32 at the start of a call's workspace: finalize programs done so far."""
    return ws.to(tl.pointer_type(tl.int32))


@device_function
def gradient(x, scale, l1, HAS_L1: tl.constexpr, HAS_W: tl.constexpr, FUSED: tl.constexpr):
    """``dP/dw = l1 * sign(w) + w * scale`` in the CPU kernels' operation order: the sign
    term by selection (exactly ``+-l1`` or 0, 0 for NaN), the ``w`` term fused into it with
    one rounding where they fuse it (no group lasso: ``scale`` is ``l2``)."""
    if HAS_L1:
        d = tl.where(x > 0, l1, tl.where(x < 0, -l1, 0.0))
    else:
        d = tl.zeros(x.shape, x.dtype)
    if HAS_W:
        if FUSED:
            d = tl.fma(x, scale, d)
        else:
            d = d + x * scale
    return d


@device_function
def decayed(x, factor, threshold, HAS_L2: tl.constexpr, HAS_L1: tl.constexpr):
    """Steps 1 and 2 of the decay: ``w * (1 - lr*l2)``, then the soft threshold
    ``sign(w) * max(|w| - lr*l1, 0)`` (a NaN stays NaN)."""
    if HAS_L2:
        x = x * factor
    if HAS_L1:
        shrunk = tl.abs(x) - threshold
        shrunk = tl.where(shrunk < 0, 0.0, shrunk)
        x = tl.where(x < 0, -shrunk, shrunk)
    return x


@device_function
def block_step(
    w_ptrs, d_ptrs, mask, abs_acc, sq_acc, scale, c0, c1, c2,
    DTYPE: tl.constexpr, ACC: tl.constexpr, OP: tl.constexpr, SUMS: tl.constexpr,
    HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, HAS_GL: tl.constexpr,
    TO_OUT: tl.constexpr, DECAYED: tl.constexpr,
):
    """One block of a run (``mask`` None: a full block). Constants by ``OP``: sums with
    ``DECAYED``, and decay: ``c0 = 1 - lr*l2``, ``c1 = lr*l1``, ``scale`` the group's
    shrink; gradient: ``c0 = l1``, ``c2 = grad_output``, ``scale = l2 (+ gl/||w_g||)``."""
    if mask is None:
        x = tl.load(w_ptrs).to(ACC)
    else:
        x = tl.load(w_ptrs, mask=mask, other=0).to(ACC)
    if OP == OP_GRAD:
        d = gradient(x, scale, c0, HAS_L1, HAS_L2 or HAS_GL, not HAS_GL)
        if TO_OUT:
            d = d * c2
        elif mask is None:
            d = tl.load(d_ptrs).to(ACC) + d
        else:
            d = tl.load(d_ptrs, mask=mask, other=0).to(ACC) + d
        if mask is None:
            tl.store(d_ptrs, d.to(DTYPE))
        else:
            tl.store(d_ptrs, d.to(DTYPE), mask=mask)
    elif OP == OP_DECAY:
        x = decayed(x, c0, c1, HAS_L2, HAS_L1)
        if HAS_GL:
            x = x * scale
        if mask is None:
            tl.store(w_ptrs, x.to(DTYPE))
        else:
            tl.store(w_ptrs, x.to(DTYPE), mask=mask)
    elif DECAYED:
        x = decayed(x, c0, c1, HAS_L2, HAS_L1)
        if mask is not None:
            # padding must add nothing, even where the decay turns 0 into NaN (an infinite lr)
            x = tl.where(mask, x, 0.0)
    if SUMS:
        abs_acc += tl.abs(x)
        sq_acc = tl.fma(x, x, sq_acc)
    return abs_acc, sq_acc


@device_function
def item_of(table):
    """Work item ``program_id(0)`` of ``table``: ``(pid, tensors, groups, slots, ptrs,
    g, g_end, item)``. ``slots`` counts the workspace's sums of each kind (groups + items),
    ``ptrs`` is the address rows' first word, ``[g, g_end)`` the item's groups, and ``item``
    the words :func:`run_of` reads."""
    pid = tl.program_id(0).to(tl.int64)
    num_groups = tl.load(table + H_GROUPS)
    words = table + tl.load(table + H_ITEMS_AT) + pid * ITEM_WORDS
    return (
        pid, tl.load(table + H_TENSORS), num_groups, num_groups + tl.load(table + H_ITEMS),
        table + tl.load(table + H_PTRS_AT), tl.load(words + ITEM_GROUP), tl.load(words + ITEM_GROUP_END),
        (table + tl.load(table + H_GROUPS_AT), tl.load(table + H_CHUNK), tl.load(words + ITEM_OFFSET),
         tl.load(words + ITEM_LEN)),
    )


@device_function
def run_of(item, g):
    """The run of group ``g`` in ``item`` (from :func:`item_of`): ``(tensor, first element,
    length, split)``, the whole group or the item's piece of a group longer than a chunk
    (``split``)."""
    groups, chunk, offset, item_len = item
    row = groups + g * GROUP_WORDS
    length = tl.load(row + GROUP_LEN)
    split = length > chunk
    start = tl.load(row + GROUP_START) + tl.where(split, offset, 0)
    length = tl.where(split, item_len, length)
    return tl.load(row + GROUP_TENSOR), start, length, split


@device_function
def store_sums(ws, slots, num_groups, g, pid, split, abs_acc, sq_acc, ABS: tl.constexpr):
    """A run's sums into the workspace: ``ws[1 + slot]`` (``ABS``: ``sum |x|``) and
    ``ws[1 + slots + slot]`` (``sum x^2``), ``slot`` the group for a whole group and
    ``groups + item`` for a piece of a split one."""
    slot = 1 + tl.where(split, num_groups + pid, g)
    if ABS:
        tl.store(ws + slot, tl.sum(abs_acc, 0))
    tl.store(ws + slots + slot, tl.sum(sq_acc, 0))


@device_function
def item_pass(
    table, ws, scales, out, c0, c1, c2,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, OP: tl.constexpr,
    SUMS: tl.constexpr, ABS: tl.constexpr, HAS_L1: tl.constexpr, HAS_L2: tl.constexpr,
    HAS_GL: tl.constexpr, TO_OUT: tl.constexpr, DECAYED: tl.constexpr,
):
    """Work item ``program_id(0)`` of ``table``: :func:`block_step` over every run, reading
    pointer row 0 and, for ``OP_GRAD``, writing row 1 (``TO_OUT``: the addresses in ``out``,
    one int64 per tensor, instead; the table stays one list, so it is cached whatever the
    outputs' addresses). ``scales[g]``: the per-group factor (``HAS_GL``).
    With ``SUMS``, each run's ``sum |x|`` (``ABS``) and ``sum x^2`` go to the workspace
    ``ws``: ``ws[1 + slot]`` and ``ws[1 + groups + items + slot]``, where ``slot`` is the
    group for a whole group and ``groups + item`` for a piece of a split one."""
    ES: tl.constexpr = DTYPE.primitive_bitwidth // 8
    VEC: tl.constexpr = 16 // ES
    pid, num_tensors, num_groups, slots, ptrs, g, g_end, item = item_of(table)
    lanes = tl.arange(0, BLOCK)
    while g < g_end:
        tensor, start, length, split = run_of(item, g)
        w_addr = tl.load(ptrs + tensor) + start * ES
        aligned = (w_addr % 16 == 0) & (length % VEC == 0)
        if OP == OP_GRAD:
            if TO_OUT:
                d_addr = tl.load(out + tensor) + start * ES
            else:
                d_addr = tl.load(ptrs + num_tensors + tensor) + start * ES
            aligned = aligned & (d_addr % 16 == 0)
            if HAS_GL:
                scale = tl.load(scales + g)
            else:
                scale = c1
        elif HAS_GL:
            scale = tl.load(scales + g)
        else:
            scale = c1
        abs_acc = tl.zeros([BLOCK], ACC)
        sq_acc = tl.zeros([BLOCK], ACC)
        if aligned:
            # The same addresses, computed so that their alignment is visible to the compiler
            # (and only here: the hint is true on this path alone).
            w = tl.multiple_of(((w_addr // 16) * 16).to(tl.pointer_type(DTYPE)), 16)
            d = w
            if OP == OP_GRAD:
                d = tl.multiple_of(((d_addr // 16) * 16).to(tl.pointer_type(DTYPE)), 16)
            full = length // BLOCK
            b = 0
            while b < full:
                at = b * BLOCK + lanes
                abs_acc, sq_acc = block_step(
                    w + at, d + at, None, abs_acc, sq_acc, scale, c0, c1, c2,
                    DTYPE, ACC, OP, SUMS, HAS_L1, HAS_L2, HAS_GL, TO_OUT, DECAYED,
                )
                b += 1
            if full * BLOCK < length:
                at = full * BLOCK + lanes
                abs_acc, sq_acc = block_step(
                    w + at, d + at, at < (length // VEC) * VEC, abs_acc, sq_acc, scale, c0, c1, c2,
                    DTYPE, ACC, OP, SUMS, HAS_L1, HAS_L2, HAS_GL, TO_OUT, DECAYED,
                )
        else:
            w = w_addr.to(tl.pointer_type(DTYPE))
            d = w
            if OP == OP_GRAD:
                d = d_addr.to(tl.pointer_type(DTYPE))
            k = 0
            while k < length:
                at = k + lanes
                abs_acc, sq_acc = block_step(
                    w + at, d + at, at < length, abs_acc, sq_acc, scale, c0, c1, c2,
                    DTYPE, ACC, OP, SUMS, HAS_L1, HAS_L2, HAS_GL, TO_OUT, DECAYED,
                )
                k += BLOCK
        if SUMS:
            store_sums(ws, slots, num_groups, g, pid, split, abs_acc, sq_acc, ABS)
        g += 1


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------


def f64_bits(x: float) -> int:
    """The bits of ``x`` as an fp64, for :func:`scalar`."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def accumulate_tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclasses.dataclass(frozen=True, eq=False)
class Table:
    """A layout table where the kernels read it, with the header counts launches need."""

    data: Tensor
    """The table's int64 words on ``device``."""
    device: torch.device
    tensors: int
    groups: int
    items: int
    lists: int
    row_groups: bool
    numel: int
    stream: int
    """The CUDA stream the table was copied on (0 on the CPU): launches on another stream
    record it there, so its memory outlives every kernel that reads it."""


def to_device(host: Tensor, device: torch.device) -> Table:
    """The table ``host`` (built by the planner) on ``device``, without synchronizing: for a
    GPU, a pinned copy and a ``non_blocking`` transfer on the device's current stream (the
    pinned block is not reused before that transfer has run)."""
    header = host[:HEADER_WORDS].tolist()
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            data = host.pin_memory().to(device, non_blocking=True)
            stream = torch.cuda.current_stream(device).cuda_stream
    else:
        data, stream = host, 0
    return Table(
        data=data,
        device=device,
        tensors=header[H_TENSORS.value],
        groups=header[H_GROUPS.value],
        items=header[H_ITEMS.value],
        lists=header[H_LISTS.value],
        row_groups=bool(header[H_ROW_GROUPS.value]),
        numel=header[H_NUMEL.value],
        stream=stream,
    )


class on_device:
    """The context of a call's launches on ``table``: its device current (Triton launches on
    the current device's current stream, whatever the tensors' device), and, on a stream
    other than the one the table was copied on, the table recorded for that stream."""

    __slots__ = ("table", "guard")

    def __init__(self, table: Table):
        self.table = table
        self.guard = None

    def __enter__(self) -> Table:
        table = self.table
        if table.device.type == "cuda":
            self.guard = torch.cuda.device(table.device)
            self.guard.__enter__()
            stream = torch.cuda.current_stream(table.device)
            if stream.cuda_stream != table.stream:
                table.data.record_stream(stream)
        return table

    def __exit__(self, *exc) -> None:
        if self.guard is not None:
            self.guard.__exit__(*exc)


def workspace(table: Table, acc: torch.dtype, programs: int) -> Tensor:
    """A call's scratch in ``acc``: the finalize counter (an int32 in word 0), the sums of
    every group and split item, ``|x|`` then ``x^2``, and three partial sums per finalize
    program. The first item pass zeroes the counter: nothing is filled on the host."""
    return torch.empty(1 + 2 * (table.groups + table.items) + 3 * programs, dtype=acc, device=table.device)


def device_scalar(t: Tensor, table: Table, acc: torch.dtype):
    """``(pointer, bits)`` of a one-element tensor for :func:`scalar_arg`: the tensor itself
    (in ``acc``) on the table's device; a CPU tensor's value read on the host, which involves
    no GPU; a tensor on another GPU copied over without blocking."""
    if t.device != table.device:
        if t.device.type == "cpu":
            return None, f64_bits(t.item())
        t = t.to(table.device, non_blocking=True)
    if t.dtype != acc:
        t = t.to(acc)
    return t, 0


# ---------------------------------------------------------------------------------------
# Tables of the list ops (torch.compile, non-contiguous tensors)
# ---------------------------------------------------------------------------------------


def _rows(t: Tensor) -> int:
    return t.shape[0] if t.dim() >= 2 else 1


def build(lists: Sequence[Sequence[Tensor]], rows: bool) -> Table:
    """The planner's table of ``lists`` (equal-length lists of contiguous tensors, params
    first) on their device."""
    planner = _build.planner()
    if planner is None:
        raise RuntimeError(f"fastreg's triton backend needs the C++ planner: {_build.cpu_unavailable_reason()}")
    params = lists[0]
    extents = torch.tensor([(t.numel(), _rows(t)) for t in params], dtype=torch.long).reshape(-1, 2)
    host = planner.layout(extents, rows, len(lists), CHUNK, MAX_GROUPS)
    for row, tensors in enumerate(lists):
        planner.set_ptrs(host, row, list(tensors))
    return to_device(host, params[0].device)


class TableCache:
    """Bounded LRU of the list ops' tables, keyed on what a table's words are a function of:
    the device, dtype, grouping, layout limits and every tensor's address and size."""

    def __init__(self, size: int):
        self.size = size
        self.builds = 0
        self.hits = 0
        self._tables: "collections.OrderedDict[tuple, Table]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, lists: Sequence[Sequence[Tensor]], rows: bool, cache: bool = True) -> Table:
        params = lists[0]
        key = (
            params[0].device,
            params[0].dtype,
            rows,
            CHUNK,
            MAX_GROUPS,
            tuple(Tensor.data_ptr(t) for lst in lists for t in lst),
            tuple(map(Tensor.numel, params)),
            tuple(map(_rows, params)) if rows else None,
        )
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                self.hits += 1
                return table
        table = build(lists, rows)
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


CACHE_SIZE = 64
"""List-op tables kept per process (least recently used dropped first)."""

TABLES = TableCache(CACHE_SIZE)


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
        """The table of the staged lists: cached unless it addresses fresh copies."""
        return TABLES.get(self.lists, rows, cache=not self.copied)

    def write_back(self, which: int) -> None:
        """Copy the staged list ``which`` into the originals it stands in for."""
        if self.copied:
            for staged, original in zip(self.lists[which], self.originals[which]):
                if staged is not original:
                    original.copy_(staged)


def row_groups(group_lasso: float, group_dim: Optional[int]) -> bool:
    """Whether groups are rows: only group lasso over ``group_dim=0`` needs them."""
    return bool(group_lasso) and group_dim == 0

