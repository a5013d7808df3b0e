// Shared by every fastreg C++ backend: coefficients, the work list over all tensors of a call,
// and the input checks that open each launcher. Device code lives in the backend's own file.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fastreg {

// Elements per work item. The item layout depends only on the tensor shapes, never on the
// thread count, so per-item partial sums, and every result built from them in item order, are
// bit-identical for any number of threads. 64K is apex's multi-tensor chunk: large enough that
// per-item overhead vanishes, small enough to balance two threads over a few hundred tensors.
constexpr int64_t kChunk = int64_t{1} << 16;

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

// Elements [begin, end) of tensor `tensor` (flat, contiguous indexing). A group longer than a
// chunk is cut into several items (`split`); otherwise an item holds the whole groups
// [group_begin, group_end), so a group's sum never has to be combined across threads.
struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t group_begin;
  int64_t group_end;
  bool split;
};

struct TensorLayout {
  int64_t group_len;     // elements per group
  int64_t num_groups;
  int64_t group_offset;  // index of this tensor's first group among all groups of the call
  int64_t item_begin;
  int64_t item_end;
};

struct WorkList {
  std::vector<WorkItem> items;
  std::vector<TensorLayout> tensors;
  int64_t num_groups = 0;
  int64_t numel = 0;
};

inline WorkList make_work_list(const std::vector<at::Tensor>& tensors, bool row_groups) {
  WorkList list;
  list.tensors.reserve(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const at::Tensor& w = tensors[t];
    const int64_t numel = w.numel();
    TensorLayout layout{};
    if (row_groups && w.dim() >= 2) {
      layout.num_groups = w.size(0);
      layout.group_len = layout.num_groups == 0 ? 0 : numel / layout.num_groups;
    } else {
      layout.num_groups = 1;
      layout.group_len = numel;
    }
    layout.group_offset = list.num_groups;
    layout.item_begin = static_cast<int64_t>(list.items.size());
    const int64_t len = layout.group_len;
    if (len >= kChunk) {
      for (int64_t g = 0; g < layout.num_groups; ++g) {
        for (int64_t begin = g * len; begin < (g + 1) * len; begin += kChunk) {
          list.items.push_back({static_cast<int64_t>(t), begin, std::min(begin + kChunk, (g + 1) * len), g, g + 1, true});
        }
      }
    } else if (len > 0) {
      const int64_t per_item = kChunk / len;
      for (int64_t g = 0; g < layout.num_groups; g += per_item) {
        const int64_t g_end = std::min(g + per_item, layout.num_groups);
        list.items.push_back({static_cast<int64_t>(t), g * len, g_end * len, g, g_end, false});
      }
    }
    layout.item_end = static_cast<int64_t>(list.items.size());
    list.num_groups += layout.num_groups;
    list.numel += numel;
    list.tensors.push_back(layout);
  }
  return list;
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

}  // namespace fastreg
