// CPU kernel of pair_chain (csrc/pair_chain.h): pairs in parallel, in chunks of a few pairs
// that run through every step of the chain in thread-local buffers. Per pair a convolution's
// window mean is taken axis by axis (height, then width), so each output entry costs kh + kw
// additions instead of kh * kw, with unit-stride inner loops; the affine map and the activation
// are applied to each output row as it is finished, in a few simple loops that the compiler
// vectorises. On x86-64 CPUs with AVX2 the rows run in an AVX2 build of those loops with
// SLEEF's vector asin (3.5-ulp; SLEEF ships in libtorch, found at run time); elsewhere in the
// default build with std::asin.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TORCH_NTK_X86 1
extern "C" __m256d Sleef_asind4_u35avx2(__m256d) __attribute__((weak));
extern "C" __m256 Sleef_asinf8_u35avx2(__m256) __attribute__((weak));
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../pair_chain.h"

namespace torch_ntk {
namespace {

// Output indices v with 0 <= s v + off < n, as [lo, hi).
inline void tap_range(int64_t s, int64_t off, int64_t n, int64_t count, int64_t* lo,
                      int64_t* hi) {
  int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
  int64_t b = (n - 1 - off) < 0 ? 0 : (n - 1 - off) / s + 1;
  *lo = std::min(a, count);
  *hi = std::max(*lo, std::min(b, count));
}

// What the last loops of a convolution step read: its affine map and activation.
template <typename T>
struct StepScalars {
  T w2, b2, slope, near;
  int64_t taps;  // kh * kw
  PairAct act;
  StepScalars(const PairStep& st)
      : w2(static_cast<T>(st.w2)),
        b2(static_cast<T>(st.b2)),
        slope(static_cast<T>(st.slope)),
        near(T(1) - T(8) * std::numeric_limits<T>::epsilon()),
        taps(st.g.kh * st.g.kw),
        act(st.act) {}
};

// The kernel works on chunks of up to Q pairs at once, interleaved: entry e of pair q of the
// chunk is at e * Q + q, so every inner loop runs over a whole row of positions times the
// chunk's pairs (a few dozen contiguous values even for 8x8 maps) and vectorises.

// Stage 1 of the full layout: sum over the height offsets, (h, w, h, w) -> (ho, w, ho, w).
template <typename T>
__attribute__((always_inline)) inline void height_pass_full(const PairGeometry& g,
                                                            const T* __restrict__ in,
                                                            T* __restrict__ tmp, int64_t q) {
  const int64_t w = g.w, h = g.h, ho = g.ho, row = w * q;
  std::fill(tmp, tmp + ho * w * ho * w * q, T(0));
  for (int64_t u1 = 0; u1 < ho; ++u1)
    for (int64_t u2 = 0; u2 < ho; ++u2)
      for (int64_t j = 0; j < g.kh; ++j) {
        const int64_t h1 = g.sh * u1 + g.dh * j - g.ph, h2 = g.sh * u2 + g.dh * j - g.ph;
        if (h1 < 0 || h1 >= h || h2 < 0 || h2 >= h) continue;
        for (int64_t w1 = 0; w1 < w; ++w1) {
          const T* __restrict__ src = in + ((h1 * w + w1) * h + h2) * row;
          T* __restrict__ dst = tmp + ((u1 * w + w1) * ho + u2) * row;
          for (int64_t i = 0; i < row; ++i) dst[i] += src[i];
        }
      }
}

// The width taps of a call: per offset j, the input column offset and the range [lo, hi) of
// output columns whose input column s v + off is inside the input.
struct WidthTaps {
  std::vector<int64_t> off, lo, hi;
  explicit WidthTaps(const PairGeometry& g) : off(g.kw), lo(g.kw), hi(g.kw) {
    for (int64_t j = 0; j < g.kw; ++j) {
      off[j] = g.dw * j - g.pw;
      tap_range(g.sw, off[j], g.w, g.wo, &lo[j], &hi[j]);
    }
  }
};

// Sums over the width offsets of `lines` rows of `src` (w columns) into `dst` (wo columns),
// q interleaved pairs per column.
template <typename T>
__attribute__((always_inline)) inline void width_taps(const PairGeometry& g,
                                                      const WidthTaps& taps,
                                                      const T* __restrict__ src,
                                                      T* __restrict__ dst, int64_t j,
                                                      int64_t q) {
  const int64_t lo = taps.lo[j], hi = taps.hi[j], off = taps.off[j];
  const T* __restrict__ s = src + off * q;
  if (g.sw == 1) {
    for (int64_t i = lo * q; i < hi * q; ++i) dst[i] += s[i];
  } else {
    for (int64_t v = lo; v < hi; ++v)
      for (int64_t r = 0; r < q; ++r) dst[v * q + r] += s[g.sw * v * q + r];
  }
}

// Stage 2 of the full layout for one side-1 position (u1, v1): the sums over the width
// offsets of its block (u2, v2) of ho * wo entries.
template <typename T>
__attribute__((always_inline)) inline void width_block_full(const PairGeometry& g,
                                                            const WidthTaps& taps,
                                                            const T* __restrict__ tmp,
                                                            int64_t u1, int64_t v1,
                                                            T* __restrict__ block, int64_t q) {
  const int64_t w = g.w, ho = g.ho, wo = g.wo;
  std::fill(block, block + ho * wo * q, T(0));
  for (int64_t j = 0; j < g.kw; ++j) {
    const int64_t w1 = g.sw * v1 + taps.off[j];
    if (w1 < 0 || w1 >= w) continue;
    for (int64_t u2 = 0; u2 < ho; ++u2)
      width_taps(g, taps, tmp + ((u1 * w + w1) * ho + u2) * w * q, block + u2 * wo * q, j, q);
  }
}

// The diagonal layout: (h, w) -> (ho, wo), both axes through `tmp` (ho, w).
template <typename T>
__attribute__((always_inline)) inline void window_diag(const PairGeometry& g,
                                                       const WidthTaps& taps,
                                                       const T* __restrict__ in,
                                                       T* __restrict__ tmp, T* __restrict__ out,
                                                       int64_t q) {
  const int64_t w = g.w, h = g.h, ho = g.ho, wo = g.wo, row = w * q;
  std::fill(tmp, tmp + ho * row, T(0));
  for (int64_t u = 0; u < ho; ++u)
    for (int64_t j = 0; j < g.kh; ++j) {
      const int64_t hh = g.sh * u + g.dh * j - g.ph;
      if (hh < 0 || hh >= h) continue;
      for (int64_t i = 0; i < row; ++i) tmp[u * row + i] += in[hh * row + i];
    }
  std::fill(out, out + ho * wo * q, T(0));
  for (int64_t j = 0; j < g.kw; ++j)
    for (int64_t u = 0; u < ho; ++u) width_taps(g, taps, tmp + u * row, out + u * wo * q, j, q);
}

// Per-thread buffers of one block of entries.
template <typename T>
struct RowScratch {
  std::vector<T> kk, tt, rho, as;
  explicit RowScratch(int64_t n) : kk(n), tt(n), rho(n), as(n) {}
};

// One block of n entries: the window sums mk (and mt) -> outputs ko (and to); sa, ia (side
// 1's deviation and its inverse) and sb, ib (side 2's) per entry. `asin_fn(x, y, n)` fills
// y = asin(x). The operation order follows torch_ntk/infinite/rules/activations.py.
template <typename T, typename AsinFn>
__attribute__((always_inline)) inline void finish_impl(
    const StepScalars<T>& a, const T* __restrict__ mk, const T* __restrict__ mt,
    const T* __restrict__ sa, const T* __restrict__ ia, const T* __restrict__ sb,
    const T* __restrict__ ib, int64_t n, T* __restrict__ ko, T* __restrict__ to,
    RowScratch<T>& r, AsinFn asin_fn) {
  constexpr T kPi = T(3.14159265358979323846);
  T* __restrict__ kk = r.kk.data();
  T* __restrict__ tt = r.tt.data();
  T* __restrict__ rho = r.rho.data();
  T* __restrict__ as = r.as.data();
  const T wk = a.w2 / T(a.taps), b2 = a.b2, near = a.near;
  T* kdst = a.act == PairAct::None ? ko : kk;
  for (int64_t i = 0; i < n; ++i) kdst[i] = wk * mk[i] + b2;
  T* tdst = a.act == PairAct::None ? to : tt;
  if (tdst && mt) {
    for (int64_t i = 0; i < n; ++i) tdst[i] = (wk * mt[i]) + kdst[i];
  } else if (tdst) {
    for (int64_t i = 0; i < n; ++i) tdst[i] = kdst[i];
  }
  if (a.act == PairAct::None) return;
  if (a.act == PairAct::Erf) {
    for (int64_t i = 0; i < n; ++i) {
      const T q = (T(1) + T(2) * sa[i] * sa[i]) * (T(1) + T(2) * sb[i] * sb[i]);
      const T x = kk[i] * (T(2) * (T(1) / std::sqrt(q)));
      rho[i] = x > T(1) ? T(1) : (x < T(-1) ? T(-1) : x);
      as[i] = q;  // kept for the derivative
    }
    if (to)
      for (int64_t i = 0; i < n; ++i)
        to[i] = tt[i] * (T(1) / std::sqrt(kk[i] * kk[i] * T(-4) + as[i]) * (T(4) / kPi));
    asin_fn(rho, as, n);
    for (int64_t i = 0; i < n; ++i) ko[i] = as[i] * (T(2) / kPi);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    T x = kk[i] * ia[i] * ib[i];
    x = x > T(1) ? T(1) : (x < T(-1) ? T(-1) : x);
    x = x >= near ? T(1) : x;
    rho[i] = x <= -near ? T(-1) : x;
  }
  asin_fn(rho, as, n);
  const bool leaky = a.act == PairAct::LeakyRelu;
  const T lw = leaky ? (T(1) - a.slope) * (T(1) - a.slope) : T(1);
  const T slope = leaky ? a.slope : T(0);
  constexpr T inv2pi = T(1) / (T(2) * kPi);
  for (int64_t i = 0; i < n; ++i) {
    const T pm = as[i] + kPi / T(2);
    const T k = (std::sqrt(T(1) - rho[i] * rho[i]) + rho[i] * pm) * (sa[i] * inv2pi) * sb[i];
    ko[i] = k * lw + slope * kk[i];
  }
  if (to)
    for (int64_t i = 0; i < n; ++i) to[i] = tt[i] * (((as[i] + kPi / T(2)) * inv2pi) * lw + slope);
}

inline void asin_scalar(const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::asin(x[i]);
}
inline void asin_scalar(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::asin(x[i]);
}

#ifdef TORCH_NTK_X86
__attribute__((target("avx2,fma"))) void asin_avx2(const double* x, double* y, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(y + i, Sleef_asind4_u35avx2(_mm256_loadu_pd(x + i)));
  for (; i < n; ++i) y[i] = std::asin(x[i]);
}
__attribute__((target("avx2,fma"))) void asin_avx2(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, Sleef_asinf8_u35avx2(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] = std::asin(x[i]);
}
#endif

// Whether this CPU runs the AVX2 build (and libtorch exports SLEEF's AVX2 asin).
inline bool use_avx2() {
#ifdef TORCH_NTK_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         Sleef_asind4_u35avx2 != nullptr && Sleef_asinf8_u35avx2 != nullptr;
  return ok;
#else
  return false;
#endif
}

// 1 / s, and 0 for s = 0.
template <typename T>
std::vector<T> inverses(const T* s, int64_t n) {
  std::vector<T> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = s[i] > T(0) ? T(1) / s[i] : T(0);
  return out;
}

// dst[e * q + r] = src[r * stride + e] for r < q, e < n: q pairs' arrays -> interleaved.
template <typename T>
inline void interleave_scalar(const T* src, int64_t stride, int64_t q, int64_t n, T* dst) {
  for (int64_t e = 0; e < n; ++e)
    for (int64_t r = 0; r < q; ++r) dst[e * q + r] = src[r * stride + e];
}

// dst[r * stride + e] = src[e * q + r]: interleaved -> one pair after the other.
template <typename T>
inline void deinterleave_scalar(const T* src, int64_t q, int64_t n, T* dst, int64_t stride) {
  for (int64_t e = 0; e < n; ++e)
    for (int64_t r = 0; r < q; ++r) dst[r * stride + e] = src[e * q + r];
}

#ifdef TORCH_NTK_X86
// The 4 x 4 transpose of doubles in four registers.
__attribute__((target("avx2,fma"), always_inline)) inline void transpose4(__m256d& a, __m256d& b,
                                                                         __m256d& c,
                                                                         __m256d& d) {
  const __m256d t0 = _mm256_unpacklo_pd(a, b), t1 = _mm256_unpackhi_pd(a, b);
  const __m256d t2 = _mm256_unpacklo_pd(c, d), t3 = _mm256_unpackhi_pd(c, d);
  a = _mm256_permute2f128_pd(t0, t2, 0x20);
  b = _mm256_permute2f128_pd(t1, t3, 0x20);
  c = _mm256_permute2f128_pd(t0, t2, 0x31);
  d = _mm256_permute2f128_pd(t1, t3, 0x31);
}

// interleave_scalar for doubles, in 4 x 4 blocks when q is a multiple of 4.
__attribute__((target("avx2,fma"))) void interleave_avx2(const double* src, int64_t stride,
                                                          int64_t q, int64_t n, double* dst) {
  if (q % 4) return interleave_scalar(src, stride, q, n, dst);
  const int64_t n4 = n - n % 4;
  for (int64_t r = 0; r < q; r += 4)
    for (int64_t e = 0; e < n4; e += 4) {
      __m256d a = _mm256_loadu_pd(src + r * stride + e);
      __m256d b = _mm256_loadu_pd(src + (r + 1) * stride + e);
      __m256d c = _mm256_loadu_pd(src + (r + 2) * stride + e);
      __m256d d = _mm256_loadu_pd(src + (r + 3) * stride + e);
      transpose4(a, b, c, d);
      _mm256_storeu_pd(dst + e * q + r, a);
      _mm256_storeu_pd(dst + (e + 1) * q + r, b);
      _mm256_storeu_pd(dst + (e + 2) * q + r, c);
      _mm256_storeu_pd(dst + (e + 3) * q + r, d);
    }
  for (int64_t e = n4; e < n; ++e)
    for (int64_t r = 0; r < q; ++r) dst[e * q + r] = src[r * stride + e];
}

__attribute__((target("avx2,fma"))) void deinterleave_avx2(const double* src, int64_t q,
                                                            int64_t n, double* dst,
                                                            int64_t stride) {
  if (q % 4) return deinterleave_scalar(src, q, n, dst, stride);
  const int64_t n4 = n - n % 4;
  for (int64_t r = 0; r < q; r += 4)
    for (int64_t e = 0; e < n4; e += 4) {
      __m256d a = _mm256_loadu_pd(src + e * q + r);
      __m256d b = _mm256_loadu_pd(src + (e + 1) * q + r);
      __m256d c = _mm256_loadu_pd(src + (e + 2) * q + r);
      __m256d d = _mm256_loadu_pd(src + (e + 3) * q + r);
      transpose4(a, b, c, d);
      _mm256_storeu_pd(dst + r * stride + e, a);
      _mm256_storeu_pd(dst + (r + 1) * stride + e, b);
      _mm256_storeu_pd(dst + (r + 2) * stride + e, c);
      _mm256_storeu_pd(dst + (r + 3) * stride + e, d);
    }
  for (int64_t e = n4; e < n; ++e)
    for (int64_t r = 0; r < q; ++r) dst[r * stride + e] = src[e * q + r];
}
__attribute__((target("avx2,fma"))) void interleave_avx2(const float* src, int64_t stride,
                                                          int64_t q, int64_t n, float* dst) {
  interleave_scalar(src, stride, q, n, dst);
}
__attribute__((target("avx2,fma"))) void deinterleave_avx2(const float* src, int64_t q,
                                                            int64_t n, float* dst,
                                                            int64_t stride) {
  deinterleave_scalar(src, q, n, dst, stride);
}
#endif

// The primitive loops each build of the kernel uses: asin and the two transposes.
struct DefaultOps {
  template <typename T>
  static void asin(const T* x, T* y, int64_t n) { asin_scalar(x, y, n); }
  template <typename T>
  static void interleave(const T* src, int64_t stride, int64_t q, int64_t n, T* dst) {
    interleave_scalar(src, stride, q, n, dst);
  }
  template <typename T>
  static void deinterleave(const T* src, int64_t q, int64_t n, T* dst, int64_t stride) {
    deinterleave_scalar(src, q, n, dst, stride);
  }
};

#ifdef TORCH_NTK_X86
struct Avx2Ops {
  template <typename T>
  static void asin(const T* x, T* y, int64_t n) { asin_avx2(x, y, n); }
  template <typename T>
  static void interleave(const T* src, int64_t stride, int64_t q, int64_t n, T* dst) {
    interleave_avx2(src, stride, q, n, dst);
  }
  template <typename T>
  static void deinterleave(const T* src, int64_t q, int64_t n, T* dst, int64_t stride) {
    deinterleave_avx2(src, q, n, dst, stride);
  }
};
#endif

// Average pooling of q interleaved pairs' full arrays (h, w, h, w) -> (ho, wo, ho, wo), one axis
// at a time: out[o, u, i] = mean_j in[o, s u + j, i] of the array seen as (outer, n, inner).
template <typename T>
__attribute__((always_inline)) inline void pool_axis(const T* __restrict__ in, int64_t outer,
                                                     int64_t n, int64_t inner, int64_t k,
                                                     int64_t s, int64_t no, T* __restrict__ out) {
  const T inv = T(1) / T(k);
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t u = 0; u < no; ++u) {
      T* __restrict__ dst = out + (o * no + u) * inner;
      const T* __restrict__ src = in + (o * n + s * u) * inner;
      for (int64_t i = 0; i < inner; ++i) dst[i] = src[i];
      for (int64_t j = 1; j < k; ++j)
        for (int64_t i = 0; i < inner; ++i) dst[i] += src[j * inner + i];
      for (int64_t i = 0; i < inner; ++i) dst[i] *= inv;
    }
}

template <typename T>
__attribute__((always_inline)) inline void pool_step(const PairGeometry& g, const T* in,
                                                     T* buf_a, T* buf_b, T* out, int64_t q) {
  const int64_t h = g.h, w = g.w, ho = g.ho, wo = g.wo;
  pool_axis(in, 1, h, w * h * w * q, g.kh, g.sh, ho, buf_a);           // (ho, w, h, w)
  pool_axis(buf_a, ho * w, h, w * q, g.kh, g.sh, ho, buf_b);           // (ho, w, ho, w)
  pool_axis(buf_b, ho, w, ho * w * q, g.kw, g.sw, wo, buf_a);          // (ho, wo, ho, w)
  pool_axis(buf_a, ho * wo * ho, w, q, g.kw, g.sw, wo, out);           // (ho, wo, ho, wo)
}

// A chain's steps and per-call data, shared by the threads.
template <typename T>
struct ChainArgs {
  const PairChain& c;
  const T* k;
  const T* t;  // nullptr: the input NTK is zero
  T* k_out;
  T* t_out;    // nullptr: no NTK
  std::vector<StepScalars<T>> scalars;
  std::vector<WidthTaps> taps;
  std::vector<const T*> s1, s2;         // per activation
  std::vector<std::vector<T>> inv1, inv2;
  int64_t entries = 0, tmp = 0, block = 0, pool = 0;  // buffer sizes per pair
};

// Per-thread buffers for chunks of up to q pairs.
template <typename T>
struct ChainScratch {
  std::vector<T> a_k, a_t, b_k, b_t, tmp_k, tmp_t, block_k, block_t, pool_a, pool_b, sa, ia, sb,
      ib, sa_row, ia_row;
  RowScratch<T> rows;
  ChainScratch(const ChainArgs<T>& a, int64_t q)
      : a_k(a.entries * q), a_t(a.t_out ? a.entries * q : 0), b_k(a.entries * q),
        b_t(a.t_out ? a.entries * q : 0), tmp_k(a.tmp * q), tmp_t(a.t_out ? a.tmp * q : 0),
        block_k(a.block * q), block_t(a.block * q), pool_a(a.pool * q), pool_b(a.pool * q),
        sa(a.block * q), ia(a.block * q), sb(a.block * q), ib(a.block * q),
        sa_row(a.block * q), ia_row(a.block * q), rows(a.block * q) {}
};

// One convolution step of the pairs [p0, p0 + q), interleaved, from (in_k, in_t) to
// (out_k, out_t); in_t nullptr is a zero NTK, out_t nullptr no NTK.
template <typename Ops, typename T>
__attribute__((always_inline)) inline void conv_step(const ChainArgs<T>& a, int64_t s, int64_t p0,
                                                     int64_t q, const T* in_k, const T* in_t,
                                                     T* out_k, T* out_t, ChainScratch<T>& sc) {
  auto asin_fn = [](const T* x, T* y, int64_t m) { Ops::asin(x, y, m); };
  const PairStep& st = a.c.steps[s];
  const PairGeometry& g = st.g;
  const StepScalars<T>& sv = a.scalars[s];
  const WidthTaps& taps = a.taps[s];
  const int64_t po = g.ho * g.wo, b2 = g.b2;
  const bool with_sides = st.side >= 0, pointwise = st.pointwise();
  if (!out_t) in_t = nullptr;
  if (with_sides) {
    const T *s1 = a.s1[st.side], *s2 = a.s2[st.side];
    const T *inv1 = a.inv1[st.side].data(), *inv2 = a.inv2[st.side].data();
    for (int64_t e = 0; e < po; ++e)
      for (int64_t r = 0; r < q; ++r) {
        const int64_t i1 = (p0 + r) / b2, i2 = (p0 + r) % b2;
        sc.sa[e * q + r] = s1[i1 * po + e];
        sc.ia[e * q + r] = inv1[i1 * po + e];
        sc.sb[e * q + r] = s2[i2 * po + e];
        sc.ib[e * q + r] = inv2[i2 * po + e];
      }
  }
  T* mt = in_t ? sc.block_t.data() : nullptr;
  if (!g.full) {
    const T *mk = in_k, *mte = in_t;
    if (!pointwise) {
      window_diag(g, taps, in_k, sc.tmp_k.data(), sc.block_k.data(), q);
      if (in_t) window_diag(g, taps, in_t, sc.tmp_t.data(), mt, q);
      mk = sc.block_k.data();
      mte = mt;
    }
    finish_impl(sv, mk, mte, sc.sa.data(), sc.ia.data(), sc.sb.data(), sc.ib.data(), po * q,
                out_k, out_t, sc.rows, asin_fn);
    return;
  }
  if (!pointwise) {
    height_pass_full(g, in_k, sc.tmp_k.data(), q);
    if (in_t) height_pass_full(g, in_t, sc.tmp_t.data(), q);
  }
  // One block per side-1 position (u1, v1): its entries (u2, v2) share that position's
  // deviation, read side 2's in order.
  for (int64_t u1 = 0; u1 < g.ho; ++u1)
    for (int64_t v1 = 0; v1 < g.wo; ++v1) {
      const int64_t e1 = u1 * g.wo + v1;
      const T* mk = in_k + e1 * po * q;
      const T* mte = in_t ? in_t + e1 * po * q : nullptr;
      if (!pointwise) {
        width_block_full(g, taps, sc.tmp_k.data(), u1, v1, sc.block_k.data(), q);
        if (in_t) width_block_full(g, taps, sc.tmp_t.data(), u1, v1, mt, q);
        mk = sc.block_k.data();
        mte = mt;
      }
      if (with_sides)
        for (int64_t e2 = 0; e2 < po; ++e2)
          for (int64_t r = 0; r < q; ++r) {
            sc.sa_row[e2 * q + r] = sc.sa[e1 * q + r];
            sc.ia_row[e2 * q + r] = sc.ia[e1 * q + r];
          }
      finish_impl(sv, mk, mte, sc.sa_row.data(), sc.ia_row.data(), sc.sb.data(), sc.ib.data(),
                  po * q, out_k + e1 * po * q, out_t ? out_t + e1 * po * q : nullptr, sc.rows,
                  asin_fn);
    }
}

// The pairs [p0, p0 + q) through the whole chain; Ops: DefaultOps or Avx2Ops.
template <typename Ops, typename T>
__attribute__((always_inline)) inline void run_chunk_impl(const ChainArgs<T>& a, int64_t p0,
                                                          int64_t q, ChainScratch<T>& sc) {
  const int64_t in_pair = a.c.in_pair(), out_pair = a.c.out_pair();
  const bool ntk = a.t_out != nullptr;
  T *in_k = sc.a_k.data(), *in_t = sc.a_t.data(), *out_k = sc.b_k.data(), *out_t = sc.b_t.data();
  Ops::interleave(a.k + p0 * in_pair, in_pair, q, in_pair, in_k);
  bool with_t = ntk && a.t != nullptr;  // in_t holds an NTK (else it is zero)
  if (with_t) Ops::interleave(a.t + p0 * in_pair, in_pair, q, in_pair, in_t);
  for (int64_t s = 0; s < static_cast<int64_t>(a.c.steps.size()); ++s) {
    const PairStep& st = a.c.steps[s];
    if (st.kind == StepKind::Conv) {
      conv_step<Ops>(a, s, p0, q, in_k, with_t ? in_t : nullptr, out_k, ntk ? out_t : nullptr,
                     sc);
      with_t = ntk;
    } else {
      pool_step(st.g, in_k, sc.pool_a.data(), sc.pool_b.data(), out_k, q);
      if (with_t) pool_step(st.g, in_t, sc.pool_a.data(), sc.pool_b.data(), out_t, q);
    }
    std::swap(in_k, out_k);
    std::swap(in_t, out_t);
  }
  // Back to one pair after the other: read the chunk in order, write q streams.
  Ops::deinterleave(in_k, q, out_pair, a.k_out + p0 * out_pair, out_pair);
  if (ntk && with_t) Ops::deinterleave(in_t, q, out_pair, a.t_out + p0 * out_pair, out_pair);
  if (ntk && !with_t) std::fill(a.t_out + p0 * out_pair, a.t_out + (p0 + q) * out_pair, T(0));
}

// Pairs [begin, end) in chunks of up to `chunk`.
template <typename Ops, typename T>
__attribute__((always_inline)) inline void run_pairs_impl(const ChainArgs<T>& a, int64_t begin,
                                                          int64_t end, int64_t chunk) {
  ChainScratch<T> sc(a, chunk);
  for (int64_t p0 = begin; p0 < end; p0 += chunk)
    run_chunk_impl<Ops>(a, p0, std::min(chunk, end - p0), sc);
}

template <typename T>
void run_pairs_default(const ChainArgs<T>& a, int64_t begin, int64_t end, int64_t chunk) {
  run_pairs_impl<DefaultOps>(a, begin, end, chunk);
}

#ifdef TORCH_NTK_X86
template <typename T>
__attribute__((target("avx2,fma"))) void run_pairs_avx2(const ChainArgs<T>& a, int64_t begin,
                                                         int64_t end, int64_t chunk) {
  run_pairs_impl<Avx2Ops>(a, begin, end, chunk);
}
#endif

template <typename T>
void pair_chain_kernel(ChainArgs<T>& a, const std::vector<at::Tensor>& s1,
                       const std::vector<at::Tensor>& s2) {
  const PairChain& c = a.c;
  const int64_t pairs = c.steps.front().g.b1 * c.steps.front().g.b2;
  for (const PairStep& st : c.steps) {
    const PairGeometry& g = st.g;
    a.scalars.emplace_back(st);
    a.taps.emplace_back(g);
    a.entries = std::max({a.entries, g.in_pair(), g.out_pair()});
    a.block = std::max(a.block, g.ho * g.wo);
    if (st.kind == StepKind::Conv)
      a.tmp = std::max(a.tmp, g.full ? g.ho * g.w * g.ho * g.w : g.ho * g.w);
    else
      a.pool = std::max(a.pool, g.ho * g.w * g.h * g.w);
  }
  for (size_t i = 0; i < s1.size(); ++i) {
    a.s1.push_back(s1[i].data_ptr<T>());
    a.s2.push_back(s2[i].data_ptr<T>());
    a.inv1.push_back(inverses(a.s1.back(), s1[i].numel()));
    a.inv2.push_back(inverses(a.s2.back(), s2[i].numel()));
  }
  // Chunks of pairs whose buffers stay within a few hundred KB.
  const int64_t chunk =
      std::max<int64_t>(1, std::min<int64_t>(4, (1 << 15) / std::max<int64_t>(1, a.entries)));
  const int64_t grain = std::max<int64_t>(chunk, 16384 / std::max<int64_t>(1, a.entries));
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    const int64_t q = std::min(chunk, end - begin);
#ifdef TORCH_NTK_X86
    if (use_avx2()) return run_pairs_avx2(a, begin, end, q);
#endif
    run_pairs_default(a, begin, end, q);
  });
}

std::tuple<at::Tensor, at::Tensor> pair_chain_cpu(const at::Tensor& k,
                                                  const c10::optional<at::Tensor>& t,
                                                  at::TensorList s1, at::TensorList s2,
                                                  at::IntArrayRef steps,
                                                  at::ArrayRef<double> scales, bool full,
                                                  bool ntk) {
  const PairChain c = check_pair_chain(k, t, s1, s2, steps, scales, full);
  at::Tensor kc = k.contiguous();
  at::Tensor tc = t.has_value() && ntk ? t->contiguous() : at::Tensor();
  std::vector<at::Tensor> s1c, s2c;
  for (const auto& s : s1) s1c.push_back(s.contiguous());
  for (const auto& s : s2) s2c.push_back(s.contiguous());
  at::Tensor k_out = at::empty(c.out_shape, k.options());
  at::Tensor t_out = ntk ? at::empty(c.out_shape, k.options()) : at::empty({0}, k.options());
  if (k_out.numel() == 0) return {k_out, t_out};
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "pair_chain_cpu", [&] {
    ChainArgs<scalar_t> a{c,
                          kc.data_ptr<scalar_t>(),
                          tc.defined() ? tc.data_ptr<scalar_t>() : nullptr,
                          k_out.data_ptr<scalar_t>(),
                          ntk ? t_out.data_ptr<scalar_t>() : nullptr};
    pair_chain_kernel(a, s1c, s2c);
  });
  return {k_out, t_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ntk, CPU, m) { m.impl("pair_chain", &pair_chain_cpu); }

}  // namespace torch_ntk
