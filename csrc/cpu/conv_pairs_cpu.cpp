// CPU kernel of conv_pairs (csrc/conv_pairs.h): pairs in parallel; per pair the window mean is
// taken axis by axis (height, then width) through a pair-local buffer, so each output entry
// costs kh + kw additions instead of kh * kw, with unit-stride inner loops; the affine map and
// the activation are applied to each output row as it is finished.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../conv_pairs.h"

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

template <typename T>
struct Args {
  PairGeometry g;
  const T* k;
  const T* t;  // nullptr: the input NTK is zero
  const T* s1;
  const T* s2;
  T* k_out;
  T* t_out;  // nullptr: no NTK
  T w2, b2, slope, near;
  PairAct act;
};

// Stage 1 of the full layout: mean over the height offsets, (h, w, h, w) -> (ho, w, ho, w).
template <typename T>
void height_pass_full(const PairGeometry& g, const T* in, T* tmp) {
  const int64_t w = g.w, h = g.h, ho = g.ho;
  std::fill(tmp, tmp + ho * w * ho * w, T(0));
  for (int64_t u1 = 0; u1 < ho; ++u1)
    for (int64_t u2 = 0; u2 < ho; ++u2)
      for (int64_t j = 0; j < g.kh; ++j) {
        const int64_t h1 = g.sh * u1 + g.dh * j - g.ph, h2 = g.sh * u2 + g.dh * j - g.ph;
        if (h1 < 0 || h1 >= h || h2 < 0 || h2 >= h) continue;
        for (int64_t w1 = 0; w1 < w; ++w1) {
          const T* src = in + ((h1 * w + w1) * h + h2) * w;
          T* dst = tmp + ((u1 * w + w1) * ho + u2) * w;
          for (int64_t w2 = 0; w2 < w; ++w2) dst[w2] += src[w2];
        }
      }
  const T inv = T(1) / T(g.kh);
  for (int64_t i = 0; i < ho * w * ho * w; ++i) tmp[i] *= inv;
}

// Stage 2 of the full layout for one output row (u1, v1, u2, :): mean over the width offsets.
template <typename T>
void width_row_full(const PairGeometry& g, const T* tmp, int64_t u1, int64_t v1, int64_t u2,
                    T* row) {
  const int64_t w = g.w, ho = g.ho, wo = g.wo;
  std::fill(row, row + wo, T(0));
  for (int64_t j = 0; j < g.kw; ++j) {
    const int64_t w1 = g.sw * v1 + g.dw * j - g.pw;
    if (w1 < 0 || w1 >= w) continue;
    const int64_t off = g.dw * j - g.pw;
    int64_t lo, hi;
    tap_range(g.sw, off, w, wo, &lo, &hi);
    const T* src = tmp + ((u1 * w + w1) * ho + u2) * w + off;
    if (g.sw == 1) {
      for (int64_t v2 = lo; v2 < hi; ++v2) row[v2] += src[v2];
    } else {
      for (int64_t v2 = lo; v2 < hi; ++v2) row[v2] += src[g.sw * v2];
    }
  }
  const T inv = T(1) / T(g.kw);
  for (int64_t v2 = 0; v2 < wo; ++v2) row[v2] *= inv;
}

// The diagonal layout of one pair: (h, w) -> (ho, wo), both axes through `tmp` (ho, w).
template <typename T>
void window_diag(const PairGeometry& g, const T* in, T* tmp, T* out) {
  const int64_t w = g.w, h = g.h, ho = g.ho, wo = g.wo;
  std::fill(tmp, tmp + ho * w, T(0));
  for (int64_t u = 0; u < ho; ++u)
    for (int64_t j = 0; j < g.kh; ++j) {
      const int64_t hh = g.sh * u + g.dh * j - g.ph;
      if (hh < 0 || hh >= h) continue;
      for (int64_t x = 0; x < w; ++x) tmp[u * w + x] += in[hh * w + x];
    }
  const T inv_h = T(1) / T(g.kh), inv_w = T(1) / T(g.kw);
  for (int64_t i = 0; i < ho * w; ++i) tmp[i] *= inv_h;
  std::fill(out, out + ho * wo, T(0));
  for (int64_t u = 0; u < ho; ++u)
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t off = g.dw * j - g.pw;
      int64_t lo, hi;
      tap_range(g.sw, off, w, wo, &lo, &hi);
      for (int64_t v = lo; v < hi; ++v) out[u * wo + v] += tmp[u * w + g.sw * v + off];
    }
  for (int64_t i = 0; i < ho * wo; ++i) out[i] *= inv_w;
}

// Affine map and activation of `n` entries: means mk (and mt) -> outputs; sa per entry or
// one value (sa_step 0), likewise sb.
template <typename T>
inline void finish(const Args<T>& a, const T* mk, const T* mt, const T* sa, int64_t sa_step,
                   const T* sb, int64_t sb_step, int64_t n, T* ko, T* to) {
  for (int64_t i = 0; i < n; ++i) {
    const T kk = a.w2 * mk[i] + a.b2;
    const T tt = mt ? a.w2 * mt[i] + kk : kk;
    T k_act, t_act;
    pair_activation<T>(kk, tt, sa ? sa[i * sa_step] : T(0), sb ? sb[i * sb_step] : T(0), a.act,
                       a.slope, a.near, &k_act, &t_act);
    ko[i] = k_act;
    if (to) to[i] = t_act;
  }
}

template <typename T>
void conv_pairs_kernel(const Args<T>& a) {
  const PairGeometry& g = a.g;
  const int64_t pairs = g.b1 * g.b2, in_pair = g.in_pair(), out_pair = g.out_pair();
  const int64_t po = g.ho * g.wo;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, out_pair));
  const bool with_sides = a.act != PairAct::None;
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    const int64_t tmp_size = g.full ? g.ho * g.w * g.ho * g.w : g.ho * g.w;
    std::vector<T> tmp_k(tmp_size), tmp_t(a.t ? tmp_size : 0);
    std::vector<T> row_k(g.full ? g.wo : po), row_t(g.full ? g.wo : po);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i1 = p / g.b2, i2 = p % g.b2;
      const T* kin = a.k + p * in_pair;
      const T* tin = a.t ? a.t + p * in_pair : nullptr;
      T* ko = a.k_out + p * out_pair;
      T* to = a.t_out ? a.t_out + p * out_pair : nullptr;
      const T* sa = with_sides ? a.s1 + i1 * po : nullptr;
      const T* sb = with_sides ? a.s2 + i2 * po : nullptr;
      if (!g.full) {
        window_diag(g, kin, tmp_k.data(), row_k.data());
        if (tin) window_diag(g, tin, tmp_t.data(), row_t.data());
        finish(a, row_k.data(), tin ? row_t.data() : nullptr, sa, 1, sb, 1, po, ko, to);
        continue;
      }
      height_pass_full(g, kin, tmp_k.data());
      if (tin) height_pass_full(g, tin, tmp_t.data());
      for (int64_t u1 = 0; u1 < g.ho; ++u1)
        for (int64_t v1 = 0; v1 < g.wo; ++v1)
          for (int64_t u2 = 0; u2 < g.ho; ++u2) {
            width_row_full(g, tmp_k.data(), u1, v1, u2, row_k.data());
            if (tin) width_row_full(g, tmp_t.data(), u1, v1, u2, row_t.data());
            const int64_t at = ((u1 * g.wo + v1) * g.ho + u2) * g.wo;
            finish(a, row_k.data(), tin ? row_t.data() : nullptr,
                   sa ? sa + u1 * g.wo + v1 : nullptr, 0, sb ? sb + u2 * g.wo : nullptr, 1,
                   g.wo, ko + at, to ? to + at : nullptr);
          }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> conv_pairs_cpu(
    const at::Tensor& k, const c10::optional<at::Tensor>& t, const at::Tensor& s1,
    const at::Tensor& s2, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef dilation, at::IntArrayRef pad, at::IntArrayRef out_size, bool full, bool ntk,
    double w2, double b2, c10::string_view act_name, double slope) {
  const PairAct act = parse_pair_act(std::string(act_name));
  const PairGeometry g =
      check_conv_pairs(k, t, s1, s2, kernel, stride, dilation, pad, out_size, full, act);
  const auto shape = conv_pairs_out_shape(k, out_size, full);
  at::Tensor kc = k.contiguous();
  at::Tensor tc = t.has_value() && ntk ? t->contiguous() : at::Tensor();
  at::Tensor s1c = s1.contiguous(), s2c = s2.contiguous();
  at::Tensor k_out = at::empty(shape, k.options());
  at::Tensor t_out = ntk ? at::empty(shape, k.options()) : at::empty({0}, k.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "conv_pairs_cpu", [&] {
    Args<scalar_t> a;
    a.g = g;
    a.k = kc.data_ptr<scalar_t>();
    a.t = tc.defined() ? tc.data_ptr<scalar_t>() : nullptr;
    a.s1 = act != PairAct::None ? s1c.data_ptr<scalar_t>() : nullptr;
    a.s2 = act != PairAct::None ? s2c.data_ptr<scalar_t>() : nullptr;
    a.k_out = k_out.data_ptr<scalar_t>();
    a.t_out = ntk ? t_out.data_ptr<scalar_t>() : nullptr;
    a.w2 = static_cast<scalar_t>(w2);
    a.b2 = static_cast<scalar_t>(b2);
    a.slope = static_cast<scalar_t>(slope);
    a.near = scalar_t(1) - scalar_t(8) * std::numeric_limits<scalar_t>::epsilon();
    a.act = act;
    conv_pairs_kernel(a);
  });
  return {k_out, t_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ntk, CPU, m) { m.impl("conv_pairs", &conv_pairs_cpu); }

}  // namespace torch_ntk
