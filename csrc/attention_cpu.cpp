// The eager CPU path of attention and varlen_attention: maskdm_kernels._C.attention_cpu.
//
// Why C++: the plain chain these ops replace (transposes + F.scaled_dot_product_attention, fwd + bwd) is C++ from
// its Python call down. The ops add two host jobs, a NaN-row fix (PyTorch's flash CPU kernel returns 0 for a
// query row holding a NaN) and, for varlen, a check of cu_seqlens. In Python those cost more than the chain
// (issue 11). Here one call runs both, the same flash CPU kernel on free (batch, H, L, D) views, and a single
// autograd node whose backward is that kernel's backward. That is fewer nodes than the chain's five.
#include "attention_cpu.h"

#include <ATen/ATen.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <limits>
#include <vector>

namespace maskdm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Kernel calls as flat (first token, batch, length) triples. A (B, N, H, D) input is one call over the batch.
// For packed (T, H, D) input: one call over a uniform batch, else one per non-empty sequence. Returns false for an
// invalid layout (the caller raises the named error).
bool plan_calls(const at::Tensor& cu, int64_t total, int64_t max_seqlen, std::vector<int64_t>& plan) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t st = cu.stride(0), batch = cu.size(0) - 1;
  if (c[0] != 0 || c[batch * st] != total) return false;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = int64_t{c[(b + 1) * st]} - c[b * st];
    if (len < 0 || len > max_seqlen) return false;
  }
  if (total == batch * max_seqlen) {  // every length is max_seqlen
    plan = {0, batch, max_seqlen};
    return true;
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (c[(b + 1) * st] > c[b * st]) plan.insert(plan.end(), {c[b * st], 1, c[(b + 1) * st] - c[b * st]});
  }
  return true;
}

template <typename T>
bool is_nan(T x) {
  return std::isnan(static_cast<float>(x));
}
template <>
bool is_nan<double>(double x) {
  return std::isnan(x);
}

// Any NaN in x (any strides). A scan of the values, no tensor op: O(1) host cost beside the kernel's O(L^2).
bool any_nan(const at::Tensor& x) {
  bool found = false;
  if (x.numel() == 0) return found;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "any_nan", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    const int64_t nd = x.dim(), inner = x.size(nd - 1), is = x.stride(nd - 1);
    std::vector<int64_t> idx(nd, 0);
    for (int64_t off = 0;;) {
      for (int64_t i = 0; i < inner; ++i) found |= is_nan(p[off + i * is]);
      int64_t d = nd - 2;  // odometer over the outer dims, the offset kept in step
      for (; d >= 0; --d) {
        off += x.stride(d);
        if (++idx[d] < x.size(d)) break;
        off -= idx[d] * x.stride(d);
        idx[d] = 0;
      }
      if (d < 0 || found) break;
    }
  });
  return found;
}

// The (batch, H, length, D) view of one call (c = index of its triple): one as_strided for packed tokens (any
// strides), not narrow + view + transpose; each op here is a dispatch, and this path exists for host time.
at::Tensor bhld(const at::Tensor& x, const std::vector<int64_t>& plan, size_t c) {
  if (x.dim() == 4) return x.transpose(1, 2);
  const int64_t start = plan[c], batch = plan[c + 1], len = plan[c + 2], st = x.stride(0);
  return x.as_strided({batch, x.size(1), len, x.size(2)}, {len * st, x.stride(1), st, x.stride(2)},
                      x.storage_offset() + start * st);
}

// torch 2.13's CPU flash kernel reads a head dim with stride != 1 wrongly: copy those only.
at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

bool whole(const at::Tensor& q, const std::vector<int64_t>& plan) {
  return q.dim() == 4 || (plan.size() == 3 && plan[1] * plan[2] == q.size(0));
}

// (batch, H, length, D) results back to q's layout: a free view for one whole call, else copied into place.
at::Tensor gather_back(const at::Tensor& q, const std::vector<int64_t>& plan, const std::vector<at::Tensor>& parts) {
  if (q.dim() == 4) return parts[0].transpose(1, 2);
  if (whole(q, plan)) {  // the kernels allocate (batch, length, H, D) memory: then (T, H, D) is one as_strided
    const at::Tensor& p = parts[0];
    const int64_t H = p.size(1), D = p.size(3);
    if (p.stride(3) == 1 && p.stride(1) == D && p.stride(2) == H * D && p.stride(0) == p.size(2) * H * D) {
      return p.as_strided({q.size(0), H, D}, {H * D, D, 1}, p.storage_offset());
    }
    return p.transpose(1, 2).reshape(q.sizes());
  }
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  for (size_t c = 0; c < plan.size(); c += 3) bhld(out, plan, c).copy_(parts[c / 3]);
  return out;
}

struct FlashCpu : public torch::autograd::Function<FlashCpu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q_in, const at::Tensor& k_in,
                            const at::Tensor& v_in, const std::vector<int64_t>& plan, double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // views and kernels straight to CPU: no autograd record
    const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
    const bool nan_rows = !std::isnan(scale) && any_nan(q);
    const at::Tensor bad = nan_rows ? q.isnan().any(-1, /*keepdim=*/true) : at::Tensor();  // q's layout, D = 1
    std::vector<at::Tensor> outs;
    variable_list saved = {q, k, v};
    for (size_t c = 0; c < plan.size(); c += 3) {
      auto [o, lse] = at::_scaled_dot_product_flash_attention_for_cpu(bhld(q, plan, c), bhld(k, plan, c),
                                                                       bhld(v, plan, c), 0.0, false, {}, scale);
      if (std::isnan(scale)) {  // every score is NaN; the kernel gives 0
        o.fill_(kNaN);
        lse.fill_(kNaN);
      } else if (nan_rows) {  // NaN rows, as the scores they came from are (lse too, as the custom op saves it)
        const at::Tensor b = bhld(bad, plan, c);
        o.masked_fill_(b, kNaN);
        lse.masked_fill_(b.squeeze(-1), kNaN);
      }
      outs.push_back(o);
      saved.push_back(lse);
    }
    at::Tensor out = gather_back(q, plan, outs);
    saved.insert(saved.begin() + 3, out);
    ctx->save_for_backward(saved);
    ctx->saved_data["plan"] = plan;
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const variable_list s = ctx->get_saved_variables();
    const std::vector<int64_t> plan = ctx->saved_data["plan"].toIntVector();
    const double scale = ctx->saved_data["scale"].toDouble();
    const at::Tensor& q = s[0];
    if (std::isnan(scale)) {
      auto nan = [&](const at::Tensor& x) { return at::full(x.sizes(), kNaN, x.options()); };
      return {nan(q), nan(s[1]), nan(s[2]), at::Tensor(), at::Tensor()};
    }
    const at::Tensor dout = grads[0].contiguous();
    std::vector<at::Tensor> dq, dk, dv;
    for (size_t c = 0; c < plan.size(); c += 3) {
      auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          bhld(dout, plan, c), bhld(q, plan, c), bhld(s[1], plan, c), bhld(s[2], plan, c), bhld(s[3], plan, c),
          s[4 + c / 3], 0.0, false, {}, scale);
      dq.push_back(gq);
      dk.push_back(gk);
      dv.push_back(gv);
    }
    return {gather_back(q, plan, dq), gather_back(q, plan, dk), gather_back(q, plan, dv), at::Tensor(), at::Tensor()};
  }
};

// The usual case of an eager CPU call, whose checks this repeats in C++: exact torch.Tensor q, k, v of one shape,
// CPU, float32 / float16 / bfloat16 / float64, head dim a multiple of 8 in [8, 128], at least one token; scale a
// Python float or None; for varlen an int32 CPU cu_seqlens of B + 1 >= 2 entries, a Python int max_seqlen
// and a valid layout. False for anything else: the Python path then names the error or takes its own route.
bool usual(PyObject* q, PyObject* k, PyObject* v, PyObject* cu, PyObject* max_seqlen, PyObject* scale, int64_t ndim,
           double& scale_out, int64_t& max_out) {
  if (!THPVariable_CheckExact(q) || !THPVariable_CheckExact(k) || !THPVariable_CheckExact(v)) return false;
  const at::Tensor &tq = THPVariable_Unpack(q), &tk = THPVariable_Unpack(k), &tv = THPVariable_Unpack(v);
  const at::ScalarType dt = tq.scalar_type();
  if (tq.dim() != ndim || !tq.is_cpu() || tq.numel() == 0 || tk.scalar_type() != dt || tv.scalar_type() != dt ||
      !tk.is_cpu() || !tv.is_cpu() || tk.sizes() != tq.sizes() || tv.sizes() != tq.sizes() ||
      !(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble)) {
    return false;
  }
  const int64_t D = tq.size(-1);
  if (D % 8 || D < 8 || D > 128) return false;
  if (scale == Py_None) {
    scale_out = 1.0 / std::sqrt(static_cast<double>(D));
  } else if (PyFloat_CheckExact(scale)) {
    scale_out = PyFloat_AS_DOUBLE(scale);
  } else {
    return false;
  }
  if (ndim == 4) return true;
  if (!THPVariable_CheckExact(cu) || !PyLong_CheckExact(max_seqlen)) return false;
  const at::Tensor& tc = THPVariable_Unpack(cu);
  int overflow = 0;
  max_out = PyLong_AsLongLongAndOverflow(max_seqlen, &overflow);
  return !overflow && max_out >= 1 && tc.scalar_type() == at::kInt && tc.is_cpu() && tc.dim() == 1 &&
         tc.size(0) >= 2;
}

}  // namespace

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale) {
  std::vector<int64_t> plan;
  if (cu_seqlens.has_value()) {
    if (!plan_calls(*cu_seqlens, q.size(0), max_seqlen, plan)) return at::Tensor();
  } else {
    plan = {0, q.size(0), q.size(1)};
  }
  return FlashCpu::apply(q, k, v, plan, scale);
}

pybind11::object attention_cpu_py(pybind11::handle q, pybind11::handle k, pybind11::handle v, pybind11::handle cu,
                                  pybind11::handle max_seqlen, pybind11::handle scale) {
  const bool varlen = !cu.is_none();
  double s = 0.0;
  int64_t m = 0;
  if (!usual(q.ptr(), k.ptr(), v.ptr(), cu.ptr(), max_seqlen.ptr(), scale.ptr(), varlen ? 3 : 4, s, m)) {
    return pybind11::none();
  }
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = attention_cpu(THPVariable_Unpack(q.ptr()), THPVariable_Unpack(k.ptr()), THPVariable_Unpack(v.ptr()),
                        varlen ? c10::optional<at::Tensor>(THPVariable_Unpack(cu.ptr())) : c10::nullopt, m, s);
  }
  if (!out.defined()) return pybind11::none();
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(out)));
}

}  // namespace maskdm
