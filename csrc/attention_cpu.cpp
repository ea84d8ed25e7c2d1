// The eager CPU path of attention and varlen_attention: maskdm_kernels._C.attention_cpu.
//
// Why C++: the plain chain these ops replace (transposes + F.scaled_dot_product_attention, fwd + bwd) is C++ from
// its Python call down. The ops add two host jobs, a NaN-row fix (PyTorch's flash CPU kernel returns 0 for a
// query row holding a NaN) and, for varlen, a check of cu_seqlens. In Python those cost more than the chain
// (issue 11). Here one call runs both, the same flash CPU kernel on free (batch, H, L, D) views, and a single
// autograd node whose backward is that kernel's backward. That is fewer nodes than the chain's five.
#include "attention_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace maskdm {
namespace {

using torch::autograd::variable_list;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Kernel calls as flat (first token, batch, length) triples. A (B, N, H, D) input is one call over the batch.
// For packed (T, H, D) input: one call over a uniform batch, else one per non-empty sequence. Returns false for an
// invalid layout (the caller raises the named error).
bool plan_calls(const at::Tensor& cu, int64_t total, int64_t max_seqlen, std::vector<int64_t>& plan) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t st = cu.stride(0), batch = cu.size(0) - 1;
  if (c[0] != 0 || c[batch * st] != total) return false;
  bool uniform = true;  // every length is max_seqlen (not batch * max_seqlen == total: that product can overflow)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = int64_t{c[(b + 1) * st]} - c[b * st];
    if (len < 0 || len > max_seqlen) return false;
    uniform &= len == max_seqlen;
  }
  if (uniform) {
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

// (batch, H, length, D) results back to q's layout: a free view for one whole call, else copied into place.
at::Tensor gather_back(const at::Tensor& q, const std::vector<int64_t>& plan, const std::vector<at::Tensor>& parts) {
  if (q.dim() == 4) return parts[0].transpose(1, 2);
  // One call over all tokens: the kernels allocate (batch, length, H, D) memory, so (T, H, D) is one as_strided.
  if (plan.size() == 3 && plan[1] * plan[2] == q.size(0)) {
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

// Forward with autograd off: (output in q's layout, the kernel's lse per call). NaN rows as the custom op makes
// them: a NaN query row gives a NaN output row and lse (the backward then gives NaN), a NaN scale NaN everywhere.
std::pair<at::Tensor, std::vector<at::Tensor>> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const std::vector<int64_t>& plan, double scale) {
  const bool nan_rows = !std::isnan(scale) && any_nan(q);
  const at::Tensor bad = nan_rows ? q.isnan().any(-1, /*keepdim=*/true) : at::Tensor();  // q's layout, D = 1
  std::vector<at::Tensor> outs, lses;
  for (size_t c = 0; c < plan.size(); c += 3) {
    auto [o, lse] = at::_scaled_dot_product_flash_attention_for_cpu(bhld(q, plan, c), bhld(k, plan, c),
                                                                     bhld(v, plan, c), 0.0, false, {}, scale);
    if (std::isnan(scale)) {  // every score is NaN; the kernel gives 0
      o.fill_(kNaN);
      lse.fill_(kNaN);
    } else if (nan_rows) {
      const at::Tensor b = bhld(bad, plan, c);
      o.masked_fill_(b, kNaN);
      lse.masked_fill_(b.squeeze(-1), kNaN);
    }
    outs.push_back(o);
    lses.push_back(lse);
  }
  return {gather_back(q, plan, outs), std::move(lses)};
}

// The node's pointer type: std::shared_ptr<Node> up to torch 2.13, c10::intrusive_ptr<Node> after. (The GPU image
// builds this against torch 2.11, this repo's venv against 2.14.)
using NodePtr = decltype(torch::autograd::Edge::function);

template <class N, class Base = torch::autograd::Node>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>();
  } else {  // deleteNode (found by ADL, older torch only) frees a long graph without deep recursion
    return std::shared_ptr<N>(new N(), [](Base* n) { deleteNode(n); });
  }
}

// The backward: one node in place of the chain's SDPA node and four transposes. A hand-written Node (like the ones
// PyTorch generates), not a torch::autograd::Function: the latter's generic wrapper cost more host time than the
// chain's five nodes here.
struct FlashCpuBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable q_, k_, v_, out_;  // version-checked: an in-place change before backward raises
  std::vector<at::Tensor> lse_;                     // internal, never seen by the user
  std::vector<int64_t> plan_;
  double scale_ = 0.0;

  std::string name() const override { return "FlashCpuBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    q_.reset_data();
    k_.reset_data();
    v_.reset_data();
    out_.reset_data();
    lse_.clear();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor q = q_.unpack(), k = k_.unpack(), v = v_.unpack(), out = out_.unpack(getptr());
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    // create_graph: run with autograd on, so a second backward meets the kernel's "not implemented", not zeros.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    if (std::isnan(scale_)) {
      auto nan = [](const at::Tensor& x) { return at::full(x.sizes(), kNaN, x.options()); };
      return {nan(q), nan(k), nan(v)};
    }
    const at::Tensor dout = grads[0].contiguous();
    std::vector<at::Tensor> dq, dk, dv;
    for (size_t c = 0; c < plan_.size(); c += 3) {
      auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          bhld(dout, plan_, c), bhld(q, plan_, c), bhld(k, plan_, c), bhld(v, plan_, c), bhld(out, plan_, c),
          lse_[c / 3], 0.0, false, {}, scale_);
      dq.push_back(gq);
      dk.push_back(gk);
      dv.push_back(gv);
    }
    return {gather_back(q, plan_, dq), gather_back(q, plan_, dk), gather_back(q, plan_, dv)};
  }
};

// The usual case of an eager CPU call, whose checks this repeats in C++: exact torch.Tensor q, k, v of one shape,
// CPU, float32 / float16 / bfloat16 / float64, head dim a multiple of 8 in [8, 128], at least one token, no
// forward-mode tangent; scale a Python float or None; for varlen an int32 CPU cu_seqlens of B + 1 >= 2 entries, a
// Python int max_seqlen and a valid layout. False for anything else: the Python path then names the error or
// takes its own route.
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
  using torch::autograd::isFwGradDefined;  // forward-mode AD: the Python path (which says it is not supported)
  if (isFwGradDefined(tq) || isFwGradDefined(tk) || isFwGradDefined(tv)) return false;
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
  const at::Tensor qs = unit_last_stride(q), ks = unit_last_stride(k), vs = unit_last_stride(v);
  at::Tensor out;
  std::vector<at::Tensor> lse;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // views and kernels straight to CPU: no autograd record
    std::tie(out, lse) = forward(qs, ks, vs, plan, scale);
  }
  if (torch::autograd::compute_requires_grad(q, k, v)) {
    auto node = make_node<FlashCpuBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(q, k, v));
    node->q_ = torch::autograd::SavedVariable(qs, false);
    node->k_ = torch::autograd::SavedVariable(ks, false);
    node->v_ = torch::autograd::SavedVariable(vs, false);
    node->lse_ = std::move(lse);
    node->plan_ = std::move(plan);
    node->scale_ = scale;
    torch::autograd::set_history(out, NodePtr(node));
    node->out_ = torch::autograd::SavedVariable(out, true);
  }
  return out;
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
