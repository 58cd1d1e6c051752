// Argument checks of the RCS ops, shared by the CPU kernels (rcs.cpp) and the CUDA glue
// (cuda/rcs_cuda_glue.cpp), so both reject the same calls with the same words. The Python wrappers
// in fastacl/ops/rcs.py check first, with ValueErrors; these guard direct torch.ops calls.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fastacl {

inline bool is_storage_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

// What the checks learnt: output shape [rows, D], and where each layer's block starts.
struct ProjectPlan {
  bool kronecker = false;
  int64_t n = 0;     // input rows
  int64_t rows = 0;  // output rows: n, or num_segments with segment_ids
  int64_t D = 0;
  std::vector<int64_t> offset;
  std::vector<bool> bias;
};

inline ProjectPlan check_rcs_project(at::TensorList inputs, at::TensorList grad_outputs,
                                     c10::string_view mode_view, const c10::List<bool>& bias_flags,
                                     at::TensorList p, at::TensorList q,
                                     const c10::optional<at::Tensor>& segment_ids,
                                     int64_t num_segments, c10::DeviceType device_type) {
  ProjectPlan plan;
  const std::string mode(mode_view.data(), mode_view.size());
  plan.kronecker = mode == "kronecker";
  TORCH_CHECK(plan.kronecker || mode == "rowmean",
              "rcs_project: mode must be \"rowmean\" or \"kronecker\", got \"", mode, "\"");
  const int64_t L = static_cast<int64_t>(inputs.size());
  TORCH_CHECK(L >= 1, "rcs_project: needs at least one layer, got no inputs");
  TORCH_CHECK(static_cast<int64_t>(grad_outputs.size()) == L &&
                  static_cast<int64_t>(bias_flags.size()) == L,
              "rcs_project: inputs, grad_outputs and bias must have one entry per layer, got ", L,
              ", ", grad_outputs.size(), " and ", bias_flags.size());
  if (plan.kronecker) {
    TORCH_CHECK(static_cast<int64_t>(p.size()) == L && static_cast<int64_t>(q.size()) == L,
                "rcs_project: kronecker mode needs one P and one Q per layer (", L, "), got ",
                p.size(), " and ", q.size());
  } else {
    TORCH_CHECK(p.empty() && q.empty(), "rcs_project: rowmean mode takes no projections");
  }
  const at::ScalarType dtype = inputs[0].scalar_type();
  TORCH_CHECK(is_storage_dtype(dtype), "rcs_project: the kernels take float32 or bfloat16 "
              "inputs, got ", dtype);
  plan.n = inputs[0].dim() == 2 ? inputs[0].size(0) : -1;
  plan.bias.resize(L);
  plan.offset.resize(L);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& h = inputs[l];
    const at::Tensor& g = grad_outputs[l];
    TORCH_CHECK(h.dim() == 2 && g.dim() == 2 && h.size(0) == plan.n && g.size(0) == plan.n,
                "rcs_project: layer ", l, ": inputs [n, in] and grad_outputs [n, out] must be 2-D "
                "with n = ", plan.n, " rows, got ", h.sizes(), " and ", g.sizes());
    TORCH_CHECK(h.scalar_type() == dtype && g.scalar_type() == dtype, "rcs_project: layer ", l,
                ": all inputs and grad_outputs must be ", dtype, ", got ", h.scalar_type(),
                " and ", g.scalar_type());
    TORCH_CHECK(h.device() == inputs[0].device() && g.device() == inputs[0].device() &&
                    h.device().type() == device_type,
                "rcs_project: layer ", l, ": all tensors must be on ", inputs[0].device(),
                " (a ", device_type, " kernel), got ", h.device(), " and ", g.device());
    plan.bias[l] = bias_flags.get(l);
    plan.offset[l] = plan.D;
    if (plan.kronecker) {
      TORCH_CHECK(p[l].dim() == 2 && p[l].size(1) == g.size(1) && q[l].dim() == 2 &&
                      q[l].size(1) == h.size(1) && p[l].is_floating_point() &&
                      q[l].is_floating_point(),
                  "rcs_project: layer ", l, ": P must be [k1, out = ", g.size(1),
                  "] and Q [k2, in = ", h.size(1), "], floating point, got ", p[l].sizes(),
                  " and ", q[l].sizes());
      TORCH_CHECK(p[l].device() == h.device() && q[l].device() == h.device(),
                  "rcs_project: layer ", l, ": P and Q must be on ", h.device(), ", got ",
                  p[l].device(), " and ", q[l].device());
      plan.D += p[l].size(0) * q[l].size(0) + (plan.bias[l] ? p[l].size(0) : 0);
    } else {
      plan.D += h.size(1) + (plan.bias[l] ? 1 : 0);
    }
  }
  if (!segment_ids.has_value()) {
    TORCH_CHECK(num_segments == -1 || num_segments == plan.n,
                "rcs_project: without segment_ids, num_segments must be -1 (or n = ", plan.n,
                "), got ", num_segments);
    plan.rows = plan.n;
    return plan;
  }
  const at::Tensor& ids = *segment_ids;
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) == plan.n,
              "rcs_project: segment_ids must be an int64 tensor of shape [n] = [", plan.n,
              "], got ", ids.scalar_type(), " of shape ", ids.sizes());
  TORCH_CHECK(ids.device() == inputs[0].device(), "rcs_project: segment_ids must be on ",
              inputs[0].device(), ", got ", ids.device());
  TORCH_CHECK(num_segments >= 0, "rcs_project: num_segments must be >= 0 with segment_ids, got ",
              num_segments);
  plan.rows = num_segments;
  return plan;
}

inline void check_greedy_pick(const at::Tensor& R, const at::Tensor& v, const at::Tensor& taken,
                              c10::DeviceType device_type) {
  TORCH_CHECK(R.dim() == 2, "greedy_pick: R must be 2-D [N, D], got shape ", R.sizes());
  const int64_t N = R.size(0), D = R.size(1);
  TORCH_CHECK(is_storage_dtype(R.scalar_type()),
              "greedy_pick: the kernels take a float32 or bfloat16 R, got ", R.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == D && v.is_floating_point(),
              "greedy_pick: v must be a floating-point vector of length D = ", D, ", got ",
              v.scalar_type(), " of shape ", v.sizes());
  TORCH_CHECK(taken.dim() == 1 && taken.size(0) == N && taken.scalar_type() == at::kBool,
              "greedy_pick: taken must be a bool vector of length N = ", N, ", got ",
              taken.scalar_type(), " of shape ", taken.sizes());
  TORCH_CHECK(R.device().type() == device_type && v.device() == R.device() &&
                  taken.device() == R.device(),
              "greedy_pick: R, v and taken must be on one ", device_type, " device, got ",
              R.device(), ", ", v.device(), " and ", taken.device());
}

}  // namespace fastacl
