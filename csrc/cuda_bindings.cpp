// The Python module of the CUDA extension: the table ops of a plan (fastreg/_plan.py keeps one
// work-layout table per tensor list, on the device), called with no work per tensor, and what
// tests ask of the kernels. The torch.ops.fastreg CUDA kernels register themselves on load
// (fastreg_cuda.cu).
#include <torch/extension.h>

#include "fastreg_cuda.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using fastreg::cuda::DeviceTable;
  using fastreg::cuda::TablePtr;
  m.doc() = "fastreg's CUDA kernels over work-layout tables in device memory";
  py::class_<DeviceTable, TablePtr>(m, "DeviceTable")
      .def_property_readonly("words", &DeviceTable::words, "the device words: the plan.h table, then the split groups")
      .def_property_readonly("host", &DeviceTable::host, "the plan.h table on the host, which the counts come from")
      .def_property_readonly("device", &DeviceTable::device)
      .def_property_readonly("tensors", &DeviceTable::num_tensors)
      .def_property_readonly("groups", &DeviceTable::num_groups)
      .def_property_readonly("items", &DeviceTable::num_items)
      .def_property_readonly("split_groups", &DeviceTable::num_split_groups)
      .def("__repr__", [](const DeviceTable& t) {
        return "<fastreg DeviceTable on " + t.device().str() + ": " + std::to_string(t.num_tensors()) + " tensors, " +
               std::to_string(t.num_groups()) + " groups, " + std::to_string(t.num_items()) + " items>";
      });
  m.def("layout_limits", [] { return py::make_tuple(fastreg::cuda::kChunk, fastreg::cuda::kMaxGroups); },
        "elements per work item and most groups per packed item of the CUDA tables");
  m.def("table_to_device", &fastreg::cuda::table_to_device, py::arg("host"), py::arg("device"));
  m.def("norms", &fastreg::cuda::table_norms, py::arg("table"), py::arg("dtype"));
  m.def("value", &fastreg::cuda::table_value, py::arg("table"), py::arg("dtype"), py::arg("l1"), py::arg("l2"),
        py::arg("group_lasso"));
  m.def("add_grad_", &fastreg::cuda::table_add_grad, py::arg("table"), py::arg("dtype"), py::arg("l1"), py::arg("l2"),
        py::arg("group_lasso"));
  m.def("decay_", &fastreg::cuda::table_decay, py::arg("table"), py::arg("dtype"), py::arg("lr"), py::arg("lr_tensor"),
        py::arg("l1"), py::arg("l2"), py::arg("group_lasso"));
  // The fused optimizer steps, with the planner module's signatures of their CPU twins.
  m.def("adam_step_", &fastreg::cuda::table_adam_step, py::arg("table"), py::arg("dtype"), py::arg("lr"),
        py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("l1"), py::arg("l2"), py::arg("group_lasso"), py::arg("penalty_l2"), py::arg("track"));
  m.def("sgd_step_", &fastreg::cuda::table_sgd_step, py::arg("table"), py::arg("dtype"), py::arg("lr"),
        py::arg("lr_tensor"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
        py::arg("maximize"), py::arg("first"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("l1"),
        py::arg("l2"), py::arg("group_lasso"), py::arg("penalty_l2"), py::arg("track"));
  m.def("list_table_cache_stats", [] {
    const auto s = fastreg::cuda::list_table_cache_stats();
    py::dict out;
    out["tables"] = s.size;
    out["hits"] = s.hits;
    out["misses"] = s.misses;
    return out;
  });
  m.def("clear_list_table_cache", &fastreg::cuda::clear_list_table_cache);
  m.def(
      "kernel_info",
      [](int device) {
        py::list out;
        for (const auto& k : fastreg::cuda::kernel_info(device)) {
          py::dict d;
          d["name"] = k.name;
          d["registers"] = k.registers;
          d["local_bytes"] = k.local_bytes;
          d["threads"] = k.threads;
          d["max_threads"] = k.max_threads;
          d["blocks_per_sm"] = k.blocks_per_sm;
          out.append(d);
        }
        return out;
      },
      py::arg("device"),
      "the kernels launched so far: registers, local memory (spills) and the blocks per SM that fit");
}
