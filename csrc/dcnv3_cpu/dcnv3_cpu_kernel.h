// DCNv3 CPU kernels on raw pointers (no torch headers): one output pixel (forward) or one (image, group, pixel range)
// task (backward) at a time, vectorised over the channels of a group. The scheduling (threads, instruction-set
// variants, buffers) lives in dcnv3_cpu.cpp; the per-sample math lives in dcnv3_common/dcnv3_math.h.
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

namespace internimage_dcnv3 {
namespace cpu {

// bfloat16 as stored by torch (layout-compatible with c10::BFloat16).
struct bf16 {
  uint16_t bits;
};

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
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
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
    dst.bits = 0x7FC0;
    return;
  }
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  dst.bits = static_cast<uint16_t>(bits >> 16);
}

// Geometry of one call. base_x[wo * P + p] / base_y[ho * P + p] hold the fixed float32 part of every sampling
// location (sampling_base), computed once per call.
struct Problem {
  int64_t N, H, W, C, G, Cg, Ho, Wo, P;
  int64_t pad_h, pad_w;
  double offset_scale;
  const float* base_x;
  const float* base_y;
};

// Width of the lane arrays used for channel reductions: partial sums are kept per lane (a fixed, deterministic
// order that the compiler maps onto vector registers) and folded at the end.
template <typename A>
struct Lanes {
  static constexpr int value = 32 / sizeof(A);
};

template <typename A, int L>
DCNV3_CPU_INLINE A fold_lanes(A (&lanes)[L]) {
  for (int width = L / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: output pixels [begin, end) of the flattened (N, Ho, Wo) range. scratch: C accumulators (used when the
// storage type is not the accumulation type, i.e. bfloat16).
// ---------------------------------------------------------------------------------------------------------------
template <typename S, int CG>
DCNV3_CPU_INLINE void forward_pixels(const Problem& pb, const S* DCNV3_RESTRICT input,
                                     const S* DCNV3_RESTRICT offset, const S* DCNV3_RESTRICT mask,
                                     S* DCNV3_RESTRICT output, acc_t<S>* DCNV3_RESTRICT scratch, int64_t begin,
                                     int64_t end) {
  using A = acc_t<S>;
  constexpr bool kDirect = std::is_same<S, A>::value;
  const int64_t Cg = CG > 0 ? CG : pb.Cg;
  const int64_t C = pb.C, G = pb.G, P = pb.P, H = pb.H, W = pb.W, HoWo = pb.Ho * pb.Wo, Wo = pb.Wo;
  const int64_t row = W * C;
  const A scale = static_cast<A>(pb.offset_scale);
  const A w_pad = static_cast<A>(W + 2 * pb.pad_w);
  const A h_pad = static_cast<A>(H + 2 * pb.pad_h);

  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t n = pix / HoWo;
    const int64_t hw = pix - n * HoWo;
    const int64_t ho = hw / Wo;
    const int64_t wo = hw - ho * Wo;
    const S* off = offset + pix * G * P * 2;
    const S* msk = mask + pix * G * P;
    const float* bx = pb.base_x + wo * P;
    const float* by = pb.base_y + ho * P;
    const S* image = input + n * H * row;
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
      for (int64_t p = 0; p < P; ++p) {
        const int64_t k = g * P + p;
        const A m = load(msk[k]);
        const A u = padded_coord<A>(bx[p], load(off[2 * k]), scale, w_pad);
        const A v = padded_coord<A>(by[p], load(off[2 * k + 1]), scale, h_pad);
        Corners<A> cr;
        if (!locate<A>(u, v, pb.pad_w, pb.pad_h, W, H, cr)) continue;
        A w[4];
        bilinear_weights<A>(cr, w);
        if (cr.all_valid()) {
          const A w0 = w[0] * m, w1 = w[1] * m, w2 = w[2] * m, w3 = w[3] * m;
          const S* DCNV3_RESTRICT r0 = image_g + cr.pixel(0, W) * C;
          const S* DCNV3_RESTRICT r1 = r0 + C;
          const S* DCNV3_RESTRICT r2 = r0 + row;
          const S* DCNV3_RESTRICT r3 = r2 + C;
          for (int64_t c = 0; c < Cg; ++c)
            acc_g[c] += w0 * load(r0[c]) + w1 * load(r1[c]) + w2 * load(r2[c]) + w3 * load(r3[c]);
        } else {
          for (int corner = 0; corner < 4; ++corner) {
            if (!cr.valid(corner)) continue;
            const A wk = w[corner] * m;
            const S* DCNV3_RESTRICT r = image_g + cr.pixel(corner, W) * C;
            for (int64_t c = 0; c < Cg; ++c) acc_g[c] += wk * load(r[c]);
          }
        }
      }
    }
    if constexpr (!kDirect) {
      S* out = output + pix * C;
      for (int64_t c = 0; c < C; ++c) store(acc[c], out[c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward for one image n and one group g over output pixels [begin, end) of that image (row-major Ho*Wo index).
// grad_input: (N, H, W, C) in the accumulation type; this task adds into channels [g*Cg, (g+1)*Cg) only, so tasks of
// different (n, g) never touch the same memory and no atomics are needed. grad_offset / grad_mask entries of
// (pixel, g) are written exactly once. go_scratch: Cg accumulators for a converted grad_output slice.
// ---------------------------------------------------------------------------------------------------------------
template <typename S, int CG>
DCNV3_CPU_INLINE void backward_task(const Problem& pb, const S* DCNV3_RESTRICT grad_output,
                                    const S* DCNV3_RESTRICT input, const S* DCNV3_RESTRICT offset,
                                    const S* DCNV3_RESTRICT mask, acc_t<S>* DCNV3_RESTRICT grad_input,
                                    S* DCNV3_RESTRICT grad_offset, S* DCNV3_RESTRICT grad_mask,
                                    acc_t<S>* DCNV3_RESTRICT go_scratch, int64_t n, int64_t g, int64_t begin,
                                    int64_t end) {
  using A = acc_t<S>;
  constexpr bool kDirect = std::is_same<S, A>::value;
  constexpr int L = Lanes<A>::value;
  const int64_t Cg = CG > 0 ? CG : pb.Cg;
  const int64_t C = pb.C, G = pb.G, P = pb.P, H = pb.H, W = pb.W, Wo = pb.Wo, HoWo = pb.Ho * pb.Wo;
  const int64_t row = W * C;
  const A scale = static_cast<A>(pb.offset_scale);
  const A w_pad = static_cast<A>(W + 2 * pb.pad_w);
  const A h_pad = static_cast<A>(H + 2 * pb.pad_h);
  const S* image_g = input + n * H * row + g * Cg;
  A* grad_image_g = grad_input + n * H * row + g * Cg;

  for (int64_t hw = begin; hw < end; ++hw) {
    const int64_t pix = n * HoWo + hw;
    const int64_t ho = hw / Wo;
    const int64_t wo = hw - ho * Wo;
    const S* go_s = grad_output + pix * C + g * Cg;
    const A* DCNV3_RESTRICT go;
    if constexpr (kDirect) {
      go = reinterpret_cast<const A*>(go_s);
    } else {
      for (int64_t c = 0; c < Cg; ++c) go_scratch[c] = load(go_s[c]);
      go = go_scratch;
    }
    const float* bx = pb.base_x + wo * P;
    const float* by = pb.base_y + ho * P;
    const int64_t k0 = pix * G * P + g * P;

    for (int64_t p = 0; p < P; ++p) {
      const int64_t k = k0 + p;
      const A m = load(mask[k]);
      const A u = padded_coord<A>(bx[p], load(offset[2 * k]), scale, w_pad);
      const A v = padded_coord<A>(by[p], load(offset[2 * k + 1]), scale, h_pad);
      Corners<A> cr;
      if (!locate<A>(u, v, pb.pad_w, pb.pad_h, W, H, cr)) {
        store(A(0), grad_mask[k]);
        store(A(0), grad_offset[2 * k]);
        store(A(0), grad_offset[2 * k + 1]);
        continue;
      }
      A w[4], du[4], dv[4], dot[4] = {A(0), A(0), A(0), A(0)};
      bilinear_weights<A>(cr, w);
      bilinear_derivatives<A>(cr, du, dv);
      if (cr.all_valid()) {
        const int64_t o0 = cr.pixel(0, W) * C;
        const S* DCNV3_RESTRICT r0 = image_g + o0;
        const S* DCNV3_RESTRICT r1 = r0 + C;
        const S* DCNV3_RESTRICT r2 = r0 + row;
        const S* DCNV3_RESTRICT r3 = r2 + C;
        A* DCNV3_RESTRICT g0 = grad_image_g + o0;
        A* DCNV3_RESTRICT g1 = g0 + C;
        A* DCNV3_RESTRICT g2 = g0 + row;
        A* DCNV3_RESTRICT g3 = g2 + C;
        const A c0 = w[0] * m, c1 = w[1] * m, c2 = w[2] * m, c3 = w[3] * m;
        A l0[L] = {}, l1[L] = {}, l2[L] = {}, l3[L] = {};
        int64_t c = 0;
        for (; c + L <= Cg; c += L) {
          for (int l = 0; l < L; ++l) {
            const A gv = go[c + l];
            l0[l] += gv * load(r0[c + l]);
            l1[l] += gv * load(r1[c + l]);
            l2[l] += gv * load(r2[c + l]);
            l3[l] += gv * load(r3[c + l]);
            g0[c + l] += c0 * gv;
            g1[c + l] += c1 * gv;
            g2[c + l] += c2 * gv;
            g3[c + l] += c3 * gv;
          }
        }
        for (; c < Cg; ++c) {  // tail (group widths that are not a multiple of the lane count)
          const A gv = go[c];
          dot[0] += gv * load(r0[c]);
          dot[1] += gv * load(r1[c]);
          dot[2] += gv * load(r2[c]);
          dot[3] += gv * load(r3[c]);
          g0[c] += c0 * gv;
          g1[c] += c1 * gv;
          g2[c] += c2 * gv;
          g3[c] += c3 * gv;
        }
        dot[0] += fold_lanes<A, L>(l0);
        dot[1] += fold_lanes<A, L>(l1);
        dot[2] += fold_lanes<A, L>(l2);
        dot[3] += fold_lanes<A, L>(l3);
      } else {
        for (int corner = 0; corner < 4; ++corner) {
          if (!cr.valid(corner)) continue;
          const int64_t o = cr.pixel(corner, W) * C;
          const S* DCNV3_RESTRICT r = image_g + o;
          A* DCNV3_RESTRICT gi = grad_image_g + o;
          const A ck = w[corner] * m;
          A lanes[L] = {};
          A tail = A(0);
          int64_t c = 0;
          for (; c + L <= Cg; c += L) {
            for (int l = 0; l < L; ++l) {
              const A gv = go[c + l];
              lanes[l] += gv * load(r[c + l]);
              gi[c + l] += ck * gv;
            }
          }
          for (; c < Cg; ++c) {
            tail += go[c] * load(r[c]);
            gi[c] += ck * go[c];
          }
          dot[corner] = tail + fold_lanes<A, L>(lanes);
        }
      }
      A gm, gx, gy;
      point_gradients<A>(w, du, dv, dot, m, scale, gm, gx, gy);
      store(gm, grad_mask[k]);
      store(gx, grad_offset[2 * k]);
      store(gy, grad_offset[2 * k + 1]);
    }
  }
}

}  // namespace cpu
}  // namespace internimage_dcnv3
