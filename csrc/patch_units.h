// The per-unit bodies of the patch ops (gather, scatter, loss), shared by the C++ and CUDA kernels.
//
// A body handles one unit (V values, see patch_index.h) of one token, in acc_t = at::opmath_type<scalar_t>
// (float for half / bfloat16 / float, double for double). The CPU kernels call them in an OpenMP loop over
// tokens, the CUDA kernels from one thread per unit. The only device-specific piece is `load_contig` /
// `store_contig`: one aligned vector access (up to 16 bytes) on the GPU, a short loop on the host.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>

#include "patch_index.h"

namespace maskdm {

template <typename T, int V>
struct alignas(sizeof(T) * V) VecT {
  T v[V];
};

// V contiguous elements at p, aligned to V * sizeof(T) (the plan guarantees both when V > 1).
template <int V, typename T, typename A>
MASKDM_HD void load_contig(const T* p, A (&out)[V]) {
#if defined(__CUDA_ARCH__)
  const VecT<T, V> v = *reinterpret_cast<const VecT<T, V>*>(p);
MASKDM_UNROLL
  for (int i = 0; i < V; ++i) out[i] = static_cast<A>(v.v[i]);
#else
  for (int i = 0; i < V; ++i) out[i] = static_cast<A>(p[i]);
#endif
}

template <int V, typename T, typename A>
MASKDM_HD void store_contig(T* p, const A (&in)[V]) {
#if defined(__CUDA_ARCH__)
  VecT<T, V> v;
MASKDM_UNROLL
  for (int i = 0; i < V; ++i) v.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<VecT<T, V>*>(p) = v;
#else
  for (int i = 0; i < V; ++i) p[i] = static_cast<T>(in[i]);
#endif
}

// Token-side access: one vector when the plan allows it (row mode, unit-stride aligned rows), else strided.
template <int V, typename T, typename A>
MASKDM_HD void load_token(const T* base, int64_t st, int64_t sj, int64_t t, const Unit& un, bool vec,
                          A (&out)[V]) {
  if (vec) {
    load_contig<V>(base + t * st + un.tok_off, out);
  } else {
MASKDM_UNROLL
    for (int i = 0; i < V; ++i) out[i] = static_cast<A>(base[token_offset(t, st, sj, un, i)]);
  }
}

// Stores into a contiguous (T, P) token tensor.
template <int V, typename T, typename A>
MASKDM_HD void store_token(T* base, int32_t P, int64_t t, const Unit& un, bool vec, const A (&in)[V]) {
  if (vec) {
    store_contig<V>(base + t * P + un.tok_off, in);
  } else {
MASKDM_UNROLL
    for (int i = 0; i < V; ++i) base[token_offset(t, P, 1, un, i)] = static_cast<T>(in[i]);
  }
}

// ------------------------------------------------------------------------------------------------ gather
template <typename scalar_t>
struct GatherArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;           // (B, C, H, W), strides sx
  ImageStrides sx;
  const scalar_t* noise;       // (B, C, H, W), strides sn; nullptr: no noise
  ImageStrides sn;
  const acc_t* signal_scale;   // (B,) or nullptr
  const acc_t* noise_scale;    // (B,) or nullptr
  scalar_t* out;               // (T, P) contiguous
  const int32_t* ids;          // (T,)
  const int32_t* cu_seqlens;   // (B + 1,)
  int64_t num_tokens;
  int32_t batch;
  PatchPlan g;
};

// Unit `un` of token t (sample b), its first element at x_off in images and n_off in noise.
template <int V, typename scalar_t>
MASKDM_HD void gather_unit_at(const GatherArgs<scalar_t>& a, int64_t t, int32_t b, const Unit& un, int64_t x_off,
                              int64_t n_off) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t v[V];
  load_contig<V>(a.x + x_off, v);
  if (a.signal_scale != nullptr) {
    const acc_t s = a.signal_scale[b];
    MASKDM_UNROLL
    for (int i = 0; i < V; ++i) v[i] *= s;
  }
  if (a.noise != nullptr) {
    acc_t n[V];
    load_contig<V>(a.noise + n_off, n);
    const acc_t s = a.noise_scale != nullptr ? a.noise_scale[b] : acc_t(1);
    MASKDM_UNROLL
    for (int i = 0; i < V; ++i) v[i] += s * n[i];
  }
  store_token<V>(a.out, a.g.P, t, un, a.g.tok_vec, v);
}

// NaN over unit u of token t: the gather row of a token with an invalid patch id or layout (nothing is read).
template <int V, typename scalar_t>
MASKDM_HD void gather_unit_nan(const GatherArgs<scalar_t>& a, int64_t t, int32_t u) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t v[V];
  MASKDM_UNROLL
  for (int i = 0; i < V; ++i) v[i] = std::numeric_limits<acc_t>::quiet_NaN();
  store_token<V>(a.out, a.g.P, t, unit_coords(a.g, u), a.g.tok_vec, v);
}

// Unit u of token t at tp, decoded here (the CUDA kernels; the CPU ones look units up in a UnitTable).
template <int V, typename scalar_t>
MASKDM_HD void gather_unit(const GatherArgs<scalar_t>& a, int64_t t, const TokenPos& tp, int32_t u) {
  const Unit un = unit_coords(a.g, u);
  gather_unit_at<V>(a, t, tp.b, un, unit_image_offset(a.sx, a.g, tp, un), unit_image_offset(a.sn, a.g, tp, un));
}

// ----------------------------------------------------------------------------------------------- scatter
template <typename scalar_t>
struct ScatterArgs {
  const scalar_t* tokens;      // (T, P), strides (st, sj)
  int64_t st, sj;
  scalar_t* out;               // (B, C, H, W) contiguous, strides so
  ImageStrides so;
  const int32_t* ids;
  const int32_t* cu_seqlens;
  int64_t num_tokens;
  int32_t batch;
  PatchPlan g;
};

template <int V, typename scalar_t>
MASKDM_HD void scatter_unit_at(const ScatterArgs<scalar_t>& a, int64_t t, const Unit& un, int64_t o_off) {
  scalar_t v[V];
  load_token<V>(a.tokens, a.st, a.sj, t, un, a.g.tok_vec, v);
  store_contig<V>(a.out + o_off, v);
}

template <int V, typename scalar_t>
MASKDM_HD void scatter_unit(const ScatterArgs<scalar_t>& a, int64_t t, const TokenPos& tp, int32_t u) {
  const Unit un = unit_coords(a.g, u);
  scatter_unit_at<V>(a, t, un, unit_image_offset(a.so, a.g, tp, un));
}

// -------------------------------------------------------------------------------------------------- loss
template <typename pred_t, typename noise_t>
struct LossArgs {
  using acc_t = at::opmath_type<pred_t>;
  const pred_t* pred;          // (T, P), strides (st, sj)
  int64_t st, sj;
  const noise_t* noise;        // (B, C, H, W), strides sn
  ImageStrides sn;
  const acc_t* weight;         // (B,) or nullptr
  pred_t* grad_out;            // backward only: (T, P) contiguous
  const int32_t* ids;
  const int32_t* cu_seqlens;
  int64_t num_tokens;
  int32_t batch;
  PatchPlan g;
};

// The factor of a token of sample b: w_b / (max(len_b, 1) * P * B). Loss = sum over tokens of it times the
// token's squared error; d loss / d pred = 2 * grad * it * (pred - target).
template <typename pred_t, typename noise_t, typename acc_t = at::opmath_type<pred_t>>
MASKDM_HD acc_t loss_token_scale(const LossArgs<pred_t, noise_t>& a, int32_t b) {
  int32_t len = a.cu_seqlens[b + 1] - a.cu_seqlens[b];
  len = len > 1 ? len : 1;
  const acc_t w = a.weight != nullptr ? a.weight[b] : acc_t(1);
  return w / (static_cast<acc_t>(len) * static_cast<acc_t>(a.g.P) * static_cast<acc_t>(a.batch));
}

// pred - target over unit `un` of token t, its first target element at n_off in noise.
template <int V, typename pred_t, typename noise_t, typename acc_t>
MASKDM_HD void loss_unit_diff(const LossArgs<pred_t, noise_t>& a, int64_t t, const Unit& un, int64_t n_off,
                              acc_t (&d)[V]) {
  acc_t target[V];
  load_contig<V>(a.noise + n_off, target);
  load_token<V>(a.pred, a.st, a.sj, t, un, a.g.tok_vec, d);
  MASKDM_UNROLL
  for (int i = 0; i < V; ++i) d[i] -= target[i];
}

// Forward: sum over the unit of (pred - target)^2.
template <int V, typename pred_t, typename noise_t, typename acc_t = at::opmath_type<pred_t>>
MASKDM_HD acc_t loss_unit_sq_at(const LossArgs<pred_t, noise_t>& a, int64_t t, const Unit& un, int64_t n_off) {
  acc_t d[V];
  loss_unit_diff<V>(a, t, un, n_off, d);
  acc_t s = 0;
  MASKDM_UNROLL
  for (int i = 0; i < V; ++i) s += d[i] * d[i];
  return s;
}

template <int V, typename pred_t, typename noise_t, typename acc_t = at::opmath_type<pred_t>>
MASKDM_HD acc_t loss_unit_sq(const LossArgs<pred_t, noise_t>& a, int64_t t, const TokenPos& tp, int32_t u) {
  const Unit un = unit_coords(a.g, u);
  return loss_unit_sq_at<V>(a, t, un, unit_image_offset(a.sn, a.g, tp, un));
}

// Backward: grad_out = factor * (pred - target), factor = 2 * grad * loss_token_scale.
template <int V, typename pred_t, typename noise_t, typename acc_t>
MASKDM_HD void loss_unit_grad_at(const LossArgs<pred_t, noise_t>& a, int64_t t, const Unit& un, int64_t n_off,
                                 acc_t factor) {
  acc_t d[V];
  loss_unit_diff<V>(a, t, un, n_off, d);
  MASKDM_UNROLL
  for (int i = 0; i < V; ++i) d[i] *= factor;
  store_token<V>(a.grad_out, a.g.P, t, un, a.g.tok_vec, d);
}

template <int V, typename pred_t, typename noise_t, typename acc_t>
MASKDM_HD void loss_unit_grad(const LossArgs<pred_t, noise_t>& a, int64_t t, const TokenPos& tp, int32_t u,
                              acc_t factor) {
  const Unit un = unit_coords(a.g, u);
  loss_unit_grad_at<V>(a, t, un, unit_image_offset(a.sn, a.g, tp, un), factor);
}

}  // namespace maskdm
