// CPU kernels for the fastreg ops (schemas in ops.cpp).
//
// Every op walks the work layout of plan.h over all tensors of the call, its items spread over
// threads with at::parallel_for and vectorized with at::vec. Each item writes its own partial
// sums; they are combined afterwards, serially and in item and group order, so a result depends
// only on the shapes, never on the thread count. Sums accumulate in
// at::opmath_type (fp32 for fp16/bf16/fp32, fp64 for fp64).
//
// The elementwise math follows the reference backend (fastreg/backends/reference.py) operation
// for operation, including which products are fused (its `add(..., alpha=)` is an FMA), so the
// two backends agree to the last bit or two.
#include "fastreg.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace fastreg {
namespace {

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

  // The last, partial block of a range goes through a zero-padded buffer, so no load or store
  // touches memory past the range.
  static Regs load_tail(const scalar_t* p, int64_t n) {
    scalar_t buf[kSize] = {};
    std::copy_n(p, n, buf);
    return load(buf);
  }

  static void store_tail(scalar_t* p, int64_t n, const Regs& r) {
    scalar_t buf[kSize];
    store(buf, r);
    std::copy_n(buf, n, p);
  }

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

// c * torch.sign(x) (sign 1 for x > 0, -1 for x < 0, 0 for zeros and NaN), bit for bit, with
// masks instead of a multiply.
template <typename Vec>
inline Vec scaled_sign(const Vec& x, const Vec& c) {
  const Vec zero(0);
  return ((x > zero) & c) - ((x < zero) & c);
}

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

template <typename acc_t>
struct GradParams {
  using Vec = Vectorized<acc_t>;
  bool use_l1;
  bool use_w;  // an l2 or group-lasso term: d += w * scale
  bool fused;  // no group lasso: the torch backend adds l2 * w with add(alpha=), an FMA
  Vec l1;
  Vec grad_output;
};

// dP/dw for one range whose group shares `scale`, added into `out` (coupled mode) or times
// grad_output into `out` (penalty backward); optionally also the sums of the range.
template <typename scalar_t, bool kAccumulate, bool kWithSums>
Sums<at::opmath_type<scalar_t>> grad_range(
    const scalar_t* w,
    scalar_t* out,
    int64_t n,
    const GradParams<at::opmath_type<scalar_t>> p,
    at::opmath_type<scalar_t> scale) {
  using B = Block<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  const Vec scale_v(scale);
  SumAcc<scalar_t> acc;
  auto compute = [&](typename B::Regs& x, const typename B::Regs& g) {
    typename B::Regs d;
    for (int j = 0; j < B::kVecs; ++j) {
      // scaled_sign never returns -0.0, so it can stand for the reference's 0 + l1 * sign(x).
      Vec dj = p.use_l1 ? scaled_sign(x.v[j], p.l1) : Vec(acc_t(0));
      if (p.use_w) {
        dj = p.fused ? at::vec::fmadd(x.v[j], scale_v, dj) : dj + x.v[j] * scale_v;
      }
      d.v[j] = kAccumulate ? g.v[j] + dj : dj * p.grad_output;
    }
    return d;
  };
  int64_t i = 0;
  for (; i + B::kSize <= n; i += B::kSize) {
    // Hardware prefetch alone leaves one core short of bandwidth on these read streams.
    __builtin_prefetch(w + i + kPrefetch, 0, 0);
    if constexpr (kAccumulate) {
      __builtin_prefetch(out + i + kPrefetch, 0, 0);
    }
    auto x = B::load(w + i);
    typename B::Regs g;
    if constexpr (kAccumulate) {
      g = B::load(out + i);
    }
    B::store(out + i, compute(x, g));
    if constexpr (kWithSums) {
      acc.add(x);
    }
  }
  if (i < n) {
    auto x = B::load_tail(w + i, n - i);
    typename B::Regs g;
    if constexpr (kAccumulate) {
      g = B::load_tail(out + i, n - i);
    }
    B::store_tail(out + i, n - i, compute(x, g));
    if constexpr (kWithSums) {
      acc.add(x);
    }
  }
  return kWithSums ? acc.reduce() : Sums<acc_t>{};
}

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

// Calls f(tensor, first element, element count, group, split) for the runs of item i that share
// one group: the one piece of a split group, or each of its whole groups.
template <typename F>
void for_each_run(const View& layout, int64_t i, const F& f) {
  const int64_t* item = layout.item(i);
  for (int64_t g = item[plan::kItemGroup]; g < item[plan::kItemGroupEnd]; ++g) {
    const int64_t* group = layout.group(g);
    if (layout.split(g)) {
      f(group[plan::kGroupTensor], group[plan::kGroupStart] + item[plan::kItemOffset], item[plan::kItemLen], g, true);
    } else {
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

// The coupled gradient over all items. With group lasso, `group_scale` holds every group's
// l2 + group_lasso / ||w_g||; without it, one scale (l2) covers every run and the pass can also
// produce the sums (`parts`), so value and gradient take one read of w.
template <typename scalar_t, bool kAccumulate>
void grad_pass(
    const View& layout,
    const std::vector<scalar_t*>& w,
    const std::vector<scalar_t*>& out,
    const GradParams<at::opmath_type<scalar_t>>& p,
    const std::vector<at::opmath_type<scalar_t>>* group_scale,
    at::opmath_type<scalar_t> l2,
    Partials<at::opmath_type<scalar_t>>* parts) {
  for_each_item(layout, [&](int64_t i) {
    for_each_run(layout, i, [&](int64_t t, int64_t begin, int64_t n, int64_t g, bool split) {
      if (parts != nullptr) {
        parts->record(i, g, split, grad_range<scalar_t, kAccumulate, true>(w[t] + begin, out[t] + begin, n, p, l2));
      } else {
        grad_range<scalar_t, kAccumulate, false>(w[t] + begin, out[t] + begin, n, p,
                                                 group_scale == nullptr ? l2 : (*group_scale)[g]);
      }
    });
  });
  if (parts != nullptr) {
    parts->combine(layout);
  }
}

at::TensorOptions accumulate_options(at::ScalarType dtype) {
  return at::TensorOptions().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat).device(at::kCPU);
}

void check_table(const at::Tensor& table, int64_t lists, const char* op) {
  TORCH_CHECK(table.is_cpu() && table.scalar_type() == at::kLong && table.dim() == 1 && table.is_contiguous() &&
                  table.numel() >= plan::kHeaderWords && table.data_ptr<int64_t>()[plan::kWords] == table.numel(),
              "fastreg::", op, ": not a work-layout table");
  TORCH_CHECK(table.data_ptr<int64_t>()[plan::kLists] >= lists, "fastreg::", op, ": the table has ",
              table.data_ptr<int64_t>()[plan::kLists], " pointer rows, the op needs ", lists);
}

Coefs coefs_of(const View& layout, double l1, double l2, double group_lasso) {
  return make_coefs(l1, l2, group_lasso, layout.row_groups() ? std::optional<int64_t>(0) : std::nullopt);
}

// dP/dw of the tensors of pointer row 0 into `out` (kAccumulate: added to it; else scaled by
// grad_output); returns P when asked.
template <bool kAccumulate>
void gradient(const View& layout, at::ScalarType dtype, const Coefs& coefs, const std::vector<void*>& out,
              double grad_output, at::Tensor* value) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_gradient", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const auto wp = row_of<scalar_t>(layout, 0);
    std::vector<scalar_t*> op(out.size());
    std::transform(out.begin(), out.end(), op.begin(), [](void* p) { return static_cast<scalar_t*>(p); });
    const GradParams<acc_t> p{
        coefs.l1 != 0.0,
        coefs.l2 != 0.0 || coefs.group_lasso != 0.0,
        coefs.group_lasso == 0.0,
        Vec(static_cast<acc_t>(coefs.l1)),
        Vec(static_cast<acc_t>(grad_output)),
    };
    const auto l2 = static_cast<acc_t>(coefs.l2);
    if (coefs.group_lasso == 0.0) {
      std::optional<Partials<acc_t>> parts;
      if (value) {
        parts.emplace(layout);
      }
      grad_pass<scalar_t, kAccumulate>(layout, wp, op, p, nullptr, l2, parts ? &*parts : nullptr);
      if (value) {
        value->fill_(parts->value(layout, coefs));
      }
      return;
    }
    const auto parts = sums_pass(layout, wp, Identity{});
    const auto gl = static_cast<acc_t>(coefs.group_lasso);
    std::vector<acc_t> scale(layout.num_groups());
    for (int64_t g = 0; g < layout.num_groups(); ++g) {
      const acc_t norm = parts.group_norm(g);
      // An all-zero group has gradient 0 (1/||w_g|| taken as 0), as does a NaN norm.
      scale[g] = l2 + gl * (norm > acc_t(0) ? acc_t(1) / norm : acc_t(0));
    }
    grad_pass<scalar_t, kAccumulate>(layout, wp, op, p, &scale, l2, nullptr);
    if (value) {
      value->fill_(parts.value(layout, coefs));
    }
  });
}

// The ops on a table whose pointer rows address contiguous tensors: the planned path
// (fastreg/_plan.py keeps one table per parameter list) and the list ops below share them.

std::tuple<at::Tensor, at::Tensor> norms_table(const at::Tensor& table, at::ScalarType dtype) {
  check_table(table, 1, "norms");
  const View layout(table);
  const auto options = accumulate_options(dtype);
  at::Tensor abs_sums = at::empty({layout.num_tensors()}, options);
  at::Tensor sq_sums = at::empty({layout.num_tensors()}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_norms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto parts = sums_pass(layout, row_of<scalar_t>(layout, 0), Identity{});
    std::copy(parts.tensor_abs.begin(), parts.tensor_abs.end(), abs_sums.data_ptr<acc_t>());
    std::copy(parts.tensor_sq.begin(), parts.tensor_sq.end(), sq_sums.data_ptr<acc_t>());
  });
  return {abs_sums, sq_sums};
}

at::Tensor value_table(const at::Tensor& table, at::ScalarType dtype, double l1, double l2, double group_lasso) {
  check_table(table, 1, "value");
  const View layout(table);
  const Coefs coefs = coefs_of(layout, l1, l2, group_lasso);
  at::Tensor out = at::zeros({}, accumulate_options(dtype));
  if (coefs.is_zero()) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_value", [&] {
    const auto parts = sums_pass(layout, row_of<scalar_t>(layout, 0), Identity{});
    out.fill_(parts.value(layout, coefs));
  });
  return out;
}

at::Tensor add_grad_table(const at::Tensor& table, at::ScalarType dtype, double l1, double l2, double group_lasso) {
  check_table(table, 2, "add_grad_");
  const View layout(table);
  const Coefs coefs = coefs_of(layout, l1, l2, group_lasso);
  at::Tensor value = at::zeros({}, accumulate_options(dtype));
  if (coefs.is_zero() || layout.num_tensors() == 0) {
    return value;
  }
  std::vector<void*> grads(layout.num_tensors());
  for (int64_t t = 0; t < layout.num_tensors(); ++t) {
    grads[t] = layout.ptr<void>(1, t);
  }
  gradient<true>(layout, dtype, coefs, grads, 0.0, &value);
  return value;
}

void decay_table(const at::Tensor& table, at::ScalarType dtype, double lr, const std::optional<at::Tensor>& lr_tensor,
                 double l1, double l2, double group_lasso) {
  check_table(table, 1, "decay_");
  const View layout(table);
  const Coefs coefs = coefs_of(layout, l1, l2, group_lasso);
  if (lr_tensor.has_value()) {
    TORCH_CHECK(lr_tensor->numel() == 1 && lr_tensor->is_floating_point(),
                "fastreg::decay_: lr_tensor must be one floating-point element, got ", lr_tensor->scalar_type(),
                " of shape ", lr_tensor->sizes());
    lr = lr_tensor->item<double>();
  }
  if (coefs.is_zero()) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_decay", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const auto w = row_of<scalar_t>(layout, 0);
    const DecayPrefix<acc_t> pre{
        coefs.l2 != 0.0,
        coefs.l1 != 0.0,
        Vec(static_cast<acc_t>(1 - lr * coefs.l2)),
        Vec(static_cast<acc_t>(lr * coefs.l1)),
    };
    if (coefs.group_lasso == 0.0) {
      for_each_item(layout, [&](int64_t i) {
        for_each_run(layout, i, [&](int64_t t, int64_t begin, int64_t n, int64_t, bool) {
          decay_range(w[t] + begin, n, pre, false, acc_t(1));
        });
      });
      return;
    }
    // Block shrink uses the norm of the already thresholded group, so the norms pass applies
    // steps 1-2 in registers and the update pass applies them again before scaling.
    const auto parts = sums_pass(layout, w, pre);
    const auto threshold = static_cast<acc_t>(lr * coefs.group_lasso);
    std::vector<acc_t> scale(layout.num_groups());
    for (int64_t g = 0; g < layout.num_groups(); ++g) {
      const acc_t norm = parts.group_norm(g);
      scale[g] = norm > threshold ? acc_t(1) - (acc_t(1) / norm) * threshold : acc_t(0);
    }
    for_each_item(layout, [&](int64_t i) {
      for_each_run(layout, i, [&](int64_t t, int64_t begin, int64_t n, int64_t g, bool) {
        decay_range(w[t] + begin, n, pre, true, scale[g]);
      });
    });
  });
}

// The list ops (torch.ops.fastreg, used where no plan is cached, e.g. under torch.compile): the
// layout of plan.h built for this call, over contiguous stand-ins of the tensors.

// group_dim only matters to the group-lasso term; without it every tensor is one group, so value
// and add_grad_ share one layout and return bit-identical values.
bool row_groups_of(const Coefs& coefs) {
  return coefs.row_groups && coefs.group_lasso != 0.0;
}

at::Tensor table_of(const Contiguous& params, const Contiguous* grads, bool row_groups) {
  std::vector<plan::Extent> extents;
  extents.reserve(params.tensors.size());
  for (const auto& t : params.tensors) {
    extents.push_back(plan::extent_of(t));
  }
  at::Tensor table = plan::build(extents, row_groups, grads == nullptr ? 1 : 2);
  plan::set_ptrs(table, 0, params.tensors);
  if (grads != nullptr) {
    plan::set_ptrs(table, 1, grads->tensors);
  }
  return table;
}

at::ScalarType dtype_of(at::TensorList params) {
  return params.empty() ? at::kFloat : params[0].scalar_type();
}

std::tuple<at::Tensor, at::Tensor> norms_cpu(at::TensorList params) {
  check_params(params, c10::DeviceType::CPU, "norms");
  const Contiguous c(params);
  return norms_table(table_of(c, nullptr, false), dtype_of(params));
}

at::Tensor value_cpu(at::TensorList params, double l1, double l2, double group_lasso, std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CPU, "value");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  const Contiguous c(params);
  return value_table(table_of(c, nullptr, row_groups_of(coefs)), dtype_of(params), l1, l2, group_lasso);
}

at::Tensor add_grad_cpu(at::TensorList params, at::TensorList grads, double l1, double l2, double group_lasso,
                        std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CPU, "add_grad_");
  check_grads(params, grads, "add_grad_");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  if (params.empty() || coefs.is_zero()) {
    return at::zeros({}, accumulate_options(dtype_of(params)));
  }
  const Contiguous w(params);
  const Contiguous g(grads);
  at::Tensor value = add_grad_table(table_of(w, &g, row_groups_of(coefs)), dtype_of(params), l1, l2, group_lasso);
  g.write_back(grads);
  return value;
}

std::vector<at::Tensor> penalty_backward_cpu(at::TensorList params, const at::Tensor& grad_output, double l1,
                                             double l2, double group_lasso, std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CPU, "penalty_backward");
  TORCH_CHECK(grad_output.numel() == 1, "fastreg::penalty_backward: grad_output must have one element, got shape ",
              grad_output.sizes());
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  std::vector<void*> out_ptrs;
  out_ptrs.reserve(params.size());
  for (const auto& p : params) {
    out.push_back(at::empty(p.sizes(), p.options().memory_format(at::MemoryFormat::Contiguous)));
    out_ptrs.push_back(out.back().numel() == 0 ? nullptr : out.back().data_ptr());
  }
  if (params.empty()) {
    return out;
  }
  const Contiguous w(params);
  const at::Tensor table = table_of(w, nullptr, row_groups_of(coefs));
  gradient<false>(View(table), dtype_of(params), coefs, out_ptrs, grad_output.item<double>(), nullptr);
  return out;
}

void decay_cpu(at::TensorList params, double lr, const std::optional<at::Tensor>& lr_tensor, double l1, double l2,
               double group_lasso, std::optional<int64_t> group_dim) {
  check_params(params, c10::DeviceType::CPU, "decay_");
  const Coefs coefs = make_coefs(l1, l2, group_lasso, group_dim);
  const Contiguous c(params);
  decay_table(table_of(c, nullptr, row_groups_of(coefs)), dtype_of(params), lr, lr_tensor, l1, l2, group_lasso);
  c.write_back(params);
}

}  // namespace

namespace cpu {

std::tuple<at::Tensor, at::Tensor> planned_norms(const at::Tensor& table, at::ScalarType dtype) {
  return norms_table(table, dtype);
}

at::Tensor planned_value(const at::Tensor& table, at::ScalarType dtype, double l1, double l2, double group_lasso) {
  return value_table(table, dtype, l1, l2, group_lasso);
}

at::Tensor planned_add_grad(const at::Tensor& table, at::ScalarType dtype, double l1, double l2, double group_lasso) {
  return add_grad_table(table, dtype, l1, l2, group_lasso);
}

void planned_decay(const at::Tensor& table, at::ScalarType dtype, double lr, const std::optional<at::Tensor>& lr_tensor,
                   double l1, double l2, double group_lasso) {
  decay_table(table, dtype, lr, lr_tensor, l1, l2, group_lasso);
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("norms", &norms_cpu);
  m.impl("value", &value_cpu);
  m.impl("add_grad_", &add_grad_cpu);
  m.impl("decay_", &decay_cpu);
  m.impl("penalty_backward", &penalty_backward_cpu);
}

}  // namespace fastreg
