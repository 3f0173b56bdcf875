// Per-sample DCNv3 math, shared by the CPU and the CUDA kernels.
//
// Everything that decides *what* is computed lives here, once: the x-major kernel point order (with the optional
// removed centre), the fixed part of each sampling location (reference point + kernel grid * offset_scale, formed in
// float32 normalised coordinates exactly like the official PyTorch reference that produced the parity fixtures), the
// learned offset on top of it (offset * offset_scale), grid_sample's align_corners=False convention on the padded
// image, and the bilinear weights and their derivatives with out-of-image corners reading zero. The kernels only
// decide *how* it is scheduled (CPU: vector loops over a group's channels; CUDA: a thread group per (pixel, group)).
//
// Plain C++ (no torch headers), usable from host code and from CUDA device code.

#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DCNV3_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define DCNV3_HD inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define DCNV3_HD __forceinline
#else
#define DCNV3_HD inline
#endif

namespace internimage_dcnv3 {

// ---------------------------------------------------------------------------------------------------------------
// float32 arithmetic that must round after every operation (no fused multiply-add), so that the fixed part of the
// sampling location is bit-identical to the float32 tensor arithmetic of the reference on every backend.
// ---------------------------------------------------------------------------------------------------------------
DCNV3_HD float f32_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float product = a * b;  // a volatile store keeps the compiler from contracting it into a later add
  return product;
#endif
}

DCNV3_HD float f32_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DCNV3_HD float f32_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

#if defined(__CUDA_ARCH__)
DCNV3_HD float fma_t(float a, float b, float c) { return fmaf(a, b, c); }
DCNV3_HD double fma_t(double a, double b, double c) { return fma(a, b, c); }
#else
DCNV3_HD float fma_t(float a, float b, float c) { return std::fma(a, b, c); }
DCNV3_HD double fma_t(double a, double b, double c) { return std::fma(a, b, c); }
#endif

// floor() of |x| < 2^31 as an integer, through truncation: exact, and (unlike std::floor without
// -fno-trapping-math, or a conditional floating-point subtraction) it compiles to vector instructions on the CPU.
template <typename T>
DCNV3_HD int32_t floor_int(T x) {
  const int32_t t = static_cast<int32_t>(x);
  return t - static_cast<int32_t>(x < static_cast<T>(t));
}

// Output length of one spatial axis, as in a convolution: floor((size + 2 pad - footprint) / stride) + 1, the one
// C++ definition (CPU and CUDA entry points, through check_args). The division floors, as Python's // does in
// internimage_hf's `dcnv3_output_size` and the kernel package's fake implementation: an input smaller than the
// kernel footprint gives a length <= 0 (refused by check_args), never 1 (C++ division truncates towards zero).
// stride >= 1.
DCNV3_HD int64_t output_size(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t room = size + 2 * pad - (dilation * (kernel - 1) + 1);
  const int64_t steps = room >= 0 ? room / stride : -((-room + stride - 1) / stride);  // floor(room / stride)
  return steps + 1;
}

// Number of sampling points of one group.
DCNV3_HD int num_points(int kernel_h, int kernel_w, bool remove_center) {
  return kernel_h * kernel_w - (remove_center ? 1 : 0);
}

// Kernel point p -> (tap_x, tap_y). x-major: p = tap_x * kernel_h + tap_y (tap_x over the width is the outer loop);
// with remove_center the centre tap (kernel_w / 2, kernel_h / 2) is skipped and later points shift down by one.
DCNV3_HD void point_taps(int p, int kernel_h, int kernel_w, bool remove_center, int& tap_x, int& tap_y) {
  int q = p;
  if (remove_center && q >= (kernel_w / 2) * kernel_h + kernel_h / 2) ++q;
  tap_x = q / kernel_h;
  tap_y = q - tap_x * kernel_h;
}

// Fixed part of a sampling location along one axis, normalised by the padded size:
//   ref  = f32(f32(o * stride + (dilation * (kernel - 1)) // 2 + 0.5) / padded)
//   grid = f32(f32(tap * dilation - (dilation * (kernel - 1)) // 2) / padded)
//   base = f32(ref + f32(grid * f32(offset_scale)))
// i.e. the official reference's float32 reference points plus its float32 kernel grid times offset_scale.
DCNV3_HD float sampling_base(int64_t o, int tap, int kernel, int stride, int dilation, int64_t padded_size,
                             float offset_scale) {
  const int half = (dilation * (kernel - 1)) / 2;
  const float size = static_cast<float>(padded_size);
  const float ref =
      f32_div(f32_add(f32_mul(static_cast<float>(o), static_cast<float>(stride)), static_cast<float>(half) + 0.5f),
              size);
  const float grid = f32_div(
      f32_add(f32_mul(static_cast<float>(tap), static_cast<float>(dilation)), -static_cast<float>(half)), size);
  return f32_add(ref, f32_mul(grid, offset_scale));
}

// Sampling coordinate in pixels of the padded image (pixel centres at integers), in the compute type T:
//   loc = T(base) + offset * offset_scale / padded_size       (normalised location, as in the reference)
//   u   = ((2 * loc - 1) + 1) * padded_size / 2 - 0.5         (grid_sample, align_corners=False)
// d u / d offset = offset_scale.
// The last step is one fused multiply-add, rounded once, as torch's vectorised CPU grid_sample computes it: when a
// sample sits exactly on a pixel row or column (zero offsets, offsets that are whole pixels in bfloat16) the kink of
// the bilinear interpolation then falls on the same side as in the reference, and so do the gradients.
// (base may come in a wider type that holds the float32 value exactly: the CPU kernel keeps its tables in T.)
template <typename T, typename B>
DCNV3_HD T padded_coord(B base, T offset, T offset_scale, T padded_size) {
  const T loc = static_cast<T>(base) + offset * offset_scale / padded_size;
  const T grid = loc * T(2) - T(1);
  return fma_t(grid + T(1), padded_size * T(0.5), T(-0.5));
}

// DCNv4: the fixed part of a sampling location along one axis, in pixels of the unpadded image (pixel centres at
// integers), formed in the compute type T like the official DCNv4 kernel does (not in DCNv3's float32 grid):
//   base = (o * stride + e - pad - e * s) + tap * dilation * s,   e = (dilation * (kernel - 1)) >> 1,
// s = offset_scale rounded to float32 (the official kernel takes a C++ float).
template <typename T>
DCNV3_HD T pixel_base(int64_t o, int tap, int kernel, int stride, int pad, int dilation, float offset_scale) {
  const int e = (dilation * (kernel - 1)) >> 1;
  const T s = static_cast<T>(offset_scale);
  const T start = static_cast<T>(o * stride + e - pad) - static_cast<T>(e) * s;
  return start + static_cast<T>(tap * dilation) * s;
}

// DCNv4's offset_scale: rounded to float32 everywhere (table and learned offsets), as the official kernel takes a
// C++ float. (DCNv3 uses it unrounded on the offsets, as its reference does.)
DCNV3_HD double dcnv4_offset_scale(double offset_scale) { return static_cast<double>(static_cast<float>(offset_scale)); }

// DCNv4: sampling coordinate in pixels of the unpadded image: base + offset * s (d / d offset = offset_scale, as for
// DCNv3's padded_coord). The kernels locate it with zero padding.
template <typename T>
DCNV3_HD T pixel_coord(T base, T offset, T offset_scale) {
  return fma_t(offset, offset_scale, base);
}

// The 2x2 neighbourhood of a sampling point. Corner k: x = x0 + (k & 1), y = y0 + (k >> 1), in unpadded input
// coordinates; corners outside the image read as zero. `flags` says which columns / rows lie inside the image:
// bit 0: x0, bit 1: x0 + 1, bit 2: y0, bit 3: y0 + 1 (so kAllValid = every corner inside).
template <typename T>
struct Corners {
  int32_t x0, y0;
  int32_t flags;
  T fx, fy;  // position inside the cell, in [0, 1)

  static constexpr int32_t kAllValid = 15;
  DCNV3_HD bool vx0() const { return flags & 1; }
  DCNV3_HD bool vx1() const { return (flags >> 1) & 1; }
  DCNV3_HD bool vy0() const { return (flags >> 2) & 1; }
  DCNV3_HD bool vy1() const { return (flags >> 3) & 1; }
  DCNV3_HD bool any_valid() const { return (flags & 3) && (flags & 12); }
  DCNV3_HD bool valid(int k) const { return ((flags >> (k & 1)) & 1) && ((flags >> (2 + (k >> 1))) & 1); }
  // Pixel index (y * W + x) of corner k; only meaningful when valid(k).
  DCNV3_HD int64_t pixel(int k, int64_t width) const {
    return (static_cast<int64_t>(y0) + (k >> 1)) * width + x0 + (k & 1);
  }
};

// Locate padded coordinates (u, v) in an H x W image padded by (pad_h, pad_w); per-corner bounds as grid_sample's.
// Branch-free (the CPU kernel runs it as a vector loop over many points): coordinates farther out than one pixel
// beyond the image, and NaN, are first clamped to two pixels outside, which leaves every corner outside as before
// and keeps the float -> int conversion in range for arbitrarily large offsets. Spatial sizes are < 2^29.
// A non-finite coordinate (NaN or infinite offsets) gives NaN fx and fy, hence NaN bilinear weights for all four
// corners (flag_bit * NaN is NaN): the point's sample is NaN, as grid_sample's is in the reference, instead of the
// zero of a point outside the image. The kernels must therefore apply the weights of every point, inside or not.
template <typename T>
DCNV3_HD void locate(T u, T v, int64_t pad_w, int64_t pad_h, int64_t width, int64_t height, Corners<T>& c) {
  const T poison = (u - u) + (v - v);  // 0, or NaN if u or v is NaN or infinite (two subtractions, no branch)
  const T u_lo = T(pad_w - 2), u_hi = T(pad_w + width + 1);
  const T v_lo = T(pad_h - 2), v_hi = T(pad_h + height + 1);
  u = u >= u_lo ? u : u_lo;  // NaN compares false: clamped too
  u = u <= u_hi ? u : u_hi;
  v = v >= v_lo ? v : v_lo;
  v = v <= v_hi ? v : v_hi;
  const int32_t xf = floor_int(u);
  const int32_t yf = floor_int(v);
  c.fx = (u - static_cast<T>(xf)) + poison;
  c.fy = (v - static_cast<T>(yf)) + poison;
  c.x0 = xf - static_cast<int32_t>(pad_w);
  c.y0 = yf - static_cast<int32_t>(pad_h);
  const int32_t w = static_cast<int32_t>(width), h = static_cast<int32_t>(height);
  // Bitwise (not short-circuit) logic, so that no branch is generated.
  const int32_t vx0 = static_cast<int32_t>(c.x0 >= 0) & static_cast<int32_t>(c.x0 < w);
  const int32_t vx1 = static_cast<int32_t>(c.x0 >= -1) & static_cast<int32_t>(c.x0 + 1 < w);
  const int32_t vy0 = static_cast<int32_t>(c.y0 >= 0) & static_cast<int32_t>(c.y0 < h);
  const int32_t vy1 = static_cast<int32_t>(c.y0 >= -1) & static_cast<int32_t>(c.y0 + 1 < h);
  c.flags = vx0 | (vx1 << 1) | (vy0 << 2) | (vy1 << 3);
}

// A corner coordinate clamped into [0, size): the CPU kernel reads every corner from a clamped address (always
// inside the image) and discards out-of-image corners with the flags, so that it needs no branches.
DCNV3_HD int32_t clamp_index(int32_t i, int32_t size) {
  i = i < size ? i : size - 1;
  return i > 0 ? i : 0;
}

// Bilinear weights of the four corners, zero for corners outside the image. (Arithmetic on the validity bits rather
// than selects, so that the CPU location pass vectorises; fx and fy are finite, so 0 * x is 0, except for a
// non-finite location, whose weights are then all NaN on purpose: see locate.)
template <typename T>
DCNV3_HD T flag_bit(int32_t flags, int bit) {
  return static_cast<T>((flags >> bit) & 1);
}

template <typename T>
DCNV3_HD void bilinear_weights(const Corners<T>& c, T w[4]) {
  const T ax0 = flag_bit<T>(c.flags, 0) * (T(1) - c.fx);
  const T ax1 = flag_bit<T>(c.flags, 1) * c.fx;
  const T ay0 = flag_bit<T>(c.flags, 2) * (T(1) - c.fy);
  const T ay1 = flag_bit<T>(c.flags, 3) * c.fy;
  w[0] = ay0 * ax0;
  w[1] = ay0 * ax1;
  w[2] = ay1 * ax0;
  w[3] = ay1 * ax1;
}

// d(sample)/du and d(sample)/dv as coefficients of the four corner values (zero for corners outside the image):
// sample = sum_k w[k] * value[k], d sample / du = sum_k du[k] * value[k], d sample / dv = sum_k dv[k] * value[k].
template <typename T>
DCNV3_HD void bilinear_derivatives(const Corners<T>& c, T du[4], T dv[4]) {
  const T bx0 = flag_bit<T>(c.flags, 0), bx1 = flag_bit<T>(c.flags, 1);
  const T by0 = flag_bit<T>(c.flags, 2), by1 = flag_bit<T>(c.flags, 3);
  const T ax0 = bx0 * (T(1) - c.fx), ax1 = bx1 * c.fx;
  const T ay0 = by0 * (T(1) - c.fy), ay1 = by1 * c.fy;
  du[0] = -ay0 * bx0;
  du[1] = ay0 * bx1;
  du[2] = -ay1 * bx0;
  du[3] = ay1 * bx1;
  dv[0] = -by0 * ax0;
  dv[1] = -by0 * ax1;
  dv[2] = by1 * ax0;
  dv[3] = by1 * ax1;
}

// Gradients of one sampling point from the four dot products dot[k] = sum_c grad_out[c] * value[k][c]:
//   d L / d mask     = sum_k w[k] * dot[k]
//   d L / d offset_x = mask * sum_k du[k] * dot[k] * offset_scale     (d u / d offset_x = offset_scale)
//   d L / d offset_y = mask * sum_k dv[k] * dot[k] * offset_scale
template <typename T>
DCNV3_HD void point_gradients(const T w[4], const T du[4], const T dv[4], const T dot[4], T m, T offset_scale,
                              T& grad_mask, T& grad_offset_x, T& grad_offset_y) {
  T gm = T(0), gu = T(0), gv = T(0);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < 4; ++k) {
    gm += w[k] * dot[k];
    gu += du[k] * dot[k];
    gv += dv[k] * dot[k];
  }
  grad_mask = gm;
  grad_offset_x = m * gu * offset_scale;
  grad_offset_y = m * gv * offset_scale;
}

}  // namespace internimage_dcnv3
