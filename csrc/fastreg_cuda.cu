// CUDA kernels for the fastreg ops (schemas in ops.cpp, CPU twin in fastreg_cpu.cpp).
//
// Multi-tensor apply: every tensor of a call is cut into work items of at most 64K elements
// (kChunk), and the launch arguments carry a table of the tensors (addresses, int64 sizes, the
// index of each tensor's first item). Blocks stride over the items of the launch and find an
// item's tensor by binary search in that table, so one launch covers any number of elements;
// only the tensor count per launch is bounded by the kernel-parameter space (32 KB with CUDA
// 12.1+ on Volta and newer, else 4 KB), and longer lists take several launches. Nothing is
// copied from the host to the device per call, so a call can be captured in a CUDA graph.
//
// Reductions are deterministic: each item writes its partial sums (abs, squares) to a buffer,
// in a thread -> element assignment that depends only on the item's length, and a second small
// kernel combines them in a fixed order. Group lasso needs each group's norm before its update,
// so those ops run a sums pass, the finalize kernel (norms, per-group scale factors, value) and
// an update pass, all inside one op call and on the current stream.
//
// Elementwise math mirrors fastreg_cpu.cpp operation for operation, which products are fused
// included; the build passes --fmad=false so that nvcc fuses nothing the source does not.
#include "fastreg.h"

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
#include <mutex>
#include <optional>
#include <vector>

// Kernel-parameter space for the tensor table. CUDA 12.1 raised the limit from 4,096 to 32,764
// bytes for devices of compute capability 7.0 and newer; the build passes 4096 when it also
// targets older architectures.
#ifndef FASTREG_KERNEL_PARAM_BYTES
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
#define FASTREG_KERNEL_PARAM_BYTES 32764
#else
#define FASTREG_KERNEL_PARAM_BYTES 4096
#endif
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700 && FASTREG_KERNEL_PARAM_BYTES > 4096
#error "fastreg: kernel parameters over 4 KB need compute capability 7.0+; build with -DFASTREG_KERNEL_PARAM_BYTES=4096"
#endif

// __grid_constant__ lets the kernel index the table in parameter space; without it, taking
// the table's address would copy all of it into local memory in every thread.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 11 || (__CUDACC_VER_MAJOR__ == 11 && __CUDACC_VER_MINOR__ >= 7)) && \
    (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700)
#define FASTREG_GRID_CONSTANT __grid_constant__
#else
#define FASTREG_GRID_CONSTANT
#endif

namespace fastreg {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kFinalizeThreads = 1024;
// Groups of at least this many elements are reduced by the whole block, one after the other;
// shorter ones by one warp each, and groups under a warp's width by one thread each.
constexpr int64_t kBlockGroup = 2048;
constexpr int64_t kWarpGroup = 32;
// Packs (16 bytes each) a thread loads before it uses any, to keep enough reads in flight.
constexpr int kUnroll = 4;

// ---------------------------------------------------------------------------------------------
// Launch arguments

// Per-call scalars. A learning rate or grad_output held in a device tensor is read by the
// kernels (lr_ptr / go_ptr), never copied to the host.
struct Params {
  double l1;
  double l2;
  double group_lasso;
  double lr;
  const void* lr_ptr;
  int lr_dtype;
  double grad_output;
  const void* go_ptr;
  int go_dtype;
  bool prefix;  // the sums pass applies decay steps 1-2 first (norms of the thresholded groups)
};

// Scratch buffers of one op call, all in the accumulate dtype or int64.
template <typename acc_t>
struct Workspace {
  acc_t* item_abs;        // per item: sum |w|
  acc_t* item_sq;         // per item: sum w^2
  acc_t* group_sq;        // per group that fits in one item: sum w^2
  int64_t* group_first;   // per group cut into several items: its first item ...
  int64_t* group_count;   // ... and how many (0: group_sq holds the group's sum)
  acc_t* group_scale;     // per group: the factor of the update pass
  int64_t* tensor_first;  // per tensor (norms only): first item and item count
  int64_t* tensor_count;
};

constexpr int kParamReserve = 512;  // Params and Workspace, with room to spare
constexpr int kTableHeader = 16;
constexpr int kBytesPerTensor = 6 * 8 + 4;
constexpr int kMaxTensors = (FASTREG_KERNEL_PARAM_BYTES - kParamReserve - kTableHeader - 8) / kBytesPerTensor;

struct Table {
  int64_t item_begin[kMaxTensors + 1];  // launch-local index of each tensor's first item; [count] = items
  void* w[kMaxTensors];
  void* out[kMaxTensors];  // grads (accumulate) or the new gradient tensors (backward)
  int64_t group_len[kMaxTensors];
  int64_t num_groups[kMaxTensors];
  int64_t group_offset[kMaxTensors];  // index of the tensor's first group among all of the call
  int32_t index[kMaxTensors];         // the tensor's position in the op's list
  int32_t count;
  int64_t item_base;  // global index of the launch's first item
};

static_assert(sizeof(Table) + sizeof(Params) + sizeof(Workspace<double>) <= FASTREG_KERNEL_PARAM_BYTES,
              "the launch arguments must fit the kernel-parameter space");

// ---------------------------------------------------------------------------------------------
// Device helpers

enum class Kind { kSums, kGrad, kDecay };
enum class Scales { kNone, kGrad, kDecay };

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
__device__ __forceinline__ acc_t load_scalar(const void* p, int code, double fallback) {
  if (p == nullptr) {
    return static_cast<acc_t>(fallback);
  }
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
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sums each of v[0..N) over the block in a fixed order; thread 0 holds the results. Every
// thread of the block must call it; it leaves the shared buffer free for the next call.
template <int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N]) {
  __shared__ alignas(16) unsigned char raw[N * 32 * sizeof(double)];
  T* shared = reinterpret_cast<T*>(raw);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = warp_sum(v[i]);
    if (lane == 0) {
      shared[i * 32 + warp] = v[i];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      v[i] = warp_sum(lane < warps ? shared[i * 32 + lane] : T(0));
    }
  }
  __syncthreads();
}

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// A pack of kSize elements: one 16-byte access when aligned and whole, else element by element
// (never past `left`). Which path runs does not change which thread sees which element.
template <typename T>
__device__ __forceinline__ void load_pack(T (&dst)[Pack<T>::kSize], const T* src, int64_t left, bool aligned) {
  constexpr int n = Pack<T>::kSize;
  if (aligned && left >= n) {
    const Pack<T> p = *reinterpret_cast<const Pack<T>*>(src);
#pragma unroll
    for (int j = 0; j < n; ++j) {
      dst[j] = p.v[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < n; ++j) {
      dst[j] = j < left ? src[j] : T(0.0f);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* dst, const T (&src)[Pack<T>::kSize], int64_t left, bool aligned) {
  constexpr int n = Pack<T>::kSize;
  if (aligned && left >= n) {
    Pack<T> p;
#pragma unroll
    for (int j = 0; j < n; ++j) {
      p.v[j] = src[j];
    }
    *reinterpret_cast<Pack<T>*>(dst) = p;
  } else {
#pragma unroll
    for (int j = 0; j < n; ++j) {
      if (j < left) {
        dst[j] = src[j];
      }
    }
  }
}

// The per-call constants of the elementwise math, in the accumulate dtype.
template <typename acc_t>
struct Ctx {
  bool use_l1;      // gradient: an l1 term
  bool use_w;       // gradient: an l2 or group-lasso term, d += w * scale
  bool fused;       // gradient: no group lasso, so d = fma(w, l2, l1 * sign(w)) as on CPU
  bool use_l2;      // decay step 1
  bool use_thr;     // decay step 2
  bool prefix;      // sums pass: apply decay steps 1-2 before summing
  acc_t l1;
  acc_t go;         // penalty backward: grad_output
  acc_t factor;     // 1 - lr * l2
  acc_t threshold;  // lr * l1
  acc_t shrink_threshold;  // lr * group_lasso
  acc_t base_scale;        // the gradient's scale without group lasso: l2
};

// A float lr was combined with the coefficients in double by the host, like the CPU kernels
// and the torch backend do with a Python float; an lr tensor takes part in the arithmetic in
// the accumulate dtype, like the torch backend's tensor ops.
template <typename acc_t>
__device__ Ctx<acc_t> make_ctx(const Params& p) {
  Ctx<acc_t> c;
  c.use_l1 = p.l1 != 0.0;
  c.use_w = p.l2 != 0.0 || p.group_lasso != 0.0;
  c.fused = p.group_lasso == 0.0;
  c.use_l2 = p.l2 != 0.0;
  c.use_thr = p.l1 != 0.0;
  c.prefix = p.prefix;
  c.l1 = static_cast<acc_t>(p.l1);
  c.go = load_scalar<acc_t>(p.go_ptr, p.go_dtype, p.grad_output);
  c.base_scale = static_cast<acc_t>(p.l2);
  if (p.lr_ptr != nullptr) {
    const acc_t lr = load_scalar<acc_t>(p.lr_ptr, p.lr_dtype, 0.0);
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

// Decay steps 1 and 2: the l2 pre-scale, then the soft threshold max(|x| - t, 0) with x's sign
// (NaN stays NaN, and -0.0 stays -0.0, as in the CPU kernel).
template <typename acc_t>
__device__ __forceinline__ acc_t decay_prefix(acc_t x, const Ctx<acc_t>& c) {
  if (c.use_l2) {
    x = x * c.factor;
  }
  if (c.use_thr) {
    acc_t v = fabs(x) - c.threshold;
    v = v < acc_t(0) ? acc_t(0) : v;
    x = copysign(v, x);
  }
  return x;
}

// Processes elements [0, n) of one range whose elements share one group `scale`; thread
// `rank` of `size` cooperating threads takes packs rank, rank + size, ... and adds its
// elements' |x| and x^2 into (a, q) in that order when the pass reduces.
template <Kind K, bool kAccumulate, bool kWithSums, typename scalar_t, typename acc_t>
__device__ __forceinline__ void run_range(scalar_t* w, scalar_t* out, int64_t n, int rank, int size, const Ctx<acc_t>& c,
                                          acc_t scale, bool shrink, acc_t& a, acc_t& q) {
  constexpr int N = Pack<scalar_t>::kSize;
  constexpr bool kReadOut = K == Kind::kGrad && kAccumulate;
  constexpr bool kReduce = K == Kind::kSums || kWithSums;
  scalar_t* dst = K == Kind::kGrad ? out : w;
  bool aligned = reinterpret_cast<uintptr_t>(w) % 16 == 0;
  if constexpr (K == Kind::kGrad) {
    aligned = aligned && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  }
  const int64_t packs = (n + N - 1) / N;
  const acc_t zero(0);
  for (int64_t base = rank; base < packs; base += static_cast<int64_t>(size) * kUnroll) {
    scalar_t x[kUnroll][N];
    scalar_t g[kUnroll][N];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t pk = base + static_cast<int64_t>(u) * size;
      if (pk < packs) {
        load_pack(x[u], w + pk * N, n - pk * N, aligned);
        if constexpr (kReadOut) {
          load_pack(g[u], out + pk * N, n - pk * N, aligned);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t pk = base + static_cast<int64_t>(u) * size;
      if (pk >= packs) {
        continue;
      }
      const int64_t left = n - pk * N;
      scalar_t y[N];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (j >= left) {
          y[j] = x[u][j];
          continue;
        }
        acc_t xv = static_cast<acc_t>(x[u][j]);
        if constexpr (K == Kind::kSums) {
          if (c.prefix) {
            xv = decay_prefix(xv, c);
          }
        } else if constexpr (K == Kind::kGrad) {
          // Never -0.0, so it stands for the reference's 0 + l1 * sign(x); NaN has sign 0.
          acc_t d = c.use_l1 ? (xv > zero ? c.l1 : zero) - (xv < zero ? c.l1 : zero) : zero;
          if (c.use_w) {
            d = c.fused ? fused_mul_add(xv, scale, d) : d + xv * scale;
          }
          if constexpr (kAccumulate) {
            y[j] = static_cast<scalar_t>(static_cast<acc_t>(g[u][j]) + d);
          } else {
            y[j] = static_cast<scalar_t>(d * c.go);
          }
        } else {
          acc_t v = decay_prefix(xv, c);
          if (shrink) {
            v = v * scale;
          }
          y[j] = static_cast<scalar_t>(v);
        }
        if constexpr (kReduce) {
          a += fabs(xv);
          q = fused_mul_add(xv, xv, q);
        }
      }
      if constexpr (K != Kind::kSums) {
        store_pack(dst + pk * N, y, left, aligned);
      }
    }
  }
}

// One work item: a chunk of a group longer than kChunk, or a run of whole groups. Groups are
// tracked (kGroups) only with group lasso; then the sums pass records each group's sum of
// squares and the update passes read each group's scale.
template <Kind K, bool kAccumulate, bool kWithSums, bool kGroups, typename scalar_t, typename acc_t>
__device__ void process_item(const Table& table, int slot, int64_t k, int64_t item, const Ctx<acc_t>& c,
                             const Workspace<acc_t>& ws) {
  constexpr bool kReduce = K == Kind::kSums || kWithSums;
  constexpr bool kRecordGroups = kGroups && K == Kind::kSums;
  constexpr bool kReadScales = kGroups && K != Kind::kSums;
  scalar_t* w = static_cast<scalar_t*>(table.w[slot]);
  scalar_t* out = static_cast<scalar_t*>(table.out[slot]);
  const int64_t len = table.group_len[slot];
  const int64_t groups = table.num_groups[slot];
  const int64_t goff = table.group_offset[slot];
  const int tid = threadIdx.x;
  const bool shrink = kReadScales && K == Kind::kDecay;

  if (K == Kind::kSums && ws.tensor_first != nullptr && k == 0 && tid == 0) {
    const int t = table.index[slot];
    ws.tensor_first[t] = item;
    ws.tensor_count[t] = table.item_begin[slot + 1] - table.item_begin[slot];
  }

  if (len == 0 || groups == 0) {  // an empty tensor: one item of no elements
    if constexpr (kRecordGroups) {
      for (int64_t g = tid; g < groups; g += blockDim.x) {
        ws.group_sq[goff + g] = acc_t(0);
        ws.group_count[goff + g] = 0;
      }
    }
    if (kReduce && tid == 0) {
      ws.item_abs[item] = acc_t(0);
      ws.item_sq[item] = acc_t(0);
    }
    return;
  }

  if (len >= kChunk) {  // one chunk of a group cut into several items
    const int64_t per_group = (len + kChunk - 1) / kChunk;
    const int64_t g = k / per_group;
    const int64_t part = k - g * per_group;
    const int64_t begin = g * len + part * kChunk;
    const int64_t rest = len - part * kChunk;
    const int64_t n = rest < kChunk ? rest : kChunk;
    const acc_t scale = kReadScales ? ws.group_scale[goff + g] : c.base_scale;
    acc_t v[2] = {acc_t(0), acc_t(0)};
    run_range<K, kAccumulate, kWithSums>(w + begin, out + begin, n, tid, blockDim.x, c, scale, shrink, v[0], v[1]);
    if constexpr (kReduce) {
      block_sum(v);
      if (tid == 0) {
        ws.item_abs[item] = v[0];
        ws.item_sq[item] = v[1];
      }
    }
    if (kRecordGroups && part == 0 && tid == 0) {
      ws.group_first[goff + g] = item;
      ws.group_count[goff + g] = per_group;
    }
    return;
  }

  const int64_t per_item = kChunk / len;
  const int64_t g0 = k * per_item;
  const int64_t g1 = std::min(g0 + per_item, groups);
  acc_t total[2] = {acc_t(0), acc_t(0)};
  if (g1 - g0 == 1 || len >= kBlockGroup) {
    for (int64_t g = g0; g < g1; ++g) {
      const acc_t scale = kReadScales ? ws.group_scale[goff + g] : c.base_scale;
      acc_t v[2] = {acc_t(0), acc_t(0)};
      run_range<K, kAccumulate, kWithSums>(w + g * len, out + g * len, len, tid, blockDim.x, c, scale, shrink, v[0], v[1]);
      if constexpr (kReduce) {
        block_sum(v);
        if (tid == 0) {
          total[0] += v[0];
          total[1] += v[1];
          if constexpr (kRecordGroups) {
            ws.group_sq[goff + g] = v[1];
            ws.group_count[goff + g] = 0;
          }
        }
      }
    }
    if (kReduce && tid == 0) {
      ws.item_abs[item] = total[0];
      ws.item_sq[item] = total[1];
    }
    return;
  }

  // Many short groups: a warp per group, or a thread per group when groups are narrower than a
  // warp. Each group's sum, and each thread's running total, has a fixed order.
  const bool per_warp = len >= kWarpGroup;
  const int lane = tid & 31;
  const int rank = per_warp ? lane : 0;
  const int size = per_warp ? 32 : 1;
  const int64_t first = per_warp ? (tid >> 5) : tid;
  const int64_t stride = per_warp ? (blockDim.x >> 5) : blockDim.x;
  for (int64_t g = g0 + first; g < g1; g += stride) {
    const acc_t scale = kReadScales ? ws.group_scale[goff + g] : c.base_scale;
    acc_t a(0), q(0);
    run_range<K, kAccumulate, kWithSums>(w + g * len, out + g * len, len, rank, size, c, scale, shrink, a, q);
    if constexpr (kReduce) {
      if (per_warp) {
        a = warp_sum(a);
        q = warp_sum(q);
      }
      if (rank == 0) {
        total[0] += a;
        total[1] += q;
        if constexpr (kRecordGroups) {
          ws.group_sq[goff + g] = q;
          ws.group_count[goff + g] = 0;
        }
      }
    }
  }
  if constexpr (kReduce) {
    block_sum(total);
    if (tid == 0) {
      ws.item_abs[item] = total[0];
      ws.item_sq[item] = total[1];
    }
  }
}

template <Kind K, bool kAccumulate, bool kWithSums, bool kGroups, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    items_kernel(const FASTREG_GRID_CONSTANT Table table, const Params params,
                 const Workspace<at::opmath_type<scalar_t>> ws) {
  using acc_t = at::opmath_type<scalar_t>;
  const Ctx<acc_t> c = make_ctx<acc_t>(params);
  const int64_t items = table.item_begin[table.count];
  for (int64_t i = blockIdx.x; i < items; i += gridDim.x) {
    // Every tensor has at least one item, so item_begin is strictly increasing.
    int lo = 0;
    int hi = table.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (table.item_begin[mid] <= i) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    process_item<K, kAccumulate, kWithSums, kGroups, scalar_t>(table, lo, i - table.item_begin[lo],
                                                               table.item_base + i, c, ws);
  }
}

// Per-tensor sums for norms(): a warp per tensor over the tensor's items, in item order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    norms_finalize(const Workspace<acc_t> ws, int64_t tensors, acc_t* abs_out, acc_t* sq_out) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  for (int64_t t = warp; t < tensors; t += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t first = ws.tensor_first[t];
    const int64_t count = ws.tensor_count[t];
    acc_t a(0), q(0);
    for (int64_t j = lane; j < count; j += 32) {
      a += ws.item_abs[first + j];
      q += ws.item_sq[first + j];
    }
    a = warp_sum(a);
    q = warp_sum(q);
    if (lane == 0) {
      abs_out[t] = a;
      sq_out[t] = q;
    }
  }
}

// One block: the totals over all items, every group's norm and the update pass's per-group
// scale, and P. A split group's sum of squares is the sum of its items' partials, in order.
template <typename acc_t, Scales S>
__global__ void __launch_bounds__(kFinalizeThreads)
    totals_finalize(const Workspace<acc_t> ws, int64_t items, int64_t groups, const Params params, acc_t* value) {
  const Ctx<acc_t> c = make_ctx<acc_t>(params);
  const acc_t gl = static_cast<acc_t>(params.group_lasso);
  acc_t v[3] = {acc_t(0), acc_t(0), acc_t(0)};
  if (value != nullptr) {
    for (int64_t i = threadIdx.x; i < items; i += blockDim.x) {
      v[0] += ws.item_abs[i];
      v[1] += ws.item_sq[i];
    }
  }
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    const int64_t count = ws.group_count[g];
    acc_t sq(0);
    if (count == 0) {
      sq = ws.group_sq[g];
    } else {
      const int64_t first = ws.group_first[g];
      for (int64_t j = 0; j < count; ++j) {
        sq += ws.item_sq[first + j];
      }
    }
    const acc_t norm = sqrt(sq);
    v[2] += norm;
    if constexpr (S == Scales::kGrad) {
      // An all-zero group has gradient 0 (1/||w_g|| taken as 0), as does a NaN norm.
      ws.group_scale[g] = c.base_scale + gl * (norm > acc_t(0) ? acc_t(1) / norm : acc_t(0));
    } else if constexpr (S == Scales::kDecay) {
      const acc_t t = c.shrink_threshold;
      ws.group_scale[g] = norm > t ? acc_t(1) - t / norm : acc_t(0);
    }
  }
  if (value == nullptr) {
    return;
  }
  block_sum(v);
  if (threadIdx.x == 0) {
    // P in the torch backend's order: a zero coefficient leaves its term out entirely.
    acc_t p(0);
    if (params.l1 != 0.0) {
      p = p + static_cast<acc_t>(params.l1) * v[0];
    }
    if (params.l2 != 0.0) {
      p = p + static_cast<acc_t>(params.l2 / 2) * v[1];
    }
    if (params.group_lasso != 0.0) {
      p = p + gl * v[2];
    }
    *value = p;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

int blocks_per_launch(int device) {
  static std::mutex mutex;
  static std::vector<int> sm_counts;
  std::lock_guard<std::mutex> lock(mutex);
  if (sm_counts.empty()) {
    sm_counts.assign(c10::cuda::device_count(), 0);
  }
  int& count = sm_counts.at(device);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  }
  return count * (2048 / kThreads);
}

// How a tensor is cut into groups and work items (group_len as in fastreg.h's WorkList; an
// empty tensor still gets one item, so that it has a place in every per-item buffer).
struct Layout {
  int64_t group_len;
  int64_t num_groups;
  int64_t items;
  int64_t group_offset;
};

struct Plan {
  std::vector<Layout> tensors;
  int64_t items = 0;
  int64_t groups = 0;
};

Plan make_plan(const std::vector<at::Tensor>& tensors, bool row_groups) {
  Plan plan;
  plan.tensors.reserve(tensors.size());
  for (const auto& w : tensors) {
    Layout l{};
    if (row_groups && w.dim() >= 2) {
      l.num_groups = w.size(0);
      l.group_len = l.num_groups == 0 ? 0 : w.numel() / l.num_groups;
    } else {
      l.num_groups = 1;
      l.group_len = w.numel();
    }
    if (l.group_len == 0 || l.num_groups == 0) {
      l.items = 1;
    } else if (l.group_len >= kChunk) {
      l.items = l.num_groups * ((l.group_len + kChunk - 1) / kChunk);
    } else {
      const int64_t per_item = kChunk / l.group_len;
      l.items = (l.num_groups + per_item - 1) / per_item;
    }
    l.group_offset = plan.groups;
    plan.groups += l.num_groups;
    plan.items += l.items;
    plan.tensors.push_back(l);
  }
  return plan;
}

// One device buffer for all scratch arrays of a call, from the caching allocator.
template <typename acc_t>
struct Scratch {
  at::Tensor storage;
  Workspace<acc_t> ws{};

  Scratch(const Plan& plan, const at::Device& device, bool items, bool groups, bool tensors) {
    const int64_t n_items = items ? plan.items : 0;
    const int64_t n_groups = groups ? plan.groups : 0;
    const int64_t n_tensors = tensors ? static_cast<int64_t>(plan.tensors.size()) : 0;
    int64_t bytes = 0;
    auto reserve = [&](int64_t count, int64_t size) {
      const int64_t at = bytes;
      bytes += (count * size + 15) / 16 * 16;
      return at;
    };
    const int64_t abs_at = reserve(n_items, sizeof(acc_t));
    const int64_t sq_at = reserve(n_items, sizeof(acc_t));
    const int64_t gsq_at = reserve(n_groups, sizeof(acc_t));
    const int64_t gfirst_at = reserve(n_groups, sizeof(int64_t));
    const int64_t gcount_at = reserve(n_groups, sizeof(int64_t));
    const int64_t gscale_at = reserve(n_groups, sizeof(acc_t));
    const int64_t tfirst_at = reserve(n_tensors, sizeof(int64_t));
    const int64_t tcount_at = reserve(n_tensors, sizeof(int64_t));
    storage = at::empty({std::max<int64_t>(bytes, 16)}, at::TensorOptions().dtype(at::kByte).device(device));
    auto* base = static_cast<unsigned char*>(storage.data_ptr());
    auto take = [&](int64_t count, int64_t at) { return count > 0 ? base + at : nullptr; };
    ws.item_abs = reinterpret_cast<acc_t*>(take(n_items, abs_at));
    ws.item_sq = reinterpret_cast<acc_t*>(take(n_items, sq_at));
    ws.group_sq = reinterpret_cast<acc_t*>(take(n_groups, gsq_at));
    ws.group_first = reinterpret_cast<int64_t*>(take(n_groups, gfirst_at));
    ws.group_count = reinterpret_cast<int64_t*>(take(n_groups, gcount_at));
    ws.group_scale = reinterpret_cast<acc_t*>(take(n_groups, gscale_at));
    ws.tensor_first = reinterpret_cast<int64_t*>(take(n_tensors, tfirst_at));
    ws.tensor_count = reinterpret_cast<int64_t*>(take(n_tensors, tcount_at));
  }
};

// Launches items_kernel over all tensors, as many launches as the table needs.
template <Kind K, bool kAccumulate, bool kWithSums, bool kGroups, typename scalar_t>
void launch_items(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>* out, const Plan& plan,
                  const Params& params, const Workspace<at::opmath_type<scalar_t>>& ws) {
  const int device = w[0].get_device();
  const int max_blocks = blocks_per_launch(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  Table table;
  table.count = 0;
  table.item_base = 0;
  int64_t local = 0;
  auto flush = [&] {
    if (table.count == 0) {
      return;
    }
    table.item_begin[table.count] = local;
    const auto grid = static_cast<unsigned int>(std::min<int64_t>(local, max_blocks));
    items_kernel<K, kAccumulate, kWithSums, kGroups, scalar_t><<<grid, kThreads, 0, stream>>>(table, params, ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table.item_base += local;
    local = 0;
    table.count = 0;
  };
  for (size_t t = 0; t < w.size(); ++t) {
    if (table.count == kMaxTensors) {
      flush();
    }
    const int slot = table.count++;
    const Layout& l = plan.tensors[t];
    table.item_begin[slot] = local;
    table.w[slot] = w[t].numel() == 0 ? nullptr : w[t].data_ptr();
    table.out[slot] = out == nullptr || (*out)[t].numel() == 0 ? nullptr : (*out)[t].data_ptr();
    table.group_len[slot] = l.group_len;
    table.num_groups[slot] = l.num_groups;
    table.group_offset[slot] = l.group_offset;
    table.index[slot] = static_cast<int32_t>(t);
    local += l.items;
  }
  flush();
}

template <typename acc_t, Scales S>
void launch_totals(const Plan& plan, const Workspace<acc_t>& ws, bool groups, const Params& params, acc_t* value,
                   int device) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  totals_finalize<acc_t, S><<<1, kFinalizeThreads, 0, stream>>>(ws, plan.items, groups ? plan.groups : 0, params, value);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::TensorOptions accumulate_options(at::TensorList params) {
  const auto dtype = params.empty() || params[0].scalar_type() != at::kDouble ? at::kFloat : at::kDouble;
  auto options = at::TensorOptions().dtype(dtype);
  return params.empty() ? options.device(at::kCPU) : options.device(params[0].device());
}

Params make_params(const Coefs& c) {
  Params p{};
  p.l1 = c.l1;
  p.l2 = c.l2;
  p.group_lasso = c.group_lasso;
  return p;
}

// A one-element tensor argument: on the parameters' device it is read by the kernels; on the
// CPU, now, which needs no synchronization.
void scalar_argument(const at::Tensor& t, const at::Device& device, const char* op, const char* name, double& value,
                     const void*& ptr, int& code) {
  TORCH_CHECK(t.numel() == 1 && t.is_floating_point(), "fastreg::", op, ": ", name,
              " must be one floating-point element, got ", t.scalar_type(), " of shape ", t.sizes());
  if (t.device().is_cpu()) {
    value = t.item<double>();
    return;
  }
  TORCH_CHECK(t.device() == device, "fastreg::", op, ": ", name, " is on ", t.device(), " but params are on ", device);
  ptr = t.data_ptr();
  code = dtype_code(t.scalar_type());
}

bool uses_groups(const Coefs& c) { return c.group_lasso != 0.0; }

std::tuple<at::Tensor, at::Tensor> norms_cuda(at::TensorList params) {
  check_params(params, c10::DeviceType::CUDA, "norms");
  const auto options = accumulate_options(params);
  const auto count = static_cast<int64_t>(params.size());
  at::Tensor abs_sums = at::empty({count}, options);
  at::Tensor sq_sums = at::empty({count}, options);
  if (params.empty()) {
    return {abs_sums, sq_sums};
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Contiguous c(params);
  const Plan plan = make_plan(c.tensors, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fastreg_norms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Scratch<acc_t> scratch(plan, params[0].device(), true, false, true);
    const Params p{};
    launch_items<Kind::kSums, false, false, false, scalar_t>(c.tensors, nullptr, plan, p, scratch.ws);
    const int device = params[0].get_device();
    const int64_t blocks = std::min<int64_t>((count + kWarps - 1) / kWarps, blocks_per_launch(device));
    norms_finalize<acc_t><<<static_cast<unsigned int>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream(device).stream()>>>(
        scratch.ws, count, abs_sums.data_ptr<acc_t>(), sq_sums.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {abs_sums, sq_sums};
}

at::Tensor value_cuda(at::TensorList params, double l1, double l2, double group_lasso, std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CUDA, "value");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  if (params.empty() || coefs.is_zero()) {
    return at::zeros({}, accumulate_options(params));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor out = at::empty({}, accumulate_options(params));
  const Contiguous c(params);
  const bool groups = uses_groups(coefs);
  const Plan plan = make_plan(c.tensors, coefs.row_groups && groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fastreg_value_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Scratch<acc_t> scratch(plan, params[0].device(), true, groups, false);
    const Params p = make_params(coefs);
    if (groups) {
      launch_items<Kind::kSums, false, false, true, scalar_t>(c.tensors, nullptr, plan, p, scratch.ws);
    } else {
      launch_items<Kind::kSums, false, false, false, scalar_t>(c.tensors, nullptr, plan, p, scratch.ws);
    }
    launch_totals<acc_t, Scales::kNone>(plan, scratch.ws, groups, p, out.data_ptr<acc_t>(), params[0].get_device());
  });
  return out;
}

// dP/dw into `out` (kAccumulate: added to it; else times grad_output); P into `value` if given.
// Without group lasso one pass reads w (and g) once and also makes the sums for P, in the very
// layout and order value() uses, so the two return the same bits.
template <bool kAccumulate>
void gradient(const Contiguous& w, const std::vector<at::Tensor>& out, const Coefs& coefs, Params p, at::Tensor* value) {
  const bool groups = uses_groups(coefs);
  const Plan plan = make_plan(w.tensors, coefs.row_groups && groups);
  const at::Device device = w.tensors[0].device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.tensors[0].scalar_type(), "fastreg_gradient_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* value_ptr = value != nullptr ? value->data_ptr<acc_t>() : nullptr;
    if (!groups) {
      const Scratch<acc_t> scratch(plan, device, value != nullptr, false, false);
      if (value != nullptr) {
        launch_items<Kind::kGrad, kAccumulate, true, false, scalar_t>(w.tensors, &out, plan, p, scratch.ws);
        launch_totals<acc_t, Scales::kNone>(plan, scratch.ws, false, p, value_ptr, device.index());
      } else {
        launch_items<Kind::kGrad, kAccumulate, false, false, scalar_t>(w.tensors, &out, plan, p, scratch.ws);
      }
      return;
    }
    const Scratch<acc_t> scratch(plan, device, true, true, false);
    launch_items<Kind::kSums, false, false, true, scalar_t>(w.tensors, nullptr, plan, p, scratch.ws);
    launch_totals<acc_t, Scales::kGrad>(plan, scratch.ws, true, p, value_ptr, device.index());
    launch_items<Kind::kGrad, kAccumulate, false, true, scalar_t>(w.tensors, &out, plan, p, scratch.ws);
  });
}

at::Tensor add_grad_cuda(at::TensorList params, at::TensorList grads, double l1, double l2, double group_lasso,
                         std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CUDA, "add_grad_");
  check_grads(params, grads, "add_grad_");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  if (params.empty() || coefs.is_zero()) {
    return at::zeros({}, accumulate_options(params));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor value = at::empty({}, accumulate_options(params));
  const Contiguous w(params);
  const Contiguous g(grads);
  gradient<true>(w, g.tensors, coefs, make_params(coefs), &value);
  g.write_back(grads);
  return value;
}

std::vector<at::Tensor> penalty_backward_cuda(at::TensorList params, const at::Tensor& grad_output, double l1,
                                              double l2, double group_lasso, std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CUDA, "penalty_backward");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (const auto& p : params) {
    out.push_back(at::empty(p.sizes(), p.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  if (params.empty()) {
    TORCH_CHECK(grad_output.numel() == 1,
                "fastreg::penalty_backward: grad_output must have one element, got shape ", grad_output.sizes());
    return out;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  Params p = make_params(coefs);
  scalar_argument(grad_output, params[0].device(), "penalty_backward", "grad_output", p.grad_output, p.go_ptr,
                  p.go_dtype);
  const Contiguous w(params);
  gradient<false>(w, out, coefs, p, nullptr);
  return out;
}

void decay_cuda(at::TensorList params, double lr, const std::optional<at::Tensor>& lr_tensor, double l1, double l2,
                double group_lasso, std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CUDA, "decay_");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  Params p = make_params(coefs);
  p.lr = lr;
  if (params.empty()) {
    return;
  }
  if (lr_tensor.has_value()) {
    scalar_argument(*lr_tensor, params[0].device(), "decay_", "lr_tensor", p.lr, p.lr_ptr, p.lr_dtype);
  }
  if (coefs.is_zero()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Contiguous c(params);
  const bool groups = uses_groups(coefs);
  const Plan plan = make_plan(c.tensors, coefs.row_groups && groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fastreg_decay_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!groups) {
      const Scratch<acc_t> scratch(plan, params[0].device(), false, false, false);
      launch_items<Kind::kDecay, false, false, false, scalar_t>(c.tensors, nullptr, plan, p, scratch.ws);
      return;
    }
    // Block shrink uses the norm of the already thresholded group, so the sums pass applies
    // steps 1-2 in registers and the update pass applies them again before scaling.
    const Scratch<acc_t> scratch(plan, params[0].device(), true, true, false);
    Params sums = p;
    sums.prefix = true;
    launch_items<Kind::kSums, false, false, true, scalar_t>(c.tensors, nullptr, plan, sums, scratch.ws);
    launch_totals<acc_t, Scales::kDecay>(plan, scratch.ws, true, p, nullptr, params[0].get_device());
    launch_items<Kind::kDecay, false, false, true, scalar_t>(c.tensors, nullptr, plan, p, scratch.ws);
  });
  c.write_back(params);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("norms", &norms_cuda);
  m.impl("value", &value_cuda);
  m.impl("add_grad_", &add_grad_cuda);
  m.impl("decay_", &decay_cuda);
  m.impl("penalty_backward", &penalty_backward_cuda);
}

}  // namespace fastreg
