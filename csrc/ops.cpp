// The fastreg operator schemas, defined once for every device. Each backend adds its kernels
// with TORCH_LIBRARY_IMPL(fastreg, <DispatchKey>, m); fake (meta) kernels live in fastreg/_ops.py.
//
// Coefficients are validated by fastreg's Python dispatch; group_dim is None or 0. decay_
// takes its learning rate as `lr`, or from `lr_tensor` (one element) when that is given, so
// that an LR held in a tensor by a scheduler or a compiled graph is read without a host copy
// on devices where that matters.
#include <torch/library.h>

TORCH_LIBRARY(fastreg, m) {
  m.def("norms(Tensor[] params) -> (Tensor, Tensor)");
  m.def("value(Tensor[] params, float l1, float l2, float group_lasso, int? group_dim) -> Tensor");
  m.def(
      "add_grad_(Tensor[] params, Tensor(a!)[] grads, float l1, float l2, float group_lasso, int? group_dim) "
      "-> Tensor");
  m.def(
      "decay_(Tensor(a!)[] params, float lr, Tensor? lr_tensor, float l1, float l2, float group_lasso, "
      "int? group_dim) -> ()");
  m.def(
      "penalty_backward(Tensor[] params, Tensor grad_output, float l1, float l2, float group_lasso, "
      "int? group_dim) -> Tensor[]");
}
