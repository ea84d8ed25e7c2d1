// scatter_patches_kernel: packed tokens (T, p*p*C) back to contiguous images (B, C, H, W), masked patches
// holding `fill`. C++ (CPU) kernel and the shared preparation.
//
// Bytes moved: writes B*C*H*W values (the fill), reads T*P token values and writes T*P image values.
#include <ATen/Parallel.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <atomic>

#include "patch_ops.h"

namespace maskdm {

ScatterInputs prepare_scatter(const at::Tensor& tokens, const at::Tensor& ids, const at::Tensor& cu_seqlens,
                              int64_t patch_size, int64_t batch, int64_t channels, int64_t height, int64_t width,
                              double fill) {
  constexpr const char* op = "scatter_patches_kernel";
  const auto device = tokens.device();
  check_float_tensor(op, "tokens", tokens, 2, device);
  TORCH_CHECK(batch >= 0 && channels >= 1 && height >= 1 && width >= 1, op,
              ": batch must be >= 0 and channels, height, width positive, got ", batch, ", ", channels, ", ", height,
              ", ", width);
  check_patch_size(op, patch_size, height, width);
  check_layout(op, ids, cu_seqlens, device, batch);
  const int64_t P = patch_size * patch_size * channels;
  TORCH_CHECK(tokens.size(0) == ids.numel() && tokens.size(1) == P, op, ": tokens must have shape (T, p*p*C) = (",
              ids.numel(), ", ", P, "), got ", tokens.sizes());
  ScatterInputs in;
  in.tokens = tokens;
  in.ids = ids;
  in.cu_seqlens = cu_seqlens;
  in.batch = batch;
  in.out = at::full({batch, channels, height, width}, fill, tokens.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t es = tokens.element_size();
  in.g = make_plan(patch_size, channels, height, width, {ImageSide{in.out.const_data_ptr(), es, image_strides(in.out)}},
                   {TokenSide{tokens.const_data_ptr(), es, tokens.stride(0), tokens.stride(1)}});
  return in;
}

namespace {

template <int V, typename scalar_t>
void scatter_cpu(const ScatterArgs<scalar_t>& a) {
  const UnitTable tab(a.g, a.so, a.so);
  std::atomic<bool> bad_id{false};
  at::parallel_for(0, a.num_tokens, cpu_token_grain(a.g), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (!valid_patch_id(a.ids[t], a.g)) {
        bad_id = true;
        continue;
      }
      const TokenPos tp = token_pos(a.ids, a.cu_seqlens, t, a.batch, a.g);
      const int64_t o0 = patch_origin_offset(a.so, a.g, tp);
      for (int32_t u = 0; u < a.g.units; ++u) scatter_unit_at<V>(a, t, tab.unit[u], o0 + tab.off0[u]);
    }
  });
  TORCH_CHECK_VALUE(!bad_id, "scatter_patches_kernel: ids holds a patch id outside [0, ", a.g.N, ")");
}

at::Tensor scatter_patches_cpu(const at::Tensor& tokens, const at::Tensor& ids, const at::Tensor& cu_seqlens,
                               int64_t patch_size, int64_t batch, int64_t channels, int64_t height, int64_t width,
                               double fill) {
  ScatterInputs in = prepare_scatter(tokens, ids, cu_seqlens, patch_size, batch, channels, height, width, fill);
  check_cu_seqlens_host("scatter_patches_kernel", cu_seqlens, ids.numel());
  if (tokens.numel() == 0) return in.out;
  dispatch_float(tokens.scalar_type(), "scatter_patches_kernel", "tokens", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    dispatch_vec<scalar_t>(in.g.V, [&](auto v) { scatter_cpu<decltype(v)::value>(scatter_args<scalar_t>(in)); });
  });
  return in.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskdm, CPU, m) { m.impl("scatter_patches_kernel", &scatter_patches_cpu); }

}  // namespace maskdm
