// The eager CPU path of attention / varlen_attention (csrc/attention_cpu.cpp), bound as _C.attention_cpu.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

namespace maskdm {

// q, k, v: (B, N, H, D) with cu_seqlens absent, or packed (T, H, D) with int32 CPU cu_seqlens (B + 1,); any strides,
// CPU, T > 0, head dim a multiple of 8. Returns the attention output in q's layout, differentiable in q, k, v (one
// autograd node), or an undefined tensor when cu_seqlens / max_seqlen are not a valid layout.
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale);

// _C.attention_cpu(q, k, v, cu_seqlens, max_seqlen, softmax_scale): the above for the usual case of a Python call
// (cu_seqlens and max_seqlen None for attention, softmax_scale a float or None), None for anything else.
pybind11::object attention_cpu_py(pybind11::handle q, pybind11::handle k, pybind11::handle v, pybind11::handle cu,
                                  pybind11::handle max_seqlen, pybind11::handle scale);

}  // namespace maskdm
