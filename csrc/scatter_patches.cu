// scatter_patches_kernel, CUDA: packed tokens back to contiguous (B, C, H, W) images, masked patches = fill.
//
// The output is allocated filled (one write pass), then one thread per unit writes the visible values: a
// unit is a vector of up to 16 bytes along w in the image (row mode for C == 1, col mode for C > 1), read
// from the token with coalesced (row mode: vector) loads.
// Bytes moved: writes B*C*H*W values (the fill), reads T*P token values and writes T*P image values; the error
// pass reads the T ids again. A token with a patch id outside [0, N) makes its sample's image NaN; a malformed
// cu_seqlens, every image.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cuda_utils.cuh"
#include "patch_ops.h"

namespace maskdm {
namespace {

template <int V, typename scalar_t>
__global__ void __launch_bounds__(kThreads) scatter_kernel(const ScatterArgs<scalar_t> a, int tok_per_block) {
  __shared__ TokenCache cache;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tok_per_block;
  const int ntok = block_tokens(a.num_tokens, t0, tok_per_block);
  const bool layout_ok = block_layout_ok(a.cu_seqlens, a.batch, a.num_tokens);
  cache_tokens(cache, a.ids, a.cu_seqlens, t0, ntok, a.batch, a.g, layout_ok);
  const int units = a.g.units;
  for (int i = threadIdx.x; i < ntok * units; i += blockDim.x) {
    const int tl = i / units;
    if (cache.ok[tl]) scatter_unit<V>(a, t0 + tl, cache.pos[tl], i - tl * units);
  }
}

// Error path, a second launch on the same stream (so after every valid write of scatter_kernel: within one launch
// another block, or another warp of the same block, could still write a valid pixel into an image made NaN). An
// invalid token has nowhere to go, so its sample's image becomes NaN; a malformed cu_seqlens, every image (block
// 0). Without a bad token a block reads its ids and exits. The output is contiguous: image b is [b * so.b, ...).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) scatter_poison_kernel(const ScatterArgs<scalar_t> a, int tok_per_block) {
  __shared__ TokenCache cache;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tok_per_block;
  const int ntok = block_tokens(a.num_tokens, t0, tok_per_block);
  const bool layout_ok = block_layout_ok(a.cu_seqlens, a.batch, a.num_tokens);
  if (!cache_tokens(cache, a.ids, a.cu_seqlens, t0, ntok, a.batch, a.g, layout_ok)) return;
  const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
  const int64_t image = a.so.b;
  if (!layout_ok) {  // no token was written anywhere
    if (blockIdx.x == 0) {
      for (int64_t e = threadIdx.x; e < a.batch * image; e += blockDim.x) a.out[e] = nan;
    }
    return;
  }
  int32_t done = -1;  // tokens are sample-major: one pass per sample with a bad token
  for (int tl = 0; tl < ntok; ++tl) {
    if (cache.ok[tl] || cache.pos[tl].b == done) continue;
    done = cache.pos[tl].b;
    scalar_t* img = a.out + static_cast<int64_t>(done) * image;
    for (int64_t e = threadIdx.x; e < image; e += blockDim.x) img[e] = nan;
  }
}

at::Tensor scatter_patches_cuda(const at::Tensor& tokens, const at::Tensor& ids, const at::Tensor& cu_seqlens,
                                int64_t patch_size, int64_t batch, int64_t channels, int64_t height, int64_t width,
                                double fill) {
  TORCH_CHECK(tokens.is_cuda(), "scatter_patches_kernel: tokens must be a CUDA tensor here, got ", tokens.device());
  const c10::cuda::CUDAGuard guard(tokens.device());
  ScatterInputs in = prepare_scatter(tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill);
  if (ids.numel() == 0) return in.out.masked_fill_(cu_seqlens.ne(0).any(), NAN);  // no token: cu must be all 0
  if (tokens.numel() == 0) return in.out;
  const int tpb = tokens_per_block(in.g);
  const unsigned int blocks = num_blocks(ids.numel(), tpb);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(tokens.scalar_type(), "scatter_patches_kernel", "tokens", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    dispatch_vec<scalar_t>(in.g.V, [&](auto v) {
      scatter_kernel<decltype(v)::value, scalar_t><<<blocks, kThreads, 0, stream>>>(scatter_args<scalar_t>(in), tpb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    scatter_poison_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(scatter_args<scalar_t>(in), tpb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskdm, CUDA, m) { m.impl("scatter_patches_kernel", &scatter_patches_cuda); }

}  // namespace maskdm
