// Device helpers shared by the CUDA patch kernels: the launch shape, the per-block token cache (with the checks
// that keep any id / cu_seqlens values in bounds), and a deterministic block reduction (warp shuffles, then one
// warp over the warp sums; fixed order, no atomics).
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
  bool ok[kMaxTokPerBlock];  // false: a bad patch id or cu_seqlens; pos is then a safe in-bounds placeholder
};

// In every thread: cu_seqlens (batch + 1 values) starts at 0, never decreases and ends at num_tokens. Reads the
// B + 1 values once per block (L2-resident); a barrier.
__device__ __forceinline__ bool block_layout_ok(const int32_t* cu_seqlens, int32_t batch, int64_t num_tokens) {
  int bad = 0;
  for (int i = threadIdx.x; i < batch; i += blockDim.x) bad |= cu_seqlens[i + 1] < cu_seqlens[i];
  if (threadIdx.x == 0) bad |= cu_seqlens[0] != 0 || static_cast<int64_t>(cu_seqlens[batch]) != num_tokens;
  return !__syncthreads_or(bad);
}

// Fills cache.pos / cache.ok for tokens [t0, t0 + ntok) and returns, in every thread, whether any is invalid
// (a barrier: the cache is readable after it). An invalid token is never used as an address: it gets patch
// (0, 0) of the sample the search finds (always in [0, batch)), and the kernels write NaN for it.
__device__ __forceinline__ bool cache_tokens(TokenCache& cache, const int32_t* ids, const int32_t* cu_seqlens,
                                             int64_t t0, int ntok, int32_t batch, const PatchPlan& g,
                                             bool layout_ok) {
  int any_bad = 0;
  for (int i = threadIdx.x; i < ntok; i += blockDim.x) {
    const bool ok = layout_ok && valid_patch_id(ids[t0 + i], g);
    TokenPos tp;
    if (ok) {
      tp = token_pos(ids, cu_seqlens, t0 + i, batch, g);
    } else {
      tp.b = token_sample(cu_seqlens, t0 + i, batch);
      tp.prow = tp.pcol = 0;
    }
    cache.pos[i] = tp;
    cache.ok[i] = ok;
    any_bad |= !ok;
  }
  return __syncthreads_or(any_bad);
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
