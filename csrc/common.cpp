// Argument checks and the launch plan shared by the C++ and CUDA entry points (see common.h).
#include "common.h"

#include <cstdint>

namespace maskdm {

void check_layout(const char* op, const at::Tensor& ids, const at::Tensor& cu_seqlens, const at::Device& device,
                  int64_t batch) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kInt, op, ": ids must be a 1-D int32 tensor, got ",
              ids.scalar_type(), " of shape ", ids.sizes());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.scalar_type() == at::kInt, op,
              ": cu_seqlens must be a 1-D int32 tensor, got ", cu_seqlens.scalar_type(), " of shape ",
              cu_seqlens.sizes());
  TORCH_CHECK(ids.device() == device, op, ": ids is on ", ids.device(), " but the data is on ", device);
  TORCH_CHECK(cu_seqlens.device() == device, op, ": cu_seqlens is on ", cu_seqlens.device(),
              " but the data is on ", device);
  TORCH_CHECK(ids.is_contiguous() && cu_seqlens.is_contiguous(), op, ": ids and cu_seqlens must be contiguous");
  TORCH_CHECK(cu_seqlens.numel() == batch + 1, op, ": cu_seqlens must have B + 1 = ", batch + 1,
              " entries, got ", cu_seqlens.numel());
  TORCH_CHECK(batch > 0 || ids.numel() == 0, op, ": ids has ", ids.numel(), " tokens but the batch is empty");
  TORCH_CHECK(ids.numel() < (int64_t(1) << 31), op, ": ids has ", ids.numel(), " tokens, more than 2^31 - 1");
}

void check_cu_seqlens_host(const char* op, const at::Tensor& cu_seqlens, int64_t num_tokens) {
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  const int64_t n = cu_seqlens.numel();
  TORCH_CHECK_VALUE(cu[0] == 0, op, ": cu_seqlens[0] must be 0, got ", cu[0]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    TORCH_CHECK_VALUE(cu[i + 1] >= cu[i], op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", i, "]=", cu[i],
                      " > cu_seqlens[", i + 1, "]=", cu[i + 1]);
  }
  TORCH_CHECK_VALUE(cu[n - 1] == num_tokens, op, ": cu_seqlens[-1] must equal T=", num_tokens,
                    " (the number of ids), got ", cu[n - 1]);
}

void check_float_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim, const at::Device& device) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the data is on ", device);
}

void check_patch_size(const char* op, int64_t patch_size, int64_t height, int64_t width) {
  TORCH_CHECK(patch_size >= 1, op, ": patch_size must be positive, got ", patch_size);
  TORCH_CHECK(height % patch_size == 0 && width % patch_size == 0, op, ": patch_size=", patch_size,
              " must divide the image height and width, got ", height, "x", width);
  TORCH_CHECK((height / patch_size) * (width / patch_size) < (int64_t(1) << 31), op,
              ": more than 2^31 - 1 patches per image");
}

at::Tensor per_sample(const char* op, const char* name, const c10::optional<at::Tensor>& t, int64_t batch,
                      const at::Device& device, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_float_tensor(op, name, *t, 1, device);
  TORCH_CHECK(t->size(0) == batch, op, ": ", name, " must have shape (", batch, ",), got ", t->sizes());
  return t->to(acc).contiguous();
}

namespace {

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0; }

// Every element of a unit of V at offset k*V in a p1 row lies V-aligned in the image: the row's start
// (b, h, pcol*p*C) and each of its units must be multiples of V elements, the base pointer V-aligned.
bool image_ok(const ImageSide& im, int64_t V, bool col) {
  if (!aligned(im.ptr, V * im.elem_size)) return false;
  if (im.s.b % V || im.s.h % V) return false;
  return !col || im.s.c % V == 0;
}

bool token_ok(const TokenSide& tk, int64_t V) {
  return tk.sj == 1 && tk.st % V == 0 && aligned(tk.ptr, V * tk.elem_size);
}

}  // namespace

PatchPlan make_plan(int64_t p, int64_t C, int64_t H, int64_t W, std::initializer_list<ImageSide> images,
                    std::initializer_list<TokenSide> tokens) {
  PatchPlan g;
  g.p = static_cast<int32_t>(p);
  g.C = static_cast<int32_t>(C);
  g.Wp = static_cast<int32_t>(W / p);
  g.N = static_cast<int32_t>((H / p) * (W / p));
  g.P = static_cast<int32_t>(p * p * C);
  int64_t vmax = 16;
  for (const auto& im : images) vmax = std::min<int64_t>(vmax, 16 / im.elem_size);
  for (const auto& tk : tokens) vmax = std::min<int64_t>(vmax, 16 / tk.elem_size);
  vmax = std::min<int64_t>(vmax, 8);

  // Row mode: the (p2 c) run of a p1 row is contiguous in every image.
  bool row_contig = true, col_contig = C > 1;
  for (const auto& im : images) {
    row_contig = row_contig && (C == 1 ? im.s.w == 1 : (im.s.c == 1 && im.s.w == C));
    col_contig = col_contig && im.s.w == 1;
  }
  auto widest = [&](int64_t run, bool col) {
    int64_t V = vmax;
    while (V > 1) {
      bool ok = run % V == 0;
      for (const auto& im : images) ok = ok && image_ok(im, V, col);
      if (ok) break;
      V /= 2;
    }
    return V;
  };
  int64_t V = 1;
  g.col = false;
  if (row_contig) {
    V = widest(p * C, false);
  } else if (col_contig) {
    V = widest(p, true);
    g.col = V > 1;
  }
  g.V = static_cast<int32_t>(V);
  g.units = g.P / g.V;
  g.tok_vec = !g.col && V > 1;
  for (const auto& tk : tokens) g.tok_vec = g.tok_vec && token_ok(tk, V);
  return g;
}

}  // namespace maskdm
