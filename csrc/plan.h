// The work layout of a fastreg call: which elements of which tensor each work item covers.
// One specification, built here once per parameter list and read by every kernel: the CPU
// kernels (fastreg_cpu.cpp) read it from host memory, the CUDA kernels (fastreg_cuda.cu) and the
// Triton kernels (fastreg/kernels/) from a copy in device memory.
//
// A call's tensors are cut into *groups*: a whole tensor, or with row groups (group lasso over
// group_dim=0) each slice w[i] of a tensor with two or more dimensions, a contiguous run of
// numel / shape[0] elements. A group is the unit of the group-lasso norm; every group's sums
// are also what the per-tensor sums are built from, in group order.
//
// Groups are then packed into *work items*, each processed by one thread (CPU) or one
// program / thread block (GPU):
//   - a group longer than `chunk` elements is cut into items of `chunk` elements (the last one
//     shorter), each holding part of that one group: a *split* group, whose sums are the sums of
//     its items' partial sums, in item order;
//   - consecutive shorter groups, across tensor boundaries, share one item while their elements
//     add up to at most `chunk` and they number at most `max_groups`; each of these groups is
//     summed whole inside its item.
// The layout depends only on the tensors' sizes and the two limits, never on a thread count, so
// every result combined from it in item and group order is bit-identical for any parallelism.
//
// The table is one int64 tensor (words):
//   header    [kHeaderWords]   counts and section offsets, indexed by the Header enum
//   ptrs      [lists][T]       data address of each tensor of each list (params; params, grads)
//   tensor_groups [T + 1]      tensor t's groups are [tensor_groups[t], tensor_groups[t + 1])
//   groups    [G][kGroupWords] tensor, first element, element count, first item
//   items     [W][kItemWords]  first group, end group (exclusive), element offset, element count
// For an item of a split group, [first group, end group) is that one group and the elements are
// group start + [offset, offset + count); for an item of packed groups, offset is 0 and count the
// total of its groups' elements.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastreg {
namespace plan {

// apex's multi-tensor chunk: large enough that per-item overhead vanishes, small enough to
// spread a few hundred tensors over many threads or thread blocks.
constexpr int64_t kDefaultChunk = int64_t{1} << 16;
constexpr int64_t kUnlimitedGroups = std::numeric_limits<int64_t>::max();

enum Header : int64_t {
  kTensors = 0,
  kGroups,
  kItems,
  kLists,
  kChunk,
  kMaxGroups,
  kRowGroups,
  kNumel,
  kPtrsAt,
  kTensorGroupsAt,
  kGroupsAt,
  kItemsAt,
  kWords,
  kHeaderWords = 16,
};

enum GroupField : int64_t { kGroupTensor = 0, kGroupStart, kGroupLen, kGroupItem, kGroupWords };
enum ItemField : int64_t { kItemGroup = 0, kItemGroupEnd, kItemOffset, kItemLen, kItemWords };

// What the layout needs of a tensor: its element count and, for row groups, its rows (shape[0]
// of a tensor with two or more dimensions, else 1: one group).
struct Extent {
  int64_t numel;
  int64_t rows;
};

inline Extent extent_of(const at::Tensor& t) {
  return {t.numel(), t.dim() >= 2 ? t.size(0) : 1};
}

// Builds the table for tensors of the given extents; `lists` rows of pointers are left zero for
// the caller to fill (set_ptrs).
inline at::Tensor build(const std::vector<Extent>& tensors, bool row_groups, int64_t lists,
                        int64_t chunk = kDefaultChunk, int64_t max_groups = kUnlimitedGroups) {
  TORCH_CHECK(chunk > 0 && max_groups > 0 && lists >= 0, "fastreg: bad layout limits chunk=", chunk,
              " max_groups=", max_groups, " lists=", lists);
  const int64_t num_tensors = static_cast<int64_t>(tensors.size());
  std::vector<int64_t> tensor_groups;
  tensor_groups.reserve(num_tensors + 1);
  std::vector<int64_t> groups;  // kGroupWords per group
  groups.reserve(num_tensors * kGroupWords);
  std::vector<int64_t> items;  // kItemWords per item
  int64_t numel = 0;
  // The packed item being filled: its first group, groups and elements so far (-1: none open).
  int64_t open = -1, open_groups = 0, open_len = 0;
  auto close = [&](int64_t group_end) {
    if (open >= 0) {
      items.insert(items.end(), {open, group_end, 0, open_len});
      open = -1;
    }
  };
  for (int64_t t = 0; t < num_tensors; ++t) {
    tensor_groups.push_back(static_cast<int64_t>(groups.size()) / kGroupWords);
    const Extent& e = tensors[t];
    TORCH_CHECK(e.numel >= 0 && e.rows >= 0, "fastreg: bad tensor extent");
    const int64_t count = row_groups ? e.rows : 1;
    const int64_t len = count == 0 ? 0 : e.numel / count;
    for (int64_t r = 0; r < count; ++r) {
      const int64_t g = static_cast<int64_t>(groups.size()) / kGroupWords;
      if (len > chunk) {
        close(g);
        groups.insert(groups.end(), {t, r * len, len, static_cast<int64_t>(items.size()) / kItemWords});
        for (int64_t offset = 0; offset < len; offset += chunk) {
          items.insert(items.end(), {g, g + 1, offset, std::min(chunk, len - offset)});
        }
        continue;
      }
      if (open >= 0 && (open_len + len > chunk || open_groups == max_groups)) {
        close(g);
      }
      if (open < 0) {
        open = g;
        open_groups = 0;
        open_len = 0;
      }
      groups.insert(groups.end(), {t, r * len, len, static_cast<int64_t>(items.size()) / kItemWords});
      ++open_groups;
      open_len += len;
    }
    numel += e.numel;
  }
  const int64_t num_groups = static_cast<int64_t>(groups.size()) / kGroupWords;
  close(num_groups);
  tensor_groups.push_back(num_groups);
  const int64_t num_items = static_cast<int64_t>(items.size()) / kItemWords;

  const int64_t ptrs_at = kHeaderWords;
  const int64_t tensor_groups_at = ptrs_at + lists * num_tensors;
  const int64_t groups_at = tensor_groups_at + num_tensors + 1;
  const int64_t items_at = groups_at + num_groups * kGroupWords;
  const int64_t words = items_at + num_items * kItemWords;
  at::Tensor table = at::zeros({words}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = table.data_ptr<int64_t>();
  out[kTensors] = num_tensors;
  out[kGroups] = num_groups;
  out[kItems] = num_items;
  out[kLists] = lists;
  out[kChunk] = chunk;
  out[kMaxGroups] = max_groups == kUnlimitedGroups ? 0 : max_groups;
  out[kRowGroups] = row_groups ? 1 : 0;
  out[kNumel] = numel;
  out[kPtrsAt] = ptrs_at;
  out[kTensorGroupsAt] = tensor_groups_at;
  out[kGroupsAt] = groups_at;
  out[kItemsAt] = items_at;
  out[kWords] = words;
  std::copy(tensor_groups.begin(), tensor_groups.end(), out + tensor_groups_at);
  std::copy(groups.begin(), groups.end(), out + groups_at);
  std::copy(items.begin(), items.end(), out + items_at);
  return table;
}

// Writes the data addresses of `tensors` as pointer row `list` of a host table.
inline void set_ptrs(at::Tensor& table, int64_t list, at::TensorList tensors) {
  int64_t* words = table.data_ptr<int64_t>();
  TORCH_CHECK(list < words[kLists] && static_cast<int64_t>(tensors.size()) == words[kTensors],
              "fastreg: pointer row ", list, " does not fit the table");
  int64_t* row = words + words[kPtrsAt] + list * words[kTensors];
  for (size_t t = 0; t < tensors.size(); ++t) {
    row[t] = tensors[t].numel() == 0 ? 0 : reinterpret_cast<int64_t>(tensors[t].data_ptr());
  }
}

// Read access to a host table (the layout's words are immutable once built).
struct View {
  const int64_t* w;

  explicit View(const at::Tensor& table) : w(table.data_ptr<int64_t>()) {}

  int64_t num_tensors() const { return w[kTensors]; }
  int64_t num_groups() const { return w[kGroups]; }
  int64_t num_items() const { return w[kItems]; }
  int64_t lists() const { return w[kLists]; }
  int64_t chunk() const { return w[kChunk]; }
  int64_t numel() const { return w[kNumel]; }
  bool row_groups() const { return w[kRowGroups] != 0; }
  // The pointer rows: list l's address of tensor t is ptrs()[l * num_tensors() + t].
  const int64_t* ptrs() const { return w + w[kPtrsAt]; }
  template <typename T>
  T* ptr(int64_t list, int64_t tensor) const {
    return reinterpret_cast<T*>(ptrs()[list * num_tensors() + tensor]);
  }
  int64_t tensor_group_begin(int64_t t) const { return w[w[kTensorGroupsAt] + t]; }
  int64_t tensor_group_end(int64_t t) const { return w[w[kTensorGroupsAt] + t + 1]; }
  const int64_t* group(int64_t g) const { return w + w[kGroupsAt] + g * kGroupWords; }
  const int64_t* item(int64_t i) const { return w + w[kItemsAt] + i * kItemWords; }
  // A split group's items are consecutive, from its first item.
  bool split(int64_t g) const { return group(g)[kGroupLen] > chunk(); }
  int64_t group_items(int64_t g) const {
    const int64_t len = group(g)[kGroupLen];
    return len > chunk() ? (len + chunk() - 1) / chunk() : 1;
  }
};

}  // namespace plan
}  // namespace fastreg
