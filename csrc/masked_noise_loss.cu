// masked_noise_loss_kernel / masked_noise_loss_backward_kernel, CUDA.
//
// Forward: each block sums scale_b * (pred - target)^2 over its tokens' units (per-thread sums, warp shuffles,
// then the warp sums) into partial[block]; one block then sums the partials in a fixed order. No atomics:
// the result is bitwise reproducible. Backward: grad_out = 2 * grad * scale_b * (pred - target), with grad
// read on the device (no host sync). scale_b = w_b / (max(len_b, 1) * P * B).
// Bytes moved: forward reads T*P of pred and T*P of noise (+ 4 bytes per block of partials); backward reads
// the same and writes T*P of grad.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cuda_utils.cuh"
#include "patch_ops.h"

namespace maskdm {
namespace {

constexpr int kSumThreads = 1024;

// Resolves the block's tokens and their factor: scale_b (forward, grad == nullptr) or 2 * grad * scale_b.
template <typename pred_t, typename noise_t, typename acc_t>
__device__ __forceinline__ int setup_block(const LossArgs<pred_t, noise_t>& a, int tok_per_block, const acc_t* grad,
                                           TokenCache& cache, acc_t* factor, int64_t& t0) {
  t0 = static_cast<int64_t>(blockIdx.x) * tok_per_block;
  const int ntok = block_tokens(a.num_tokens, t0, tok_per_block);
  const bool layout_ok = block_layout_ok(a.cu_seqlens, a.batch, a.num_tokens);
  cache_tokens(cache, a.ids, a.cu_seqlens, t0, ntok, a.batch, a.g, layout_ok);
  const acc_t g = grad != nullptr ? acc_t(2) * *grad : acc_t(1);
  // An invalid token reads its safe placeholder position and is weighted by NaN: NaN loss, NaN gradient row.
  for (int i = threadIdx.x; i < ntok; i += blockDim.x) {
    factor[i] = cache.ok[i] ? g * loss_token_scale(a, cache.pos[i].b) : std::numeric_limits<acc_t>::quiet_NaN();
  }
  __syncthreads();
  return ntok;
}

template <int V, typename pred_t, typename noise_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    loss_forward_kernel(const LossArgs<pred_t, noise_t> a, int tok_per_block, acc_t* __restrict__ partial) {
  __shared__ TokenCache cache;
  __shared__ acc_t factor[kMaxTokPerBlock];
  int64_t t0;
  const int ntok = setup_block(a, tok_per_block, static_cast<const acc_t*>(nullptr), cache, factor, t0);
  const int units = a.g.units;
  acc_t acc = 0;
  for (int i = threadIdx.x; i < ntok * units; i += blockDim.x) {
    const int tl = i / units;
    acc += factor[tl] * loss_unit_sq<V>(a, t0 + tl, cache.pos[tl], i - tl * units);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(const acc_t* __restrict__ partial, int64_t n, acc_t* __restrict__ out) {
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = acc;
}

template <int V, typename pred_t, typename noise_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    loss_backward_kernel(const LossArgs<pred_t, noise_t> a, int tok_per_block, const acc_t* __restrict__ grad) {
  __shared__ TokenCache cache;
  __shared__ acc_t factor[kMaxTokPerBlock];
  int64_t t0;
  const int ntok = setup_block(a, tok_per_block, grad, cache, factor, t0);
  const int units = a.g.units;
  for (int i = threadIdx.x; i < ntok * units; i += blockDim.x) {
    const int tl = i / units;
    loss_unit_grad<V>(a, t0 + tl, cache.pos[tl], i - tl * units, factor[tl]);
  }
}

at::Tensor masked_noise_loss_cuda(const at::Tensor& pred, const at::Tensor& noise, const at::Tensor& ids,
                                  const at::Tensor& cu_seqlens, int64_t patch_size,
                                  const c10::optional<at::Tensor>& weight) {
  constexpr const char* op = "masked_noise_loss_kernel";
  TORCH_CHECK(pred.is_cuda(), op, ": pred must be a CUDA tensor here, got ", pred.device());
  const c10::cuda::CUDAGuard guard(pred.device());
  LossInputs in = prepare_loss(op, pred, noise, ids, cu_seqlens, patch_size, weight, at::Tensor());
  const auto out_dtype = acc_type(pred.scalar_type());  // the loss's dtype follows pred's, as the fake says
  if (ids.numel() == 0) {  // no token: 0, or NaN when cu_seqlens is not all 0 (no host sync)
    return at::zeros({}, pred.options().dtype(out_dtype)).masked_fill_(cu_seqlens.ne(0).any(), NAN);
  }
  const auto acc = acc_type(in.pred.scalar_type());
  const int tpb = tokens_per_block(in.g);
  const unsigned int blocks = num_blocks(ids.numel(), tpb);
  at::Tensor partial = at::empty({static_cast<int64_t>(blocks)}, pred.options().dtype(acc));
  at::Tensor out = at::empty({}, pred.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_loss_types(in, op, [&](auto pt, auto nt) {
    using pred_t = typename decltype(pt)::type;
    using noise_t = typename decltype(nt)::type;
    using acc_t = at::opmath_type<pred_t>;
    dispatch_vec<pred_t, noise_t>(in.g.V, [&](auto v) {
      loss_forward_kernel<decltype(v)::value, pred_t, noise_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          loss_args<pred_t, noise_t>(in), tpb, partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    sum_partials_kernel<acc_t><<<1, kSumThreads, 0, stream>>>(partial.const_data_ptr<acc_t>(), blocks,
                                                               out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.scalar_type() == out_dtype ? out : out.to(out_dtype);
}

at::Tensor masked_noise_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& noise,
                                           const at::Tensor& ids, const at::Tensor& cu_seqlens, int64_t patch_size,
                                           const c10::optional<at::Tensor>& weight) {
  constexpr const char* op = "masked_noise_loss_backward_kernel";
  TORCH_CHECK(pred.is_cuda(), op, ": pred must be a CUDA tensor here, got ", pred.device());
  const c10::cuda::CUDAGuard guard(pred.device());
  LossInputs in = prepare_loss(op, pred, noise, ids, cu_seqlens, patch_size, weight, grad);
  if (ids.numel() > 0) {
    const int tpb = tokens_per_block(in.g);
    const unsigned int blocks = num_blocks(ids.numel(), tpb);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_loss_types(in, op, [&](auto pt, auto nt) {
      using pred_t = typename decltype(pt)::type;
      using noise_t = typename decltype(nt)::type;
      using acc_t = at::opmath_type<pred_t>;
      dispatch_vec<pred_t, noise_t>(in.g.V, [&](auto v) {
        loss_backward_kernel<decltype(v)::value, pred_t, noise_t, acc_t><<<blocks, kThreads, 0, stream>>>(
            loss_args<pred_t, noise_t>(in), tpb, in.grad.const_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return in.grad_out.scalar_type() == in.out_dtype ? in.grad_out : in.grad_out.to(in.out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskdm, CUDA, m) {
  m.impl("masked_noise_loss_kernel", &masked_noise_loss_cuda);
  m.impl("masked_noise_loss_backward_kernel", &masked_noise_loss_backward_cuda);
}

}  // namespace maskdm
