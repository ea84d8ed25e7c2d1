// Device helpers shared by the CUDA patch kernels: the launch shape, the per-block token cache, and a
// deterministic block reduction (warp shuffles, then one warp over the warp sums; fixed order, no atomics).
//
// Launch shape: a block of kThreads threads owns `tok_per_block` consecutive tokens. Its threads first
// resolve those tokens (binary search of cu_seqlens, the patch id's grid row/col) into shared memory, then
// walk the block's (token, unit) pairs with consecutive threads on consecutive units of a token, so the
// token-side accesses are coalesced and the image-side ones are vectors of up to 16 bytes.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <algorithm>

#include "patch_index.h"

namespace maskdm {

constexpr int kThreads = 256;
constexpr int kMaxTokPerBlock = 256;
constexpr int kUnitsPerBlock = 2048;  // ~8 units per thread

inline int tokens_per_block(const PatchPlan& g) {
  return std::max(1, std::min(kMaxTokPerBlock, kUnitsPerBlock / g.units));
}

inline unsigned int num_blocks(int64_t num_tokens, int tok_per_block) {
  return static_cast<unsigned int>((num_tokens + tok_per_block - 1) / tok_per_block);
}

// Tokens of the block starting at token t0: tok_per_block, or fewer in the last block.
__device__ __forceinline__ int block_tokens(int64_t num_tokens, int64_t t0, int tok_per_block) {
  const int64_t left = num_tokens - t0;
  return left < tok_per_block ? static_cast<int>(left) : tok_per_block;
}

struct TokenCache {
  TokenPos pos[kMaxTokPerBlock];
};

// Fills cache.pos for tokens [t0, t0 + ntok); callers __syncthreads() before reading it.
__device__ __forceinline__ void cache_tokens(TokenCache& cache, const int32_t* ids, const int32_t* cu_seqlens,
                                             int64_t t0, int ntok, int32_t batch, const PatchPlan& g) {
  for (int i = threadIdx.x; i < ntok; i += blockDim.x) {
    CUDA_KERNEL_ASSERT(valid_patch_id(ids[t0 + i], g) && "maskdm: ids holds a patch id outside [0, num_patches)");
    cache.pos[i] = token_pos(ids, cu_seqlens, t0 + i, batch, g);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// The block's sum, valid in thread 0. blockDim.x must be a multiple of 32 (at most 1024).
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : acc_t(0);
    v = warp_sum(v);
  }
  return v;
}

}  // namespace maskdm
