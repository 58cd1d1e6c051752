// CPU kernels of the RCS ops (docs/rcs.md sections 2-3): fastacl::rcs_project and
// fastacl::greedy_pick. Schemas are in fastacl.cpp; the semantics are documented in
// fastacl/ops/rcs.py, whose PyTorch reference is the oracle of these kernels.
//
// Both ops are memory-bound: rcs_project reads every H and Delta once and writes the [n, D]
// output once; greedy_pick reads R once per pick. So the kernels make one pass with
// at::parallel_for over output rows (segments), inner loops in SIMD helpers, and fp32
// accumulation for fp32 and bf16 storage. Kronecker mode's P Delta^T and Q H^T are GEMMs: at::matmul.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "rcs_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

// The inner loops are compiled for AVX-512, AVX2 and baseline x86-64, and the loader picks the
// best the CPU has (GCC function multi-versioning); the rest of the file stays baseline, so one
// binary runs on any x86-64 CPU. `omp simd reduction` lets the compiler reassociate the sums.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTACL_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTACL_SIMD_CLONES
#endif

namespace fastacl {
namespace simd {

// bf16 is the upper half of an fp32: widening is a 16-bit shift (vectorises, unlike a call).
static inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// Four rows against one vector: four independent load streams and accumulators keep more
// memory requests in flight than one dot at a time (the greedy pick is bandwidth-bound). Every
// row goes through the same accumulator sequence, so its score does not depend on which rows
// share the call (equal rows get equal scores: ties stay exact).
FASTACL_SIMD_CLONES void dot4_f32(const float* const* rows, const float* b, int64_t n,
                                  float* out) {
  const float *a0 = rows[0], *a1 = rows[1], *a2 = rows[2], *a3 = rows[3];
  float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
#pragma omp simd reduction(+ : acc0, acc1, acc2, acc3)
  for (int64_t i = 0; i < n; ++i) {
    acc0 += a0[i] * b[i];
    acc1 += a1[i] * b[i];
    acc2 += a2[i] * b[i];
    acc3 += a3[i] * b[i];
  }
  out[0] = acc0, out[1] = acc1, out[2] = acc2, out[3] = acc3;
}

FASTACL_SIMD_CLONES void dot4_bf16(const uint16_t* const* rows, const float* b, int64_t n,
                                   float* out) {
  const uint16_t *a0 = rows[0], *a1 = rows[1], *a2 = rows[2], *a3 = rows[3];
  float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
#pragma omp simd reduction(+ : acc0, acc1, acc2, acc3)
  for (int64_t i = 0; i < n; ++i) {
    acc0 += bf16_to_float(a0[i]) * b[i];
    acc1 += bf16_to_float(a1[i]) * b[i];
    acc2 += bf16_to_float(a2[i]) * b[i];
    acc3 += bf16_to_float(a3[i]) * b[i];
  }
  out[0] = acc0, out[1] = acc1, out[2] = acc2, out[3] = acc3;
}

FASTACL_SIMD_CLONES float sum_f32(const float* a, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i];
  return acc;
}

FASTACL_SIMD_CLONES float sum_bf16(const uint16_t* a, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += bf16_to_float(a[i]);
  return acc;
}

// y = s x (assign) or y += s x (accumulate).
FASTACL_SIMD_CLONES void scale_f32(float* y, float s, const float* x, int64_t n, bool add) {
  if (add) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += s * x[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = s * x[i];
  }
}

FASTACL_SIMD_CLONES void scale_bf16(float* y, float s, const uint16_t* x, int64_t n, bool add) {
  if (add) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += s * bf16_to_float(x[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = s * bf16_to_float(x[i]);
  }
}

// Overloads on the storage type, so the kernels are written once.
inline void dot4(const float* const* rows, const float* b, int64_t n, float* out) {
  dot4_f32(rows, b, n, out);
}
inline void dot4(const c10::BFloat16* const* rows, const float* b, int64_t n, float* out) {
  dot4_bf16(reinterpret_cast<const uint16_t* const*>(rows), b, n, out);
}
inline float sum(const float* a, int64_t n) { return sum_f32(a, n); }
inline float sum(const c10::BFloat16* a, int64_t n) {
  return sum_bf16(reinterpret_cast<const uint16_t*>(a), n);
}
inline void scale(float* y, float s, const float* x, int64_t n, bool add) {
  scale_f32(y, s, x, n, add);
}
inline void scale(float* y, float s, const c10::BFloat16* x, int64_t n, bool add) {
  scale_bf16(y, s, reinterpret_cast<const uint16_t*>(x), n, add);
}

}  // namespace simd

namespace {

// Rows grouped by output row: rows of segment s are order[start[s] .. start[s + 1]), in input
// order (a stable counting sort), so each output row is written by one thread, deterministically.
struct Segments {
  bool segmented = false;  // false: segment s is row s
  int64_t count = 0;
  std::vector<int64_t> start;
  std::vector<int64_t> order;

  int64_t begin(int64_t s) const { return segmented ? start[s] : s; }
  int64_t end(int64_t s) const { return segmented ? start[s + 1] : s + 1; }
  int64_t row(int64_t k) const { return segmented ? order[k] : k; }
};

// segment_ids and num_segments were checked by check_rcs_project, except the range of the ids.
Segments make_segments(const c10::optional<at::Tensor>& segment_ids, int64_t n,
                       int64_t num_segments) {
  Segments seg;
  if (!segment_ids.has_value()) {
    seg.count = n;
    return seg;
  }
  const at::Tensor& ids_tensor = *segment_ids;
  seg.segmented = true;
  at::Tensor ids_c = ids_tensor.contiguous();
  const int64_t* ids = ids_c.data_ptr<int64_t>();
  seg.count = num_segments;
  seg.start.assign(num_segments + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < num_segments, "rcs_project: segment_ids[", i, "] = ",
                ids[i], " is outside [0, num_segments = ", num_segments, ")");
    ++seg.start[ids[i] + 1];
  }
  for (int64_t s = 0; s < num_segments; ++s) seg.start[s + 1] += seg.start[s];
  seg.order.resize(n);
  std::vector<int64_t> next(seg.start.begin(), seg.start.end() - 1);
  for (int64_t i = 0; i < n; ++i) seg.order[next[ids[i]]++] = i;
  return seg;
}

// Enough rows per task that scheduling costs nothing next to the work.
int64_t grain_for(int64_t work_per_output_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_output_row));
}

template <typename scalar_t>
void rowmean_kernel(const std::vector<at::Tensor>& H, const std::vector<at::Tensor>& Delta,
                    const std::vector<bool>& bias, const std::vector<int64_t>& offset,
                    const Segments& seg, float* out, int64_t D) {
  const int64_t L = static_cast<int64_t>(H.size());
  std::vector<const scalar_t*> h(L), delta(L);
  std::vector<int64_t> in(L), width(L);
  for (int64_t l = 0; l < L; ++l) {
    h[l] = H[l].data_ptr<scalar_t>();
    delta[l] = Delta[l].data_ptr<scalar_t>();
    in[l] = H[l].size(1);
    width[l] = Delta[l].size(1);
  }
  const int64_t n = L ? H[0].size(0) : 0;
  const int64_t rows_per_segment = seg.count ? std::max<int64_t>(1, n / seg.count) : 1;
  at::parallel_for(0, seg.count, grain_for(rows_per_segment * 2 * D), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      float* row_out = out + s * D;
      if (seg.begin(s) == seg.end(s)) {
        std::fill(row_out, row_out + D, 0.f);
        continue;
      }
      for (int64_t k = seg.begin(s); k < seg.end(s); ++k) {
        const int64_t i = seg.row(k);
        const bool add = k != seg.begin(s);
        for (int64_t l = 0; l < L; ++l) {
          // (1/out) sum_j Delta_ij is the mean over the output units of the row of Delta_i H_i^T.
          const float mean = simd::sum(delta[l] + i * width[l], width[l]) /
                             static_cast<float>(width[l]);
          float* block = row_out + offset[l];
          simd::scale(block, mean, h[l] + i * in[l], in[l], add);
          if (bias[l]) block[in[l]] = add ? block[in[l]] + mean : mean;
        }
      }
    }
  });
}

// a = P Delta_i (k1) and b = Q H_i (k2) come precomputed as rows of A [n, k1] and B [n, k2].
void kronecker_kernel(const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B,
                      const std::vector<bool>& bias, const std::vector<int64_t>& offset,
                      const Segments& seg, float* out, int64_t D) {
  const int64_t L = static_cast<int64_t>(A.size());
  std::vector<const float*> a(L), b(L);
  std::vector<int64_t> k1(L), k2(L);
  for (int64_t l = 0; l < L; ++l) {
    a[l] = A[l].data_ptr<float>();
    b[l] = B[l].data_ptr<float>();
    k1[l] = A[l].size(1);
    k2[l] = B[l].size(1);
  }
  const int64_t n = L ? A[0].size(0) : 0;
  const int64_t rows_per_segment = seg.count ? std::max<int64_t>(1, n / seg.count) : 1;
  at::parallel_for(0, seg.count, grain_for(rows_per_segment * D), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      float* row_out = out + s * D;
      if (seg.begin(s) == seg.end(s)) {
        std::fill(row_out, row_out + D, 0.f);
        continue;
      }
      for (int64_t k = seg.begin(s); k < seg.end(s); ++k) {
        const int64_t i = seg.row(k);
        const bool add = k != seg.begin(s);
        for (int64_t l = 0; l < L; ++l) {
          const float* a_i = a[l] + i * k1[l];
          const float* b_i = b[l] + i * k2[l];
          float* block = row_out + offset[l];
          // vec(a b^T), row-major: entry (r, c) at r * k2 + c.
          for (int64_t r = 0; r < k1[l]; ++r) simd::scale(block + r * k2[l], a_i[r], b_i, k2[l], add);
          if (bias[l]) simd::scale(block + k1[l] * k2[l], 1.f, a_i, k1[l], add);
        }
      }
    }
  });
}

at::Tensor rcs_project_cpu(at::TensorList inputs, at::TensorList grad_outputs,
                           c10::string_view mode_view, const c10::List<bool>& bias_flags,
                           at::TensorList p, at::TensorList q,
                           const c10::optional<at::Tensor>& segment_ids, int64_t num_segments) {
  const ProjectPlan plan = check_rcs_project(inputs, grad_outputs, mode_view, bias_flags, p, q,
                                             segment_ids, num_segments, c10::DeviceType::CPU);
  const int64_t L = static_cast<int64_t>(inputs.size()), n = plan.n, D = plan.D;
  std::vector<at::Tensor> H(L), Delta(L);
  for (int64_t l = 0; l < L; ++l) {
    H[l] = inputs[l].contiguous();
    Delta[l] = grad_outputs[l].contiguous();
  }
  const Segments seg = make_segments(segment_ids, n, num_segments);
  at::Tensor out = at::empty({seg.count, D}, inputs[0].options().dtype(at::kFloat));
  if (seg.count == 0 || D == 0) return out.zero_();
  float* out_ptr = out.data_ptr<float>();
  if (plan.kronecker) {
    // The two GEMMs per layer, in fp32: a bf16 matmul would round a and b to bf16.
    std::vector<at::Tensor> A(L), B(L);
    for (int64_t l = 0; l < L; ++l) {
      A[l] = at::matmul(Delta[l].to(at::kFloat), p[l].to(at::kFloat).t()).contiguous();
      B[l] = at::matmul(H[l].to(at::kFloat), q[l].to(at::kFloat).t()).contiguous();
    }
    kronecker_kernel(A, B, plan.bias, plan.offset, seg, out_ptr, D);
  } else if (H[0].scalar_type() == at::kFloat) {
    rowmean_kernel<float>(H, Delta, plan.bias, plan.offset, seg, out_ptr, D);
  } else {
    rowmean_kernel<c10::BFloat16>(H, Delta, plan.bias, plan.offset, seg, out_ptr, D);
  }
  return out;
}

// The best (score, index) so far. NaN ranks above every number (as in torch.argmax), and equal
// scores rank by the lower index, so the result does not depend on how the rows were split.
struct Best {
  float score;
  int64_t index;  // -1: no row seen yet
};

inline bool better(const Best& a, const Best& b) {
  if (a.index < 0) return false;
  if (b.index < 0) return true;
  const bool a_nan = std::isnan(a.score), b_nan = std::isnan(b.score);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a.score != b.score) return a.score > b.score;
  return a.index < b.index;
}

template <typename scalar_t>
Best masked_argmax(const scalar_t* R, int64_t row_stride, int64_t N, int64_t D, const float* v,
                   const bool* taken, int64_t taken_stride) {
  const Best none{0.f, -1};
  return at::parallel_reduce(
      0, N, grain_for(D), none,
      [&](int64_t i0, int64_t i1, Best best) {
        // Four sequential streams over four quarters of the chunk, one untaken row from each per
        // step (a taken row is never read). Long sequential streams are what the hardware
        // prefetcher follows; four of them keep enough loads in flight (bf16 rows gain ~1.5x over
        // four adjacent rows). A step with fewer than four rows repeats its last row.
        const int64_t quarter = (i1 - i0 + 3) / 4;
        int64_t next[4], end[4];
        for (int64_t k = 0; k < 4; ++k) {
          next[k] = std::min(i1, i0 + k * quarter);
          end[k] = std::min(i1, i0 + (k + 1) * quarter);
        }
        const scalar_t* rows[4];
        int64_t index[4];
        float scores[4];
        while (true) {
          int64_t count = 0;
          for (int64_t k = 0; k < 4; ++k) {
            while (next[k] < end[k] && taken[next[k] * taken_stride]) ++next[k];
            if (next[k] < end[k]) {
              rows[count] = R + next[k] * row_stride;
              index[count++] = next[k]++;
            }
          }
          if (count == 0) break;
          for (int64_t k = count; k < 4; ++k) rows[k] = rows[count - 1];
          simd::dot4(rows, v, D, scores);
          for (int64_t k = 0; k < count; ++k) {
            const Best candidate{scores[k], index[k]};
            if (better(candidate, best)) best = candidate;
          }
        }
        return best;
      },
      [](Best a, Best b) { return better(a, b) ? a : b; });
}

at::Tensor greedy_pick_cpu(const at::Tensor& R_in, const at::Tensor& v_in, at::Tensor& taken) {
  check_greedy_pick(R_in, v_in, taken, c10::DeviceType::CPU);
  const int64_t N = R_in.size(0), D = R_in.size(1);
  // Rows may be strided (a slice of a bigger matrix); only the columns must be dense.
  const at::Tensor R = R_in.stride(1) == 1 || D <= 1 ? R_in : R_in.contiguous();
  const at::Tensor v = v_in.to(at::kFloat).contiguous();
  bool* taken_ptr = taken.data_ptr<bool>();
  const int64_t row_stride = R.stride(0), taken_stride = taken.stride(0);
  Best best;
  if (R.scalar_type() == at::kFloat) {
    best = masked_argmax(R.data_ptr<float>(), row_stride, N, D, v.data_ptr<float>(), taken_ptr,
                         taken_stride);
  } else {
    best = masked_argmax(R.data_ptr<c10::BFloat16>(), row_stride, N, D, v.data_ptr<float>(),
                         taken_ptr, taken_stride);
  }
  if (best.index >= 0) taken_ptr[best.index * taken_stride] = true;
  return at::scalar_tensor(best.index, R.options().dtype(at::kLong));
}

}  // namespace
}  // namespace fastacl

TORCH_LIBRARY_IMPL(fastacl, CPU, m) {
  m.impl("rcs_project", &fastacl::rcs_project_cpu);
  m.impl("greedy_pick", &fastacl::greedy_pick_cpu);
}
