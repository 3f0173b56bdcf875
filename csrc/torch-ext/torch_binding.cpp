#include <torch/library.h>

#include <string>

#include "torch_binding.h"

#if defined(DCNV3_LOCAL_BUILD)
// Local builds (internimage_hf.ops.build) compile without kernel-builder, which normally generates registration.h.
// These two macros do the same job: register the ops under the extension's unique namespace and give Python an
// importable (empty) extension module whose import runs the registration.
#include <Python.h>
#define DCNV3_CONCAT_(a, b) a##b
#define DCNV3_CONCAT(a, b) DCNV3_CONCAT_(a, b)
#define DCNV3_STRINGIFY_(a) #a
#define DCNV3_STRINGIFY(a) DCNV3_STRINGIFY_(a)
#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)
#define REGISTER_EXTENSION(NAME)                                                                 \
  PyMODINIT_FUNC DCNV3_CONCAT(PyInit_, NAME)() {                                                 \
    static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, DCNV3_STRINGIFY(NAME), nullptr, 0, \
                                            nullptr};                                            \
    return PyModule_Create(&module_def);                                                         \
  }
#else
#include "registration.h"
#endif

namespace {

std::string dcnv3_backends() {
#if defined(CUDA_KERNEL) || defined(DCNV3_WITH_CUDA)
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

}  // namespace

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "dcnv3_forward(Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, int stride_h, "
      "int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, int group_channels, "
      "float offset_scale, int remove_center, bool mask_softmax=False) -> Tensor");
  ops.def(
      "dcnv3_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, "
      "int group_channels, float offset_scale, int remove_center, bool mask_softmax=False) "
      "-> (Tensor, Tensor, Tensor)");
  ops.def(
      "dcnv4_forward(Tensor input, Tensor offset_mask, int kernel_h, int kernel_w, int stride_h, int stride_w, "
      "int pad_h, int pad_w, int dilation_h, int dilation_w, int group, int group_channels, float offset_scale, "
      "int remove_center) -> Tensor");
  ops.def(
      "dcnv4_backward(Tensor grad_output, Tensor input, Tensor offset_mask, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, "
      "int group_channels, float offset_scale, int remove_center) -> (Tensor, Tensor)");
  ops.def("backends() -> str", &dcnv3_backends);
  ops.def("cpu_isa(int request) -> int", &dcnv3_cpu_isa);

  ops.impl("dcnv3_forward", c10::DeviceType::CPU, &dcnv3_forward_cpu);
  ops.impl("dcnv3_backward", c10::DeviceType::CPU, &dcnv3_backward_cpu);
  ops.impl("dcnv4_forward", c10::DeviceType::CPU, &dcnv4_forward_cpu);
  ops.impl("dcnv4_backward", c10::DeviceType::CPU, &dcnv4_backward_cpu);
#if defined(CUDA_KERNEL) || defined(DCNV3_WITH_CUDA)
  ops.impl("dcnv3_forward", c10::DeviceType::CUDA, &dcnv3_forward_cuda);
  ops.impl("dcnv3_backward", c10::DeviceType::CUDA, &dcnv3_backward_cuda);
  ops.impl("dcnv4_forward", c10::DeviceType::CUDA, &dcnv4_forward_cuda);
  ops.impl("dcnv4_backward", c10::DeviceType::CUDA, &dcnv4_backward_cuda);
#endif
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
