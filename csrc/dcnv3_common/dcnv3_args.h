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

// The checks both ops share: parameters, input layout and size, output size. `op` names the op in messages.
inline Shape check_common(const char* op, const at::Tensor& input, int64_t kernel_h, int64_t kernel_w,
                          int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                          int64_t dilation_w, int64_t group, int64_t group_channels, int64_t remove_center,
                          double offset_scale) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be channels-last (N, H, W, C), got ", input.dim(), " dims");
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max() / 4;
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1 && kernel_h <= 1024 && kernel_w <= 1024, op,
              ": kernel size must be in [1, 1024]");
  TORCH_CHECK(stride_h >= 1 && stride_w >= 1 && stride_h <= kIntMax && stride_w <= kIntMax, op,
              ": stride must be >= 1");
  TORCH_CHECK(dilation_h >= 1 && dilation_w >= 1 && dilation_h <= 65536 && dilation_w <= 65536, op,
              ": dilation must be in [1, 65536]");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0 && pad_h <= kIntMax && pad_w <= kIntMax, op, ": padding must be >= 0");
  TORCH_CHECK(group >= 1 && group_channels >= 1, op, ": group and group_channels must be >= 1");
  TORCH_CHECK(!remove_center || (kernel_h % 2 == 1 && kernel_w % 2 == 1), op,
              ": remove_center needs an odd kernel size");
  // (The kernels divide by the number of points: a 1x1 kernel with remove_center, which has none, must stop here.)
  TORCH_CHECK(num_points(static_cast<int>(kernel_h), static_cast<int>(kernel_w), remove_center != 0) >= 1, op,
              ": no sampling points (a 1x1 kernel with remove_center)");
  TORCH_CHECK(std::isfinite(offset_scale), op, ": offset_scale must be finite, got ", offset_scale);
  Shape s;
  s.N = input.size(0);
  s.H = input.size(1);
  s.W = input.size(2);
  s.C = input.size(3);
  TORCH_CHECK(s.C == group * group_channels, op, ": input has ", s.C, " channels but group * group_channels = ",
              group * group_channels);
  TORCH_CHECK(s.H <= kIntMax && s.W <= kIntMax && s.H * s.W <= std::numeric_limits<int32_t>::max() &&
                  s.C <= std::numeric_limits<int32_t>::max(),
              op, ": input too large (needs H * W < 2^31 and C < 2^31)");
  s.G = group;
  s.Cg = group_channels;
  s.Ho = output_size(s.H, kernel_h, stride_h, pad_h, dilation_h);
  s.Wo = output_size(s.W, kernel_w, stride_w, pad_w, dilation_w);
  TORCH_CHECK(s.Ho >= 1 && s.Wo >= 1, op, ": input ", s.H, "x", s.W,
              " is smaller than the kernel footprint (empty output) for this kernel/stride/padding/dilation");
  s.P = num_points(static_cast<int>(kernel_h), static_cast<int>(kernel_w), remove_center != 0);
  return s;
}

// A tensor read alongside the input: same dtype and device, 4-d.
inline void check_companion(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-d (N, Ho, Wo, ...), got ", t.dim(), " dims");
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " must have the input's dtype (",
              input.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the input's device (", input.device(),
              "), got ", t.device());
}

// DCNv3: offset (N, Ho, Wo, G*P*2) and mask (N, Ho, Wo, G*P).
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
  const Shape s = check_common("DCNv3", input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                               dilation_w, group, group_channels, remove_center, offset_scale);
  TORCH_CHECK(offset.size(0) == s.N && offset.size(1) == s.Ho && offset.size(2) == s.Wo &&
                  offset.size(3) == s.G * s.P * 2,
              "DCNv3: offset must have shape (", s.N, ", ", s.Ho, ", ", s.Wo, ", ", s.G * s.P * 2, "), got ",
              offset.sizes());
  TORCH_CHECK(mask.size(0) == s.N && mask.size(1) == s.Ho && mask.size(2) == s.Wo && mask.size(3) == s.G * s.P,
              "DCNv3: mask must have shape (", s.N, ", ", s.Ho, ", ", s.Wo, ", ", s.G * s.P, "), got ", mask.sizes());
  return s;
}

// DCNv4: offset_mask (N, Ho, Wo, >= G*3P), group g's 2P offsets then P weights from channel g*3P; channels past
// G*3P (the official Linear pads to a multiple of 8) are not read.
inline Shape check_args_v4(const at::Tensor& input, const at::Tensor& offset_mask, int64_t kernel_h,
                           int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                           int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                           int64_t remove_center, double offset_scale) {
  check_companion("DCNv4", "offset_mask", offset_mask, input);
  const Shape s = check_common("DCNv4", input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                               dilation_w, group, group_channels, remove_center, offset_scale);
  TORCH_CHECK(offset_mask.size(0) == s.N && offset_mask.size(1) == s.Ho && offset_mask.size(2) == s.Wo &&
                  offset_mask.size(3) >= s.G * s.P * 3 && offset_mask.size(3) <= std::numeric_limits<int32_t>::max(),
              "DCNv4: offset_mask must have shape (", s.N, ", ", s.Ho, ", ", s.Wo, ", >= ", s.G * s.P * 3, "), got ",
              offset_mask.sizes());
  return s;
}

// The backward's grad_output: on the input's device, shaped like the forward's output.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const Shape& s,
                              const char* op = "DCNv3") {
  TORCH_CHECK(grad_output.device() == input.device(), op, ": grad_output must be on the input's device (",
              input.device(), "), got ", grad_output.device());
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == s.N && grad_output.size(1) == s.Ho &&
                  grad_output.size(2) == s.Wo && grad_output.size(3) == s.C,
              op, ": grad_output must have shape (", s.N, ", ", s.Ho, ", ", s.Wo, ", ", s.C, "), got ",
              grad_output.sizes());
}

}  // namespace internimage_dcnv3
