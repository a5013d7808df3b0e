// The host interface of the CUDA kernels (fastreg_cuda.cu) that cuda_bindings.cpp exposes to
// Python: a work-layout table (plan.h) in device memory, and the ops that run from one.
//
// Nothing here names a CUDA type, so the bindings compile with the host compiler alone.
#pragma once

#include "fastreg.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastreg {
namespace cuda {

// The layout limits of every CUDA table: elements per work item and most groups per packed
// item. A thread block runs one item at a time, so the group bound keeps a block from walking
// thousands of tiny tensors; the list ops use the same limits, so a list gives the same bits
// through either path.
constexpr int64_t kChunk = plan::kDefaultChunk;
constexpr int64_t kMaxGroups = 64;

// A plan.h table copied to one CUDA device, with what the host needs to launch kernels over
// it (counts, taken from the host table: the device copy is never read back).
//
// The device words are the plan.h table followed by the index of every split group (a group
// of more than `chunk` elements), which the finalize kernel walks one warp per group.
class DeviceTable : public std::enable_shared_from_this<DeviceTable> {
 public:
  // Copies `host` (a plan.h table) to `device` through pinned memory, without waiting for the
  // copy, on the current stream. `for_capture`: the current stream is capturing a CUDA graph,
  // so the words travel as kernel arguments, which the graph keeps (a copy from host memory
  // would be replayed from memory the graph does not own).
  DeviceTable(const at::Tensor& host, const at::Device& device, bool for_capture);
  ~DeviceTable();
  DeviceTable(const DeviceTable&) = delete;
  DeviceTable& operator=(const DeviceTable&) = delete;

  const at::Tensor& words() const { return words_; }
  const at::Tensor& host() const { return host_; }
  const at::Device& device() const { return device_; }
  int64_t num_tensors() const { return header_[plan::kTensors]; }
  int64_t num_groups() const { return header_[plan::kGroups]; }
  int64_t num_items() const { return header_[plan::kItems]; }
  int64_t num_lists() const { return header_[plan::kLists]; }
  int64_t chunk() const { return header_[plan::kChunk]; }
  bool row_groups() const { return header_[plan::kRowGroups] != 0; }
  int64_t header(int64_t word) const { return header_[word]; }
  int64_t num_split_groups() const { return split_groups_; }
  // Word offset, in words(), of the split groups' indices.
  int64_t split_at() const { return header_[plan::kWords]; }

  // Called by every op before it launches on the current stream: a stream other than the one
  // the table was copied on first waits for that copy, and the table's memory is kept from
  // reuse until that stream's work is done; a table read by a captured graph is kept for the
  // life of the process, since the graph holds its address.
  void prepare_use() const;

 private:
  struct Sync;
  at::Tensor words_;
  at::Tensor host_;
  at::Device device_;
  int64_t header_[plan::kHeaderWords];
  int64_t split_groups_ = 0;
  std::unique_ptr<Sync> sync_;
};

using TablePtr = std::shared_ptr<DeviceTable>;

// table_to_device for a plan: refuses while the current stream captures a graph (the plan
// would keep a table that only graph replays ever write).
TablePtr table_to_device(const at::Tensor& host, const at::Device& device);

// The ops over a table whose pointer rows address contiguous tensors of `dtype` (row 0 params,
// row 1 grads for add_grad_), as the CPU ones of planner.cpp.
std::tuple<at::Tensor, at::Tensor> table_norms(const TablePtr& table, at::ScalarType dtype);
at::Tensor table_value(const TablePtr& table, at::ScalarType dtype, double l1, double l2, double group_lasso);
at::Tensor table_add_grad(const TablePtr& table, at::ScalarType dtype, double l1, double l2, double group_lasso);
void table_decay(const TablePtr& table, at::ScalarType dtype, double lr, const std::optional<at::Tensor>& lr_tensor,
                 double l1, double l2, double group_lasso);

// The fused optimizer steps, the CUDA twins of cpu::planned_adam_step / planned_sgd_step (same
// pointer rows, arguments and penalty / proximal terms), with torch's CUDA fused Adam / AdamW /
// SGD as the update: each tensor's float32 step (Adam's row 4, on the device) advances before
// the update reads it; `lr_tensor`, `grad_scale`, `found_inf` and a device `first` are read by
// the kernels, never on the host, so a step can be captured in a CUDA graph. A nonzero found_inf
// writes nothing: no weight, gradient or state, and the steps, advanced by one and then reduced
// by found_inf as torch's fused path does, come back where they were for GradScaler's 1.0.
// Returns the penalty of the starting weights (l1, penalty_l2, group_lasso) as a 0-dim tensor on
// the device when `track`, else an undefined tensor.
at::Tensor table_adam_step(const TablePtr& table, at::ScalarType dtype, double lr,
                           const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                           double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                           double l1, double l2, double group_lasso, double penalty_l2, bool track);
at::Tensor table_sgd_step(const TablePtr& table, at::ScalarType dtype, double lr,
                          const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                          double weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor>& first,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                          double l1, double l2, double group_lasso, double penalty_l2, bool track);

// The list ops' cache of device tables (keyed by the tensors' addresses and extents).
struct CacheStats {
  int64_t size;
  int64_t hits;
  int64_t misses;
};
CacheStats list_table_cache_stats();
void clear_list_table_cache();

// What the loaded binary is: per kernel variant its registers, local memory, threads per
// block, and the blocks per SM that the launches use on `device` (from the occupancy API).
struct KernelInfo {
  std::string name;
  int registers;
  int local_bytes;
  int threads;
  int max_threads;
  int blocks_per_sm;
};
std::vector<KernelInfo> kernel_info(int device);

}  // namespace cuda
}  // namespace fastreg
