// CUDA kernels for the fastreg ops: the torch.ops.fastreg list ops (schemas in ops.cpp, CPU
// twin in fastreg_cpu.cpp), the table ops of a plan (fastreg/_plan.py, through
// cuda_bindings.cpp) and the fused optimizer steps over a table (CPU twin in fastreg_optim.cpp).
//
// Every op walks the work layout of plan.h from a copy of its table in device memory: thread
// blocks take work items (an item's whole groups, or one piece of a split group) in a grid-
// stride loop, so one launch covers any number of tensors and elements, and nothing about the
// tensors travels in the kernel arguments. A plan's table is copied once (pinned memory, no
// wait); the list ops cache theirs by the tensors' addresses and extents, so a call with a cached
// table copies nothing and can be captured in a CUDA graph.
//
// Reductions are deterministic: every sum is taken in an order fixed by the layout and the
// block size (a compile-time constant), never by the grid size or scheduling, and without float
// atomics. An item's sums are written per item; one small finalize kernel then combines the
// pieces of each split group (a warp per group) and, for a value, all items' sums (fixed slots
// of items, each summed by one block, then the slots by the last block to finish). Group lasso
// needs each group's norm before its update, so those ops run a sums pass, the finalize (for
// split groups and the value) and an update pass, on the current stream.
//
// Elementwise math mirrors fastreg_cpu.cpp operation for operation, which products are fused
// included; the build passes --fmad=false so that nvcc fuses nothing the source does not. The
// optimizer updates are instead torch's CUDA fused Adam / AdamW / SGD, expression for expression
// and type for type, so that with fastreg's terms off a step gives torch's bits: torch builds
// those kernels with nvcc's default contraction, which turns each product that feeds an add
// into an fma, so the updates write those fmas out.
//
// All the ops share one walk: the item pass (ItemPass) hands each run of a group to the op's
// functor for one range, which loads, computes and stores its packs through walk_range; an op
// supplies that functor and says what its pass reduces.
#include "fastreg_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

// __grid_constant__ lets a kernel index a by-value argument in parameter space; without it,
// indexing it with a thread-dependent index copies all of it into local memory.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 11 || (__CUDACC_VER_MAJOR__ == 11 && __CUDACC_VER_MINOR__ >= 7)) && \
    (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700)
#define FASTREG_GRID_CONSTANT __grid_constant__
#else
#define FASTREG_GRID_CONSTANT
#endif

namespace fastreg {
namespace cuda {
namespace {

// Threads per block of the item kernels, fixed at compile time: which thread sums which
// elements, and so every rounding, depends on it. __launch_bounds__ asks for registers that let
// kMinBlocks such blocks share an SM (at most 128 per thread): the widest variants (fp64 Adam
// with amsgrad and the group shrink's sums) need about 120, and a tighter bound spills them to
// local memory. The launches then size their grids from the registers each variant really uses
// (the occupancy API), and the compile check in tests/test_cuda.py fails on any spill.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocks = 2;
constexpr int kFinalizeThreads = 256;
constexpr int kFinalizeWarps = kFinalizeThreads / 32;
// Items per finalize slot: each slot's sums are one block's, in a fixed order.
constexpr int64_t kSlotItems = 8 * kFinalizeThreads;
// Groups of at least kBlockGroup elements are summed by the whole block, one after the other;
// shorter ones by one warp each, and groups under a warp's width by one thread each.
constexpr int64_t kBlockGroup = 2048;
constexpr int64_t kWarpGroup = 32;
// Packs (16 bytes each) a thread loads before it uses any, to keep enough reads in flight: 4
// of 4- or 8-byte elements, 2 of 2-byte ones (16 elements, as many registers once widened to
// fp32 as 4 packs of fp32; 4 of them would need more registers than kMinBlocks blocks leave).
template <typename scalar_t>
constexpr int kUnroll = sizeof(scalar_t) == 2 ? 2 : 4;
constexpr unsigned kFullMask = 0xffffffffu;

// Ranges within one work item are indexed with 32-bit offsets.
constexpr int64_t kMaxChunk = int64_t{1} << 30;
static_assert(kMaxGroups >= 1 && kChunk >= kBlockGroup && kChunk <= kMaxChunk, "layout limits out of range");

// ---------------------------------------------------------------------------------------------
// Launch arguments

// Where a kernel finds the layout: the device words, with the offsets and counts of the host
// copy's header (the same words), so no block reads the header.
struct TableArgs {
  const int64_t* words;
  int64_t tensors;
  int64_t chunk;
  int64_t ptrs_at;
  int64_t groups_at;
  int64_t items_at;
  int64_t items;
  int64_t split_at;
  int64_t split_groups;

  __device__ __forceinline__ int64_t item_word(int64_t i, int64_t field) const {
    return __ldg(words + items_at + i * plan::kItemWords + field);
  }
  __device__ __forceinline__ int64_t group_word(int64_t g, int64_t field) const {
    return __ldg(words + groups_at + g * plan::kGroupWords + field);
  }
  template <typename T>
  __device__ __forceinline__ T* ptr(int64_t list, int64_t tensor) const {
    return reinterpret_cast<T*>(__ldg(words + ptrs_at + list * tensors + tensor));
  }
};

// Per-call scalars. A learning rate or grad_output held in a CUDA tensor is read by the kernels
// (lr_ptr / go_ptr), never copied to the host.
struct Params {
  double l1;
  double l2;
  double group_lasso;
  double lr;           // a float lr, or the value of a CPU lr tensor (lr_tensor)
  const void* lr_ptr;  // a CUDA lr tensor
  int lr_dtype;
  bool lr_tensor;  // lr is a tensor: it takes part in the arithmetic in the accumulate dtype
  double grad_output;
  const void* go_ptr;
  int go_dtype;
  bool decay;  // decay_: the sums pass sums thresholded weights, and the group scales shrink
};

// Per-call scalars of a fused optimizer step. `prox` carries the lr and fastreg's terms as the
// decay takes them (l2 before the update, the l1 threshold and group shrink after it); the rest
// are torch's hyperparameters, doubles as its fused ops take them (torch >= 2.11's fused Adam and
// SGD round each to opmath_t once).
struct StepParams {
  Params prox;
  double beta1;  // Adam
  double beta2;
  double eps;
  double momentum;  // SGD
  double dampening;
  double weight_decay;
  bool decoupled;  // AdamW
  bool maximize;
  bool nesterov;
  const float* grad_scale;  // GradScaler's scale: the gradients are divided by it, and stored so
  const float* found_inf;   // GradScaler's flag: nonzero skips the step (nothing is written)
  const bool* first;        // SGD, per tensor: its momentum buffer is new (it starts as the gradient)
};

// Pointer rows of the optimizer tables, as the CPU ops take them.
enum AdamRow : int64_t { kAdamParam = 0, kAdamGrad, kExpAvg, kExpAvgSq, kStep, kMaxExpAvgSq };
enum SgdRow : int64_t { kSgdParam = 0, kSgdGrad, kMomentumBuffer };

// Scratch arrays of one op call (nullptr: not needed by this call).
template <typename acc_t>
struct Workspace {
  acc_t* item_abs;     // per item: sum |w| of its elements
  acc_t* item_sq;      // per item: sum w^2
  acc_t* item_norm;    // per item: sum of the norms of its whole (not split) groups
  acc_t* group_scale;  // per group: the update pass's factor
  acc_t* tensor_abs;   // norms(): per-tensor outputs
  acc_t* tensor_sq;
  acc_t* split_norm;  // per split group: its norm
  acc_t* slots;       // finalize: 3 partial totals per slot of kSlotItems items
  unsigned int* ticket;  // finalize: blocks done
  acc_t* item_end_sq;  // optimizer steps, per item of a split group: its piece's sum of the
                       // updated w^2, which the group shrink's norm is taken from
  acc_t* step_size;    // Adam, per tensor: lr / bias_correction1 of its advanced step
  acc_t* bias2_sqrt;   // Adam, per tensor: sqrt(bias_correction2)
};

// ---------------------------------------------------------------------------------------------
// Device helpers

enum class Kind { kSums, kGrad, kDecay };

const char* kind_name(Kind k) {
  return k == Kind::kSums ? "sums" : k == Kind::kGrad ? "grad" : "decay";
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return 0;
    case at::kDouble:
      return 1;
    case at::kHalf:
      return 2;
    case at::kBFloat16:
      return 3;
    default:
      TORCH_CHECK(false, "fastreg: unsupported scalar dtype ", t);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_scalar(const void* p, int code) {
  switch (code) {
    case 0:
      return static_cast<acc_t>(*static_cast<const float*>(p));
    case 1:
      return static_cast<acc_t>(*static_cast<const double*>(p));
    case 2:
      return static_cast<acc_t>(static_cast<float>(*static_cast<const c10::Half*>(p)));
    default:
      return static_cast<acc_t>(static_cast<float>(*static_cast<const c10::BFloat16*>(p)));
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t fused_mul_add(acc_t a, acc_t b, acc_t c) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return __fma_rn(a, b, c);
  } else {
    return __fmaf_rn(a, b, c);
  }
}

// Sum over the 32 lanes in a fixed tree; lane 0 holds the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(kFullMask, v, offset);
  }
  return v;
}

// Sums each of v[0..N) over the block in a fixed order; thread 0 holds the results. Every
// thread of the block must call it; it leaves the shared buffer free for the next call.
template <int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N]) {
  __shared__ T shared[N][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = warp_sum(v[i]);
    if (lane == 0) {
      shared[i][warp] = v[i];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      v[i] = warp_sum(lane < warps ? shared[i][lane] : T(0));
    }
  }
  __syncthreads();
}

// The elements one access moves: 16 bytes, or 8 where an op's registers hold fewer (the
// optimizer steps' 2-byte dtypes: 4 elements of each row, as torch's fused kernels move).
template <typename T, int kBytes = 16>
struct alignas(kBytes) Pack {
  static constexpr int kSize = kBytes / sizeof(T);
  T v[kSize];
};

// The first `left` (< kSize) elements of a pack, element by element: a range's last pack, or any
// pack of a range that does not start on a pack boundary. Never touches memory past them.
template <typename T, int B>
__device__ __forceinline__ void load_part(Pack<T, B>& dst, const T* src, int left) {
#pragma unroll
  for (int j = 0; j < Pack<T, B>::kSize; ++j) {
    dst.v[j] = j < left ? src[j] : T(0.0f);
  }
}

template <typename T, int B>
__device__ __forceinline__ void store_part(T* dst, const Pack<T, B>& src, int left) {
#pragma unroll
  for (int j = 0; j < Pack<T, B>::kSize; ++j) {
    if (j < left) {
      dst[j] = src.v[j];
    }
  }
}

// The per-call constants of the elementwise math, in the accumulate dtype.
template <typename acc_t>
struct Ctx {
  bool use_l1;  // gradient: an l1 term
  bool use_w;   // gradient: an l2 or group-lasso term, d += w * scale
  bool fused;   // gradient: no group lasso, so d = fma(w, l2, l1 * sign(w)) as on CPU
  bool use_l2;  // decay step 1
  bool use_thr;  // decay step 2
  bool decay;    // sums of thresholded weights; group scales are decay's
  acc_t l1;
  acc_t go;                // penalty backward: grad_output
  acc_t factor;            // 1 - lr * l2
  acc_t threshold;         // lr * l1
  acc_t shrink_threshold;  // lr * group_lasso
  acc_t base_scale;        // the gradient's scale without group lasso: l2
  acc_t group_lasso;
};

// A float lr is combined with the coefficients in double, as the CPU kernels do; an lr tensor
// takes part in the arithmetic in the accumulate dtype, like the torch backend's tensor ops.
template <typename acc_t>
__device__ Ctx<acc_t> make_ctx(const Params& p) {
  Ctx<acc_t> c;
  c.use_l1 = p.l1 != 0.0;
  c.use_w = p.l2 != 0.0 || p.group_lasso != 0.0;
  c.fused = p.group_lasso == 0.0;
  c.use_l2 = p.l2 != 0.0;
  c.use_thr = p.l1 != 0.0;
  c.decay = p.decay;
  c.l1 = static_cast<acc_t>(p.l1);
  c.go = p.go_ptr != nullptr ? load_scalar<acc_t>(p.go_ptr, p.go_dtype) : static_cast<acc_t>(p.grad_output);
  c.base_scale = static_cast<acc_t>(p.l2);
  c.group_lasso = static_cast<acc_t>(p.group_lasso);
  if (p.lr_tensor) {
    const acc_t lr = p.lr_ptr != nullptr ? load_scalar<acc_t>(p.lr_ptr, p.lr_dtype) : static_cast<acc_t>(p.lr);
    c.factor = acc_t(1) - lr * static_cast<acc_t>(p.l2);
    c.threshold = lr * static_cast<acc_t>(p.l1);
    c.shrink_threshold = lr * static_cast<acc_t>(p.group_lasso);
  } else {
    c.factor = static_cast<acc_t>(1.0 - p.lr * p.l2);
    c.threshold = static_cast<acc_t>(p.lr * p.l1);
    c.shrink_threshold = static_cast<acc_t>(p.lr * p.group_lasso);
  }
  return c;
}

// Decay step 1: the l2 pre-scale.
template <typename acc_t>
__device__ __forceinline__ acc_t pre_scale(acc_t x, const Ctx<acc_t>& c) {
  if (c.use_l2) {
    x = x * c.factor;
  }
  return x;
}

// Decay step 2: the soft threshold max(|x| - t, 0) with x's sign (NaN stays NaN, and -0.0
// stays -0.0, as in the CPU kernel).
template <typename acc_t>
__device__ __forceinline__ acc_t soft_threshold(acc_t x, const Ctx<acc_t>& c) {
  if (c.use_thr) {
    acc_t v = fabs(x) - c.threshold;
    v = v < acc_t(0) ? acc_t(0) : v;
    x = copysign(v, x);
  }
  return x;
}

// Decay steps 1 and 2. The optimizer steps run the optimizer's update between the two.
template <typename acc_t>
__device__ __forceinline__ acc_t decay_prefix(acc_t x, const Ctx<acc_t>& c) {
  return soft_threshold(pre_scale(x, c), c);
}

// The block shrink's factor max(0, 1 - t / ||w_g||): 0 for an all-zero group and a NaN norm.
template <typename acc_t>
__device__ __forceinline__ acc_t shrink_scale(acc_t norm, acc_t t) {
  return norm > t ? acc_t(1) - (acc_t(1) / norm) * t : acc_t(0);
}

// A group's factor in the update pass, from its norm, as in the CPU kernels.
template <typename acc_t>
__device__ __forceinline__ acc_t group_scale(acc_t norm, const Ctx<acc_t>& c) {
  if (c.decay) {
    return shrink_scale(norm, c.shrink_threshold);
  }
  // An all-zero group has gradient 0 (1/||w_g|| taken as 0), as does a NaN norm.
  return c.base_scale + c.group_lasso * (norm > acc_t(0) ? acc_t(1) / norm : acc_t(0));
}

// The elementwise math of one pack: its first `left` elements, read from x (and, accumulating
// a gradient, from y), written to y; their |x| and x^2 added into (a, q) when the pass reduces.
template <Kind K, bool kAccumulate, bool kWithSums, typename scalar_t, typename acc_t>
__device__ __forceinline__ void apply_pack(const Pack<scalar_t>& x, Pack<scalar_t>& y, int left, const Ctx<acc_t>& c,
                                           acc_t scale, bool shrink, acc_t& a, acc_t& q) {
  constexpr bool kReduce = K == Kind::kSums || kWithSums;
  const acc_t zero(0);
#pragma unroll
  for (int j = 0; j < Pack<scalar_t>::kSize; ++j) {
    if (j >= left) {
      continue;
    }
    acc_t xv = static_cast<acc_t>(x.v[j]);
    if constexpr (K == Kind::kSums) {
      if (c.decay) {
        xv = decay_prefix(xv, c);
      }
    } else if constexpr (K == Kind::kGrad) {
      // Never -0.0, so it stands for the reference's 0 + l1 * sign(x); NaN has sign 0.
      acc_t d = c.use_l1 ? (xv > zero ? c.l1 : zero) - (xv < zero ? c.l1 : zero) : zero;
      if (c.use_w) {
        d = c.fused ? fused_mul_add(xv, scale, d) : d + xv * scale;
      }
      if constexpr (kAccumulate) {
        y.v[j] = static_cast<scalar_t>(static_cast<acc_t>(y.v[j]) + d);
      } else {
        y.v[j] = static_cast<scalar_t>(d * c.go);
      }
    } else {
      acc_t v = decay_prefix(xv, c);
      if (shrink) {
        v = v * scale;
      }
      y.v[j] = static_cast<scalar_t>(v);
    }
    if constexpr (kReduce) {
      a += fabs(xv);
      q = fused_mul_add(xv, xv, q);
    }
  }
}

template <typename scalar_t>
using acc_of = at::opmath_type<scalar_t>;

template <int kBytes = 16, typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % kBytes == 0;
}

template <typename T, int B>
__device__ __forceinline__ void load_pack(Pack<T, B>& dst, const T* p, int pk) {
  dst = reinterpret_cast<const Pack<T, B>*>(p)[pk];
}

template <typename T, int B>
__device__ __forceinline__ void store_pack(T* p, int pk, const Pack<T, B>& v) {
  reinterpret_cast<Pack<T, B>*>(p)[pk] = v;
}

// The walk of one range, elements [0, n), shared by every op: thread `rank` of `size`
// cooperating threads takes packs rank, rank + size, ... in that order. Whole packs of an aligned
// range move as one access each, U of them loaded before any is used; the rest element by
// element, with the same thread -> element assignment and order, so the sums depend neither on
// alignment nor on U. A range is at most one work item (chunk <= kMaxChunk elements), so 32-bit
// offsets within it suffice.
//
// `range` is the op's functor for the range: its Regs hold one pack of each stream the op reads;
// load / load_part fill them (pack pk, or its first `left` elements), compute does the math of
// the first `left` elements and adds to the sums v, store / store_part write what the op writes.
// kRolledTail: the loop over the remaining packs stays a loop, for math too long for the
// registers of the several packs the compiler would otherwise unroll it into; in an aligned
// range it runs at most once.
//
// kSize > 0 fixes the stride at compile time (size_arg is then kSize): a constant stride puts
// every unrolled access at an immediate offset from one address. kSize == 0 takes it from
// size_arg, for ops that load one pack at a time, so their math is compiled once, not once per
// block, warp and thread size.
template <int kSize, int U, typename Range, typename Sums>
__device__ __forceinline__ void walk_range(const Range& range, int n, int rank, int size_arg, Sums& v) {
  const int size = kSize > 0 ? kSize : size_arg;
  constexpr int N = Range::kPack;
  const int whole = range.aligned() ? n / N : 0;  // packs moved as one access each
  for (int base = rank; base < whole; base += size * U) {
    typename Range::Regs r[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + u * size < whole) {
        range.load(r[u], base + u * size);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + u * size < whole) {
        range.compute(r[u], N, v);
        range.store(r[u], base + u * size);
      }
    }
  }
  // The packs after the whole ones (all of them when unaligned), each by its owner, in order.
  const int packs = (n + N - 1) / N;
  const int first = whole + ((rank - whole % size) % size + size) % size;
  auto part = [&](int pk) {
    const int left = min(N, n - pk * N);
    typename Range::Regs r;
    range.load_part(r, pk, left);
    range.compute(r, left, v);
    range.store_part(r, pk, left);
  };
  if constexpr (Range::kRolledTail) {
#pragma unroll 1
    for (int pk = first; pk < packs; pk += size) {
      part(pk);
    }
  } else {
    for (int pk = first; pk < packs; pk += size) {
      part(pk);
    }
  }
}

// An op, as the item walk (ItemPass) uses it:
//   acc_t, Args (its kernel's per-call scalars), name() (its kernel's, for kernel_info);
//   kLoads: packs of each stream a thread loads before it uses any;
//   kReduce: the pass sums each range (kSums values: |w| and w^2 of the starting weights, and
//     with kEndSums the updated w^2, whose group norms a group shrink takes);
//   kRecord: the pass records what later kernels need of each group (per-tensor sums, group
//     norms into the item's totals, with kGroupNorms the group scales);
//   kSkippable: GradScaler may skip the call (found_inf); then `skip` is read per block, and
//     the kernel runs the op's Skipped instead when the pass reduces, else returns;
//   scale_of(norm): a recorded group's scale; range(g, tensor, begin): the functor of group g's
//     run that starts at element `begin` of `tensor`.

// The penalty's ops (sums, gradient, decay) by Kind: a range reads w (and, accumulating a
// gradient, the gradient row) and writes the gradient row (kGrad), w (kDecay) or nothing.
template <Kind K, bool kAccumulate, bool kWithSums, typename scalar_t, typename acc_t>
struct PenaltyRange {
  static constexpr int kPack = Pack<scalar_t>::kSize;
  static constexpr bool kRolledTail = false;
  static constexpr bool kReadOut = K == Kind::kGrad && kAccumulate;
  struct Regs {
    Pack<scalar_t> x;
    Pack<scalar_t> y;
  };
  const scalar_t* w;
  scalar_t* out;
  const Ctx<acc_t>& c;
  acc_t scale;
  bool shrink;

  __device__ __forceinline__ bool aligned() const {
    return K == Kind::kGrad ? is_aligned(w) && is_aligned(out) : is_aligned(w);
  }
  __device__ __forceinline__ void load(Regs& r, int pk) const {
    load_pack(r.x, w, pk);
    if constexpr (kReadOut) {
      load_pack(r.y, out, pk);
    }
  }
  __device__ __forceinline__ void load_part(Regs& r, int pk, int left) const {
    ::fastreg::cuda::load_part(r.x, w + pk * kPack, left);
    if constexpr (kReadOut) {
      ::fastreg::cuda::load_part(r.y, out + pk * kPack, left);
    }
  }
  template <typename Sums>
  __device__ __forceinline__ void compute(Regs& r, int left, Sums& v) const {
    apply_pack<K, kAccumulate, kWithSums>(r.x, r.y, left, c, scale, shrink, v[0], v[1]);
  }
  __device__ __forceinline__ void store(const Regs& r, int pk) const {
    if constexpr (K != Kind::kSums) {
      store_pack(out, pk, r.y);
    }
  }
  __device__ __forceinline__ void store_part(const Regs& r, int pk, int left) const {
    if constexpr (K != Kind::kSums) {
      ::fastreg::cuda::store_part(out + pk * kPack, r.y, left);
    }
  }
};

template <Kind K, bool kAccumulate, bool kWithSums, bool kGroups, typename scalar_t>
struct PenaltyOp {
  using acc_t = acc_of<scalar_t>;
  using Args = Params;
  using Range = PenaltyRange<K, kAccumulate, kWithSums, scalar_t, acc_t>;
  static constexpr int kLoads = kUnroll<scalar_t>;
  static constexpr bool kReduce = K == Kind::kSums || kWithSums;
  static constexpr bool kRecord = K == Kind::kSums;
  static constexpr bool kGroupNorms = kGroups;
  static constexpr bool kEndSums = false;
  static constexpr int kSums = 2;
  static constexpr bool kReadScales = kGroups && K != Kind::kSums;
  static constexpr bool kSkippable = false;

  const TableArgs& t;
  const Workspace<acc_t>& ws;
  const Ctx<acc_t> c;

  __device__ __forceinline__ PenaltyOp(const TableArgs& t, const Params& p, const Workspace<acc_t>& ws)
      : t(t), ws(ws), c(make_ctx<acc_t>(p)) {}

  __device__ __forceinline__ acc_t scale_of(acc_t norm) const { return group_scale(norm, c); }

  __device__ __forceinline__ Range range(int64_t g, int64_t tensor, int64_t begin) const {
    scalar_t* w = t.ptr<scalar_t>(0, tensor) + begin;
    scalar_t* out = K == Kind::kGrad ? t.ptr<scalar_t>(1, tensor) + begin : w;
    const acc_t scale = kReadScales ? ws.group_scale[g] : c.base_scale;
    return Range{w, out, c, scale, kReadScales && K == Kind::kDecay};
  }

  static std::string name() {
    return std::string("items<") + kind_name(K) + (kAccumulate ? ",accumulate" : "") + (kWithSums ? ",sums" : "") +
           (kGroups ? ",groups" : "") + "," + c10::toString(c10::CppTypeToScalarType<scalar_t>::value) + ">";
  }
};

// What a fused optimizer step's pass sums: nothing; the penalty of the starting weights (|w|,
// w^2); or those and, for the group shrink, each group's w^2 after the update and threshold.
enum class StepSums { kNone, kPenalty, kShrink };

// The optimizer steps' packs: 16 bytes, 8 for a 2-byte dtype, whose 16-byte packs of 4 to 5 rows
// (40 elements widened to fp32) would leave too few registers for the update's math.
template <typename scalar_t>
constexpr int kStepPackBytes = sizeof(scalar_t) == 2 ? 8 : 16;

template <typename scalar_t>
using StepPack = Pack<scalar_t, kStepPackBytes<scalar_t>>;

const char* step_sums_name(StepSums s) {
  return s == StepSums::kNone ? "" : s == StepSums::kPenalty ? ",penalty" : ",shrink";
}

// The lr of a step's update, in the type the optimizer's torch kernel computes with it.
template <typename T>
__device__ __forceinline__ T step_lr(const Params& p) {
  return p.lr_ptr != nullptr ? load_scalar<T>(p.lr_ptr, p.lr_dtype) : static_cast<T>(p.lr);
}

// torch's adam_math (CUDA fused Adam / AdamW) for one element, which computes in opmath_t
// throughout: lr, betas, eps and weight_decay rounded to it, the moments as fmas. Its rows at one
// range: the gradient, both moments (and with kAmsgrad their running maximum), and the tensor's
// bias corrections from the steps kernel.
template <typename scalar_t, bool kAmsgrad>
struct AdamUpdate {
  using scalar_type = scalar_t;
  using acc_t = acc_of<scalar_t>;  // torch's opmath_t
  struct Regs {
    StepPack<scalar_t> g;
    StepPack<scalar_t> m;
    StepPack<scalar_t> v;
    StepPack<scalar_t> vmax;  // kAmsgrad
  };
  // Per call, resolved once per block.
  struct Scalars {
    acc_t lr;
    acc_t beta1;
    acc_t beta2;
    acc_t eps;
    acc_t weight_decay;
    acc_t grad_scale;
    bool unscale;

    __device__ __forceinline__ explicit Scalars(const StepParams& h)
        : lr(step_lr<acc_t>(h.prox)),
          beta1(static_cast<acc_t>(h.beta1)),
          beta2(static_cast<acc_t>(h.beta2)),
          eps(static_cast<acc_t>(h.eps)),
          weight_decay(static_cast<acc_t>(h.weight_decay)),
          grad_scale(h.grad_scale != nullptr ? static_cast<acc_t>(*h.grad_scale) : acc_t(1)),
          unscale(h.grad_scale != nullptr) {}
  };
  scalar_t* g;
  scalar_t* m;
  scalar_t* v;
  scalar_t* vmax;
  acc_t step_size;
  acc_t bias_correction2_sqrt;

  static const char* name() { return kAmsgrad ? "adam,amsgrad" : "adam"; }

  AdamUpdate() = default;  // the rows of a skipped step, which reads none

  __device__ __forceinline__ AdamUpdate(const TableArgs& t, const Workspace<acc_t>& ws, const StepParams&,
                                        int64_t tensor, int64_t begin)
      : g(t.ptr<scalar_t>(kAdamGrad, tensor) + begin),
        m(t.ptr<scalar_t>(kExpAvg, tensor) + begin),
        v(t.ptr<scalar_t>(kExpAvgSq, tensor) + begin),
        vmax(kAmsgrad ? t.ptr<scalar_t>(kMaxExpAvgSq, tensor) + begin : nullptr),
        step_size(ws.step_size[tensor]),
        bias_correction2_sqrt(ws.bias2_sqrt[tensor]) {}

  __device__ __forceinline__ bool aligned() const {
    constexpr int B = kStepPackBytes<scalar_t>;
    return is_aligned<B>(g) && is_aligned<B>(m) && is_aligned<B>(v) && (!kAmsgrad || is_aligned<B>(vmax));
  }
  __device__ __forceinline__ void load(Regs& r, int pk) const {
    load_pack(r.g, g, pk);
    load_pack(r.m, m, pk);
    load_pack(r.v, v, pk);
    if constexpr (kAmsgrad) {
      load_pack(r.vmax, vmax, pk);
    }
  }
  __device__ __forceinline__ void load_part(Regs& r, int pk, int left) const {
    constexpr int N = StepPack<scalar_t>::kSize;
    ::fastreg::cuda::load_part(r.g, g + pk * N, left);
    ::fastreg::cuda::load_part(r.m, m + pk * N, left);
    ::fastreg::cuda::load_part(r.v, v + pk * N, left);
    if constexpr (kAmsgrad) {
      ::fastreg::cuda::load_part(r.vmax, vmax + pk * N, left);
    }
  }
  __device__ __forceinline__ void store(const Regs& r, int pk, bool unscale) const {
    if (unscale) {
      store_pack(g, pk, r.g);
    }
    store_pack(m, pk, r.m);
    store_pack(v, pk, r.v);
    if constexpr (kAmsgrad) {
      store_pack(vmax, pk, r.vmax);
    }
  }
  __device__ __forceinline__ void store_part(const Regs& r, int pk, int left, bool unscale) const {
    constexpr int N = StepPack<scalar_t>::kSize;
    if (unscale) {
      ::fastreg::cuda::store_part(g + pk * N, r.g, left);
    }
    ::fastreg::cuda::store_part(m + pk * N, r.m, left);
    ::fastreg::cuda::store_part(v + pk * N, r.v, left);
    if constexpr (kAmsgrad) {
      ::fastreg::cuda::store_part(vmax + pk * N, r.vmax, left);
    }
  }

  // Element j: the param in, the updated param out; the state (and an unscaled gradient) left in r.
  __device__ __forceinline__ acc_t update(const StepParams& h, const Scalars& s, Regs& r, int j, acc_t param) const {
    acc_t grad = static_cast<acc_t>(r.g.v[j]);
    if (s.unscale) {
      grad /= s.grad_scale;
      r.g.v[j] = static_cast<scalar_t>(grad);  // stored unscaled, before maximize's negation
    }
    if (h.maximize) {
      grad = -grad;
    }
    if (h.weight_decay != 0) {
      if (!h.decoupled) {
        grad = fused_mul_add(param, s.weight_decay, grad);  // grad += param * weight_decay
      } else {
        param = fused_mul_add(-(s.lr * s.weight_decay), param, param);  // param -= lr * weight_decay * param
      }
    }
    acc_t exp_avg = static_cast<acc_t>(r.m.v[j]);
    acc_t exp_avg_sq = static_cast<acc_t>(r.v.v[j]);
    exp_avg = fused_mul_add(s.beta1, exp_avg, fused_mul_add(-s.beta1, grad, grad));
    const acc_t grad_sq = grad * grad;
    exp_avg_sq = fused_mul_add(s.beta2, exp_avg_sq, fused_mul_add(-s.beta2, grad_sq, grad_sq));
    acc_t denom;
    if constexpr (kAmsgrad) {
      acc_t max_exp_avg_sq = static_cast<acc_t>(r.vmax.v[j]);
      max_exp_avg_sq = max_exp_avg_sq < exp_avg_sq ? exp_avg_sq : max_exp_avg_sq;  // std::max's order
      denom = (sqrt(max_exp_avg_sq) / bias_correction2_sqrt) + s.eps;
      r.vmax.v[j] = static_cast<scalar_t>(max_exp_avg_sq);
    } else {
      denom = (sqrt(exp_avg_sq) / bias_correction2_sqrt) + s.eps;
    }
    param -= step_size * exp_avg / denom;
    r.m.v[j] = static_cast<scalar_t>(exp_avg);
    r.v.v[j] = static_cast<scalar_t>(exp_avg_sq);
    return param;
  }
};

// torch's sgd_math (CUDA fused SGD) for one element, which (torch >= 2.11) computes in opmath_t
// throughout: weight_decay, momentum, dampening and lr rounded to it once, the weight decay, the
// nesterov term and the update as fmas, the momentum buffer as two rounded products and an add.
// Its rows at one range: the gradient and, with kMomentum, the momentum buffer. A tensor's first
// step does not use the buffer's values, but loads them all the same: a load that depends on the
// flag would cost the registers of two code paths, and a first step happens once.
template <typename scalar_t, bool kMomentum>
struct SgdUpdate {
  using scalar_type = scalar_t;
  using acc_t = acc_of<scalar_t>;  // torch's opmath_t
  struct Regs {
    StepPack<scalar_t> g;
    StepPack<scalar_t> buf;  // kMomentum
  };
  // Per call, resolved once per block.
  struct Scalars {
    acc_t lr;
    acc_t weight_decay;
    acc_t momentum;
    acc_t one_minus_dampening;  // 1 - dampening, in acc_t from the rounded dampening
    acc_t grad_scale;
    bool unscale;

    __device__ __forceinline__ explicit Scalars(const StepParams& h)
        : lr(step_lr<acc_t>(h.prox)),
          weight_decay(static_cast<acc_t>(h.weight_decay)),
          momentum(static_cast<acc_t>(h.momentum)),
          one_minus_dampening(acc_t(1) - static_cast<acc_t>(h.dampening)),
          grad_scale(h.grad_scale != nullptr ? static_cast<acc_t>(*h.grad_scale) : acc_t(1)),
          unscale(h.grad_scale != nullptr) {}
  };
  scalar_t* g;
  scalar_t* buf;
  bool first;

  static const char* name() { return kMomentum ? "sgd,momentum" : "sgd"; }

  SgdUpdate() = default;  // the rows of a skipped step, which reads none

  __device__ __forceinline__ SgdUpdate(const TableArgs& t, const Workspace<acc_t>&, const StepParams& h,
                                       int64_t tensor, int64_t begin)
      : g(t.ptr<scalar_t>(kSgdGrad, tensor) + begin),
        buf(kMomentum ? t.ptr<scalar_t>(kMomentumBuffer, tensor) + begin : nullptr),
        first(kMomentum && h.first != nullptr && h.first[tensor]) {}

  __device__ __forceinline__ bool aligned() const {
    constexpr int B = kStepPackBytes<scalar_t>;
    return is_aligned<B>(g) && (!kMomentum || is_aligned<B>(buf));
  }
  __device__ __forceinline__ void load(Regs& r, int pk) const {
    load_pack(r.g, g, pk);
    if constexpr (kMomentum) {
      load_pack(r.buf, buf, pk);
    }
  }
  __device__ __forceinline__ void load_part(Regs& r, int pk, int left) const {
    constexpr int N = StepPack<scalar_t>::kSize;
    ::fastreg::cuda::load_part(r.g, g + pk * N, left);
    if constexpr (kMomentum) {
      ::fastreg::cuda::load_part(r.buf, buf + pk * N, left);
    }
  }
  __device__ __forceinline__ void store(const Regs& r, int pk, bool unscale) const {
    if (unscale) {
      store_pack(g, pk, r.g);
    }
    if constexpr (kMomentum) {
      store_pack(buf, pk, r.buf);
    }
  }
  __device__ __forceinline__ void store_part(const Regs& r, int pk, int left, bool unscale) const {
    constexpr int N = StepPack<scalar_t>::kSize;
    if (unscale) {
      ::fastreg::cuda::store_part(g + pk * N, r.g, left);
    }
    if constexpr (kMomentum) {
      ::fastreg::cuda::store_part(buf + pk * N, r.buf, left);
    }
  }

  // Element j: the param in, the updated param out; the buffer (and an unscaled gradient) left in r.
  __device__ __forceinline__ acc_t update(const StepParams& h, const Scalars& s, Regs& r, int j, acc_t p) const {
    acc_t g = static_cast<acc_t>(r.g.v[j]);
    if (s.unscale) {
      g /= s.grad_scale;
      r.g.v[j] = static_cast<scalar_t>(g);  // stored unscaled, before maximize's negation
    }
    if (h.maximize) {
      g = -g;
    }
    if (s.weight_decay != 0) {
      g = fused_mul_add(s.weight_decay, p, g);  // g += weight_decay * p
    }
    if constexpr (kMomentum) {
      // momentum * buf + (1 - dampening) * g: both products rounded, then added (no fma).
      const acc_t momentum_buffer =
          first ? g : s.momentum * static_cast<acc_t>(r.buf.v[j]) + s.one_minus_dampening * g;
      r.buf.v[j] = static_cast<scalar_t>(momentum_buffer);
      if (h.nesterov) {
        g = fused_mul_add(s.momentum, momentum_buffer, g);  // g + momentum * momentum_buffer
      } else {
        g = momentum_buffer;
      }
    }
    return fused_mul_add(-s.lr, g, p);  // p -= lr * g
  }
};

// A fused optimizer step's pass (Update: AdamUpdate or SgdUpdate), per element in registers: the
// penalty sums of the starting weight; the l2 pre-scale; the optimizer's update; the l1
// threshold; one store of each row. kSkipped: the pass of a step that GradScaler skips, which
// reads the weights alone, for the penalty's sums, and writes nothing.
template <typename Update, StepSums S, bool kSkipped = false>
struct StepOp {
  using scalar_t = typename Update::scalar_type;
  using acc_t = acc_of<scalar_t>;
  using Args = StepParams;
  using Skipped = StepOp<Update, S, true>;
  // One pack of each of 3 to 5 rows in flight per thread (torch's fused kernels keep as many),
  // in the registers kMinBlocks blocks leave.
  static constexpr int kLoads = 1;
  static constexpr bool kReduce = S != StepSums::kNone;
  static constexpr bool kRecord = kReduce;
  static constexpr bool kGroupNorms = S == StepSums::kShrink;
  static constexpr bool kEndSums = S == StepSums::kShrink;
  static constexpr int kSums = kEndSums ? 3 : 2;
  // Tested once per kernel, not per element: both paths in one loop would need the registers of
  // both.
  static constexpr bool kSkippable = !kSkipped;

  struct Range {
    static constexpr int kPack = StepPack<scalar_t>::kSize;
    static constexpr bool kRolledTail = true;
    struct Regs {
      StepPack<scalar_t> x;
      typename Update::Regs u;
    };
    const StepOp& op;
    scalar_t* w;
    Update rows;

    __device__ __forceinline__ bool aligned() const {
      return is_aligned<kStepPackBytes<scalar_t>>(w) && (kSkipped || rows.aligned());
    }
    __device__ __forceinline__ void load(Regs& r, int pk) const {
      load_pack(r.x, w, pk);
      if constexpr (!kSkipped) {
        rows.load(r.u, pk);
      }
    }
    __device__ __forceinline__ void load_part(Regs& r, int pk, int left) const {
      ::fastreg::cuda::load_part(r.x, w + pk * kPack, left);
      if constexpr (!kSkipped) {
        rows.load_part(r.u, pk, left);
      }
    }
    template <typename Sums>
    __device__ __forceinline__ void compute(Regs& r, int left, Sums& v) const {
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        if (j >= left) {
          continue;
        }
        acc_t x = static_cast<acc_t>(r.x.v[j]);
        if constexpr (kReduce) {
          v[0] += fabs(x);
          v[1] = fused_mul_add(x, x, v[1]);
        }
        if constexpr (!kSkipped) {
          x = soft_threshold(rows.update(op.h, op.s, r.u, j, pre_scale(x, op.c)), op.c);
          if constexpr (kEndSums) {
            v[2] = fused_mul_add(x, x, v[2]);
          }
          r.x.v[j] = static_cast<scalar_t>(x);
        }
      }
    }
    __device__ __forceinline__ void store(const Regs& r, int pk) const {
      if constexpr (!kSkipped) {
        store_pack(w, pk, r.x);
        rows.store(r.u, pk, op.s.unscale);
      }
    }
    __device__ __forceinline__ void store_part(const Regs& r, int pk, int left) const {
      if constexpr (!kSkipped) {
        ::fastreg::cuda::store_part(w + pk * kPack, r.x, left);
        rows.store_part(r.u, pk, left, op.s.unscale);
      }
    }
  };

  const TableArgs& t;
  const Workspace<acc_t>& ws;
  const StepParams& h;
  const Ctx<acc_t> c;
  const typename Update::Scalars s;
  const bool skip;

  __device__ __forceinline__ StepOp(const TableArgs& t, const StepParams& h, const Workspace<acc_t>& ws)
      : t(t),
        ws(ws),
        h(h),
        c(make_ctx<acc_t>(h.prox)),
        s(h),
        skip(h.found_inf != nullptr && *h.found_inf != 0.0f) {}

  // Always the shrink's factor: the gradient's, which group_scale() would also compile in
  // behind c.decay, is never a step's.
  __device__ __forceinline__ acc_t scale_of(acc_t norm) const { return shrink_scale(norm, c.shrink_threshold); }

  __device__ __forceinline__ Range range(int64_t, int64_t tensor, int64_t begin) const {
    scalar_t* w = t.ptr<scalar_t>(0, tensor) + begin;
    if constexpr (kSkipped) {
      return Range{*this, w, Update()};
    } else {
      return Range{*this, w, Update(t, ws, h, tensor, begin)};
    }
  }

  static std::string name() {
    return std::string("items<") + Update::name() + step_sums_name(S) + "," +
           c10::toString(c10::CppTypeToScalarType<scalar_t>::value) + ">";
  }
};

// A step's group shrink, after the step's pass and the finalize: w *= the group's factor. A
// step that GradScaler skips is left as it is.
template <typename scalar_t>
struct ShrinkOp {
  using acc_t = acc_of<scalar_t>;
  using Args = StepParams;
  static constexpr int kLoads = kUnroll<scalar_t>;
  static constexpr bool kReduce = false;
  static constexpr bool kRecord = false;
  static constexpr bool kGroupNorms = false;
  static constexpr bool kEndSums = false;
  static constexpr int kSums = 2;
  static constexpr bool kSkippable = true;  // with nothing to reduce, a skipped call returns
  using Skipped = ShrinkOp;

  struct Range {
    static constexpr int kPack = Pack<scalar_t>::kSize;
    static constexpr bool kRolledTail = false;
    struct Regs {
      Pack<scalar_t> x;
    };
    scalar_t* w;
    acc_t scale;

    __device__ __forceinline__ bool aligned() const { return is_aligned(w); }
    __device__ __forceinline__ void load(Regs& r, int pk) const { load_pack(r.x, w, pk); }
    __device__ __forceinline__ void load_part(Regs& r, int pk, int left) const {
      ::fastreg::cuda::load_part(r.x, w + pk * kPack, left);
    }
    template <typename Sums>
    __device__ __forceinline__ void compute(Regs& r, int left, Sums&) const {
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        if (j < left) {
          r.x.v[j] = static_cast<scalar_t>(static_cast<acc_t>(r.x.v[j]) * scale);
        }
      }
    }
    __device__ __forceinline__ void store(const Regs& r, int pk) const { store_pack(w, pk, r.x); }
    __device__ __forceinline__ void store_part(const Regs& r, int pk, int left) const {
      ::fastreg::cuda::store_part(w + pk * kPack, r.x, left);
    }
  };

  const TableArgs& t;
  const Workspace<acc_t>& ws;
  const bool skip;

  __device__ __forceinline__ ShrinkOp(const TableArgs& t, const StepParams& h, const Workspace<acc_t>& ws)
      : t(t), ws(ws), skip(h.found_inf != nullptr && *h.found_inf != 0.0f) {}

  __device__ __forceinline__ Range range(int64_t g, int64_t tensor, int64_t begin) const {
    return Range{t.ptr<scalar_t>(0, tensor) + begin, ws.group_scale[g]};
  }

  static std::string name() {
    return std::string("items<shrink,") + c10::toString(c10::CppTypeToScalarType<scalar_t>::value) + ">";
  }
};

// One thread's view of a pass of `Op` over items: the ranges it runs and the sums it keeps.
template <typename Op>
struct ItemPass {
  using acc_t = typename Op::acc_t;
  using Sums = acc_t[Op::kSums];

  const TableArgs& t;
  const Op& op;
  const Workspace<acc_t>& ws;
  acc_t total[3];  // this thread's share of the item's sum |w|, sum w^2, sum of group norms

  // Elements [offset, offset + n) of group g, by thread `rank` of `size`; adds its sums to v.
  __device__ __forceinline__ void run(int64_t g, int64_t offset, int n, int rank, int size, Sums& v) const {
    const int64_t tensor = t.group_word(g, plan::kGroupTensor);
    const auto range = op.range(g, tensor, t.group_word(g, plan::kGroupStart) + offset);
    if constexpr (Op::kLoads == 1) {
      walk_range<0, 1>(range, n, rank, size, v);
    } else if (size == kThreads) {
      walk_range<kThreads, Op::kLoads>(range, n, rank, kThreads, v);
    } else if (size == 32) {
      walk_range<32, Op::kLoads>(range, n, rank, 32, v);
    } else {
      walk_range<1, Op::kLoads>(range, n, rank, 1, v);
    }
  }

  // A whole group's sums are known (to one thread): they join the item's, and a recording pass
  // keeps what later passes need of the group.
  __device__ __forceinline__ void finish_group(int64_t g, const Sums& v) {
    total[0] += v[0];
    total[1] += v[1];
    if constexpr (Op::kRecord) {
      if (ws.tensor_abs != nullptr) {
        const int64_t tensor = t.group_word(g, plan::kGroupTensor);
        ws.tensor_abs[tensor] = v[0];
        ws.tensor_sq[tensor] = v[1];
      }
      if constexpr (Op::kGroupNorms) {
        const acc_t norm = sqrt(v[1]);
        total[2] += norm;
        if (ws.group_scale != nullptr) {
          if constexpr (Op::kEndSums) {
            ws.group_scale[g] = op.scale_of(sqrt(v[2]));
          } else {
            ws.group_scale[g] = op.scale_of(norm);
          }
        }
      }
    }
  }

  // Item i: its groups in windows of 32. In a window, each group of kBlockGroup or more elements
  // (and the piece of a split group) is run by the whole block, in order; then the k-th shorter
  // group of the item by warp k % kWarps, and the k-th group under a warp's width by thread
  // k % kThreads. The assignment depends only on the layout, so every sum has a fixed order.
  __device__ __forceinline__ void item(int64_t i) {
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int64_t g0 = t.item_word(i, plan::kItemGroup);
    const int64_t g1 = t.item_word(i, plan::kItemGroupEnd);
    total[0] = total[1] = total[2] = acc_t(0);
    // Groups of the item so far that went to a warp, and to a thread, modulo their counts.
    int warp_turn = 0;
    int thread_turn = 0;
    for (int64_t base = g0; base < g1; base += 32) {
      const int64_t len = base + lane < g1 ? t.group_word(base + lane, plan::kGroupLen) : -1;
      const bool whole = len >= kBlockGroup || len > t.chunk;
      unsigned block_tasks = __ballot_sync(kFullMask, whole);
      const unsigned per_warp = __ballot_sync(kFullMask, len >= kWarpGroup && !whole);
      const unsigned per_thread = __ballot_sync(kFullMask, len >= 0 && len < kWarpGroup);
      unsigned warp_tasks = 0;
      for (unsigned m = per_warp; m != 0; m &= m - 1) {
        if (warp_turn == warp) {
          warp_tasks |= m & (~m + 1);
        }
        warp_turn = warp_turn + 1 == kWarps ? 0 : warp_turn + 1;
      }
      // Each thread has at most one of the window's (at most 32) thread-sized groups.
      const int count = __popc(per_thread);
      const int mine = tid >= thread_turn ? tid - thread_turn : tid - thread_turn + kThreads;
      unsigned thread_task = 0;
      if (mine < count) {
        unsigned m = per_thread;
        for (int k = 0; k < mine; ++k) {
          m &= m - 1;
        }
        thread_task = m & (~m + 1);
      }
      thread_turn = (thread_turn + count) % kThreads;

      // The block's tasks, then the warp's, then the thread's, all through one run().
      for (;;) {
        unsigned bit;
        int rank, size;
        if (block_tasks != 0) {
          bit = block_tasks & (~block_tasks + 1);
          block_tasks ^= bit;
          rank = tid;
          size = kThreads;
        } else if (warp_tasks != 0) {
          bit = warp_tasks & (~warp_tasks + 1);
          warp_tasks ^= bit;
          rank = lane;
          size = 32;
        } else if (thread_task != 0) {
          bit = thread_task;
          thread_task = 0;
          rank = 0;
          size = 1;
        } else {
          break;
        }
        const int64_t g = base + __ffs(bit) - 1;
        const int64_t group_len = t.group_word(g, plan::kGroupLen);
        const bool split = group_len > t.chunk;
        Sums v = {};
        run(g, split ? t.item_word(i, plan::kItemOffset) : 0,
            static_cast<int>(split ? t.item_word(i, plan::kItemLen) : group_len), rank, size, v);
        if constexpr (Op::kReduce) {
          if (size == kThreads) {
            block_sum(v);
          } else if (size == 32) {
#pragma unroll
            for (int k = 0; k < Op::kSums; ++k) {
              v[k] = warp_sum(v[k]);
            }
          }
          if (rank == 0) {
            if (split) {  // a piece: the finalize combines the group's pieces
              total[0] += v[0];
              total[1] += v[1];
              if constexpr (Op::kEndSums) {
                ws.item_end_sq[i] = v[2];  // the item's only run
              }
            } else {
              finish_group(g, v);
            }
          }
        }
      }
    }
    if constexpr (Op::kReduce) {
      block_sum(total);
      if (tid == 0) {
        ws.item_abs[i] = total[0];
        ws.item_sq[i] = total[1];
        if (ws.item_norm != nullptr) {
          ws.item_norm[i] = total[2];
        }
      }
    }
  }
};

template <typename Op>
__device__ __forceinline__ void walk_items(const TableArgs& t, const Op& op, const Workspace<typename Op::acc_t>& ws) {
  ItemPass<Op> pass{t, op, ws, {}};
  for (int64_t i = blockIdx.x; i < t.items; i += gridDim.x) {
    pass.item(i);
  }
}

template <typename Op>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    items_kernel(const TableArgs t, const typename Op::Args args, const Workspace<typename Op::acc_t> ws) {
  if (ws.ticket != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    *ws.ticket = 0;  // the finalize that follows on this stream counts its blocks from zero
  }
  const Op op(t, args, ws);
  if constexpr (Op::kSkippable) {
    if (op.skip) {
      if constexpr (Op::kReduce) {
        walk_items(t, typename Op::Skipped(t, args, ws), ws);
      }
      return;
    }
  }
  walk_items(t, op, ws);
}

// Threads per block of the steps kernel (a thread per tensor).
constexpr int kStepThreads = 128;

// Adam's steps, before its pass: each tensor's float32 step advanced on the device as torch's
// fused Adam does around its kernel (+1, then -found_inf), and the tensor's bias-corrected
// constants for the pass, computed once per tensor where torch's kernel computes them per block.
// A launch of its own, since the items of a split tensor would race on its step.
template <typename acc_t>
__global__ void __launch_bounds__(kStepThreads)
    steps_kernel(const TableArgs t, const StepParams h, const Workspace<acc_t> ws) {
  const acc_t lr = step_lr<acc_t>(h.prox);
  const acc_t beta1 = static_cast<acc_t>(h.beta1);
  const acc_t beta2 = static_cast<acc_t>(h.beta2);
  const float found_inf = h.found_inf != nullptr ? *h.found_inf : 0.0f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kStepThreads;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kStepThreads + threadIdx.x; k < t.tensors; k += stride) {
    float* step = t.ptr<float>(kStep, k);
    float n = *step + 1.0f;
    if (h.found_inf != nullptr) {
      n = n - found_inf;
    }
    *step = n;
    if (found_inf != 0.0f) {
      continue;  // the pass writes nothing, and reads none of these
    }
    // As torch's kernel, in opmath_t: pow(opmath_t, opmath_t) of the step read as opmath_t.
    const acc_t step_count = static_cast<acc_t>(n);
    const acc_t bias_correction1 = 1 - pow(beta1, step_count);
    const acc_t bias_correction2 = 1 - pow(beta2, step_count);
    ws.step_size[k] = lr / bias_correction1;
    ws.bias2_sqrt[k] = sqrt(bias_correction2);
  }
}

// After a sums pass: each split group's sums from its items' pieces (a warp per group, lanes
// over its items, in a fixed tree), giving per-tensor norms, group scales and group norms;
// then, when `value` is wanted, P from every item's sums and the split groups' norms: slots of
// kSlotItems items summed by one block each, and the slots by the last block to finish. After an
// optimizer step's pass (item_end_sq), a split group's scale is the shrink of its updated norm.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const TableArgs t, const Params params, const Workspace<acc_t> ws, acc_t* value) {
  const Ctx<acc_t> c = make_ctx<acc_t>(params);
  const int lane = threadIdx.x & 31;
  const int64_t first_warp = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + (threadIdx.x >> 5);
  for (int64_t s = first_warp; s < t.split_groups; s += static_cast<int64_t>(gridDim.x) * kFinalizeWarps) {
    const int64_t g = __ldg(t.words + t.split_at + s);
    const int64_t first = t.group_word(g, plan::kGroupItem);
    const int64_t count = (t.group_word(g, plan::kGroupLen) + t.chunk - 1) / t.chunk;
    acc_t a(0), q(0), e(0);
    for (int64_t j = lane; j < count; j += 32) {
      a += ws.item_abs[first + j];
      q += ws.item_sq[first + j];
      if (ws.item_end_sq != nullptr) {
        e += ws.item_end_sq[first + j];
      }
    }
    a = warp_sum(a);
    q = warp_sum(q);
    e = warp_sum(e);
    if (lane == 0) {
      if (ws.tensor_abs != nullptr) {
        const int64_t tensor = t.group_word(g, plan::kGroupTensor);
        ws.tensor_abs[tensor] = a;
        ws.tensor_sq[tensor] = q;
      }
      const acc_t norm = sqrt(q);
      if (ws.group_scale != nullptr) {
        ws.group_scale[g] = group_scale(ws.item_end_sq != nullptr ? sqrt(e) : norm, c);
      }
      if (ws.split_norm != nullptr) {
        ws.split_norm[s] = norm;
      }
    }
  }
  if (value == nullptr) {
    return;
  }
  const int64_t slots = (t.items + kSlotItems - 1) / kSlotItems;
  for (int64_t k = blockIdx.x; k < slots; k += gridDim.x) {
    acc_t v[3] = {acc_t(0), acc_t(0), acc_t(0)};
    const int64_t end = (k + 1) * kSlotItems < t.items ? (k + 1) * kSlotItems : t.items;
    for (int64_t i = k * kSlotItems + threadIdx.x; i < end; i += kFinalizeThreads) {
      v[0] += ws.item_abs[i];
      v[1] += ws.item_sq[i];
      if (ws.item_norm != nullptr) {
        v[2] += ws.item_norm[i];
      }
    }
    block_sum(v);
    if (threadIdx.x == 0) {
      ws.slots[3 * k] = v[0];
      ws.slots[3 * k + 1] = v[1];
      ws.slots[3 * k + 2] = v[2];
    }
  }
  // Integer ticket, not float atomics: the last block sums what every block wrote, in order.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(ws.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) {
    return;
  }
  acc_t v[3] = {acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t k = threadIdx.x; k < slots; k += kFinalizeThreads) {
    v[0] += __ldcg(ws.slots + 3 * k);
    v[1] += __ldcg(ws.slots + 3 * k + 1);
    v[2] += __ldcg(ws.slots + 3 * k + 2);
  }
  if (ws.split_norm != nullptr) {
    for (int64_t s = threadIdx.x; s < t.split_groups; s += kFinalizeThreads) {
      v[2] += __ldcg(ws.split_norm + s);
    }
  }
  block_sum(v);
  if (threadIdx.x == 0) {
    // P in the CPU kernels' order: a zero coefficient leaves its term out entirely.
    acc_t p(0);
    if (params.l1 != 0.0) {
      p = p + static_cast<acc_t>(params.l1) * v[0];
    }
    if (params.l2 != 0.0) {
      p = p + static_cast<acc_t>(params.l2 / 2) * v[1];
    }
    if (params.group_lasso != 0.0) {
      p = p + c.group_lasso * v[2];
    }
    *value = p;
  }
}

// Table words as kernel arguments (within 4 KB on every architecture), for a table built while
// a stream captures a CUDA graph: the graph keeps a kernel's arguments, not host memory.
constexpr int kFillWords = 448;
struct FillWords {
  int64_t w[kFillWords];
};

__global__ void fill_kernel(int64_t* dst, const FASTREG_GRID_CONSTANT FillWords src, int count) {
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    dst[i] = src.w[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Launch shapes

struct KernelRecord {
  std::string name;
  int threads;
};

std::mutex& kernels_mutex() {
  static std::mutex mutex;
  return mutex;
}

// Kernels launched so far: name and block size by address, and per (kernel, device) the blocks
// a launch may use (occupancy API times SMs).
std::map<const void*, KernelRecord>& kernel_records() {
  static std::map<const void*, KernelRecord> records;
  return records;
}

std::map<std::pair<const void*, int>, int>& resident_blocks_cache() {
  static std::map<std::pair<const void*, int>, int> cache;
  return cache;
}

// Blocks of `kernel` that are resident at once on `device`: per SM from the kernel's real
// register and shared-memory use (the occupancy API), times the SMs. A launch with more blocks
// would only queue them, with fewer it would leave SMs idle.
int resident_blocks(const void* kernel, int threads, int device, const char* name) {
  std::lock_guard<std::mutex> lock(kernels_mutex());
  auto& cache = resident_blocks_cache();
  const auto key = std::make_pair(kernel, device);
  auto it = cache.find(key);
  if (it != cache.end()) {
    return it->second;
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TORCH_CHECK(per_sm > 0, "fastreg: kernel ", name, " cannot run ", threads, " threads per block on device ", device);
  kernel_records().emplace(kernel, KernelRecord{name, threads});
  return cache[key] = per_sm * sms;
}

std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

// ---------------------------------------------------------------------------------------------
// Host side of a launch

TableArgs args_of(const DeviceTable& table) {
  TableArgs a;
  a.words = table.words().data_ptr<int64_t>();
  a.tensors = table.num_tensors();
  a.chunk = table.chunk();
  a.ptrs_at = table.header(plan::kPtrsAt);
  a.groups_at = table.header(plan::kGroupsAt);
  a.items_at = table.header(plan::kItemsAt);
  a.items = table.num_items();
  a.split_at = table.split_at();
  a.split_groups = table.num_split_groups();
  return a;
}

// One op call's launches: on the table's device and its current stream.
struct Launch {
  TableArgs args;
  int device;
  cudaStream_t stream;

  explicit Launch(const TablePtr& table)
      : args(args_of(*table)),
        device(table->device().index()),
        stream(c10::cuda::getCurrentCUDAStream(table->device().index()).stream()) {
    table->prepare_use();
  }
};

// Every launch: a grid of `blocks` (at least one), never more than fit on the device at once,
// recorded under `name` for kernel_info.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), const std::string& name, int threads, int64_t blocks, const Launch& l,
            const Args&... args) {
  const int resident = resident_blocks(reinterpret_cast<const void*>(kernel), threads, l.device, name.c_str());
  const auto grid = static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, resident));
  kernel<<<grid, threads, 0, l.stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Op>
void launch_items(const Launch& l, const typename Op::Args& p, const Workspace<typename Op::acc_t>& ws) {
  static const std::string name = Op::name();
  launch(items_kernel<Op>, name, kThreads, l.args.items, l, l.args, p, ws);
}

template <typename acc_t>
void launch_finalize(const Launch& l, const Params& p, const Workspace<acc_t>& ws, acc_t* value) {
  static const std::string name = std::string("finalize<") + dtype_name(c10::CppTypeToScalarType<acc_t>::value) + ">";
  const int64_t split_blocks = (l.args.split_groups + kFinalizeWarps - 1) / kFinalizeWarps;
  const int64_t slots = value != nullptr ? (l.args.items + kSlotItems - 1) / kSlotItems : 0;
  launch(finalize_kernel<acc_t>, name, kFinalizeThreads, std::max(split_blocks, slots), l, l.args, p, ws, value);
}

template <typename acc_t>
void launch_steps(const Launch& l, const StepParams& h, const Workspace<acc_t>& ws) {
  static const std::string name = std::string("steps<") + dtype_name(c10::CppTypeToScalarType<acc_t>::value) + ">";
  launch(steps_kernel<acc_t>, name, kStepThreads, (l.args.tensors + kStepThreads - 1) / kStepThreads, l, l.args, h, ws);
}

// Which scratch arrays a call needs.
struct Needs {
  bool items = false;        // item_abs, item_sq
  bool norms = false;        // item_norm, split_norm
  bool group_scale = false;  // group_scale
  bool totals = false;       // slots, ticket
  bool end_sums = false;     // item_end_sq
  bool steps = false;        // step_size, bias2_sqrt
};

// One device buffer for all scratch arrays of a call, from the caching allocator.
template <typename acc_t>
struct Scratch {
  at::Tensor storage;
  Workspace<acc_t> ws{};

  Scratch(const DeviceTable& table, const Needs& needs) {
    const int64_t items = needs.items ? table.num_items() : 0;
    const int64_t norms = needs.norms ? table.num_items() : 0;
    const int64_t split = needs.norms ? table.num_split_groups() : 0;
    const int64_t groups = needs.group_scale ? table.num_groups() : 0;
    const int64_t slots = needs.totals ? 3 * ((table.num_items() + kSlotItems - 1) / kSlotItems) : 0;
    const int64_t tickets = needs.totals ? 1 : 0;
    const int64_t end_sums = needs.end_sums ? table.num_items() : 0;
    const int64_t tensors = needs.steps ? table.num_tensors() : 0;
    int64_t bytes = 0;
    auto reserve = [&](int64_t count, int64_t size) {
      const int64_t at = bytes;
      bytes += (count * size + 15) / 16 * 16;
      return at;
    };
    const int64_t abs_at = reserve(items, sizeof(acc_t));
    const int64_t sq_at = reserve(items, sizeof(acc_t));
    const int64_t norm_at = reserve(norms, sizeof(acc_t));
    const int64_t scale_at = reserve(groups, sizeof(acc_t));
    const int64_t split_at = reserve(split, sizeof(acc_t));
    const int64_t slots_at = reserve(slots, sizeof(acc_t));
    const int64_t ticket_at = reserve(tickets, sizeof(unsigned int));
    const int64_t end_at = reserve(end_sums, sizeof(acc_t));
    const int64_t step_size_at = reserve(tensors, sizeof(acc_t));
    const int64_t bias2_at = reserve(tensors, sizeof(acc_t));
    if (bytes == 0) {
      return;
    }
    storage = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(table.device()));
    auto* base = static_cast<unsigned char*>(storage.data_ptr());
    auto take = [&](int64_t count, int64_t at) { return count > 0 ? base + at : nullptr; };
    ws.item_abs = reinterpret_cast<acc_t*>(take(items, abs_at));
    ws.item_sq = reinterpret_cast<acc_t*>(take(items, sq_at));
    ws.item_norm = reinterpret_cast<acc_t*>(take(norms, norm_at));
    ws.group_scale = reinterpret_cast<acc_t*>(take(groups, scale_at));
    ws.split_norm = reinterpret_cast<acc_t*>(take(split, split_at));
    ws.slots = reinterpret_cast<acc_t*>(take(slots, slots_at));
    ws.ticket = reinterpret_cast<unsigned int*>(take(tickets, ticket_at));
    ws.item_end_sq = reinterpret_cast<acc_t*>(take(end_sums, end_at));
    ws.step_size = reinterpret_cast<acc_t*>(take(tensors, step_size_at));
    ws.bias2_sqrt = reinterpret_cast<acc_t*>(take(tensors, bias2_at));
  }
};

at::TensorOptions accumulate_options(at::ScalarType dtype, const at::Device& device) {
  return at::TensorOptions().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat).device(device);
}

Params make_params(const Coefs& c) {
  Params p{};
  p.l1 = c.l1;
  p.l2 = c.l2;
  p.group_lasso = c.group_lasso;
  return p;
}

// A one-element tensor argument (lr, grad_output): on the parameters' device it is read by the
// kernels; on the CPU it is read here, from host memory, which waits for nothing.
void scalar_argument(const at::Tensor& t, const at::Device& device, const char* op, const char* name, double& value,
                     const void*& ptr, int& code) {
  TORCH_CHECK(t.numel() == 1 && t.is_floating_point(), "fastreg::", op, ": ", name,
              " must be one floating-point element, got ", t.scalar_type(), " of shape ", t.sizes());
  if (t.device().is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fastreg_host_scalar",
                                    [&] { value = static_cast<double>(*t.const_data_ptr<scalar_t>()); });
    return;
  }
  TORCH_CHECK(t.device() == device, "fastreg::", op, ": ", name, " is on ", t.device(), " but params are on ", device);
  ptr = t.data_ptr();
  code = dtype_code(t.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// The ops over a device table (both paths)

std::tuple<at::Tensor, at::Tensor> run_norms(const TablePtr& table, at::ScalarType dtype) {
  const at::Device device = table->device();
  const auto options = accumulate_options(dtype, device);
  at::Tensor abs_sums = at::empty({table->num_tensors()}, options);
  at::Tensor sq_sums = at::empty({table->num_tensors()}, options);
  if (table->num_items() == 0) {
    return {abs_sums, sq_sums};
  }
  const c10::cuda::CUDAGuard guard(device);
  const Launch l(table);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_norms_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    Needs needs;
    needs.items = true;
    Scratch<acc_t> scratch(*table, needs);
    scratch.ws.tensor_abs = abs_sums.data_ptr<acc_t>();
    scratch.ws.tensor_sq = sq_sums.data_ptr<acc_t>();
    const Params p{};
    launch_items<PenaltyOp<Kind::kSums, false, false, false, scalar_t>>(l, p, scratch.ws);
    if (table->num_split_groups() > 0) {
      launch_finalize<acc_t>(l, p, scratch.ws, nullptr);
    }
  });
  return {abs_sums, sq_sums};
}

at::Tensor run_value(const TablePtr& table, at::ScalarType dtype, const Coefs& coefs) {
  const at::Device device = table->device();
  const auto options = accumulate_options(dtype, device);
  if (coefs.is_zero() || table->num_items() == 0) {
    return at::zeros({}, options);
  }
  at::Tensor out = at::empty({}, options);
  const c10::cuda::CUDAGuard guard(device);
  const Launch l(table);
  const bool groups = coefs.group_lasso != 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_value_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    Needs needs;
    needs.items = needs.totals = true;
    needs.norms = groups;
    const Scratch<acc_t> scratch(*table, needs);
    const Params p = make_params(coefs);
    if (groups) {
      launch_items<PenaltyOp<Kind::kSums, false, false, true, scalar_t>>(l, p, scratch.ws);
    } else {
      launch_items<PenaltyOp<Kind::kSums, false, false, false, scalar_t>>(l, p, scratch.ws);
    }
    launch_finalize<acc_t>(l, p, scratch.ws, out.data_ptr<acc_t>());
  });
  return out;
}

// dP/dw of pointer row 0 into pointer row 1 (kAccumulate: added to it; else times
// grad_output); P into `value` if given. Without group lasso one pass reads w (and g) once and
// also makes the sums for P, in the layout and order value() uses, so the two give the same bits.
template <bool kAccumulate>
void run_gradient(const TablePtr& table, at::ScalarType dtype, const Coefs& coefs, const Params& p, at::Tensor* value) {
  TORCH_INTERNAL_ASSERT(kAccumulate || value == nullptr, "fastreg: P comes with the coupled gradient only");
  if (table->num_items() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(table->device());
  const Launch l(table);
  const bool groups = coefs.group_lasso != 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_gradient_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    acc_t* value_ptr = value != nullptr ? value->data_ptr<acc_t>() : nullptr;
    Needs needs;
    needs.totals = value != nullptr;
    if (!groups) {
      needs.items = value != nullptr;
      const Scratch<acc_t> scratch(*table, needs);
      // Only the coupled op wants P, so the backward's kernels never carry the sums.
      if constexpr (kAccumulate) {
        if (value != nullptr) {
          launch_items<PenaltyOp<Kind::kGrad, kAccumulate, true, false, scalar_t>>(l, p, scratch.ws);
          launch_finalize<acc_t>(l, p, scratch.ws, value_ptr);
          return;
        }
      }
      launch_items<PenaltyOp<Kind::kGrad, kAccumulate, false, false, scalar_t>>(l, p, scratch.ws);
      return;
    }
    needs.items = needs.group_scale = true;
    needs.norms = value != nullptr;
    const Scratch<acc_t> scratch(*table, needs);
    launch_items<PenaltyOp<Kind::kSums, false, false, true, scalar_t>>(l, p, scratch.ws);
    if (value != nullptr || table->num_split_groups() > 0) {
      launch_finalize<acc_t>(l, p, scratch.ws, value_ptr);
    }
    launch_items<PenaltyOp<Kind::kGrad, kAccumulate, false, true, scalar_t>>(l, p, scratch.ws);
  });
}

void run_decay(const TablePtr& table, at::ScalarType dtype, const Coefs& coefs, Params p) {
  if (coefs.is_zero() || table->num_items() == 0) {
    return;
  }
  p.decay = true;
  const c10::cuda::CUDAGuard guard(table->device());
  const Launch l(table);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_decay_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    if (coefs.group_lasso == 0.0) {
      launch_items<PenaltyOp<Kind::kDecay, false, false, false, scalar_t>>(l, p, Workspace<acc_t>{});
      return;
    }
    // Block shrink uses the norm of the already thresholded group, so the sums pass applies
    // steps 1-2 in registers and the update pass applies them again before scaling.
    Needs needs;
    needs.items = needs.group_scale = true;
    const Scratch<acc_t> scratch(*table, needs);
    launch_items<PenaltyOp<Kind::kSums, false, false, true, scalar_t>>(l, p, scratch.ws);
    if (table->num_split_groups() > 0) {
      launch_finalize<acc_t>(l, p, scratch.ws, nullptr);
    }
    launch_items<PenaltyOp<Kind::kDecay, false, false, true, scalar_t>>(l, p, scratch.ws);
  });
}

void check_table(const TablePtr& table, int64_t lists, const char* op) {
  TORCH_CHECK(table != nullptr, "fastreg::", op, ": no table");
  TORCH_CHECK(table->num_lists() >= lists, "fastreg::", op, ": the table has ", table->num_lists(),
              " pointer rows, the op needs ", lists);
}

Coefs coefs_of(const TablePtr& table, double l1, double l2, double group_lasso) {
  return make_coefs(l1, l2, group_lasso, table->row_groups() ? std::optional<int64_t>(0) : std::nullopt);
}

// ---------------------------------------------------------------------------------------------
// Fused optimizer steps

template <typename Update>
void launch_pass(const Launch& l, const StepParams& h, StepSums sums,
                 const Workspace<acc_of<typename Update::scalar_type>>& ws) {
  switch (sums) {
    case StepSums::kNone:
      launch_items<StepOp<Update, StepSums::kNone>>(l, h, ws);
      return;
    case StepSums::kPenalty:
      launch_items<StepOp<Update, StepSums::kPenalty>>(l, h, ws);
      return;
    case StepSums::kShrink:
      launch_items<StepOp<Update, StepSums::kShrink>>(l, h, ws);
      return;
  }
}

// A step's launches, on the current stream: with `steps` (Adam) the steps kernel; the step's
// pass; the finalize, for the penalty and the shrink factors of split groups; the group shrink.
// `state`: the optimizer's optional row (amsgrad's maximum, SGD's momentum buffer). Returns the
// penalty of the starting weights when `track`, else an undefined tensor.
template <template <typename, bool> class Update>
at::Tensor run_step(const TablePtr& table, at::ScalarType dtype, bool state, bool steps, const StepParams& h,
                    const Coefs& penalty, bool track) {
  const bool items = table->num_items() > 0;
  const bool sums = track && !penalty.is_zero() && items;
  const bool shrink = h.prox.group_lasso != 0.0 && items;
  const auto options = accumulate_options(dtype, table->device());
  at::Tensor value = !track ? at::Tensor() : sums ? at::empty({}, options) : at::zeros({}, options);
  if (!items && !(steps && table->num_tensors() > 0)) {
    return value;
  }
  const Launch l(table);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_step_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    Needs needs;
    needs.items = sums || shrink;
    needs.norms = sums && shrink;  // the penalty's group lasso is the shrink's
    needs.totals = sums;
    needs.group_scale = needs.end_sums = shrink;
    needs.steps = steps;
    const Scratch<acc_t> scratch(*table, needs);
    if (steps) {
      launch_steps<acc_t>(l, h, scratch.ws);
    }
    if (!items) {
      return;
    }
    const StepSums mode = shrink ? StepSums::kShrink : sums ? StepSums::kPenalty : StepSums::kNone;
    if (state) {
      launch_pass<Update<scalar_t, true>>(l, h, mode, scratch.ws);
    } else {
      launch_pass<Update<scalar_t, false>>(l, h, mode, scratch.ws);
    }
    if (sums || (shrink && table->num_split_groups() > 0)) {
      // The finalize reads l2 only as the penalty's coefficient: the shrink's factors take none.
      Params p = h.prox;
      p.l2 = penalty.l2;
      launch_finalize<acc_t>(l, p, scratch.ws, sums ? value.data_ptr<acc_t>() : nullptr);
    }
    if (shrink) {
      launch_items<ShrinkOp<scalar_t>>(l, h, scratch.ws);
    }
  });
  return value;
}

// ---------------------------------------------------------------------------------------------
// Device tables

// Tables read by a captured CUDA graph: kept for the life of the process, since the graph
// holds their address and may be replayed after the plan or cache that made them is gone.
std::mutex captured_mutex;
std::vector<std::shared_ptr<const DeviceTable>> captured_tables;

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// The list ops' tables, by a key of what a table's words are a function of: the device, the
// row grouping and pointer rows, and every tensor's address and extent. Least recently used
// dropped first; a table in use by a running kernel stays alive through prepare_use().
class ListTableCache {
 public:
  static constexpr size_t kCapacity = 64;

  TablePtr get(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>* second, bool row_groups,
               const at::Device& device) {
    std::vector<int64_t> key;
    key.reserve(4 + params.size() * 4);
    key.insert(key.end(), {device.index(), row_groups ? 1 : 0, second != nullptr ? 2 : 1,
                           static_cast<int64_t>(params.size())});
    std::vector<plan::Extent> extents;
    extents.reserve(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const plan::Extent e = plan::extent_of(params[i]);
      extents.push_back(e);
      key.insert(key.end(), {address(params[i]), e.numel, e.rows});
      if (second != nullptr) {
        key.push_back(address((*second)[i]));
      }
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (it->first == key) {
          entries_.splice(entries_.begin(), entries_, it);
          ++hits_;
          return entries_.front().second;
        }
      }
      ++misses_;
    }
    at::Tensor host = plan::build(extents, row_groups, second != nullptr ? 2 : 1, kChunk, kMaxGroups);
    plan::set_ptrs(host, 0, params);
    if (second != nullptr) {
      plan::set_ptrs(host, 1, *second);
    }
    const bool in_capture = capturing(stream);
    auto table = std::make_shared<DeviceTable>(host, device, in_capture);
    if (!in_capture) {  // its words exist only in the graph's replays
      std::lock_guard<std::mutex> lock(mutex_);
      entries_.emplace_front(std::move(key), table);
      while (entries_.size() > kCapacity) {
        entries_.pop_back();
      }
    }
    return table;
  }

  CacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(entries_.size()), hits_, misses_};
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
  }

 private:
  static int64_t address(const at::Tensor& t) {
    return t.numel() == 0 ? 0 : reinterpret_cast<int64_t>(t.data_ptr());
  }

  std::mutex mutex_;
  std::list<std::pair<std::vector<int64_t>, TablePtr>> entries_;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

ListTableCache& list_tables() {
  static ListTableCache cache;
  return cache;
}

// ---------------------------------------------------------------------------------------------
// The list ops (torch.ops.fastreg on CUDA tensors): the layout built for the call, over
// contiguous stand-ins of the tensors, its device table cached.

// group_dim only matters to the group-lasso term; without it every tensor is one group, so value
// and add_grad_ share one layout and return bit-identical values.
bool row_groups_of(const Coefs& coefs) { return coefs.row_groups && coefs.group_lasso != 0.0; }

std::tuple<at::Tensor, at::Tensor> norms_cuda(at::TensorList params) {
  check_params(params, c10::DeviceType::CUDA, "norms");
  if (params.empty()) {
    const auto options = at::TensorOptions().dtype(at::kFloat);
    return {at::empty({0}, options), at::empty({0}, options)};
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Contiguous c(params);
  return run_norms(list_tables().get(c.tensors, nullptr, false, params[0].device()), params[0].scalar_type());
}

at::Tensor value_cuda(at::TensorList params, double l1, double l2, double group_lasso, std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CUDA, "value");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  if (params.empty() || coefs.is_zero()) {
    return at::zeros({}, params.empty() ? at::TensorOptions().dtype(at::kFloat)
                                        : accumulate_options(params[0].scalar_type(), params[0].device()));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Contiguous c(params);
  const auto table = list_tables().get(c.tensors, nullptr, row_groups_of(coefs), params[0].device());
  return run_value(table, params[0].scalar_type(), coefs);
}

at::Tensor add_grad_cuda(at::TensorList params, at::TensorList grads, double l1, double l2, double group_lasso,
                         std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CUDA, "add_grad_");
  check_grads(params, grads, "add_grad_");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  if (params.empty() || coefs.is_zero()) {
    return at::zeros({}, params.empty() ? at::TensorOptions().dtype(at::kFloat)
                                        : accumulate_options(params[0].scalar_type(), params[0].device()));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor value = at::empty({}, accumulate_options(params[0].scalar_type(), params[0].device()));
  const Contiguous w(params);
  const Contiguous g(grads);
  const auto table = list_tables().get(w.tensors, &g.tensors, row_groups_of(coefs), params[0].device());
  run_gradient<true>(table, params[0].scalar_type(), coefs, make_params(coefs), &value);
  g.write_back(grads);
  return value;
}

std::vector<at::Tensor> penalty_backward_cuda(at::TensorList params, const at::Tensor& grad_output, double l1,
                                              double l2, double group_lasso, std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CUDA, "penalty_backward");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  TORCH_CHECK(grad_output.numel() == 1, "fastreg::penalty_backward: grad_output must have one element, got shape ",
              grad_output.sizes());
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (const auto& p : params) {
    out.push_back(at::empty(p.sizes(), p.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  if (params.empty()) {
    return out;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  Params p = make_params(coefs);
  scalar_argument(grad_output, params[0].device(), "penalty_backward", "grad_output", p.grad_output, p.go_ptr,
                  p.go_dtype);
  const Contiguous w(params);
  const auto table = list_tables().get(w.tensors, &out, row_groups_of(coefs), params[0].device());
  run_gradient<false>(table, params[0].scalar_type(), coefs, p, nullptr);
  return out;
}

// The lr of decay_ and the optimizer steps: a float, or a one-element tensor (CUDA: read by the
// kernels).
Params lr_params(const Coefs& coefs, double lr, const std::optional<at::Tensor>& lr_tensor, const at::Device& device,
                 const char* op) {
  Params p = make_params(coefs);
  p.lr = lr;
  if (lr_tensor.has_value()) {
    p.lr_tensor = true;
    scalar_argument(*lr_tensor, device, op, "lr_tensor", p.lr, p.lr_ptr, p.lr_dtype);
  }
  return p;
}

void decay_cuda(at::TensorList params, double lr, const std::optional<at::Tensor>& lr_tensor, double l1, double l2,
                double group_lasso, std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CUDA, "decay_");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  if (params.empty()) {
    return;
  }
  const Params p = lr_params(coefs, lr, lr_tensor, params[0].device(), "decay_");
  if (coefs.is_zero()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Contiguous c(params);
  const auto table = list_tables().get(c.tensors, nullptr, row_groups_of(coefs), params[0].device());
  run_decay(table, params[0].scalar_type(), coefs, p);
  c.write_back(params);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// DeviceTable

struct DeviceTable::Sync {
  std::mutex mutex;
  cudaStream_t stream = nullptr;  // where the words were copied
  cudaEvent_t ready = nullptr;    // recorded after the copy (none for a table built in a capture)
  std::vector<cudaStream_t> streams;  // other streams that have waited for it and recorded it
  bool kept = false;                  // in captured_tables
};

namespace {

void check_host_table(const at::Tensor& host) {
  TORCH_CHECK(host.is_cpu() && host.scalar_type() == at::kLong && host.dim() == 1 && host.is_contiguous() &&
                  host.numel() >= plan::kHeaderWords && host.data_ptr<int64_t>()[plan::kWords] == host.numel(),
              "fastreg: host is not a work-layout table (an int64 CPU tensor from the planner's layout()), got ",
              host.scalar_type(), " of shape ", host.sizes(), " on ", host.device());
  TORCH_CHECK(host.data_ptr<int64_t>()[plan::kChunk] <= kMaxChunk, "fastreg: the CUDA kernels take work items of at most ",
              kMaxChunk, " elements, the table has ", host.data_ptr<int64_t>()[plan::kChunk]);
}

}  // namespace

DeviceTable::DeviceTable(const at::Tensor& host, const at::Device& device, bool for_capture)
    : host_(host), device_(device), sync_(std::make_unique<Sync>()) {
  check_host_table(host);
  TORCH_CHECK(device.is_cuda() && device.has_index(), "fastreg: a device table needs a CUDA device with an index, got ",
              device);
  std::copy_n(host.data_ptr<int64_t>(), plan::kHeaderWords, header_);
  const plan::View view(host);
  std::vector<int64_t> split;
  for (int64_t g = 0; g < view.num_groups(); ++g) {
    if (view.split(g)) {
      split.push_back(g);
    }
  }
  split_groups_ = static_cast<int64_t>(split.size());
  const int64_t words = host.numel();
  const int64_t total = words + split_groups_;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  sync_->stream = stream;
  words_ = at::empty({total}, at::TensorOptions().dtype(at::kLong).device(device));
  std::vector<int64_t> all(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + words);
  all.insert(all.end(), split.begin(), split.end());
  if (for_capture) {
    int64_t* dst = words_.data_ptr<int64_t>();
    for (int64_t at = 0; at < total; at += kFillWords) {
      FillWords piece;
      const int count = static_cast<int>(std::min<int64_t>(kFillWords, total - at));
      std::copy_n(all.data() + at, count, piece.w);
      fill_kernel<<<1, 128, 0, stream>>>(dst + at, piece, count);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return;
  }
  // Pinned staging from torch's caching host allocator, which keeps it from reuse until the copy
  // is done: the copy does not wait, and the staging buffer can be dropped at once.
  at::Tensor staging = at::empty({total}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(all.begin(), all.end(), staging.data_ptr<int64_t>());
  words_.copy_(staging, /*non_blocking=*/true);
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&sync_->ready, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(sync_->ready, stream));
}

DeviceTable::~DeviceTable() {
  if (sync_ != nullptr && sync_->ready != nullptr) {
    // No check: destructors must not throw, and a failure here leaks one event at worst.
    cudaEventDestroy(sync_->ready);
  }
}

void DeviceTable::prepare_use() const {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
  const bool in_capture = capturing(stream);
  std::lock_guard<std::mutex> lock(sync_->mutex);
  if (in_capture && !sync_->kept) {
    std::lock_guard<std::mutex> kept_lock(captured_mutex);
    captured_tables.push_back(shared_from_this());
    sync_->kept = true;
  }
  if (stream == sync_->stream || std::find(sync_->streams.begin(), sync_->streams.end(), stream) != sync_->streams.end()) {
    return;
  }
  // A capture starts after the device synchronized (torch.cuda.graph), so the copy is done; and
  // a capture may not wait for work recorded outside it.
  if (!in_capture && sync_->ready != nullptr) {
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, sync_->ready, 0));
  }
  words_.record_stream(c10::cuda::getCurrentCUDAStream(device_.index()));
  sync_->streams.push_back(stream);
}

TablePtr table_to_device(const at::Tensor& host, const at::Device& device) {
  check_host_table(host);
  TORCH_CHECK(device.is_cuda(), "fastreg: the cuda backend's tables live on CUDA devices, got ", device);
  const at::Device target = device.has_index() ? device : at::Device(at::kCUDA, c10::cuda::current_device());
  const c10::cuda::CUDAGuard guard(target);
  TORCH_CHECK(!capturing(c10::cuda::getCurrentCUDAStream(target.index()).stream()),
              "fastreg: a new tensor list was given to a fastreg call while a CUDA graph is being captured; its "
              "work-layout table must be built before the capture: run the call once before capturing it (as "
              "torch.cuda.graph's warm-up on a side stream does)");
  return std::make_shared<DeviceTable>(host, target, false);
}

std::tuple<at::Tensor, at::Tensor> table_norms(const TablePtr& table, at::ScalarType dtype) {
  check_table(table, 1, "norms");
  TORCH_CHECK(!table->row_groups(), "fastreg::norms: the table has row groups; per-tensor sums need a table without");
  return run_norms(table, dtype);
}

at::Tensor table_value(const TablePtr& table, at::ScalarType dtype, double l1, double l2, double group_lasso) {
  check_table(table, 1, "value");
  return run_value(table, dtype, coefs_of(table, l1, l2, group_lasso));
}

at::Tensor table_add_grad(const TablePtr& table, at::ScalarType dtype, double l1, double l2, double group_lasso) {
  check_table(table, 2, "add_grad_");
  const Coefs coefs = coefs_of(table, l1, l2, group_lasso);
  const auto options = accumulate_options(dtype, table->device());
  if (coefs.is_zero() || table->num_items() == 0) {
    return at::zeros({}, options);
  }
  at::Tensor value = at::empty({}, options);
  run_gradient<true>(table, dtype, coefs, make_params(coefs), &value);
  return value;
}

void table_decay(const TablePtr& table, at::ScalarType dtype, double lr, const std::optional<at::Tensor>& lr_tensor,
                 double l1, double l2, double group_lasso) {
  check_table(table, 1, "decay_");
  const Coefs coefs = coefs_of(table, l1, l2, group_lasso);
  run_decay(table, dtype, coefs, lr_params(coefs, lr, lr_tensor, table->device(), "decay_"));
}

namespace {

void check_dtype(at::ScalarType dtype, const char* op) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastreg::", op, ": dtype must be float16, bfloat16, float32 or float64, got ", dtype);
}

void check_step_rows(const TablePtr& table, int64_t rows, const char* op, const char* setting, const char* names) {
  TORCH_CHECK(table != nullptr, "fastreg::", op, ": no table");
  TORCH_CHECK(table->num_lists() >= rows, "fastreg::", op, ": the table has ", table->num_lists(),
              " pointer rows; ", setting, " needs ", rows, " (", names, ")");
}

// GradScaler's tensors: one float32 element on the table's device, read by the kernels.
const float* scaler_argument(const std::optional<at::Tensor>& t, const at::Device& device, const char* op,
                             const char* name) {
  if (!t.has_value()) {
    return nullptr;
  }
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, "fastreg::", op, ": ", name,
              " must be one float32 element, got ", t->scalar_type(), " of shape ", t->sizes());
  TORCH_CHECK(t->device() == device, "fastreg::", op, ": ", name, " is on ", t->device(), " but the table is on ",
              device);
  return t->const_data_ptr<float>();
}

// What both steps check and take alike: the dtype, fastreg's terms, the lr and GradScaler's
// tensors. Launches nothing.
StepParams step_params(const TablePtr& table, at::ScalarType dtype, double lr, const std::optional<at::Tensor>& lr_tensor,
                       bool maximize, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, const Coefs& prox, double penalty_l2,
                       const char* op) {
  check_dtype(dtype, op);
  TORCH_CHECK(penalty_l2 >= 0.0, "fastreg::", op, ": penalty_l2 must be non-negative, got ", penalty_l2);
  StepParams h{};
  h.prox = lr_params(prox, lr, lr_tensor, table->device(), op);
  h.prox.decay = true;
  h.maximize = maximize;
  h.grad_scale = scaler_argument(grad_scale, table->device(), op, "grad_scale");
  h.found_inf = scaler_argument(found_inf, table->device(), op, "found_inf");
  return h;
}

}  // namespace

at::Tensor table_adam_step(const TablePtr& table, at::ScalarType dtype, double lr,
                           const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                           double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                           double l1, double l2, double group_lasso, double penalty_l2, bool track) {
  constexpr const char* op = "adam_step_";
  if (amsgrad) {
    check_step_rows(table, kMaxExpAvgSq + 1, op, "amsgrad",
                    "params, grads, exp_avg, exp_avg_sq, step, max_exp_avg_sq");
  } else {
    check_step_rows(table, kStep + 1, op, "Adam", "params, grads, exp_avg, exp_avg_sq, step");
  }
  const c10::cuda::CUDAGuard guard(table->device());
  TORCH_CHECK(weight_decay >= 0.0 && eps >= 0.0 && beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
              "fastreg::", op, ": bad hyperparameters weight_decay=", weight_decay, " eps=", eps, " betas=(", beta1,
              ", ", beta2, ")");
  StepParams h = step_params(table, dtype, lr, lr_tensor, maximize, grad_scale, found_inf,
                             coefs_of(table, l1, l2, group_lasso), penalty_l2, op);
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.weight_decay = weight_decay;
  h.decoupled = decoupled;
  return run_step<AdamUpdate>(table, dtype, amsgrad, true, h, coefs_of(table, l1, penalty_l2, group_lasso), track);
}

at::Tensor table_sgd_step(const TablePtr& table, at::ScalarType dtype, double lr,
                          const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                          double weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor>& first,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                          double l1, double l2, double group_lasso, double penalty_l2, bool track) {
  constexpr const char* op = "sgd_step_";
  const bool use_momentum = momentum != 0.0;
  if (use_momentum) {
    check_step_rows(table, kMomentumBuffer + 1, op, "momentum", "params, grads, momentum_buffer");
  } else {
    check_step_rows(table, kSgdGrad + 1, op, "SGD", "params, grads");
  }
  const c10::cuda::CUDAGuard guard(table->device());
  TORCH_CHECK(weight_decay >= 0.0 && momentum >= 0.0 && (!nesterov || (momentum > 0.0 && dampening == 0.0)),
              "fastreg::", op, ": bad hyperparameters weight_decay=", weight_decay, " momentum=", momentum,
              " dampening=", dampening, " nesterov=", nesterov);
  StepParams h = step_params(table, dtype, lr, lr_tensor, maximize, grad_scale, found_inf,
                             coefs_of(table, l1, l2, group_lasso), penalty_l2, op);
  h.momentum = momentum;
  h.dampening = dampening;
  h.weight_decay = weight_decay;
  h.nesterov = nesterov;
  const int64_t count = table->num_tensors();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(table->device().index()).stream();
  if (first.has_value()) {
    TORCH_CHECK(first->scalar_type() == at::kBool && first->dim() == 1 && first->numel() == count, "fastreg::", op,
                ": first must be a bool tensor of one flag per tensor (", count, "), got ", first->scalar_type(),
                " of shape ", first->sizes());
    TORCH_CHECK(first->is_cpu() || first->device() == table->device(), "fastreg::", op, ": first is on ",
                first->device(), " but the table is on ", table->device());
    // A captured copy would replay from host memory the graph does not own.
    TORCH_CHECK(!first->is_cpu() || !capturing(stream), "fastreg::", op,
                ": a CPU first cannot be captured in a CUDA graph; pass it on the table's device");
  }
  at::Tensor flags;
  if (first.has_value() && use_momentum && table->num_items() > 0) {
    if (first->is_cpu()) {
      // Pinned staging from torch's caching host allocator, which keeps it from reuse until the
      // copy is done: the copy does not wait.
      at::Tensor staging = at::empty({count}, at::TensorOptions().dtype(at::kBool).pinned_memory(true));
      staging.copy_(*first);
      flags = at::empty({count}, at::TensorOptions().dtype(at::kBool).device(table->device()));
      flags.copy_(staging, /*non_blocking=*/true);
    } else {
      flags = first->contiguous();
    }
    h.first = flags.const_data_ptr<bool>();
  }
  return run_step<SgdUpdate>(table, dtype, use_momentum, false, h, coefs_of(table, l1, penalty_l2, group_lasso),
                             track);
}

CacheStats list_table_cache_stats() { return list_tables().stats(); }

void clear_list_table_cache() { list_tables().clear(); }

std::vector<KernelInfo> kernel_info(int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  std::lock_guard<std::mutex> lock(kernels_mutex());
  std::vector<KernelInfo> out;
  for (const auto& [kernel, record] : kernel_records()) {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, record.threads, 0));
    out.push_back({record.name, attributes.numRegs, static_cast<int>(attributes.localSizeBytes), record.threads,
                   attributes.maxThreadsPerBlock, per_sm});
  }
  return out;
}

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("norms", &norms_cuda);
  m.impl("value", &value_cuda);
  m.impl("add_grad_", &add_grad_cuda);
  m.impl("decay_", &decay_cuda);
  m.impl("penalty_backward", &penalty_backward_cuda);
}

}  // namespace cuda
}  // namespace fastreg
