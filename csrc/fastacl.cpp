// fastacl._C: the one TORCH_LIBRARY of fastacl's C++/CUDA operators.
//
// The schemas live here, once. CPU kernels are registered with TORCH_LIBRARY_IMPL(fastacl, CPU);
// CUDA kernels are plain launchers in .cu files, registered only when built against a CUDA torch
// (see docs/design.md). abi_version lets Python check that the loaded binary matches the sources
// it expects. The RCS ops (docs/rcs.md sections 2-3) are documented in fastacl/ops/rcs.py; their
// CPU kernels are in rcs.cpp, their CUDA kernels in cuda/.

#include <Python.h>
#include <torch/library.h>

namespace fastacl {

// Bump when an op's schema or semantics change, so a stale build is detected and rebuilt.
constexpr int64_t kAbiVersion = 2;

int64_t abi_version() { return kAbiVersion; }

}  // namespace fastacl

TORCH_LIBRARY(fastacl, m) {
  m.def("abi_version() -> int", &fastacl::abi_version);
  // The fake (shape) implementations of the ops below are Python (torch.library.register_fake in
  // fastacl.ops.rcs); this tells torch which module to import to find them.
  m.set_python_module("fastacl.ops.rcs");
  // Per-sample projected head gradients, one row per sample (or per segment id when segment_ids
  // is given; num_segments fixes the output's row count without reading segment_ids).
  m.def(
      "rcs_project(Tensor[] inputs, Tensor[] grad_outputs, str mode, bool[] bias, Tensor[] p, "
      "Tensor[] q, Tensor? segment_ids, int num_segments) -> Tensor");
  // Index of the largest R[i] . v over rows with taken[i] == false (ties: the lowest index; -1
  // when every row is taken); marks it taken. A 0-d int64 tensor, so no host synchronisation.
  m.def("greedy_pick(Tensor R, Tensor v, Tensor(a!) taken) -> Tensor");
}

// Importing fastacl._C runs the static registrations above; the module itself holds nothing.
static struct PyModuleDef fastacl_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastacl_c_module); }
