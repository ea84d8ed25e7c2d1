// Argument preparation of the three patch ops, shared by their C++ (csrc/<op>.cpp) and CUDA (csrc/<op>.cu)
// entry points: checks, output allocation, the launch plan, and the kernel argument structs.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "common.h"
#include "patch_units.h"

namespace maskdm {

// CPU kernels: a token's units and their offsets from the patch origin in up to two images, decoded once per
// call with the same unit_coords / unit_pixel_offset the CUDA kernels evaluate per unit.
// NOTE: decoding per unit, the integer divisions dominated the CPU loop: gather with noise, fp32 NCHW, p=4,
// one thread of this repo's shared CI machine: 4.5 -> 1.4 ns per value cache-resident (B=4, 3x64x64), 3.3 -> 1.15
// at B=64 (256 -> 86 us for T=1600 tokens).
struct UnitTable {
  std::vector<Unit> unit;
  std::vector<int64_t> off0, off1;

  UnitTable(const PatchPlan& g, const ImageStrides& s0, const ImageStrides& s1) {
    unit.reserve(g.units);
    off0.reserve(g.units);
    off1.reserve(g.units);
    for (int32_t u = 0; u < g.units; ++u) {
      unit.push_back(unit_coords(g, u));
      off0.push_back(unit_pixel_offset(s0, unit.back()));
      off1.push_back(unit_pixel_offset(s1, unit.back()));
    }
  }
};

// -------------------------------------------------------------------------------------------- gather
struct GatherInputs {
  at::Tensor images, noise, signal_scale, noise_scale, ids, cu_seqlens, out;  // noise/scales may be undefined
  int64_t batch;
  PatchPlan g;
};

GatherInputs prepare_gather(const at::Tensor& images, const at::Tensor& ids, const at::Tensor& cu_seqlens,
                            int64_t patch_size, const c10::optional<at::Tensor>& noise,
                            const c10::optional<at::Tensor>& signal_scale,
                            const c10::optional<at::Tensor>& noise_scale);

template <typename scalar_t>
GatherArgs<scalar_t> gather_args(const GatherInputs& in) {
  using acc_t = at::opmath_type<scalar_t>;
  GatherArgs<scalar_t> a;
  a.x = in.images.const_data_ptr<scalar_t>();
  a.sx = image_strides(in.images);
  a.noise = in.noise.defined() ? in.noise.const_data_ptr<scalar_t>() : nullptr;
  a.sn = in.noise.defined() ? image_strides(in.noise) : a.sx;
  a.signal_scale = in.signal_scale.defined() ? in.signal_scale.const_data_ptr<acc_t>() : nullptr;
  a.noise_scale = in.noise_scale.defined() ? in.noise_scale.const_data_ptr<acc_t>() : nullptr;
  a.out = in.out.mutable_data_ptr<scalar_t>();
  a.ids = in.ids.const_data_ptr<int32_t>();
  a.cu_seqlens = in.cu_seqlens.const_data_ptr<int32_t>();
  a.num_tokens = in.ids.numel();
  a.batch = static_cast<int32_t>(in.batch);
  a.g = in.g;
  return a;
}

// ------------------------------------------------------------------------------------------- scatter
struct ScatterInputs {
  at::Tensor tokens, ids, cu_seqlens, out;
  int64_t batch;
  PatchPlan g;
};

ScatterInputs prepare_scatter(const at::Tensor& tokens, const at::Tensor& ids, const at::Tensor& cu_seqlens,
                              int64_t patch_size, int64_t batch, int64_t channels, int64_t height, int64_t width,
                              double fill);

template <typename scalar_t>
ScatterArgs<scalar_t> scatter_args(const ScatterInputs& in) {
  ScatterArgs<scalar_t> a;
  a.tokens = in.tokens.const_data_ptr<scalar_t>();
  a.st = in.tokens.stride(0);
  a.sj = in.tokens.stride(1);
  a.out = in.out.mutable_data_ptr<scalar_t>();
  a.so = image_strides(in.out);
  a.ids = in.ids.const_data_ptr<int32_t>();
  a.cu_seqlens = in.cu_seqlens.const_data_ptr<int32_t>();
  a.num_tokens = in.ids.numel();
  a.batch = static_cast<int32_t>(in.batch);
  a.g = in.g;
  return a;
}

// ---------------------------------------------------------------------------------------------- loss
struct LossInputs {
  at::Tensor pred, noise, weight, ids, cu_seqlens;
  at::Tensor grad;      // backward only: the 0-dim upstream gradient, in the acc dtype (never read on the host)
  at::Tensor grad_out;  // backward only: (T, P) contiguous in pred's dtype
  at::ScalarType out_dtype;  // pred's dtype as given (pred and noise may have been widened to float64)
  int64_t batch;
  PatchPlan g;
};

// grad undefined: the forward. Mixed dtypes run natively except with float64 on one side only, which widens
// both to float64 (a rare test-only case).
LossInputs prepare_loss(const char* op, const at::Tensor& pred, const at::Tensor& noise, const at::Tensor& ids,
                        const at::Tensor& cu_seqlens, int64_t patch_size, const c10::optional<at::Tensor>& weight,
                        const at::Tensor& grad);

template <typename pred_t, typename noise_t>
LossArgs<pred_t, noise_t> loss_args(const LossInputs& in) {
  using acc_t = at::opmath_type<pred_t>;
  LossArgs<pred_t, noise_t> a;
  a.pred = in.pred.const_data_ptr<pred_t>();
  a.st = in.pred.stride(0);
  a.sj = in.pred.stride(1);
  a.noise = in.noise.const_data_ptr<noise_t>();
  a.sn = image_strides(in.noise);
  a.weight = in.weight.defined() ? in.weight.const_data_ptr<acc_t>() : nullptr;
  a.grad_out = in.grad_out.defined() ? in.grad_out.mutable_data_ptr<pred_t>() : nullptr;
  a.ids = in.ids.const_data_ptr<int32_t>();
  a.cu_seqlens = in.cu_seqlens.const_data_ptr<int32_t>();
  a.num_tokens = in.ids.numel();
  a.batch = static_cast<int32_t>(in.batch);
  a.g = in.g;
  return a;
}

// f(TypeTag<pred_t>{}, TypeTag<noise_t>{}) over the dtype pairs prepare_loss leaves: float64 only with itself.
template <typename F>
void dispatch_loss_types(const LossInputs& in, const char* op, F&& f) {
  dispatch_float(in.pred.scalar_type(), op, "pred", [&](auto pt) {
    dispatch_float(in.noise.scalar_type(), op, "noise", [&](auto nt) {
      using pred_t = typename decltype(pt)::type;
      using noise_t = typename decltype(nt)::type;
      if constexpr (std::is_same_v<pred_t, double> == std::is_same_v<noise_t, double>) {
        f(pt, nt);
      } else {
        TORCH_CHECK(false, op, ": internal error: float64 mixed with ", in.noise.scalar_type());
      }
    });
  });
}

}  // namespace maskdm
