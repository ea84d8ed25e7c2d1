// Host-side helpers of the patch ops: argument checks, the launch plan (unit mode and vector width), and
// dispatch over dtypes and vector widths. Shared by the C++ and CUDA entry points.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "patch_index.h"

namespace maskdm {

// ----------------------------------------------------------------------------------------------- checks
// Each names the op and the argument. The Python wrappers validate first; these are the last line of defence
// before a raw out-of-bounds access. Values (ids, cu_seqlens) are not read here: that would sync the device.
void check_layout(const char* op, const at::Tensor& ids, const at::Tensor& cu_seqlens, const at::Device& device,
                  int64_t batch);
// CPU kernels only (the values are on the host: reading them is no sync): cu_seqlens starts at 0, never decreases
// and ends at num_tokens, else a ValueError naming it. The CUDA kernels check the same on the device (NaN, no sync).
void check_cu_seqlens_host(const char* op, const at::Tensor& cu_seqlens, int64_t num_tokens);
void check_float_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim, const at::Device& device);
void check_patch_size(const char* op, int64_t patch_size, int64_t height, int64_t width);
// A (B,) per-sample tensor, as a contiguous acc-dtype copy (B values: negligible); undefined if absent.
at::Tensor per_sample(const char* op, const char* name, const c10::optional<at::Tensor>& t, int64_t batch,
                      const at::Device& device, at::ScalarType acc);

inline ImageStrides image_strides(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}; }

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// -------------------------------------------------------------------------------------------------- plan
struct ImageSide {
  const void* ptr;
  int64_t elem_size;
  ImageStrides s;
};
struct TokenSide {
  const void* ptr;
  int64_t elem_size;
  int64_t st, sj;
};

// Row mode with the widest V whose units are contiguous and aligned in every image side, else col mode
// (NCHW, stride_w == 1), else row mode with V = 1 (any strides). V * elem_size <= 16 bytes on every side.
PatchPlan make_plan(int64_t p, int64_t C, int64_t H, int64_t W, std::initializer_list<ImageSide> images,
                    std::initializer_list<TokenSide> tokens);

// --------------------------------------------------------------------------------------------- dispatch
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<scalar_t>{}) for float32, float16, bfloat16 or float64.
template <typename F>
void dispatch_float(at::ScalarType t, const char* op, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f(TypeTag<float>{});
    case at::kHalf: return f(TypeTag<c10::Half>{});
    case at::kBFloat16: return f(TypeTag<c10::BFloat16>{});
    case at::kDouble: return f(TypeTag<double>{});
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", t);
  }
}

// Calls f(std::integral_constant<int, V>{}) for the plan's V; only widths that fit 16 bytes of every Ts.
template <typename... Ts, typename F>
void dispatch_vec(int V, F&& f) {
  constexpr int kMax = static_cast<int>(16 / std::max({sizeof(Ts)...}));
  switch (V) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: if constexpr (kMax >= 2) return f(std::integral_constant<int, 2>{}); break;
    case 4: if constexpr (kMax >= 4) return f(std::integral_constant<int, 4>{}); break;
    case 8: if constexpr (kMax >= 8) return f(std::integral_constant<int, 8>{}); break;
    default: break;
  }
  TORCH_CHECK(false, "maskdm: internal error: no kernel for vector width ", V);
}

// CPU work split: at least this many token values per task. A value costs a strided (often cache-missing)
// read or two, so a task of 2^17 is ~0.1-0.5 ms; smaller calls run inline, with no OpenMP barrier to wait on.
// NOTE: on this repo's shared 2-core CI machine (load ~4), B=64 3x64x64 p=4 90% mask (T*P = 77K values)
// took 0.28 ms on one thread but a 16 ms median on two, from barrier stalls, with a 2^15 grain.
constexpr int64_t kCpuGrainValues = 1 << 17;

inline int64_t cpu_token_grain(const PatchPlan& g) { return std::max<int64_t>(1, kCpuGrainValues / g.P); }

}  // namespace maskdm
