// DCNv3 CPU kernels on raw pointers (no torch headers). The scheduling (threads, instruction-set variants, buffers)
// lives in dcnv3_cpu.cpp; the per-sample math lives in dcnv3_common/dcnv3_math.h.
//
// Two passes per block of sampling points:
// 1. locate_points: a branch-free vector loop over many points (all G*P points of an output pixel in the forward,
//    the P points of a run of pixels of one group in the backward) computing, with the shared math, each point's
//    four corner addresses (clamped into the image), which corners lie inside, the bilinear weights and the mask
//    (the backward also weights * mask and what it needs for the derivatives). Offsets and masks are read once per
//    (pixel, group, point).
// 2. the channel pass: per point, four corner rows of the group's Cg contiguous channels, combined with vector
//    instructions (forward: the point's bilinear sample, then mask * sample into the output). For the group widths
//    of the released models (16, 32) a group is one vector value (GCC/Clang vector extensions) held in registers;
//    other widths use plain loops.
//
// Every function here is force-inlined so that the instruction-set specific wrappers in dcnv3_cpu.cpp (AVX2,
// AVX-512) compile the whole loop nest for their target.

#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dcnv3_common/dcnv3_math.h"

#if defined(__GNUC__) || defined(__clang__)
#define DCNV3_CPU_INLINE inline __attribute__((always_inline))
#define DCNV3_RESTRICT __restrict__
#elif defined(_MSC_VER)
#define DCNV3_CPU_INLINE __forceinline
#define DCNV3_RESTRICT __restrict
#else
#define DCNV3_CPU_INLINE inline
#define DCNV3_RESTRICT
#endif

#if defined(__clang__)
#define DCNV3_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define DCNV3_IVDEP _Pragma("GCC ivdep")
#else
#define DCNV3_IVDEP
#endif

namespace internimage_dcnv3 {
namespace cpu {

// bfloat16 as stored by torch (the bits of c10::BFloat16). A plain integer type, so that loops over it vectorise.
using bf16 = uint16_t;

template <typename S>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename S>
using acc_t = typename Acc<S>::type;

DCNV3_CPU_INLINE float load(float v) { return v; }
DCNV3_CPU_INLINE double load(double v) { return v; }
DCNV3_CPU_INLINE float load(bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

DCNV3_CPU_INLINE void store(float v, float& dst) { dst = v; }
DCNV3_CPU_INLINE void store(double v, double& dst) { dst = v; }
DCNV3_CPU_INLINE void store(float v, bf16& dst) {  // round to nearest even, NaN stays NaN (as c10::BFloat16)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if (v != v) {
    dst = 0x7FC0;
    return;
  }
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  dst = static_cast<uint16_t>(bits >> 16);
}

// Geometry of one call, shared by DCNv3 and DCNv4. base_x[wo * P + p] / base_y[ho * P + p] hold the fixed part of
// every sampling location, computed once per call in the accumulation type acc_t<S> (the tables are typed there):
// DCNv3 stores its float32 normalised values (sampling_base, exact in acc_t), DCNv4 pixel coordinates (pixel_base,
// see the template argument kPixel below). The forward locates the points of `run` consecutive pixels of a row at
// once: base_x_groups[wo * G * P + g * P + p] repeats base_x for every group (so consecutive pixels are contiguous)
// and base_y_groups[(ho * run + r) * G * P + g * P + p] repeats base_y for every group and run slot.
//
// Offsets and masks are read through strides, so that one kernel serves DCNv3's two dense tensors and DCNv4's one
// packed tensor: (pixel pix, group g, point p) reads offset[pix * offset_pixel + g * offset_group + 2 p (+ 1 for y)]
// and mask[pix * mask_pixel + g * mask_group + p] (DCNv4 passes mask = offset_mask + 2P); the backward writes the
// gradients at the same places. `dense`: the DCNv3 layout (offset_pixel = 2 G P, offset_group = 2P, mask_pixel = G P,
// mask_group = P), which the forward locates in place instead of gathering a run first.
struct Problem {
  int64_t N, H, W, C, G, Cg, Ho, Wo, P;
  int64_t pad_h, pad_w;
  double offset_scale;
  int64_t offset_pixel, offset_group, mask_pixel, mask_group;
  bool dense;
  const void* base_x;
  const void* base_y;
  const void* base_x_groups;
  const void* base_y_groups;
  int64_t run;
  bool mask_softmax;  // mask holds logits: softmax over each (pixel, group)'s P points first (fused)
};

template <typename A>
DCNV3_CPU_INLINE const A* table(const void* t) {
  return static_cast<const A*>(t);
}

// ---------------------------------------------------------------------------------------------------------------
// Fused mask softmax
// ---------------------------------------------------------------------------------------------------------------

// exp(x) for x <= 0 (a softmax argument after subtracting its row maximum), branch-free so that the loop over a
// block of points vectorises: Cephes' expf polynomial (within 2 ulp of exp), exact 0 below -87, NaN stays NaN.
DCNV3_CPU_INLINE float exp_nonpositive(float x) {
  const float t = x < -87.0f ? -87.0f : x;
  // n = round(t / ln 2) by the 1.5 * 2^23 trick (floorf would not vectorise without -fno-trapping-math).
  const float n = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (t - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float e = p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) * (1 << 23));
  return x != x ? x : (x < -87.0f ? 0.0f : e);
}
DCNV3_CPU_INLINE double exp_nonpositive(double x) { return __builtin_exp(x); }

// out[r * P + p] = softmax over p of logits[r * P + p], for `rows` rows, in the accumulation type. The exponentials,
// the costly part, run as one vector loop over the whole block; PP > 0 fixes P at compile time.
template <typename S, int PP>
DCNV3_CPU_INLINE void softmax_rows_impl(const S* DCNV3_RESTRICT logits, int64_t rows, int64_t P_,
                                        acc_t<S>* DCNV3_RESTRICT out) {
  using A = acc_t<S>;
  const int64_t P = PP > 0 ? PP : P_;
  for (int64_t r = 0; r < rows; ++r) {
    const S* row = logits + r * P;
    A top = load(row[0]);
    for (int64_t p = 1; p < P; ++p) top = load(row[p]) > top ? load(row[p]) : top;
    for (int64_t p = 0; p < P; ++p) out[r * P + p] = load(row[p]) - top;
  }
  const int64_t count = rows * P;
  for (int64_t j = 0; j < count; ++j) out[j] = exp_nonpositive(out[j]);
  for (int64_t r = 0; r < rows; ++r) {
    A* row = out + r * P;
    A sum = row[0];
    for (int64_t p = 1; p < P; ++p) sum += row[p];
    const A inv = A(1) / sum;
    for (int64_t p = 0; p < P; ++p) row[p] *= inv;
  }
}

template <typename S>
DCNV3_CPU_INLINE void softmax_rows(const S* DCNV3_RESTRICT logits, int64_t rows, int64_t P,
                                   acc_t<S>* DCNV3_RESTRICT out) {
  if (P == 9) return softmax_rows_impl<S, 9>(logits, rows, P, out);  // 3x3 kernels
  if (P == 8) return softmax_rows_impl<S, 8>(logits, rows, P, out);  // 3x3 with remove_center
  softmax_rows_impl<S, 0>(logits, rows, P, out);
}

// ---------------------------------------------------------------------------------------------------------------
// Pass 1: locating points
// ---------------------------------------------------------------------------------------------------------------

// Per-point results (structure of arrays). Corner k = (y0 + (k >> 1), x0 + (k & 1)).
template <typename A>
struct Points {
  int32_t* px[4];    // pixel index y * W + x of the corner, with x, y clamped into the image (H * W < 2^31)
  int32_t* keep[4];  // -1 if the corner lies inside the image, else 0 (then its clamped row is read but dropped)
  A* w[4];           // bilinear weights, 0 outside the image
  A* wm[4];          // w * mask (backward only)
  A* m;
  A* fx;             // (backward only)
  A* fy;             // (backward only)
  int32_t* flags;    // as Corners::flags
};

constexpr int64_t kPointBytesFloat = 4 * 4 + 4 * 4 + 11 * 4 + 4;
constexpr int64_t kPointBytesDouble = 4 * 4 + 4 * 4 + 11 * 8 + 4;

// Bytes of scratch for `count` points (64-byte aligned arrays).
template <typename A>
constexpr int64_t points_bytes(int64_t count) {
  const int64_t padded = (count + 15) / 16 * 16;
  return padded * (sizeof(A) == 8 ? kPointBytesDouble : kPointBytesFloat) + 64;
}

template <typename A>
inline Points<A> carve_points(void* scratch, int64_t count) {
  const int64_t padded = (count + 15) / 16 * 16;
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(scratch) + 63) / 64 * 64);
  Points<A> pts;
  auto take = [&](auto*& field, int64_t elem) {
    field = reinterpret_cast<std::remove_reference_t<decltype(field)>>(p);
    p += padded * elem;
  };
  for (int k = 0; k < 4; ++k) take(pts.px[k], 4);
  for (int k = 0; k < 4; ++k) take(pts.w[k], sizeof(A));
  for (int k = 0; k < 4; ++k) take(pts.wm[k], sizeof(A));
  take(pts.m, sizeof(A));
  take(pts.fx, sizeof(A));
  take(pts.fy, sizeof(A));
  for (int k = 0; k < 4; ++k) take(pts.keep[k], 4);
  take(pts.flags, 4);
  return pts;
}

// Locate `count` points: bx/by the fixed parts, off the (dx, dy) pairs, msk the masks, all contiguous. Branch-free,
// so that the compiler turns it into a vector loop. The forward (kBackward = false) reads only px, keep, w and m:
// the rest is not stored, which keeps the pass and its scratch small. kPixel: DCNv4's coordinates (pixel_coord on
// pixel_base tables, in the unpadded image), else DCNv3's (padded_coord on sampling_base tables).
template <bool kBackward, bool kPixel, typename S, typename M>
DCNV3_CPU_INLINE void locate_points(const Problem& pb, int64_t count, const acc_t<S>* DCNV3_RESTRICT bx,
                                    const acc_t<S>* DCNV3_RESTRICT by, const S* DCNV3_RESTRICT off,
                                    const M* DCNV3_RESTRICT msk, const Points<acc_t<S>>& pts) {
  using A = acc_t<S>;
  const A scale = static_cast<A>(pb.offset_scale);
  const A w_pad = static_cast<A>(pb.W + 2 * pb.pad_w);
  const A h_pad = static_cast<A>(pb.H + 2 * pb.pad_h);
  const int32_t W = static_cast<int32_t>(pb.W), H = static_cast<int32_t>(pb.H);
  int32_t* DCNV3_RESTRICT p0 = pts.px[0];
  int32_t* DCNV3_RESTRICT p1 = pts.px[1];
  int32_t* DCNV3_RESTRICT p2 = pts.px[2];
  int32_t* DCNV3_RESTRICT p3 = pts.px[3];
  int32_t* DCNV3_RESTRICT k0 = pts.keep[0];
  int32_t* DCNV3_RESTRICT k1 = pts.keep[1];
  int32_t* DCNV3_RESTRICT k2 = pts.keep[2];
  int32_t* DCNV3_RESTRICT k3 = pts.keep[3];
  A* DCNV3_RESTRICT w0 = pts.w[0];
  A* DCNV3_RESTRICT w1 = pts.w[1];
  A* DCNV3_RESTRICT w2 = pts.w[2];
  A* DCNV3_RESTRICT w3 = pts.w[3];
  A* DCNV3_RESTRICT wm0 = pts.wm[0];
  A* DCNV3_RESTRICT wm1 = pts.wm[1];
  A* DCNV3_RESTRICT wm2 = pts.wm[2];
  A* DCNV3_RESTRICT wm3 = pts.wm[3];
  A* DCNV3_RESTRICT mm = pts.m;
  A* DCNV3_RESTRICT fx = pts.fx;
  A* DCNV3_RESTRICT fy = pts.fy;
  int32_t* DCNV3_RESTRICT flags = pts.flags;
  DCNV3_IVDEP
  for (int64_t j = 0; j < count; ++j) {
    Corners<A> c;
    if constexpr (kPixel) {
      const A u = pixel_coord<A>(bx[j], load(off[2 * j]), scale);
      const A v = pixel_coord<A>(by[j], load(off[2 * j + 1]), scale);
      locate<A>(u, v, 0, 0, pb.W, pb.H, c);
    } else {
      const A u = padded_coord<A>(bx[j], load(off[2 * j]), scale, w_pad);
      const A v = padded_coord<A>(by[j], load(off[2 * j + 1]), scale, h_pad);
      locate<A>(u, v, pb.pad_w, pb.pad_h, pb.W, pb.H, c);
    }
    A w[4];
    bilinear_weights<A>(c, w);
    const A m = load(msk[j]);
    // (int64 stores here would keep GCC from vectorising the loop: element offsets are formed in pass 2.)
    const int32_t xa = clamp_index(c.x0, W), xb = clamp_index(c.x0 + 1, W);
    const int32_t ra = clamp_index(c.y0, H) * W, rb = clamp_index(c.y0 + 1, H) * W;
    p0[j] = ra + xa;
    p1[j] = ra + xb;
    p2[j] = rb + xa;
    p3[j] = rb + xb;
    k0[j] = -static_cast<int32_t>((c.flags & 5) == 5);
    k1[j] = -static_cast<int32_t>((c.flags & 6) == 6);
    k2[j] = -static_cast<int32_t>((c.flags & 9) == 9);
    k3[j] = -static_cast<int32_t>((c.flags & 10) == 10);
    w0[j] = w[0];
    w1[j] = w[1];
    w2[j] = w[2];
    w3[j] = w[3];
    mm[j] = m;
    flags[j] = c.flags;
    if constexpr (kBackward) {
      wm0[j] = w[0] * m;
      wm1[j] = w[1] * m;
      wm2[j] = w[2] * m;
      wm3[j] = w[3] * m;
      fx[j] = c.fx;
      fy[j] = c.fy;
    }
  }
}

template <typename A>
DCNV3_CPU_INLINE Corners<A> corners_at(const Points<A>& pts, int64_t j) {
  Corners<A> c;
  c.x0 = c.y0 = 0;  // not kept: addresses come from pts.px
  c.flags = pts.flags[j];
  c.fx = pts.fx[j];
  c.fy = pts.fy[j];
  return c;
}

// ---------------------------------------------------------------------------------------------------------------
// A group of CG channels held in registers as K native vectors of W lanes (GCC/Clang vector extensions). VB, the
// native vector width in bytes, comes from the instruction-set variant (16 portable, 32 AVX2, 64 AVX-512), so that
// the compiler never has to split wider-than-native vectors (which it does poorly).
// ---------------------------------------------------------------------------------------------------------------
#if (defined(__GNUC__) || defined(__clang__)) && !defined(DCNV3_NO_VECTOR_EXTENSIONS)
#define DCNV3_VECTOR_EXTENSIONS 1
template <typename T, int N>
struct VecOf {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <typename T, int N>
using Vec = typename VecOf<T, N>::type;

template <typename T, int CG, int VB>
struct Group {
  static constexpr int W = (static_cast<int>(VB / sizeof(T)) < CG) ? static_cast<int>(VB / sizeof(T)) : CG;
  static constexpr int K = CG / W;
  static_assert(CG % W == 0, "group width must be a multiple of the vector width");
  Vec<T, W> c[K];
};

template <int W>
DCNV3_CPU_INLINE Vec<float, W> vload(const float* p) {
  Vec<float, W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int W>
DCNV3_CPU_INLINE Vec<double, W> vload(const double* p) {
  Vec<double, W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int W>
DCNV3_CPU_INLINE Vec<float, W> vload(const bf16* p) {
  Vec<uint16_t, W> h;
  std::memcpy(&h, p, sizeof(h));
  const Vec<uint32_t, W> bits = __builtin_convertvector(h, Vec<uint32_t, W>) << 16;
  Vec<float, W> v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

template <int W>
DCNV3_CPU_INLINE void vstore(float* p, Vec<float, W> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <int W>
DCNV3_CPU_INLINE void vstore(double* p, Vec<double, W> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <int W>
DCNV3_CPU_INLINE void vstore(bf16* p, Vec<float, W> v) {  // round to nearest even, NaN -> 0x7FC0, as store()
  Vec<uint32_t, W> bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const Vec<uint32_t, W> rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const Vec<int32_t, W> is_nan = v != v;
  const Vec<uint32_t, W> out = is_nan ? Vec<uint32_t, W>{} + 0x7FC0u : rounded;
  const Vec<uint16_t, W> h = __builtin_convertvector(out, Vec<uint16_t, W>);
  std::memcpy(p, &h, sizeof(h));
}

template <typename A, int CG, int VB, typename S>
DCNV3_CPU_INLINE Group<A, CG, VB> gload(const S* p) {
  using G = Group<A, CG, VB>;
  G g;
  for (int k = 0; k < G::K; ++k) g.c[k] = vload<G::W>(p + k * G::W);
  return g;
}

template <typename A, int CG, int VB, typename S>
DCNV3_CPU_INLINE void gstore(S* p, const Group<A, CG, VB>& g) {
  using G = Group<A, CG, VB>;
  for (int k = 0; k < G::K; ++k) vstore<G::W>(p + k * G::W, g.c[k]);
}

// x where keep == -1, zeros where keep == 0 (bitwise, so that non-finite values read from a clamped address of an
// out-of-image corner vanish too).
template <typename A, int CG, int VB>
DCNV3_CPU_INLINE Group<A, CG, VB> keep_if(Group<A, CG, VB> x, int32_t keep) {
  using G = Group<A, CG, VB>;
  using I = typename std::conditional<sizeof(A) == 8, int64_t, int32_t>::type;
  for (int k = 0; k < G::K; ++k) {
    Vec<I, G::W> bits;
    std::memcpy(&bits, &x.c[k], sizeof(bits));
    bits &= static_cast<I>(keep);
    std::memcpy(&x.c[k], &bits, sizeof(bits));
  }
  return x;
}

// acc += s * x
template <typename A, int CG, int VB>
DCNV3_CPU_INLINE void axpy(Group<A, CG, VB>& acc, A s, const Group<A, CG, VB>& x) {
  for (int k = 0; k < Group<A, CG, VB>::K; ++k) acc.c[k] += s * x.c[k];
}

template <typename A, int CG, int VB>
DCNV3_CPU_INLINE Group<A, CG, VB> mul(const Group<A, CG, VB>& a, const Group<A, CG, VB>& b) {
  Group<A, CG, VB> r;
  for (int k = 0; k < Group<A, CG, VB>::K; ++k) r.c[k] = a.c[k] * b.c[k];
  return r;
}

template <typename A, int CG, int VB>
DCNV3_CPU_INLINE Group<A, CG, VB> scaled(A s, const Group<A, CG, VB>& x) {
  Group<A, CG, VB> r;
  for (int k = 0; k < Group<A, CG, VB>::K; ++k) r.c[k] = s * x.c[k];
  return r;
}

template <typename A, int CG, int VB>
DCNV3_CPU_INLINE Group<A, CG, VB> add(const Group<A, CG, VB>& a, const Group<A, CG, VB>& b) {
  Group<A, CG, VB> r;
  for (int k = 0; k < Group<A, CG, VB>::K; ++k) r.c[k] = a.c[k] + b.c[k];
  return r;
}

// Halves of a native vector.
template <typename T, int N>
DCNV3_CPU_INLINE Vec<T, N / 2> lower_half(Vec<T, N> v) {
  Vec<T, N / 2> h;
  std::memcpy(&h, &v, sizeof(h));
  return h;
}
template <typename T, int N>
DCNV3_CPU_INLINE Vec<T, N / 2> upper_half(Vec<T, N> v) {
  Vec<T, N / 2> h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + sizeof(h), sizeof(h));
  return h;
}

// Four horizontal sums at once, in a fixed order: fold by halves down to two lanes each, then add the pairs.
template <typename T, int N>
DCNV3_CPU_INLINE void hsum4(Vec<T, N> a, Vec<T, N> b, Vec<T, N> c, Vec<T, N> d, T out[4]) {
  if constexpr (N > 2) {
    hsum4<T, N / 2>(lower_half<T, N>(a) + upper_half<T, N>(a), lower_half<T, N>(b) + upper_half<T, N>(b),
                    lower_half<T, N>(c) + upper_half<T, N>(c), lower_half<T, N>(d) + upper_half<T, N>(d), out);
  } else {
    out[0] = a[0] + a[1];
    out[1] = b[0] + b[1];
    out[2] = c[0] + c[1];
    out[3] = d[0] + d[1];
  }
}

// The four channel sums of four groups: chunks first (in order), then hsum4.
template <typename A, int CG, int VB>
DCNV3_CPU_INLINE void group_sums4(const Group<A, CG, VB> (&x)[4], A out[4]) {
  using G = Group<A, CG, VB>;
  Vec<A, G::W> s[4];
  for (int q = 0; q < 4; ++q) {
    s[q] = x[q].c[0];
    for (int k = 1; k < G::K; ++k) s[q] += x[q].c[k];
  }
  if constexpr (G::W >= 2) {
    hsum4<A, G::W>(s[0], s[1], s[2], s[3], out);
  } else {
    for (int q = 0; q < 4; ++q) out[q] = s[q][0];
  }
}
#else
#define DCNV3_VECTOR_EXTENSIONS 0
#endif

// ---------------------------------------------------------------------------------------------------------------
// Forward: output pixels [begin, end) of the flattened (N, Ho, Wo) range. scratch: C accumulators (bfloat16 on the
// generic path); probs (fused softmax) and pts: room for run * G * P points; gathered (layouts that are not dense):
// run * G * P * 3 values.
// ---------------------------------------------------------------------------------------------------------------

// Copy the offsets and masks of `count` pixels from pix0 into the dense layout: off (count, G, P, 2), msk (count, G,
// P). (The location pass is a vector loop over contiguous points; a packed DCNv4 row is not.)
template <typename S>
DCNV3_CPU_INLINE void gather_run(const Problem& pb, const S* DCNV3_RESTRICT offset, const S* DCNV3_RESTRICT mask,
                                 int64_t pix0, int64_t count, S* DCNV3_RESTRICT off, S* DCNV3_RESTRICT msk) {
  const int64_t G = pb.G, P = pb.P;
  for (int64_t r = 0; r < count; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row = r * G + g;
      std::memcpy(off + row * 2 * P, offset + (pix0 + r) * pb.offset_pixel + g * pb.offset_group, 2 * P * sizeof(S));
      std::memcpy(msk + row * P, mask + (pix0 + r) * pb.mask_pixel + g * pb.mask_group, P * sizeof(S));
    }
}

template <typename S, int CG, int VB, bool kPixel>
DCNV3_CPU_INLINE void forward_pixels(const Problem& pb, const S* DCNV3_RESTRICT input,
                                     const S* DCNV3_RESTRICT offset, const S* DCNV3_RESTRICT mask,
                                     S* DCNV3_RESTRICT output, acc_t<S>* DCNV3_RESTRICT scratch,
                                     acc_t<S>* DCNV3_RESTRICT probs, S* DCNV3_RESTRICT gathered,
                                     const Points<acc_t<S>>& pts, int64_t begin, int64_t end) {
  using A = acc_t<S>;
  constexpr bool kDirect = std::is_same<S, A>::value;
  const int64_t Cg = CG > 0 ? CG : pb.Cg;
  const int64_t C = pb.C, G = pb.G, P = pb.P, H = pb.H, W = pb.W, HoWo = pb.Ho * pb.Wo, Wo = pb.Wo;
  const int64_t GP = G * P;

  for (int64_t pix0 = begin; pix0 < end;) {
    const int64_t n = pix0 / HoWo;
    const int64_t hw = pix0 - n * HoWo;
    const int64_t ho = hw / Wo;
    const int64_t wo = hw - ho * Wo;
    int64_t count = pb.run < end - pix0 ? pb.run : end - pix0;  // pixels of this row located together
    count = count < Wo - wo ? count : Wo - wo;
    const S* off_run = offset + pix0 * GP * 2;
    const S* msk_run = mask + pix0 * GP;
    if (!pb.dense) {
      gather_run<S>(pb, offset, mask, pix0, count, gathered, gathered + count * GP * 2);
      off_run = gathered;
      msk_run = gathered + count * GP * 2;
    }
    const A* bx = table<A>(pb.base_x_groups) + wo * GP;
    const A* by = table<A>(pb.base_y_groups) + ho * pb.run * GP;
    if (pb.mask_softmax) {
      softmax_rows<S>(msk_run, count * G, P, probs);
      locate_points<false, kPixel, S>(pb, count * GP, bx, by, off_run, probs, pts);
    } else {
      locate_points<false, kPixel, S>(pb, count * GP, bx, by, off_run, msk_run, pts);
    }
    const S* image = input + n * H * W * C;
    for (int64_t r = 0; r < count; ++r) {
      const int64_t pix = pix0 + r;
      const int64_t j0 = r * GP;
#if DCNV3_VECTOR_EXTENSIONS
      if constexpr (CG > 0) {
        // Every point reads its four corners from clamped addresses; one branch per point: points with a corner
        // outside the image drop it bitwise (so inf/NaN at the clamped address vanishes), the rest skip that.
        // A point at a non-finite location has NaN weights (see locate), so its sample, w * 0, is NaN; a
        // non-finite mask reaches the output through mask * sample whatever the sample: both as in the reference.
        // (Written out twice on purpose: one loop with a per-corner select measured 2-3% slower.)
        // Each point is first sampled on its own (bilinear, as grid_sample), then added with its mask: the samples
        // are independent, so only P multiply-adds per group form a dependency chain (not 4 P), which keeps the
        // core's multiply-add units busy instead of waiting on their latency.
        for (int64_t g = 0; g < G; ++g) {
          const S* image_g = image + g * CG;
          Group<A, CG, VB> acc = {};
          for (int64_t j = j0 + g * P; j < j0 + (g + 1) * P; ++j) {
            Group<A, CG, VB> sample;
            if (pts.flags[j] == Corners<A>::kAllValid) {  // the common case: no corner to drop
              sample = scaled(pts.w[0][j], gload<A, CG, VB>(image_g + pts.px[0][j] * C));
              for (int q = 1; q < 4; ++q) axpy(sample, pts.w[q][j], gload<A, CG, VB>(image_g + pts.px[q][j] * C));
            } else {
              sample = scaled(pts.w[0][j], keep_if(gload<A, CG, VB>(image_g + pts.px[0][j] * C), pts.keep[0][j]));
              for (int q = 1; q < 4; ++q)
                axpy(sample, pts.w[q][j], keep_if(gload<A, CG, VB>(image_g + pts.px[q][j] * C), pts.keep[q][j]));
            }
            axpy(acc, pts.m[j], sample);
          }
          gstore(output + pix * C + g * CG, acc);
        }
        continue;
      }
#endif
      A* DCNV3_RESTRICT acc;
      if constexpr (kDirect) {
        acc = reinterpret_cast<A*>(output + pix * C);
      } else {
        acc = scratch;
      }
      for (int64_t c = 0; c < C; ++c) acc[c] = A(0);
      for (int64_t g = 0; g < G; ++g) {
        A* DCNV3_RESTRICT acc_g = acc + g * Cg;
        const S* image_g = image + g * Cg;
        for (int64_t j = j0 + g * P; j < j0 + (g + 1) * P; ++j) {
          const A m = pts.m[j], w0 = pts.w[0][j];
          if (!(m - m == A(0)) || w0 != w0) {
            // A non-finite mask, or a non-finite location (NaN weights, see locate): m * sample as the reference
            // forms it (corners outside the image read as zero), so that the result is NaN/inf as there, even for a
            // point outside the image, whose corners the loop below skips.
            for (int64_t c = 0; c < Cg; ++c) {
              A sample = A(0);
              for (int k = 0; k < 4; ++k)
                sample += pts.w[k][j] * (pts.keep[k][j] ? load(image_g[pts.px[k][j] * C + c]) : A(0));
              acc_g[c] += m * sample;
            }
            continue;
          }
          for (int k = 0; k < 4; ++k) {
            if (!pts.keep[k][j]) continue;
            const A wk = pts.w[k][j] * pts.m[j];
            const S* DCNV3_RESTRICT r = image_g + pts.px[k][j] * C;
            for (int64_t c = 0; c < Cg; ++c) acc_g[c] += wk * load(r[c]);
          }
        }
      }
      if constexpr (!kDirect) {
        S* out = output + pix * C;
        for (int64_t c = 0; c < C; ++c) store(acc[c], out[c]);
      }
    }
    pix0 += count;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------

// Output pixels per location pass in the backward (keeps the point arrays in L1).
constexpr int64_t kBackwardPixels = 8;

// Per-task scratch of the backward pass: one run of up to kBackwardPixels pixels of one group.
template <typename S>
struct RunScratch {
  S* off;        // kBackwardPixels * P * 2 gathered offsets
  S* msk;        // kBackwardPixels * P gathered masks
  acc_t<S>* by;  // kBackwardPixels * P fixed y parts
  acc_t<S>* go;  // Cg (bfloat16 grad_output converted, generic path)
  acc_t<S>* probs;  // kBackwardPixels * P softmaxed masks (fused softmax)
  acc_t<S>* gm;     // P gradients with respect to the softmaxed masks of one pixel (fused softmax)
  Points<acc_t<S>> pts;  // kBackwardPixels * P
};

// Generic path: gi[c] += coef * go[c] and returns sum_c go[c] * r[c] (lane partial sums: fixed order).
template <typename S, typename A>
DCNV3_CPU_INLINE A corner_dot_scatter(int64_t Cg, const A* DCNV3_RESTRICT go, const S* DCNV3_RESTRICT r,
                                      A* DCNV3_RESTRICT gi, A coef) {
  constexpr int L = 32 / sizeof(A);
  A lanes[L] = {};
  A tail = A(0);
  int64_t c = 0;
  for (; c + L <= Cg; c += L) {
    for (int l = 0; l < L; ++l) {
      const A gv = go[c + l];
      lanes[l] += gv * load(r[c + l]);
      gi[c + l] += coef * gv;
    }
  }
  for (; c < Cg; ++c) {
    tail += go[c] * load(r[c]);
    gi[c] += coef * go[c];
  }
  for (int width = L / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return tail + lanes[0];
}

// Backward for one image n and one group g over output rows [row_begin, row_end) of that image.
// grad_input: (N, H, W, C) in the accumulation type; this task adds into channels [g*Cg, (g+1)*Cg) only, so tasks of
// different (n, g) never touch the same memory: no atomics, and a fixed summation order. grad_offset / grad_mask
// entries of (pixel, g) are written exactly once (through the Problem's strides, like the reads).
template <typename S, int CG, int VB, bool kPixel>
DCNV3_CPU_INLINE void backward_task(const Problem& pb, const S* DCNV3_RESTRICT grad_output,
                                    const S* DCNV3_RESTRICT input, const S* DCNV3_RESTRICT offset,
                                    const S* DCNV3_RESTRICT mask, acc_t<S>* DCNV3_RESTRICT grad_input,
                                    S* DCNV3_RESTRICT grad_offset, S* DCNV3_RESTRICT grad_mask,
                                    const RunScratch<S>& rs, int64_t n, int64_t g, int64_t row_begin,
                                    int64_t row_end) {
  using A = acc_t<S>;
  constexpr bool kDirect = std::is_same<S, A>::value;
  constexpr bool kVector = CG > 0 && DCNV3_VECTOR_EXTENSIONS;
  const int64_t Cg = CG > 0 ? CG : pb.Cg;
  const int64_t C = pb.C, P = pb.P, H = pb.H, W = pb.W, Wo = pb.Wo, Ho = pb.Ho;
  const A scale = static_cast<A>(pb.offset_scale);
  const S* image_g = input + n * H * W * C + g * Cg;
  A* grad_image_g = grad_input + n * H * W * C + g * Cg;
  const Points<A>& pts = rs.pts;

  for (int64_t ho = row_begin; ho < row_end; ++ho) {
    for (int64_t wo0 = 0; wo0 < Wo; wo0 += kBackwardPixels) {
      const int64_t run = Wo - wo0 < kBackwardPixels ? Wo - wo0 : kBackwardPixels;
      const int64_t pix0 = (n * Ho + ho) * Wo + wo0;
      // Gather the run's offsets / masks of group g into contiguous arrays, then locate its points at once.
      const A* base_y = table<A>(pb.base_y) + ho * P;
      for (int64_t i = 0; i < run; ++i) {
        const S* off_i = offset + (pix0 + i) * pb.offset_pixel + g * pb.offset_group;
        const S* msk_i = mask + (pix0 + i) * pb.mask_pixel + g * pb.mask_group;
        for (int64_t p = 0; p < P; ++p) {
          rs.off[2 * (i * P + p)] = off_i[2 * p];
          rs.off[2 * (i * P + p) + 1] = off_i[2 * p + 1];
          rs.msk[i * P + p] = msk_i[p];
          rs.by[i * P + p] = base_y[p];
        }
      }
      const A* bx = table<A>(pb.base_x) + wo0 * P;
      if (pb.mask_softmax) {
        softmax_rows<S>(rs.msk, run, P, rs.probs);
        locate_points<true, kPixel, S>(pb, run * P, bx, rs.by, rs.off, rs.probs, pts);
      } else {
        locate_points<true, kPixel, S>(pb, run * P, bx, rs.by, rs.off, rs.msk, pts);
      }

      for (int64_t i = 0; i < run; ++i) {
        const int64_t pix = pix0 + i;
        const S* go_s = grad_output + pix * C + g * Cg;
#if DCNV3_VECTOR_EXTENSIONS
        Group<A, (CG > 0 ? CG : 1), VB> go_v = {};
        if constexpr (CG > 0) go_v = gload<A, CG, VB>(go_s);
#endif
        const A* DCNV3_RESTRICT go = nullptr;
        if constexpr (!kVector) {
          if constexpr (kDirect) {
            go = reinterpret_cast<const A*>(go_s);
          } else {
            for (int64_t c = 0; c < Cg; ++c) rs.go[c] = load(go_s[c]);
            go = rs.go;
          }
        }
        S* grad_off_i = grad_offset + pix * pb.offset_pixel + g * pb.offset_group;
        S* grad_msk_i = grad_mask + pix * pb.mask_pixel + g * pb.mask_group;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t j = i * P + p;
          const Corners<A> cr = corners_at(pts, j);
          const A m = pts.m[j];
          const A w[4] = {pts.w[0][j], pts.w[1][j], pts.w[2][j], pts.w[3][j]};
          A du[4], dv[4], dot[4] = {A(0), A(0), A(0), A(0)};
          bilinear_derivatives<A>(cr, du, dv);
#if DCNV3_VECTOR_EXTENSIONS
          if constexpr (kVector) {
            // Branch-free, as in the forward pass: clamped addresses, out-of-image corners dropped bitwise.
            Group<A, CG, VB> prod[4];
            for (int q = 0; q < 4; ++q) {
              const int64_t o = pts.px[q][j] * C;
              const int32_t keep = pts.keep[q][j];
              prod[q] = mul(go_v, keep_if(gload<A, CG, VB>(image_g + o), keep));
              A* gi = grad_image_g + o;
              gstore(gi, add(gload<A, CG, VB>(gi), keep_if(scaled(pts.wm[q][j], go_v), keep)));
            }
            group_sums4(prod, dot);
          }
#endif
          if constexpr (!kVector) {
            for (int q = 0; q < 4; ++q) {
              if (!pts.keep[q][j]) continue;
              const int64_t o = pts.px[q][j] * C;
              dot[q] = corner_dot_scatter<S, A>(Cg, go, image_g + o, grad_image_g + o, pts.wm[q][j]);
            }
          }
          A gm, gx, gy;
          point_gradients<A>(w, du, dv, dot, m, scale, gm, gx, gy);
          if (pb.mask_softmax) {
            rs.gm[p] = gm;
          } else {
            store(gm, grad_msk_i[p]);
          }
          store(gx, grad_off_i[2 * p]);
          store(gy, grad_off_i[2 * p + 1]);
        }
        if (pb.mask_softmax) {
          // Through the softmax: d logit_p = prob_p * (d prob_p - sum_q prob_q * d prob_q).
          const A* prob = pts.m + i * P;
          A inner = A(0);
          for (int64_t p = 0; p < P; ++p) inner += prob[p] * rs.gm[p];
          for (int64_t p = 0; p < P; ++p) store(prob[p] * (rs.gm[p] - inner), grad_msk_i[p]);
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace internimage_dcnv3
