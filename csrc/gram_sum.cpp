// Schemas of the gram_sum op family, the build-information ops and the empty module init that
// makes `import torch_ntk._C` load this library (which runs the registrations below).
#include <Python.h>

#include <vector>

#include <torch/library.h>

#include "gram_sum.h"

namespace torch_ntk {

#ifdef WITH_CUDA
int64_t cuda_version_cuda();
std::vector<int64_t> cuda_arch_cuda();
#endif

// CUDA runtime version the kernels were compiled against (e.g. 13000), -1 in a CPU-only build.
int64_t cuda_version() {
#ifdef WITH_CUDA
  return cuda_version_cuda();
#else
  return -1;
#endif
}

// Compute capabilities the CUDA kernels were compiled for (e.g. [80, 90]), empty without CUDA.
std::vector<int64_t> cuda_arch() {
#ifdef WITH_CUDA
  return cuda_arch_cuda();
#else
  return {};
#endif
}

// `kind` is the mode ("full", "trace" or "diagonal"); an argument named `mode` would clash with
// the keyword torch's dispatch-mode redirection passes when the op is traced (torch.compile).
TORCH_LIBRARY(torch_ntk, m) {
  m.def(
      "gram_sum_out(Tensor[] h1, Tensor[] h2, Tensor[] d1, Tensor[] d2, float[] c, str kind, "
      "Tensor(a!) out) -> ()");
  m.def("gram_sum_sym_out(Tensor[] h, Tensor[] d, float[] c, str kind, Tensor(a!) out) -> ()");
  m.def("cuda_version() -> int", &cuda_version);
  m.def("cuda_arch() -> int[]", &cuda_arch);
}

}  // namespace torch_ntk

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
