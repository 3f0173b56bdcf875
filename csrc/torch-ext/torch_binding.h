#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>

// Official DCNv3 argument order, channels-last: input (N, H, W, G*Cg), offset (N, Ho, Wo, G*P*2) as (dx, dy) pairs,
// mask (N, Ho, Wo, G*P). Returns (N, Ho, Wo, G*Cg). mask_softmax: mask holds logits, softmaxed over each (pixel,
// group)'s P points inside the op (grad_mask is then the gradient with respect to the logits).
at::Tensor dcnv3_forward_cpu(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                             int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                             int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                             int64_t group_channels, double offset_scale, int64_t remove_center,
                             bool mask_softmax);

// Gradients with respect to (input, offset, mask).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
    int64_t remove_center, bool mask_softmax);

// DCNv4, channels-last: input (N, H, W, G*Cg), offset_mask (N, Ho, Wo, >= G*3P), group g's 2P offsets ((dx, dy)
// pairs) then P weights from channel g*3P (weights used as they are; channels past G*3P are not read). Locations in
// exact pixel coordinates (pixel_base in dcnv3_common/dcnv3_math.h). Returns (N, Ho, Wo, G*Cg).
at::Tensor dcnv4_forward_cpu(const at::Tensor& input, const at::Tensor& offset_mask, int64_t kernel_h,
                             int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                             int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                             double offset_scale, int64_t remove_center);

// Gradients with respect to (input, offset_mask); the padding channels of grad_offset_mask are zero.
std::tuple<at::Tensor, at::Tensor> dcnv4_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                      const at::Tensor& offset_mask, int64_t kernel_h,
                                                      int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                                      int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                                      int64_t dilation_w, int64_t group, int64_t group_channels,
                                                      double offset_scale, int64_t remove_center);

// Instruction-set level of the CPU kernels: 0 portable, 1 AVX2+FMA, 2 AVX-512. request < 0 only queries; otherwise
// the level is set to min(request, what this CPU supports). Returns the level in use.
int64_t dcnv3_cpu_isa(int64_t request);

#if defined(CUDA_KERNEL) || defined(DCNV3_WITH_CUDA)
at::Tensor dcnv3_forward_cuda(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                              int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                              int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                              int64_t group_channels, double offset_scale, int64_t remove_center,
                              bool mask_softmax);

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
    int64_t remove_center, bool mask_softmax);

at::Tensor dcnv4_forward_cuda(const at::Tensor& input, const at::Tensor& offset_mask, int64_t kernel_h,
                              int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                              int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                              double offset_scale, int64_t remove_center);

std::tuple<at::Tensor, at::Tensor> dcnv4_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                                       const at::Tensor& offset_mask, int64_t kernel_h,
                                                       int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                                       int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                                       int64_t dilation_w, int64_t group, int64_t group_channels,
                                                       double offset_scale, int64_t remove_center);
#endif
