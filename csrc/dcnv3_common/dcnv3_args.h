// Argument validation shared by the CPU and CUDA entry points (host code, ATen).

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "dcnv3_common/dcnv3_math.h"

namespace internimage_dcnv3 {

struct Shape {
  int64_t N, H, W, C, G, Cg, Ho, Wo, P;
};

inline Shape check_args(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, int64_t kernel_h,
                        int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                        int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                        int64_t remove_center, double offset_scale) {
  TORCH_CHECK(input.dim() == 4, "DCNv3: input must be channels-last (N, H, W, C), got ", input.dim(), " dims");
  TORCH_CHECK(offset.dim() == 4 && mask.dim() == 4, "DCNv3: offset and mask must be 4-d (N, Ho, Wo, ...)");
  TORCH_CHECK(offset.scalar_type() == input.scalar_type() && mask.scalar_type() == input.scalar_type(),
              "DCNv3: input, offset and mask must have the same dtype, got ", input.scalar_type(), ", ",
              offset.scalar_type(), ", ", mask.scalar_type());
  TORCH_CHECK(offset.device() == input.device() && mask.device() == input.device(),
              "DCNv3: input, offset and mask must be on the same device");
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max() / 4;
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1 && kernel_h <= 1024 && kernel_w <= 1024,
              "DCNv3: kernel size must be in [1, 1024]");
  TORCH_CHECK(stride_h >= 1 && stride_w >= 1 && stride_h <= kIntMax && stride_w <= kIntMax,
              "DCNv3: stride must be >= 1");
  TORCH_CHECK(dilation_h >= 1 && dilation_w >= 1 && dilation_h <= 65536 && dilation_w <= 65536,
              "DCNv3: dilation must be in [1, 65536]");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0 && pad_h <= kIntMax && pad_w <= kIntMax, "DCNv3: padding must be >= 0");
  TORCH_CHECK(group >= 1 && group_channels >= 1, "DCNv3: group and group_channels must be >= 1");
  TORCH_CHECK(!remove_center || (kernel_h % 2 == 1 && kernel_w % 2 == 1),
              "DCNv3: remove_center needs an odd kernel size");
  // (The kernels divide by the number of points: a 1x1 kernel with remove_center, which has none, must stop here.)
  TORCH_CHECK(num_points(static_cast<int>(kernel_h), static_cast<int>(kernel_w), remove_center != 0) >= 1,
              "DCNv3: no sampling points (a 1x1 kernel with remove_center)");
  TORCH_CHECK(std::isfinite(offset_scale), "DCNv3: offset_scale must be finite, got ", offset_scale);
  Shape s;
  s.N = input.size(0);
  s.H = input.size(1);
  s.W = input.size(2);
  s.C = input.size(3);
  TORCH_CHECK(s.C == group * group_channels, "DCNv3: input has ", s.C, " channels but group * group_channels = ",
              group * group_channels);
  TORCH_CHECK(s.H <= kIntMax && s.W <= kIntMax && s.H * s.W <= std::numeric_limits<int32_t>::max() &&
                  s.C <= std::numeric_limits<int32_t>::max(),
              "DCNv3: input too large (needs H * W < 2^31 and C < 2^31)");
  s.G = group;
  s.Cg = group_channels;
  s.Ho = output_size(s.H, kernel_h, stride_h, pad_h, dilation_h);
  s.Wo = output_size(s.W, kernel_w, stride_w, pad_w, dilation_w);
  TORCH_CHECK(s.Ho >= 1 && s.Wo >= 1, "DCNv3: input ", s.H, "x", s.W,
              " is smaller than the kernel footprint (empty output) for this kernel/stride/padding/dilation");
  s.P = num_points(static_cast<int>(kernel_h), static_cast<int>(kernel_w), remove_center != 0);
  TORCH_CHECK(offset.size(0) == s.N && offset.size(1) == s.Ho && offset.size(2) == s.Wo &&
                  offset.size(3) == s.G * s.P * 2,
              "DCNv3: offset must have shape (", s.N, ", ", s.Ho, ", ", s.Wo, ", ", s.G * s.P * 2, "), got ",
              offset.sizes());
  TORCH_CHECK(mask.size(0) == s.N && mask.size(1) == s.Ho && mask.size(2) == s.Wo && mask.size(3) == s.G * s.P,
              "DCNv3: mask must have shape (", s.N, ", ", s.Ho, ", ", s.Wo, ", ", s.G * s.P, "), got ", mask.sizes());
  return s;
}

// The backward's grad_output: on the input's device, shaped like the forward's output.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const Shape& s) {
  TORCH_CHECK(grad_output.device() == input.device(), "DCNv3: grad_output must be on the input's device (",
              input.device(), "), got ", grad_output.device());
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == s.N && grad_output.size(1) == s.Ho &&
                  grad_output.size(2) == s.Wo && grad_output.size(3) == s.C,
              "DCNv3: grad_output must have shape (", s.N, ", ", s.Ho, ", ", s.Wo, ", ", s.C, "), got ",
              grad_output.sizes());
}

}  // namespace internimage_dcnv3
