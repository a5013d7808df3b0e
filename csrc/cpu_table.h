// The CPU side of the work layout (plan.h): vector blocks, two-level sums, the walk over a
// table's items and runs, and the partial sums combined in item and group order. Every CPU kernel
// over a table builds on these: the penalty ops (fastreg_cpu.cpp) and the fused optimizer steps
// (fastreg_optim.cpp).
#pragma once

#include "fastreg.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define FASTREG_MASKED_TAILS 1
#endif

namespace fastreg {
namespace cpu {

using at::vec::Vectorized;

// kVecs accumulator-dtype vectors: the unit every loop below moves (one fp16/bf16 vector widens
// to two fp32 ones). Each has its own accumulators, so two add chains are in flight; more
// would spill registers in the gradient loop without moving memory any faster.
template <typename scalar_t>
struct Block {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kSize = kVecs * kLanes;

  struct Regs {
    Vec v[kVecs];
  };

  static Regs load(const scalar_t* p) {
    Regs r;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int j = 0; j < kVecs; ++j) {
        r.v[j] = Vec::loadu(p + j * kLanes);
      }
    } else {
      using In = Vectorized<scalar_t>;
      static_assert(In::size() == 2 * Vec::size(), "a reduced-precision vector must widen to two float vectors");
      for (int j = 0; j < kVecs; j += 2) {
        auto [lo, hi] = at::vec::convert_to_float<scalar_t>(In::loadu(p + j * kLanes));
        r.v[j] = lo;
        r.v[j + 1] = hi;
      }
    }
    return r;
  }

  static void store(scalar_t* p, const Regs& r) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int j = 0; j < kVecs; ++j) {
        r.v[j].store(p + j * kLanes);
      }
    } else {
      for (int j = 0; j < kVecs; j += 2) {
        at::vec::convert_from_float<scalar_t>(r.v[j], r.v[j + 1]).store(p + j * kLanes);
      }
    }
  }

  // Copies n < kSize elements in pieces of kSize / 2, kSize / 4, ..., 1 (the binary digits of
  // n): each piece is a fixed-size copy the compiler inlines, where a copy of n elements would be
  // a call to memmove, which on tensors of a few elements cost more than the arithmetic.
  static void copy_short(scalar_t* dst, const scalar_t* src, int64_t n) {
    static_assert((kSize & (kSize - 1)) == 0, "the pieces cover every n < kSize only for a power of two");
    int64_t k = 0;
    copy_pieces<kSize / 2>(dst, src, n, k);
  }

  template <int64_t kPiece>
  static void copy_pieces(scalar_t* dst, const scalar_t* src, int64_t n, int64_t& k) {
    if (n - k >= kPiece) {
      std::memcpy(dst + k, src + k, kPiece * sizeof(scalar_t));
      k += kPiece;
    }
    if constexpr (kPiece > 1) {
      copy_pieces<kPiece / 2>(dst, src, n, k);
    }
  }

  // The last, partial block of a range: no load or store touches memory past the range, and the
  // lanes past it read as zeros. fp32 and fp64 use AVX2's or AVX-512's masked loads and stores;
  // other types go through a zero-padded buffer, whose vector loads wait for the element stores
  // before them (no store forwarding across stores), which on tensors of a few elements costs
  // more than the arithmetic.
  static Regs load_tail(const scalar_t* p, int64_t n) {
#if defined(FASTREG_MASKED_TAILS)
    if constexpr (kMasked) {
      Regs r;
      for (int j = 0; j < kVecs; ++j) {
        const int64_t live = n - j * kLanes;
        r.v[j] = live <= 0 ? Vec(acc_t(0)) : masked_load(p + j * kLanes, std::min<int64_t>(live, kLanes));
      }
      return r;
    }
#endif
    scalar_t buf[kSize] = {};
    copy_short(buf, p, n);
    return load(buf);
  }

  static void store_tail(scalar_t* p, int64_t n, const Regs& r) {
#if defined(FASTREG_MASKED_TAILS)
    if constexpr (kMasked) {
      for (int j = 0; j < kVecs && n - j * kLanes > 0; ++j) {
        masked_store(p + j * kLanes, std::min<int64_t>(n - j * kLanes, kLanes), r.v[j]);
      }
      return;
    }
#endif
    scalar_t buf[kSize];
    store(buf, r);
    copy_short(p, buf, n);
  }

  static constexpr bool kMasked = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

#if defined(CPU_CAPABILITY_AVX512)
  // The first `live` lanes (1 to kLanes).
  static Vec masked_load(const scalar_t* p, int64_t live) {
    const auto mask = static_cast<uint16_t>((uint32_t{1} << live) - 1);
    if constexpr (std::is_same_v<scalar_t, double>) {
      return Vec(_mm512_maskz_loadu_pd(static_cast<__mmask8>(mask), p));
    } else {
      return Vec(_mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), p));
    }
  }

  static void masked_store(scalar_t* p, int64_t live, const Vec& v) {
    const auto mask = static_cast<uint16_t>((uint32_t{1} << live) - 1);
    if constexpr (std::is_same_v<scalar_t, double>) {
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>(mask), v);
    } else {
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>(mask), v);
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // All ones in the first `live` lanes (1 to kLanes).
  static __m256i lanes_below(int64_t live) {
    if constexpr (std::is_same_v<scalar_t, double>) {
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(live), _mm256_setr_epi64x(0, 1, 2, 3));
    } else {
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(live)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
  }

  static Vec masked_load(const scalar_t* p, int64_t live) {
    if constexpr (std::is_same_v<scalar_t, double>) {
      return Vec(_mm256_maskload_pd(p, lanes_below(live)));
    } else {
      return Vec(_mm256_maskload_ps(p, lanes_below(live)));
    }
  }

  static void masked_store(scalar_t* p, int64_t live, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, double>) {
      _mm256_maskstore_pd(p, lanes_below(live), v);
    } else {
      _mm256_maskstore_ps(p, lanes_below(live), v);
    }
  }
#endif

  // Zeroes the lanes at and after `n`: a transform may turn padding into NaN (0 * inf when a
  // learning-rate tensor holds inf), and padding must add nothing to a sum.
  static void mask_tail(Regs& r, int64_t n) {
    for (int j = 0; j < kVecs; ++j) {
      const int64_t live = n - j * kLanes;
      if (live <= 0) {
        r.v[j] = Vec(acc_t(0));
      } else if (live < kLanes) {
        r.v[j] = Vec::set(Vec(acc_t(0)), r.v[j], live);
      }
    }
  }
};

template <typename acc_t>
struct Sums {
  acc_t abs = 0;
  acc_t sq = 0;
};

// Running sums of |x| and x^2 in two levels: a lane's running sum over a whole 64K chunk (4K
// terms per lane) would round every add at the magnitude of the total, and equal terms round the
// same way each time, so the error grows linearly. Each inner sum covers kFlush blocks and is then
// added to the outer one, which keeps the rounding at the level of a short sum; the flush points
// depend only on the position in the range, so the result is still thread-count independent.
template <typename scalar_t>
struct SumAcc {
  using B = Block<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  static constexpr int kFlush = 64;
  typename B::Regs abs, sq, abs_total, sq_total;
  int pending = 0;

  SumAcc() {
    for (int j = 0; j < B::kVecs; ++j) {
      abs.v[j] = Vec(acc_t(0));
      sq.v[j] = Vec(acc_t(0));
      abs_total.v[j] = Vec(acc_t(0));
      sq_total.v[j] = Vec(acc_t(0));
    }
  }

  void add(const typename B::Regs& x) {
    for (int j = 0; j < B::kVecs; ++j) {
      abs.v[j] = abs.v[j] + x.v[j].abs();
      sq.v[j] = at::vec::fmadd(x.v[j], x.v[j], sq.v[j]);
    }
    if (++pending == kFlush) {
      flush();
    }
  }

  void flush() {
    for (int j = 0; j < B::kVecs; ++j) {
      abs_total.v[j] = abs_total.v[j] + abs.v[j];
      sq_total.v[j] = sq_total.v[j] + sq.v[j];
      abs.v[j] = Vec(acc_t(0));
      sq.v[j] = Vec(acc_t(0));
    }
    pending = 0;
  }

  static acc_t horizontal(const typename B::Regs& r) {
    static_assert(B::kVecs == 2, "the lane order of the final sum is fixed for two vectors");
    const Vec v = r.v[0] + r.v[1];
    acc_t lanes[B::kLanes];
    v.store(lanes);
    acc_t s = 0;
    for (int64_t l = 0; l < B::kLanes; ++l) {
      s += lanes[l];
    }
    return s;
  }

  Sums<acc_t> reduce() {
    flush();
    return {horizontal(abs_total), horizontal(sq_total)};
  }
};

struct Identity {
  template <typename Regs>
  void operator()(Regs&) const {}
};

// Steps 1 and 2 of decay_: the l2 pre-scale, then the soft threshold.
template <typename acc_t>
struct DecayPrefix {
  using Vec = Vectorized<acc_t>;
  bool use_l2;
  bool use_l1;
  Vec factor;     // 1 - lr * l2
  Vec threshold;  // lr * l1

  template <typename Regs>
  void operator()(Regs& r) const {
    const Vec zero(acc_t(0));
    const Vec sign_bit(acc_t(-0.0));
    for (auto& x : r.v) {
      if (use_l2) {
        x = x * factor;
      }
      if (use_l1) {
        // The reference's max(|x| - t, 0) * sign(x), with x's sign bit put on the non-negative
        // max instead of a multiply: the same value for every x (NaN stays NaN, since clamp_min
        // keeps a NaN first argument), except that x = -0.0 gives -0.0 where it gives +0.0.
        x = at::vec::clamp_min(x.abs() - threshold, zero) | (x & sign_bit);
      }
    }
  }
};

// The range kernels below take their parameters by value: a local copy cannot alias the memory
// the loop writes, so the flags stay in registers and the compiler unswitches the loop on them.
template <typename scalar_t, typename Pre>
Sums<at::opmath_type<scalar_t>> range_sums(const scalar_t* w, int64_t n, const Pre pre) {
  using B = Block<scalar_t>;
  SumAcc<scalar_t> acc;
  int64_t i = 0;
  for (; i + B::kSize <= n; i += B::kSize) {
    auto x = B::load(w + i);
    pre(x);
    acc.add(x);
  }
  if (i < n) {
    auto x = B::load_tail(w + i, n - i);
    pre(x);
    B::mask_tail(x, n - i);
    acc.add(x);
  }
  return acc.reduce();
}

// Software-prefetch distance in elements (a few KB ahead of the loads).
constexpr int64_t kPrefetch = 1024;

template <typename scalar_t>
void decay_range(
    scalar_t* w,
    int64_t n,
    const DecayPrefix<at::opmath_type<scalar_t>> pre,
    bool shrink,
    at::opmath_type<scalar_t> scale) {
  using B = Block<scalar_t>;
  const typename B::Vec scale_v(scale);
  auto apply = [&](typename B::Regs& x) {
    pre(x);
    if (shrink) {
      for (auto& v : x.v) {
        v = v * scale_v;
      }
    }
  };
  int64_t i = 0;
  for (; i + B::kSize <= n; i += B::kSize) {
    __builtin_prefetch(w + i + kPrefetch, 0, 0);
    auto x = B::load(w + i);
    apply(x);
    B::store(w + i, x);
  }
  if (i < n) {
    auto x = B::load_tail(w + i, n - i);
    apply(x);
    B::store_tail(w + i, n - i, x);
  }
}

using plan::View;

// Runs process(i) for every item of `layout`, each on exactly one thread. Threads get contiguous
// runs of items of about equal cost: elements, plus a fixed cost per item and per group (for
// items that pack many tiny tensors or rows).
template <typename F>
void for_each_item(const View& layout, const F& process) {
  const int64_t n = layout.num_items();
  if (n == 0) {
    return;
  }
  if (layout.numel() <= layout.chunk()) {
    for (int64_t i = 0; i < n; ++i) {
      process(i);
    }
    return;
  }
  constexpr int64_t kItemCost = 1024;
  constexpr int64_t kGroupCost = 64;
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* item = layout.item(i);
    start[i + 1] = start[i] + item[plan::kItemLen] + kItemCost + kGroupCost * (item[plan::kItemGroupEnd] - item[plan::kItemGroup]);
  }
  at::parallel_for(0, start[n], layout.chunk(), [&](int64_t begin, int64_t end) {
    int64_t i = std::lower_bound(start.begin(), start.begin() + n, begin) - start.begin();
    for (; i < n && start[i] < end; ++i) {
      process(i);
    }
  });
}

// How far ahead of the group being computed a packed item prefetches.
constexpr int64_t kPrefetchGroups = 6;

// Calls f(tensor, first element, element count, group, split) for the runs of item i that share
// one group: the one piece of a split group, or each of its whole groups. The groups of a packed
// item are short: often whole tensors of a few elements, each at an address of its own that the
// hardware prefetcher cannot guess, and too little work each for the core to run far enough
// ahead to overlap their cache misses (10,000 tensors of 4 elements: 45 ns per tensor without
// this, 28 with it). So every pointer row's first line of the tensor of the group
// kPrefetchGroups ahead is prefetched; for rows of one tensor that line is already there, and
// the rows after it are sequential.
template <typename F>
void for_each_run(const View& layout, int64_t i, const F& f) {
  const int64_t* item = layout.item(i);
  const int64_t end = item[plan::kItemGroupEnd];
  // Read once: f writes memory the compiler cannot tell apart from the table's.
  const int64_t lists = layout.lists();
  const int64_t tensors = layout.num_tensors();
  const int64_t* ptrs = layout.ptrs();
  for (int64_t g = item[plan::kItemGroup]; g < end; ++g) {
    const int64_t* group = layout.group(g);
    if (layout.split(g)) {
      f(group[plan::kGroupTensor], group[plan::kGroupStart] + item[plan::kItemOffset], item[plan::kItemLen], g, true);
    } else {
      if (g + kPrefetchGroups < end) {
        const int64_t ahead = layout.group(g + kPrefetchGroups)[plan::kGroupTensor];
        for (int64_t list = 0; list < lists; ++list) {
          __builtin_prefetch(reinterpret_cast<const void*>(ptrs[list * tensors + ahead]));
        }
      }
      f(group[plan::kGroupTensor], group[plan::kGroupStart], group[plan::kGroupLen], g, false);
    }
  }
}

// Pointer row `list` of a table, typed.
template <typename scalar_t>
std::vector<scalar_t*> row_of(const View& layout, int64_t list) {
  std::vector<scalar_t*> out(layout.num_tensors());
  for (int64_t t = 0; t < layout.num_tensors(); ++t) {
    out[t] = layout.ptr<scalar_t>(list, t);
  }
  return out;
}

// Partial sums of one pass: a split group's pieces per item, every other group's sums whole;
// then group and tensor totals, combined in item and group order.
template <typename acc_t>
struct Partials {
  std::vector<acc_t> item_abs, item_sq, group_abs, group_sq, tensor_abs, tensor_sq;

  explicit Partials(const View& layout)
      : item_abs(layout.num_items()),
        item_sq(layout.num_items()),
        group_abs(layout.num_groups()),
        group_sq(layout.num_groups()),
        tensor_abs(layout.num_tensors()),
        tensor_sq(layout.num_tensors()) {}

  void record(int64_t item, int64_t group, bool split, const Sums<acc_t>& s) {
    if (split) {
      item_abs[item] = s.abs;
      item_sq[item] = s.sq;
    } else {
      group_abs[group] = s.abs;
      group_sq[group] = s.sq;
    }
  }

  void combine(const View& layout) {
    for (int64_t g = 0; g < layout.num_groups(); ++g) {
      if (!layout.split(g)) {
        continue;
      }
      const int64_t first = layout.group(g)[plan::kGroupItem];
      acc_t a = 0, q = 0;
      for (int64_t i = first; i < first + layout.group_items(g); ++i) {
        a += item_abs[i];
        q += item_sq[i];
      }
      group_abs[g] = a;
      group_sq[g] = q;
    }
    for (int64_t t = 0; t < layout.num_tensors(); ++t) {
      acc_t a = 0, q = 0;
      for (int64_t g = layout.tensor_group_begin(t); g < layout.tensor_group_end(t); ++g) {
        a += group_abs[g];
        q += group_sq[g];
      }
      tensor_abs[t] = a;
      tensor_sq[t] = q;
    }
  }

  acc_t group_norm(int64_t g) const { return std::sqrt(group_sq[g]); }

  // P in the reference backend's order: a zero coefficient leaves its term out entirely.
  acc_t value(const View& layout, const Coefs& c) const {
    acc_t abs_total = 0, sq_total = 0, norm_total = 0;
    for (int64_t t = 0; t < layout.num_tensors(); ++t) {
      abs_total += tensor_abs[t];
      sq_total += tensor_sq[t];
      if (c.group_lasso != 0.0) {
        acc_t norms = 0;
        for (int64_t g = layout.tensor_group_begin(t); g < layout.tensor_group_end(t); ++g) {
          norms += group_norm(g);
        }
        norm_total += norms;
      }
    }
    acc_t v = 0;
    if (c.l1 != 0.0) {
      v = v + static_cast<acc_t>(c.l1) * abs_total;
    }
    if (c.l2 != 0.0) {
      v = v + static_cast<acc_t>(c.l2 / 2) * sq_total;
    }
    if (c.group_lasso != 0.0) {
      v = v + static_cast<acc_t>(c.group_lasso) * norm_total;
    }
    return v;
  }
};

template <typename scalar_t, typename Pre>
Partials<at::opmath_type<scalar_t>> sums_pass(const View& layout, const std::vector<scalar_t*>& w, const Pre& pre) {
  Partials<at::opmath_type<scalar_t>> parts(layout);
  for_each_item(layout, [&](int64_t i) {
    for_each_run(layout, i, [&](int64_t t, int64_t begin, int64_t n, int64_t g, bool split) {
      parts.record(i, g, split, range_sums(w[t] + begin, n, pre));
    });
  });
  parts.combine(layout);
  return parts;
}

inline at::TensorOptions accumulate_options(at::ScalarType dtype) {
  return at::TensorOptions().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat).device(at::kCPU);
}

inline void check_table(const at::Tensor& table, int64_t lists, const char* op) {
  TORCH_CHECK(table.is_cpu() && table.scalar_type() == at::kLong && table.dim() == 1 && table.is_contiguous() &&
                  table.numel() >= plan::kHeaderWords && table.data_ptr<int64_t>()[plan::kWords] == table.numel(),
              "fastreg::", op, ": not a work-layout table");
  TORCH_CHECK(table.data_ptr<int64_t>()[plan::kLists] >= lists, "fastreg::", op, ": the table has ",
              table.data_ptr<int64_t>()[plan::kLists], " pointer rows, the op needs ", lists);
}

inline Coefs coefs_of(const View& layout, double l1, double l2, double group_lasso) {
  return make_coefs(l1, l2, group_lasso, layout.row_groups() ? std::optional<int64_t>(0) : std::nullopt);
}

// Block shrink's factor max(0, 1 - threshold / ||w_g||) for a group of norm `norm`: 0 for an
// all-zero group and for a NaN norm.
template <typename acc_t>
inline acc_t shrink_scale(acc_t norm, acc_t threshold) {
  return norm > threshold ? acc_t(1) - (acc_t(1) / norm) * threshold : acc_t(0);
}

}  // namespace cpu
}  // namespace fastreg
