// masked_noise_loss_kernel / masked_noise_loss_backward_kernel: the epsilon-prediction L2 loss over the
// visible patches, the target read from `noise` in place. C++ (CPU) kernels and the shared preparation.
//
// loss = (1/B) sum_b w_b * mean over b's visible values of (pred - target)^2; an empty sample contributes 0.
// Bytes moved: forward reads T*P of pred and T*P of noise; backward reads the same and writes T*P of grad.
// Deterministic: per-chunk partials over fixed chunks of tokens, then summed in order (no atomics), so the
// result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "patch_ops.h"

namespace maskdm {

LossInputs prepare_loss(const char* op, const at::Tensor& pred, const at::Tensor& noise, const at::Tensor& ids,
                        const at::Tensor& cu_seqlens, int64_t patch_size, const c10::optional<at::Tensor>& weight,
                        const at::Tensor& grad) {
  const auto device = pred.device();
  check_float_tensor(op, "pred", pred, 2, device);
  check_float_tensor(op, "noise", noise, 4, device);
  const int64_t B = noise.size(0), C = noise.size(1), H = noise.size(2), W = noise.size(3);
  TORCH_CHECK(C >= 1, op, ": noise must have at least one channel, got shape ", noise.sizes());
  check_patch_size(op, patch_size, H, W);
  check_layout(op, ids, cu_seqlens, device, B);
  const int64_t P = patch_size * patch_size * C;
  TORCH_CHECK(pred.size(0) == ids.numel() && pred.size(1) == P, op, ": pred must have shape (T, p*p*C) = (",
              ids.numel(), ", ", P, "), got ", pred.sizes());
  LossInputs in;
  in.out_dtype = pred.scalar_type();
  const bool widen = (pred.scalar_type() == at::kDouble) != (noise.scalar_type() == at::kDouble);
  in.pred = widen ? pred.to(at::kDouble) : pred;
  in.noise = widen ? noise.to(at::kDouble) : noise;
  in.ids = ids;
  in.cu_seqlens = cu_seqlens;
  in.batch = B;
  const auto acc = acc_type(in.pred.scalar_type());
  in.weight = per_sample(op, "weight", weight, B, device, acc);
  if (grad.defined()) {
    TORCH_CHECK(grad.numel() == 1, op, ": grad must hold one value (the loss's gradient), got shape ", grad.sizes());
    TORCH_CHECK(grad.device() == device, op, ": grad is on ", grad.device(), " but pred is on ", device);
    in.grad = grad.reshape({}).to(acc);  // stays on the device: no host sync
    in.grad_out = at::empty({ids.numel(), P}, in.pred.options().memory_format(at::MemoryFormat::Contiguous));
  }
  const ImageSide nz{in.noise.const_data_ptr(), in.noise.element_size(), image_strides(in.noise)};
  const TokenSide pr{in.pred.const_data_ptr(), in.pred.element_size(), in.pred.stride(0), in.pred.stride(1)};
  if (in.grad_out.defined()) {
    in.g = make_plan(patch_size, C, H, W, {nz}, {pr, TokenSide{in.grad_out.const_data_ptr(), pr.elem_size, P, 1}});
  } else {
    in.g = make_plan(patch_size, C, H, W, {nz}, {pr});
  }
  return in;
}

namespace {

constexpr int64_t kLossChunk = 64;  // tokens per partial sum: fixed, so the order of the sum is too

template <int V, typename pred_t, typename noise_t, typename acc_t = at::opmath_type<pred_t>>
acc_t loss_forward_cpu(const LossArgs<pred_t, noise_t>& a) {
  const UnitTable tab(a.g, a.sn, a.sn);
  const int64_t n_chunks = (a.num_tokens + kLossChunk - 1) / kLossChunk;
  std::vector<acc_t> partial(n_chunks, acc_t(0));
  std::atomic<bool> bad_id{false};
  const int64_t grain = std::max<int64_t>(1, cpu_token_grain(a.g) / kLossChunk);
  at::parallel_for(0, n_chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t sum = 0;
      const int64_t t_end = std::min(a.num_tokens, (c + 1) * kLossChunk);
      for (int64_t t = c * kLossChunk; t < t_end; ++t) {
        if (!valid_patch_id(a.ids[t], a.g)) {
          bad_id = true;
          continue;
        }
        const TokenPos tp = token_pos(a.ids, a.cu_seqlens, t, a.batch, a.g);
        const int64_t n0 = patch_origin_offset(a.sn, a.g, tp);
        acc_t tok = 0;
        for (int32_t u = 0; u < a.g.units; ++u) tok += loss_unit_sq_at<V>(a, t, tab.unit[u], n0 + tab.off0[u]);
        sum += loss_token_scale(a, tp.b) * tok;
      }
      partial[c] = sum;
    }
  });
  TORCH_CHECK_VALUE(!bad_id, "masked_noise_loss_kernel: ids holds a patch id outside [0, ", a.g.N, ")");
  acc_t total = 0;
  for (const acc_t s : partial) total += s;
  return total;
}

template <int V, typename pred_t, typename noise_t, typename acc_t>
void loss_backward_cpu(const LossArgs<pred_t, noise_t>& a, acc_t grad) {
  const UnitTable tab(a.g, a.sn, a.sn);
  std::atomic<bool> bad_id{false};
  at::parallel_for(0, a.num_tokens, cpu_token_grain(a.g), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (!valid_patch_id(a.ids[t], a.g)) {
        bad_id = true;
        continue;
      }
      const TokenPos tp = token_pos(a.ids, a.cu_seqlens, t, a.batch, a.g);
      const acc_t factor = acc_t(2) * grad * loss_token_scale(a, tp.b);
      const int64_t n0 = patch_origin_offset(a.sn, a.g, tp);
      for (int32_t u = 0; u < a.g.units; ++u) loss_unit_grad_at<V>(a, t, tab.unit[u], n0 + tab.off0[u], factor);
    }
  });
  TORCH_CHECK_VALUE(!bad_id, "masked_noise_loss_backward_kernel: ids holds a patch id outside [0, ", a.g.N, ")");
}

at::Tensor masked_noise_loss_cpu(const at::Tensor& pred, const at::Tensor& noise, const at::Tensor& ids,
                                 const at::Tensor& cu_seqlens, int64_t patch_size,
                                 const c10::optional<at::Tensor>& weight) {
  constexpr const char* op = "masked_noise_loss_kernel";
  LossInputs in = prepare_loss(op, pred, noise, ids, cu_seqlens, patch_size, weight, at::Tensor());
  check_cu_seqlens_host(op, cu_seqlens, ids.numel());
  const auto acc = acc_type(pred.scalar_type());  // the loss's dtype follows pred's, as the fake says
  if (ids.numel() == 0) return at::zeros({}, pred.options().dtype(acc));
  double total = 0;
  dispatch_loss_types(in, op, [&](auto pt, auto nt) {
    using pred_t = typename decltype(pt)::type;
    using noise_t = typename decltype(nt)::type;
    dispatch_vec<pred_t, noise_t>(in.g.V, [&](auto v) {
      total = static_cast<double>(loss_forward_cpu<decltype(v)::value>(loss_args<pred_t, noise_t>(in)));
    });
  });
  return at::scalar_tensor(total, pred.options().dtype(acc));
}

at::Tensor masked_noise_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& noise,
                                          const at::Tensor& ids, const at::Tensor& cu_seqlens, int64_t patch_size,
                                          const c10::optional<at::Tensor>& weight) {
  constexpr const char* op = "masked_noise_loss_backward_kernel";
  LossInputs in = prepare_loss(op, pred, noise, ids, cu_seqlens, patch_size, weight, grad);
  check_cu_seqlens_host(op, cu_seqlens, ids.numel());
  if (ids.numel() > 0) {
    dispatch_loss_types(in, op, [&](auto pt, auto nt) {
      using pred_t = typename decltype(pt)::type;
      using noise_t = typename decltype(nt)::type;
      using acc_t = at::opmath_type<pred_t>;
      const acc_t g = *in.grad.const_data_ptr<acc_t>();  // a CPU tensor: reading it is no device sync
      dispatch_vec<pred_t, noise_t>(in.g.V, [&](auto v) {
        loss_backward_cpu<decltype(v)::value>(loss_args<pred_t, noise_t>(in), g);
      });
    });
  }
  return in.grad_out.scalar_type() == in.out_dtype ? in.grad_out : in.grad_out.to(in.out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskdm, CPU, m) {
  m.impl("masked_noise_loss_kernel", &masked_noise_loss_cpu);
  m.impl("masked_noise_loss_backward_kernel", &masked_noise_loss_backward_cpu);
}

}  // namespace maskdm
