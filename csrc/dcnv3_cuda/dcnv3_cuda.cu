// DCNv3 and DCNv4 CUDA kernels (one kernel body for both ops, as on the CPU).
//
// Work item = one (output pixel, group). A thread group of TPG lanes (4..32, a power of two inside one warp) owns
// an item: for each chunk of TPG sampling points, lane q computes point q's location, corners and mask from the
// offsets/masks (read once per (pixel, group, point)) with the shared math of dcnv3_common/dcnv3_math.h, and the
// group broadcasts it with warp shuffles; every lane then handles channels lane, lane + TPG, ... of the group, so
// each corner read is a contiguous run of channels. Accumulation is in float32 (float64 for double inputs).
// Backward: the lanes' partial gradients of each point are summed with warp shuffles and written once (no atomics
// for offset and mask); grad_input is scattered with atomicAdd into a float32 (float64) buffer. Indexing is 64-bit
// and any shape and batch size works: blocks are per image (grid y, stride loop over images) and stride over that
// image's Ho * Wo * G items (grid x), so no block mixes images and there is no shape table or shape assumption.
//
// DCNv4 (kPixel = true) differs only in where offsets and masks are read (one packed offset_mask tensor, through the
// strides in Params, as on the CPU) and in the coordinates (pixel_base / pixel_coord instead of sampling_base /
// padded_coord); its weights are used as they are. These kernels are compiled (nvcc) but were not run by the
// DCNv4 change: the machine it was written on has no GPU (see csrc/README.md).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "dcnv3_common/dcnv3_args.h"
#include "dcnv3_common/dcnv3_math.h"
#include "torch_binding.h"

namespace internimage_dcnv3 {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename S>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

struct Params {
  int64_t N, H, W, C, G, Cg, Ho, Wo, P;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool remove_center;
  float offset_scale_f32;  // the fixed part of the location is formed with the float32 scale (both ops)
  double offset_scale;     // ... the learned offsets with this one (DCNv4: the same float32 value)
  // (pixel pix, group g)'s offsets start at offset[pix * offset_pixel + g * offset_group], its masks at
  // mask[pix * mask_pixel + g * mask_group]; gradients go to the same places (see Problem in dcnv3_cpu_kernel.h).
  int64_t offset_pixel, offset_group, mask_pixel, mask_group;
};

// One sampling point of an item, as broadcast to the item's lanes: its corners (Corners::flags says which lie
// inside the image; none when the point is far outside) and its mask.
template <typename A>
struct Point {
  int x0, y0, flags;
  A fx, fy, m;
};

template <typename S, typename A, bool kPixel>
__device__ __forceinline__ Point<A> compute_point(const Params& pr, const S* __restrict__ off,
                                                  const S* __restrict__ msk, int64_t ho, int64_t wo, int p) {
  int tap_x, tap_y;
  point_taps(p, pr.kernel_h, pr.kernel_w, pr.remove_center, tap_x, tap_y);
  const A scale = static_cast<A>(pr.offset_scale);
  Corners<A> c;
  if constexpr (kPixel) {  // DCNv4: pixels of the unpadded image, formed in A
    const A bx = pixel_base<A>(wo, tap_x, pr.kernel_w, pr.stride_w, pr.pad_w, pr.dilation_w, pr.offset_scale_f32);
    const A by = pixel_base<A>(ho, tap_y, pr.kernel_h, pr.stride_h, pr.pad_h, pr.dilation_h, pr.offset_scale_f32);
    const A u = pixel_coord<A>(bx, static_cast<A>(off[2 * p]), scale);
    const A v = pixel_coord<A>(by, static_cast<A>(off[2 * p + 1]), scale);
    locate<A>(u, v, 0, 0, pr.W, pr.H, c);
  } else {  // DCNv3: the official float32 normalised grid
    const int64_t w_pad = pr.W + 2 * pr.pad_w;
    const int64_t h_pad = pr.H + 2 * pr.pad_h;
    const float bx = sampling_base(wo, tap_x, pr.kernel_w, pr.stride_w, pr.dilation_w, w_pad, pr.offset_scale_f32);
    const float by = sampling_base(ho, tap_y, pr.kernel_h, pr.stride_h, pr.dilation_h, h_pad, pr.offset_scale_f32);
    const A u = padded_coord<A>(bx, static_cast<A>(off[2 * p]), scale, static_cast<A>(w_pad));
    const A v = padded_coord<A>(by, static_cast<A>(off[2 * p + 1]), scale, static_cast<A>(h_pad));
    locate<A>(u, v, pr.pad_w, pr.pad_h, pr.W, pr.H, c);
  }
  Point<A> pt;
  pt.x0 = c.x0;
  pt.y0 = c.y0;
  pt.flags = c.flags;
  pt.fx = c.fx;
  pt.fy = c.fy;
  pt.m = static_cast<A>(msk[p]);
  return pt;
}

template <typename A, int TPG>
__device__ __forceinline__ Point<A> broadcast(const Point<A>& pt, int src) {
  Point<A> b;
  b.x0 = __shfl_sync(kFullMask, pt.x0, src, TPG);
  b.y0 = __shfl_sync(kFullMask, pt.y0, src, TPG);
  b.flags = __shfl_sync(kFullMask, pt.flags, src, TPG);
  b.fx = __shfl_sync(kFullMask, pt.fx, src, TPG);
  b.fy = __shfl_sync(kFullMask, pt.fy, src, TPG);
  b.m = __shfl_sync(kFullMask, pt.m, src, TPG);
  return b;
}

template <typename A>
__device__ __forceinline__ Corners<A> corners_of(const Point<A>& pt) {
  Corners<A> c;
  c.x0 = pt.x0;
  c.y0 = pt.y0;
  c.flags = pt.flags;
  c.fx = pt.fx;
  c.fy = pt.fy;
  return c;
}

template <typename A, int TPG>
__device__ __forceinline__ A group_sum(A v) {
#pragma unroll
  for (int s = TPG / 2; s > 0; s /= 2) v += __shfl_xor_sync(kFullMask, v, s, TPG);
  return v;
}

// Decompose item `item` (in [0, Ho * Wo * G)) of image n into (pixel, group, n, ho, wo); pix counts over the batch.
struct ItemIndex {
  int64_t pix, g, n, ho, wo;
};
__device__ __forceinline__ ItemIndex item_index(const Params& pr, int64_t n, int64_t item) {
  ItemIndex ix;
  ix.g = item % pr.G;
  const int64_t hw = item / pr.G;
  ix.wo = hw % pr.Wo;
  ix.ho = hw / pr.Wo;
  ix.n = n;
  ix.pix = n * pr.Ho * pr.Wo + hw;
  return ix;
}

// items: Ho * Wo * G, the items of one image.
template <typename S, int TPG, bool kPixel>
__global__ void __launch_bounds__(kThreads)
    dcnv3_forward_kernel(const Params pr, const S* __restrict__ input, const S* __restrict__ offset,
                         const S* __restrict__ mask, S* __restrict__ output, const int64_t items) {
  using A = typename Acc<S>::type;
  constexpr int kItemsPerBlock = kThreads / TPG;
  const int lane = threadIdx.x % TPG;
  const int local = threadIdx.x / TPG;
  // Block-uniform loop bounds: every lane of a warp runs the same iterations, as the shuffles require.
  for (int64_t n = blockIdx.y; n < pr.N; n += gridDim.y)
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock; first < items;
       first += static_cast<int64_t>(gridDim.x) * kItemsPerBlock) {
    const bool active = first + local < items;
    const ItemIndex ix = item_index(pr, n, active ? first + local : items - 1);
    const S* off = offset + ix.pix * pr.offset_pixel + ix.g * pr.offset_group;
    const S* msk = mask + ix.pix * pr.mask_pixel + ix.g * pr.mask_group;
    const S* image = input + ix.n * pr.H * pr.W * pr.C + ix.g * pr.Cg;
    for (int64_t c0 = 0; c0 < pr.Cg; c0 += TPG) {
      const int64_t c = c0 + lane;
      const bool has_channel = c < pr.Cg;
      A acc = A(0);
      for (int p0 = 0; p0 < pr.P; p0 += TPG) {
        Point<A> mine;
        mine.x0 = mine.y0 = mine.flags = 0;
        mine.fx = mine.fy = mine.m = A(0);
        if (p0 + lane < pr.P) mine = compute_point<S, A, kPixel>(pr, off, msk, ix.ho, ix.wo, p0 + lane);
        const int count = min(TPG, static_cast<int>(pr.P - p0));
        for (int j = 0; j < count; ++j) {
          const Point<A> pt = broadcast<A, TPG>(mine, j);
          const Corners<A> cr = corners_of(pt);
          if (!has_channel) continue;
          // A point with no corner inside the image still goes through mask * sample (sample 0), and a point at a
          // non-finite location has NaN weights (see locate): sample starts at w - w, 0 or NaN. Non-finite masks
          // and offsets then give non-finite outputs, as in the reference.
          A w[4];
          bilinear_weights<A>(cr, w);
          A sample = w[0] - w[0];
          if (cr.any_valid()) {
#pragma unroll
            for (int k = 0; k < 4; ++k)
              if (cr.valid(k)) sample += w[k] * static_cast<A>(image[cr.pixel(k, pr.W) * pr.C + c]);
          }
          acc += pt.m * sample;
        }
      }
      if (active && has_channel) output[ix.pix * pr.C + ix.g * pr.Cg + c] = static_cast<S>(acc);
    }
  }
}

template <typename S, int TPG, bool kPixel>
__global__ void __launch_bounds__(kThreads)
    dcnv3_backward_kernel(const Params pr, const S* __restrict__ grad_output, const S* __restrict__ input,
                          const S* __restrict__ offset, const S* __restrict__ mask,
                          typename Acc<S>::type* __restrict__ grad_input, S* __restrict__ grad_offset,
                          S* __restrict__ grad_mask, const int64_t items) {
  using A = typename Acc<S>::type;
  constexpr int kItemsPerBlock = kThreads / TPG;
  const int lane = threadIdx.x % TPG;
  const int local = threadIdx.x / TPG;
  const A scale = static_cast<A>(pr.offset_scale);
  for (int64_t n = blockIdx.y; n < pr.N; n += gridDim.y)
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock; first < items;
       first += static_cast<int64_t>(gridDim.x) * kItemsPerBlock) {
    const bool active = first + local < items;
    const ItemIndex ix = item_index(pr, n, active ? first + local : items - 1);
    const int64_t off0 = ix.pix * pr.offset_pixel + ix.g * pr.offset_group;
    const int64_t msk0 = ix.pix * pr.mask_pixel + ix.g * pr.mask_group;
    const S* off = offset + off0;
    const S* msk = mask + msk0;
    const int64_t image_offset = ix.n * pr.H * pr.W * pr.C + ix.g * pr.Cg;
    const S* image = input + image_offset;
    A* grad_image = grad_input + image_offset;
    const S* go = grad_output + ix.pix * pr.C + ix.g * pr.Cg;
    for (int p0 = 0; p0 < pr.P; p0 += TPG) {
      Point<A> mine;
      mine.x0 = mine.y0 = mine.flags = 0;
      mine.fx = mine.fy = mine.m = A(0);
      if (p0 + lane < pr.P) mine = compute_point<S, A, kPixel>(pr, off, msk, ix.ho, ix.wo, p0 + lane);
      const int count = min(TPG, static_cast<int>(pr.P - p0));
      for (int j = 0; j < count; ++j) {
        const Point<A> pt = broadcast<A, TPG>(mine, j);
        const int64_t ko = off0 + 2 * (p0 + j);  // where the point's (dx, dy) and mask gradients go
        const int64_t km = msk0 + p0 + j;
        const Corners<A> cr = corners_of(pt);
        // Points outside the image have zero gradients, unless their location is not finite (NaN fx, see locate):
        // those go on and get NaN gradients, as on the CPU. (Uniform over the item's lanes.)
        if (!cr.any_valid() && cr.fx == cr.fx) {
          if (active && lane == 0) {
            grad_mask[km] = static_cast<S>(A(0));
            grad_offset[ko] = static_cast<S>(A(0));
            grad_offset[ko + 1] = static_cast<S>(A(0));
          }
          continue;
        }
        A w[4], du[4], dv[4];
        bilinear_weights<A>(cr, w);
        bilinear_derivatives<A>(cr, du, dv);
        A dot[4] = {A(0), A(0), A(0), A(0)};
        for (int64_t c = lane; c < pr.Cg; c += TPG) {
          const A g = static_cast<A>(go[c]);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (!cr.valid(q)) continue;
            const int64_t at = cr.pixel(q, pr.W) * pr.C + c;
            dot[q] += g * static_cast<A>(image[at]);
            if (active) atomicAdd(grad_image + at, g * pt.m * w[q]);
          }
        }
        A gm, gx, gy;  // this lane's share; point_gradients is linear in dot
        point_gradients<A>(w, du, dv, dot, pt.m, scale, gm, gx, gy);
        gm = group_sum<A, TPG>(gm);
        gx = group_sum<A, TPG>(gx);
        gy = group_sum<A, TPG>(gy);
        if (active && lane == 0) {
          grad_mask[km] = static_cast<S>(gm);
          grad_offset[ko] = static_cast<S>(gx);
          grad_offset[ko + 1] = static_cast<S>(gy);
        }
      }
    }
  }
}

// om_channels < 0: DCNv3's dense offset and mask tensors; else DCNv4's packed offset_mask with that many channels.
Params make_params(const Shape& s, int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                   int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, double offset_scale,
                   int64_t remove_center, int64_t om_channels = -1) {
  Params pr;
  pr.N = s.N;
  pr.H = s.H;
  pr.W = s.W;
  pr.C = s.C;
  pr.G = s.G;
  pr.Cg = s.Cg;
  pr.Ho = s.Ho;
  pr.Wo = s.Wo;
  pr.P = s.P;
  pr.kernel_h = static_cast<int>(kernel_h);
  pr.kernel_w = static_cast<int>(kernel_w);
  pr.stride_h = static_cast<int>(stride_h);
  pr.stride_w = static_cast<int>(stride_w);
  pr.pad_h = static_cast<int>(pad_h);
  pr.pad_w = static_cast<int>(pad_w);
  pr.dilation_h = static_cast<int>(dilation_h);
  pr.dilation_w = static_cast<int>(dilation_w);
  pr.remove_center = remove_center != 0;
  pr.offset_scale_f32 = static_cast<float>(offset_scale);
  pr.offset_scale = om_channels < 0 ? offset_scale : dcnv4_offset_scale(offset_scale);
  if (om_channels < 0) {
    pr.offset_pixel = s.G * s.P * 2;
    pr.offset_group = s.P * 2;
    pr.mask_pixel = s.G * s.P;
    pr.mask_group = s.P;
  } else {
    pr.offset_pixel = pr.mask_pixel = om_channels;
    pr.offset_group = pr.mask_group = 3 * s.P;
  }
  return pr;
}

int lanes_for(int64_t group_channels) {
  int tpg = 4;
  while (tpg < 32 && tpg < group_channels) tpg *= 2;
  return tpg;
}

// Blocks: x over one image's items (the kernels stride over the rest), y over the images (likewise). N >= 1.
dim3 grid_for(int64_t items_per_image, int64_t images, int tpg) {
  const int64_t per_block = kThreads / tpg;
  const int64_t x = std::max<int64_t>(1, std::min<int64_t>((items_per_image + per_block - 1) / per_block, INT_MAX));
  const int64_t y = std::max<int64_t>(1, std::min<int64_t>(images, 65535));
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
}

#define DCNV3_SWITCH_LANES(TPG_VALUE, ...)          \
  switch (TPG_VALUE) {                              \
    case 4: {                                       \
      constexpr int TPG = 4;                        \
      __VA_ARGS__();                                \
      break;                                        \
    }                                               \
    case 8: {                                       \
      constexpr int TPG = 8;                        \
      __VA_ARGS__();                                \
      break;                                        \
    }                                               \
    case 16: {                                      \
      constexpr int TPG = 16;                       \
      __VA_ARGS__();                                \
      break;                                        \
    }                                               \
    default: {                                      \
      constexpr int TPG = 32;                       \
      __VA_ARGS__();                                \
      break;                                        \
    }                                               \
  }

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "DCNv3 CUDA kernel: ", name, " must be a CUDA tensor");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kDouble || dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "DCNv3 CUDA kernel supports float64, float32, float16 and bfloat16, got ", dt);
}

// The fused mask softmax (mask_softmax=true) is not in the CUDA kernels yet: the entry points apply the softmax over
// each (pixel, group)'s P logits before the kernels and its gradient after them (float32 math for half types).
at::Tensor point_softmax(const at::Tensor& logits, const Shape& s) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::softmax(logits.view({s.N, s.Ho, s.Wo, s.G, s.P}), -1, acc)
      .to(logits.scalar_type())
      .view(logits.sizes())
      .contiguous();
}

at::Tensor point_softmax_backward(const at::Tensor& grad_probs, const at::Tensor& probs, const Shape& s) {
  const auto acc = probs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor p = probs.view({s.N, s.Ho, s.Wo, s.G, s.P}).to(acc);
  const at::Tensor g = grad_probs.view({s.N, s.Ho, s.Wo, s.G, s.P}).to(acc);
  return (p * (g - (p * g).sum(-1, true))).to(probs.scalar_type()).view(probs.sizes());
}

// One launch of either op (kPixel: DCNv4). The masks start mask_start elements into `mask` (DCNv4: offset and mask
// are the same packed tensor, its masks 2P channels in); grad_offset / grad_mask likewise. Needs N * Ho * Wo >= 1.
template <bool kPixel>
void launch_forward(const Params& pr, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                    int64_t mask_start, at::Tensor& output) {
  const int64_t items = pr.Ho * pr.Wo * pr.G;
  const int tpg = lanes_for(pr.Cg);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_forward_cuda", [&] {
    DCNV3_SWITCH_LANES(tpg, [&] {
      dcnv3_forward_kernel<scalar_t, TPG, kPixel><<<grid_for(items, pr.N, TPG), kThreads, 0, stream>>>(
          pr, input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
          mask.const_data_ptr<scalar_t>() + mask_start, output.mutable_data_ptr<scalar_t>(), items);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <bool kPixel>
void launch_backward(const Params& pr, const at::Tensor& grad_output, const at::Tensor& input,
                     const at::Tensor& offset, const at::Tensor& mask, int64_t mask_start, at::Tensor& grad_acc,
                     at::Tensor& grad_offset, at::Tensor& grad_mask) {
  const int64_t items = pr.Ho * pr.Wo * pr.G;
  const int tpg = lanes_for(pr.Cg);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_backward_cuda", [&] {
    using acc_type = typename Acc<scalar_t>::type;
    DCNV3_SWITCH_LANES(tpg, [&] {
      dcnv3_backward_kernel<scalar_t, TPG, kPixel><<<grid_for(items, pr.N, TPG), kThreads, 0, stream>>>(
          pr, grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
          offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>() + mask_start,
          grad_acc.mutable_data_ptr<acc_type>(), grad_offset.mutable_data_ptr<scalar_t>(),
          grad_mask.mutable_data_ptr<scalar_t>() + mask_start, items);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace gpu
}  // namespace internimage_dcnv3

using namespace internimage_dcnv3;

at::Tensor dcnv3_forward_cuda(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
                              int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                              int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                              int64_t group_channels, double offset_scale, int64_t remove_center,
                              bool mask_softmax) {
  const Shape s = check_args(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                             dilation_h, dilation_w, group, group_channels, remove_center, offset_scale);
  gpu::check_cuda(input_, "input");
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_softmax ? gpu::point_softmax(mask_.contiguous(), s) : mask_.contiguous();
  at::Tensor output = at::empty({s.N, s.Ho, s.Wo, s.C}, input.options());
  if (output.numel() == 0) return output;
  const gpu::Params pr = gpu::make_params(s, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                            dilation_w, offset_scale, remove_center);
  gpu::launch_forward<false>(pr, input, offset, mask, 0, output);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
    int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
    int64_t remove_center, bool mask_softmax) {
  const Shape s = check_args(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                             dilation_h, dilation_w, group, group_channels, remove_center, offset_scale);
  gpu::check_cuda(input_, "input");
  check_grad_output(grad_output_, input_, s);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor grad_output = grad_output_.to(input_.scalar_type()).contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_softmax ? gpu::point_softmax(mask_.contiguous(), s) : mask_.contiguous();
  const bool wide = input.scalar_type() == at::kDouble || input.scalar_type() == at::kFloat;
  // grad_input accumulates with atomics in float32 (float64 for double), then is cast to the input dtype.
  at::Tensor grad_acc = at::zeros(input.sizes(), input.options().dtype(wide ? input.scalar_type() : at::kFloat));
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = at::empty_like(mask);
  if (grad_output.numel() > 0) {
    const gpu::Params pr = gpu::make_params(s, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                              dilation_w, offset_scale, remove_center);
    gpu::launch_backward<false>(pr, grad_output, input, offset, mask, 0, grad_acc, grad_offset, grad_mask);
  } else {
    grad_offset.zero_();
    grad_mask.zero_();
  }
  at::Tensor grad_input = wide ? grad_acc : grad_acc.to(input.scalar_type());
  if (mask_softmax) grad_mask = gpu::point_softmax_backward(grad_mask, mask, s);
  return {grad_input, grad_offset, grad_mask};
}

at::Tensor dcnv4_forward_cuda(const at::Tensor& input_, const at::Tensor& offset_mask_, int64_t kernel_h,
                              int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                              int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                              double offset_scale, int64_t remove_center) {
  const Shape s = check_args_v4(input_, offset_mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                dilation_h, dilation_w, group, group_channels, remove_center, offset_scale);
  gpu::check_cuda(input_, "input");
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset_mask = offset_mask_.contiguous();
  at::Tensor output = at::empty({s.N, s.Ho, s.Wo, s.C}, input.options());
  if (output.numel() == 0) return output;
  const gpu::Params pr = gpu::make_params(s, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                            dilation_w, offset_scale, remove_center, offset_mask.size(3));
  gpu::launch_forward<true>(pr, input, offset_mask, offset_mask, 2 * s.P, output);
  return output;
}

std::tuple<at::Tensor, at::Tensor> dcnv4_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& input_,
                                                       const at::Tensor& offset_mask_, int64_t kernel_h,
                                                       int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                                       int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                                       int64_t dilation_w, int64_t group, int64_t group_channels,
                                                       double offset_scale, int64_t remove_center) {
  const Shape s = check_args_v4(input_, offset_mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                dilation_h, dilation_w, group, group_channels, remove_center, offset_scale);
  gpu::check_cuda(input_, "input");
  check_grad_output(grad_output_, input_, s, "DCNv4");
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor grad_output = grad_output_.to(input_.scalar_type()).contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset_mask = offset_mask_.contiguous();
  const bool wide = input.scalar_type() == at::kDouble || input.scalar_type() == at::kFloat;
  at::Tensor grad_acc = at::zeros(input.sizes(), input.options().dtype(wide ? input.scalar_type() : at::kFloat));
  // Zeros: the padding channels past G * 3P are never written.
  at::Tensor grad_offset_mask = at::zeros_like(offset_mask);
  if (grad_output.numel() > 0) {
    const gpu::Params pr = gpu::make_params(s, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                              dilation_w, offset_scale, remove_center, offset_mask.size(3));
    gpu::launch_backward<true>(pr, grad_output, input, offset_mask, offset_mask, 2 * s.P, grad_acc,
                               grad_offset_mask, grad_offset_mask);
  }
  return {wide ? grad_acc : grad_acc.to(input.scalar_type()), grad_offset_mask};
}
