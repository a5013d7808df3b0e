// Shared by every fastreg C++ backend: coefficients, the input checks that open each launcher
// and contiguous stand-ins for the tensors; the work layout itself is plan.h. Device code lives
// in the backend's own file.
#pragma once

#include <ATen/ATen.h>

#include "plan.h"

#include <cstdint>
#include <optional>
#include <vector>

namespace fastreg {

struct Coefs {
  double l1;
  double l2;
  double group_lasso;
  bool row_groups;  // group_dim == 0: each slice w[i] of a tensor with >= 2 dims is a group

  bool is_zero() const { return l1 == 0.0 && l2 == 0.0 && group_lasso == 0.0; }
};

inline Coefs make_coefs(double l1, double l2, double group_lasso, std::optional<int64_t> group_dim) {
  TORCH_CHECK(l1 >= 0.0 && l2 >= 0.0 && group_lasso >= 0.0,
              "fastreg: coefficients must be non-negative, got l1=", l1, " l2=", l2, " group_lasso=", group_lasso);
  TORCH_CHECK(!group_dim.has_value() || *group_dim == 0,
              "fastreg: group_dim must be None (one group per tensor) or 0 (slices along dim 0), got ", *group_dim);
  return Coefs{l1, l2, group_lasso, group_dim.has_value()};
}

// Launcher preamble: one device and one floating dtype for the whole list.
inline void check_params(at::TensorList params, c10::DeviceType device_type, const char* op) {
  if (params.empty()) {
    return;
  }
  const at::Tensor& first = params[0];
  TORCH_CHECK(first.device().type() == device_type, "fastreg::", op, ": params[0] is on ", first.device(),
              ", expected a ", c10::DeviceTypeName(device_type), " tensor");
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastreg::", op, ": params must be float16, bfloat16, float32 or float64, got ", dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.layout() == at::kStrided, "fastreg::", op, ": params[", i, "] is not a dense (strided) tensor");
    TORCH_CHECK(p.device() == first.device(), "fastreg::", op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", first.device());
    TORCH_CHECK(p.scalar_type() == dtype, "fastreg::", op, ": params[", i, "] is ", p.scalar_type(),
                " but params[0] is ", dtype);
  }
}

inline void check_grads(at::TensorList params, at::TensorList grads, const char* op) {
  TORCH_CHECK(grads.size() == params.size(), "fastreg::", op, ": got ", grads.size(), " grads for ",
              params.size(), " params");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.layout() == at::kStrided, "fastreg::", op, ": grads[", i, "] is not a dense (strided) tensor");
    TORCH_CHECK(g.sizes() == p.sizes() && g.scalar_type() == p.scalar_type() && g.device() == p.device(),
                "fastreg::", op, ": grads[", i, "] is ", g.scalar_type(), " ", g.sizes(), " on ", g.device(),
                " but params[", i, "] is ", p.scalar_type(), " ", p.sizes(), " on ", p.device());
  }
}

// Work on contiguous memory: contiguous inputs are used as they are, others through a
// contiguous copy that write_back() copies into the caller's tensor.
struct Contiguous {
  std::vector<at::Tensor> tensors;
  std::vector<size_t> copied;

  explicit Contiguous(at::TensorList list) {
    tensors.reserve(list.size());
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].is_contiguous()) {
        tensors.push_back(list[i]);
      } else {
        tensors.push_back(list[i].contiguous());
        copied.push_back(i);
      }
    }
  }

  void write_back(at::TensorList originals) const {
    for (size_t i : copied) {
      originals[i].copy_(tensors[i]);
    }
  }

  template <typename scalar_t>
  std::vector<scalar_t*> ptrs() const {
    std::vector<scalar_t*> out;
    out.reserve(tensors.size());
    for (const auto& t : tensors) {
      out.push_back(t.numel() == 0 ? nullptr : t.data_ptr<scalar_t>());
    }
    return out;
  }
};

// The CPU kernels over a work-layout table (plan.h) whose pointer rows address contiguous
// tensors of `dtype`: the planned path of fastreg/_plan.py calls them through the planner module.
namespace cpu {
std::tuple<at::Tensor, at::Tensor> planned_norms(const at::Tensor& table, at::ScalarType dtype);
at::Tensor planned_value(const at::Tensor& table, at::ScalarType dtype, double l1, double l2, double group_lasso);
at::Tensor planned_add_grad(const at::Tensor& table, at::ScalarType dtype, double l1, double l2, double group_lasso);
void planned_decay(const at::Tensor& table, at::ScalarType dtype, double lr, const std::optional<at::Tensor>& lr_tensor,
                   double l1, double l2, double group_lasso);

// The fused optimizer steps (fastreg_optim.cpp): torch's fused Adam / AdamW / SGD update with the
// decoupled decay `l2` before it and the proximal maps of `l1` and `group_lasso` after it, scaled
// by lr; they return the penalty (l1, penalty_l2, group_lasso) of the starting weights when
// `track`, else an undefined tensor. A nonzero `found_inf` skips the step: nothing is written.
at::Tensor planned_adam_step(const at::Tensor& table, at::ScalarType dtype, double lr,
                             const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                             double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             double l1, double l2, double group_lasso, double penalty_l2, bool track);
at::Tensor planned_sgd_step(const at::Tensor& table, at::ScalarType dtype, double lr,
                            const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                            double weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor>& first,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            double l1, double l2, double group_lasso, double penalty_l2, bool track);
}  // namespace cpu

}  // namespace fastreg
