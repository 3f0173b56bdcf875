// DCNv3 CPU entry points: argument checks, output allocation, threading (at::parallel_for) and the choice between
// instruction-set variants of the kernels in dcnv3_cpu_kernel.h.
//
// Forward: parallel over output pixels; each pixel reads its offsets and masks once and accumulates every group's
//   channels with vector loops.
// Backward: parallel over (image, group[, pixel slice]) tasks. A task owns the channels of its group in grad_input,
//   so no two threads ever add into the same element: no atomics, and the summation order is fixed. When there are
//   fewer (image, group) pairs than threads, each pair's pixels are cut into slices that accumulate into separate
//   buffers, summed afterwards in a fixed order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "dcnv3_common/dcnv3_args.h"
#include "dcnv3_cpu/dcnv3_cpu_kernel.h"
#include "torch_binding.h"

namespace internimage_dcnv3 {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Instruction-set variants. The kernels are force-inlined into wrappers compiled for each target, so one build runs
// well on any x86-64 CPU without -march flags (the portable variant is the fallback).
// ---------------------------------------------------------------------------------------------------------------
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(DCNV3_NO_ISA_DISPATCH)
#define DCNV3_X86_VARIANTS 1
#define DCNV3_TARGET_AVX2 __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define DCNV3_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define DCNV3_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#endif
#else
#define DCNV3_X86_VARIANTS 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DCNV3_NOINLINE __attribute__((noinline))
#else
#define DCNV3_NOINLINE
#endif

template <typename S>
using ForwardFn = void (*)(const Problem&, const S*, const S*, const S*, S*, acc_t<S>*, acc_t<S>*, S*,
                           const Points<acc_t<S>>&, int64_t, int64_t);
template <typename S>
using BackwardFn = void (*)(const Problem&, const S*, const S*, const S*, const S*, acc_t<S>*, S*, S*,
                            const RunScratch<S>&, int64_t, int64_t, int64_t, int64_t);

// kPixel: DCNv4's coordinates (see locate_points); the DCNv3 instantiations (kPixel = false) are the kernels as before.
#define DCNV3_DEFINE_VARIANT(NS, TARGET, VB)                                                                      \
  namespace NS {                                                                                                \
  template <typename S, int CG, bool kPixel>                                                                    \
  TARGET DCNV3_NOINLINE void forward(const Problem& pb, const S* input, const S* offset, const S* mask,        \
                                     S* output, acc_t<S>* scratch, acc_t<S>* probs, S* gathered,                \
                                     const Points<acc_t<S>>& pts, int64_t begin, int64_t end) {                 \
    forward_pixels<S, CG, VB, kPixel>(pb, input, offset, mask, output, scratch, probs, gathered, pts, begin,     \
                                      end);                                                                     \
  }                                                                                                             \
  template <typename S, int CG, bool kPixel>                                                                    \
  TARGET DCNV3_NOINLINE void backward(const Problem& pb, const S* grad_output, const S* input, const S* offset, \
                                      const S* mask, acc_t<S>* grad_input, S* grad_offset, S* grad_mask,        \
                                      const RunScratch<S>& rs, int64_t n, int64_t g, int64_t begin,             \
                                      int64_t end) {                                                            \
    backward_task<S, CG, VB, kPixel>(pb, grad_output, input, offset, mask, grad_input, grad_offset, grad_mask,  \
                                     rs, n, g, begin, end);                                                     \
  }                                                                                                             \
  template <typename S, bool kPixel>                                                                            \
  ForwardFn<S> pick_forward(int64_t cg) {                                                                       \
    if (cg == 16) return &forward<S, 16, kPixel>;                                                               \
    if (cg == 32) return &forward<S, 32, kPixel>;                                                               \
    return &forward<S, 0, kPixel>;                                                                              \
  }                                                                                                             \
  template <typename S, bool kPixel>                                                                            \
  BackwardFn<S> pick_backward(int64_t cg) {                                                                     \
    if (cg == 16) return &backward<S, 16, kPixel>;                                                              \
    if (cg == 32) return &backward<S, 32, kPixel>;                                                              \
    return &backward<S, 0, kPixel>;                                                                             \
  }                                                                                                             \
  }

DCNV3_DEFINE_VARIANT(portable, , 16)
#if DCNV3_X86_VARIANTS
DCNV3_DEFINE_VARIANT(avx2, DCNV3_TARGET_AVX2, 32)
DCNV3_DEFINE_VARIANT(avx512, DCNV3_TARGET_AVX512, 64)
#endif

int detect_isa() {
#if DCNV3_X86_VARIANTS
  __builtin_cpu_init();
  int level = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = 1;
  if (level == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    level = 2;
  // Honour torch's own switch for capping the CPU capability.
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string cap(env);
    if (cap == "default") level = 0;
    else if (cap == "avx2") level = std::min(level, 1);
  }
  return level;
#else
  return 0;
#endif
}

int supported_isa() {
  static const int level = detect_isa();
  return level;
}

std::atomic<int>& isa_in_use() {
  static std::atomic<int> level{supported_isa()};
  return level;
}

template <typename S, bool kPixel>
ForwardFn<S> forward_kernel(int64_t cg) {
#if DCNV3_X86_VARIANTS
  switch (isa_in_use().load()) {
    case 2:
      return avx512::pick_forward<S, kPixel>(cg);
    case 1:
      return avx2::pick_forward<S, kPixel>(cg);
    default:
      break;
  }
#endif
  return portable::pick_forward<S, kPixel>(cg);
}

template <typename S, bool kPixel>
BackwardFn<S> backward_kernel(int64_t cg) {
#if DCNV3_X86_VARIANTS
  switch (isa_in_use().load()) {
    case 2:
      return avx512::pick_backward<S, kPixel>(cg);
    case 1:
      return avx2::pick_backward<S, kPixel>(cg);
    default:
      break;
  }
#endif
  return portable::pick_backward<S, kPixel>(cg);
}

// The fixed part of every sampling location, in the accumulation type A: base_x (Wo, P), base_y (Ho, P), and the
// forward's tables base_x_groups (Wo, G, P) and base_y_groups (Ho, run, G, P) (see Problem).
template <typename A>
struct Bases {
  std::vector<A> x, y, x_groups, y_groups;
  int64_t run = 1;
};

// Pixels per forward location pass: enough points for long vector loops, few enough to stay in L1.
int64_t forward_run(const Shape& s) { return std::max<int64_t>(1, std::min<int64_t>(8, 256 / (s.G * s.P))); }

// The spatial parameters of one call (both ops).
struct Geometry {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  double offset_scale;
  bool remove_center;
};

// pixel = false: DCNv3's float32 normalised values (sampling_base; exact in A, so DCNv3 computes what it always
// did); pixel = true: DCNv4's pixel coordinates in A (pixel_base).
template <typename A>
void fill_bases(const Shape& s, const Geometry& geo, bool pixel, Bases<A>& bases) {
  std::vector<A>& base_x = bases.x;
  std::vector<A>& base_y = bases.y;
  const float scale = static_cast<float>(geo.offset_scale);
  const int kh = static_cast<int>(geo.kernel_h), kw = static_cast<int>(geo.kernel_w);
  const int sh = static_cast<int>(geo.stride_h), sw = static_cast<int>(geo.stride_w);
  const int dh = static_cast<int>(geo.dilation_h), dw = static_cast<int>(geo.dilation_w);
  base_x.resize(s.Wo * s.P);
  base_y.resize(s.Ho * s.P);
  for (int64_t p = 0; p < s.P; ++p) {
    int tap_x, tap_y;
    point_taps(static_cast<int>(p), kh, kw, geo.remove_center, tap_x, tap_y);
    for (int64_t wo = 0; wo < s.Wo; ++wo)
      base_x[wo * s.P + p] = pixel ? pixel_base<A>(wo, tap_x, kw, sw, static_cast<int>(geo.pad_w), dw, scale)
                                   : static_cast<A>(sampling_base(wo, tap_x, kw, sw, dw, s.W + 2 * geo.pad_w, scale));
    for (int64_t ho = 0; ho < s.Ho; ++ho)
      base_y[ho * s.P + p] = pixel ? pixel_base<A>(ho, tap_y, kh, sh, static_cast<int>(geo.pad_h), dh, scale)
                                   : static_cast<A>(sampling_base(ho, tap_y, kh, sh, dh, s.H + 2 * geo.pad_h, scale));
  }
  const int64_t gp = s.G * s.P;
  const int64_t run = bases.run = forward_run(s);
  bases.x_groups.resize(s.Wo * gp);
  bases.y_groups.resize(s.Ho * run * gp);
  for (int64_t g = 0; g < s.G; ++g)
    for (int64_t p = 0; p < s.P; ++p) {
      for (int64_t wo = 0; wo < s.Wo; ++wo) bases.x_groups[wo * gp + g * s.P + p] = base_x[wo * s.P + p];
      for (int64_t ho = 0; ho < s.Ho; ++ho)
        for (int64_t r = 0; r < run; ++r) bases.y_groups[(ho * run + r) * gp + g * s.P + p] = base_y[ho * s.P + p];
    }
}

// Where the offsets and masks are (see Problem): DCNv3's dense tensors, or DCNv4's packed offset_mask with
// `channels` channels per pixel.
struct Layout {
  int64_t offset_pixel, offset_group, mask_pixel, mask_group;
  bool dense;
};

Layout dense_layout(const Shape& s) { return {s.G * s.P * 2, s.P * 2, s.G * s.P, s.P, true}; }
Layout packed_layout(const Shape& s, int64_t channels) { return {channels, 3 * s.P, channels, 3 * s.P, false}; }

template <typename A>
Problem make_problem(const Shape& s, const Geometry& geo, bool mask_softmax, const Layout& layout,
                     const Bases<A>& bases) {
  Problem pb;
  pb.N = s.N;
  pb.H = s.H;
  pb.W = s.W;
  pb.C = s.C;
  pb.G = s.G;
  pb.Cg = s.Cg;
  pb.Ho = s.Ho;
  pb.Wo = s.Wo;
  pb.P = s.P;
  pb.pad_h = geo.pad_h;
  pb.pad_w = geo.pad_w;
  pb.offset_scale = geo.offset_scale;
  pb.offset_pixel = layout.offset_pixel;
  pb.offset_group = layout.offset_group;
  pb.mask_pixel = layout.mask_pixel;
  pb.mask_group = layout.mask_group;
  pb.dense = layout.dense;
  pb.base_x = bases.x.data();
  pb.base_y = bases.y.data();
  pb.base_x_groups = bases.x_groups.data();
  pb.base_y_groups = bases.y_groups.data();
  pb.run = bases.run;
  pb.mask_softmax = mask_softmax;
  return pb;
}

// Dynamic scheduling on top of at::parallel_for: one worker per thread, each taking the next chunk from a shared
// counter until none is left, so that a thread slowed down (another process on its core) does not hold up the
// others as a static split would. setup() runs once per worker and returns its scratch; work(chunk, scratch).
// Which thread runs a chunk never changes the result: chunks write disjoint outputs.
template <typename Setup, typename Work>
void parallel_chunks(int64_t chunks, const Setup& setup, const Work& work) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  if (workers <= 1 || at::in_parallel_region()) {
    auto scratch = setup();
    for (int64_t c = 0; c < chunks; ++c) work(c, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    auto scratch = setup();
    for (int64_t w = begin; w < end; ++w)
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) work(c, scratch);
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "DCNv3 CPU kernel: ", name, " must be a CPU tensor");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kDouble || dt == at::kFloat || dt == at::kBFloat16,
              "DCNv3 CPU kernel supports float64, float32 and bfloat16, got ", dt);
}

// Raw storage pointer of a contiguous tensor as the kernel's element type.
template <typename S>
const S* cptr(const at::Tensor& t) {
  return reinterpret_cast<const S*>(t.const_data_ptr());
}
template <typename S>
S* mptr(at::Tensor& t) {
  return reinterpret_cast<S*>(t.mutable_data_ptr());
}

// offset / mask: where (pixel 0, group 0, point 0)'s offset and mask are (DCNv4: one tensor, mask = offset + 2P).
template <typename S, bool kPixel>
void run_forward(const Problem& pb, const at::Tensor& input, const S* off, const S* msk, at::Tensor& output) {
  using A = acc_t<S>;
  const ForwardFn<S> fn = forward_kernel<S, kPixel>(pb.Cg);
  const S* in = cptr<S>(input);
  S* out = mptr<S>(output);
  const int64_t pixels = pb.N * pb.Ho * pb.Wo;
  // Chunks of whole output rows when possible, about 8 per thread, at least ~64k multiply-adds each.
  const int64_t work_per_pixel = pb.G * pb.P * (pb.Cg + 32);
  const int64_t min_pixels = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_pixel));
  const int64_t per_chunk =
      std::max<int64_t>(min_pixels, pixels / std::max<int64_t>(1, 8 * static_cast<int64_t>(at::get_num_threads())));
  const int64_t chunks = (pixels + per_chunk - 1) / per_chunk;
  const int64_t point_count = pb.run * pb.G * pb.P;
  struct Scratch {
    std::vector<A> acc, probs;
    std::vector<S> gathered;
    std::vector<char> points;
  };
  parallel_chunks(
      chunks,
      [&] {
        return Scratch{std::vector<A>(std::is_same<S, A>::value ? 0 : pb.C),
                       std::vector<A>(pb.mask_softmax ? point_count : 0),
                       std::vector<S>(pb.dense ? 0 : point_count * 3), std::vector<char>(points_bytes<A>(point_count))};
      },
      [&](int64_t c, Scratch& sc) {
        const int64_t begin = c * per_chunk, end = std::min(pixels, begin + per_chunk);
        fn(pb, in, off, msk, out, sc.acc.data(), sc.probs.data(), sc.gathered.data(),
           carve_points<A>(sc.points.data(), point_count), begin, end);
      });
}

// off / msk / goff / gmsk: where (pixel 0, group 0, point 0)'s offset and mask and their gradients are (see
// run_forward); the gradients are written at the places the Problem's strides give, nowhere else.
template <typename S, bool kPixel>
void run_backward(const Problem& pb, const at::Tensor& grad_output, const at::Tensor& input, const S* off,
                  const S* msk, at::Tensor& grad_input, S* goff, S* gmsk) {
  using A = acc_t<S>;
  constexpr bool kDirect = std::is_same<S, A>::value;
  const BackwardFn<S> fn = backward_kernel<S, kPixel>(pb.Cg);
  const int64_t pairs = pb.N * pb.G;
  const int64_t threads = at::get_num_threads();
  const int64_t rows = pb.Ho;
  // Slices (of output rows) per (image, group): 1 unless that leaves threads idle.
  int64_t slices = 1;
  if (pairs < threads) slices = std::min<int64_t>((threads + pairs - 1) / pairs, rows);
  slices = std::max<int64_t>(slices, 1);

  const auto acc_dtype = kDirect ? input.scalar_type() : at::kFloat;
  at::Tensor buffer;  // (slices, N, H, W, C) in the accumulation type, unless we can add into grad_input directly
  A* target;
  if (kDirect && slices == 1) {
    target = mptr<A>(grad_input);
  } else {
    buffer = at::zeros({slices, pb.N, pb.H, pb.W, pb.C}, input.options().dtype(acc_dtype));
    target = mptr<A>(buffer);
  }
  const int64_t image_elems = pb.N * pb.H * pb.W * pb.C;

  const S* go = cptr<S>(grad_output);
  const S* in = cptr<S>(input);
  const int64_t run_points = kBackwardPixels * pb.P;
  struct Scratch {
    std::vector<S> off, msk;
    std::vector<A> by;
    std::vector<A> go, probs, gm;
    std::vector<char> points;
    RunScratch<S> rs;
  };
  auto setup = [&] {
    Scratch sc{std::vector<S>(run_points * 2), std::vector<S>(run_points), std::vector<A>(run_points),
               std::vector<A>(pb.Cg), std::vector<A>(run_points), std::vector<A>(pb.P),
               std::vector<char>(points_bytes<A>(run_points)), RunScratch<S>{}};
    sc.rs.off = sc.off.data();
    sc.rs.msk = sc.msk.data();
    sc.rs.by = sc.by.data();
    sc.rs.go = sc.go.data();
    sc.rs.probs = sc.probs.data();
    sc.rs.gm = sc.gm.data();
    sc.rs.pts = carve_points<A>(sc.points.data(), run_points);
    return sc;
  };
  if (slices == 1) {
    // A chunk is one image and a block of its groups (it owns their grad_input channels). The block is walked row
    // by row, all its groups per row, so that a row's offsets and masks are still in cache for the next group.
    // Each grad_input element receives its contributions in row order whatever the blocks and threads: the result
    // does not depend on the thread count.
    const int64_t threads = at::get_num_threads();
    const int64_t block = std::max<int64_t>(1, std::min<int64_t>(pb.G, pairs / std::max<int64_t>(1, 4 * threads)));
    const int64_t blocks_per_image = (pb.G + block - 1) / block;
    parallel_chunks(pb.N * blocks_per_image, setup, [&](int64_t c, Scratch& sc) {
      const int64_t n = c / blocks_per_image;
      const int64_t g_first = (c - n * blocks_per_image) * block;
      const int64_t g_last = std::min(pb.G, g_first + block);
      for (int64_t ho = 0; ho < rows; ++ho)
        for (int64_t g = g_first; g < g_last; ++g) fn(pb, go, in, off, msk, target, goff, gmsk, sc.rs, n, g, ho, ho + 1);
    });
  } else {
    // Fewer (image, group) pairs than threads: each pair's rows are cut into slices with their own buffer.
    parallel_chunks(pairs * slices, setup, [&](int64_t t, Scratch& sc) {
      const int64_t slice = t % slices;
      const int64_t pair = t / slices;
      const int64_t n = pair / pb.G;
      const int64_t g = pair - n * pb.G;
      const int64_t first = rows * slice / slices;
      const int64_t last = rows * (slice + 1) / slices;
      fn(pb, go, in, off, msk, target + slice * image_elems, goff, gmsk, sc.rs, n, g, first, last);
    });
  }
  if (buffer.defined()) {
    at::Tensor summed = slices == 1 ? buffer.select(0, 0) : buffer.sum(0);
    grad_input.copy_(summed);
  }
}

// One call of either op in dtype S: the location tables (kPixel: DCNv4's), then the kernel. The masks start
// mask_start elements into `mask` (DCNv4: offset and mask are the same packed tensor, its masks 2P channels in).
template <typename S, bool kPixel>
void forward_typed(const Shape& s, const Geometry& geo, bool mask_softmax, const Layout& layout,
                   const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, int64_t mask_start,
                   at::Tensor& output) {
  Bases<acc_t<S>> bases;
  fill_bases(s, geo, kPixel, bases);
  const Problem pb = make_problem(s, geo, mask_softmax, layout, bases);
  run_forward<S, kPixel>(pb, input, cptr<S>(offset), cptr<S>(mask) + mask_start, output);
}

template <typename S, bool kPixel>
void backward_typed(const Shape& s, const Geometry& geo, bool mask_softmax, const Layout& layout,
                    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
                    const at::Tensor& mask, int64_t mask_start, at::Tensor& grad_input, at::Tensor& grad_offset,
                    at::Tensor& grad_mask) {
  Bases<acc_t<S>> bases;
  fill_bases(s, geo, kPixel, bases);
  const Problem pb = make_problem(s, geo, mask_softmax, layout, bases);
  run_backward<S, kPixel>(pb, grad_output, input, cptr<S>(offset), cptr<S>(mask) + mask_start, grad_input,
                          mptr<S>(grad_offset), mptr<S>(grad_mask) + mask_start);
}

template <bool kPixel, typename... Args>
void forward_any(at::ScalarType dtype, Args&&... args) {
  switch (dtype) {
    case at::kDouble:
      return forward_typed<double, kPixel>(args...);
    case at::kFloat:
      return forward_typed<float, kPixel>(args...);
    default:
      return forward_typed<bf16, kPixel>(args...);
  }
}

template <bool kPixel, typename... Args>
void backward_any(at::ScalarType dtype, Args&&... args) {
  switch (dtype) {
    case at::kDouble:
      return backward_typed<double, kPixel>(args...);
    case at::kFloat:
      return backward_typed<float, kPixel>(args...);
    default:
      return backward_typed<bf16, kPixel>(args...);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace internimage_dcnv3

using namespace internimage_dcnv3;

at::Tensor dcnv3_forward_cpu(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
                             int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                             int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                             int64_t group_channels, double offset_scale, int64_t remove_center,
                             bool mask_softmax) {
  const Shape s = check_args(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                             dilation_h, dilation_w, group, group_channels, remove_center, offset_scale);
  cpu::check_cpu(input_, "input");
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor output = at::empty({s.N, s.Ho, s.Wo, s.C}, input.options());
  if (output.numel() == 0) return output;
  const cpu::Geometry geo{kernel_h, kernel_w, stride_h, stride_w, pad_h,
                          pad_w,    dilation_h, dilation_w, offset_scale, remove_center != 0};
  cpu::forward_any<false>(input.scalar_type(), s, geo, mask_softmax, cpu::dense_layout(s), input, offset, mask,
                          int64_t{0}, output);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
    int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
    int64_t remove_center, bool mask_softmax) {
  const Shape s = check_args(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                             dilation_h, dilation_w, group, group_channels, remove_center, offset_scale);
  cpu::check_cpu(input_, "input");
  check_grad_output(grad_output_, input_, s);
  const at::Tensor grad_output = grad_output_.to(input_.scalar_type()).contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = at::empty_like(mask);
  if (grad_output.numel() == 0) {
    grad_offset.zero_();
    grad_mask.zero_();
    return {grad_input, grad_offset, grad_mask};
  }
  const cpu::Geometry geo{kernel_h, kernel_w, stride_h, stride_w, pad_h,
                          pad_w,    dilation_h, dilation_w, offset_scale, remove_center != 0};
  cpu::backward_any<false>(input.scalar_type(), s, geo, mask_softmax, cpu::dense_layout(s), grad_output, input,
                           offset, mask, int64_t{0}, grad_input, grad_offset, grad_mask);
  return {grad_input, grad_offset, grad_mask};
}

at::Tensor dcnv4_forward_cpu(const at::Tensor& input_, const at::Tensor& offset_mask_, int64_t kernel_h,
                             int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                             int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                             double offset_scale, int64_t remove_center) {
  const Shape s = check_args_v4(input_, offset_mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                dilation_h, dilation_w, group, group_channels, remove_center, offset_scale);
  cpu::check_cpu(input_, "input");
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset_mask = offset_mask_.contiguous();
  at::Tensor output = at::empty({s.N, s.Ho, s.Wo, s.C}, input.options());
  if (output.numel() == 0) return output;
  const cpu::Geometry geo{kernel_h, kernel_w, stride_h, stride_w, pad_h,
                          pad_w,    dilation_h, dilation_w, dcnv4_offset_scale(offset_scale), remove_center != 0};
  cpu::forward_any<true>(input.scalar_type(), s, geo, false, cpu::packed_layout(s, offset_mask.size(3)), input,
                         offset_mask, offset_mask, 2 * s.P, output);
  return output;
}

std::tuple<at::Tensor, at::Tensor> dcnv4_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& input_,
                                                      const at::Tensor& offset_mask_, int64_t kernel_h,
                                                      int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                                      int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                                      int64_t dilation_w, int64_t group, int64_t group_channels,
                                                      double offset_scale, int64_t remove_center) {
  const Shape s = check_args_v4(input_, offset_mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                dilation_h, dilation_w, group, group_channels, remove_center, offset_scale);
  cpu::check_cpu(input_, "input");
  check_grad_output(grad_output_, input_, s, "DCNv4");
  const at::Tensor grad_output = grad_output_.to(input_.scalar_type()).contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset_mask = offset_mask_.contiguous();
  at::Tensor grad_input = at::zeros_like(input);
  // Zeros: the padding channels past G * 3P are never written (they have no effect on the output).
  at::Tensor grad_offset_mask = at::zeros_like(offset_mask);
  if (grad_output.numel() == 0) return {grad_input, grad_offset_mask};
  const cpu::Geometry geo{kernel_h, kernel_w, stride_h, stride_w, pad_h,
                          pad_w,    dilation_h, dilation_w, dcnv4_offset_scale(offset_scale), remove_center != 0};
  cpu::backward_any<true>(input.scalar_type(), s, geo, false, cpu::packed_layout(s, offset_mask.size(3)),
                          grad_output, input, offset_mask, offset_mask, 2 * s.P, grad_input, grad_offset_mask,
                          grad_offset_mask);
  return {grad_input, grad_offset_mask};
}

int64_t dcnv3_cpu_isa(int64_t request) {
  if (request >= 0) {
    const int level = static_cast<int>(std::min<int64_t>(request, cpu::supported_isa()));
    cpu::isa_in_use().store(level);
  }
  return cpu::isa_in_use().load();
}
