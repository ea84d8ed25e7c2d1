// gather_patches_kernel: the visible patches of signal_scale[b] * images + noise_scale[b] * noise as packed
// tokens (T, p*p*C), in one pass over the visible pixels only. C++ (CPU) kernel and the shared preparation.
//
// Bytes moved: reads T*P values of images (and T*P of noise), writes T*P values; masked pixels are never read.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>

#include "patch_ops.h"

namespace maskdm {

GatherInputs prepare_gather(const at::Tensor& images, const at::Tensor& ids, const at::Tensor& cu_seqlens,
                            int64_t patch_size, const c10::optional<at::Tensor>& noise,
                            const c10::optional<at::Tensor>& signal_scale,
                            const c10::optional<at::Tensor>& noise_scale) {
  constexpr const char* op = "gather_patches_kernel";
  const auto device = images.device();
  check_float_tensor(op, "images", images, 4, device);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  TORCH_CHECK(C >= 1, op, ": images must have at least one channel, got shape ", images.sizes());
  check_patch_size(op, patch_size, H, W);
  check_layout(op, ids, cu_seqlens, device, B);
  GatherInputs in;
  in.images = images;
  in.ids = ids;
  in.cu_seqlens = cu_seqlens;
  in.batch = B;
  const auto acc = acc_type(images.scalar_type());
  if (noise.has_value() && noise->defined()) {
    check_float_tensor(op, "noise", *noise, 4, device);
    TORCH_CHECK(noise->sizes() == images.sizes(), op, ": noise must have the images' shape ", images.sizes(),
                ", got ", noise->sizes());
    // A noise dtype other than the images' is converted first (one extra pass over noise; unusual).
    in.noise = noise->scalar_type() == images.scalar_type() ? *noise : noise->to(images.scalar_type());
  } else {
    TORCH_CHECK(!(noise_scale.has_value() && noise_scale->defined()), op, ": noise_scale was given without noise");
  }
  in.signal_scale = per_sample(op, "signal_scale", signal_scale, B, device, acc);
  in.noise_scale = per_sample(op, "noise_scale", noise_scale, B, device, acc);
  const int64_t P = patch_size * patch_size * C;
  in.out = at::empty({ids.numel(), P}, images.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t es = images.element_size();
  const ImageSide x{images.const_data_ptr(), es, image_strides(images)};
  const TokenSide out{in.out.const_data_ptr(), es, P, 1};
  if (in.noise.defined()) {
    in.g = make_plan(patch_size, C, H, W, {x, ImageSide{in.noise.const_data_ptr(), es, image_strides(in.noise)}},
                     {out});
  } else {
    in.g = make_plan(patch_size, C, H, W, {x}, {out});
  }
  return in;
}

namespace {

template <int V, typename scalar_t>
void gather_cpu(const GatherArgs<scalar_t>& a) {
  const UnitTable tab(a.g, a.sx, a.sn);
  std::atomic<bool> bad_id{false};
  at::parallel_for(0, a.num_tokens, cpu_token_grain(a.g), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (!valid_patch_id(a.ids[t], a.g)) {
        bad_id = true;
        continue;
      }
      const TokenPos tp = token_pos(a.ids, a.cu_seqlens, t, a.batch, a.g);
      const int64_t x0 = patch_origin_offset(a.sx, a.g, tp), n0 = patch_origin_offset(a.sn, a.g, tp);
      for (int32_t u = 0; u < a.g.units; ++u) {
        gather_unit_at<V>(a, t, tp.b, tab.unit[u], x0 + tab.off0[u], n0 + tab.off1[u]);
      }
    }
  });
  TORCH_CHECK_VALUE(!bad_id, "gather_patches_kernel: ids holds a patch id outside [0, ", a.g.N, ")");
}

at::Tensor gather_patches_cpu(const at::Tensor& images, const at::Tensor& ids, const at::Tensor& cu_seqlens,
                              int64_t patch_size, const c10::optional<at::Tensor>& noise,
                              const c10::optional<at::Tensor>& signal_scale,
                              const c10::optional<at::Tensor>& noise_scale) {
  GatherInputs in = prepare_gather(images, ids, cu_seqlens, patch_size, noise, signal_scale, noise_scale);
  check_cu_seqlens_host("gather_patches_kernel", cu_seqlens, ids.numel());
  if (in.out.numel() == 0) return in.out;
  dispatch_float(images.scalar_type(), "gather_patches_kernel", "images", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    dispatch_vec<scalar_t>(in.g.V, [&](auto v) { gather_cpu<decltype(v)::value>(gather_args<scalar_t>(in)); });
  });
  return in.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskdm, CPU, m) { m.impl("gather_patches_kernel", &gather_patches_cpu); }

}  // namespace maskdm
