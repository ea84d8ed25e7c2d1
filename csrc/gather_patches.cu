// gather_patches_kernel, CUDA: the visible patches of signal_scale[b] * images + noise_scale[b] * noise.
//
// One thread per unit (see patch_index.h): in row mode (channels_last, or C == 1) a unit is up to 16 bytes
// of a (p2 c) run, loaded and stored as one vector; in col mode (NCHW, C > 1) it is a vector of p2 values of
// one channel, stored C apart in the token (the warp still covers whole token rows, merged in L2).
// Bytes moved: reads T*P values of images (and T*P of noise), writes T*P values; masked pixels are never read.
// A token with a patch id outside [0, N), or any token of a malformed cu_seqlens, gets a NaN row (no host sync).
#include <torch/library.h>

#include "cuda_utils.cuh"
#include "patch_ops.h"

namespace maskdm {
namespace {

template <int V, typename scalar_t>
__global__ void __launch_bounds__(kThreads) gather_kernel(const GatherArgs<scalar_t> a, int tok_per_block) {
  __shared__ TokenCache cache;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tok_per_block;
  const int ntok = block_tokens(a.num_tokens, t0, tok_per_block);
  const bool layout_ok = block_layout_ok(a.cu_seqlens, a.batch, a.num_tokens);
  cache_tokens(cache, a.ids, a.cu_seqlens, t0, ntok, a.batch, a.g, layout_ok);
  const int units = a.g.units;
  for (int i = threadIdx.x; i < ntok * units; i += blockDim.x) {
    const int tl = i / units;
    if (cache.ok[tl]) {
      gather_unit<V>(a, t0 + tl, cache.pos[tl], i - tl * units);
    } else {
      gather_unit_nan<V>(a, t0 + tl, i - tl * units);
    }
  }
}

at::Tensor gather_patches_cuda(const at::Tensor& images, const at::Tensor& ids, const at::Tensor& cu_seqlens,
                               int64_t patch_size, const c10::optional<at::Tensor>& noise,
                               const c10::optional<at::Tensor>& signal_scale,
                               const c10::optional<at::Tensor>& noise_scale) {
  TORCH_CHECK(images.is_cuda(), "gather_patches_kernel: images must be a CUDA tensor here, got ", images.device());
  const c10::cuda::CUDAGuard guard(images.device());
  GatherInputs in = prepare_gather(images, ids, cu_seqlens, patch_size, noise, signal_scale, noise_scale);
  if (in.out.numel() == 0) return in.out;
  const int tpb = tokens_per_block(in.g);
  const unsigned int blocks = num_blocks(ids.numel(), tpb);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(images.scalar_type(), "gather_patches_kernel", "images", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    dispatch_vec<scalar_t>(in.g.V, [&](auto v) {
      gather_kernel<decltype(v)::value, scalar_t><<<blocks, kThreads, 0, stream>>>(gather_args<scalar_t>(in), tpb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return in.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskdm, CUDA, m) { m.impl("gather_patches_kernel", &gather_patches_cuda); }

}  // namespace maskdm
