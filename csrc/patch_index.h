// Per-element index math of the patch ops, shared by the C++ (CPU) and the CUDA kernels.
//
// Everything here is `MASKDM_HD`: __host__ __device__ under nvcc, plain inline under the host compiler, so the
// CPU kernels (and the CPU tests) run exactly the index math the CUDA kernels run.
//
// Layout (DESIGN.md): a token is one visible patch, its P = p*p*C values in (p1 p2 c) order; patch id
// pid = prow * Wp + pcol on the (H/p, W/p) grid; token t belongs to the sample b with
// cu_seqlens[b] <= t < cu_seqlens[b+1]. Image offsets are int64 and use the tensor's strides, so
// channels_last and sliced images are read in place.
//
// Work unit: every kernel walks a token's P values in "units" of V elements:
//   row mode: V consecutive values of one p1 row, i.e. of (p2 c). In the image they are contiguous when the
//             (p2 c) run is (channels_last, or C == 1 with stride_w == 1); V == 1 handles any strides.
//   col mode: V consecutive p2 of one channel c (NCHW with stride_w == 1, C > 1). Contiguous in the image,
//             C apart in the token.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MASKDM_HD __host__ __device__ __forceinline__
#define MASKDM_UNROLL _Pragma("unroll")
#else
#define MASKDM_HD inline
#define MASKDM_UNROLL _Pragma("GCC unroll 8")
#endif

namespace maskdm {

// Element strides of a (B, C, H, W) image.
struct ImageStrides {
  int64_t b, c, h, w;
};

// Geometry of one launch: fixed for all tokens.
struct PatchPlan {
  int32_t p;      // patch size
  int32_t C;      // channels
  int32_t Wp;     // patches per grid row (W / p)
  int32_t N;      // patches per image ((H / p) * (W / p)): valid ids are [0, N)
  int32_t P;      // values per token, p * p * C
  int32_t V;      // elements per unit (a power of two; > 1 only where the image run is contiguous)
  int32_t units;  // units per token, P / V
  bool col;       // col mode (see above), else row mode
  bool tok_vec;   // the token-side rows of this launch may be accessed V elements at a time
};

// The sample that owns packed token t: the largest b in [0, batch) with cu_seqlens[b] <= t. Taking the
// largest skips empty samples (cu_seqlens[b] == cu_seqlens[b+1]). log2(batch) loads, no (T,) index tensor.
MASKDM_HD int32_t token_sample(const int32_t* cu_seqlens, int64_t t, int32_t batch) {
  int32_t lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) >> 1;
    if (static_cast<int64_t>(cu_seqlens[mid]) <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Where token t sits: its sample and its patch's (row, col) on the patch grid.
struct TokenPos {
  int32_t b, prow, pcol;
};

MASKDM_HD TokenPos token_pos(const int32_t* ids, const int32_t* cu_seqlens, int64_t t, int32_t batch,
                             const PatchPlan& g) {
  const int32_t pid = ids[t];
  TokenPos tp;
  tp.b = token_sample(cu_seqlens, t, batch);
  tp.prow = pid / g.Wp;
  tp.pcol = pid - tp.prow * g.Wp;
  return tp;
}

MASKDM_HD bool valid_patch_id(int32_t pid, const PatchPlan& g) { return pid >= 0 && pid < g.N; }

// Unit u of a token: the (p1, p2, c) of its first element, that element's index in the token (tok_off) and
// the token-side distance between the unit's consecutive elements (tok_step: 1 in row mode, C in col mode).
struct Unit {
  int32_t p1, p2, c, tok_off, tok_step;
};

MASKDM_HD Unit unit_coords(const PatchPlan& g, int32_t u) {
  const int32_t row_len = g.p * g.C;  // one p1 row of the token: (p2 c)
  const int32_t per_row = row_len / g.V;
  Unit r;
  r.p1 = u / per_row;
  const int32_t k = u - r.p1 * per_row;
  if (g.col) {  // k = c * (p / V) + p2 / V
    const int32_t per_c = g.p / g.V;
    r.c = k / per_c;
    r.p2 = (k - r.c * per_c) * g.V;
    r.tok_off = r.p1 * row_len + r.p2 * g.C + r.c;
    r.tok_step = g.C;
  } else {  // k * V = p2 * C + c
    const int32_t e = k * g.V;
    r.p2 = e / g.C;
    r.c = e - r.p2 * g.C;
    r.tok_off = r.p1 * row_len + e;
    r.tok_step = 1;
  }
  return r;
}

// int64 element offset of a token's patch origin (its pixel (c=0, p1=0, p2=0)) in an image with strides s.
MASKDM_HD int64_t patch_origin_offset(const ImageStrides& s, const PatchPlan& g, const TokenPos& tp) {
  return tp.b * s.b + static_cast<int64_t>(tp.prow) * g.p * s.h + static_cast<int64_t>(tp.pcol) * g.p * s.w;
}

// Offset of the first element of unit `un` from the patch origin.
MASKDM_HD int64_t unit_pixel_offset(const ImageStrides& s, const Unit& un) {
  return un.c * s.c + un.p1 * s.h + un.p2 * s.w;
}

// int64 element offset, in an image with strides s, of the first element of unit `un` of a token at `tp`.
MASKDM_HD int64_t unit_image_offset(const ImageStrides& s, const PatchPlan& g, const TokenPos& tp, const Unit& un) {
  return patch_origin_offset(s, g, tp) + unit_pixel_offset(s, un);
}

// int64 element offset of element i of unit `un` in a (T, P) token tensor with strides (st, sj).
MASKDM_HD int64_t token_offset(int64_t t, int64_t st, int64_t sj, const Unit& un, int32_t i) {
  return t * st + static_cast<int64_t>(un.tok_off + i * un.tok_step) * sj;
}

}  // namespace maskdm
