// Plain launchers of the RCS CUDA kernels (rcs_cuda.cu): raw pointers, sizes and a stream, no
// torch types, so the .cu file compiles with nvcc alone (CI runs `nvcc -c` on a CPU-only torch).
// The glue that takes tensors and registers the CUDA dispatch key is rcs_cuda_glue.cpp, compiled
// only against a CUDA torch. Semantics: fastacl/ops/rcs.py.

#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fastacl {
namespace cuda {

enum class Storage : int { kFloat32 = 0, kBFloat16 = 1 };

// One layer of rowmean mode. H [n, in] and Delta [n, out] are dense row-major (storage dtype);
// output [rows, D] fp32 gets the layer's block at column `offset`. Without segment_ids (nullptr)
// output row i is written; with them, row i is atomically added to output row segment_ids[i]
// (output must be zeroed first; ids outside [0, rows) are skipped: checking them would sync).
cudaError_t rcs_rowmean_layer(const void* H, const void* Delta, Storage storage, int64_t n,
                              int64_t in, int64_t out, bool bias, const int64_t* segment_ids,
                              int64_t rows, float* output, int64_t D, int64_t offset,
                              cudaStream_t stream);

// One layer of kronecker mode from A = Delta P^T [n, k1] and B = H Q^T [n, k2] (fp32, dense; the
// caller's GEMMs): writes vec(A[i] (outer) B[i]) row-major, then A[i] when bias. Segments as above.
cudaError_t rcs_kronecker_layer(const float* A, const float* B, int64_t n, int64_t k1, int64_t k2,
                                bool bias, const int64_t* segment_ids, int64_t rows,
                                float* output, int64_t D, int64_t offset, cudaStream_t stream);

// Scratch that greedy_pick needs (per-block partial results), in bytes.
size_t greedy_pick_workspace_bytes(int64_t N);

// result[0] = argmax over i with !taken[i] of R[i] . v (ties: lowest index; NaN ranks first;
// -1 when all are taken) and taken[result] = true, all on the device: two launches, no sync.
// R [N, D] with rows `row_stride` elements apart (columns dense); v [D] fp32.
cudaError_t greedy_pick(const void* R, Storage storage, int64_t N, int64_t D, int64_t row_stride,
                        const float* v, bool* taken, int64_t* result, void* workspace,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace fastacl
