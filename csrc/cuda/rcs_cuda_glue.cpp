// CUDA dispatch of the RCS ops: takes tensors, runs the launchers of rcs_cuda.cu on the current
// stream. Compiled only against a CUDA torch (setup.py and fastacl/ops/_extension.py add csrc/cuda/
// only when torch.version.cuda is set); a CPU torch lacks the CUDA libraries these headers need.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../rcs_checks.h"
#include "rcs_cuda.h"

namespace fastacl {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cuda::Storage storage_of(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? cuda::Storage::kFloat32 : cuda::Storage::kBFloat16;
}

at::Tensor rcs_project_cuda(at::TensorList inputs, at::TensorList grad_outputs,
                            c10::string_view mode, const c10::List<bool>& bias_flags,
                            at::TensorList p, at::TensorList q,
                            const c10::optional<at::Tensor>& segment_ids, int64_t num_segments) {
  const ProjectPlan plan = check_rcs_project(inputs, grad_outputs, mode, bias_flags, p, q,
                                             segment_ids, num_segments, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto options = inputs[0].options().dtype(at::kFloat);
  // Segments accumulate with atomics into zeros; without them every element is written once.
  const bool segmented = segment_ids.has_value();
  at::Tensor out = segmented ? at::zeros({plan.rows, plan.D}, options)
                             : at::empty({plan.rows, plan.D}, options);
  if (plan.n == 0 || plan.D == 0) return out.zero_();
  at::Tensor ids;
  if (segmented) ids = segment_ids->contiguous();
  const int64_t* ids_ptr = segmented ? ids.data_ptr<int64_t>() : nullptr;
  for (size_t l = 0; l < inputs.size(); ++l) {
    const at::Tensor H = inputs[l].contiguous();
    const at::Tensor Delta = grad_outputs[l].contiguous();
    if (plan.kronecker) {
      // The GEMMs in fp32 (cuBLAS): a bf16 matmul would round a and b to bf16.
      const at::Tensor A = at::matmul(Delta.to(at::kFloat), p[l].to(at::kFloat).t()).contiguous();
      const at::Tensor B = at::matmul(H.to(at::kFloat), q[l].to(at::kFloat).t()).contiguous();
      check_launch(cuda::rcs_kronecker_layer(A.data_ptr<float>(), B.data_ptr<float>(), plan.n,
                                             A.size(1), B.size(1), plan.bias[l], ids_ptr,
                                             plan.rows, out.data_ptr<float>(), plan.D,
                                             plan.offset[l], stream),
                   "rcs_project");
    } else {
      check_launch(cuda::rcs_rowmean_layer(H.data_ptr(), Delta.data_ptr(), storage_of(H), plan.n,
                                           H.size(1), Delta.size(1), plan.bias[l], ids_ptr,
                                           plan.rows, out.data_ptr<float>(), plan.D,
                                           plan.offset[l], stream),
                   "rcs_project");
    }
  }
  return out;
}

at::Tensor greedy_pick_cuda(const at::Tensor& R_in, const at::Tensor& v_in, at::Tensor& taken) {
  check_greedy_pick(R_in, v_in, taken, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(R_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t N = R_in.size(0), D = R_in.size(1);
  const at::Tensor R = R_in.stride(1) == 1 || D <= 1 ? R_in : R_in.contiguous();
  const at::Tensor v = v_in.to(at::kFloat).contiguous();
  at::Tensor taken_dense = taken.is_contiguous() ? taken : taken.contiguous();
  at::Tensor result = at::empty({}, R.options().dtype(at::kLong));
  at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::greedy_pick_workspace_bytes(N))},
                                   R.options().dtype(at::kByte));
  check_launch(cuda::greedy_pick(R.data_ptr(), storage_of(R), N, D, R.stride(0),
                                 v.data_ptr<float>(), taken_dense.data_ptr<bool>(),
                                 result.data_ptr<int64_t>(), workspace.data_ptr(), stream),
               "greedy_pick");
  if (!taken_dense.is_same(taken)) taken.copy_(taken_dense);
  return result;
}

}  // namespace
}  // namespace fastacl

TORCH_LIBRARY_IMPL(fastacl, CUDA, m) {
  m.impl("rcs_project", &fastacl::rcs_project_cuda);
  m.impl("greedy_pick", &fastacl::greedy_pick_cuda);
}
