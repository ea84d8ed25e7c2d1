// maskdm_kernels._C: the schemas of the compiled patch kernels (torch.ops.maskdm.*), their Meta
// implementations (shapes only, so they trace under FakeTensor), and the Python module with WITH_CUDA.
//
// The CPU implementations are registered in csrc/<op>.cpp, the CUDA ones in csrc/<op>.cu. The Python
// custom ops maskdm::gather_patches etc. (maskdm_kernels/ops) add to this namespace as fragments and call
// these kernels through torch.ops.maskdm.<name>.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "attention_cpu.h"

namespace {

at::Tensor gather_patches_meta(const at::Tensor& images, const at::Tensor& ids, const at::Tensor& cu_seqlens,
                               int64_t patch_size, const c10::optional<at::Tensor>& noise,
                               const c10::optional<at::Tensor>& signal_scale,
                               const c10::optional<at::Tensor>& noise_scale) {
  TORCH_CHECK(images.dim() == 4, "gather_patches_kernel: images must be 4-D, got shape ", images.sym_sizes());
  return at::empty_symint({ids.sym_size(0), images.sym_size(1) * (patch_size * patch_size)}, images.options());
}

at::Tensor scatter_patches_meta(const at::Tensor& tokens, const at::Tensor& ids, const at::Tensor& cu_seqlens,
                                int64_t patch_size, int64_t batch, int64_t channels, int64_t height, int64_t width,
                                double fill) {
  return at::empty({batch, channels, height, width}, tokens.options());
}

at::ScalarType loss_dtype(const at::Tensor& pred) {
  return pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor masked_noise_loss_meta(const at::Tensor& pred, const at::Tensor& noise, const at::Tensor& ids,
                                  const at::Tensor& cu_seqlens, int64_t patch_size,
                                  const c10::optional<at::Tensor>& weight) {
  return at::empty({}, pred.options().dtype(loss_dtype(pred)));
}

at::Tensor masked_noise_loss_backward_meta(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& noise,
                                           const at::Tensor& ids, const at::Tensor& cu_seqlens, int64_t patch_size,
                                           const c10::optional<at::Tensor>& weight) {
  return at::empty_symint(pred.sym_sizes(), pred.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

TORCH_LIBRARY(maskdm, m) {
  m.def(
      "gather_patches_kernel(Tensor images, Tensor ids, Tensor cu_seqlens, int patch_size, Tensor? noise, "
      "Tensor? signal_scale, Tensor? noise_scale) -> Tensor");
  m.def(
      "scatter_patches_kernel(Tensor tokens, Tensor ids, Tensor cu_seqlens, int patch_size, int batch, "
      "int channels, int height, int width, float fill) -> Tensor");
  m.def(
      "masked_noise_loss_kernel(Tensor pred, Tensor noise, Tensor ids, Tensor cu_seqlens, int patch_size, "
      "Tensor? weight) -> Tensor");
  m.def(
      "masked_noise_loss_backward_kernel(Tensor grad, Tensor pred, Tensor noise, Tensor ids, Tensor cu_seqlens, "
      "int patch_size, Tensor? weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(maskdm, Meta, m) {
  m.impl("gather_patches_kernel", &gather_patches_meta);
  m.impl("scatter_patches_kernel", &scatter_patches_meta);
  m.impl("masked_noise_loss_kernel", &masked_noise_loss_meta);
  m.impl("masked_noise_loss_backward_kernel", &masked_noise_loss_backward_meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maskdm compiled kernels: registers torch.ops.maskdm.*_kernel (C++ CPU, and CUDA when WITH_CUDA)";
#ifdef MASKDM_WITH_CUDA
  m.attr("WITH_CUDA") = pybind11::bool_(true);
#else
  m.attr("WITH_CUDA") = pybind11::bool_(false);
#endif
  m.def("attention_cpu", &maskdm::attention_cpu_py,
        "The eager CPU path of attention / varlen_attention for the usual case, else None (csrc/attention_cpu.h).");
}
