// Fused optimizer steps on CPU: Adam / AdamW and SGD with fastreg's decoupled decay and proximal
// maps, in one pass over the weights, the gradients and the optimizer state of every tensor of a
// work-layout table (plan.h).
//
// Pointer rows of the table:
//   Adam: 0 params, 1 grads, 2 exp_avg, 3 exp_avg_sq, 4 step (a float32 scalar per tensor),
//         5 max_exp_avg_sq (amsgrad only)
//   SGD:  0 params, 1 grads, 2 momentum_buffer (momentum != 0 only)
//
// Per element, in registers: the penalty sums of the starting weight; `p *= 1 - lr*l2` (the
// decoupled decay of fastreg.Regularized, before the inner step); the optimizer's update, with
// torch's own weight_decay, operation for operation as torch's fused CPU kernels
// (torch._fused_adam_ / _fused_adamw_ / _fused_sgd_) compute it, so that with the regularization
// off the results are theirs; then the soft threshold of the L1 term; one store. With group lasso
// the pass also sums each group's squares after the threshold, and a second pass over the
// weights alone applies the block shrink with those norms.
//
// fp16 / bf16 values are computed in fp32 and rounded once, on the store. Sums combine in item
// and group order (cpu_table.h), so the penalty is bit-identical to fastreg.penalty's on the same
// table and independent of the thread count.
#include "cpu_table.h"

#include <ATen/Dispatch.h>

#include <cmath>
#include <optional>
#include <utility>
#include <vector>

// The per-block update of a step, inlined into its loop: called out of line (as GCC chose for
// bf16, whose conversions make the body long), each 16-element block paid a call and reloaded
// the step's constants from memory, 1.5x torch's fused AdamW on a bf16 Llama.
#if defined(__GNUC__)
#define FASTREG_INLINE __attribute__((always_inline)) inline
#else
#define FASTREG_INLINE inline
#endif

namespace fastreg {
namespace {

using namespace cpu;

// A whole block (kTail = false) or the last, partial block of a range: every stream of one step
// loads and stores through the same one.
template <typename scalar_t, bool kTail>
struct Io {
  using B = Block<scalar_t>;
  int64_t n;

  typename B::Regs load(const scalar_t* p) const {
    if constexpr (kTail) {
      return B::load_tail(p, n);
    } else {
      return B::load(p);
    }
  }

  void store(scalar_t* p, const typename B::Regs& r) const {
    if constexpr (kTail) {
      B::store_tail(p, n, r);
    } else {
      B::store(p, r);
    }
  }
};

template <typename acc_t>
struct RangeSums {
  Sums<acc_t> start;  // of the weights the step starts from: the penalty
  Sums<acc_t> end;    // of the thresholded weights: the group norms of the block shrink
};

// One run of elements of one tensor: the decoupled decay `pre`, then `update` (which reads the
// gradient and the state of the same elements, writes the state and changes the weights in
// registers), then `prox`, then one store of the weights.
template <typename scalar_t, bool kStart, bool kEnd, typename Update>
inline RangeSums<at::opmath_type<scalar_t>> fused_range(scalar_t* w, int64_t n,
                                                        const DecayPrefix<at::opmath_type<scalar_t>>& pre,
                                                        const DecayPrefix<at::opmath_type<scalar_t>>& prox,
                                                        const Update& update) {
  using B = Block<scalar_t>;
  SumAcc<scalar_t> start, end;
  int64_t i = 0;
  for (; i + B::kSize <= n; i += B::kSize) {
    __builtin_prefetch(w + i + kPrefetch, 1, 0);
    auto x = B::load(w + i);
    if constexpr (kStart) {
      start.add(x);
    }
    pre(x);
    update(Io<scalar_t, false>{B::kSize}, i, x);
    prox(x);
    B::store(w + i, x);
    if constexpr (kEnd) {
      end.add(x);
    }
  }
  if (i < n) {
    const Io<scalar_t, true> io{n - i};
    auto x = io.load(w + i);
    if constexpr (kStart) {
      start.add(x);  // the padding is zeros
    }
    pre(x);
    update(io, i, x);
    prox(x);
    io.store(w + i, x);
    if constexpr (kEnd) {
      B::mask_tail(x, n - i);
      end.add(x);
    }
  }
  RangeSums<at::opmath_type<scalar_t>> out;
  if constexpr (kStart) {
    out.start = start.reduce();
  }
  if constexpr (kEnd) {
    out.end = end.reduce();
  }
  return out;
}

// What every step shares: the learning rate, the GradScaler protocol and fastreg's terms.
struct Common {
  double lr;
  std::optional<float> grad_scale;  // divide the gradients by it (and store them unscaled)
  bool maximize;
  Coefs prox;          // l1 and group_lasso after the update, l2 before it (Regularized's decay)
  Coefs penalty;       // the penalty of the starting weights
  bool track;          // compute it
};

template <typename acc_t>
struct GradIn {
  using Vec = Vectorized<acc_t>;
  bool unscale;
  bool maximize;
  Vec scale;

  // The gradient as the update uses it: torch's fused kernels divide by the scale, store that,
  // and negate for maximize.
  template <typename IoT, typename scalar_t>
  typename Block<scalar_t>::Regs load(const IoT& io, scalar_t* g) const {
    auto r = io.load(g);
    if (unscale) {
      for (auto& v : r.v) {
        v = v / scale;
      }
      io.store(g, r);
    }
    if (maximize) {
      for (auto& v : r.v) {
        v = v * Vec(acc_t(-1));
      }
    }
    return r;
  }
};

template <typename acc_t>
struct Prefixes {
  DecayPrefix<acc_t> pre;
  DecayPrefix<acc_t> prox;
};

template <typename acc_t>
Prefixes<acc_t> prefixes_of(const Common& c) {
  using Vec = Vectorized<acc_t>;
  return {
      DecayPrefix<acc_t>{c.prox.l2 != 0.0, false, Vec(static_cast<acc_t>(1 - c.lr * c.prox.l2)), Vec(acc_t(0))},
      DecayPrefix<acc_t>{false, c.prox.l1 != 0.0, Vec(acc_t(1)), Vec(static_cast<acc_t>(c.lr * c.prox.l1))},
  };
}

template <typename acc_t>
GradIn<acc_t> grad_in_of(const Common& c) {
  using Vec = Vectorized<acc_t>;
  return {c.grad_scale.has_value(), c.maximize, Vec(static_cast<acc_t>(c.grad_scale.value_or(1.0f)))};
}

// The pass over every run of the table, then the block shrink; returns the penalty when tracked.
// make_update(t, begin, first) gives the update of the run of tensor t starting at `begin`.
template <typename scalar_t, bool kStart, bool kEnd, typename MakeUpdate>
void fused_pass(const View& layout, const Common& c, const MakeUpdate& make_update, at::Tensor& value) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto w = row_of<scalar_t>(layout, 0);
  const Prefixes<acc_t> fixes = prefixes_of<acc_t>(c);
  std::optional<Partials<acc_t>> start, end;
  if constexpr (kStart) {
    start.emplace(layout);
  }
  if constexpr (kEnd) {
    end.emplace(layout);
  }
  for_each_item(layout, [&](int64_t i) {
    for_each_run(layout, i, [&](int64_t t, int64_t begin, int64_t n, int64_t g, bool split) {
      const auto sums = fused_range<scalar_t, kStart, kEnd>(w[t] + begin, n, fixes.pre, fixes.prox, make_update(t, begin));
      if constexpr (kStart) {
        start->record(i, g, split, sums.start);
      }
      if constexpr (kEnd) {
        end->record(i, g, split, sums.end);
      }
    });
  });
  if constexpr (kStart) {
    start->combine(layout);
    value.fill_(start->value(layout, c.penalty));
  }
  if constexpr (kEnd) {
    end->combine(layout);
    const auto threshold = static_cast<acc_t>(c.lr * c.prox.group_lasso);
    std::vector<acc_t> scale(layout.num_groups());
    for (int64_t g = 0; g < layout.num_groups(); ++g) {
      scale[g] = shrink_scale(end->group_norm(g), threshold);
    }
    const DecayPrefix<acc_t> none{false, false, Vectorized<acc_t>(acc_t(1)), Vectorized<acc_t>(acc_t(0))};
    for_each_item(layout, [&](int64_t i) {
      for_each_run(layout, i, [&](int64_t t, int64_t begin, int64_t n, int64_t g, bool) {
        decay_range(w[t] + begin, n, none, true, scale[g]);
      });
    });
  }
}

template <typename scalar_t, typename MakeUpdate>
void dispatch_pass(const View& layout, const Common& c, const MakeUpdate& make_update, at::Tensor& value) {
  const bool shrink = c.prox.group_lasso != 0.0;
  if (c.track) {
    shrink ? fused_pass<scalar_t, true, true>(layout, c, make_update, value)
           : fused_pass<scalar_t, true, false>(layout, c, make_update, value);
  } else {
    shrink ? fused_pass<scalar_t, false, true>(layout, c, make_update, value)
           : fused_pass<scalar_t, false, false>(layout, c, make_update, value);
  }
}

// The penalty of a step that GradScaler skips: the weights are read, nothing is written.
at::Tensor skipped_penalty(const View& layout, at::ScalarType dtype, const Common& c) {
  if (!c.track) {
    return at::Tensor();
  }
  at::Tensor value = at::zeros({}, accumulate_options(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_skipped_step", [&] {
    value.fill_(sums_pass(layout, row_of<scalar_t>(layout, 0), Identity{}).value(layout, c.penalty));
  });
  return value;
}

double read_lr(double lr, const std::optional<at::Tensor>& lr_tensor, const char* op) {
  if (!lr_tensor.has_value()) {
    return lr;
  }
  TORCH_CHECK(lr_tensor->numel() == 1 && lr_tensor->is_floating_point(), "fastreg::", op,
              ": lr_tensor must be one floating-point element, got ", lr_tensor->scalar_type(), " of shape ",
              lr_tensor->sizes());
  return lr_tensor->item<double>();
}

// GradScaler's tensors (float32, one element): the scale, and whether a gradient was inf/NaN.
std::optional<float> read_scaler(const std::optional<at::Tensor>& t, const char* name, const char* op) {
  if (!t.has_value()) {
    return std::nullopt;
  }
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, "fastreg::", op, ": ", name,
              " must be one float32 element, got ", t->scalar_type(), " of shape ", t->sizes());
  return t->item<float>();
}

Common common_of(const View& layout, double lr, const std::optional<at::Tensor>& lr_tensor, bool maximize,
                 const std::optional<at::Tensor>& grad_scale, double l1, double l2, double group_lasso,
                 double penalty_l2, bool track, const char* op) {
  lr = read_lr(lr, lr_tensor, op);
  return Common{lr,
                read_scaler(grad_scale, "grad_scale", op),
                maximize,
                coefs_of(layout, l1, l2, group_lasso),
                coefs_of(layout, l1, penalty_l2, group_lasso),
                track};
}

// -- Adam / AdamW ---------------------------------------------------------------------------

enum AdamList : int64_t { kParam = 0, kGrad, kExpAvg, kExpAvgSq, kStep, kMaxExpAvgSq };

template <typename acc_t>
struct AdamHyper {
  using Vec = Vectorized<acc_t>;
  bool decoupled;
  bool use_wd;
  bool amsgrad;
  bool lerp_small;  // |1 - beta1| < 0.5: which form of lerp torch uses
  Vec wd;           // Adam: g += p * weight_decay
  Vec wd_factor;    // AdamW: p *= 1 - lr * weight_decay
  Vec beta2;
  Vec one_minus_beta2;
  Vec lerp_coeff;
  Vec eps;
};

// A tensor's bias corrections, from its own step count.
template <typename acc_t>
struct AdamTensor {
  Vectorized<acc_t> neg_step_size;
  Vectorized<acc_t> bias_correction2_sqrt;
};

template <typename scalar_t>
struct AdamUpdate {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  scalar_t* g;
  scalar_t* m;
  scalar_t* v;
  scalar_t* vmax;
  GradIn<acc_t> in;
  AdamHyper<acc_t> h;
  AdamTensor<acc_t> s;

  // torch's adam_math (aten/src/ATen/native/cpu/FusedAdamKernel.cpp), in acc_t.
  template <typename IoT, typename Regs>
  FASTREG_INLINE void operator()(const IoT& io, int64_t i, Regs& x) const {
    auto grad = in.load(io, g + i);
    auto exp_avg = io.load(m + i);
    auto exp_avg_sq = io.load(v + i);
    Regs max_sq;
    if (h.amsgrad) {
      max_sq = io.load(vmax + i);
    }
    for (int j = 0; j < Block<scalar_t>::kVecs; ++j) {
      Vec gj = grad.v[j];
      if (h.use_wd) {
        if (h.decoupled) {
          x.v[j] = x.v[j] * h.wd_factor;
        } else {
          gj = at::vec::fmadd(x.v[j], h.wd, gj);
        }
      }
      exp_avg.v[j] = at::vec::fmadd(h.lerp_coeff, gj - exp_avg.v[j], h.lerp_small ? exp_avg.v[j] : gj);
      exp_avg_sq.v[j] = at::vec::fmadd(h.one_minus_beta2 * gj, gj, exp_avg_sq.v[j] * h.beta2);
      Vec second = exp_avg_sq.v[j];
      if (h.amsgrad) {
        max_sq.v[j] = at::vec::maximum(max_sq.v[j], exp_avg_sq.v[j]);
        second = max_sq.v[j];
      }
      const Vec denom = second.sqrt() / s.bias_correction2_sqrt + h.eps;
      x.v[j] = x.v[j] + s.neg_step_size * exp_avg.v[j] / denom;
    }
    io.store(m + i, exp_avg);
    io.store(v + i, exp_avg_sq);
    if (h.amsgrad) {
      io.store(vmax + i, max_sq);
    }
  }
};

// -- SGD ------------------------------------------------------------------------------------

enum SgdList : int64_t { kMomentumBuffer = 2 };

template <typename acc_t>
struct SgdHyper {
  using Vec = Vectorized<acc_t>;
  bool use_wd;
  bool use_momentum;
  bool nesterov;
  Vec wd;
  Vec momentum;
  Vec one_minus_dampening;
  Vec neg_lr;
};

template <typename scalar_t>
struct SgdUpdate {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  scalar_t* g;
  scalar_t* buf;
  bool first;  // the tensor's momentum buffer is new: it starts as the gradient
  GradIn<acc_t> in;
  SgdHyper<acc_t> h;

  // torch's sgd_math (aten/src/ATen/native/cpu/FusedSGDKernel.cpp), in acc_t.
  template <typename IoT, typename Regs>
  FASTREG_INLINE void operator()(const IoT& io, int64_t i, Regs& x) const {
    auto grad = in.load(io, g + i);
    Regs momentum_buf;
    if (h.use_momentum && !first) {
      momentum_buf = io.load(buf + i);
    }
    for (int j = 0; j < Block<scalar_t>::kVecs; ++j) {
      Vec gj = grad.v[j];
      if (h.use_wd) {
        gj = at::vec::fmadd(x.v[j], h.wd, gj);
      }
      if (h.use_momentum) {
        const Vec b = first ? gj : at::vec::fmadd(gj, h.one_minus_dampening, momentum_buf.v[j] * h.momentum);
        momentum_buf.v[j] = b;
        gj = h.nesterov ? at::vec::fmadd(b, h.momentum, gj) : b;
      }
      x.v[j] = at::vec::fmadd(gj, h.neg_lr, x.v[j]);
    }
    if (h.use_momentum) {
      io.store(buf + i, momentum_buf);
    }
  }
};

}  // namespace

namespace cpu {

at::Tensor planned_adam_step(const at::Tensor& table, at::ScalarType dtype, double lr,
                             const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                             double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             double l1, double l2, double group_lasso, double penalty_l2, bool track) {
  constexpr const char* op = "adam_step_";
  check_table(table, amsgrad ? kMaxExpAvgSq + 1 : kStep + 1, op);
  const View layout(table);
  const Common c = common_of(layout, lr, lr_tensor, maximize, grad_scale, l1, l2, group_lasso, penalty_l2, track, op);
  TORCH_CHECK(weight_decay >= 0.0 && eps >= 0.0 && beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
              "fastreg::", op, ": bad hyperparameters weight_decay=", weight_decay, " eps=", eps, " betas=(", beta1,
              ", ", beta2, ")");
  const auto skip = read_scaler(found_inf, "found_inf", op);
  if (skip.has_value() && *skip != 0.0f) {
    return skipped_penalty(layout, dtype, c);
  }
  at::Tensor value = c.track ? at::zeros({}, accumulate_options(dtype)) : at::Tensor();
  const int64_t count = layout.num_tensors();
  // torch advances the float32 step, then reads it as a double for the bias corrections.
  std::vector<double> neg_step_size(count), bias_correction2_sqrt(count);
  for (int64_t t = 0; t < count; ++t) {
    float* step = layout.ptr<float>(kStep, t);
    *step = *step + 1.0f;
    const double n = *step;
    neg_step_size[t] = -(c.lr / (1 - std::pow(beta1, n)));
    bias_correction2_sqrt[t] = std::sqrt(1 - std::pow(beta2, n));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_adam_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const acc_t lerp_weight = static_cast<acc_t>(1 - beta1);
    const AdamHyper<acc_t> h{
        decoupled,
        weight_decay != 0.0,
        amsgrad,
        std::abs(lerp_weight) < acc_t(0.5),
        Vec(static_cast<acc_t>(weight_decay)),
        Vec(static_cast<acc_t>(1 - c.lr * weight_decay)),
        Vec(static_cast<acc_t>(beta2)),
        Vec(static_cast<acc_t>(1 - beta2)),
        std::abs(lerp_weight) < acc_t(0.5) ? Vec(lerp_weight) : Vec(lerp_weight) - Vec(acc_t(1)),
        Vec(static_cast<acc_t>(eps)),
    };
    const GradIn<acc_t> in = grad_in_of<acc_t>(c);
    const auto g = row_of<scalar_t>(layout, kGrad);
    const auto m = row_of<scalar_t>(layout, kExpAvg);
    const auto v = row_of<scalar_t>(layout, kExpAvgSq);
    const auto vmax = amsgrad ? row_of<scalar_t>(layout, kMaxExpAvgSq) : std::vector<scalar_t*>(count, nullptr);
    dispatch_pass<scalar_t>(layout, c, [&](int64_t t, int64_t begin) {
      return AdamUpdate<scalar_t>{g[t] + begin, m[t] + begin, v[t] + begin,
                                    vmax[t] == nullptr ? nullptr : vmax[t] + begin, in, h,
                                    AdamTensor<acc_t>{Vec(static_cast<acc_t>(neg_step_size[t])),
                                                      Vec(static_cast<acc_t>(bias_correction2_sqrt[t]))}};
    }, value);
  });
  return value;
}

at::Tensor planned_sgd_step(const at::Tensor& table, at::ScalarType dtype, double lr,
                            const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                            double weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor>& first,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            double l1, double l2, double group_lasso, double penalty_l2, bool track) {
  constexpr const char* op = "sgd_step_";
  const bool use_momentum = momentum != 0.0;
  check_table(table, use_momentum ? kMomentumBuffer + 1 : kGrad + 1, op);
  const View layout(table);
  const Common c = common_of(layout, lr, lr_tensor, maximize, grad_scale, l1, l2, group_lasso, penalty_l2, track, op);
  TORCH_CHECK(weight_decay >= 0.0 && momentum >= 0.0 && (!nesterov || (momentum > 0.0 && dampening == 0.0)),
              "fastreg::", op, ": bad hyperparameters weight_decay=", weight_decay, " momentum=", momentum,
              " dampening=", dampening, " nesterov=", nesterov);
  const int64_t count = layout.num_tensors();
  std::vector<bool> is_first(count, false);
  if (first.has_value()) {
    TORCH_CHECK(first->scalar_type() == at::kBool && first->dim() == 1 && first->numel() == count && first->is_cpu(),
                "fastreg::", op, ": first must be a bool CPU tensor of one flag per tensor (", count, "), got ",
                first->scalar_type(), " of shape ", first->sizes());
    const at::Tensor flags = first->contiguous();
    for (int64_t t = 0; t < count; ++t) {
      is_first[t] = flags.data_ptr<bool>()[t];
    }
  }
  const auto skip = read_scaler(found_inf, "found_inf", op);
  if (skip.has_value() && *skip != 0.0f) {
    return skipped_penalty(layout, dtype, c);
  }
  at::Tensor value = c.track ? at::zeros({}, accumulate_options(dtype)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_sgd_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const SgdHyper<acc_t> h{
        weight_decay != 0.0,
        use_momentum,
        nesterov,
        Vec(static_cast<acc_t>(weight_decay)),
        Vec(static_cast<acc_t>(momentum)),
        Vec(static_cast<acc_t>(1 - dampening)),
        Vec(static_cast<acc_t>(-c.lr)),
    };
    const GradIn<acc_t> in = grad_in_of<acc_t>(c);
    const auto g = row_of<scalar_t>(layout, kGrad);
    const auto buf = use_momentum ? row_of<scalar_t>(layout, kMomentumBuffer) : std::vector<scalar_t*>(count, nullptr);
    dispatch_pass<scalar_t>(layout, c, [&](int64_t t, int64_t begin) {
      return SgdUpdate<scalar_t>{g[t] + begin, buf[t] == nullptr ? nullptr : buf[t] + begin, is_first[t], in, h};
    }, value);
  });
  return value;
}

}  // namespace cpu
}  // namespace fastreg
