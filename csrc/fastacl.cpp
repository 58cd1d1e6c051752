// fastacl._C: the one TORCH_LIBRARY of fastacl's C++/CUDA operators.
//
// The schemas live here, once. CPU kernels are registered with TORCH_LIBRARY_IMPL(fastacl, CPU);
// CUDA kernels are plain launchers in .cu files, registered only when built against a CUDA torch
// (see ARCHITECTURE.md). The RCS projection and greedy ops join this library; for now it holds
// abi_version, which lets Python check that the loaded binary matches the sources it expects.

#include <Python.h>
#include <torch/library.h>

namespace fastacl {

// Bump when an op's schema or semantics change, so a stale build is detected and rebuilt.
constexpr int64_t kAbiVersion = 1;

int64_t abi_version() { return kAbiVersion; }

}  // namespace fastacl

TORCH_LIBRARY(fastacl, m) {
  m.def("abi_version() -> int", &fastacl::abi_version);
}

// Importing fastacl._C runs the static registrations above; the module itself holds nothing.
static struct PyModuleDef fastacl_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastacl_c_module); }
