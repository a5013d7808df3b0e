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
#include "cpu_table.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace fastreg {
namespace {

using namespace cpu;

// c * torch.sign(x) (sign 1 for x > 0, -1 for x < 0, 0 for zeros and NaN), bit for bit, with
// masks instead of a multiply.
template <typename Vec>
inline Vec scaled_sign(const Vec& x, const Vec& c) {
  const Vec zero(0);
  return ((x > zero) & c) - ((x < zero) & c);
}

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
      scale[g] = shrink_scale(norm, threshold);
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
