// CUDA kernels of the RCS ops and their plain launchers (declared in rcs_cuda.h). Nothing from
// torch is included: this file compiles with `nvcc -c` alone (see docs/design.md). Semantics and
// the PyTorch reference: fastacl/ops/rcs.py. All arithmetic is fp32, whatever the storage.

#include "rcs_cuda.h"

#include <cuda_bf16.h>

#include <cstdint>

namespace fastacl {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxRowBlocks = 1 << 20;  // grid-stride beyond this
constexpr int64_t kMaxPickBlocks = 1024;     // partial results of greedy_pick's first pass

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;  // every lane holds the sum
}

// Sum over the block; every thread gets it. Ends with a barrier, so `scratch` may be reused.
__device__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

__device__ __forceinline__ void store(float* dst, float value, bool accumulate) {
  if (accumulate) {
    atomicAdd(dst, value);
  } else {
    *dst = value;
  }
}

// Output row of input row i: i itself, or its segment (-1: outside [0, rows), skipped).
__device__ __forceinline__ int64_t target_row(const int64_t* segment_ids, int64_t i, int64_t rows) {
  if (segment_ids == nullptr) return i;
  const int64_t s = segment_ids[i];
  return s >= 0 && s < rows ? s : -1;
}

// One block per input row: the row sum of Delta (a block reduction), then the scaled copy of H.
template <typename T>
__global__ void rowmean_kernel(const T* __restrict__ H, const T* __restrict__ Delta, int64_t n,
                               int64_t in, int64_t out, bool bias,
                               const int64_t* __restrict__ segment_ids, int64_t rows,
                               float* __restrict__ output, int64_t D, int64_t offset) {
  __shared__ float scratch[kWarps];
  const bool accumulate = segment_ids != nullptr;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t target = target_row(segment_ids, i, rows);
    if (target < 0) continue;  // the same for the whole block: no barrier is skipped by some
    float partial = 0.f;
    for (int64_t j = threadIdx.x; j < out; j += blockDim.x) partial += load(Delta, i * out + j);
    const float mean = block_sum(partial, scratch) / static_cast<float>(out);
    float* dst = output + target * D + offset;
    for (int64_t c = threadIdx.x; c < in; c += blockDim.x) {
      store(dst + c, mean * load(H, i * in + c), accumulate);
    }
    if (bias && threadIdx.x == 0) store(dst + in, mean, accumulate);
  }
}

// One block per input row: vec(a b^T) row-major, then a for the bias.
__global__ void kronecker_kernel(const float* __restrict__ A, const float* __restrict__ B,
                                 int64_t n, int64_t k1, int64_t k2, bool bias,
                                 const int64_t* __restrict__ segment_ids, int64_t rows,
                                 float* __restrict__ output, int64_t D, int64_t offset) {
  const bool accumulate = segment_ids != nullptr;
  const int64_t outer = k1 * k2, width = outer + (bias ? k1 : 0);
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t target = target_row(segment_ids, i, rows);
    if (target < 0) continue;
    const float* a = A + i * k1;
    const float* b = B + i * k2;
    float* dst = output + target * D + offset;
    for (int64_t e = threadIdx.x; e < width; e += blockDim.x) {
      const float value = e < outer ? a[e / k2] * b[e % k2] : a[e - outer];
      store(dst + e, value, accumulate);
    }
  }
}

// NaN ranks above every number (torch.argmax's rule); equal scores rank by the lower index, so
// the pick does not depend on how rows were split over warps and blocks. index -1: nothing yet.
__device__ __forceinline__ bool better(float a_score, int64_t a_index, float b_score,
                                       int64_t b_index) {
  if (a_index < 0) return false;
  if (b_index < 0) return true;
  const bool a_nan = isnan(a_score), b_nan = isnan(b_score);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a_score != b_score) return a_score > b_score;
  return a_index < b_index;
}

// First pass: one warp per row (lanes stride the columns: coalesced loads; every row is reduced
// in the same order, so equal rows get equal scores), the best per block to the workspace.
template <typename T>
__global__ void greedy_partial_kernel(const T* __restrict__ R, int64_t N, int64_t D,
                                      int64_t row_stride, const float* __restrict__ v,
                                      const bool* __restrict__ taken, float* __restrict__ part_score,
                                      int64_t* __restrict__ part_index) {
  __shared__ float warp_score[kWarps];
  __shared__ int64_t warp_index[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float best_score = 0.f;
  int64_t best_index = -1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp; i < N;
       i += static_cast<int64_t>(gridDim.x) * kWarps) {
    if (taken[i]) continue;  // a taken row is never read
    const T* row = R + i * row_stride;
    float acc = 0.f;
    for (int64_t c = lane; c < D; c += 32) acc += load(row, c) * v[c];
    acc = warp_sum(acc);
    if (better(acc, i, best_score, best_index)) {
      best_score = acc;
      best_index = i;
    }
  }
  if (lane == 0) {
    warp_score[warp] = best_score;
    warp_index[warp] = best_index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) {
      if (better(warp_score[w], warp_index[w], best_score, best_index)) {
        best_score = warp_score[w];
        best_index = warp_index[w];
      }
    }
    part_score[blockIdx.x] = best_score;
    part_index[blockIdx.x] = best_index;
  }
}

// Second pass: one block reduces the partial results, writes the pick and marks it taken.
__global__ void greedy_finish_kernel(const float* __restrict__ part_score,
                                     const int64_t* __restrict__ part_index, int64_t parts,
                                     bool* __restrict__ taken, int64_t* __restrict__ result) {
  __shared__ float score[kThreads];
  __shared__ int64_t index[kThreads];
  float best_score = 0.f;
  int64_t best_index = -1;
  for (int64_t k = threadIdx.x; k < parts; k += blockDim.x) {
    if (better(part_score[k], part_index[k], best_score, best_index)) {
      best_score = part_score[k];
      best_index = part_index[k];
    }
  }
  score[threadIdx.x] = best_score;
  index[threadIdx.x] = best_index;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half &&
        better(score[threadIdx.x + half], index[threadIdx.x + half], score[threadIdx.x],
               index[threadIdx.x])) {
      score[threadIdx.x] = score[threadIdx.x + half];
      index[threadIdx.x] = index[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    result[0] = index[0];
    if (index[0] >= 0) taken[index[0]] = true;
  }
}

unsigned int row_blocks(int64_t n) {
  return static_cast<unsigned int>(n < kMaxRowBlocks ? (n > 0 ? n : 1) : kMaxRowBlocks);
}

int64_t pick_blocks(int64_t N) {
  const int64_t blocks = (N + kWarps - 1) / kWarps;
  return blocks < 1 ? 1 : (blocks < kMaxPickBlocks ? blocks : kMaxPickBlocks);
}

}  // namespace

cudaError_t rcs_rowmean_layer(const void* H, const void* Delta, Storage storage, int64_t n,
                              int64_t in, int64_t out, bool bias, const int64_t* segment_ids,
                              int64_t rows, float* output, int64_t D, int64_t offset,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (storage == Storage::kFloat32) {
    rowmean_kernel<float><<<row_blocks(n), kThreads, 0, stream>>>(
        static_cast<const float*>(H), static_cast<const float*>(Delta), n, in, out, bias,
        segment_ids, rows, output, D, offset);
  } else {
    rowmean_kernel<__nv_bfloat16><<<row_blocks(n), kThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(H), static_cast<const __nv_bfloat16*>(Delta), n, in,
        out, bias, segment_ids, rows, output, D, offset);
  }
  return cudaGetLastError();
}

cudaError_t rcs_kronecker_layer(const float* A, const float* B, int64_t n, int64_t k1, int64_t k2,
                                bool bias, const int64_t* segment_ids, int64_t rows,
                                float* output, int64_t D, int64_t offset, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  kronecker_kernel<<<row_blocks(n), kThreads, 0, stream>>>(A, B, n, k1, k2, bias, segment_ids,
                                                          rows, output, D, offset);
  return cudaGetLastError();
}

size_t greedy_pick_workspace_bytes(int64_t N) {
  // int64 indices first, so both arrays stay aligned.
  return static_cast<size_t>(pick_blocks(N)) * (sizeof(int64_t) + sizeof(float));
}

cudaError_t greedy_pick(const void* R, Storage storage, int64_t N, int64_t D, int64_t row_stride,
                        const float* v, bool* taken, int64_t* result, void* workspace,
                        cudaStream_t stream) {
  const int64_t blocks = pick_blocks(N);
  int64_t* part_index = static_cast<int64_t*>(workspace);
  float* part_score = reinterpret_cast<float*>(part_index + blocks);
  if (storage == Storage::kFloat32) {
    greedy_partial_kernel<float><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        static_cast<const float*>(R), N, D, row_stride, v, taken, part_score, part_index);
  } else {
    greedy_partial_kernel<__nv_bfloat16>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
            static_cast<const __nv_bfloat16*>(R), N, D, row_stride, v, taken, part_score,
            part_index);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  greedy_finish_kernel<<<1, kThreads, 0, stream>>>(part_score, part_index, blocks, taken, result);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastacl
